"""A Flux / SD3.5 network's file (any of config.flux.FLOW_NETWORKS: peft's LoRA, or networks.py's
DoRA, LoHa, Full): each adapted layer's tensors under their file keys, stacked into BFL's / SAI's
modules by flux_lora.stacked, and the layout that file must have.
"""
from __future__ import annotations

from . import flux_lora
from .lora import lora_pairs
from .network_kinds import HAS_ALPHA, KINDS
from .networks import OURS, PARAMS, network_params, param_shapes, rank_alpha


def _alpha(cfg) -> float | None:
    """The per-part alpha of our network's file (None: its type has none, Full)."""
    return None if cfg.network in KINDS and cfg.network not in HAS_ALPHA \
        else rank_alpha(cfg, "")[1]


def file_state(comp, cfg, unet_state: dict) -> dict:
    """The file's tensors of the network cfg trains, from the transformer's state."""
    if getattr(cfg, "network", "lora") not in OURS:
        return flux_lora.kohya_state(comp, cfg, lora_pairs(unet_state))
    return flux_lora.stacked(comp, {path: {PARAMS[k]: v for k, v in params.items()}
                                    for path, params in network_params(unet_state).items()},
                             _alpha(cfg))


def expected_layout(comp, cfg) -> dict:
    """Key -> shape the file must hold, from the plain transformer built on the meta device."""
    if getattr(cfg, "network", "lora") not in OURS:
        return flux_lora.expected_layout(comp, cfg)
    meta = flux_lora.meta_transformer(comp.configs["unet"])
    found, per_module = dict(meta.named_modules()), {}
    for path in flux_lora.target_paths(meta, cfg.lora_targets):
        module = found[path]
        shapes = param_shapes(cfg, path, tuple(module.weight.shape), module.bias is not None)
        per_module[path] = {PARAMS[k]: tuple(v) for k, v in shapes.items()}
    return flux_lora.stacked(comp, per_module, _alpha(cfg))
