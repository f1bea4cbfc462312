"""A Flux.1 working model from the files Forge users have: the transformer as a single file in
BFL's layout (the source checkpoint), CLIP-L and T5-XXL as transformers-layout files, the
autoencoder in BFL's (LDM) layout, T5's tokenizer from a folder the user names; CLIP-L's ships
with the package. Every config comes from the files' own keys and shapes; nothing is downloaded.

In: a TrainingConfig of a flux-* type. Out: Components (unet: the transformer; text_encoder:
CLIP-L, text_encoder_2: T5; vae: the autoencoder), its weights as stored (or in `dtype`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import assets
from ..config.errors import CheckpointError
from . import convert, flux_keys
from .checkpoint import LazyState, open_checkpoint, tensor_shape
from .components import Components, empty_weights, load_module, te_load
from .detect import flux_type
from .spec import spec_for

AE_SCALE, AE_SHIFT = 0.3611, 0.1159  # FLUX.1's autoencoder latents: (z - shift) * scale
CLIP_EXTRA = ("text_projection.weight", "logit_scale")  # in some clip_l files, unused here
SCALES = (".scale_weight", ".scale_input")  # ComfyUI's scaled fp8 files (with 'scaled_fp8')


def clip_config(state, base: tuple = ("v1x", "text_encoder")) -> dict:
    """CLIP-L's text config (the one SD 1.x ships: the same encoder; `base`: another shipped
    one, SDXL's CLIP-G for SD3.5's) sized from a file."""
    cfg = assets.load_config(*base)
    keys = {k.removeprefix("text_model.") for k in state}
    prefix = "text_model." if any(k.startswith("text_model.") for k in state) else ""
    vocab, hidden = tensor_shape(state, prefix + "embeddings.token_embedding.weight")
    cfg.update(vocab_size=vocab, hidden_size=hidden, projection_dim=hidden,
               num_attention_heads=max(1, hidden // 64),
               intermediate_size=tensor_shape(state, prefix + "encoder.layers.0.mlp.fc1.weight")[0],
               max_position_embeddings=tensor_shape(
                   state, prefix + "embeddings.position_embedding.weight")[0],
               num_hidden_layers=flux_keys.count_indices(keys, r"encoder\.layers\.(\d+)\."))
    return {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}


def t5_config(state) -> dict:
    """T5 v1.1's encoder config (gated GELU) sized from a transformers-layout file."""
    attn = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = tensor_shape(state, attn + "relative_attention_bias.weight")
    vocab, width = tensor_shape(state, "shared.weight")
    return {"vocab_size": vocab, "d_model": width, "num_heads": heads,
            "d_kv": tensor_shape(state, attn + "q.weight")[0] // heads,
            "d_ff": tensor_shape(state, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
            "num_layers": flux_keys.count_indices(state, r"encoder\.block\.(\d+)\."),
            "relative_attention_num_buckets": buckets, "relative_attention_max_distance": 128,
            "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False, "use_cache": False,
            "tie_word_embeddings": False, "dropout_rate": 0.0}


def ae_config(state, scale: float = AE_SCALE, shift: float = AE_SHIFT) -> dict:
    """The autoencoder's AutoencoderKL config from a BFL ae file (no quant convs; SD3.5's VAE
    is the same autoencoder with its own latent scale and shift)."""
    cfg = assets.load_config("v1x", "vae")
    levels = flux_keys.count_indices(state, r"encoder\.down\.(\d+)\.")
    blocks = [tensor_shape(state, f"encoder.down.{i}.block.0.conv1.weight")[0]
              for i in range(levels)]
    cfg.update(block_out_channels=blocks, down_block_types=["DownEncoderBlock2D"] * levels,
               up_block_types=["UpDecoderBlock2D"] * levels,
               layers_per_block=flux_keys.count_indices(state, r"encoder\.down\.0\.block\.(\d+)\."),
               latent_channels=tensor_shape(state, "decoder.conv_in.weight")[1],
               use_quant_conv="quant_conv.weight" in state,
               use_post_quant_conv="post_quant_conv.weight" in state,
               scaling_factor=scale, shift_factor=shift)
    return cfg


def sized(read, state, what: str, field: str, kind: str) -> dict:
    """`read(state)`: a part's config from its file's keys and shapes; a file of another kind
    (a T5 given as CLIP-L, an SD VAE as the autoencoder) lacks them, which is said naming the
    field, not raised as a KeyError."""
    try:
        return read(state)
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"The {what} is not a {kind} file (it has no "
                              f"{str(e).strip(chr(39)) or 'such keys'}).",
                              f"Choose the {kind} file in {field}.") from None


def latents_match(vae_config: dict, transformer_config: dict, packed: int, what: str,
                  field: str) -> None:
    """An autoencoder whose latents the transformer can't take (SD's 4 channels for Flux's or
    SD3.5's 16), said before training rather than at the first step."""
    channels = vae_config["latent_channels"]
    if channels * packed != transformer_config["in_channels"]:
        raise CheckpointError(f"The {what} makes {channels}-channel latents; this transformer "
                              f"takes {transformer_config['in_channels'] // packed}.",
                              f"Choose the model's own 16-channel autoencoder in {field}.")


def t5_tokenizer(folder: str, max_length: int):
    """T5's tokenizer from the user's folder, offline."""
    from transformers import T5TokenizerFast
    try:
        tok = T5TokenizerFast.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"The T5 tokenizer in '{folder}' can't be read ({type(e).__name__}"
                              f": {' '.join(str(e).split())[:160]}).", "Give the tokenizer_2 "
                              "folder of FLUX.1-dev (tokenizer.json or spiece.model with its "
                              "tokenizer_config.json).") from None
    if not 0 < tok.model_max_length <= max_length:
        tok.model_max_length = max_length
    return tok


def opened(path: str, what: str) -> LazyState | dict:
    state, _ = open_checkpoint(path)
    name = Path(path).name
    if not len(state):
        raise CheckpointError(f"The {what} file '{name}' holds no tensors.",
                              f"Choose the {what} file.")
    scaled = next((k for k in state if k == "scaled_fp8" or k.endswith(SCALES)), None)
    if scaled is not None:  # its weights mean nothing without their scales
        raise CheckpointError(f"The {what} file '{name}' is a scaled fp8 file (it holds "
                              f"{scaled}), which is not read yet.", "Choose the fp16/bf16 "
                              "file, or a plain fp8 one.")
    return state


def of_type(found: str | None, cfg, what: str, choose: str) -> None:
    """The source checkpoint is `what` (its type `found` from its keys, None: not one) of the
    config's model type, or the user is told which it is."""
    name = Path(cfg.source_checkpoint).name
    if found is None:
        raise CheckpointError(f"'{name}' is not {what}.", f"Choose {choose}.")
    if found != cfg.model_type:
        article = "an" if found.startswith("sd") else "a"  # (said "es-dee")
        raise CheckpointError(f"'{name}' is {article} {found} checkpoint, but the model type is "
                              f"set to {cfg.model_type}.", f"Set the model type to {found}.")


def _transformer(cfg, dtype):
    from diffusers import FluxTransformer2DModel
    name = Path(cfg.source_checkpoint).name
    state = opened(cfg.source_checkpoint, "Flux transformer")
    of_type(flux_type(state), cfg, "a Flux.1 transformer in BFL's layout (no double_blocks.* "
            "keys)", "the transformer file (e.g. flux1-dev.safetensors from Forge's "
            "models/Stable-diffusion)")
    try:
        config, converted = flux_keys.transformer_config(state), flux_keys.to_diffusers(state)
    except KeyError as e:
        raise CheckpointError(f"'{name}' is not a complete Flux.1 transformer ({e.args[0]}).",
                              "Choose the transformer file as Forge or BFL wrote it.") from None
    module = empty(lambda: FluxTransformer2DModel.from_config(config))
    load_module(module, converted, f"Flux transformer '{name}'", dtype)
    return config, module


def empty(build):
    with empty_weights():
        return build()


def _encoders(cfg, dtype) -> tuple[dict, dict]:
    from transformers import CLIPTextConfig, CLIPTextModel
    clip = opened(cfg.flux_clip_l, "CLIP-L")
    configs = {"text_encoder": sized(clip_config, clip, f"CLIP-L text encoder "
                                     f"'{Path(cfg.flux_clip_l).name}'", "flux_clip_l", "CLIP-L")}
    modules = {"text_encoder": empty(lambda: CLIPTextModel(CLIPTextConfig(
        **configs["text_encoder"])))}
    te_load(modules["text_encoder"], {k: clip[k] for k in clip
                                      if k.removeprefix("text_model.") not in CLIP_EXTRA},
            f"CLIP-L text encoder '{Path(cfg.flux_clip_l).name}'", dtype)
    configs["text_encoder_2"], modules["text_encoder_2"] = t5_module(
        opened(cfg.flux_t5xxl, "T5-XXL"), f"T5 text encoder '{Path(cfg.flux_t5xxl).name}'",
        dtype, "flux_t5xxl")
    return configs, modules


def t5_module(t5, what: str, dtype, field: str) -> tuple[dict, object]:
    """(config, T5EncoderModel) of a transformers-layout T5 state (its tied embedding filled
    from `shared` where the file leaves it out)."""
    from transformers import T5Config, T5EncoderModel
    config = sized(t5_config, t5, what, field, "T5-XXL")
    module = empty(lambda: T5EncoderModel(T5Config(**config)))
    wanted = set(module.state_dict())
    state = {k: t5[k] for k in t5 if k in wanted}
    if "encoder.embed_tokens.weight" in wanted and "encoder.embed_tokens.weight" not in state:
        state["encoder.embed_tokens.weight"] = state.get("shared.weight")  # tied in T5
    load_module(module, state, what, dtype)
    return config, module


def _ae(cfg, dtype):
    from diffusers import AutoencoderKL
    state = opened(cfg.flux_ae, "autoencoder")
    config = sized(ae_config, state, f"autoencoder '{Path(cfg.flux_ae).name}'", "flux_ae",
                   "Flux autoencoder (ae)")
    module = empty(lambda: AutoencoderKL.from_config(config))
    load_module(module, convert.from_ldm(state, convert.vae_prefix_map(config), "", vae=True),
                f"autoencoder '{Path(cfg.flux_ae).name}'", dtype)
    return config, module


def scheduler_config(spec) -> dict:
    """FLUX.1's own (dev: shift 3, shifted by the image's size when sampling; schnell: none);
    training draws its timesteps with spec.shift (training/flow.py)."""
    dynamic = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
               "base_image_seq_len": 256, "max_image_seq_len": 4096} if spec.shift != 1 else {}
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
            "shift": spec.shift, **dynamic}


def load_flux(cfg, dtype: torch.dtype | None = torch.float32) -> Components:
    """The Flux working model of `cfg` (weights in `dtype`; None: as stored)."""
    spec = spec_for(cfg.model_type)
    unet_config, transformer = _transformer(cfg, dtype)
    configs, encoders = _encoders(cfg, dtype)
    vae_config, vae = _ae(cfg, dtype)
    latents_match(vae_config, unet_config, 4, f"autoencoder '{Path(cfg.flux_ae).name}'",
                  "flux_ae")  # (2x2 patches of latents per token)
    configs.update(unet=unet_config, vae=vae_config, scheduler=scheduler_config(spec))
    tokenizer_2 = t5_tokenizer(cfg.t5_tokenizer_dir, spec.t5_tokens)
    return Components(cfg.model_type, configs, transformer, vae, encoders["text_encoder"],
                      assets.load_tokenizer(), text_encoder_2=encoders["text_encoder_2"],
                      tokenizer_2=tokenizer_2)


# FLUX.1's parts at full size, as their files give them (flux_keys.transformer_config, t5_config,
# clip_config, ae_config read these off BFL's, Forge's and transformers' files; the tests check
# it): for counting on the meta device (the memory estimate, the step profile).
FULL_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                    "attention_head_dim": 128, "num_attention_heads": 24,
                    "joint_attention_dim": 4096, "pooled_projection_dim": 768,
                    "axes_dims_rope": [16, 56, 56]}
FULL_T5 = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
           "num_heads": 64, "relative_attention_num_buckets": 32}
FULL_AE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
           "latent_channels": 16}


def full_size_configs(model_type: str, blocks: tuple[int, int] | None = None) -> dict:
    """FLUX.1 dev's or schnell's component configs at full size; `blocks`: (double, single)
    blocks instead of (19, 38), at the full width (a shorter model for quick counts)."""
    spec = spec_for(model_type)
    unet = {**FULL_TRANSFORMER, "guidance_embeds": spec.guidance is not None}
    if blocks is not None:
        unet.update(num_layers=blocks[0], num_single_layers=blocks[1])
    clip = {k: v for k, v in assets.load_config("v1x", "text_encoder").items()
            if k not in ("architectures", "model_type")}
    t5 = {**FULL_T5, "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
          "is_encoder_decoder": False, "use_cache": False, "tie_word_embeddings": False}
    ae = assets.load_config("v1x", "vae")
    levels = len(FULL_AE["block_out_channels"])
    ae.update(FULL_AE, down_block_types=["DownEncoderBlock2D"] * levels,
              up_block_types=["UpDecoderBlock2D"] * levels, use_quant_conv=False,
              use_post_quant_conv=False, scaling_factor=AE_SCALE, shift_factor=AE_SHIFT)
    return {"unet": unet, "text_encoder": clip, "text_encoder_2": t5, "vae": ae,
            "scheduler": scheduler_config(spec)}


def build_meta_flux(model_type: str, configs: dict | None = None) -> Components:
    """A Flux working model on the meta device (shapes, no memory), full size unless `configs`
    (as full_size_configs gives them) say otherwise; no tokenizers."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    configs = configs or full_size_configs(model_type)
    with torch.device("meta"):
        modules = (FluxTransformer2DModel.from_config(configs["unet"]),
                   AutoencoderKL.from_config(configs["vae"]),
                   CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])))
        t5 = T5EncoderModel(T5Config(**configs["text_encoder_2"]))
    return Components(model_type, configs, *modules, None, text_encoder_2=t5)
