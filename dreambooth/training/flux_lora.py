"""A Flux.1 or SD3.5 LoRA: which Linear layers of diffusers' FluxTransformer2DModel /
SD3Transformer2DModel it adapts, and its file in kohya's Flux / SD3 layout (what Forge, ComfyUI
and, for Flux, diffusers' kohya reader load).

Targets (`lora_targets`): 'attention': the double blocks' attention (to_q/k/v, to_out.0 and the
text stream's add_q/k/v_proj, to_add_out) and the single blocks' linear1 and linear2, where
attention and MLP are one layer (to_q/k/v with proj_mlp; proj_out); 'transformer': also the
double blocks' MLPs (ff, ff_context). The modulations and the embedders are left out. SD3.5's
joint blocks are Flux's double blocks in these names (and medium's second attention, attn2,
is attention); it has no single blocks.

kohya's file names BFL's (SAI's) modules, some of which stack several diffusers modules along their
output rows (img_attn.qkv, SD3's attn.qkv = to_q, to_k, to_v; a single block's linear1 = to_q, to_k,
to_v, proj_mlp). Each part trains its own LoRA of rank r; the stacked module's file entry is their
exact sum: down = the parts' downs stacked [k r, in], up = their ups block-diagonal [out, k r],
alpha = k x alpha, so the host's up @ down x alpha / rank is each part's own update, unchanged.
"""
from __future__ import annotations

import re

import torch

from ..config.errors import DreamboothError
from ..model import flux_keys, sd35_keys

DOUBLE_ATTENTION = r"transformer_blocks\.\d+\.attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)"
DUAL = r"transformer_blocks\.\d+\.attn2\.(to_[qkv]|to_out\.0)"  # SD3.5 medium's MMDiT-X
DOUBLE_MLP = r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
SINGLE = r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out)"
PATTERNS = {"attention": (DOUBLE_ATTENTION, DUAL, SINGLE),
            "transformer": (DOUBLE_ATTENTION, DUAL, DOUBLE_MLP, SINGLE)}


def is_flux(module) -> bool:
    return hasattr(module, "single_transformer_blocks") and hasattr(module, "x_embedder")


def is_sd3(module) -> bool:
    return hasattr(module, "transformer_blocks") and hasattr(module, "pos_embed") and \
        hasattr(module, "context_embedder") and not hasattr(module, "single_transformer_blocks")


def target_paths(module, targets: str) -> list[str]:
    """The Linear layers `targets` adapts in a plain Flux or SD3 transformer."""
    wanted = re.compile("^(" + "|".join(PATTERNS[targets]) + ")$")
    return [path for path, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and wanted.match(path)]


def _names(config: dict) -> dict:
    if "num_single_layers" not in config:  # SD3.5
        return sd35_keys.lora_names(config["num_layers"],
                                    tuple(config.get("dual_attention_layers") or ()))
    return flux_keys.lora_names(config["num_layers"], config["num_single_layers"])


def meta_transformer(config: dict):
    """The plain transformer of `config` on the meta device."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    cls = FluxTransformer2DModel if "num_single_layers" in config else SD3Transformer2DModel
    with torch.device("meta"):
        return cls.from_config(config)


def kohya_state(comp, cfg, pairs: dict) -> dict:
    """The file's tensors from the transformer's LoRA layers: module path -> (down, up), as
    lora.lora_pairs reads them from its peft state."""
    names, stems = _names(comp.configs["unet"]), {}
    for path, (down, up) in pairs.items():
        stem, part, parts = names[path]
        stems.setdefault(stem, [None] * parts)[part] = (down, up)
    out = {}
    for stem, parts in stems.items():
        if any(p is None for p in parts):
            raise DreamboothError(f"The LoRA adapts only some of the layers stacked in {stem}; "
                                  "kohya's layout can't hold that.", "This is a bug; "
                                  "please report it with the log.")
        out[f"{stem}.lora_down.weight"] = torch.cat([d for d, _ in parts]) \
            if len(parts) > 1 else parts[0][0]
        out[f"{stem}.lora_up.weight"] = torch.block_diag(*[u for _, u in parts]) \
            if len(parts) > 1 else parts[0][1]
        out[f"{stem}.alpha"] = torch.tensor(float(cfg.lora_alpha * len(parts)))
    return out


def expected_layout(comp, cfg) -> dict:
    """Key -> shape the file must hold, from the plain transformer built on the meta device."""
    meta = meta_transformer(comp.configs["unet"])
    found, names, rank = dict(meta.named_modules()), _names(comp.configs["unet"]), cfg.lora_rank
    rows: dict = {}
    for path in target_paths(meta, cfg.lora_targets):
        stem, part, parts = names[path]
        rows.setdefault(stem, [0, parts, found[path].weight.shape[1]])[0] += \
            found[path].weight.shape[0]
    out = {}
    for stem, (out_rows, parts, cols) in rows.items():
        out[f"{stem}.lora_down.weight"] = (parts * rank, cols)
        out[f"{stem}.lora_up.weight"] = (out_rows, parts * rank)
        out[f"{stem}.alpha"] = ()
    return out


