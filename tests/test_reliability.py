"""Faults injected: a kill mid-run resumes exactly, a kill mid-save loses nothing, NaN stops
cleanly, one run per model, safe loading."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from patience import deadline
import torch

from dreambooth import DreamboothError, TrainingError, train
from dreambooth.config import events as ev
from dreambooth.model.checkpoint import read_checkpoint, write_safetensors
from dreambooth.training.state import ModelLock, snapshots

pytestmark = pytest.mark.reliability


def cli(config, tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_text(config.to_json())
    events = tmp_path / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "dreambooth", "train", "--config", str(path),
           "--events-jsonl", str(events)]
    return cmd, events


def read_events(path):
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [ev.event_from_json(line) for line in lines if line.endswith("}")]


def losses(events):
    return {e.step: e.loss for e in events if isinstance(e, ev.Step)}


@pytest.fixture
def long_config(quick_config):
    # 48 steps; deterministic ('auto': state is saved) on one CPU thread: bit-identity is
    # promised for the same machine, thread count and versions
    # the loss read every step (log_every_steps 1): the tests compare the Step events' losses
    return quick_config.replace(steps_per_image=12, state_every_steps=4, cpu_threads=1,
                                log_every_steps=1)


def test_killed_run_resumes_exactly(long_config, tmp_path):
    # 24 steps (snapshots at 4, 8, ...): killed after step 10, 14 steps before the end
    short = long_config.replace(steps_per_image=6)
    reference = {}  # the uninterrupted run, in this process (as exact as the command line)
    train(short.replace(model_name="straight"),
          lambda e: reference.__setitem__(e.step, e.loss) if isinstance(e, ev.Step) else None)

    cfg = short.replace(model_name="killed")
    cmd, events = cli(cfg, tmp_path, "b")
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.time() + deadline(60)
    while max(losses(read_events(events)), default=0) < 10 and time.time() < end:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = max(losses(read_events(events)))
    assert killed_at < 24, "the run finished before it could be killed"
    assert snapshots(cfg.model_dir), "a state snapshot must exist"
    assert (cfg.model_dir / ".train.lock").exists(), "the killed run left its lock"
    events.unlink()

    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    resumed = read_events(events)
    started = next(e for e in resumed if isinstance(e, ev.Started))
    assert started.resumed_from_step >= 8
    texts = [e.text for e in resumed if isinstance(e, ev.Message)]
    assert any(f"Resuming from step {started.resumed_from_step} of 24" in t for t in texts)
    assert any("stale training lock" in t for t in texts)
    after = losses(resumed)
    assert sorted(after) == list(range(started.resumed_from_step + 1, 25))
    assert all(after[s] == reference[s] for s in after), "loss sequence differs after resume"
    a, _ = read_checkpoint(tmp_path / "out" / "straight_24.safetensors")
    b, _ = read_checkpoint(tmp_path / "out" / "killed_24.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ after resume"
    assert snapshots(cfg.model_dir) == [], "a finished run clears its snapshots"


def test_resume_with_a_changed_config_is_refused_listing_the_changes(long_config):
    cancel = ev.CancelToken()

    def stop_at_6(event):
        if isinstance(event, ev.Step) and event.step == 6:
            cancel.cancel()
    train(long_config, stop_at_6, cancel)
    with pytest.raises(DreamboothError) as err:
        train(long_config.replace(learning_rate=5e-4, seed=7))
    text = str(err.value)
    assert "learning_rate" in text and "seed" in text and "never" in text


@pytest.mark.once  # our own run control; torch is the same in both core venvs
def test_choosing_a_snapshot_uses_that_snapshot(long_config):
    long_config = long_config.replace(steps_per_image=3)  # 12 steps: snapshots at 4 and 8
    cancel = ev.CancelToken()
    first = {}

    def record(event):
        if isinstance(event, ev.Step):
            first[event.step] = event.loss
            if event.step == 10:
                cancel.cancel()
    train(long_config, record, cancel)
    chosen = [p for p in snapshots(long_config.model_dir) if p.name.endswith("00000004")][0]
    seen = []
    train(long_config.replace(resume=str(chosen), overwrite=True), seen.append)
    started = next(e for e in seen if isinstance(e, ev.Started))
    assert started.resumed_from_step == 4
    again = {e.step: e.loss for e in seen if isinstance(e, ev.Step)}
    assert min(again) == 5
    assert all(again[s] == first[s] for s in range(5, 11))


@pytest.mark.once  # our own run control; torch is the same in both core venvs
def test_nan_loss_stops_with_the_step_and_keeps_saved_checkpoints(quick_config, monkeypatch):
    import dreambooth.training.trainer as train_module
    real = train_module.compute_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        total, inst, prior = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 6:
            total = total * float("nan")
        return total, inst, prior
    monkeypatch.setattr(train_module, "compute_loss", poisoned)
    seen = []
    with pytest.raises(TrainingError) as err:
        train(quick_config.replace(save_every_epochs=1), seen.append)
    assert "step 6" in err.value.message and "bf16" in err.value.hint
    saved = [e.path for e in seen if isinstance(e, ev.CheckpointSaved)]
    assert saved and all(os.path.exists(p) for p in saved)
    state, _ = read_checkpoint(saved[-1])
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert isinstance(seen[-1], ev.Failed)


@pytest.mark.once  # our own run control; torch is the same in both core venvs
def test_losses_read_every_few_steps_are_each_steps_loss_and_resume_exactly(long_config):
    """A Step event every step, its loss only where it was read; the result has every step's
    loss, the same as read every step; a resume from a snapshot continues them exactly (the
    device generator's state is in the snapshot)."""
    short = long_config.replace(steps_per_image=6)  # 24 steps: 10, then 8 to the end
    every = train(short.replace(model_name="every"))
    seen, cancel = [], ev.CancelToken()

    def stop_at_10(event):
        seen.append(event)
        if isinstance(event, ev.Step) and event.step == 10:
            cancel.cancel()
    sparse = short.replace(model_name="sparse", log_every_steps=3)
    first = train(sparse, stop_at_10, cancel)
    steps = [e for e in seen if isinstance(e, ev.Step)]
    assert [s.step for s in steps] == list(range(1, 11))
    assert [s.step for s in steps if s.loss is not None] == [3, 6, 9]
    assert len(every.losses) == 24 and first.losses == every.losses[:10]
    assert all(s.loss == every.losses[s.step - 1] for s in steps if s.loss is not None)
    chosen = [p for p in snapshots(sparse.model_dir) if p.name.endswith("00000008")][0]
    again = train(sparse.replace(resume=str(chosen), overwrite=True))
    assert again.losses == every.losses[8:]


@pytest.mark.once  # our own run control; torch is the same in both core venvs
def test_nan_loss_stops_at_the_read_naming_the_first_step(quick_config, monkeypatch):
    """Steps 6-8 go on after the non-finite loss of step 6 (nothing waits for it); the read at
    the last step stops the run, naming step 6, before the final save."""
    import dreambooth.training.trainer as train_module
    real = train_module.compute_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        total, inst, prior = real(*args, **kwargs)
        calls["n"] += 1
        return (total * float("inf") if calls["n"] == 6 else total), inst, prior
    monkeypatch.setattr(train_module, "compute_loss", poisoned)
    seen = []
    with pytest.raises(TrainingError) as err:
        train(quick_config, seen.append)
    assert "became inf at step 6" in err.value.message
    assert [e.step for e in seen if isinstance(e, ev.Step)] == list(range(1, 8))
    assert not any(isinstance(e, ev.CheckpointSaved) for e in seen)
    assert not list(Path(quick_config.output_dir).glob("*.safetensors"))


@pytest.mark.once  # our own run control; torch is the same in both core venvs
def test_second_run_of_the_same_model_is_refused(quick_config):
    with ModelLock(quick_config.model_dir, lambda t: None):
        with pytest.raises(DreamboothError) as err:
            train(quick_config)
    assert "already being trained" in str(err.value)
    assert train(quick_config).path.exists()  # the lock is released afterwards


@pytest.mark.once  # our own run control; torch is the same in both core venvs
def test_stale_lock_from_a_dead_process_is_cleared(quick_config):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    quick_config.model_dir.mkdir(parents=True)
    (quick_config.model_dir / ".train.lock").write_text(
        json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    seen = []
    assert train(quick_config, seen.append).path.exists()
    assert any("stale training lock" in getattr(e, "text", "") for e in seen)


WRITER = """
import sys, torch
from dreambooth.model.checkpoint import write_safetensors
state = {f"t{i}": torch.full((1024, 1024), float(i)) for i in range(400)}
print("writing", flush=True)
write_safetensors(sys.argv[1], state, overwrite=True)
"""


def test_kill_during_save_leaves_the_previous_file_intact(tmp_path):
    target = tmp_path / "model.safetensors"
    write_safetensors(target, {"w": torch.ones(4)}, {"v": "old"})
    before = target.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"writing"
    end = time.time() + deadline(30)
    while time.time() < end:
        partial = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        if partial and partial[0].stat().st_size > 1_000_000:
            break
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert partial, "the writer never started writing"
    assert target.read_bytes() == before
    state, meta = read_checkpoint(target)
    assert meta["v"] == "old" and torch.equal(state["w"], torch.ones(4))


def test_safe_loading_refuses_code_but_reads_plain_tensor_ckpt(tmp_path):
    good = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}}, good)
    from dreambooth.model.checkpoint import read_checkpoint as read
    state, _ = read(good)
    assert torch.equal(state["a"], torch.ones(2))


@pytest.mark.once  # our own run control; torch is the same in both core venvs
def test_ctrl_c_in_the_cli_is_a_clean_stop_that_keeps_the_work(long_config, tmp_path):
    """Ctrl-C, then SIGTERM (an OS's, or an older host's after its grace): SIGTERM is the same
    clean stop, never "a second Ctrl-C", so the run still saves and keeps its state."""
    cmd, events = cli(long_config.replace(model_name="interrupted"), tmp_path, "c")
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.time() + deadline(60)
    while max(losses(read_events(events)), default=0) < 6 and time.time() < end:
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=deadline(60))
    assert child.returncode == 130, err
    assert "Traceback" not in err
    saved = out.strip().splitlines()[-1]
    assert os.path.exists(saved) and "interrupted_" in saved
    finished = [e for e in read_events(events) if isinstance(e, ev.Finished)]
    assert finished and finished[-1].cancelled
    assert snapshots(long_config.replace(model_name="interrupted").model_dir), \
        "a cancelled run keeps its state so it can resume"


@pytest.mark.once  # our own run control; torch is the same in both core venvs
def test_resuming_on_another_thread_count_says_so_and_stays_close(long_config, tmp_path):
    """Bit-identity is promised for the same thread count only; on another count the run goes
    on, says so, and stays within what the optimizer could have moved the weights since."""
    long_config = long_config.replace(steps_per_image=6)  # 24 steps: 16 after the resume
    straight = {}
    done = train(long_config.replace(model_name="straight"),
                 lambda e: straight.__setitem__(e.step, e.loss) if isinstance(e, ev.Step) else None)
    cancel = ev.CancelToken()

    def stop_at_8(event):
        if isinstance(event, ev.Step) and event.step == 8:
            cancel.cancel()
    moved = long_config.replace(model_name="moved", cpu_threads=2)
    train(moved, stop_at_8, cancel)
    seen = []
    result = train(moved.replace(cpu_threads=1), seen.append)
    warned = [e.text for e in seen if isinstance(e, ev.Message) and e.level == "warning"]
    assert any("cpu threads 2" in t and "cpu threads 1" in t and "not bit-identical" in t
               for t in warned), warned
    after = {e.step: e.loss for e in seen if isinstance(e, ev.Step)}
    assert sorted(after) == list(range(9, 25))
    # Adam moves a weight by at most about lr per step: two runs that part at step 8 can't be
    # further apart than twice that over the remaining steps (rounding differences only)
    bound = 2 * long_config.learning_rate * 16 * 1.5
    a, _ = read_checkpoint(done.path)
    b, _ = read_checkpoint(result.path)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a
                if k.startswith("model.diffusion_model."))
    assert worst <= bound, (worst, bound)
    # each step's loss is one noisy draw that small weight differences shift by a few percent
    # (the tiny random model is sensitive); over the 16 steps after the resume the mean stays
    # within 5% of the uninterrupted run's
    mean_after, mean_straight = (sum(d[s] for s in after) / len(after) for d in (after, straight))
    assert abs(mean_after - mean_straight) <= 0.05 * mean_straight, (mean_after, mean_straight)


def test_a_run_without_saved_state_is_not_made_deterministic(quick_config):
    from dreambooth.training import backends
    assert quick_config.replace(state_every_steps=0).is_deterministic is False
    assert quick_config.replace(state_every_steps=5).is_deterministic is True
    assert quick_config.replace(state_every_steps=0, deterministic="on").is_deterministic
    before = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with backends.reproducible(True, 1) as machine:
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
        assert machine == {"device": "cpu", "cpu_threads": 1, "deterministic": True}
    assert (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()) == before


def test_fast_gpu_defaults_are_set_within_a_run_and_restored_after(monkeypatch):
    """On a GPU: TF32 matmuls and convolutions, cuDNN autotuning only for static shapes and
    never with deterministic kernels; everything as it was afterwards. (The flags are plain
    module settings, so a CPU machine can check them with CUDA reported present.)"""
    from dreambooth.training import backends
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,  # noqa: E731
                     torch.backends.cudnn.benchmark)
    before = flags()
    threads = torch.get_num_threads()
    with backends.reproducible(False, 0, static_shapes=True):
        assert flags() == (True, True, True)
    with backends.reproducible(False, 0, static_shapes=False):
        assert flags() == (True, True, False)
    with backends.reproducible(True, 0, static_shapes=True):
        assert flags()[2] is False and torch.backends.cudnn.deterministic
    assert flags() == before and torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_mixed_precision_auto_picks_what_the_device_runs(quick_config, monkeypatch):
    from dreambooth.training import backends
    said = []
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = quick_config.replace(mixed_precision="auto")
    assert quick_config.__class__().mixed_precision == "auto"  # the default
    assert backends.auto_precision(auto, cpu, said.append) == "no"
    assert backends.auto_precision(auto.replace(bf16_weights=True), cpu, said.append) == "bf16"
    assert backends.auto_precision(auto.replace(mixed_precision="fp16"), cuda, said.append) \
        == "fp16"  # a choice is kept
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert backends.auto_precision(auto, cuda, said.append) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert backends.auto_precision(auto, cuda, said.append) == "fp16"
    assert backends.auto_precision(auto.replace(fused_optimizer=True), cuda, said.append) == "no"
    assert said[-1] == "Mixed precision 'auto': fp32 on this GPU."


def test_autocast_keeps_no_weight_cache_under_gradient_checkpointing(quick_config):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dreambooth.training import backends
    assert backends.autocast_kwargs(quick_config.replace(gradient_checkpointing=False)) == []
    AcceleratorState._reset_state()
    acc = Accelerator(cpu=True, mixed_precision="bf16", kwargs_handlers=backends.autocast_kwargs(
        quick_config.replace(gradient_checkpointing=True)))
    assert acc.autocast_handler is not None and acc.autocast_handler.cache_enabled is False
    AcceleratorState._reset_state()
