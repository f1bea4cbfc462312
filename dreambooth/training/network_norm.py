"""train_norm: the norm layers of the UNet's transformer blocks trained beside any network type, as
1.10.1's network_norm.py applies a file's `w_norm` / `b_norm` (added to the norm's weight and
bias, scale 1, the bias through finalize_updown's ex_bias) and Forge's 'diff' patches do.

UNet only: Forge's text-encoder key map names the attention and MLP layers alone, so it would
leave text-encoder norms out of a file it otherwise loads (or, past 12 unmatched keys, refuse the
whole file), and the two hosts would disagree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import TRANSFORMER, by_module, kohya_name, put_module

NORM_PARAMS = ("w_norm", "b_norm")  # parameter name = file key


def norm_paths(unet: nn.Module) -> list[str]:
    """The affine LayerNorm / GroupNorm layers inside the UNet's Transformer2D models."""
    return [path for path, m in unet.named_modules()
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and TRANSFORMER.search(path)
            and getattr(m, "weight", None) is not None and m.bias is not None]


class NormLayer(nn.Module):
    """A frozen norm layer (`base_layer`) with a learnt change of its weight and bias."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        self.w_norm = nn.Parameter(torch.zeros(base.weight.shape, device=base.weight.device))
        self.b_norm = nn.Parameter(torch.zeros(base.bias.shape, device=base.bias.device))

    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.base_layer
        return b.weight.float() + self.w_norm, b.bias.float() + self.b_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, (w, bias) = self.base_layer, self.effective()
        w, bias = w.to(x.dtype), bias.to(x.dtype)
        if isinstance(b, nn.LayerNorm):
            return F.layer_norm(x, b.normalized_shape, w, bias, b.eps)
        return F.group_norm(x, b.num_groups, w, bias, b.eps)


def inject_norms(unet: nn.Module) -> list:
    """A NormLayer on each norm of norm_paths; returns their parameters."""
    found, params = dict(unet.named_modules()), []
    for path in norm_paths(unet):
        layer = NormLayer(found[path])
        put_module(unet, path, layer)
        params += [layer.w_norm, layer.b_norm]
    return params


def norm_params(state: dict) -> dict:
    """module path -> {w_norm, b_norm} of every NormLayer in a state dict."""
    return by_module(state, NORM_PARAMS)


def norm_state(comp, unet_state: dict) -> dict:
    """The file's `<kohya name>.w_norm` / `.b_norm` tensors."""
    return {f"{kohya_name(comp, 'unet', path)}.{k}": v
            for path, params in norm_params(unet_state).items() for k, v in params.items()}


def expected_norms(comp) -> dict:
    """Key -> shape of the norm tensors the file must hold (from the plain architecture)."""
    from ..model.components import build_meta
    unet = build_meta(comp.model_type, comp.configs, comp.extra).unet
    found = dict(unet.named_modules())
    return {f"{kohya_name(comp, 'unet', path)}.{k}": tuple(found[path].weight.shape)
            for path in norm_paths(unet) for k in NORM_PARAMS}


def merged_norms(unet_state: dict, base: dict) -> dict:
    """The plain UNet state `base` with each trained norm change added."""
    out = dict(base)
    for path, params in norm_params(unet_state).items():
        for key, delta in ((f"{path}.weight", params["w_norm"]), (f"{path}.bias",
                                                                  params["b_norm"])):
            out[key] = (out[key].float() + delta.float()).to(out[key].dtype)
    return out
