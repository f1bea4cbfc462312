"""Fixtures shared by the tab, glue, API and browser tests (import them into a test module).

These tests run in the venv that has gradio (the WebUI-like one), which may hold no torch: the
training child then runs with DREAMBOOTH_TEST_TRAIN_PYTHON (an interpreter with the training
stack, e.g. .venv/bin/python), exactly as the WebUI runs it with an extension-local lib folder.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

STUB_DIR = Path(__file__).resolve().parent
REPO = STUB_DIR.parent.parent
if str(STUB_DIR.parent) not in sys.path:
    sys.path.insert(0, str(STUB_DIR.parent))
from patience import Deadline, deadline  # noqa: E402


def _shared(python: str) -> Path | None:
    """Where test.sh's one run of the suite keeps what the gradio lanes share for `python`
    (emptied when test.sh starts, so all of it was made by this run's code), if it does."""
    shared = os.environ.get("DREAMBOOTH_TEST_TINY_CACHE")
    return Path(shared) / hashlib.sha256(python.encode()).hexdigest()[:16] if shared else None


@functools.lru_cache(maxsize=None)
def _can_train(python: str) -> str:
    """'' when `python` can import the training stack, else the reason it can't."""
    known = _shared(python)
    if known and (known / "can-train").is_file():  # an earlier lane of this run found it can
        return ""
    try:
        out = subprocess.run([python, "-c", "import torch, diffusers, transformers, dreambooth"],
                             capture_output=True, text=True, timeout=deadline(120),
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if out.returncode:
        return out.stderr.strip().splitlines()[-1]
    if known:
        known.mkdir(parents=True, exist_ok=True)
        (known / "can-train").touch()
    return ""


@pytest.fixture(scope="session")
def train_python() -> str:
    """The interpreter training children run with (skips when it lacks torch/diffusers)."""
    python = os.environ.get("DREAMBOOTH_TEST_TRAIN_PYTHON") or sys.executable
    reason = _can_train(python)
    if reason:
        pytest.skip(f"no interpreter with the training stack (set DREAMBOOTH_TEST_TRAIN_PYTHON): "
                    f"{reason}")
    return python


@pytest.fixture(scope="session")
def tiny_inputs(request, tmp_path_factory, train_python) -> dict:
    """A tiny SD1.x checkpoint and instance images, made by the training interpreter (in this
    process, with conftest's session fixtures, when that is this interpreter)."""
    if train_python == sys.executable:
        return {"checkpoint": request.getfixturevalue("tiny_source"),
                "instance": request.getfixturevalue("instance_dir")}
    shared = _shared(train_python)  # made by the first gradio lane, read by the next
    root = shared / "tiny" if shared else tmp_path_factory.mktemp("tiny_inputs")
    if not (root / "made").is_file():
        if shared:  # made beside where it goes: the rename never crosses file systems
            shared.mkdir(parents=True, exist_ok=True)
            building = Path(tempfile.mkdtemp(prefix="new-", dir=shared))
        else:
            building = tmp_path_factory.mktemp("tiny_inputs_new")
        code = textwrap.dedent(f"""
            from dreambooth.model.tiny import make_tiny_checkpoint, write_images
            make_tiny_checkpoint({str(building / 'tiny_v1x.safetensors')!r}, 'v1x')
            write_images({str(building / 'instance')!r}, 'checker', 2)
        """)
        subprocess.run([train_python, "-c", code], check=True, timeout=deadline(300),
                       env={**os.environ, "PYTHONPATH": str(REPO)})
        (building / "made").touch()
        if shared:
            try:
                building.rename(root)  # whole, or not at all
            except OSError:  # another lane's came first: that one serves
                pass
        if not (root / "made").is_file():
            root = building
    return {"checkpoint": root / "tiny_v1x.safetensors", "instance": root / "instance"}


def quick_values(tiny: dict, work: Path, out: Path, steps_per_image: int = 1,
                 name: str = "quick") -> dict:
    """Widget values (by key) of a run that takes a few seconds on the tiny model. The tab only
    takes what its host offers: the checkpoint is copied into `out` (the host's checkpoints
    folder) and the images into `work`/images (the data root defaults to the work dir)."""
    out.mkdir(parents=True, exist_ok=True)
    source = out / "tiny_v1x.safetensors"
    if not source.is_file():
        shutil.copy(tiny["checkpoint"], source)
    images = work / "images"
    if not images.is_dir():
        shutil.copytree(tiny["instance"], images)
    return {"model_name": name, "source_checkpoint": str(source),
            "model_type": "v1x", "work_dir": str(work), "output_dir": str(out),
            "resolution": 64, "center_crop": True, "steps_per_image": steps_per_image,
            "learning_rate": 1e-4, "class_generation_steps": 2, "sample_steps": 2,
            "concepts[0].instance_data_dir": str(images),
            "concepts[0].instance_prompt": "photo of sks pattern"}


FORGE_DIR = STUB_DIR / "forge"  # Forge's modules over the AUTOMATIC1111 stand-in (forge/README)
# what a fresh WebUI imports anew (networks: the built-in Lora extension, which reads shared)
HOST_PACKAGES = ("modules", "modules_forge", "backend", "networks")


def load_webui(monkeypatch, data_dir: Path, argv: tuple = (), forge: bool = False):
    """Fresh stand-in `modules` on sys.path over `data_dir` (AUTOMATIC1111's, or Forge's with
    `forge`), our preload flags parsed, and scripts/dreambooth_tab.py loaded the way the WebUI
    loads a script. Returns (modules, glue); with `forge`, modules also holds main_entry,
    memory_management and processing."""
    monkeypatch.setenv("WEBUI_STUB_DATA_DIR", str(data_dir))
    monkeypatch.syspath_prepend(str(STUB_DIR))
    if forge:
        monkeypatch.syspath_prepend(str(FORGE_DIR))
    monkeypatch.syspath_prepend(str(REPO))
    for name in [m for m in sys.modules if m.split(".")[0] in HOST_PACKAGES]:
        monkeypatch.delitem(sys.modules, name)
    mods = {n: importlib.import_module(f"modules.{n}") for n in (
        "paths", "shared", "options", "sd_models", "script_callbacks", "call_queue")}
    if forge:
        mods.update(main_entry=importlib.import_module("modules_forge.main_entry"),
                    memory_management=importlib.import_module("backend.memory_management"),
                    processing=importlib.import_module("modules.processing"))
    preload = _load_file(REPO / "preload.py", "dreambooth_preload")
    preload.preload(mods["shared"].parser)
    mods["shared"].cmd_opts = mods["shared"].parser.parse_args(list(argv))
    os.makedirs(mods["sd_models"].model_path, exist_ok=True)
    glue = _load_file(REPO / "scripts" / "dreambooth_tab.py", "dreambooth_tab_glue")
    return mods, glue


def _load_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def wait_for(predicate, timeout: float = 180.0, every: float = 0.2):
    """Poll `predicate` until true; `timeout` is what the wait may take on an idle machine,
    stretched by how loaded this one is, and again if it gets busier meanwhile
    (tests/patience.py)."""
    limit = Deadline(timeout)
    while True:
        value = predicate()
        if value:
            return value
        if limit.expired():
            raise AssertionError(f"condition not met within {limit}")
        time.sleep(every)


def jsonable(obj) -> str:
    return json.dumps(obj, default=str)
