"""Which pins of a constraints file the installed packages would move: `name old -> new` lines.

    python tools/pin_changes.py constraints/newest.txt
"""
from __future__ import annotations

import sys
from importlib import metadata


def pins(path: str) -> dict[str, str]:
    out = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[name.strip().lower().replace("_", "-")] = version.strip()
    return out


def installed() -> dict[str, str]:
    return {d.metadata["Name"].lower().replace("_", "-"): d.version.split("+")[0]
            for d in metadata.distributions() if d.metadata["Name"]}


def main(path: str) -> int:
    have, want = installed(), pins(path)
    moved = [f"{n} {v} -> {have[n]}" for n, v in sorted(want.items()) if n in have and have[n] != v]
    added = [f"{n} (new) {have[n]}" for n in sorted(set(have) - set(want))
             if n not in ("pip", "setuptools", "wheel", "dreambooth-extension")]
    for line in moved + added or ["none: the pins are the newest releases"]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "constraints/newest.txt"))
