"""Flux.1's transformer between BFL's original key layout (the single files Forge and ComfyUI
load: `double_blocks.N.img_attn.qkv.weight`, ...) and diffusers' FluxTransformer2DModel, and the
kohya LoRA names of its modules (`lora_unet_double_blocks_0_img_attn_qkv`).

The map is one table of modules (`module_map`): a BFL module is one diffusers module, or several
stacked along the output rows (qkv: three equal parts; a single block's linear1: q, k, v and the
MLP's input), or the final modulation with its two halves swapped (BFL: shift, scale; diffusers:
scale, shift). Split sizes come from the shapes, so a tiny model converts through the same code
as the full-size one (diffusers' own converter assumes Flux.1's 3072 wide blocks; the tests check
this map against it at full size).
"""
from __future__ import annotations

import re

import torch

from .checkpoint import tensor_shape
from .detect import FLUX_MARK, FLUX_PREFIX

QKV, LINEAR1, SWAP, NORM = "qkv", "linear1", "swap", "norm"


def _double(i: int) -> list:
    b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
    return [(b + "img_mod.lin", (d + "norm1.linear",), None),
            (b + "txt_mod.lin", (d + "norm1_context.linear",), None),
            (b + "img_attn.qkv", tuple(d + f"attn.to_{x}" for x in "qkv"), QKV),
            (b + "txt_attn.qkv", tuple(d + f"attn.add_{x}_proj" for x in "qkv"), QKV),
            (b + "img_attn.norm.query_norm", (d + "attn.norm_q",), NORM),
            (b + "img_attn.norm.key_norm", (d + "attn.norm_k",), NORM),
            (b + "txt_attn.norm.query_norm", (d + "attn.norm_added_q",), NORM),
            (b + "txt_attn.norm.key_norm", (d + "attn.norm_added_k",), NORM),
            (b + "img_mlp.0", (d + "ff.net.0.proj",), None),
            (b + "img_mlp.2", (d + "ff.net.2",), None),
            (b + "txt_mlp.0", (d + "ff_context.net.0.proj",), None),
            (b + "txt_mlp.2", (d + "ff_context.net.2",), None),
            (b + "img_attn.proj", (d + "attn.to_out.0",), None),
            (b + "txt_attn.proj", (d + "attn.to_add_out",), None)]


def _single(i: int) -> list:
    b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
    return [(b + "modulation.lin", (d + "norm.linear",), None),
            (b + "linear1", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"),
             LINEAR1),
            (b + "norm.query_norm", (d + "attn.norm_q",), NORM),
            (b + "norm.key_norm", (d + "attn.norm_k",), NORM),
            (b + "linear2", (d + "proj_out",), None)]


def module_map(n_double: int, n_single: int, guidance: bool) -> list:
    """(BFL module, its diffusers modules, how they stack) of every module."""
    emb = "time_text_embed."
    out = [("time_in.in_layer", (emb + "timestep_embedder.linear_1",), None),
           ("time_in.out_layer", (emb + "timestep_embedder.linear_2",), None),
           ("vector_in.in_layer", (emb + "text_embedder.linear_1",), None),
           ("vector_in.out_layer", (emb + "text_embedder.linear_2",), None)]
    if guidance:
        out += [("guidance_in.in_layer", (emb + "guidance_embedder.linear_1",), None),
                ("guidance_in.out_layer", (emb + "guidance_embedder.linear_2",), None)]
    out += [("txt_in", ("context_embedder",), None), ("img_in", ("x_embedder",), None)]
    for i in range(n_double):
        out += _double(i)
    for i in range(n_single):
        out += _single(i)
    return out + [("final_layer.linear", ("proj_out",), None),
                  ("final_layer.adaLN_modulation.1", ("norm_out.linear",), SWAP)]


def count_indices(keys, pattern: str) -> int:
    """1 + the highest index the group of `pattern` matches at the start of a key (0: none)."""
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def block_counts(keys, prefix: str = "") -> tuple[int, int]:
    """(double blocks, single blocks) of a BFL state's keys."""
    return tuple(count_indices(keys, re.escape(prefix + kind) + r"\.(\d+)\.")
                 for kind in ("double_blocks", "single_blocks"))


def _prefix(state) -> str:
    """The all-in-one files' 'model.diffusion_model.' where the state has it."""
    return FLUX_PREFIX if FLUX_PREFIX + FLUX_MARK in state else ""


def _leaves(kind) -> tuple:
    return (("scale", "weight"),) if kind == NORM else (("weight", "weight"), ("bias", "bias"))


def _sizes(kind, rows: int, inner: int, parts: int) -> list[int]:
    if kind == LINEAR1:
        return [inner, inner, inner, rows - 3 * inner]
    return [rows // parts] * parts


def to_diffusers(state) -> dict:
    """A BFL-layout transformer state (with or without 'model.diffusion_model.'; a LazyState
    reads each tensor once) as FluxTransformer2DModel's. Every key must be mapped: one that is
    not raises KeyError."""
    prefix = _prefix(state)
    n_double, n_single = block_counts(state, prefix)
    guidance = prefix + "guidance_in.in_layer.weight" in state
    inner = tensor_shape(state, prefix + "img_in.weight")[0]
    out, seen = {}, set()
    for bfl, parts, kind in module_map(n_double, n_single, guidance):
        for leaf, dleaf in _leaves(kind):
            key = f"{prefix}{bfl}.{leaf}"
            seen.add(key)
            value = state[key]
            if kind == SWAP:
                shift, scale = value.chunk(2, dim=0)
                out[f"{parts[0]}.{dleaf}"] = torch.cat([scale, shift], dim=0)
                continue
            pieces = value.split(_sizes(kind, value.shape[0], inner, len(parts)), dim=0) \
                if len(parts) > 1 else (value,)
            out.update({f"{p}.{dleaf}": v for p, v in zip(parts, pieces)})
    left = [k for k in state if k not in seen]
    if left:
        raise KeyError(f"{len(left)} keys of the file are not Flux.1 transformer keys "
                       f"(e.g. {left[0]})")
    return out


def to_bfl(state: dict, n_double: int, n_single: int, guidance: bool) -> dict:
    """A FluxTransformer2DModel state in BFL's layout (no prefix): what Forge's files hold."""
    out = {}
    for bfl, parts, kind in module_map(n_double, n_single, guidance):
        for leaf, dleaf in _leaves(kind):
            values = [state[f"{p}.{dleaf}"] for p in parts]
            if kind == SWAP:
                scale, shift = values[0].chunk(2, dim=0)
                values = [shift, scale]
            out[f"{bfl}.{leaf}"] = torch.cat(values, dim=0) if len(values) > 1 else values[0]
    return out


def transformer_config(state) -> dict:
    """FluxTransformer2DModel's config from a BFL state's keys and shapes (nothing else is
    needed: the widths, depths and the guidance embedding are all in the file)."""
    prefix = _prefix(state)

    def shape(key: str) -> tuple:
        return tensor_shape(state, prefix + key)
    inner, in_channels = shape("img_in.weight")
    head = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    n_double, n_single = block_counts(state, prefix)
    side = 2 * (head * 56 // 256)  # Flux.1's (16, 56, 56) at its 128 wide heads
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": in_channels,
            "num_layers": n_double, "num_single_layers": n_single,
            "attention_head_dim": head, "num_attention_heads": inner // head,
            "joint_attention_dim": shape("txt_in.weight")[1],
            "pooled_projection_dim": shape("vector_in.in_layer.weight")[1],
            "guidance_embeds": prefix + "guidance_in.in_layer.weight" in state,
            "axes_dims_rope": [head - 2 * side, side, side]}


def lora_names(n_double: int, n_single: int) -> dict:
    """diffusers module path -> (kohya stem, its part, the stem's parts) of every module a
    kohya Flux LoRA can adapt (the blocks' Linear layers)."""
    out = {}
    for bfl, parts, kind in module_map(n_double, n_single, False):
        if kind == NORM or not bfl.startswith(("double_blocks.", "single_blocks.")):
            continue
        stem = "lora_unet_" + bfl.replace(".", "_")
        out.update({p: (stem, i, len(parts)) for i, p in enumerate(parts)})
    return out
