"""Commands into a running job: save now, sample now (from Python, and by signal to the CLI)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from patience import Deadline

from dreambooth import train
from dreambooth.config import events as ev

# signals and commands between host and child: nothing version-sensitive
pytestmark = pytest.mark.once


def test_a_token_carries_each_command_once():
    token = ev.CancelToken()
    assert not token.take("save")
    token.request("save")
    token.request("save")
    assert token.take("save") and not token.take("save") and not token.cancelled
    with pytest.raises(ValueError, match="unknown command 'explode'"):
        token.request("explode")


def test_save_and_sample_now_write_files_mid_run(quick_config):
    cfg = quick_config.replace(steps_per_image=2)  # 4 images: 8 steps
    token, seen = ev.CancelToken(), []

    def on_event(event):
        seen.append(event)
        if isinstance(event, ev.Step) and event.step == 1:
            token.request("save")  # taken at the next optimizer step
        if isinstance(event, ev.Step) and event.step == 2:
            token.request("sample")
    result = train(cfg, on_event, token)
    out = cfg.resolved_output_dir
    assert (out / "quick_2.safetensors").is_file() and (out / "quick_8.safetensors").is_file()
    assert [p.name for p in result.saved] == ["quick_2.safetensors", "quick_8.safetensors"]
    saved = [e for e in seen if isinstance(e, ev.CheckpointSaved)]
    assert [(e.step, os.path.basename(e.path)) for e in saved] == \
        [(2, "quick_2.safetensors"), (8, "quick_8.safetensors")]
    samples = [e for e in seen if isinstance(e, ev.SampleSaved)]
    assert [e.step for e in samples] == [3] and os.path.isfile(samples[0].path)


def test_save_now_never_replaces_a_file_it_did_not_write(quick_config):
    cfg = quick_config.replace(steps_per_image=1)  # 4 steps
    out = cfg.resolved_output_dir
    out.mkdir(parents=True)
    (out / "quick_2.safetensors").write_bytes(b"the user's own file")
    token, seen = ev.CancelToken(), []

    def on_event(event):
        seen.append(event)
        if isinstance(event, ev.Step) and event.step == 1:
            token.request("save")  # taken at step 2
    result = train(cfg, on_event, token)
    assert (out / "quick_2.safetensors").read_bytes() == b"the user's own file"
    assert result.path.name == "quick_4.safetensors"
    assert any(isinstance(e, ev.Message) and "Not saved now" in e.text and "quick_2" in e.text
               for e in seen)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_sigusr1_saves_now_from_the_command_line(quick_config, tmp_path):
    cfg = quick_config.replace(steps_per_image=25)  # 100 steps: cancelled once the save is seen
    path = tmp_path / "run.json"
    path.write_text(cfg.to_json())
    events = tmp_path / "events.jsonl"
    child = subprocess.Popen([sys.executable, "-m", "dreambooth", "train", "--config", str(path),
                              "--events-jsonl", str(events)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    asked = cancelled = False
    limit = Deadline(60)
    while child.poll() is None:
        if limit.expired():
            child.kill()
            pytest.fail(f"the child did not finish within {limit}")
        text = events.read_text() if events.exists() else ""
        if not asked and '"event": "step"' in text:
            child.send_signal(signal.SIGUSR1)  # save now
            asked = True
        elif asked and not cancelled and '"event": "checkpoint_saved"' in text:
            child.send_signal(signal.SIGINT)  # then a clean stop
            cancelled = True
        time.sleep(0.05)
    assert child.returncode == 130 and asked and cancelled
    kinds = [json.loads(line) for line in events.read_text().splitlines()]
    saved = [k for k in kinds if k["event"] == "checkpoint_saved"]
    # the save asked for, then the cancelled run's own (none when it stopped at that same step)
    assert 1 <= len(saved) <= 2 and all(k["step"] < 100 for k in saved)
    assert all(os.path.isfile(k["path"]) for k in saved)
    finished = [k for k in kinds if k["event"] == "finished"][-1]
    assert finished["cancelled"] and finished["path"] == saved[-1]["path"]


def test_the_child_keeps_signals_that_come_before_its_token_and_stops_as_asked():
    """The handlers alone (no signal sent): commands and a stop before the token exists reach
    it; SIGTERM is a clean stop however often it comes; Ctrl-C again or the stop-at-once
    signal raises KeyboardInterrupt, once."""
    from dreambooth.host.signals import ChildSignals
    child = ChildSignals()
    child.on_command(signal.SIGUSR1, None)
    child.on_stop(signal.SIGTERM, None)
    child.on_stop(signal.SIGTERM, None)  # an OS's, or a host's, again: still the clean stop
    token = ev.CancelToken()
    child.attach(token)
    assert token.cancelled and token.take("save") and not token.take("sample")
    child.on_command(signal.SIGUSR2, None)
    assert token.take("sample")
    child.on_stop(signal.SIGINT, None)  # a first Ctrl-C after the SIGTERM: still clean
    with pytest.raises(KeyboardInterrupt):
        child.on_stop(signal.SIGINT, None)  # Ctrl-C again: at once
    child.on_stop_now(signal.SIGQUIT, None)  # once: the words about it are not cut
    fresh = ChildSignals()
    fresh.attach(ev.CancelToken())
    with pytest.raises(KeyboardInterrupt):
        fresh.on_stop_now(signal.SIGQUIT, None)  # the host's Stop now, without a Cancel first
    before = signal.getsignal(signal.SIGINT)  # a Python caller's process gets its own back
    fresh.install()
    assert signal.getsignal(signal.SIGINT) == fresh.on_stop
    fresh.end()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_a_signal_while_the_cli_imports_is_kept_not_fatal(tmp_path):
    """`python -m dreambooth train` takes its signals before its own imports: SIGUSR1/SIGUSR2
    sent while the CLI module is being imported (the default action would end the process
    with -10/-12 and an empty log) are kept; the run goes on to its answer (here: no such
    config file, exit 2). After the run, a late command is ignored while the process exits."""
    code = f"""
import importlib.abc, os, runpy, signal, sys
class Poke(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "dreambooth.host.cli":
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR2)
        return None
sys.meta_path.insert(0, Poke())
sys.argv = ["dreambooth", "train", "--config", {str(tmp_path / "missing.json")!r}]
runpy.run_module("dreambooth", run_name="__main__", alter_sys=True)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 2 and "missing.json" in out.stderr, (out.returncode, out.stderr)
    ended = ("from dreambooth.host.signals import CHILD; import os, signal; "
             "CHILD.install(owner=True); CHILD.end(); os.kill(os.getpid(), signal.SIGUSR1); "
             "os.kill(os.getpid(), signal.SIGQUIT); print('alive')")
    out = subprocess.run([sys.executable, "-c", ended], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "alive", out.stderr
