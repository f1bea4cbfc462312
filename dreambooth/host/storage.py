"""Folders at object-storage URLs (s3://, gs://, az://, file://, ... through fsspec and the
backend's package): a host of the run's events, never a part of the loop.

Outputs: output_dir, lora_dir, embedding_dir may be URLs. The run writes each file locally as
always (atomically, into <model_dir>/outbox/<field>), then it is uploaded; the run's end waits
for the uploads and says each URL. An upload is verified (size, and the object's checksum: its
ETag where the backend computes one, else the object read back and hashed); a failure never
touches the local file, is recorded in <model_dir>/outbox/uploads.json and named with the one
command that retries it, `python -m dreambooth upload <model_dir>`, which skips what already
arrived whole and verifies the rest.

Inputs (urls.py, which also holds `localize`, the host's one call): instance/class folders and
the source checkpoint at URLs are fetched into a cache keyed by each object's identity.

Credentials come only from the backend's standard chain (environment, profile, instance role);
nothing here reads, prints or records one: URLs are shown through config.cloud.redact.
fsspec and the backend are imported only when a URL is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import events as ev
from ..config.cloud import is_url, redact
from ..config.errors import DreamboothError
from .multipart import put_in_parts, resumable

OUTPUT_FIELDS = ("output_dir", "lora_dir", "embedding_dir")
OUTBOX = "outbox"
MANIFEST = "uploads.json"
PART = 16 * 2**20  # multipart part size: an S3 ETag of a file in parts is computed from it


def open_url(url: str):
    """(filesystem, path) of `url`; a missing backend package is one sentence with its fix."""
    try:
        import fsspec
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        package = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                   "abfs": "adlfs"}.get(scheme, getattr(e, "name", None) or "fsspec")
        raise DreamboothError(f"'{redact(url)}' needs the {package} package, which is not "
                              "installed.", f"pip install {package}") from None
    except ValueError as e:
        raise DreamboothError(f"'{redact(url)}' is not a URL this machine can open ({e}).",
                              "Use s3://, gs://, az://, file:// or a local path.") from None


def reason(e: BaseException) -> str:
    """What went wrong, in a few words, for a sentence (no secret is in a backend's message)."""
    code, cause = None, e
    while cause is not None and code is None:  # s3fs raises OSErrors caused by botocore's
        response = getattr(cause, "response", None)
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        cause = cause.__cause__
    words = {"InvalidAccessKeyId": "the access key is not known (wrong credentials)",
             "SignatureDoesNotMatch": "the secret key does not match (wrong credentials)",
             "AccessDenied": "access denied by the bucket's policy",
             "NoSuchBucket": "the bucket does not exist"}
    if code in words:
        return words[code]
    if isinstance(e, PermissionError):
        return "access denied or wrong credentials"
    if isinstance(e, FileNotFoundError):
        return "the bucket does not exist" if "bucket" in str(e).lower() else \
            "the folder or object does not exist"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


@dataclass(frozen=True)
class Digest:
    size: int
    sha256: str
    etags: tuple  # the ETags an S3-like store gives this content: one part, parts of PART


def digest(path: Path, part: int | None = None) -> Digest:
    part = part or PART  # read at the call: the module's part size as it is now
    sha, whole, parts, size = hashlib.sha256(), hashlib.md5(), [], 0
    with open(path, "rb") as f:
        while chunk := f.read(part):
            sha.update(chunk)
            whole.update(chunk)
            parts.append(hashlib.md5(chunk).digest())
            size += len(chunk)
    multipart = hashlib.md5(b"".join(parts)).hexdigest() + f"-{len(parts)}"
    return Digest(size, sha.hexdigest(), (whole.hexdigest(), multipart))


def remote_sha256(fs, path: str) -> str:
    sha = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(PART):
            sha.update(chunk)
    return sha.hexdigest()


def arrived(fs, path: str, want: Digest) -> bool:
    """The object at `path` holds the local file's bytes: size, then checksum."""
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return False
    if info.get("size") != want.size:
        return False
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    if etag and etag in want.etags:
        return True
    return remote_sha256(fs, path) == want.sha256  # another backend, or other part sizes


def upload_file(local: Path, url: str, on_bytes: Callable[[int, int], None] | None = None,
                upload_id: str | None = None, keep: Callable[[str | None], None] | None = None
                ) -> str:
    """Send `local` to `url` unless it is there whole; verify; 'sent' | 'present' | 'resumed at
    part N of M'. Only reads the local file. With `keep`, a large file to S3 goes in parts whose
    upload (`upload_id`, recorded through `keep`) a retry continues (multipart.py)."""
    want = digest(local)
    fs, path = open_url(url)
    if arrived(fs, path, want):
        return "present"
    how = "sent"
    if keep is not None and resumable(fs, want.size, PART):
        first = put_in_parts(fs, path, local, PART, upload_id, keep, on_bytes)
        how = f"resumed at part {first} of {-(-want.size // PART)}" if first > 1 else how
    else:
        kwargs = {"chunksize": PART} if "s3" in fs.protocol else {}
        if on_bytes is not None:
            kwargs["callback"] = _callback(on_bytes)
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        if "file" in protocols:  # a local folder is made; a bucket never is
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(local), path, **kwargs)
    fs.invalidate_cache(path)
    if not arrived(fs, path, want):
        raise OSError(f"the object at {redact(url)} does not match the local file after the "
                      "upload")
    return how


def _callback(on_bytes):
    from fsspec.callbacks import Callback

    class Bytes(Callback):
        def call(self, *args, **kwargs):
            on_bytes(self.value, self.size or 0)
    return Bytes()


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


class Manifest:
    """<model_dir>/outbox/uploads.json: local file -> {url, size, state, error}; written
    atomically after each change."""

    def __init__(self, model_dir: Path) -> None:
        self.path = Path(model_dir) / OUTBOX / MANIFEST
        self.lock = threading.Lock()
        self.files: dict[str, dict] = {}
        if self.path.is_file():
            self.files = json.loads(self.path.read_text(encoding="utf-8")).get("files", {})

    def set(self, local: Path, **entry) -> None:
        with self.lock:
            self.files.setdefault(str(local), {}).update(entry)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"files": self.files}, indent=1), encoding="utf-8")
            os.replace(tmp, self.path)

    def resume(self, local: Path) -> tuple:
        """(the multipart upload to continue, the call that records it) for upload_file."""
        return (self.files.get(str(local), {}).get("upload_id"),
                lambda upload_id: self.set(local, upload_id=upload_id))

    def pending(self) -> list[tuple[Path, str]]:
        return [(Path(k), v["url"]) for k, v in self.files.items() if v.get("state") != "done"]


class Uploads:
    """The listener: each file the run saves into an outbox folder goes to its URL, one at a
    time beside the training; `finish()` waits for them all and returns the failures."""

    def __init__(self, model_dir: Path, targets: dict[Path, str], say: Callable[[str], None]):
        self.model_dir, self.targets, self.say = Path(model_dir), targets, say
        self.manifest = Manifest(model_dir)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dreambooth-upload")
        self.jobs: dict[str, Future] = {}

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.CheckpointSaved):
            path = Path(event.path)
            for f in [path, *sorted(path.parent.glob(path.stem + ".*"))]:
                self.queue(f)

    def queue(self, local: Path) -> None:
        folder = next((d for d in self.targets if local.parent == d), None)
        if folder is None or not local.is_file() or str(local) in self.jobs:
            return
        url = join(self.targets[folder], local.name)
        self.manifest.set(local, url=url, size=local.stat().st_size, state="pending")
        self.jobs[str(local)] = self.pool.submit(self.send, local, url)

    def send(self, local: Path, url: str) -> None:
        shown = redact(url)

        def on_bytes(done: int, total: int) -> None:  # a line per part of a large file
            if total > PART and 0 < done < total:
                self.say(f"uploading {shown}: {done / 2**20:.0f} of {total / 2**20:.0f} MiB")
        try:
            upload_file(local, url, on_bytes, *self.manifest.resume(local))
        except Exception as e:  # said at the end, with the command that retries
            self.manifest.set(local, state="failed", error=reason(e))
            raise
        self.manifest.set(local, state="done", error="")

    def finish(self) -> list[str]:
        """Wait for every upload (and send what the outbox holds beyond the saves); the lines
        that failed, each a sentence."""
        for folder in self.targets:
            for f in sorted(folder.glob("*")) if folder.is_dir() else []:
                if not f.name.startswith("."):
                    self.queue(f)
        failed = []
        for local, job in self.jobs.items():
            url = redact(self.manifest.files[local]["url"])
            try:
                job.result()
                self.say(f"uploaded: {url}")
            except Exception as e:
                failed.append(f"{local} did not reach {url} ({reason(e)})")
        self.pool.shutdown()
        return failed


def outbox_config(config, say: Callable[[str], None]):
    """(config with each output URL replaced by its local outbox folder, Uploads) or
    (config, None) when no output is a URL."""
    urls = {name: getattr(config, name) for name in OUTPUT_FIELDS if is_url(getattr(config, name))}
    if not urls:
        return config, None
    for url in dict.fromkeys(urls.values()):
        open_url(url)  # a missing backend package: said before any training
    local = {name: config.model_dir / OUTBOX / name for name in urls}
    targets = {local[name]: url for name, url in urls.items()}
    return config.replace(**{name: str(p) for name, p in local.items()}), \
        Uploads(config.model_dir, targets, say)


def upload_run(model_dir: str, say: Callable[[str], None]) -> int:
    """`python -m dreambooth upload <model_dir>`: send what did not arrive; 0 when all did."""
    manifest = Manifest(Path(model_dir))
    if not manifest.path.is_file():
        raise DreamboothError(f"'{model_dir}' has no uploads to retry ({manifest.path} is "
                              "missing).", "Give the model's folder, <work_dir>/<model_name>, "
                              "of a run whose output_dir, lora_dir or embedding_dir is a URL.")
    failed = 0
    for local, url in manifest.pending():
        if not local.is_file():
            say(f"error: {local} is gone; it can't be uploaded to {redact(url)}.")
            failed += 1
            continue
        try:
            how = upload_file(local, url, None, *manifest.resume(local))
        except Exception as e:
            manifest.set(local, state="failed", error=reason(e))
            say(f"error: {local} did not reach {redact(url)} ({reason(e)}).")
            failed += 1
            continue
        manifest.set(local, state="done", error="")
        say(f"uploaded: {redact(url)}" + (" (already there, verified)" if how == "present"
                                          else " (verified)" if how == "sent"
                                          else f" ({how}, verified)"))
    return 1 if failed else 0
