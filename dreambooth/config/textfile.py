"""A config file's text, whatever Unicode encoding an editor saved it in, and JSON read from it
(or from an HTTP body) with every failure said as a Problem. Standard library only."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError, Problem


def read_config_text(path: Path) -> str:
    """A config file's text: UTF-8 (with or without a BOM), or UTF-16/32 with their BOM."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError([Problem("--config", str(path), f"can't be read ({e.strerror})",
                                   "give a readable JSON file")]) from None
    encoding = "utf-32" if data[:4] in (b"\xff\xfe\0\0", b"\0\0\xfe\xff") else \
        "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ConfigError([Problem("--config", str(path), f"is not {encoding.upper()} text "
                                   f"(byte {e.start})", "save the file as UTF-8")]) from None


MAX_DEPTH = 32  # a config nests 3 levels; deeper JSON is refused before anything walks it


def parse_json(text: str | bytes, where: str = "(file)"):
    """The JSON value in `text`, or ConfigError naming `where` (the CLI's '(file)', the API's
    '(body)'): bad syntax, bytes that are not Unicode, a number too long to read (5000 digits),
    nesting deeper than MAX_DEPTH (a 100 000-deep list overflows the parser's stack)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError([Problem(where, f"line {e.lineno} column {e.colno}",
                                   f"is not valid JSON ({e.msg})",
                                   "fix the JSON syntax at that place")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(where, f"byte {e.start}", "is not UTF-8 text",
                                   "send the JSON as UTF-8")]) from None
    except (ValueError, RecursionError) as e:  # a 5000-digit number, nesting 100 000 deep
        raise ConfigError([Problem(where, type(e).__name__, "holds a value this can't read ("
                                   f"{str(e).splitlines()[0][:120] if str(e) else 'too deep'})",
                                   "give plain numbers and at most a few levels of nesting")
                           ]) from None
    if depth_over(data, MAX_DEPTH):
        raise ConfigError([Problem(where, f"over {MAX_DEPTH} levels", "nests lists or objects "
                                   f"deeper than {MAX_DEPTH} levels",
                                   "give plain numbers and at most a few levels of nesting")])
    return data


def depth_over(value, limit: int) -> bool:
    """True when `value` nests lists/dicts more than `limit` levels deep (walked without
    recursion, so any depth is safe)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict)
                                                  else item))
    return False
