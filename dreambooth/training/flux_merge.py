"""lora_merge for Flux.1: the source transformer in BFL's layout with the saved LoRA folded in, as
Forge applies the file (dfdcbab6, packages_3rdparty/comfyui_lora_collection/lora.py: each stem
`lora_unet_<module path with '_' for '.'>` adds up @ down x alpha / rank to that module's
weight), into the checkpoints folder: the transformer alone, the file Forge loads from
models/Stable-diffusion with its VAE and text encoders chosen beside it.

Streamed at both ends: the source is read one tensor at a time (checkpoint.LazyState) and the
file written one tensor at a time (streamed.write_streamed), each weight merged in fp32 as its
turn comes, so the host holds about one weight and its update beside the training run, not a
second 12B transformer (a pickled source, .ckpt / .pt, is read whole: use the .safetensors).
Where the source has the all-in-one prefix (`model.diffusion_model.`), its transformer's keys
are written without it and its other parts (text encoders, VAE) left out.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config.errors import DreamboothError
from ..model import flux_keys
from ..model.checkpoint import SAVE_DTYPES, tensor_dtype, tensor_shape
from ..model.detect import FLUX_MARK, FLUX_PREFIX
from ..model.flux import opened
from ..model.metadata import model_metadata
from ..model.streamed import Deferred
from .flux_lora import meta_transformer


def stem_of(key: str) -> str:
    """The kohya stem Forge's key map gives the weight `key` (BFL's layout, no prefix)."""
    return "lora_unet_" + key[:-len(".weight")].replace(".", "_")


def merged_transformer(source: str, lora: dict, dtype: torch.dtype) -> dict:
    """BFL key -> the source transformer's tensor (a Deferred, made when written), the LoRA
    `lora` (kohya's Flux layout, as saved) folded into the weights it names, floating tensors
    in `dtype`."""
    state = opened(source, "Flux transformer")
    prefix = FLUX_PREFIX if FLUX_PREFIX + FLUX_MARK in state else ""
    keys = {k[len(prefix):]: k for k in state if k.startswith(prefix)}
    stems = {k.split(".")[0] for k in lora}
    used = {stem_of(k) for k in keys if k.endswith(".weight")} & stems
    if used != stems:
        left = sorted(stems - used)
        raise DreamboothError(f"The LoRA names {len(left)} module(s) the source transformer "
                              f"lacks (e.g. {left[0]}); no merged file was written.",
                              "Merge into the transformer the LoRA was trained on.")
    out = {}
    for key, name in keys.items():
        have = tensor_dtype(state, name)
        want = dtype if have.is_floating_point else have
        stem = stem_of(key) if key.endswith(".weight") else None
        make = (lambda name=name, stem=stem, want=want: _merged(state[name], lora, stem, want)) \
            if stem in stems else (lambda name=name, want=want: state[name].to(want))
        out[key] = Deferred(tensor_shape(state, name), want, make)
    return out


def _merged(weight: torch.Tensor, lora: dict, stem: str, dtype: torch.dtype) -> torch.Tensor:
    down = lora[f"{stem}.lora_down.weight"].float()
    up = lora[f"{stem}.lora_up.weight"].float()
    alpha = float(lora[f"{stem}.alpha"]) if f"{stem}.alpha" in lora else down.shape[0]
    merged = weight.float()
    merged.addmm_(up, down, alpha=alpha / down.shape[0])
    return merged.to(dtype)


def bfl_layout(config: dict) -> dict:
    """Key -> shape a Flux transformer file of `config` holds in BFL's layout (from the model
    built on the meta device, not from the source)."""
    model = meta_transformer(config)
    bfl = flux_keys.to_bfl(model.state_dict(), config["num_layers"],
                           config["num_single_layers"], bool(config.get("guidance_embeds")))
    return {k: tuple(v.shape) for k, v in bfl.items()}


def save_merged_flux(comp, cfg, lora_path: Path, path: Path, metadata: dict) -> Path:
    """Write `path`: the source transformer of `cfg` with the LoRA file `lora_path` merged in,
    in save_precision, checked against the BFL layout of the model's config."""
    from safetensors.torch import load_file
    from ..model.filecheck import write_verified
    dtype = SAVE_DTYPES[cfg.save_precision]
    state = merged_transformer(cfg.source_checkpoint, load_file(str(lora_path)), dtype)
    meta = model_metadata(comp.spec, Path(path).stem, metadata)
    return write_verified(path, state, meta, bfl_layout(comp.configs["unet"]),
                          overwrite=cfg.overwrite, dtype=dtype, what="merged Flux transformer")
