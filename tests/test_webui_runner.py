"""The child-process runner: events -> progress, the real `python -m dreambooth train` child on
the tiny model, cancel by SIGINT then SIGTERM, and the manager's offload/refresh around it."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from dreambooth.config import events as ev
from dreambooth.host.interface import Host, standalone_paths
from dreambooth.host.runner import Progress, RunManager, TrainingRun, apply_event

sys.path.insert(0, str(Path(__file__).parent / "webui_stub"))
from dreambooth_test_helpers import deadline, tiny_inputs, train_python, wait_for  # noqa: E402,F401


def test_events_fold_into_progress():
    p = Progress()
    for e in (ev.Started("m", 10, 5, 2, 0), ev.Step(4, 10, 2, 0.5, 1e-4, 2.0, 1.5),
              ev.SampleSaved("s.png", 4, "x"), ev.Message("fell back", "warning"),
              ev.CheckpointSaved("m_10.safetensors", 10),
              ev.Finished("m_10.safetensors", 10, 5.0)):
        apply_event(p, e)
    assert (p.state, p.step, p.total_steps, p.loss, p.vram_gb) == ("finished", 4, 10, 0.5, 1.5)
    assert p.losses == [[4, 0.5]] and p.samples == ["s.png"]
    assert p.saved == ["m_10.safetensors"] and p.final_path == "m_10.safetensors"
    assert p.messages == ["warning: fell back"] and p.eta_s == 0.0


def test_a_step_without_a_read_loss_keeps_the_last_one_and_the_chart_its_points():
    p = Progress()
    for e in (ev.Step(1, 10, 1, None, 1e-4, 2.0), ev.Step(2, 10, 1, 0.5, 1e-4, 2.0),
              ev.Step(3, 10, 1, None, 1e-4, 2.0)):
        apply_event(p, e)
    assert (p.step, p.loss, p.losses) == (3, 0.5, [[2, 0.5]])
    again = ev.event_from_json(ev.Step(4, 10, 1, None, 1e-4, 2.0).to_json())
    assert again.loss is None and again.step == 4


def test_the_console_bar_shows_the_last_read_loss():
    import io

    from dreambooth.host.progress import ConsoleProgress
    out = io.StringIO()
    bar = ConsoleProgress(out)
    for e in (ev.Started("m", 3, 1, 1, 0), ev.Step(1, 3, 1, None, 1e-4, 2.0),
              ev.Step(2, 3, 1, 0.25, 1e-4, 2.0), ev.Step(3, 3, 1, None, 1e-4, 2.0)):
        bar(e)
    bar.close()
    text = out.getvalue()
    assert "loss=-" in text and "loss=0.2500" in text and bar.loss == 0.25


def test_eta_is_steps_left_over_speed_and_failures_keep_the_hint():
    p = Progress()
    apply_event(p, ev.Step(2, 12, 1, 1.0, 1e-4, 0.5))
    assert p.eta_s == pytest.approx(20.0)
    apply_event(p, ev.Failed("out of memory", "lower the batch size"))
    assert (p.state, p.error, p.hint) == ("failed", "out of memory", "lower the batch size")


def test_loss_history_is_bounded():
    p = Progress()
    for i in range(5000):
        apply_event(p, ev.Step(i + 1, 5000, 1, 1.0, 1e-4, 1.0))
    assert len(p.losses) <= 2000 and p.losses[-1][0] == 5000


class RecordingHost(Host):
    def __init__(self, paths, python):
        super().__init__(paths, python)
        self.calls = []

    @contextlib.contextmanager
    def model_offloaded(self):
        self.calls.append("offload")
        yield
        self.calls.append("restore")

    def refresh_checkpoints(self):
        self.calls.append("refresh")


def _config(tiny, tmp_path, steps_per_image=1, **kw):
    from dreambooth import Concept, TrainingConfig
    return TrainingConfig(
        model_name="runner", source_checkpoint=str(tiny["checkpoint"]),
        work_dir=str(tmp_path / "work"), output_dir=str(tmp_path / "out"), resolution=64,
        center_crop=True, steps_per_image=steps_per_image, learning_rate=1e-4,
        concepts=(Concept(str(tiny["instance"]), "photo of sks pattern"),), sample_steps=2,
        **kw)


@pytest.mark.slow
def test_manager_trains_in_a_child_and_refreshes_the_host(tiny_inputs, train_python, tmp_path):
    host = RecordingHost(standalone_paths(tmp_path / "ui"), train_python)
    manager = RunManager(host)
    run = manager.start(_config(tiny_inputs, tmp_path, sample_every_epochs=1))
    p = manager.wait(deadline(120))
    assert p.state == "finished", (p.error, run.stderr_tail())
    assert p.returncode == 0 and p.step == p.total_steps >= 2
    assert Path(p.final_path).is_file() and p.final_path in p.saved
    assert p.losses and p.samples and Path(p.samples[-1]).is_file()
    assert host.calls == ["offload", "refresh", "restore"]  # refreshed under the GPU lock
    assert (Path(p.run_dir) / "run.json").is_file() and (Path(p.run_dir) / "events.jsonl").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_save_and_sample_now_reach_the_running_child(tiny_inputs, train_python, tmp_path):
    host = RecordingHost(standalone_paths(tmp_path / "ui"), train_python)
    manager = RunManager(host, cancel_grace_s=60)
    assert not manager.request("save")  # nothing runs yet
    manager.start(_config(tiny_inputs, tmp_path, steps_per_image=400))
    wait_for(lambda: manager.status().step >= 1, timeout=300)
    assert manager.request("save") and manager.request("sample")
    wait_for(lambda: manager.status().saved and manager.status().samples, timeout=120)
    p = manager.status()
    assert p.step < p.total_steps and Path(p.saved[0]).is_file() and Path(p.samples[0]).is_file()
    assert manager.cancel()
    p = manager.wait(deadline(120))
    assert p.state == "cancelled" and all(Path(s).is_file() for s in p.saved)
    assert not manager.request("sample")  # it ended


@pytest.mark.slow
def test_cancel_stops_cleanly_and_keeps_what_was_trained(tiny_inputs, train_python, tmp_path):
    host = RecordingHost(standalone_paths(tmp_path / "ui"), train_python)
    manager = RunManager(host, cancel_grace_s=60)
    manager.start(_config(tiny_inputs, tmp_path, steps_per_image=400))
    wait_for(lambda: manager.status().step >= 1, timeout=300)
    assert manager.cancel()
    p = manager.wait(deadline(120))
    assert p.state == "cancelled" and p.returncode == 130
    assert 1 <= p.step < p.total_steps
    assert Path(p.final_path).is_file()  # saved at the step it stopped
    assert host.calls == ["offload", "refresh", "restore"]  # refreshed under the GPU lock


def test_a_child_that_ignores_sigint_gets_sigterm_after_the_grace_period(tmp_path):
    script = textwrap.dedent("""
        import json, signal, sys, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(json.dumps({"event": "started", "model_name": "m", "total_steps": 9,
                          "epochs": 9, "instance_images": 1, "class_images": 0}), flush=True)
        time.sleep(60)
    """)

    class StubbornRun(TrainingRun):
        @property
        def command(self):
            return [sys.executable, "-c", script]

    from dreambooth import TrainingConfig
    run = StubbornRun(TrainingConfig(), tmp_path / "run").start()
    wait_for(lambda: run.snapshot().state == "running", timeout=30)
    run.cancel(grace_s=1.0)
    p = run.wait(deadline(15))
    assert p.returncode == -signal.SIGTERM
    assert p.state == "cancelled"


def test_the_grace_period_starts_when_a_save_starts(tmp_path):
    """A slow save after Cancel is waited for: the grace counts from the save's start, so the
    child below (save begins 2 s after the signal, takes 2 s) is never cut off by a 3 s grace
    counted from the signal (which would stop it 1 s into the save)."""
    script = textwrap.dedent("""
        import json, signal, sys, time
        def stop(*a):
            time.sleep(2)
            print(json.dumps({"event": "saving", "path": "/x/m_3.safetensors", "step": 3}),
                  flush=True)
            time.sleep(2)
            print(json.dumps({"event": "checkpoint_saved", "path": "/x/m_3.safetensors",
                              "step": 3}), flush=True)
            print(json.dumps({"event": "finished", "path": "/x/m_3.safetensors", "steps": 3,
                              "seconds": 4.0, "cancelled": True}), flush=True)
            sys.exit(130)
        signal.signal(signal.SIGINT, stop)
        print(json.dumps({"event": "started", "model_name": "m", "total_steps": 9,
                          "epochs": 9, "instance_images": 1, "class_images": 0}), flush=True)
        time.sleep(60)
    """)

    class SlowSaver(TrainingRun):
        @property
        def command(self):
            return [sys.executable, "-c", script]

    from dreambooth import TrainingConfig
    run = SlowSaver(TrainingConfig(), tmp_path / "run").start()
    wait_for(lambda: run.snapshot().state == "running", timeout=30)
    run.cancel(grace_s=3.0)
    p = run.wait(30)
    assert p.returncode == 130 and p.state == "cancelled"
    assert p.saved == ["/x/m_3.safetensors"] and p.saving == ""


def test_saving_shows_in_the_progress_and_the_result_lists_every_save():
    from dreambooth.ui import render
    p = Progress(state="running", step=3, total_steps=9)
    apply_event(p, ev.Saving("/out/m_3.safetensors", 3))
    assert p.saving and "Saving m_3.safetensors" in render.progress_html(p)
    apply_event(p, ev.CheckpointSaved("/out/m_3.safetensors", 3))
    assert p.saving == "" and "Saving" not in render.progress_html(p)
    apply_event(p, ev.Finished("", 3, 1.0, cancelled=True))
    assert "Cancelled; saved: /out/m_3.safetensors" in render.result_html(p)


def test_a_child_that_crashes_becomes_a_failed_run_with_its_log(tmp_path):
    class CrashingRun(TrainingRun):
        @property
        def command(self):
            return [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); "
                                          "sys.exit(3)"]

    from dreambooth import TrainingConfig
    p = CrashingRun(TrainingConfig(), tmp_path / "run").start().wait(deadline(15))
    assert p.state == "failed" and p.returncode == 3 and "exit code 3" in p.error
    assert "boom" in p.messages


def test_child_environment_puts_lib_then_package_first(tmp_path):
    import dataclasses
    host = Host(dataclasses.replace(standalone_paths(tmp_path), lib_dir=tmp_path / "lib"))
    (tmp_path / "lib").mkdir()
    from dreambooth import TrainingConfig
    run = TrainingRun(TrainingConfig(), tmp_path / "run", host.python, host.child_pythonpath())
    parts = run.child_env()["PYTHONPATH"].split(os.pathsep)
    assert parts[0] == str(tmp_path / "lib")
    assert Path(parts[1]) == Path(__file__).resolve().parents[1]
    assert run.command[:4] == [sys.executable, "-m", "dreambooth", "train"]
    assert run.command[-2:] == ["--events-jsonl", "-"]


def test_lib_is_used_only_by_the_interpreter_it_was_filled_for(tmp_path):
    import json

    from dreambooth.host.interface import HostPaths
    lib = tmp_path / "lib"
    paths = HostPaths(tmp_path / "c", tmp_path / "l", tmp_path / "w", lib)
    assert str(lib) not in Host(paths).child_pythonpath()  # no folder
    lib.mkdir()
    assert Host(paths).child_pythonpath()[0] == str(lib)  # filled by hand: no marker
    (lib / "dreambooth_lib.json").write_text(json.dumps({"python": sys.executable}))
    assert Host(paths).child_pythonpath()[0] == str(lib)
    other = Host(paths, python=str(tmp_path / "other-venv" / "bin" / "python"))
    assert str(lib) not in other.child_pythonpath()


def test_only_one_run_at_a_time(tmp_path):
    class SlowRun(TrainingRun):
        @property
        def command(self):
            return [sys.executable, "-c", "import time; time.sleep(30)"]

    import dreambooth.host.runner as runner_module
    from dreambooth import TrainingConfig
    manager = RunManager(Host(standalone_paths(tmp_path)), cancel_grace_s=2)
    original = runner_module.TrainingRun
    runner_module.TrainingRun = SlowRun
    try:
        manager.start(TrainingConfig(work_dir=str(tmp_path)))
        with pytest.raises(RuntimeError, match="already in progress"):
            manager.start(TrainingConfig(work_dir=str(tmp_path)))
    finally:
        runner_module.TrainingRun = original
        manager.cancel()
        manager.wait(deadline(15))
    assert not manager.busy()
