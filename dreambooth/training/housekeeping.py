"""What a run checks and tidies around its files: the temp files a killed run left (removed by
name on the next start of the same model), the free space the run's saves need (refused before
training, not after it), the identity of the image set a snapshot was taken on."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from ..config.errors import DreamboothError
from ..model.checkpoint import SAVE_DTYPES

MB = 2**20
# mkstemp beside a final name: ".<final name>.<8 random characters>.tmp"
_TMP = re.compile(r"\.(?P<final>.+)\.[A-Za-z0-9_]{8}\.tmp")
_SNAPSHOT_TMP = re.compile(r"step_\d+\.tmp\d+")
_SNAPSHOT_FILES = re.compile(r"trainer\.json|training\.pt|model_\d+\.safetensors")


def remove_snapshot_folder(folder: Path) -> None:
    """Delete a snapshot folder's files by name, then the folder if nothing else is in it."""
    if not folder.is_dir():
        return
    for f in folder.iterdir():
        if f.is_file() and (_SNAPSHOT_FILES.fullmatch(f.name) or _TMP.fullmatch(f.name)):
            f.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # something we did not write is in it: it stays
        pass


def _ours_in_shared(name: str, model_name: str) -> bool:
    """A temp file in a folder other models share (outputs, LoRAs, class images) is ours when
    it was to become one of this model's outputs, or a class image."""
    m = _TMP.fullmatch(name)
    if not m:
        return False
    final = m.group("final")
    return final.startswith(model_name + "_") and re.fullmatch(
        re.escape(model_name) + r"_\d+(\.[a-z]+)+", final) is not None \
        or re.fullmatch(r"class_\d+\.png", final) is not None


def remove_leftovers(cfg, say) -> list[Path]:
    """Remove the temp files of an interrupted run of this model (called under its lock)."""
    removed = []
    if cfg.model_dir.is_dir():
        removed += [p for p in cfg.model_dir.rglob(".*.tmp") if p.is_file()
                    and _TMP.fullmatch(p.name)]
        state = cfg.model_dir / "state"
        folders = [p for p in state.iterdir() if p.is_dir() and _SNAPSHOT_TMP.fullmatch(p.name)] \
            if state.is_dir() else []
    else:
        folders = []
    shared = {cfg.resolved_output_dir, cfg.resolved_lora_dir,
              *(Path(c.class_data_dir) for c in cfg.concepts if c.class_data_dir)}
    for folder in shared:
        if folder.is_dir():
            removed += [p for p in folder.iterdir() if p.is_file()
                        and _ours_in_shared(p.name, cfg.model_name)]
    for p in dict.fromkeys(removed):
        p.unlink(missing_ok=True)
    for folder in folders:
        remove_snapshot_folder(folder)
    if removed or folders:
        say(f"Removed {len(removed) + len(folders)} temporary file(s) left by an interrupted run "
            "of this model.")
    return removed + folders


# -- free space ---------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _bytes(modules, dtype: torch.dtype | None) -> int:
    total = 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            size = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
            total += t.numel() * size
    return total


def checkpoint_bytes(comp, precision: str) -> int:
    """A full checkpoint's size (Flux's merged file: the transformer alone, flux_merge)."""
    if comp.spec.family == "flux":
        return _bytes([comp.unet], SAVE_DTYPES[precision])
    return _bytes([comp.unet, comp.vae, *comp.text_encoders], SAVE_DTYPES[precision]) + \
        sum(t.numel() * t.element_size() for t in comp.extra.values())


def trained_bytes(comp, precision: str) -> int:
    """A LoRA's (any network's, with train_norm's norms) or an embedding's file beside a frozen
    base: the tensors that train, in the save precision (once the run's layers are added)."""
    size = SAVE_DTYPES[precision].itemsize
    return sum(p.numel() * size for m in (comp.unet, *comp.text_encoders)
               for p in m.parameters() if p.requires_grad)


def _small_dir(cfg) -> Path:  # (pivotal tuning's embedding counted with its LoRA)
    return cfg.resolved_lora_dir if cfg.use_lora else cfg.resolved_embedding_dir


def space_needed(cfg, comp, saves: int) -> dict[Path, int]:
    """Bytes the run will write, per existing folder it writes under."""
    need: dict[Path, int] = {}

    def add(folder: Path, size: int) -> None:
        key = _nearest_existing(folder)
        need[key] = need.get(key, 0) + size
    full = checkpoint_bytes(comp, cfg.save_precision)
    if not cfg.use_lora:
        add(cfg.resolved_output_dir, saves * full)
        add(cfg.model_dir, _bytes([comp.unet, comp.vae, *comp.text_encoders], None))
    elif cfg.lora_merge:
        add(cfg.resolved_output_dir, saves * full)
    if cfg.use_lora or cfg.method == "textual_inversion":
        add(_small_dir(cfg), saves * trained_bytes(comp, cfg.save_precision))
    if cfg.state_every_steps:  # trained weights and two optimizer moments, in fp32
        trained = [comp.unet, *(comp.text_encoders if cfg.train_text_encoder else ())]
        # beside a frozen base (LoRA, textual inversion) a snapshot holds what trains: small
        add(cfg.model_dir, 0 if cfg.method != "dreambooth" else 3 * _bytes(trained, torch.float32))
    return need


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def short_of_space(need: dict[Path, int]) -> tuple[Path, int, int] | None:
    """(folder, bytes needed on its disk, bytes free) of the first disk `need` does not fit on
    (folders on one disk add up); None when all fit."""
    by_device: dict[int, tuple[Path, int]] = {}
    for folder, size in need.items():
        try:
            dev = folder.stat().st_dev
        except OSError:
            continue
        seen = by_device.get(dev, (folder, 0))
        by_device[dev] = (seen[0], seen[1] + size)
    for folder, size in by_device.values():
        free = free_bytes(folder)
        if size > free:
            return folder, size, free
    return None


def refuse_no_space(cfg, comp, saves: int) -> None:
    """Refuse before training when a folder the run writes to has too little free space."""
    need = space_needed(cfg, comp, saves)
    for folder in need:
        if not os.access(folder, os.W_OK):
            raise DreamboothError(f"The folder '{folder}' can't be written (a read-only file "
                                  "system, or no permission); this run saves there.",
                                  "Choose a folder you can write to, or make it writable.")
    short = short_of_space(need)
    if short:
        folder, size, free = short
        raise DreamboothError(
            f"Not enough free space in '{folder}': this run writes about {size / MB:.1f} MB "
            f"there (checkpoints, working model, training state) and {free / MB:.1f} MB are "
            "free.", "Free some space, choose another output_dir or work_dir, save less often "
            "(save_every_epochs) or turn state_every_steps to 0.")


def save_bytes(cfg, comp, final: bool) -> dict[Path, int]:
    """Bytes one save writes, per existing folder: the checkpoint (or the LoRA and its merge,
    or the embedding) and, at the end of a full fine-tune, the working model."""
    need: dict[Path, int] = {}

    def add(folder: Path, size: int) -> None:
        key = _nearest_existing(folder)
        need[key] = need.get(key, 0) + size
    if not cfg.use_lora and cfg.method != "textual_inversion":
        add(cfg.resolved_output_dir, checkpoint_bytes(comp, cfg.save_precision))
        if final:
            add(cfg.model_dir, _bytes([comp.unet, comp.vae, *comp.text_encoders], None))
        return need
    add(_small_dir(cfg), trained_bytes(comp, cfg.save_precision))
    if cfg.use_lora and cfg.lora_merge:
        add(cfg.resolved_output_dir, checkpoint_bytes(comp, cfg.save_precision))
    return need


def refuse_save_without_space(cfg, comp, path: Path, step: int, final: bool) -> None:
    """Before a save writes anything: refused, naming the folder, when its disk lacks the room."""
    short = short_of_space(save_bytes(cfg, comp, final))
    if short:
        folder, size, free = short
        raise DreamboothError(
            f"Not enough free space in '{folder}' to save step {step} ('{path.name}'): it writes "
            f"about {size / MB:.1f} MB there and {free / MB:.1f} MB are free; nothing was "
            "written.",
            "Free some space there; the checkpoints and training states saved before are kept.")


def no_room_for_extra_save(cfg, comp, step: int, pending: int) -> str:
    """Why a save the plan did not count (Save now) at `step` is refused: it would not leave room
    for the `pending` saves still to come and the rest of the run's files ('' when it fits)."""
    need = space_needed(cfg, comp, pending)
    for folder, size in save_bytes(cfg, comp, final=False).items():
        need[folder] = need.get(folder, 0) + size
    short = short_of_space(need)
    if not short:
        return ""
    folder, size, free = short
    return (f"Not saved now (step {step}): '{folder}' has {free / MB:.1f} MB free, and this save "
            f"with what the run still writes there ({pending} planned save(s), the working "
            f"model and training state) needs about {size / MB:.1f} MB; the final save keeps "
            "its room. Free some space and ask again: the run goes on.")


# -- the image set a snapshot belongs to -------------------------------------------------------
def image_set(items) -> list[list]:
    """[name, size, mtime in ns] of every instance image, in order: part of a snapshot's
    identity, so a run never resumes on images that changed."""
    out = []
    for it in items:
        try:
            st = Path(it.path).stat()
            out.append([str(it.path), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(it.path), None, None])
    return out


def image_set_changes(saved: list, now: list) -> str:
    """'' when the same images, else a short account of what changed."""
    before, after = {r[0]: r[1:] for r in saved}, {r[0]: r[1:] for r in now}
    added = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    parts = [f"{what} {len(names)} ({', '.join(Path(n).name for n in names[:3])}"
             f"{', ...' if len(names) > 3 else ''})"
             for what, names in (("added", added), ("removed", gone), ("changed", changed))
             if names]
    return "; ".join(parts)


def snapshot_failed(cfg, models, optimizer, step: int, e: Exception) -> DreamboothError:
    """A snapshot could not be written: its temp folder is gone, the earlier ones stay; the
    message says how much space a snapshot needs."""
    folder = cfg.model_dir / "state"
    remove_leftovers(cfg, lambda text: None)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    need = sum(p.numel() * p.element_size() for m in models for p in m.parameters()
               if cfg.method == "dreambooth" or id(p) in trained)  # beside a frozen base
    need += sum(t.numel() * t.element_size() for st in optimizer.state_dict()["state"].values()
                for t in st.values() if isinstance(t, torch.Tensor))
    free = free_bytes(_nearest_existing(folder))
    return DreamboothError(
        f"Saving the training state at step {step} into '{folder}' failed "
        f"({' '.join(str(e).split())[:200]}): it needs about {need / MB:.1f} MB and "
        f"{free / MB:.1f} MB are free; the earlier states and checkpoints are kept.",
        "Free some space or make the folder writable, or set state_every_steps to 0.")


def refuse_idle_accumulation(accumulation: int, batches: int) -> None:
    """More batches to accumulate than the run has would end with no update and no file."""
    if accumulation > batches:
        raise DreamboothError(
            f"gradient_accumulation_steps = {accumulation} is more than the {batches} batches of "
            "this whole run, so not one update would be made.",
            f"Use gradient_accumulation_steps {batches} or less, or raise steps_per_image or "
            "add images.")
