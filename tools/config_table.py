"""Print the README's configuration reference table from the config's own field help.

    python tools/config_table.py            # print it
    python tools/config_table.py --write    # replace the table in README.md
"""
from __future__ import annotations

import sys
from pathlib import Path

START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def table() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dreambooth.config import field_help
    rows = ["| setting | default | what it does |", "| --- | --- | --- |"]
    for name, help_text, default, advanced in field_help():
        shown = "[]" if name == "concepts" else repr(default).replace("'", '"')
        rows.append(f"| `{name}` | `{shown}` | {help_text}{' *(advanced)*' if advanced else ''} |")
    return "\n".join(rows)


def replace_in(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    readme = Path(__file__).resolve().parents[1] / "README.md"
    if "--write" in sys.argv:
        readme.write_text(replace_in(readme.read_text()))
    else:
        print(table())
