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

import json
import re
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..model import convert
from ..model.checkpoint import SAVE_DTYPES, cast_for_save, write_text
from ..model.metadata import model_metadata

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TE_MLP = ("fc1", "fc2")
TRANSFORMER = re.compile(r"(^|\.)attentions\.\d+\.")  # inside a Transformer2DModel
CONV = r"resnets\.\d+\.(conv1|conv2|conv_shortcut)"  # LoCon's modules (peft pattern)
RESNET_CONV = re.compile(rf"(^|\.){CONV}$")
ADAPTER = "default"
BASE_VERSION = {"v1": "sd_v1", "v2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
WEBUI_VERSION = {"v1": "SD1", "v2": "SD2", "sdxl": "SDXL"}


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


def add_lora(comp, cfg) -> list[dict]:
    """LoRA layers in the UNet (and the text encoders when cfg.lora_text_encoder), their first
    weights drawn from `cfg.seed` (the caller's random state is left as it was); returns the
    optimizer's parameter groups with their learning rates."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)
        return _add_lora(comp, cfg)


def _add_lora(comp, cfg) -> list[dict]:
    conv = (cfg.lora_conv_rank, cfg.lora_conv_alpha) \
        if cfg.lora_targets == "transformer+conv" else None
    groups = [{"params": inject(comp.unet, cfg.lora_rank, cfg.lora_alpha,
                                target_paths(comp.unet, "unet", cfg.lora_targets), conv),
               "lr": cfg.lora_learning_rate}]
    if cfg.lora_text_encoder:
        params = [p for te, slot in zip(comp.text_encoders, comp.spec.text_encoders)
                  for p in inject(te, cfg.lora_rank, cfg.lora_alpha,
                                  target_paths(te, slot.component, cfg.lora_targets))]
        groups.append({"params": params, "lr": cfg.lora_text_encoder_learning_rate})
    return groups


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


def expected_layout(comp, rank: int, text_encoders: bool, targets: str = "attention",
                    conv_rank: int | None = None) -> dict:
    """Key -> shape the LoRA file must hold: one triple per targeted Linear/Conv2d of the plain
    architecture (built on the meta device from the configs, not from the peft state), each
    named after that module: a key that maps onto no module of the base can't pass."""
    from ..model.components import build_meta
    meta = build_meta(comp.model_type, comp.configs, comp.extra)
    parts = [("unet", meta.unet)]
    if text_encoders:
        parts += [(s.component, getattr(meta, s.component)) for s in comp.spec.text_encoders]
    out = {}
    for component, module in parts:
        prefix = "" if component == "unet" or any(
            n.startswith("text_model.") for n, _ in module.named_modules()) else "text_model."
        found = dict(module.named_modules())
        for path in target_paths(module, component, targets):
            name = kohya_name(comp, component, prefix + path)
            r = conv_rank if conv_rank and is_conv_target(path) else rank
            w = tuple(found[path].weight.shape)
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


# -- the file ------------------------------------------------------------------------------
def ss_metadata(cfg, spec, steps: int, epochs: int, images: list, n_class: int,
                trained_at: datetime | None = None) -> dict:
    """kohya's ss_* keys: what the WebUI's Lora cards show (version, tags, training)."""
    tags: dict = {}
    for item in images:
        folder = tags.setdefault(Path(item.path).parent.name, Counter())
        folder.update(t.strip() for t in item.prompt.split(",") if t.strip())
    when = (trained_at or datetime.now(timezone.utc)).timestamp()
    conv = {"ss_network_args": json.dumps({"conv_dim": str(cfg.lora_conv_rank),
                                           "conv_alpha": str(cfg.lora_conv_alpha)})} \
        if cfg.lora_targets == "transformer+conv" else {}
    return {**conv,
        "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.lora_rank),
        "ss_network_alpha": str(cfg.lora_alpha), "ss_base_model_version": BASE_VERSION[spec.family],
        "ss_v2": str(spec.family == "v2"),
        "ss_v_parameterization": str(spec.prediction_type == "v_prediction"),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_enable_bucket": str(cfg.bucketing),
        "ss_num_train_images": str(len(images)), "ss_num_reg_images": str(n_class),
        "ss_num_epochs": str(epochs), "ss_steps": str(steps),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_learning_rate": str(cfg.lora_learning_rate), "ss_unet_lr": str(cfg.lora_learning_rate),
        "ss_text_encoder_lr": str(cfg.lora_text_encoder_learning_rate
                                  if cfg.lora_text_encoder else 0),
        "ss_lr_scheduler": cfg.lr_scheduler, "ss_optimizer": cfg.optimizer,
        "ss_seed": str(cfg.seed), "ss_mixed_precision": cfg.mixed_precision,
        "ss_noise_offset": str(cfg.offset_noise), "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_prior_loss_weight": str(cfg.prior_loss_weight),
        "ss_output_name": cfg.model_name, "ss_sd_model_name": Path(cfg.source_checkpoint).name,
        "ss_training_finished_at": str(when),
        "ss_tag_frequency": json.dumps({k: dict(v) for k, v in tags.items()}),
        "ss_dataset_dirs": json.dumps({k: {"n_repeats": 1, "img_count": n}
                                       for k, n in Counter(Path(it.path).parent.name
                                                           for it in images).items()}),
    }


def save_lora(comp, path: str | Path, cfg, states: dict, metadata: dict, precision: str = "fp32",
              overwrite: bool = False) -> Path:
    """Write the kohya LoRA file (checked against the targeted modules before it takes its name),
    and the WebUI's <name>.json beside it (activation text, SD version)."""
    from ..model.filecheck import write_verified
    meta = model_metadata(comp.spec, Path(path).stem, metadata, lora=True)
    conv = cfg.lora_targets == "transformer+conv"
    state = cast_for_save(kohya_state(comp, cfg.lora_alpha, states,
                                      cfg.lora_conv_alpha if conv else None), precision)
    expected = expected_layout(comp, cfg.lora_rank, cfg.lora_text_encoder, cfg.lora_targets,
                               cfg.lora_conv_rank if conv else None)
    write_verified(path, state, meta, expected, overwrite=overwrite, dtype=SAVE_DTYPES[precision],
                   what="LoRA")
    card = {"description": meta.get("modelspec.description", ""),
            "sd version": WEBUI_VERSION[comp.spec.family],
            "activation text": meta.get("modelspec.trigger_phrase", ""), "preferred weight": 1.0}
    write_text(Path(path).with_suffix(".json"), json.dumps(card, indent=2))
    return Path(path)
