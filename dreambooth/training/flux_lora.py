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

The networks that stack as exactly (`network`; config/flux.py refuses the others, saying why):
DoRA (LoRA's, with dora_scale [out, 1] per output row stacked: networks.py), LoHa (each product's
first factor block-diagonal, its second stacked: (A1 B1) * (A2 B2) of the stack is the parts'
rows; alpha = k x alpha as for LoRA; with dora_wd, dora_scale stacked) and Full (diff and diff_b
stacked; no alpha). STACK says how each file tensor of a part joins its stack's; flow_networks.py
gives it any network's tensors.
"""
from __future__ import annotations

import functools
import inspect
import json
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
    """The plain transformer of `config` on the meta device: one per configuration (the same
    model for each call: read it, don't change it; diffusers < 0.32 spends seconds on SD3.5's
    positions, made with numpy whatever the device)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    cls = FluxTransformer2DModel if "num_single_layers" in config else SD3Transformer2DModel
    given = inspect.signature(cls.__init__).parameters
    full = {k: config.get(k, p.default) for k, p in given.items() if k != "self"}
    return _built(cls, json.dumps(full, sort_keys=True))


@functools.lru_cache(maxsize=4)
def _built(cls, config: str):
    with torch.device("meta"):  # (and diffusers < 0.32's CPU positions moved there)
        return cls.from_config(json.loads(config)).to("meta")


ROWS, DIAGONAL = "rows", "diagonal"
STACK = {"lora_down.weight": ROWS, "lora_up.weight": DIAGONAL, "dora_scale": ROWS,
         "hada_w1_a": DIAGONAL, "hada_w1_b": ROWS, "hada_w2_a": DIAGONAL, "hada_w2_b": ROWS,
         "diff": ROWS, "diff_b": ROWS}  # file key -> how a stack's parts join


def _join(key: str, parts: list):
    """A stack's file tensor (or shape) from its parts', as STACK says."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):  # shapes
        rows = sum(p[0] for p in parts)
        if STACK[key] == DIAGONAL:
            return (rows, sum(p[1] for p in parts))
        return (rows, *parts[0][1:])
    return torch.block_diag(*parts) if STACK[key] == DIAGONAL else torch.cat(parts)


def stacked(comp, per_module: dict, alpha: float | None) -> dict:
    """The file's entries from each adapted module's {file key: tensor or shape}: a stack's
    parts joined (STACK), its `.alpha` = parts x `alpha` (None: no alpha, Full)."""
    names, stems = _names(comp.configs["unet"]), {}
    for path, tensors in per_module.items():
        stem, part, parts = names[path]
        stems.setdefault(stem, [None] * parts)[part] = tensors
    out = {}
    for stem, parts in stems.items():
        if any(p is None for p in parts):
            raise DreamboothError(f"The LoRA adapts only some of the layers stacked in {stem}; "
                                  "kohya's layout can't hold that.", "This is a bug; "
                                  "please report it with the log.")
        out.update({f"{stem}.{key}": _join(key, [p[key] for p in parts]) for key in parts[0]})
        if alpha is not None:
            value = float(alpha * len(parts))
            out[f"{stem}.alpha"] = () if isinstance(next(iter(parts[0].values())), tuple) \
                else torch.tensor(value)
    return out


def kohya_state(comp, cfg, pairs: dict) -> dict:
    """The file's tensors from the transformer's LoRA layers: module path -> (down, up), as
    lora.lora_pairs reads them from its peft state."""
    return stacked(comp, {path: {"lora_down.weight": down, "lora_up.weight": up}
                          for path, (down, up) in pairs.items()}, cfg.lora_alpha)


def expected_layout(comp, cfg) -> dict:
    """Key -> shape a LoRA's file must hold, from the plain transformer built on the meta
    device (flow_networks.expected_layout: any network's)."""
    meta = meta_transformer(comp.configs["unet"])
    found = dict(meta.named_modules())
    return stacked(comp, {path: {"lora_down.weight": (cfg.lora_rank, found[path].weight.shape[1]),
                                 "lora_up.weight": (found[path].weight.shape[0], cfg.lora_rank)}
                          for path in target_paths(meta, cfg.lora_targets)}, cfg.lora_alpha)
