"""A config file's text, whatever Unicode encoding an editor saved it in. Standard library only."""
from __future__ import annotations

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
