"""Training state for exact resume.

A snapshot folder holds everything the next step depends on: trained weights, optimizer, LR
schedule, EMA, every random generator, the epoch's data order and the position in it, and the
config it belongs to. Beside a frozen base (LoRA, textual inversion) it holds only what trains,
and names the base by its source checkpoint's hash: a resume loads the source again. It is
written under a temporary name and renamed, so a kill mid-write leaves the previous snapshot as
the newest complete one. Which snapshot a run goes on from, and whether it can: resume.py.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import torch

from ..config.errors import DreamboothError
from ..config.flux import FLUX_FILES, FLUX_TYPES
from ..config.sd35 import SD35_FILES, SD35_TYPES
from ..model.checkpoint import write_text
from .housekeeping import image_set, image_set_changes, remove_snapshot_folder
from .sourcehash import base_identity
from .lock import ModelLock, pid_start_time  # noqa: F401 (where they were first imported from)

# Settings that change neither the weights nor the order of training: may differ on resume.
FREE_ON_RESUME = {"output_dir", "overwrite", "sample_every_epochs", "save_every_epochs",
                  "state_every_steps", "log_every_steps", "resume", "sample_steps",
                  "guidance_scale", "save_precision", "work_dir", "attention", "lora_dir",
                  "lora_merge", "embedding_dir", "cpu_threads", "deterministic"}
STATE_DIR = "state"
FORMAT = 2  # 2: "files" (their sizes), "base" (the source's hash), "trained_only"
# What a snapshot written before a field existed ran with (compared as if it had been saved).
BEFORE_FIELD = {"lora_targets": "attention", "lora_conv_rank": 8, "lora_conv_alpha": 8.0,
                "pivotal": False, "embedding_token": "", "embedding_init_word": "*",
                "embedding_vectors": 1, "embedding_learning_rate": 5e-3, "fp8_base": False,
                "network": "lora", "loha_rank": 8, "loha_alpha": 4.0, "lokr_factor": 8,
                "lokr_rank": 0, "lokr_alpha": 1.0, "dora_wd": False, "glora_rank": 8,
                "oft_block_size": 32, "oft_constraint": 0.0, "train_norm": False,
                "flux_clip_l": "", "flux_t5xxl": "", "flux_ae": "", "t5_tokenizer_dir": "",
                "sd35_clip_l": "", "sd35_clip_g": "", "sd35_t5xxl": "", "sd35_vae": "",
                "checkpoint_blocks": "all"}


def snapshots(model_dir: Path) -> list[Path]:
    """Complete snapshots of a model (renamed from their temporary name: a trainer.json is in
    them), oldest first, by the step in their name."""
    folder = model_dir / STATE_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step_*")
             if re.fullmatch(r"step_\d+", p.name) and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def config_differences(saved: dict, current: dict) -> list[str]:
    saved = {**BEFORE_FIELD, "method": "lora" if saved.get("use_lora") else "dreambooth",
             **saved}  # before `method`, use_lora said it
    keys = sorted((set(saved) | set(current)) - FREE_ON_RESUME - unread_fields(
        saved.get("model_type"), current.get("model_type")))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


def unread_fields(*model_types) -> set[str]:
    """The part-file fields no run of these model types reads (the tab fills Flux's and
    SD3.5's from the host's list for every new model: a new file there must not block the
    resume of an SD run)."""
    unread = set()
    if not any(t in FLUX_TYPES for t in model_types):
        unread |= set(FLUX_FILES)
    if not any(t in SD35_TYPES for t in model_types):
        unread |= set(SD35_FILES)
    if len(unread) == len(FLUX_FILES) + len(SD35_FILES):
        unread.add("t5_tokenizer_dir")
    return unread


def trained_ids(trainer) -> set[int]:
    """The weights the optimizer updates (accelerate's wrapper and Bucketed show its groups)."""
    return {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}


def frozen_base(cfg) -> bool:
    """LoRA and textual inversion train beside a base that does not change: their snapshots
    hold what trains and name the base; a full fine-tune's hold its whole models."""
    return cfg.method != "dreambooth"


def weights_to_keep(trainer, model, trained: set[int] | None) -> dict:
    """The weights of `model` a snapshot holds: all of its state (trained None), or the
    trained parameters alone (references, not copies)."""
    model = trainer.acc.unwrap_model(model)
    if trained is None:
        return model.state_dict()
    return {k: p for k, p in model.named_parameters() if id(p) in trained}


def write_tensors(path: Path, tensors: dict) -> int:
    """A .safetensors file written tensor by tensor (model.streamed: never a second copy of the
    whole state, as safetensors' save_file builds). Returns its size."""
    from ..model.streamed import write_streamed
    with open(path, "wb") as f:
        write_streamed(f, tensors, {"format": "pt"})
        return f.tell()


def ema_to_keep(trainer, trained: set[int] | None) -> dict | None:
    """The EMA's state; beside a frozen base, the averages of the trained weights alone (the
    others are copies of the base, made again on resume)."""
    if trainer.ema is None:
        return None
    state = trainer.ema.state_dict()
    if trained is None:
        return state
    keep = [i for i, p in enumerate(trainer.ema_params) if id(p) in trained]
    return {**state, "shadow_params": [state["shadow_params"][i] for i in keep],
            "shadow_index": keep}


def save_snapshot(trainer, step: int, epoch: int, batch: int, order: list[int]) -> Path:
    """Write the trainer's state after `step` updates (epoch/batch: where to go on). Beside a
    frozen base (LoRA, textual inversion) only what trains is written, and the base is named by
    its source's hash (checked on resume)."""
    final = trainer.cfg.model_dir / STATE_DIR / f"step_{step:08d}"
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    remove_snapshot_folder(tmp)
    tmp.mkdir(parents=True)
    trained = trained_ids(trainer) if frozen_base(trainer.cfg) else None
    files = {}
    for i, model in enumerate(trainer.models):
        name = f"model_{i}.safetensors"
        files[name] = write_tensors(tmp / name, weights_to_keep(trainer, model, trained))
    rng_state = {"python": trainer.rng.getstate(), "generator": trainer.gen.get_state(),
                 "torch": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({"optimizer": trainer.optimizer.state_dict(),
                "lr_scheduler": trainer.lr_scheduler.state_dict(),
                "ema": ema_to_keep(trainer, trained), "rng": rng_state}, tmp / "training.pt")
    files["training.pt"] = (tmp / "training.pt").stat().st_size
    info = {"format": FORMAT, "step": step, "epoch": epoch, "batch": batch, "order": order,
            "class_cursor": trainer.feed.class_cursor, "accelerator_step": trainer.acc.step,
            "total_steps": trainer.total_steps, "revision": trainer.revision,
            "config": trainer.cfg.to_dict(), "machine": trainer.machine,
            "images": image_set(trainer.feed.items), "trained_only": trained is not None,
            "base": base_identity(trainer, trained is not None), "files": files}
    write_text(tmp / "trainer.json", json.dumps(info))
    remove_snapshot_folder(final)
    os.replace(tmp, final)
    return final


def read_info(folder: Path) -> dict:
    """A snapshot's trainer.json (OSError / ValueError when it can't be read as one)."""
    info = json.loads((folder / "trainer.json").read_text(encoding="utf-8"))
    if not isinstance(info, dict) or not isinstance(info.get("step"), int) \
            or not isinstance(info.get("config"), dict):
        raise ValueError("not a training state")
    return info


def snapshot_info(folder: Path) -> dict:
    try:
        return read_info(folder)
    except (OSError, ValueError, RecursionError) as e:
        raise unreadable_snapshot(folder, e) from None


def unreadable_snapshot(folder: Path, e: BaseException) -> DreamboothError:
    return DreamboothError(f"The saved training state '{folder}' can't be read "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:200]}).",
                           "It is damaged or not from this extension: delete that folder, or "
                           "set resume to 'never' to start over.")


def read_training(folder: Path) -> dict:
    """training.pt: optimizer, LR schedule, EMA and generators."""
    data = torch.load(str(folder / "training.pt"), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not {"optimizer", "lr_scheduler", "rng"} <= set(data):
        raise ValueError("it is not a training state")
    return data


def load_snapshot(trainer, folder: Path, info: dict, data: dict) -> dict:
    """Restore the trainer from a checked snapshot (info: its trainer.json, data: its
    training.pt); returns its position (step, epoch, batch, order)."""
    from safetensors.torch import load_file
    trainer.optimizer.load_state_dict(data["optimizer"])  # refuses a mismatch before changing
    converted = converted_states(trainer.optimizer)
    if converted:
        trainer.warn(f"The saved Adafactor state of {converted} weights is transformers' (from "
                     "before conv weights were factored as matrices) and was converted: the "
                     "run goes on, close to, not bit-identical with, an uninterrupted run.")
    trainer.lr_scheduler.load_state_dict(data["lr_scheduler"])
    for i, model in enumerate(trainer.models):
        trainer.acc.unwrap_model(model).load_state_dict(
            load_file(str(folder / f"model_{i}.safetensors")),
            strict=not info.get("trained_only", False))
    if trainer.ema is not None and data["ema"] is not None:
        restore_ema(trainer.ema, data["ema"])
    rng = data["rng"]
    trainer.rng.setstate(_as_tuple(rng["python"]))
    restore_generator(trainer.gen, rng["generator"], info["step"])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    trainer.feed.class_cursor = info["class_cursor"]
    trainer.acc.step = info["accelerator_step"]
    changed = machine_differences(info.get("machine", {}), trainer.machine)
    if changed:
        trainer.warn(f"This run began with {changed[0]} and resumes with {changed[1]}: it goes "
                     "on, but its result will be close to, not bit-identical with, an "
                     "uninterrupted run's.")
    return info


def restore_ema(ema, state: dict) -> None:
    """The EMA as saved, where its averages are (a frozen base's: those of the trained weights,
    the rest kept as made from the base)."""
    device = ema.shadow_params[0].device if ema.shadow_params else "cpu"
    if "shadow_index" in state:
        shadow = list(ema.shadow_params)
        for i, t in zip(state["shadow_index"], state["shadow_params"]):
            shadow[i] = t
        state = {k: v for k, v in state.items() if k != "shadow_index"}
        state["shadow_params"] = shadow
    ema.load_state_dict(state)
    ema.to(device)


def converted_states(optimizer) -> int:
    """How many weights' optimizer states were converted from another layout when loaded
    (Adafactor's `converted`), through accelerate's wrapper and Bucketed's buckets."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    inner = [b.inner for b in getattr(optimizer, "buckets", ())] or [optimizer]
    return sum(getattr(o, "converted", 0) for o in inner)


def machine_differences(then: dict, now: dict) -> tuple[str, str] | None:
    """(what the run began on, what it resumes on), in words, where that breaks bit-identity:
    another device, CPU thread count or determinism; None when they match (or are unknown)."""
    keys = [k for k in ("device", "cpu_threads", "deterministic") if k in then and k in now
            and then[k] != now[k]]
    if not keys:
        return None

    def words(m: dict) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {m[k]}" for k in keys)
    return words(then), words(now)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def clear_snapshots(model_dir: Path) -> None:
    """Delete the model's snapshots, by name: nothing else in state/ is touched."""
    end_snapshots(model_dir, keep=False)


def end_snapshots(model_dir: Path, keep: bool) -> None:
    """At the end of a run: delete the partial snapshots (step_N.tmpPID, left by a process
    killed mid-write) and, unless `keep`, the complete ones; by name only: nothing else in
    state/ is touched, and state/ goes when nothing is left in it."""
    folder = model_dir / STATE_DIR
    if not folder.is_dir():
        return
    pattern = r"step_\d+\.tmp\d+" if keep else r"step_\d+(\.tmp\d+)?"
    for p in folder.iterdir():
        if p.is_dir() and re.fullmatch(pattern, p.name):
            remove_snapshot_folder(p)
    try:
        folder.rmdir()
    except OSError:  # a snapshot kept, or something we did not write
        pass


def refuse_changed_images(folder: Path, info: dict, items) -> None:
    """A snapshot belongs to the images it was taken on: added, removed or edited images since
    then are refused (the step count, the order and the caches would not continue the run)."""
    if "images" not in info:  # a snapshot of an older version
        return
    changes = image_set_changes(info["images"], image_set(items))
    if changes:
        raise DreamboothError(
            f"The instance images changed since the saved training state '{folder}' was "
            f"taken: {changes}; resuming would not continue the same run.",
            "Put the images back as they were to resume, or set resume to 'never' to start "
            "over with the new images.")


def fresh_rng(seed: int, device="cpu") -> tuple[random.Random, torch.Generator]:
    """The host's generator (data order, flips) and the training device's (latent samples,
    noise, timesteps: drawn where they are used, so a step never copies them over)."""
    return random.Random(seed), torch.Generator(device=device).manual_seed(seed)


def restore_generator(gen: torch.Generator, state: torch.Tensor, step: int) -> None:
    """The device generator as saved; a state from another kind of device (a snapshot taken on
    the CPU resumed on a GPU, or one from before the generator moved to the device) can't be
    set: it is reseeded from the step, and the resume is close, not bit-identical (the machine
    difference is said)."""
    try:
        gen.set_state(state)
    except RuntimeError:
        gen.manual_seed(int.from_bytes(state[:8].numpy().tobytes(), "little") ^ step)
