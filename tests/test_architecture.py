"""The shape of the package holds: imports point one way down the pipeline (ui -> host ->
training -> data -> model -> config), no module imports itself back through others, no module
reaches into another's private names, and no file outgrows the budget. See
docs/architecture.md."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dreambooth"
STAGES = {"config": 0, "assets": 0, "model": 1, "data": 2, "training": 3, "host": 4, "ui": 5}
TOP = 6  # dreambooth/__init__.py and __main__.py: the public face, above every stage
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def stage(module: str) -> int:
    parts = module.split(".")
    return STAGES[parts[1]] if len(parts) > 1 and parts[1] in STAGES else TOP


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(absolute module, names taken from it, line) of every import of a dreambooth module,
    at module level or inside functions."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "dreambooth"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dreambooth":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            rest = [n for n in names if f"{target}.{n}" not in known]
            out += [(m, [], node.lineno) for m in submodules]
            if rest or not submodules:
                out.append((target, rest, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for t, _, _ in imports(p, known) if t in known and t != m}
            for m, p in known.items()}


def test_imports_point_down_the_pipeline_only():
    known, upward = modules(), []
    for m, path in known.items():
        for target, _, line in imports(path, known):
            if stage(target) > stage(m):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not upward, "upward imports (ui > host > training > data > model > config):\n" + \
        "\n".join(upward)


def test_there_is_no_import_circle():
    edges, cycles = graph(), []
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(trail[trail.index(t):] + [t]))
            elif t not in state:
                visit(t, trail + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    # a package's __init__ re-exporting its own modules is not a circle: skip those edges
    real = [c for c in cycles if not _through_own_init(c)]
    assert not real, "import circles:\n" + "\n".join(real)


def _through_own_init(cycle: str) -> bool:
    steps = cycle.split(" -> ")
    return any(b.startswith(a + ".") and a in _packages() for a, b in zip(steps, steps[1:])) \
        and len(set(steps)) <= 2


def _packages() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("__init__.py")}


def test_no_module_imports_another_modules_private_names():
    known, private = modules(), []
    for m, path in known.items():
        for target, names, line in imports(path, known):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != m:
                    private.append(f"{path.relative_to(PACKAGE.parent)}:{line} {target}.{n}")
    assert not private, "private names used across modules:\n" + "\n".join(private)


def test_no_file_is_over_the_line_budget():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_every_stage_package_says_what_enters_and_what_leaves():
    for name in STAGES:
        init = PACKAGE / name / "__init__.py"
        if name == "assets":
            continue
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert "In:" in doc and "Out:" in doc, f"{init} lacks its In:/Out: paragraph"


@pytest.mark.parametrize("bad", ["from ..training import trainer", "from ...host import runner"])
def test_the_direction_check_catches_an_upward_import(tmp_path, bad, monkeypatch):
    fake = tmp_path / "dreambooth"
    (fake / "model").mkdir(parents=True)
    (fake / "training").mkdir()
    (fake / "host").mkdir()
    for f in ("__init__.py", "model/__init__.py", "training/__init__.py", "host/__init__.py",
              "training/trainer.py", "host/runner.py"):
        (fake / f).write_text("")
    (fake / "model" / "low.py").write_text(bad.replace("...", "..") + "\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match="upward imports"):
        test_imports_point_down_the_pipeline_only()


def test_the_circle_check_catches_a_circle(tmp_path, monkeypatch):
    fake = tmp_path / "dreambooth"
    (fake / "model").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "model" / "__init__.py").write_text("")
    (fake / "model" / "a.py").write_text("def f():\n    from .b import g\n")
    (fake / "model" / "b.py").write_text("from .a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match="import circles"):
        test_there_is_no_import_circle()
