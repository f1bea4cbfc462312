"""Dependencies of the Dreambooth extension, installed without touching the WebUI's packages.

The WebUI runs this file in its own process at every start (not under --skip-install). It
never installs, upgrades or removes anything in the WebUI's environment: what the training
process needs beyond what the WebUI has goes into <extension>/lib with exact pins, and only
the training child process puts that folder on its path. torch, numpy and Pillow always come
from the WebUI (the training process uses the WebUI's torch, never a second copy).

When everything is there it installs nothing and says so in one line (a metadata scan,
well under a second). Without a
network it prints what is missing and the command that installs it, and exits 0: it must never
stop the WebUI from starting. `python install.py --check` (or `--dry-run`) only reports what it would install; `--json` prints the plan as JSON.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

EXT_ROOT = Path(__file__).resolve().parent
LIB_DIR = EXT_ROOT / "lib"
MARKER = "dreambooth_lib.json"  # which interpreter lib was filled for (the runner checks it)
PREFIX = "[dreambooth]"

# What the training process needs (name -> specifier), as pyproject.toml says.
NEEDS = {"torch": ">=2.1", "numpy": ">=1.26", "pillow": ">=9.5", "tqdm": ">=4.60", "pyyaml": ">=5.4",
         "safetensors": ">=0.4.2", "diffusers": ">=0.31.0", "transformers": ">=4.46.1",
         "accelerate": ">=0.31.0", "peft": ">=0.13.2"}
# Binary packages tied to the WebUI's torch/Python build: reported when unfit, never installed.
HOST_ONLY = frozenset({"torch", "numpy", "pillow"})
# What we install into lib when a need is unmet: the exact version, and what that version
# itself needs (its Requires-Dist), checked the same way. Oldest versions we test (Forge's),
# which support torch 2.1 (A1111 1.10's default) and Python 3.10-3.12.
PINS: dict[str, tuple[str, dict[str, str]]] = {
    "diffusers": ("0.31.0", {"huggingface-hub": ">=0.23.2", "safetensors": ">=0.3.1",
                             "importlib-metadata": "", "filelock": "", "regex": "",
                             "requests": "", "numpy": "", "pillow": ""}),
    "transformers": ("4.46.1", {"huggingface-hub": ">=0.23.2,<1.0",
                                "tokenizers": ">=0.20,<0.21", "safetensors": ">=0.4.1",
                                "pyyaml": ">=5.1", "packaging": ">=20.0", "regex": "",
                                "requests": "", "tqdm": ">=4.27", "filelock": "",
                                "numpy": ">=1.17"}),
    "tokenizers": ("0.20.3", {"huggingface-hub": ">=0.16.4,<1.0"}),
    "accelerate": ("0.31.0", {"huggingface-hub": "", "psutil": "", "pyyaml": "",
                              "safetensors": ">=0.3.1", "numpy": ">=1.17",
                              "packaging": ">=20.0", "torch": ">=1.10.0"}),
    "peft": ("0.13.2", {"accelerate": ">=0.21.0", "transformers": "", "torch": ">=1.13.0",
                        "huggingface-hub": ">=0.17.0", "safetensors": "", "psutil": "",
                        "pyyaml": "", "tqdm": "", "packaging": ">=20.0", "numpy": ">=1.17"}),
    "huggingface-hub": ("0.26.5", {"filelock": "", "fsspec": ">=2023.5.0", "pyyaml": ">=5.1",
                                   "packaging": ">=20.9", "requests": "", "tqdm": ">=4.42.1",
                                   "typing-extensions": ">=3.7.4.3"}),
    "safetensors": ("0.4.5", {}),
    "importlib-metadata": ("8.5.0", {"zipp": ">=3.20"}),
    "zipp": ("3.21.0", {}),
    "filelock": ("3.16.1", {}),
    "fsspec": ("2024.10.0", {}),
    "regex": ("2024.11.6", {}),
    "requests": ("2.32.3", {"charset-normalizer": ">=2,<4", "idna": ">=2.5,<4",
                            "urllib3": ">=1.21.1,<3", "certifi": ">=2017.4.17"}),
    "charset-normalizer": ("3.4.0", {}),
    "idna": ("3.10", {}),
    "urllib3": ("2.2.3", {}),
    "certifi": ("2024.8.30", {}),
    "pyyaml": ("6.0.2", {}),
    "packaging": ("24.2", {}),
    "psutil": ("6.1.0", {}),
    "tqdm": ("4.67.1", {}),
    "typing-extensions": ("4.12.2", {}),
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_class():
    try:
        from packaging.version import Version
    except ImportError:  # the WebUI's venv has packaging; pip vendors it otherwise
        from pip._vendor.packaging.version import Version
    return Version


def satisfies(version: str, spec: str) -> bool:
    """True when `version` meets every comma-separated clause of `spec` (>=, <=, >, <, ==, !=)."""
    Version = _version_class()
    try:
        v = Version(version)
    except Exception:  # an unparsable local build: trust it only when nothing is asked
        return not spec.strip()
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        m = re.match(r"(>=|<=|==|!=|>|<)\s*(.+)", clause)
        if not m:
            raise ValueError(f"bad specifier clause {clause!r}")
        op, bound = m.group(1), Version(m.group(2))
        ok = {">=": v >= bound, "<=": v <= bound, ">": v > bound, "<": v < bound,
              "==": v == bound, "!=": v != bound}[op]
        if not ok:
            return False
    return True


def installed(paths: list[str] | None = None) -> dict[str, str]:
    """name -> version of the distributions on `paths` (default: this interpreter's path)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions(**({"path": paths} if paths is not None else {})):
        name = dist.metadata["Name"] if dist.metadata else None
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


@dataclass
class Plan:
    install: dict[str, str] = field(default_factory=dict)  # name -> pinned version for lib
    problems: list[str] = field(default_factory=list)  # needs we can't meet from lib

    @property
    def ok(self) -> bool:
        return not self.install and not self.problems

    def requirements(self) -> list[str]:
        return [f"{n}=={v}" for n, v in sorted(self.install.items())]


def make_plan(host: dict[str, str], lib: dict[str, str]) -> Plan:
    """Which pins lib needs so that lib over host meets NEEDS, and what can't be met."""
    effective = {**host, **lib}  # lib comes first on the child's path
    plan, needs = Plan(), {n: [s] for n, s in NEEDS.items()}
    changed = True
    while changed:  # planning a pin adds its own needs: repeat until nothing new is planned
        changed = False
        for name, specs in list(needs.items()):
            if _met(plan.install.get(name) or effective.get(name), specs):
                continue
            pin = PINS.get(name)
            if name in HOST_ONLY or pin is None or name in plan.install \
                    or not _met(pin[0], specs):
                continue
            plan.install[name] = pin[0]
            for dep, spec in pin[1].items():
                needs.setdefault(dep, []).append(spec)
            changed = True
    for name, specs in needs.items():
        have = plan.install.get(name) or effective.get(name)
        if not _met(have, specs):
            plan.problems.append(_host_problem(name, have, specs))
    return plan


def _met(version: str | None, specs: list[str]) -> bool:
    return version is not None and all(satisfies(version, s) for s in specs)


def _host_problem(name: str, have: str | None, specs: list[str]) -> str:
    want = ", ".join(s for s in specs if s) or "any version"
    if have is None:
        return f"{name} is not installed in the WebUI ({want} needed)"
    return f"{name} {have} is installed, {want} is needed"


def pip_command(plan: Plan, lib: Path | None = None) -> list[str]:
    lib = lib or LIB_DIR
    cmd = [sys.executable, "-m", "pip", "install", "--target", str(lib), "--no-deps",
           "--upgrade", "--prefer-binary", "--disable-pip-version-check", "--no-input",
           "--timeout", "20", "--retries", "1"]
    if os.environ.get("INDEX_URL"):  # the WebUI's own index setting
        cmd += ["--index-url", os.environ["INDEX_URL"]]
    return cmd + plan.requirements()


def current_plan(lib: Path | None = None) -> Plan:
    lib = lib or LIB_DIR
    lib_versions = installed([str(lib)]) if lib.is_dir() else {}
    return make_plan(installed(), lib_versions)


def _remove_stale(lib: Path, names: list[str]) -> None:
    """Old dist-info folders of the packages about to be replaced, so one version remains."""
    if not lib.is_dir():
        return
    for info in lib.glob("*.dist-info"):
        dist_name = normalize(info.name.rsplit("-", 1)[0])
        if dist_name in names:
            shutil.rmtree(info, ignore_errors=True)


def install(plan: Plan, lib: Path | None = None) -> bool:
    lib = lib or LIB_DIR
    lib.mkdir(parents=True, exist_ok=True)
    _remove_stale(lib, list(plan.install))
    result = subprocess.run(pip_command(plan, lib), capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout or "").strip().splitlines()[-3:]
        print(f"{PREFIX} installing into {lib} failed:", *tail, sep="\n  ")
        return False
    (lib / MARKER).write_text(json.dumps({"python": sys.executable,
                                          "version": sys.version.split()[0]}))
    return True


def skip_requested(argv: list[str]) -> bool:
    args = " ".join(argv) + " " + os.environ.get("COMMANDLINE_ARGS", "")
    return "--skip-install" in args.split() or os.environ.get("DREAMBOOTH_SKIP_INSTALL") == "1"


def report(plan: Plan, lib: Path | None = None) -> None:
    lib = lib or LIB_DIR
    if plan.install:
        print(f"{PREFIX} training needs: {', '.join(plan.requirements())} (into {lib}). "
              "To install them by hand:\n  " + " ".join(f'"{c}"' if " " in c else c
                                                   for c in pip_command(plan, lib)))
    for problem in plan.problems:
        print(f"{PREFIX} {problem}: training can't run until the WebUI provides it.")


def ready_line(lib: Path | None = None) -> str:
    """What is said when nothing is missing: whether training takes anything from lib."""
    lib = lib or LIB_DIR
    if lib.is_dir() and any(lib.glob("*.dist-info")):
        return f"using the host's packages and {lib}: nothing to install"
    return "using the host's packages: nothing to install"


def main(argv: list[str] | None = None) -> int:
    # Messages go to stdout: the WebUI shows an installer's stdout and drops its stderr when it
    # exits 0, which install.py always does
    argv = sys.argv[1:] if argv is None else argv
    if skip_requested(argv):
        return 0
    plan = current_plan()
    if "--json" in argv:  # for the tab, when training runs with another interpreter
        print(json.dumps({"install": plan.requirements(), "problems": plan.problems}))
        return 0
    if plan.ok:  # one line, so that a user can tell it ran
        print(f"{PREFIX} {ready_line()}")
        return 0
    if "--check" in argv or "--dry-run" in argv or not plan.install:
        report(plan)
        return 0
    print(f"{PREFIX} installing {', '.join(plan.requirements())} into {LIB_DIR} "
          "(the WebUI's own packages are not touched)")
    if not install(plan):
        report(plan)
        return 0
    report(current_plan())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # never stop the WebUI from starting
        print(f"{PREFIX} install.py failed: {type(e).__name__}: {e}")
        sys.exit(0)
