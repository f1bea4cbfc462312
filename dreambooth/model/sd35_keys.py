"""SD3.5's MMDiT between SAI's original key layout (the single files Forge and ComfyUI load:
`joint_blocks.N.x_block.attn.qkv.weight`, ...) and diffusers' SD3Transformer2DModel, and the
kohya LoRA names of its modules (`lora_unet_joint_blocks_0_x_block_attn_qkv`).

Loading converts with diffusers' own single-file converter (model/sd35.py); this table is its
inverse, for the tiny test files, and it names the LoRA's modules. As for Flux (flux_keys.py):
an SAI module is one diffusers module, or q, k, v stacked along its output rows (attn.qkv), or
a modulation whose two halves are swapped (the last block's context modulation and the final
one: SAI shift, scale; diffusers scale, shift). The tests check it against diffusers' converter
at full size, medium (MMDiT-X: a second attention, attn2, in its first 13 blocks) and large.
"""
from __future__ import annotations

import math

import torch

from .checkpoint import tensor_shape
from .detect import sd3_prefix
from .flux_keys import NORM, QKV, SWAP, count_indices

WHOLE = "whole"  # a bare parameter (pos_embed), no .weight / .bias
TOP = ("pos_embed", "x_embedder", "t_embedder", "y_embedder", "context_embedder",
       "joint_blocks", "final_layer")  # the MMDiT's own modules (an all-in-one holds more)


def _block(i: int, last: bool, dual: bool) -> list:
    b, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
    x, c = b + "x_block.", b + "context_block."
    out = [(x + "attn.qkv", tuple(d + f"attn.to_{q}" for q in "qkv"), QKV),
           (c + "attn.qkv", tuple(d + f"attn.add_{q}_proj" for q in "qkv"), QKV),
           (x + "attn.ln_q", (d + "attn.norm_q",), NORM),
           (x + "attn.ln_k", (d + "attn.norm_k",), NORM),
           (c + "attn.ln_q", (d + "attn.norm_added_q",), NORM),
           (c + "attn.ln_k", (d + "attn.norm_added_k",), NORM),
           (x + "attn.proj", (d + "attn.to_out.0",), None),
           (x + "adaLN_modulation.1", (d + "norm1.linear",), None),
           (c + "adaLN_modulation.1", (d + "norm1_context.linear",), SWAP if last else None),
           (x + "mlp.fc1", (d + "ff.net.0.proj",), None),
           (x + "mlp.fc2", (d + "ff.net.2",), None)]
    if not last:  # the last block's text stream ends before its attention's output
        out += [(c + "attn.proj", (d + "attn.to_add_out",), None),
                (c + "mlp.fc1", (d + "ff_context.net.0.proj",), None),
                (c + "mlp.fc2", (d + "ff_context.net.2",), None)]
    if dual:
        out += [(x + "attn2.qkv", tuple(d + f"attn2.to_{q}" for q in "qkv"), QKV),
                (x + "attn2.ln_q", (d + "attn2.norm_q",), NORM),
                (x + "attn2.ln_k", (d + "attn2.norm_k",), NORM),
                (x + "attn2.proj", (d + "attn2.to_out.0",), None)]
    return out


def module_map(n_layers: int, dual: tuple = ()) -> list:
    """(SAI module, its diffusers modules, how they stack) of every module."""
    emb = "time_text_embed."
    out = [("pos_embed", ("pos_embed.pos_embed",), WHOLE),
           ("x_embedder.proj", ("pos_embed.proj",), None),
           ("t_embedder.mlp.0", (emb + "timestep_embedder.linear_1",), None),
           ("t_embedder.mlp.2", (emb + "timestep_embedder.linear_2",), None),
           ("y_embedder.mlp.0", (emb + "text_embedder.linear_1",), None),
           ("y_embedder.mlp.2", (emb + "text_embedder.linear_2",), None),
           ("context_embedder", ("context_embedder",), None)]
    for i in range(n_layers):
        out += _block(i, i == n_layers - 1, i in dual)
    return out + [("final_layer.linear", ("proj_out",), None),
                  ("final_layer.adaLN_modulation.1", ("norm_out.linear",), SWAP)]


def _leaves(kind) -> tuple:
    if kind == WHOLE:
        return (("", ""),)
    return (("weight", "weight"),) if kind == NORM else (("weight", "weight"), ("bias", "bias"))


def _join(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if leaf else module


def to_sai(state: dict, n_layers: int, dual: tuple = ()) -> dict:
    """An SD3Transformer2DModel state in SAI's layout (no prefix): what Forge's files hold."""
    out = {}
    for sai, parts, kind in module_map(n_layers, dual):
        for leaf, dleaf in _leaves(kind):
            values = [state[_join(p, dleaf)] for p in parts]
            if kind == SWAP:
                scale, shift = values[0].chunk(2, dim=0)
                values = [shift, scale]
            out[_join(sai, leaf)] = torch.cat(values, dim=0) if len(values) > 1 else values[0]
    return out


def layers(keys, prefix: str = "") -> tuple[int, tuple]:
    """(joint blocks, the indices of those with a second attention) of an SAI state's keys."""
    n = count_indices(keys, prefix.replace(".", r"\.") + r"joint_blocks\.(\d+)\.")
    dual = {int(k[len(prefix):].split(".")[1]) for k in keys
            if k.startswith(prefix + "joint_blocks.") and ".x_block.attn2." in k}
    return n, tuple(sorted(dual))


def transformer_config(state) -> dict:
    """SD3Transformer2DModel's config from an SAI state's keys and shapes."""
    prefix = sd3_prefix(state) or ""

    def shape(key: str) -> tuple:
        return tensor_shape(state, prefix + key)
    hidden, in_channels, patch, _ = shape("x_embedder.proj.weight")
    head = shape("joint_blocks.0.x_block.attn.ln_q.weight")[0]
    n, dual = layers(state, prefix)
    return {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": patch,
            "in_channels": in_channels, "num_layers": n, "attention_head_dim": head,
            "num_attention_heads": hidden // head,
            "joint_attention_dim": shape("context_embedder.weight")[1],
            "caption_projection_dim": shape("context_embedder.weight")[0],
            "pooled_projection_dim": shape("y_embedder.mlp.0.weight")[1],
            "out_channels": shape("final_layer.linear.weight")[0] // (patch * patch),
            "pos_embed_max_size": math.isqrt(shape("pos_embed")[1]),
            "dual_attention_layers": dual, "qk_norm": "rms_norm"}


def lora_names(n_layers: int, dual: tuple = ()) -> dict:
    """diffusers module path -> (kohya stem, its part, the stem's parts) of every Linear layer
    of the joint blocks a kohya SD3 LoRA can adapt."""
    out = {}
    for sai, parts, kind in module_map(n_layers, dual):
        if kind in (NORM, WHOLE) or not sai.startswith("joint_blocks."):
            continue
        stem = "lora_unet_" + sai.replace(".", "_")
        out.update({p: (stem, i, len(parts)) for i, p in enumerate(parts)})
    return out
