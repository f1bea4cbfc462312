"""Captions for [filewords]: an image's `.txt` beside it, its line in a `metadata.jsonl` beside
the images (the Hugging Face image-folder convention: one JSON object a line with `file_name` and
`text`), or the words of its file name; and the warnings when they come out empty or from a
file name that is not UTF-8."""
from __future__ import annotations

import json
import re
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


# what [filewords] found: ("txt" | "metadata" | "name", and for "name" whether it was UTF-8)
WHY_EMPTY = {"txt": "its .txt caption is empty",
             "metadata": "its line in metadata.jsonl has no text",
             "name": "no .txt caption, no line in metadata.jsonl, and no words in its file name"}


def readable_name(name: str) -> str:
    """A file name as text. A name that is not UTF-8 on disk (Python keeps each byte it could
    not decode as a lone surrogate, U+DC80-U+DCFF) has those bytes read as Latin-1."""
    return re.sub("[\udc80-\udcff]", lambda m: chr(ord(m.group()) - 0xDC00), name)


def name_words(stem: str) -> str:
    """The words of a file name: '_' and '-' as spaces, copy numbers '(1)' and trailing digits
    dropped."""
    words = re.sub(r"[_\-]+", " ", re.sub(r"\(\d+\)|\d+$", "", readable_name(stem)))
    return " ".join(words.split())


def caption_for(image: Path, warn=None) -> tuple[str, str]:
    """(caption, where it came from) of an image: its .txt beside it ("txt"), its line in the
    folder's metadata.jsonl ("metadata"), or the words of its file name ("name")."""
    txt = image.with_suffix(".txt")
    if txt.is_file():
        raw = txt.read_bytes()
        try:
            return raw.decode("utf-8-sig").strip(), "txt"
        except UnicodeDecodeError:
            if warn:
                warn(f"The caption '{readable_name(txt.name)}' is not UTF-8 text; it was read "
                     "as Latin-1. Save it as UTF-8 to be sure of its words.")
            return raw.decode("latin-1").strip(), "txt"
    listed = jsonl_captions(image.parent, warn)
    for name in dict.fromkeys((image.name, readable_name(image.name))):
        if name in listed:
            return listed[name], "metadata"
    return name_words(image.stem), "name"


def warn_captions(folder, prompt: str, found: dict, warn) -> None:
    """One warning for the images whose [filewords] caption is empty (naming them and why), and
    one for the captions taken from file names that are not UTF-8."""
    empty = [(p, src) for p, (text, src) in found.items() if not text]
    if empty:
        listed = "; ".join(f"{readable_name(p.name)} ({WHY_EMPTY[src]})" for p, src in empty[:5])
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        shown = prompt.replace("[filewords]", "").strip()
        warn(f"{len(empty)} of {len(found)} image(s) in '{readable_name(str(folder))}' train on "
             f"an empty caption ([filewords] found nothing): {listed}{more}; their prompt is "
             f"{repr(shown) if shown else 'empty'}. Put a caption in a .txt file beside each "
             "image (same name), or a line in metadata.jsonl, or name the files by what they "
             "show.")
    odd = [p for p, (_, src) in found.items() if src == "name" and readable_name(p.name) != p.name]
    if odd:
        listed = ", ".join(readable_name(p.name) for p in odd[:5])
        warn(f"{len(odd)} file name(s) in '{readable_name(str(folder))}' are not UTF-8; their "
             f"captions were read from the names as Latin-1: {listed}"
             f"{', ...' if len(odd) > 5 else ''}. Rename them in UTF-8 to be sure of the words.")
