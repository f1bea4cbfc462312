"""The network family a LoRA run trains, in one place: its layers go in (add_lora: peft's LoRA
for lora / locon, networks.py's for loha / lokr / dora), the file comes out in the WebUI's key
layout with kohya's metadata (save_lora), and it merges into a checkpoint as the WebUI applies it
(merged_states).
"""
from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..config.errors import DreamboothError
from ..config.network import targets_of
from ..config.sd35 import FLOW_TYPES
from ..model.checkpoint import SAVE_DTYPES, cast_for_save, write_text
from ..model.metadata import model_metadata
from .lora import (BASE_VERSION, WEBUI_VERSION, expected_layout, inject, kohya_name, kohya_state,
                   merged_state, target_modules, target_paths)
from .network_kinds import HAS_ALPHA, KINDS, bias_update, on_input
from .network_norm import expected_norms, inject_norms, merged_norms, norm_state
from .networks import (OURS, PARAMS, inject_network, network_params, param_shapes, rank_alpha,
                       update)


def add_lora(comp, cfg) -> list[dict]:
    """LoRA layers in the UNet (and the text encoders when cfg.lora_text_encoder), their first
    weights drawn from `cfg.seed` (the caller's random state is left as it was); returns the
    optimizer's parameter groups with their learning rates."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)
        return _add_lora(comp, cfg)


def _add_lora(comp, cfg) -> list[dict]:
    targets = targets_of(cfg)

    def adapt(module, component: str) -> list:
        paths = target_paths(module, component, targets)
        if cfg.network in OURS:
            return inject_network(module, paths, cfg)
        conv = (cfg.lora_conv_rank, cfg.lora_conv_alpha) \
            if targets == "transformer+conv" and component == "unet" else None
        return inject(module, cfg.lora_rank, cfg.lora_alpha, paths, conv)
    norms = inject_norms if getattr(cfg, "train_norm", False) else (lambda unet: [])
    groups = [{"params": adapt(comp.unet, "unet") + norms(comp.unet),
               "lr": cfg.lora_learning_rate}]
    if cfg.lora_text_encoder:
        params = [p for te, slot in zip(comp.text_encoders, comp.spec.text_encoders)
                  for p in adapt(te, slot.component)]
        groups.append({"params": params, "lr": cfg.lora_text_encoder_learning_rate})
    return groups


# -- the file -----------------------------------------------------------------------------------
def network_state(comp, cfg, states: dict) -> dict:
    """The file's tensors: each layer's parameters under `<kohya name>.<file key>`, its
    `.alpha` (not for ia3 / full) and an (IA)3 layer's `.on_input` (`states`: component ->
    state dict, as lora.kohya_state takes them)."""
    out = {}
    for component, state in states.items():
        for path, params in network_params(state).items():
            name = kohya_name(comp, component, path)
            out.update({f"{name}.{PARAMS[k]}": v for k, v in params.items()})
            out.update(extra_keys(cfg, path, params, name))
    return out


def extra_keys(cfg, path: str, params: dict, name: str) -> dict:
    """`.alpha` and `.on_input` of one module: what the type's WebUI module reads beside its
    factors."""
    out = {}
    if cfg.network not in KINDS or cfg.network in HAS_ALPHA:
        out[f"{name}.alpha"] = torch.tensor(float(rank_alpha(cfg, path)[1]))
    flag = on_input(params)
    if flag is not None:
        out[f"{name}.on_input"] = torch.tensor(flag)
    return out


def expected_network_layout(comp, cfg) -> dict:
    """Key -> shape the file must hold: one set per targeted module of the plain architecture
    (built on the meta device from the configs), named after that module."""
    out = {}
    for component, path, name, module in target_modules(comp, cfg.lora_text_encoder,
                                                        targets_of(cfg)):
        shapes = param_shapes(cfg, path, tuple(module.weight.shape), module.bias is not None)
        out.update({f"{name}.{PARAMS[k]}": v for k, v in shapes.items()})
        if shapes:
            out.update({k: () for k in extra_keys(cfg, path, shapes, name)})
    return out


def merged_network_state(state: dict, cfg, base: dict) -> dict:
    """The plain module state `base` with every layer of `state` folded in as the WebUI applies
    it (base + its delta, computed on `base`'s own weight), in the base's dtype."""
    out = dict(base)
    for path, params in network_params(state).items():
        weight = out[f"{path}.weight"]
        delta = update(params, weight, rank_alpha(cfg, path)[1])
        out[f"{path}.weight"] = (weight.float() + delta).to(weight.dtype)
        delta = bias_update(params)
        if delta is not None:
            bias = out[f"{path}.bias"]
            out[f"{path}.bias"] = (bias.float() + delta.float()).to(bias.dtype)
    return out


def network_metadata(cfg) -> dict:
    """ss_network_module / _dim / _alpha / _args as LyCORIS's kohya wrapper writes them."""
    conv = targets_of(cfg) == "transformer+conv"
    rank, alpha = rank_alpha(cfg, "")
    args = {"algo": {"dora": "lora", "oft": "diag-oft"}.get(cfg.network, cfg.network)}
    if cfg.network == "lokr":
        args.update(factor=str(cfg.lokr_factor), full_matrix=str(not cfg.lokr_rank))
    if cfg.network == "oft":
        args.update(constraint=str(cfg.oft_constraint))
    if cfg.network == "dora" or getattr(cfg, "dora_wd", False):
        row = str(getattr(cfg, "model_type", "") in FLOW_TYPES)  # Flux, SD3.5: per output row,
        args.update(dora_wd="True", wd_on_output=row)  # else per input column (the WebUI's)
    if conv:
        conv_rank, conv_alpha = (cfg.lora_conv_rank, cfg.lora_conv_alpha) \
            if cfg.network == "dora" else (rank, alpha)
        args.update(conv_dim=str(conv_rank), conv_alpha=str(conv_alpha))
    return {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha), "ss_network_args": json.dumps(args)}


# -- the file (kohya metadata, the WebUI card) ------------------------------------------------------------------------------
def ss_metadata(cfg, spec, steps: int, epochs: int, images: list, n_class: int,
                trained_at: datetime | None = None) -> dict:
    """kohya's ss_* keys: what the WebUI's Lora cards show (version, tags, training)."""
    tags: dict = {}
    for item in images:
        folder = tags.setdefault(Path(item.path).parent.name, Counter())
        folder.update(t.strip() for t in item.prompt.split(",") if t.strip())
    when = (trained_at or datetime.now(timezone.utc)).timestamp()
    flux = {} if spec.prediction_type != "flow" else {  # kohya's Flux / SD3 keys, its words
        "ss_discrete_flow_shift": str(spec.shift),
        "ss_weighting_scheme": "logit_normal" if spec.family == "sd3" else "none"}
    if spec.prediction_type == "flow" and spec.family != "sd3":  # Flux's own
        flux.update(ss_model_prediction_type="raw", ss_guidance_scale=str(spec.guidance or 1.0),
                    ss_timestep_sampling="shift" if spec.shift != 1 else "uniform")
    return {**network_keys(cfg), **flux, "ss_base_model_version": BASE_VERSION[spec.family],
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


def network_keys(cfg) -> dict:
    """ss_network_module / _dim / _alpha (/ _args) of the network cfg trains."""
    if cfg.network in OURS:
        keys = network_metadata(cfg)
    else:
        conv = {"ss_network_args": json.dumps({"conv_dim": str(cfg.lora_conv_rank),
                                               "conv_alpha": str(cfg.lora_conv_alpha)})} \
            if targets_of(cfg) == "transformer+conv" else {}
        keys = {**conv, "ss_network_module": "networks.lora",
                "ss_network_dim": str(cfg.lora_rank), "ss_network_alpha": str(cfg.lora_alpha)}
    if getattr(cfg, "train_norm", False):  # LyCORIS's name for it
        args = {**json.loads(keys.get("ss_network_args", "{}")), "train_norm": "True"}
        keys["ss_network_args"] = json.dumps(args)
    return keys


def file_tensors(comp, cfg, states: dict) -> tuple[dict, dict]:
    """(the file's tensors, key -> shape they must have) of the network cfg trains, with the
    norms' under train_norm."""
    if comp.spec.prediction_type == "flow":  # kohya's Flux / SD3 layout (flux_lora.py)
        from . import flow_networks
        return (flow_networks.file_state(comp, cfg, states["unet"]),
                flow_networks.expected_layout(comp, cfg))
    state, expected = network_tensors(comp, cfg, states)
    if getattr(cfg, "train_norm", False):
        state.update(norm_state(comp, states["unet"]))
        expected.update(expected_norms(comp))
    return state, expected


def network_tensors(comp, cfg, states: dict) -> tuple[dict, dict]:
    if cfg.network in OURS:
        return network_state(comp, cfg, states), expected_network_layout(comp, cfg)
    targets = targets_of(cfg)
    conv = targets == "transformer+conv"
    return (kohya_state(comp, cfg.lora_alpha, states, cfg.lora_conv_alpha if conv else None),
            expected_layout(comp, cfg.lora_rank, cfg.lora_text_encoder, targets,
                            cfg.lora_conv_rank if conv else None))


def merged_states(cfg, states: dict, bases: dict) -> dict:
    """The plain states `bases` (component -> state) with the trained network of `states`
    folded in, as the WebUI applies the file."""
    if cfg.network in OURS:
        out = {k: merged_network_state(states[k], cfg, v) if k in states else v
               for k, v in bases.items()}
    else:
        conv = cfg.lora_conv_alpha / cfg.lora_conv_rank
        out = {k: merged_state(states[k], cfg.lora_alpha / cfg.lora_rank, v, conv)
               if k in states else v for k, v in bases.items()}
    if getattr(cfg, "train_norm", False):
        out["unet"] = merged_norms(states["unet"], out["unet"])
    return out


def refuse_unloadable(state: dict, precision: str) -> None:
    """A value that is not finite (a diverged run, or a factor beyond fp16's range after the
    cast) would load in every host without a word and spoil each image: refused."""
    bad = next((k for k, v in state.items() if isinstance(v, torch.Tensor)
                and v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise DreamboothError(f"The LoRA file would hold a value that is not a finite number "
                              f"in '{bad}' (saved as {precision}); the WebUI would load it "
                              "and make broken images.", "Save in fp32 or bf16 if it is fp16's "
                              "range, else lower the learning rate and train again.")


def save_lora(comp, path: str | Path, cfg, states: dict, metadata: dict, precision: str = "fp32",
              overwrite: bool = False) -> Path:
    """Write the kohya LoRA file (checked against the targeted modules before it takes its name),
    and the WebUI's <name>.json beside it (activation text, SD version)."""
    from ..model.filecheck import write_verified
    meta = model_metadata(comp.spec, Path(path).stem, metadata, lora=True)
    state, expected = file_tensors(comp, cfg, states)
    state = cast_for_save(state, precision)
    refuse_unloadable(state, precision)
    write_verified(path, state, meta, expected, overwrite=overwrite, dtype=SAVE_DTYPES[precision],
                   what="LoRA")
    card = {"description": meta.get("modelspec.description", ""),
            "sd version": WEBUI_VERSION[comp.spec.family],
            "activation text": meta.get("modelspec.trigger_phrase", ""), "preferred weight": 1.0}
    write_text(Path(path).with_suffix(".json"), json.dumps(card, indent=2))
    return Path(path)
