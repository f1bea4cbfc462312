"""A real browser: the standalone app (`python -m dreambooth ui`) in headless Chromium driven
by Playwright. Fill the fields, press Train on the tiny model, watch the progress bar move and
the final path appear, take a screenshot. The test serves and stops its own app on 127.0.0.1.

Needs Debian's chromium (/usr/bin/chromium) and the `playwright` package (no browser download:
Playwright drives the system chromium through executable_path). Skips with the reason if not.
Set DREAMBOOTH_SCREENSHOT_DIR to keep the screenshot.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("DREAMBOOTH_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
pytest.importorskip("gradio", reason="the standalone UI needs gradio")

sys.path.insert(0, str(Path(__file__).parent / "webui_stub"))
from dreambooth_test_helpers import deadline, tiny_inputs, train_python, wait_for  # noqa: E402,F401

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ui_command() -> list[str]:
    """`python -m dreambooth ui` once the CLI has the subcommand, else the module itself."""
    from dreambooth.host.cli import build_parser
    try:
        build_parser().parse_args(["ui", "--port", "1"])
        return [sys.executable, "-m", "dreambooth", "ui"]
    except SystemExit:
        return [sys.executable, "-m", "dreambooth.ui"]


@pytest.fixture
def server(tmp_path, tiny_inputs, train_python):
    checkpoints = tmp_path / "models"
    checkpoints.mkdir()
    shutil.copy(tiny_inputs["checkpoint"], checkpoints / "tiny_v1x.safetensors")
    shutil.copytree(tiny_inputs["instance"], tmp_path / "images" / "instance")
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(_ui_command() + ["--port", str(port), "--root", str(tmp_path / "ui"),
                                             "--checkpoints-dir", str(checkpoints),
                                             "--data-dir", str(tmp_path / "images"),
                                             "--python", train_python],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"

    def up():
        if proc.poll() is not None:
            raise AssertionError((tmp_path / "server.log").read_text()[-3000:])
        if "Dreambooth UI on" not in (tmp_path / "server.log").read_text():
            return False  # said once its routes and guards stand
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False
    wait_for(up, timeout=120, every=0.5)
    yield url, checkpoints
    proc.terminate()
    try:
        proc.wait(deadline(15))
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def _tab(page, name: str) -> None:
    """Open a section (gradio 4 marks tab buttons role=tab, gradio 3 leaves them buttons)."""
    exact = re.compile(f"^\\s*{name}\\s*$")
    page.locator("#dreambooth_sections button", has_text=exact).first.click()


def _fill_form(page, url, tmp_path, name: str, steps_per_image: int, sample_every: int):
    page.goto(url)
    page.wait_for_selector("#dreambooth_train", timeout=deadline(30) * 1000)
    _fill(page, "dreambooth_model_name", name)
    source = page.locator("#dreambooth_source_checkpoint input").first
    source.click()
    page.get_by_text("tiny_v1x.safetensors").last.click()
    _tab(page, "Concepts")
    _fill(page, "dreambooth_concepts_0_instance_data_dir", tmp_path / "images" / "instance")
    _fill(page, "dreambooth_concepts_0_instance_prompt", "photo of sks pattern")
    _tab(page, "Parameters")
    for elem_id, value in (("steps_per_image", steps_per_image), ("resolution", 64),
                           ("learning_rate", 0.0001), ("sample_every_epochs", sample_every)):
        _fill(page, f"dreambooth_{elem_id}", value)


def _bar(page):
    bar = page.locator("#dreambooth_progress .dreambooth-progress").first
    return (bar.get_attribute("data-state"), int(bar.get_attribute("data-step") or 0)) \
        if bar.count() else ("", 0)


@pytest.mark.slow
def test_train_save_now_sample_now_and_cancel_from_the_browser(server, tiny_inputs, tmp_path):
    """Fill the form, press Train: the bar moves; Save now and Sample now while the run trains
    give a checkpoint and preview images (nothing was scheduled: no save or sample every N
    epochs); Cancel (confirmed in the dialog) saves once more, and the page ends with the
    cancelled state, the saved path and a screenshot. One run: a finished run's page differs
    only in the state's word (test_ui_build checks it, and the run's list of checkpoints)."""
    url, checkpoints = server
    samples = tmp_path / "ui" / "dreambooth" / "browser_cmd" / "samples"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.on("dialog", lambda dialog: dialog.accept())  # "Cancel training?"
        _fill_form(page, url, tmp_path, "browser_cmd", steps_per_image=2000, sample_every=0)
        page.locator("#dreambooth_train").click()
        wait_for(lambda: _bar(page)[0] == "running" and _bar(page)[1] >= 1, timeout=300,
                 every=0.3)
        first_step = _bar(page)[1]

        def ours():
            return sorted(p.name for p in checkpoints.glob("browser_cmd_*.safetensors"))
        page.locator("#dreambooth_save_now").click()
        wait_for(lambda: ours(), timeout=120, every=0.3)
        page.locator("#dreambooth_sample_now").click()
        wait_for(lambda: samples.is_dir() and any(samples.glob("*.png")), timeout=120,
                 every=0.3)
        wait_for(lambda: page.locator("#dreambooth_samples img").count() > 0, timeout=60,
                 every=0.3)
        state, step = _bar(page)
        assert state == "running" and first_step <= step < 8000
        page.locator("#dreambooth_cancel").click()
        wait_for(lambda: _bar(page)[0] == "cancelled", timeout=120, every=0.3)
        wait_for(lambda: len(ours()) == 2, timeout=30, every=0.3)
        final = page.locator("#dreambooth_final_path input, #dreambooth_final_path textarea")
        wait_for(lambda: final.first.input_value().endswith(".safetensors"), timeout=30)
        path = final.first.input_value()
        last_step = _bar(page)[1]
        page.wait_for_timeout(500)
        shot = tmp_path / "dreambooth_browser.png"
        page.screenshot(path=str(shot), full_page=True)
        result = page.locator("#dreambooth_result").first.inner_text()  # gradio 3: id twice
        browser.close()
    if os.environ.get("DREAMBOOTH_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["DREAMBOOTH_SCREENSHOT_DIR"]) / shot.name)
    assert len(ours()) == 2  # Save now's and the cancelled run's own
    assert Path(path).is_file() and Path(path).parent == checkpoints and Path(path).name in ours()
    assert last_step > first_step  # the bar moved
    assert "Cancelled" in result and path in result and shot.stat().st_size > 10000
