"""DreamBooth-LoRA: peft LoRA layers in the UNet (and optionally the text encoders), saved as the
single kohya-layout .safetensors the WebUI's built-in Lora extra network loads.

Targets (`lora_targets`): 'attention' (to_q/k/v/out.0; text encoders q/k/v/out_proj),
'transformer' (kohya's default network: every Linear and 1x1 conv of the UNet's transformer
blocks: attention, ff.net.0.proj, ff.net.2, proj_in, proj_out; text encoders attention and MLP
fc1/fc2), 'transformer+conv' (LoCon: also the ResNet blocks' conv1, conv2, conv_shortcut, at
`lora_conv_rank` / `lora_conv_alpha`).

Key layout (what kohya's sd-scripts write and the WebUI maps onto its modules):
`<name>.lora_down.weight` [rank, in], `<name>.lora_up.weight` [out, rank], `<name>.alpha` [];
the update is up @ down * alpha / rank. Names: `lora_unet_` + the UNet module path with '_' for
'.' (diffusers paths for SD 1.x/2.x, LDM paths for SDXL, as kohya does), `lora_te_` (SD 1.x/2.x)
or `lora_te1_` / `lora_te2_` (SDXL) + the transformers text encoder module path.
"""
from __future__ import annotations

import re

import torch

from ..model import convert

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TE_MLP = ("fc1", "fc2")
TRANSFORMER = re.compile(r"(^|\.)attentions\.\d+\.")  # inside a Transformer2DModel
CONV = r"resnets\.\d+\.(conv1|conv2|conv_shortcut)"  # LoCon's modules (peft pattern)
RESNET_CONV = re.compile(rf"(^|\.){CONV}$")
ADAPTER = "default"
BASE_VERSION = {"v1": "sd_v1", "v2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1",
                "sd3": "sd3"}
WEBUI_VERSION = {"v1": "SD1", "v2": "SD2", "sdxl": "SDXL", "flux": "Unknown", "sd3": "Unknown"}


def inject(module, rank: int, alpha: float, targets=UNET_TARGETS,
           conv: tuple[int, float] | None = None) -> list:
    """Add LoRA layers (B zero: no change yet) to the `targets` of `module`; freeze the rest;
    `conv`: (rank, alpha) of the ResNet convs among them. Returns the LoRA parameters, the only
    ones left trainable."""
    from peft import LoraConfig, inject_adapter_in_model
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        rank_pattern={CONV: conv[0]} if conv else {},
                        alpha_pattern={CONV: conv[1]} if conv else {})
    inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    _fp32_over_fp8(module)
    module.requires_grad_(False)
    params = [p for name, p in module.named_parameters()
              if ".lora_A." in name or ".lora_B." in name]
    for p in params:
        p.requires_grad_(True)
    return params


def _fp32_over_fp8(module) -> None:
    """peft gives a LoRA layer its base layer's dtype: over a weight stored in fp8 (fp8_base),
    fp8, where the trained LoRA must be fp32. Those LoRA layers go to fp32 and are initialised
    again there (their fp8 start would be a coarse copy of the usual one)."""
    for layer in module.modules():
        down = getattr(layer, "lora_A", None)
        if isinstance(down, torch.nn.ModuleDict) and ADAPTER in down \
                and down[ADAPTER].weight.element_size() == 1:
            down[ADAPTER].float()
            layer.lora_B[ADAPTER].float()
            layer.reset_lora_parameters(ADAPTER, True)


def _ends(path: str, names) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def target_paths(module, component: str, targets: str = "attention") -> list[str]:
    """The module paths `targets` ('attention' | 'transformer' | 'transformer+conv') adapts in
    a plain (not yet wrapped) UNet or text encoder."""
    import torch.nn as nn
    from .flux_lora import is_flux, is_sd3
    if component == "unet" and (is_flux(module) or is_sd3(module)):
        from .flux_lora import target_paths as flux_paths
        return flux_paths(module, targets)
    out = []
    for path, m in module.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if component != "unet":
            hit = _ends(path, TE_TARGETS + (TE_MLP if targets != "attention" else ()))
        elif targets == "attention":
            hit = _ends(path, UNET_TARGETS)
        else:
            in_block = TRANSFORMER.search(path) and (
                isinstance(m, nn.Linear) or tuple(m.kernel_size) == (1, 1))
            conv = targets == "transformer+conv" and bool(RESNET_CONV.search(path))
            hit = bool(in_block) or conv
        if hit:
            out.append(path)
    return out


def is_conv_target(path: str) -> bool:
    """A LoCon module (a ResNet block conv): it takes lora_conv_rank / lora_conv_alpha."""
    return bool(RESNET_CONV.search(path))


# -- peft state <-> kohya keys -----------------------------------------------------------------
def lora_pairs(state: dict) -> dict:
    """module path -> (down, up) of every peft LoRA layer in a state dict."""
    pairs: dict = {}
    for key, value in state.items():
        for part, slot in ((f".lora_A.{ADAPTER}.weight", 0), (f".lora_B.{ADAPTER}.weight", 1)):
            if key.endswith(part):
                pairs.setdefault(key[:-len(part)], [None, None])[slot] = value
    return {path: tuple(pair) for path, pair in pairs.items()}


def kohya_name(comp, component: str, path: str) -> str:
    """The kohya key stem of a module ('text_model.'-prefixed paths for text encoders)."""
    if component == "unet":
        if comp.spec.family == "sdxl":
            path = convert.unet_module_to_ldm(path, comp.configs["unet"])
        return "lora_unet_" + path.replace(".", "_")
    slot = next(s for s in comp.spec.text_encoders if s.component == component)
    return f"{slot.lora_prefix}_" + path.replace(".", "_")


def kohya_state(comp, alpha: float, states: dict, conv_alpha: float | None = None) -> dict:
    """The kohya-layout tensors of the LoRA layers in `states` (component -> state dict, text
    encoders 'text_model.'-keyed as models.te_state gives them); ResNet convs get `conv_alpha`."""
    out = {}
    for component, state in states.items():
        for path, (down, up) in lora_pairs(state).items():
            name = kohya_name(comp, component, path)
            a = conv_alpha if conv_alpha is not None and is_conv_target(path) else alpha
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up
            out[f"{name}.alpha"] = torch.tensor(float(a))
    return out


def target_modules(comp, text_encoders: bool, targets: str):
    """(component, module path, kohya name, plain module) of every module `targets` adapts in
    the plain architecture, built on the meta device from the configs (not from a trained
    state: a key that maps onto no module of the base can't pass)."""
    from ..model.components import build_meta
    meta = build_meta(comp.model_type, comp.configs, comp.extra)
    parts = [("unet", meta.unet)]
    if text_encoders:
        parts += [(s.component, getattr(meta, s.component)) for s in comp.spec.text_encoders]
    for component, module in parts:
        prefix = "" if component == "unet" or any(
            n.startswith("text_model.") for n, _ in module.named_modules()) else "text_model."
        found = dict(module.named_modules())
        for path in target_paths(module, component, targets):
            yield component, path, kohya_name(comp, component, prefix + path), found[path]


def expected_layout(comp, rank: int, text_encoders: bool, targets: str = "attention",
                    conv_rank: int | None = None) -> dict:
    """Key -> shape the LoRA file must hold: one triple per targeted Linear/Conv2d."""
    out = {}
    for _, path, name, module in target_modules(comp, text_encoders, targets):
        r = conv_rank if conv_rank and is_conv_target(path) else rank
        w = tuple(module.weight.shape)
        out[f"{name}.lora_down.weight"] = (r, *w[1:])
        out[f"{name}.lora_up.weight"] = (w[0], r) + tuple(1 for _ in w[2:])
        out[f"{name}.alpha"] = ()
    return out


def plain_state(state: dict) -> dict:
    """A peft-wrapped module's state without its LoRA layers, under the plain module's keys."""
    out = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        path, found, leaf = key.rpartition(".base_layer.")
        out[f"{path}.{leaf}" if found else key] = value
    return out


def merged_state(state: dict, scale: float, base: dict | None = None,
                 conv_scale: float | None = None) -> dict:
    """The plain module state `base` (default: the one under the LoRA layers of `state`) with
    every LoRA of the peft-wrapped `state` folded in: W + up @ down * scale (`conv_scale` for
    ResNet convs), in fp32."""
    out = dict(plain_state(state) if base is None else base)
    for path, (down, up) in lora_pairs(state).items():
        weight = out[f"{path}.weight"]
        delta = torch.tensordot(up.flatten(1).float(), down.float(), dims=1)
        k = conv_scale if conv_scale is not None and is_conv_target(path) else scale
        out[f"{path}.weight"] = (weight.float() + k * delta.reshape(weight.shape)
                                 ).to(weight.dtype)
    return out


def by_module(state: dict, leaves) -> dict:
    """module path -> {leaf: tensor} of the keys of `state` whose last part is in `leaves`."""
    out: dict = {}
    for key, value in state.items():
        path, _, leaf = key.rpartition(".")
        if leaf in leaves:
            out.setdefault(path, {})[leaf] = value
    return out


def put_module(root, path: str, layer) -> None:
    """`layer` in place of the submodule of `root` at `path`."""
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, layer)
