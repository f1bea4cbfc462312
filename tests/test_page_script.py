"""javascript/dreambooth.js in headless Chromium, on a page that stands in for the WebUI's: the
few globals and elements of AUTOMATIC1111 1.10.1's page the script uses (gradioApp, onUiLoaded,
selectCheckpoint and switch_to_txt2img from ui.js/script.js, the checkpoint dropdown's refresh
button #refresh_sd_model_checkpoint, Forge's #forge_refresh_checkpoint).

After "Use in txt2img" the tab's message shows a banner carrying the checkpoint's title; the
script must refresh the host's list, select that title in the host's own dropdown and switch
to txt2img, once per banner. Cancel asks before it stops a running run."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dreambooth.ui import render

CHROMIUM = os.environ.get("DREAMBOOTH_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

SCRIPT = Path(__file__).resolve().parents[1] / "javascript" / "dreambooth.js"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]

PAGE = """<!doctype html><html><body>
<button id="refresh_sd_model_checkpoint" onclick="calls.push('refresh')">refresh</button>
<button id="forge_refresh_checkpoint" onclick="calls.push('forge_refresh')">refresh</button>
<div id="tab_dreambooth">
  <div id="dreambooth_message"></div>
  <div id="dreambooth_progress"><div class="dreambooth-progress" data-state="running"></div></div>
  <button id="dreambooth_cancel" onclick="calls.push('cancel')">Cancel</button>
  <button id="dreambooth_stop_now" onclick="calls.push('stop_now')">Stop now</button>
</div>
<script>
  var calls = [], loaded = [];
  function gradioApp() { return document; }
  function onUiLoaded(f) { loaded.push(f); }
  function selectCheckpoint(name) { calls.push('select:' + name); }
  function switch_to_txt2img() { calls.push('txt2img'); }
</script>
<script>%s</script>
<script>loaded.forEach(function (f) { f(); }); loaded.forEach(function (f) { f(); });</script>
</body></html>"""


@pytest.fixture
def page():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page()
        page.set_content(PAGE % SCRIPT.read_text(encoding="utf-8"))
        yield page
        browser.close()


def calls(page) -> list:
    return page.evaluate("calls")


def test_use_in_txt2img_shows_the_checkpoint_in_the_hosts_dropdown(page):
    title = "dog_8.safetensors [0123abcd]"
    shown = render.banner("success", f"txt2img now uses {title}.", checkpoint=title)
    page.evaluate("html => { document.getElementById('dreambooth_message').innerHTML = html; }",
                  shown)
    page.wait_for_function("calls.indexOf('txt2img') >= 0", timeout=10000)
    assert calls(page) == ["refresh", "forge_refresh", f"select:{title}", "txt2img"]
    # the same banner again (a re-render of the message) does nothing more; a plain message none
    page.evaluate("() => { var m = document.getElementById('dreambooth_message');"
                  " m.appendChild(document.createElement('span')); }")
    page.evaluate("html => { document.getElementById('dreambooth_message').innerHTML += html; }",
                  render.banner("info", "Asked for a checkpoint."))
    page.wait_for_timeout(1500)
    assert calls(page) == ["refresh", "forge_refresh", f"select:{title}", "txt2img"]


def test_cancel_asks_first_while_a_run_is_running(page):
    answers = []

    def answer(dialog):
        answers.append(dialog.message)
        dialog.dismiss() if len(answers) == 1 else dialog.accept()
    page.on("dialog", answer)
    page.click("#dreambooth_cancel")  # dismissed: the run goes on
    assert calls(page) == [] and "Cancel training?" in answers[0]
    page.click("#dreambooth_cancel")  # accepted
    assert calls(page) == ["cancel"] and len(answers) == 2


def test_stop_now_asks_first_and_says_it_does_not_save(page):
    answers = []

    def answer(dialog):
        answers.append(dialog.message)
        dialog.dismiss() if len(answers) == 1 else dialog.accept()
    page.on("dialog", answer)
    page.click("#dreambooth_stop_now")  # dismissed
    assert calls(page) == [] and "without saving" in answers[0]
    page.evaluate("() => { document.querySelector('.dreambooth-progress').dataset.state ="
                  " 'cancelling'; }")  # a Cancel is saving: Stop now still asks
    page.click("#dreambooth_stop_now")
    assert calls(page) == ["stop_now"] and len(answers) == 2
