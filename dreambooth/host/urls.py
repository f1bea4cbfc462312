"""Inputs at object-storage URLs: a concept's instance or class folder, the source checkpoint.

Each is fetched once into <work_dir>/.inputs/<key of the URL>/ (its index: <key>.json) and
reused by the next run while every object keeps its identity (ETag, size and modification time
as the store reports them): an object that changed is fetched again, one that is gone is removed
from the cache. A file is written beside its place under a temporary name, checked (its size,
and its MD5 where the store's ETag is one), then renamed: a failed fetch (a full disk, a dropped
connection) leaves the cache as it was. A class folder's URL may hold nothing yet: the images
generated into its local copy are uploaded back when the run ends (`send_back`), or stay in the
local copy with a warning where the store refuses them. fsspec is imported only through
storage.open_url, when a URL is given.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from ..config.cloud import is_url, redact
from ..config.errors import DreamboothError
from .storage import PART, join, open_url, outbox_config, reason, upload_file


def localize(config, say: Callable[[str], None]):
    """The config a run trains with: input URLs fetched into the cache, output URLs replaced by
    outbox folders (storage.py); and the Uploads listener (None when no output is a URL)."""
    return outbox_config(fetch_inputs(config, say), say)


def fetch_inputs(config, say: Callable[[str], None]):
    """`config` with each input URL replaced by its local copy in the cache."""
    concepts = config.concepts
    if not (is_url(config.source_checkpoint) or any(
            is_url(c.instance_data_dir) or is_url(c.class_data_dir) for c in concepts)):
        return config
    cache = Path(config.work_dir) / ".inputs"
    changes = {}
    if is_url(config.source_checkpoint):
        changes["source_checkpoint"] = str(fetch(config.source_checkpoint, cache, say, True))
    new = []
    for c in concepts:
        local = {k: str(fetch(getattr(c, k), cache, say, empty=k == "class_data_dir"))
                 for k in ("instance_data_dir", "class_data_dir") if is_url(getattr(c, k))}
        new.append(dataclasses.replace(c, **local))
    return config.replace(concepts=tuple(new), **changes)


def identity(info: dict) -> str:
    etag = str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or "").strip('"')
    when = info.get("LastModified") or info.get("mtime") or info.get("updated") or ""
    return f"{etag}|{info.get('size')}|{when}"


def fetch(url: str, cache: Path, say: Callable[[str], None], one_file: bool = False,
          empty: bool = False) -> Path:
    """The local copy of the folder (or, `one_file`, the file) at `url`; `empty`: the folder
    may hold nothing yet (a class folder whose images are generated)."""
    fs, root = open_url(url)
    folder = cache / hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    try:
        fs.invalidate_cache()  # a listing this process made earlier may be stale
        listing = {root: fs.info(root)} if one_file else fs.find(root, detail=True)
    except Exception as e:
        raise DreamboothError(f"'{redact(url)}' can't be read ({reason(e)}).",
                              "Check the URL and the credentials (the backend's environment "
                              "variables, profile or instance role).") from None
    files = {(p.rsplit("/", 1)[-1] if one_file else _name(p, root)): (p, info)
             for p, info in listing.items() if info.get("type", "file") == "file"}
    if not files and not empty:
        raise DreamboothError(f"'{redact(url)}' holds no files.", "Check the URL.")
    folder.mkdir(parents=True, exist_ok=True)
    index = _read_index(folder.with_suffix(".json"))
    fetched = 0
    for rel, (path, info) in sorted(files.items()):
        target = folder / rel
        if index.get(rel) == identity(info) and target.is_file() \
                and target.stat().st_size == info.get("size"):
            continue
        _download(fs, path, target, info, url, folder)
        index[rel] = identity(info)
        _write_index(folder.with_suffix(".json"), index)
        fetched += 1
    for rel in set(index) - set(files):  # gone from the store: gone from the cache
        (folder / rel).unlink(missing_ok=True)
        del index[rel]
    _write_index(folder.with_suffix(".json"), index)
    say(f"{redact(url)}: {fetched} file(s) fetched, {len(files) - fetched} reused from the "
        f"cache {folder}")
    return folder / next(iter(files)) if one_file else folder


def _name(path: str, root: str) -> str:
    """An object's name inside the folder at `root`, as the cache's index keys it."""
    return path[len(root):].strip("/")


def send_back(original, local, say: Callable[[str], None]) -> None:
    """Class images generated into the local copy of a class folder at a URL go to that URL,
    each verified and recorded in the cache's index (the next run reuses them, here or on
    another machine). A store that refuses them is a warning: they stay in the local copy."""
    for c, mine in zip(original.concepts, local.concepts):
        if is_url(c.class_data_dir):
            _send_folder(c.class_data_dir, Path(mine.class_data_dir), say)


def _send_folder(url: str, folder: Path, say: Callable[[str], None]) -> None:
    index = _read_index(folder.with_suffix(".json"))
    new = sorted(rel for rel in (p.relative_to(folder).as_posix() for p in folder.rglob("*")
                                 if p.is_file() and not p.name.startswith("."))
                 if rel not in index)
    sent = []
    try:
        for rel in new:
            upload_file(folder / rel, join(url, rel))
            sent.append(rel)
    except Exception as e:
        say(f"warning: {len(new) - len(sent)} class image(s) generated for '{redact(url)}' did "
            f"not reach it ({reason(e)}); they stay in {folder}, where the next run on this "
            "machine finds them.")
    if not sent:
        return
    try:  # the identities a listing gives, as the next fetch compares them
        fs, root = open_url(url)
        fs.invalidate_cache()
        listing = {_name(p, root): info for p, info in fs.find(root, detail=True).items()}
        index.update({rel: identity(listing[rel]) for rel in sent if rel in listing})
        _write_index(folder.with_suffix(".json"), index)
    except Exception:  # unrecorded: the next run fetches them once more
        pass
    say(f"{redact(url)}: {len(sent)} generated class image(s) uploaded (verified)")


def _download(fs, path: str, target: Path, info: dict, url: str, folder: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    md5, size = hashlib.md5(), 0
    try:
        with fs.open(path, "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(PART):
                out.write(chunk)
                md5.update(chunk)
                size += len(chunk)
        etag = str(info.get("ETag") or "").strip('"')
        if size != info.get("size") or (etag and "-" not in etag and etag != md5.hexdigest()):
            raise OSError(f"{size} bytes arrived with a checksum other than the store's "
                          f"({info.get('size')} bytes): it changed during the fetch")
        os.replace(tmp, target)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        full = isinstance(e, OSError) and e.errno in (28, 27)  # ENOSPC, EFBIG
        raise DreamboothError(
            f"Fetching '{redact(url)}' into {folder} failed at {target.name} ({reason(e)}); "
            "the files fetched before it are kept.",
            "Free space on that disk (or set work_dir to a larger one) and run again."
            if full else "Check the connection and the credentials, and run again.") from None


def _read_index(path: Path) -> dict:
    """<cache>/<key>.json beside the folder: file -> the identity it was fetched at."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_index(path: Path, index: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    os.replace(tmp, path)
