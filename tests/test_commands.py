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
