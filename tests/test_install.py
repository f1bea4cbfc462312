"""install.py: what it decides for the WebUI's package sets, that it never touches the WebUI's
packages, that it is a fast no-op when satisfied, and that it never fails the WebUI's start."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from patience import deadline, slowness

REPO = Path(__file__).resolve().parents[1]

# AUTOMATIC1111 1.10.1 (requirements_versions.txt) plus what pip resolves around it.
A1111_110 = {"torch": "2.1.2", "numpy": "1.26.2", "pillow": "9.5.0", "tqdm": "4.66.1",
             "safetensors": "0.4.2", "transformers": "4.30.2", "tokenizers": "0.13.3",
             "accelerate": "0.21.0", "huggingface-hub": "0.20.3", "gradio": "3.41.2",
             "filelock": "3.13.1", "fsspec": "2023.12.2", "pyyaml": "6.0.1",
             "packaging": "23.2", "regex": "2023.12.25", "requests": "2.31.0",
             "psutil": "5.9.5", "typing-extensions": "4.9.0", "charset-normalizer": "3.3.2",
             "idna": "3.6", "urllib3": "2.1.0", "certifi": "2023.11.17"}
# Forge (gradio 4, newer torch): the training stack already there.
FORGE = {**A1111_110, "torch": "2.3.1", "transformers": "4.46.1", "tokenizers": "0.20.3",
         "accelerate": "0.31.0", "diffusers": "0.31.0", "peft": "0.13.2",
         "huggingface-hub": "0.26.5", "gradio": "4.40.0", "safetensors": "0.4.5"}


@pytest.fixture(scope="module")
def installer():
    spec = importlib.util.spec_from_file_location("dreambooth_install_under_test",
                                                  REPO / "install.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a1111_gets_the_training_stack_in_lib_and_keeps_its_own(installer):
    plan = installer.make_plan(A1111_110, {})
    assert plan.problems == []
    assert plan.install == {"diffusers": "0.31.0", "transformers": "4.46.1",
                            "tokenizers": "0.20.3", "accelerate": "0.31.0", "peft": "0.13.2",
                            "importlib-metadata": "8.5.0", "zipp": "3.21.0",
                            "huggingface-hub": "0.26.5"}  # 0.20.3 < transformers' 0.23.2
    assert not set(plan.install) & installer.HOST_ONLY


def test_forge_needs_nothing(installer):
    assert installer.make_plan(FORGE, {}).ok


def test_a_filled_lib_folder_makes_it_a_no_op(installer):
    plan = installer.make_plan(A1111_110, {})
    lib = dict(plan.install)
    assert installer.make_plan(A1111_110, lib).ok


def test_host_transformers_new_enough_keeps_its_own_tokenizers(installer):
    host = {**A1111_110, "transformers": "4.48.0", "tokenizers": "0.21.0",
            "huggingface-hub": "0.27.0"}
    plan = installer.make_plan(host, {})
    assert "tokenizers" not in plan.install and "transformers" not in plan.install


def test_old_hub_in_the_webui_is_shadowed_only_for_training(installer):
    plan = installer.make_plan({**A1111_110, "huggingface-hub": "0.17.3"}, {})
    assert plan.install["huggingface-hub"] == "0.26.5"


def test_torch_numpy_pillow_are_never_installed_only_reported(installer):
    plan = installer.make_plan({**A1111_110, "torch": "2.0.1"}, {})
    assert "torch" not in plan.install
    assert any(p.startswith("torch 2.0.1 is installed") for p in plan.problems)
    plan = installer.make_plan({k: v for k, v in A1111_110.items() if k != "numpy"}, {})
    assert "numpy" not in plan.install and any("numpy" in p for p in plan.problems)


def test_versions_compare_as_versions_not_strings(installer):
    assert installer.satisfies("2.10.0", ">=2.9")
    assert not installer.satisfies("0.9.0", ">=0.10")
    assert installer.satisfies("2.1.2+cu121", ">=2.1")
    assert installer.satisfies("0.20.3", ">=0.20,<0.21")
    assert not installer.satisfies("0.21.0", ">=0.20,<0.21")


def test_pins_meet_their_own_needs_and_pyproject(installer):
    for name, (version, deps) in installer.PINS.items():
        for dep, spec in deps.items():
            if dep in installer.PINS:
                assert installer.satisfies(installer.PINS[dep][0], spec), (name, dep)
    text = (REPO / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    for line in re.findall(r'"([^"]+)"', block):
        name, spec = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", line).groups()
        name = installer.normalize(name)
        assert name in installer.NEEDS, f"pyproject needs {name}; install.py does not"
        floor = re.search(r">=\s*([\w.]+)", spec)
        if floor:
            assert installer.satisfies(floor.group(1), installer.NEEDS[name]) or \
                installer.NEEDS[name] == f">={floor.group(1)}", name
        if name in installer.PINS:
            assert installer.satisfies(installer.PINS[name][0], spec), name


def test_pip_goes_to_lib_only_without_deps(installer, tmp_path):
    plan = installer.make_plan(A1111_110, {})
    cmd = installer.pip_command(plan, tmp_path / "lib")
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
    assert cmd[cmd.index("--target") + 1] == str(tmp_path / "lib") and "--no-deps" in cmd
    assert all("==" in c for c in cmd if not c.startswith("-") and c not in cmd[:4]
               and c != str(tmp_path / "lib") and not c.isdigit())


def test_no_network_reports_and_does_not_fail(installer, tmp_path, capsys, monkeypatch):
    class Failed:
        returncode, stdout = 1, ""
        stderr = "ERROR: Could not find a version that satisfies the requirement diffusers"

    monkeypatch.setattr(installer, "LIB_DIR", tmp_path / "lib")
    monkeypatch.setattr(installer, "current_plan",
                        lambda lib=None: installer.make_plan(A1111_110, {}))
    monkeypatch.setattr(installer.subprocess, "run", lambda *a, **k: Failed())
    assert installer.main([]) == 0
    out = capsys.readouterr()
    assert out.err == ""  # the WebUI drops an installer's stderr when it exits 0
    assert "failed" in out.out and "diffusers==0.31.0" in out.out and "pip install --target" in out.out


def test_nothing_missing_says_so_in_one_line(installer, tmp_path, capsys, monkeypatch):
    """Forge has every package: install.py still tells the user, on stdout, that it ran."""
    monkeypatch.setattr(installer, "LIB_DIR", tmp_path / "lib")
    monkeypatch.setattr(installer, "current_plan", lambda lib=None: installer.make_plan(FORGE, {}))
    monkeypatch.setattr(installer.subprocess, "run", lambda *a, **k: pytest.fail("installed"))
    assert installer.main([]) == 0
    out = capsys.readouterr()
    assert (out.out, out.err) == ("[dreambooth] using the host's packages: nothing to install\n", "")
    (tmp_path / "lib" / "peft-0.13.2.dist-info").mkdir(parents=True)  # lib adds to the host's
    assert installer.main([]) == 0
    assert capsys.readouterr().out == \
        f"[dreambooth] using the host's packages and {tmp_path / 'lib'}: nothing to install\n"


def test_skip_install_does_nothing(installer, monkeypatch):
    monkeypatch.setattr(installer, "current_plan", lambda lib=None: pytest.fail("checked"))
    assert installer.main(["--skip-install"]) == 0
    monkeypatch.setenv("COMMANDLINE_ARGS", "--xformers --skip-install")
    assert installer.main([]) == 0


def test_satisfied_run_is_a_fast_no_op_and_imports_no_torch():
    """In a venv holding everything training needs: nothing to do, well under 2 s. (Checked
    first: in a venv that lacks something, running install.py would really install.)"""
    if not installer_plan_ok():
        pytest.skip("this venv lacks part of the training stack; the no-op case needs it")
    code = ("import runpy, sys, time; t = time.time(); sys.argv = ['install.py']\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(time.time() - t, 'torch' in sys.modules)") % str(REPO / "install.py")
    env = {k: v for k, v in os.environ.items() if k != "COMMANDLINE_ARGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=deadline(30))
    assert out.returncode == 0, out.stderr
    seconds, torch_loaded = out.stdout.splitlines()[-1].split()  # after install.py's one line
    assert torch_loaded == "False"
    # "well under 2 s" on an idle machine; on a busy one, as much longer as the load makes it
    assert float(seconds) < 2.0 * slowness(fresh=True) and out.stderr == "", (seconds, out.stderr)


def installer_plan_ok() -> bool:
    out = subprocess.run([sys.executable, str(REPO / "install.py"), "--json"],
                         capture_output=True, text=True, timeout=deadline(30))
    return out.stdout.strip().endswith('"problems": []}') and '"install": []' in out.stdout


def test_a_successful_install_marks_lib_with_its_interpreter(installer, tmp_path, monkeypatch):
    import json

    class Done:
        returncode, stdout, stderr = 0, "", ""
    monkeypatch.setattr(installer.subprocess, "run", lambda *a, **k: Done())
    assert installer.install(installer.make_plan(A1111_110, {}), tmp_path / "lib")
    marker = json.loads((tmp_path / "lib" / installer.MARKER).read_text())
    assert marker["python"] == sys.executable
    from dreambooth.host.interface import LIB_MARKER
    assert installer.MARKER == LIB_MARKER
