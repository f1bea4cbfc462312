"""A tiny Flux.1 as Forge users have it, for the tests (and a quick try): the transformer as a
single file in BFL's layout, clip_l / t5xxl in transformers' layout, ae in BFL's (LDM) layout,
and a T5 tokenizer folder (a word-level tokenizer.json built here). The real blocks and key
layouts, few channels: it loads, trains and saves through exactly the code a real one does.
"""
from __future__ import annotations

import json
from pathlib import Path

WORDS = ("a", "photo", "of", "sks", "dog", "cat", "checker", "blob", "red", "blue", "the", "in")
LATENT_CHANNELS = 4


def tiny_t5_tokenizer(folder: Path, max_length: int = 16) -> Path:
    """A T5-style Unigram tokenizer of a few words (pad 0, end 1, unknown 2; words after the
    '▁' that marks a space, as T5's sentencepiece model has them) as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    folder.mkdir(parents=True, exist_ok=True)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + \
        [("▁" + w, -1.0 - i / 100) for i, w in enumerate(WORDS)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "model_max_length": max_length, "extra_ids": 0,
        "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder


def _transformer(dev: bool):
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel(in_channels=4 * LATENT_CHANNELS, num_layers=1,
                                  num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=dev,
                                  axes_dims_rope=(4, 6, 6))


def _encoders():
    from transformers import CLIPTextConfig, CLIPTextModel
    from .. import assets
    clip = {k: v for k, v in assets.load_config("v1x", "text_encoder").items()
            if k not in ("architectures", "model_type")}
    clip.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=1, projection_dim=32)
    return CLIPTextModel(CLIPTextConfig(**clip)), tiny_t5()


def tiny_t5():
    """A T5 v1.1 encoder (gated GELU) 32 wide over the tiny tokenizer's words."""
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(
        vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False))


def t5_state(t5) -> dict:
    """A T5 encoder's weights as its single files hold them (the tied embedding once)."""
    return {k: v.contiguous() for k, v in t5.state_dict().items()
            if k != "encoder.embed_tokens.weight"}


def tiny_ae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=[32, 32], layers_per_block=1,
                         down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=LATENT_CHANNELS, use_quant_conv=False,
                         use_post_quant_conv=False)


def make_tiny_flux(folder: str | Path, model_type: str = "flux-dev", seed: int = 0,
                   prefix: str = "") -> dict:
    """Write a tiny Flux's files into `folder`; returns the config fields naming them
    (source_checkpoint, flux_clip_l, flux_t5xxl, flux_ae, t5_tokenizer_dir). `prefix`: the
    transformer's keys under it (the all-in-one files' 'model.diffusion_model.')."""
    import torch
    from safetensors.torch import save_file
    from . import convert, flux_keys
    from .components import te_state
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    dev = model_type == "flux-dev"
    transformer, (clip, t5), ae = _transformer(dev), _encoders(), tiny_ae()
    bfl = flux_keys.to_bfl(transformer.state_dict(), 1, 1, dev)
    files = {"source_checkpoint": folder / f"tiny_{model_type}.safetensors",
             "flux_clip_l": folder / "clip_l.safetensors",
             "flux_t5xxl": folder / "t5xxl.safetensors", "flux_ae": folder / "ae.safetensors"}
    save_file({prefix + k: v.contiguous() for k, v in bfl.items()},
              str(files["source_checkpoint"]))
    save_file({k: v.contiguous() for k, v in te_state(clip).items()}, str(files["flux_clip_l"]))
    save_file(t5_state(t5), str(files["flux_t5xxl"]))
    ldm = convert.to_ldm(ae.state_dict(), convert.vae_prefix_map(dict(ae.config)), "", vae=True)
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(files["flux_ae"]))
    out = {k: str(v) for k, v in files.items()}
    out["t5_tokenizer_dir"] = str(tiny_t5_tokenizer(folder / "t5_tokenizer"))
    return out
