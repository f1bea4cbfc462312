"""A tiny SD3.5 (medium: one of its two joint blocks with MMDiT-X's second attention; large:
none) as Forge users have it, for the tests (and a quick try): the MMDiT in SAI's layout, CLIP-L,
CLIP-G and T5 in transformers' layout, the VAE in LDM's, either all in one file (under
model.diffusion_model., text_encoders.*, first_stage_model.) or as five files; and a T5
tokenizer folder. The real blocks and key layouts, few channels.
"""
from __future__ import annotations

from pathlib import Path

from .tiny_flux import LATENT_CHANNELS, t5_state, tiny_ae, tiny_t5, tiny_t5_tokenizer

CLIP_WIDTH = 16  # CLIP-L's and CLIP-G's: side by side they fill T5's 32


def _transformer(model_type: str):
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel(
        patch_size=2, in_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_WIDTH, out_channels=LATENT_CHANNELS,
        pos_embed_max_size=16, qk_norm="rms_norm",
        dual_attention_layers=(0,) if model_type == "sd3.5-medium" else ())


def _clip(base: tuple):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    from .. import assets
    cfg = {k: v for k, v in assets.load_config(*base).items()
           if k not in ("architectures", "model_type")}
    cfg.update(hidden_size=CLIP_WIDTH, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=1, projection_dim=CLIP_WIDTH)
    return CLIPTextModelWithProjection(CLIPTextConfig(**cfg))


def make_tiny_sd35(folder: str | Path, model_type: str = "sd3.5-medium", seed: int = 0,
                   all_in_one: bool = True) -> dict:
    """Write a tiny SD3.5's files into `folder`; returns the config fields naming them
    (source_checkpoint, t5_tokenizer_dir and, unless `all_in_one`, the four sd35_* files)."""
    import torch
    from safetensors.torch import save_file
    from . import convert, sd35_keys
    from .components import te_state
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    mmdit = _transformer(model_type)
    dual = tuple(mmdit.config.dual_attention_layers)
    parts = {"model.diffusion_model.": sd35_keys.to_sai(mmdit.state_dict(), 2, dual),
             "text_encoders.clip_l.transformer.": te_state(_clip(("v1x", "text_encoder"))),
             "text_encoders.clip_g.transformer.": te_state(_clip(("sdxl", "text_encoder_2"))),
             "text_encoders.t5xxl.transformer.": t5_state(tiny_t5())}
    ae = tiny_ae()
    parts["first_stage_model."] = convert.to_ldm(
        ae.state_dict(), convert.vae_prefix_map(dict(ae.config)), "", vae=True)
    source = folder / f"tiny_{model_type}.safetensors"
    out = {"source_checkpoint": str(source),
           "t5_tokenizer_dir": str(tiny_t5_tokenizer(folder / "t5_tokenizer"))}
    if all_in_one:
        save_file({p + k: v.contiguous() for p, state in parts.items()
                   for k, v in state.items()}, str(source))
        return out
    names = dict(zip(parts, ("", "clip_l", "clip_g", "t5xxl", "vae")))
    for prefix, state in parts.items():
        path = source if not names[prefix] else folder / f"{names[prefix]}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        if names[prefix]:
            out[f"sd35_{names[prefix]}"] = str(path)
    return out
