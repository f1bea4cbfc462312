"""The name of the base a snapshot was trained beside: the source checkpoint's sha256 (of the
whole file, hashed in the background while a run sets up, once per file and process) and the
working model's revision it was loaded at."""
from __future__ import annotations

import hashlib
import os
import threading

_HASHES: dict[tuple, dict] = {}  # the source's identity on disk -> {"thread", "sha256"}
_HASHES_LOCK = threading.Lock()


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino


def _hash_into(path: str, slot: dict) -> None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        slot["sha256"] = digest.hexdigest()
    except OSError:
        slot["sha256"] = None


def _hashing(path: str) -> dict | None:
    """The hash of `path` as it is on disk now, being computed in the background (once per
    file and process); None when the file can't be read."""
    try:
        key = _file_key(path)
    except (OSError, TypeError, ValueError):
        return None
    with _HASHES_LOCK:
        if key not in _HASHES:
            slot: dict = {}
            slot["thread"] = threading.Thread(target=_hash_into, args=(path, slot), daemon=True)
            _HASHES[key] = slot
            slot["thread"].start()
        return _HASHES[key]


def hash_source_ahead(cfg, frozen: bool) -> None:
    """Start hashing the source checkpoint while the run sets up when its base is `frozen`
    (LoRA, textual inversion): a snapshot names that base by it (no wait at a Cancel's
    snapshot), a resume checks it. A full fine-tune reads the file once, to load it."""
    if frozen:
        _hashing(cfg.source_checkpoint)


def source_sha256(path: str) -> str | None:
    """sha256 of the whole source file (None when it can't be read)."""
    slot = _hashing(path)
    if slot is None:
        return None
    slot["thread"].join()
    return slot["sha256"]


def base_identity(trainer, frozen: bool) -> dict:
    """What the weights a snapshot does not hold come from: the source file (by hash, for a
    `frozen` base only: a full fine-tune's snapshot holds every weight) and the working model's
    revision it was loaded at, and how the frozen UNet was stored."""
    return {"source_sha256": source_sha256(trainer.cfg.source_checkpoint) if frozen else None,
            "revision": getattr(trainer, "base_revision", trainer.revision),
            "fp8_base": bool(trainer.cfg.fp8_base)}
