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

# the host process and its child protocol: nothing version-sensitive (test.sh runs it once)
pytestmark = pytest.mark.once


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
    assert manager.request("save") == "idle"  # nothing runs yet
    manager.start(_config(tiny_inputs, tmp_path, steps_per_image=400))
    wait_for(lambda: manager.status().step >= 1, timeout=300)
    assert manager.request("save") == "sent" and manager.request("sample") == "sent"
    wait_for(lambda: manager.status().saved and manager.status().samples, timeout=120)
    p = manager.status()
    assert p.step < p.total_steps and Path(p.saved[0]).is_file() and Path(p.samples[0]).is_file()
    assert manager.cancel()
    p = manager.wait(deadline(120))
    assert p.state == "cancelled" and all(Path(s).is_file() for s in p.saved)
    assert manager.request("sample") == "idle"  # it ended


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


@pytest.mark.slow
def test_cancel_once_in_a_step_and_a_save_longer_than_the_grace_keeps_both(
        tiny_inputs, train_python, tmp_path, monkeypatch):
    """The steps after the first take 4 s more and the resume state 4 s more to write (a test-
    only sitecustomize in the child: tests/slow_child), the grace is 1 s: Cancel once after
    step 1 still gives a checkpoint and a resumable state, and the result names both."""
    slow = Path(__file__).parent / "slow_child"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(slow), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("DREAMBOOTH_TEST_SLOW_FROM_STEP", "2")
    monkeypatch.setenv("DREAMBOOTH_TEST_SLOW_STEP_S", "4")
    monkeypatch.setenv("DREAMBOOTH_TEST_SLOW_STATE_S", "4")
    host = RecordingHost(standalone_paths(tmp_path / "ui"), train_python)
    manager = RunManager(host, cancel_grace_s=1.0)
    manager.start(_config(tiny_inputs, tmp_path, steps_per_image=2))  # 2 images: 4 steps
    wait_for(lambda: manager.status().step >= 1 or not manager.busy(), timeout=300)
    assert manager.cancel()
    p = manager.wait(deadline(120))
    assert p.state == "cancelled" and p.stop != "at_once", (p, manager.run.stderr_tail())
    assert 2 <= p.stop_step == p.step < p.total_steps and p.loss is not None
    assert Path(p.final_path).is_file() and p.final_path in p.saved
    assert Path(p.state_path).is_dir() and p.state_step == p.step
    from dreambooth.training.state import snapshot_info
    assert snapshot_info(Path(p.state_path))["step"] == p.step  # a state a run resumes from
    from dreambooth.ui import render
    shown = render.result_html(p)
    assert p.final_path in shown and p.state_path in shown and "nothing was saved" not in shown


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_a_burst_of_requests_from_the_start_never_kills_the_run(tiny_inputs, train_python,
                                                                tmp_path, monkeypatch):
    """Save now / Sample now from the moment Train is pressed until after the run ended. The
    child is held at its interpreter's start (tests/slow_child waits for a gate file), where a
    SIGUSR1 would kill it (-10): each request is held, then sent once it said Ready, then
    refused; the run trains to its end and keeps a Save now's checkpoint."""
    import time
    gate = tmp_path / "gate"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent / "slow_child"),
                                                      os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("DREAMBOOTH_TEST_START_GATE", str(gate))
    host = RecordingHost(standalone_paths(tmp_path / "ui"), train_python)
    manager = RunManager(host, cancel_grace_s=60)
    manager.start(_config(tiny_inputs, tmp_path, steps_per_image=2))
    answers = [manager.request(what) for what in ("save", "sample") * 10]
    wait_for(lambda: manager.run.running() or not manager.busy(), timeout=60)
    answers += [manager.request("save"), manager.request("sample")]
    gate.touch()
    end = time.monotonic() + deadline(300)
    while manager.busy() and time.monotonic() < end:
        answers.append(manager.request("save" if len(answers) % 2 else "sample"))
        time.sleep(0.01)
    answers.append(manager.request("save"))
    p = manager.wait(deadline(60))
    assert p.state == "finished" and p.returncode == 0, (p, manager.run.stderr_tail())
    assert Path(p.final_path).is_file() and len(p.saved) >= 2  # a Save now's too
    assert set(answers[:22]) == {"queued"} and answers[-1] == "idle"
    kinds = [a for i, a in enumerate(answers) if i == 0 or a != answers[i - 1]]
    assert kinds[:2] == ["queued", "sent"] and "queued" not in kinds[2:]  # in that order


# A stand-in child (plain Python, no torch): it says Ready, then follows the script each test
# gives it, in the order the real one does (Stopping at the end of the running step, then the
# resume state and the checkpoint, each announced by Saving).
CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    def say(kind, **fields):
        print(json.dumps({"event": kind, **fields}), flush=True)
    def hang(*a):
        time.sleep(3600)
    def stop(*a):
        say("stopped", step=2, message="stopped at once")
        sys.exit(130)
    say("ready", pid=os.getpid())
    say("started", model_name="m", total_steps=9, epochs=9, instance_images=1, class_images=0)
    def saves(seconds):
        say("saving", path="/w/m/state", step=2, what="state"); time.sleep(seconds)
        say("state_saved", path="/w/m/state/step_00000002", step=2)
        say("saving", path="/x/m_2.safetensors", step=2); time.sleep(seconds)
        say("checkpoint_saved", path="/x/m_2.safetensors", step=2)
    say("step", step=1, total_steps=9, epoch=1, loss=0.5, lr=1e-4, it_per_s=1.0)
""")



def _child(tmp_path, script: str) -> TrainingRun:
    class Child(TrainingRun):
        @property
        def command(self):
            return [sys.executable, "-c", CHILD + textwrap.dedent(script)]

    from dreambooth import TrainingConfig
    run = Child(TrainingConfig(), tmp_path / "run").start()
    wait_for(lambda: run.snapshot().step == 1 or run.snapshot().returncode is not None,
             timeout=30)
    assert run.snapshot().returncode is None, run.stderr_tail()
    return run


def test_the_grace_counts_from_the_stop_point_and_never_cuts_a_save(tmp_path):
    """The step running at Cancel takes 2 s, each save 1.5 s, the grace is 1 s: a grace counted
    from the click (or from a save's start) would stop it before its files are written."""
    run = _child(tmp_path, """
        def on_int(*a):
            time.sleep(2)  # the rest of the running step
            say("step", step=2, total_steps=9, epoch=1, loss=None, lr=1e-4, it_per_s=1.0)
            say("stopping", step=2, total_steps=9, loss=0.25)
            saves(1.5)
            say("finished", path="/x/m_2.safetensors", steps=2, seconds=5.0, cancelled=True)
            sys.exit(130)
        signal.signal(signal.SIGINT, on_int)
        hang()
    """)
    run.cancel(grace_s=1.0)
    p = run.wait(deadline(30))
    assert p.returncode == 130 and (p.state, p.stop, p.stop_step) == ("cancelled", "", 2)
    assert p.saved == ["/x/m_2.safetensors"] and p.state_path == "/w/m/state/step_00000002"
    assert p.loss == 0.25 and p.losses[-1] == [2, 0.25]  # read for the save, shown
    from dreambooth.ui import render
    shown = render.result_html(p)
    assert "Cancelled at step 2 of 9" in shown and "/x/m_2.safetensors" in shown
    assert "/w/m/state/step_00000002" in shown and "nothing was saved" not in shown


def test_a_child_that_hangs_after_its_saves_is_forced_and_said_so(tmp_path):
    """It stops and saves, then hangs ignoring the stop-at-once signal too: after the grace it
    is stopped at once, then killed; the result says forced, with the files it kept."""
    run = _child(tmp_path, """
        def on_int(*a):
            say("stopping", step=1, total_steps=9, loss=None)
            saves(0)
            hang()
        signal.signal(signal.SIGINT, on_int)
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)
        hang()
    """)
    run.cancel(grace_s=1.0)
    p = run.wait(deadline(30))
    assert p.returncode == -signal.SIGKILL and (p.state, p.stop) == ("stopped", "forced")
    from dreambooth.ui import render
    shown = render.result_html(p)
    assert "Forced stop at step 1 of 9" in shown and "had not ended 1 s after it stopped" in shown
    assert "/x/m_2.safetensors" in shown and "/w/m/state/step_00000002" in shown
    assert "nothing was saved" not in shown
    said = p.to_dict()["outcome"]  # the API's status says the same
    assert said.startswith("Forced stop at step 1 of 9") and "Resume state: /w/m/state" in said


def test_stop_now_stops_at_once_and_says_what_was_kept(tmp_path):
    """Stop now (without Cancel first) is one stop-at-once signal; the child's Stopped event
    and the earlier save it names stay in the result."""
    run = _child(tmp_path, """
        say("checkpoint_saved", path="/x/m_1.safetensors", step=1)
        signal.signal(signal.SIGQUIT, stop)
        hang()
    """)
    wait_for(lambda: run.snapshot().saved, timeout=30)
    record = Path(run.snapshot().run_dir) / "events.jsonl"  # written as the events come
    wait_for(lambda: '"checkpoint_saved"' in record.read_text(), timeout=30)
    assert run.running()
    run.cancel(grace_s=30.0, now=True)
    p = run.wait(deadline(30))
    assert p.returncode == 130 and (p.state, p.stop) == ("stopped", "at_once")
    from dreambooth.ui import render
    shown = render.result_html(p)
    assert "Stopped at once at step 2 of 9 without saving" in shown
    assert "saved: /x/m_1.safetensors" in shown


def test_commands_wait_for_ready_and_are_refused_once_the_run_ends(tmp_path):
    """A Save now before the child can take it is held (a SIGUSR1 then would kill it: -10),
    sent once it says Ready; after its Finished, requests are refused, never sent."""
    script = textwrap.dedent("""
        import json, os, signal, sys, time
        time.sleep(1.5)  # importing: no handler yet
        got = []
        signal.signal(signal.SIGUSR1, lambda *a: got.append("save"))
        print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
        while not got:
            time.sleep(0.05)
        print(json.dumps({"event": "message", "text": "saving now"}), flush=True)
        print(json.dumps({"event": "finished", "path": "", "steps": 0, "seconds": 1.0}),
              flush=True)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # as when Python shuts down
        time.sleep(1.5)
    """)

    class Starting(TrainingRun):
        @property
        def command(self):
            return [sys.executable, "-c", script]

    from dreambooth import TrainingConfig
    run = Starting(TrainingConfig(), tmp_path / "run").start()
    assert run.request("save") == "queued" and run.request("save") == "queued"
    wait_for(lambda: run.snapshot().state == "finished", timeout=30)
    assert run.request("save") == "ending" and run.request("sample") == "ending"
    p = run.wait(deadline(30))
    assert p.returncode == 0 and p.messages == ["saving now"]


def test_saving_shows_in_the_progress_and_the_result_lists_every_save():
    from dreambooth.ui import render
    p = Progress(state="running", step=3, total_steps=9)
    apply_event(p, ev.Saving("/out/m_3.safetensors", 3))
    assert p.saving and "Saving m_3.safetensors" in render.progress_html(p)
    apply_event(p, ev.CheckpointSaved("/out/m_3.safetensors", 3))
    assert p.saving == "" and "Saving" not in render.progress_html(p)
    apply_event(p, ev.Finished("", 3, 1.0, cancelled=True))
    assert "Cancelled at step 3 of 9." in render.result_html(p)
    assert "saved: /out/m_3.safetensors" in render.result_html(p)


@pytest.mark.parametrize("progress, said, unsaid", [
    (Progress("cancelled", step=0, total_steps=12), ["Cancelled before the first step; nothing "
                                                      "was saved."], []),
    # a resumed run cancelled before its first step: the state it began from is still there
    (Progress("cancelled", step=4, total_steps=12, resumed_from=4),
     ["Cancelled before the first step", "resume state of step 4"], []),
    # Forge's case: 2 steps ran, an earlier Save now, the run was stopped hard
    (Progress("stopped", step=2, total_steps=12, saved=["/o/m_1.safetensors"], stop="forced",
              stop_note="it had not ended."),
     ["Forced stop at step 2 of 12: it had not ended.", "saved: /o/m_1.safetensors"],
     ["nothing was saved", "Nothing of this run"]),
    (Progress("stopped", step=5, total_steps=12, stop="at_once", state_path="/w/state/step_4",
              state_step=4),
     ["Stopped at once at step 5 of 12 without saving", "resume state: /w/state/step_4",
      "continues from step 4"], ["nothing was saved"]),
    (Progress("stopped", step=5, total_steps=12, stop="at_once"),
     ["Stopped at once", "Nothing of this run was saved."], []),
    (Progress("cancelled", step=3, total_steps=12, final_path="/o/m_3.safetensors",
              saved=["/o/m_1.safetensors", "/o/m_3.safetensors"], state_path="/w/s/step_3",
              state_step=3, stop="forced", stop_note="the exit hung."),
     ["Cancelled at step 3 of 12; saved what was trained to: /o/m_3.safetensors",
      "saved: /o/m_1.safetensors", "resume state: /w/s/step_3", "stopped hard: the exit hung."],
     ["nothing was saved"]),
])
def test_the_result_of_an_early_end_says_the_steps_run_and_the_files_kept(progress, said, unsaid):
    from dreambooth.ui import render
    shown = render.result_html(progress)
    assert all(text in shown for text in said), shown
    assert not any(text in shown for text in unsaid), shown


def test_a_run_cancelled_before_its_start_starts_nothing(tmp_path):
    from dreambooth import TrainingConfig
    run = TrainingRun(TrainingConfig(), tmp_path / "run")
    assert run.snapshot().state == "starting" and run.request("save") == "queued"
    run.cancel(grace_s=1.0)
    assert run.request("save") == "ending"
    p = run.start().wait(1)
    assert run.proc is None and p.state == "cancelled" and not p.active


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
