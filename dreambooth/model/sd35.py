"""An SD3.5 (medium, large) working model from the files Forge users have: the MMDiT as a single
file in SAI's layout (the source checkpoint), and each other part from that file where it holds
it (the all-in-one files: text_encoders.clip_l / clip_g / t5xxl in transformers' layout,
first_stage_model in LDM's) or from its own file (the sd35_* fields). The MMDiT is converted by
diffusers' single-file converter; the configs come from the files' keys and shapes; CLIP-L's
and CLIP-G's tokenizer is the one shipped (SD3's two are the same BPE vocabulary; CLIP-G pads
with '!'), T5's from a folder. Nothing is downloaded.

In: a TrainingConfig of an sd3.5-* type. Out: Components (unet: the MMDiT; text_encoder:
CLIP-L, text_encoder_2: CLIP-G, text_encoder_3: T5; vae).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .. import assets
from ..config.errors import CheckpointError
from . import convert, sd35_keys
from .checkpoint import tensor_dtype, tensor_shape
from .components import Components, load_module, te_load
from .detect import sd3_prefix, sd35_type
from .flux import (ae_config, clip_config, empty, latents_match, of_type, opened, sized,
                   t5_module, t5_tokenizer)
from .spec import spec_for

VAE_SCALE, VAE_SHIFT = 1.5305, 0.0609  # SD3's VAE latents: (z - shift) * scale
# field -> (its prefix in an all-in-one file, what it is, e.g. its file in Forge's folders)
PARTS = {"sd35_clip_l": ("text_encoders.clip_l.transformer.", "CLIP-L text encoder",
                         "models/text_encoder/clip_l.safetensors"),
         "sd35_clip_g": ("text_encoders.clip_g.transformer.", "CLIP-G text encoder",
                         "models/text_encoder/clip_g.safetensors"),
         "sd35_t5xxl": ("text_encoders.t5xxl.transformer.", "T5-XXL text encoder",
                        "models/text_encoder/t5xxl_fp16.safetensors"),
         "sd35_vae": ("first_stage_model.", "VAE", "the VAE of the SD3.5 release")}


class Part(Mapping):
    """The keys of `state` under `prefix`, without it (read on access, shapes from the
    header where the state has one)."""

    def __init__(self, state, prefix: str) -> None:
        self.state, self.prefix = state, prefix
        self.keys_ = [k[len(prefix):] for k in state if k.startswith(prefix)]

    def __getitem__(self, key):
        return self.state[self.prefix + key]

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)

    def shape(self, key: str) -> tuple:
        return tensor_shape(self.state, self.prefix + key)


def part(cfg, source, field: str) -> tuple[Mapping, str]:
    """(state, name for messages) of one part: its own file where the field names one, else
    the checkpoint's keys under the part's prefix."""
    prefix, what, example = PARTS[field]
    path = getattr(cfg, field).strip()
    if path:
        state = opened(path, what)
        return (Part(state, prefix) if any(k.startswith(prefix) for k in state) else state,
                f"{what} '{Path(path).name}'")
    found = Part(source, prefix)
    if not len(found):
        raise CheckpointError(f"'{Path(cfg.source_checkpoint).name}' holds no {what} and "
                              f"{field} is empty.", f"Give the {what} file in {field} (e.g. "
                              f"Forge's {example}).")
    return found, f"{what} of '{Path(cfg.source_checkpoint).name}'"


def _transformer(cfg, source, dtype):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import \
        convert_sd3_transformer_checkpoint_to_diffusers as convert_sd3
    name = Path(cfg.source_checkpoint).name
    of_type(sd35_type(source), cfg, "an SD3.5 MMDiT in SAI's layout (no joint_blocks.* keys "
            "with qk norms)", "the SD3.5 checkpoint (e.g. sd3.5_medium.safetensors)")
    prefix = sd3_prefix(source)
    config = sd35_keys.transformer_config(source)
    mmdit = Part(source, prefix)
    state = {k: mmdit[k] for k in mmdit if k.split(".")[0] in sd35_keys.TOP}
    try:
        converted = convert_sd3(state)  # diffusers' converter: pops what it maps
    except KeyError as e:
        raise CheckpointError(f"'{name}' is not a complete SD3.5 MMDiT (it lacks {e.args[0]}).",
                              "Choose the checkpoint as Forge or Stability AI wrote it.") from None
    if state:  # what the converter left: not an MMDiT of SD3.5's
        raise CheckpointError(f"'{name}' holds {len(state)} MMDiT keys SD3.5 does not have "
                              f"(e.g. {sorted(state)[0]}).", "Choose an SD3.5 medium or large "
                              "checkpoint as Forge or Stability AI wrote it.")
    module = empty(lambda: SD3Transformer2DModel.from_config(config))
    load_module(module, converted, f"SD3.5 MMDiT '{name}'", dtype)
    return config, module


def _clip(cfg, source, field: str, base: tuple, dtype):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    state, what = part(cfg, source, field)
    config = sized(lambda s: clip_config(s, base), state, what, field,
                   "CLIP-G" if field.endswith("_g") else "CLIP-L")
    module = empty(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**config)))
    weights = {k: state[k] for k in state if k != "logit_scale"}
    if "text_projection.weight" not in weights:  # as ComfyUI: the identity where a file has none
        weights["text_projection.weight"] = torch.eye(config["hidden_size"],
                                                      dtype=tensor_dtype(state, next(iter(state))))
    te_load(module, weights, what, dtype)
    return config, module


def _vae(cfg, source, dtype):
    from diffusers import AutoencoderKL
    state, what = part(cfg, source, "sd35_vae")
    config = sized(lambda s: ae_config(s, VAE_SCALE, VAE_SHIFT), state, what, "sd35_vae",
                   "SD3.5 VAE")
    module = empty(lambda: AutoencoderKL.from_config(config))
    load_module(module, convert.from_ldm(state, convert.vae_prefix_map(config), "", vae=True),
                what, dtype)
    return config, module


def scheduler_config() -> dict:
    """SD3's (the stable-diffusion-3-medium-diffusers scheduler Forge ships): shift 3.0."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
            "shift": 3.0}


def load_sd35(cfg, dtype: torch.dtype | None = torch.float32) -> Components:
    """The SD3.5 working model of `cfg` (weights in `dtype`; None: as stored)."""
    spec = spec_for(cfg.model_type)
    source = opened(cfg.source_checkpoint, "SD3.5 checkpoint")
    configs, modules = {}, {}
    configs["unet"], modules["unet"] = _transformer(cfg, source, dtype)
    configs["text_encoder"], modules["text_encoder"] = _clip(
        cfg, source, "sd35_clip_l", ("v1x", "text_encoder"), dtype)
    configs["text_encoder_2"], modules["text_encoder_2"] = _clip(
        cfg, source, "sd35_clip_g", ("sdxl", "text_encoder_2"), dtype)
    t5, what = part(cfg, source, "sd35_t5xxl")
    configs["text_encoder_3"], modules["text_encoder_3"] = t5_module(t5, what, dtype,
                                                                     "sd35_t5xxl")
    configs["vae"], modules["vae"] = _vae(cfg, source, dtype)
    latents_match(configs["vae"], configs["unet"], 1, "VAE", "sd35_vae")
    configs["scheduler"] = scheduler_config()
    return Components(cfg.model_type, configs, modules["unet"], modules["vae"],
                      modules["text_encoder"], assets.load_tokenizer(),
                      text_encoder_2=modules["text_encoder_2"],
                      tokenizer_2=assets.load_tokenizer(pad_token="!"),
                      text_encoder_3=modules["text_encoder_3"],
                      tokenizer_3=t5_tokenizer(cfg.t5_tokenizer_dir, spec.t5_tokens))


# SD3.5's MMDiTs at full size, as sd35_keys.transformer_config reads them off SAI's files (the
# tests' MEDIUM / LARGE, checked against diffusers' converter): for counting on the meta device
# (the memory estimate, the step profile). blocks: (MMDiT-X blocks with a second attention,
# other blocks) before the last one, which drops the text stream's output.
FULL_MMDIT = {"sd3.5-medium": ({"num_attention_heads": 24, "caption_projection_dim": 1536,
                                "pos_embed_max_size": 384}, (13, 10)),
              "sd3.5-large": ({"num_attention_heads": 38, "caption_projection_dim": 2432,
                               "pos_embed_max_size": 192}, (0, 37))}


def full_size_configs(model_type: str, blocks: tuple[int, int] | None = None) -> dict:
    """SD3.5 medium's or large's component configs at full size; `blocks`: (dual-attention,
    other) blocks before the last instead of the full size's (FULL_MMDIT), at the full width."""
    from .flux import FULL_AE, full_size_configs as flux_configs
    wide, full = FULL_MMDIT[model_type]
    dual, other = blocks or full
    unet = {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2,
            "in_channels": 16, "num_layers": dual + other + 1, "attention_head_dim": 64,
            "joint_attention_dim": 4096, "pooled_projection_dim": 2048, "out_channels": 16,
            "dual_attention_layers": tuple(range(dual)), "qk_norm": "rms_norm", **wide}
    flux = flux_configs("flux-schnell")
    clips = [{k: v for k, v in assets.load_config(*base).items()
              if k not in ("architectures", "model_type")} for base in
             (("v1x", "text_encoder"), ("sdxl", "text_encoder_2"))]
    clips[0]["projection_dim"] = clips[0]["hidden_size"]  # (as clip_config reads the files)
    vae = {**flux["vae"], **FULL_AE, "scaling_factor": VAE_SCALE, "shift_factor": VAE_SHIFT}
    return {"unet": unet, "text_encoder": clips[0], "text_encoder_2": clips[1],
            "text_encoder_3": flux["text_encoder_2"], "vae": vae, "scheduler": scheduler_config()}


def build_meta_sd35(model_type: str, configs: dict | None = None) -> Components:
    """An SD3.5 working model on the meta device (shapes, no memory), full size unless
    `configs` (as full_size_configs gives them) say otherwise; no tokenizers."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)
    configs = configs or full_size_configs(model_type)
    with torch.device("meta"):
        clips = [CLIPTextModelWithProjection(CLIPTextConfig(**configs[name]))
                 for name in ("text_encoder", "text_encoder_2")]
        mmdit = SD3Transformer2DModel.from_config(configs["unet"]).to("meta")  # (diffusers <
        # 0.32 makes its positions with numpy: on the CPU whatever the default device)
        return Components(model_type, configs, mmdit,
                          AutoencoderKL.from_config(configs["vae"]), clips[0], None,
                          text_encoder_2=clips[1],
                          text_encoder_3=T5EncoderModel(T5Config(**configs["text_encoder_3"])))
