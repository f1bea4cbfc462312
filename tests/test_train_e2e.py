"""End to end through the real entry points on the tiny model, offline."""
import json
import sys
from pathlib import Path

import pytest
import torch
from patience import run

from dreambooth import Concept, train
from dreambooth.config import events as ev
from dreambooth.config.events import CancelToken, event_from_json
from dreambooth.model.checkpoint import read_checkpoint


def test_train_in_process_offline_single_file_to_single_file(quick_config, tiny_source,
                                                             no_network):
    seen = []
    cfg = quick_config.replace(sample_every_epochs=2, save_every_epochs=1)
    result = train(cfg, seen.append)
    kinds = [e.kind for e in seen]
    assert kinds[0] in ("message", "started") and kinds[-1] == "finished"
    steps = [e for e in seen if isinstance(e, ev.Step)]
    assert [s.step for s in steps] == list(range(1, 9))
    assert all(s.it_per_s > 0 for s in steps)
    # the loss is read from the device every log_every_steps (10) and at the last step; every
    # step's loss is in the result
    assert [s.step for s in steps if s.loss is not None] == [8] and steps[-1].loss > 0
    assert len(result.losses) == 8 and all(x > 0 for x in result.losses)
    assert result.losses[-1] == steps[-1].loss
    assert any(isinstance(e, ev.SampleSaved) for e in seen)
    assert result.path.name == "quick_8.safetensors"
    assert [p.name for p in result.saved] == ["quick_4.safetensors", "quick_8.safetensors"]
    original, _ = read_checkpoint(tiny_source)
    trained, meta = read_checkpoint(result.path)
    assert set(trained) == set(original)
    assert all(trained[k].shape == original[k].shape for k in original)
    changed = [k for k in original if k.startswith("model.diffusion_model.")
               and not torch.equal(trained[k], original[k])]
    assert changed, "the UNet must have been trained"
    assert json.loads(meta["dreambooth.config"])["model_name"] == "quick"
    assert meta["modelspec.trigger_phrase"] == "photo of sks pattern"


def test_cli_with_json_config_and_events_stream(quick_config, tmp_path):
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(quick_config.replace(save_precision="fp16").to_json())
    events_path = tmp_path / "events.jsonl"
    out = run([sys.executable, "-m", "dreambooth", "train", "--config", str(cfg_path),
               "--events-jsonl", str(events_path)], 30, capture_output=True, text=True,
              env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip().splitlines()[-1]
    assert path.endswith("quick_8.safetensors")
    state, _ = read_checkpoint(path)
    assert state["model.diffusion_model.out.2.weight"].dtype == torch.float16
    events = [event_from_json(line) for line in events_path.read_text().splitlines()]
    assert isinstance(events[-1], ev.Finished) and events[-1].path == path
    assert any(isinstance(e, ev.Started) and e.total_steps == 8 for e in events)
    # the libraries' own lines go to the run's log, never to the console
    library = ("should be kept in float32", "requires torchvision", "[transformers",
               "[diffusers", "[accelerate", "Failed to initialize NumPy", "Warning:")
    log = "".join(p.read_text() for p in (tmp_path / "runs" / "quick" / "logs").glob("*.log"))
    assert not [line for line in out.stderr.splitlines() if any(m in line for m in library)]
    import inspect
    import diffusers.models.modeling_utils as modeling_utils
    if "should be kept in float32" in inspect.getsource(modeling_utils):  # diffusers >= 0.32
        assert "[diffusers.models.modeling_utils] warning: There are modules in" in log


def test_cli_flags_build_the_same_config(quick_config, tmp_path):
    c = quick_config.concepts[0]
    out = run([sys.executable, "-m", "dreambooth", "train", "--print-config",
               "--source-checkpoint", quick_config.source_checkpoint,
               "--instance-dir", c.instance_data_dir, "--instance-prompt",
               c.instance_prompt, "--class-prompt", "photo of a pattern",
               "--resolution", "64", "--optimizer", "adamw_8bit",
               "--train-text-encoder", "true"], 10, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["resolution"] == 64 and data["optimizer"] == "adamw_8bit"
    assert data["train_text_encoder"] is True
    assert data["concepts"][0]["class_images_per_instance"] == 1


def test_cancel_stops_between_steps_and_keeps_the_work(quick_config):
    cancel = CancelToken()
    seen = []

    def listener(event):
        seen.append(event)
        if isinstance(event, ev.Step) and event.step == 3:
            cancel.cancel()
    result = train(quick_config, listener, cancel)
    assert result.cancelled and result.steps == 3
    assert result.path.name == "quick_3.safetensors" and result.path.exists()
    assert isinstance(seen[-1], ev.Finished) and seen[-1].cancelled
    # where it stopped, with the loss the save read (step 3's event had none: read every 10),
    # then each write announced before it starts: the resume state, then the checkpoint
    after = [e for e in seen if not isinstance(e, (ev.Step, ev.Message, ev.Started))]
    assert [type(e) for e in after] == [ev.Stopping, ev.Saving, ev.StateSaved, ev.Saving,
                                        ev.CheckpointSaved, ev.Finished]
    stop, state, saved = after[0], after[2], after[4]
    total = next(e for e in seen if isinstance(e, ev.Started)).total_steps
    assert (stop.step, stop.total_steps) == (3, total) and isinstance(stop.loss, float)
    assert [s.loss for s in seen if isinstance(s, ev.Step)][2] is None
    assert after[1].what == "state" and after[3].what == "checkpoint"
    assert state.step == 3 and Path(state.path).is_dir() and saved.path == str(result.path)


def test_class_images_are_generated_once_and_reused(quick_config, tmp_path):
    class_dir = tmp_path / "class"
    concept = Concept(quick_config.concepts[0].instance_data_dir, "photo of sks pattern",
                      "photo of a pattern", str(class_dir), 2)
    cfg = quick_config.replace(concepts=(concept,), steps_per_image=1)
    seen = []
    train(cfg, seen.append)
    assert len(list(class_dir.glob("*.png"))) == 8
    assert any("found 0, generating 8" in getattr(e, "text", "") for e in seen)
    seen.clear()
    train(cfg.replace(model_name="again"), seen.append)
    assert any("found 8, generating 0" in getattr(e, "text", "") for e in seen)


@pytest.mark.parametrize("choice", ["default", "sdpa", "xformers"])
def test_every_attention_choice_trains_or_falls_back_loudly(quick_config, choice):
    seen = []
    train(quick_config.replace(attention=choice, steps_per_image=1, model_name=choice),
          seen.append)
    if choice == "xformers" and not torch.cuda.is_available():
        assert any("using SDPA instead" in getattr(e, "text", "") for e in seen)


@pytest.mark.parametrize("choice", ["adamw", "adamw_8bit", "adafactor"])
def test_optimizers_run_or_fall_back_loudly(quick_config, choice):
    seen = []
    result = train(quick_config.replace(optimizer=choice, steps_per_image=1, model_name=choice),
                   seen.append)
    assert result.steps == 4
    fell_back = [e for e in seen if "instead" in getattr(e, "text", "")]
    if choice == "adamw_8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            assert fell_back, "a missing bitsandbytes must be said"


def test_text_encoder_ema_offset_snr_and_accumulation_all_run(quick_config, tiny_source):
    result = train(quick_config.replace(train_text_encoder=True, text_encoder_steps_ratio=0.5,
                                        use_ema=True, offset_noise=0.05, min_snr_gamma=5.0,
                                        gradient_accumulation_steps=2, hflip=True,
                                        cache_latents=False, gradient_checkpointing=True,
                                        lr_scheduler="cosine", lr_warmup_steps=1))
    assert result.steps == 4 and result.path.exists()
    before, _ = read_checkpoint(tiny_source)
    after, _ = read_checkpoint(result.path)
    te = [k for k in before if k.startswith("cond_stage_model.") and before[k].is_floating_point()]
    assert any(not torch.equal(before[k], after[k]) for k in te), "the text encoder must train"


def test_optional_backends_fall_back_when_forced_to_fail(quick_config, monkeypatch):
    """Both sides of each fallback, forced by argument rather than by uninstalling packages."""
    from dreambooth.training import backends

    def broken(*args, **kwargs):
        raise RuntimeError("cannot run on this device")
    monkeypatch.setitem(backends.OPTIMIZERS, "adamw_8bit", broken)
    monkeypatch.setitem(backends.ATTENTION, "xformers", broken)
    seen = []
    result = train(quick_config.replace(optimizer="adamw_8bit", attention="xformers",
                                        steps_per_image=1), seen.append)
    texts = [getattr(e, "text", "") for e in seen]
    assert any("'adamw_8bit' can't run here" in t and "'adamw' instead" in t for t in texts)
    assert any("'xformers' can't run here" in t and "SDPA instead" in t for t in texts)
    assert result.path.exists()
