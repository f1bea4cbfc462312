"""Training state for exact resume, and the one-run-per-model lock.

A snapshot folder holds everything the next step depends on: trained weights, optimizer, LR
schedule, EMA, every random generator, the epoch's data order and the position in it, and the
config it belongs to. It is written under a temporary name and renamed, so a kill mid-write
leaves the previous snapshot as the newest complete one.
"""
from __future__ import annotations

import json
import os
import random
import re
import socket
from pathlib import Path

import torch

from ..config.errors import DreamboothError
from ..config.folders import claim_model_dir
from ..model.checkpoint import write_text
from .housekeeping import image_set, image_set_changes, remove_snapshot_folder

# Settings that change neither the weights nor the order of training: may differ on resume.
FREE_ON_RESUME = {"output_dir", "overwrite", "sample_every_epochs", "save_every_epochs",
                  "state_every_steps", "log_every_steps", "resume", "sample_steps",
                  "guidance_scale", "save_precision", "work_dir", "attention", "lora_dir",
                  "lora_merge", "embedding_dir", "cpu_threads", "deterministic"}
STATE_DIR = "state"
# What a snapshot written before a field existed ran with (compared as if it had been saved).
BEFORE_FIELD = {"lora_targets": "attention", "lora_conv_rank": 8, "lora_conv_alpha": 8.0,
                "pivotal": False, "embedding_token": "", "embedding_init_word": "*",
                "embedding_vectors": 1, "embedding_learning_rate": 5e-3, "fp8_base": False}


def snapshots(model_dir: Path) -> list[Path]:
    """Complete snapshots of a model, oldest first."""
    folder = model_dir / STATE_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step_*")
             if ".tmp" not in p.name and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: snapshot_info(p)["step"])


def config_differences(saved: dict, current: dict) -> list[str]:
    saved = {**BEFORE_FIELD, "method": "lora" if saved.get("use_lora") else "dreambooth",
             **saved}  # before `method`, use_lora said it
    keys = sorted((set(saved) | set(current)) - FREE_ON_RESUME)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


def save_snapshot(trainer, step: int, epoch: int, batch: int, order: list[int]) -> Path:
    """Write the trainer's full state after `step` updates (epoch/batch: where to go on)."""
    from safetensors.torch import save_file
    final = trainer.cfg.model_dir / STATE_DIR / f"step_{step:08d}"
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    remove_snapshot_folder(tmp)
    tmp.mkdir(parents=True)
    for i, model in enumerate(trainer.models):
        state = {k: v.detach().contiguous() for k, v in
                 trainer.acc.unwrap_model(model).state_dict().items()}
        save_file(state, str(tmp / f"model_{i}.safetensors"))
    rng_state = {"python": trainer.rng.getstate(), "generator": trainer.gen.get_state(),
                 "torch": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({"optimizer": trainer.optimizer.state_dict(),
                "lr_scheduler": trainer.lr_scheduler.state_dict(),
                "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
                "rng": rng_state}, tmp / "training.pt")
    info = {"step": step, "epoch": epoch, "batch": batch, "order": order,
            "class_cursor": trainer.feed.class_cursor, "accelerator_step": trainer.acc.step,
            "total_steps": trainer.total_steps, "revision": trainer.revision,
            "config": trainer.cfg.to_dict(), "machine": trainer.machine,
            "images": image_set(trainer.feed.items)}
    write_text(tmp / "trainer.json", json.dumps(info))
    remove_snapshot_folder(final)
    os.replace(tmp, final)
    return final


def snapshot_info(folder: Path) -> dict:
    try:
        info = json.loads((folder / "trainer.json").read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("step"), int) \
                or not isinstance(info.get("config"), dict):
            raise ValueError("not a training state")
    except (OSError, ValueError, RecursionError) as e:
        raise unreadable_snapshot(folder, e) from None
    return info


def unreadable_snapshot(folder: Path, e: BaseException) -> DreamboothError:
    return DreamboothError(f"The saved training state '{folder}' can't be read "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:200]}).",
                           "It is damaged or not from this extension: delete that folder, or "
                           "set resume to 'never' to start over.")


def load_snapshot(trainer, folder: Path) -> dict:
    """Restore the trainer from a snapshot; returns its position (step, epoch, batch, order)."""
    from safetensors.torch import load_file
    info = snapshot_info(folder)
    diffs = config_differences(info["config"], trainer.cfg.to_dict())
    if diffs:
        raise DreamboothError(
            f"The saved training state in '{folder}' belongs to a different configuration; "
            "resuming would not continue the same run. Changed: " + "; ".join(diffs) + ".",
            "Undo these changes to resume, or set resume to 'never' to start over.")
    refuse_changed_images(folder, info, trainer.feed.items)
    for i, model in enumerate(trainer.models):
        trainer.acc.unwrap_model(model).load_state_dict(
            load_file(str(folder / f"model_{i}.safetensors")))
    data = torch.load(str(folder / "training.pt"), map_location="cpu", weights_only=True)
    trainer.optimizer.load_state_dict(data["optimizer"])
    converted = converted_states(trainer.optimizer)
    if converted:
        trainer.warn(f"The saved Adafactor state of {converted} weights is transformers' (from "
                     "before conv weights were factored as matrices) and was converted: the "
                     "run goes on, close to, not bit-identical with, an uninterrupted run.")
    trainer.lr_scheduler.load_state_dict(data["lr_scheduler"])
    if trainer.ema is not None and data["ema"] is not None:
        trainer.ema.load_state_dict(data["ema"])
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


def restore_snapshot(trainer, folder: Path) -> dict:
    """load_snapshot, with a truncated or foreign file said as such."""
    try:
        return load_snapshot(trainer, folder)
    except DreamboothError:
        raise
    except Exception as e:  # truncated or foreign files fail in many ways
        raise unreadable_snapshot(folder, e) from None


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def choose_snapshot(cfg, model_dir: Path) -> Path | None:
    """The snapshot `cfg.resume` names: 'auto' the newest, 'never' none, else a folder."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        found = snapshots(model_dir)
        return found[-1] if found else None
    folder = Path(cfg.resume)
    if not (folder / "trainer.json").is_file():
        raise DreamboothError(f"'{folder}' is not a saved training state.",
                              f"Choose one of the step_* folders in '{model_dir / STATE_DIR}'.")
    return folder


def clear_snapshots(model_dir: Path) -> None:
    """Delete the model's snapshots, by name: nothing else in state/ is touched."""
    folder = model_dir / STATE_DIR
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_dir() and re.fullmatch(r"step_\d+(\.tmp\d+)?", p.name):
            remove_snapshot_folder(p)
    try:
        folder.rmdir()
    except OSError:  # something we did not write is in it: it stays
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


class ModelLock:
    """One training run per model folder. A lock left by a killed process is detected and cleared."""

    def __init__(self, model_dir: Path, say) -> None:
        self.path, self.say, self.held = model_dir / ".train.lock", say, False

    def __enter__(self) -> "ModelLock":
        claim_model_dir(self.path.parent)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_clear()
                continue
            except OSError as e:
                raise DreamboothError(f"Can't create the training lock '{self.path}' "
                                      f"({e.strerror or e}).", "Check that the work folder is "
                                      "writable and has free space.") from None
            self.held = True
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": pid_start_time(os.getpid())}, fh)
            return self
        raise DreamboothError(f"Could not take the training lock '{self.path}'.",
                              "Delete that file if no training of this model is running.")

    def _refuse_or_clear(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            owner = {}
        if not isinstance(owner, dict):
            owner = {}
        pid, host, started = owner.get("pid"), owner.get("host"), owner.get("started")
        same = host == socket.gethostname() and isinstance(pid, int) and _alive(pid)
        if same and started is not None and pid_start_time(pid) not in (None, started):
            same = False  # the PID now belongs to another process: the lock's owner is gone
        if same:
            raise DreamboothError(
                f"The model '{self.path.parent.name}' is already being trained (process {pid}, "
                f"lock file '{self.path}').",
                "Wait for that run to end or cancel it; two runs would overwrite each other. "
                "If no run of this model is going on, delete the lock file.")
        if host not in (None, socket.gethostname()):
            raise DreamboothError(
                f"The model '{self.path.parent.name}' is locked by a run on '{host}' (lock file "
                f"'{self.path}').", f"If no run is going on there, delete '{self.path}'.")
        self.say(f"Cleared a stale training lock '{self.path}' left by process {pid}, which is "
                 "no longer running.")
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> bool:
        if self.held:
            self.path.unlink(missing_ok=True)
        return False


def pid_start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc; None where unknown): a
    lock whose PID was reused by another process is told apart by it."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) holds no lock
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
