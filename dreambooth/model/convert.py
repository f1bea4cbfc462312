"""Key maps between the WebUI's single-file (original LDM) layout and diffusers' modules.

Pure functions over state dicts. Each map is a list of (diffusers prefix, LDM prefix, kind)
built from the component's config, so any size of the same architecture converts, the tiny
test models included. `kind` names the renames inside the module (resnet and VAE attention
layers are spelled differently on the two sides).
"""
from __future__ import annotations

from typing import Iterable

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
INNER = {"plain": {}, "unet_resnet": UNET_RESNET, "vae_resnet": VAE_RESNET,
         "vae_attention": VAE_ATTENTION}

PrefixMap = list[tuple[str, str, str]]


def unet_prefix_map(config: dict) -> PrefixMap:
    """(diffusers prefix, LDM prefix, kind) for every module of a UNet2DConditionModel config."""
    lpb = config["layers_per_block"]
    down, up = config["down_block_types"], config["up_block_types"]
    m: PrefixMap = [("time_embedding.linear_1", "time_embed.0", "plain"),
                    ("time_embedding.linear_2", "time_embed.2", "plain"),
                    ("add_embedding.linear_1", "label_emb.0.0", "plain"),
                    ("add_embedding.linear_2", "label_emb.0.2", "plain"),
                    ("conv_in", "input_blocks.0.0", "plain"),
                    ("conv_norm_out", "out.0", "plain"),
                    ("conv_out", "out.2", "plain")]
    for i in range(len(down)):
        for j in range(lpb):
            n = 1 + i * (lpb + 1) + j
            m.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", "unet_resnet"))
            m.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", "plain"))
        if i < len(down) - 1:
            n = 1 + i * (lpb + 1) + lpb
            m.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n}.0.op", "plain"))
    m += [("mid_block.resnets.0", "middle_block.0", "unet_resnet"),
          ("mid_block.attentions.0", "middle_block.1", "plain"),
          ("mid_block.resnets.1", "middle_block.2", "unet_resnet")]
    for i, block_type in enumerate(up):
        for j in range(lpb + 1):
            n = i * (lpb + 1) + j
            m.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", "unet_resnet"))
            m.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", "plain"))
        if i < len(up) - 1:
            n = i * (lpb + 1) + lpb
            slot = 2 if "CrossAttn" in block_type else 1
            m.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{n}.{slot}.conv", "plain"))
    return m


def vae_prefix_map(config: dict) -> PrefixMap:
    """(diffusers prefix, LDM prefix, kind) for every module of an AutoencoderKL config."""
    n, lpb = len(config["block_out_channels"]), config["layers_per_block"]
    m: PrefixMap = [("quant_conv", "quant_conv", "plain"),
                    ("post_quant_conv", "post_quant_conv", "plain")]
    for side in ("encoder", "decoder"):
        m += [(f"{side}.conv_in", f"{side}.conv_in", "plain"),
              (f"{side}.conv_out", f"{side}.conv_out", "plain"),
              (f"{side}.conv_norm_out", f"{side}.norm_out", "plain"),
              (f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", "vae_resnet"),
              (f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", "vae_resnet"),
              (f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", "vae_attention")]
    for i in range(n):
        for j in range(lpb):
            m.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}",
                      "vae_resnet"))
        if i < n - 1:
            m.append((f"encoder.down_blocks.{i}.downsamplers.0.conv",
                      f"encoder.down.{i}.downsample.conv", "plain"))
        for j in range(lpb + 1):
            m.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}",
                      "vae_resnet"))
        if i < n - 1:
            m.append((f"decoder.up_blocks.{i}.upsamplers.0.conv",
                      f"decoder.up.{n - 1 - i}.upsample.conv", "plain"))
    return m


def _rename(key: str, pairs: Iterable[tuple[str, str, str]], forward: bool) -> str | None:
    """Rename one key through the prefix map; None when no prefix matches."""
    best = None
    for dif, ldm, kind in pairs:
        src, dst = (dif, ldm) if forward else (ldm, dif)
        if key.startswith(src + ".") and (best is None or len(src) > len(best[0])):
            best = (src, dst, kind)
    if best is None:
        return None
    src, dst, kind = best
    rest = key[len(src) + 1:]
    inner = INNER[kind] if forward else {v: k for k, v in INNER[kind].items()}
    for a, b in inner.items():
        if rest.startswith(a + "."):
            rest = b + rest[len(a):]
            break
    return f"{dst}.{rest}"


def unet_module_to_ldm(path: str, config: dict) -> str:
    """A diffusers UNet module path as the LDM one, e.g. down_blocks.1.attentions.0.proj_in ->
    input_blocks.4.1.proj_in (no 'model.diffusion_model.' prefix)."""
    new = _rename(path + ".weight", unet_prefix_map(config), forward=True)
    if new is None:
        raise KeyError(f"no LDM name for diffusers UNet module {path!r}")
    return new[:-len(".weight")]


def _is_vae_attention_matrix(key: str) -> bool:
    """VAE mid-block attention q/k/v/out weights: Linear in diffusers, 1x1 Conv in LDM."""
    return ".mid_block.attentions.0." in key and key.endswith(".weight") and any(
        f".{n}.weight" in key for n in ("to_q", "to_k", "to_v", "to_out.0"))


def to_ldm(state: dict, pairs: PrefixMap, ldm_prefix: str, vae: bool = False) -> dict:
    """Diffusers module state dict -> LDM keys under `ldm_prefix`. Unknown keys raise KeyError."""
    out = {}
    for key, value in state.items():
        new = _rename(key, pairs, forward=True)
        if new is None:
            raise KeyError(f"no LDM name for diffusers key {key!r}")
        if vae and _is_vae_attention_matrix(key) and value.ndim == 2:
            value = value[:, :, None, None]
        out[ldm_prefix + new] = value
    return out


def from_ldm(state: dict, pairs: PrefixMap, ldm_prefix: str, vae: bool = False) -> dict:
    """LDM keys under `ldm_prefix` -> diffusers module keys. Keys of other prefixes are ignored."""
    out = {}
    for key in state:  # only this prefix's tensors are read (a LazyState reads on access)
        if not key.startswith(ldm_prefix):
            continue
        new = _rename(key[len(ldm_prefix):], pairs, forward=False)
        if new is None:
            continue
        value = state[key]
        if vae and _is_vae_attention_matrix(new) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def unprefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: state[k] for k in state if k.startswith(prefix)}
