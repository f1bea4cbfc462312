"""Captions from a `metadata.jsonl` beside the images (the Hugging Face image-folder convention:
one JSON object a line with `file_name` and `text`), for captioned fine-tuning."""
from __future__ import annotations

import json
from pathlib import Path

METADATA = "metadata.jsonl"
_cache: dict = {}


def jsonl_captions(folder: Path, warn=None) -> dict:
    """file name -> caption of the images in `folder` (empty without a metadata.jsonl). Lines
    that are not a JSON object with text fields `file_name` and `text` are named in one warning."""
    path = Path(folder) / METADATA
    if not path.is_file():
        return {}
    stamp = (str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size)
    if stamp in _cache:
        return _cache[stamp]
    captions, bad = {}, []
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
        if warn:
            warn(f"'{path}' is not UTF-8 text; it was read as Latin-1. Save it as UTF-8 to be "
                 "sure of its words.")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("file_name"), str)
                and isinstance(row.get("text"), str)):
            bad.append(number)
            continue
        captions[Path(row["file_name"]).name] = row["text"].strip()
    if bad and warn:
        warn(f"{len(bad)} line(s) of '{path}' are not {{\"file_name\": ..., \"text\": ...}} "
             f"objects and were skipped (line {', '.join(map(str, bad[:10]))}).")
    _cache.clear()
    _cache[stamp] = captions
    return captions
