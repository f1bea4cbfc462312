"""Model families as data: one `ModelSpec` per model type says what the architecture is
(resolution, prediction type, where each text encoder lives in the single file and how it
conditions the UNet), and which component configs ship with the package.

In: a model type name. Out: its spec and shipped configs; nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import assets
from ..config.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
COMPONENTS_KEY = "dreambooth.components"
TYPE_KEY = "dreambooth.model_type"


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder: its diffusers component, where it lives in the single file, its form."""
    component: str             # "text_encoder" / "text_encoder_2"
    prefix: str                # key prefix in the single file
    layout: str = "clip"       # "clip": transformers' keys; "openclip": OpenCLIP's (q/k/v fused)
    with_projection: bool = False  # CLIPTextModelWithProjection (SDXL's pooled embedding)
    pad_token: str | None = None   # OpenCLIP pads with "!", CLIP with its end token
    extra_layers: int = 0      # layers in the file past the diffusers model (SD 2.x: the 24th)
    lora_prefix: str = "lora_te"   # kohya LoRA key prefix


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    family: str  # "v1", "v2", "sdxl": single-file layout, conditioning, LDM yaml, LoRA names
    resolution: int
    prediction_type: str  # the scheduler's: "epsilon" or "v_prediction"
    architecture: str  # modelspec.architecture id
    text_encoders: tuple = ()
    schedule_buffers: bool = True  # the LDM DDPM buffers (betas, alphas_cumprod, ...) in the file

    @property
    def components(self) -> tuple:
        return ("unet", "vae", *(s.component for s in self.text_encoders), "scheduler")


V1_TE = (TextEncoderSlot("text_encoder", CLIP_PREFIX),)
V2_TE = (TextEncoderSlot("text_encoder", "cond_stage_model.model.", "openclip", pad_token="!",
                         extra_layers=1),)
XL_TE = (TextEncoderSlot("text_encoder", "conditioner.embedders.0.transformer.",
                         lora_prefix="lora_te1"),
         TextEncoderSlot("text_encoder_2", "conditioner.embedders.1.model.", "openclip",
                         with_projection=True, pad_token="!", lora_prefix="lora_te2"))
SPECS = {
    "v1x": ModelSpec("v1x", "Stable Diffusion 1.x", "v1", 512, "epsilon", "stable-diffusion-v1",
                     V1_TE),
    "v2x-512": ModelSpec("v2x-512", "Stable Diffusion 2.x 512 (epsilon)", "v2", 512, "epsilon",
                         "stable-diffusion-v2-512", V2_TE),
    "v2x-768-v": ModelSpec("v2x-768-v", "Stable Diffusion 2.x 768-v (v-prediction)", "v2", 768,
                           "v_prediction", "stable-diffusion-v2-768-v", V2_TE),
    "sdxl": ModelSpec("sdxl", "Stable Diffusion XL", "sdxl", 1024, "epsilon",
                      "stable-diffusion-xl-v1-base", XL_TE, schedule_buffers=False),
}


def spec_for(model_type: str) -> ModelSpec:
    if model_type not in SPECS:
        raise CheckpointError(f"Model type '{model_type}' is not supported by this version.",
                              "Supported: " + ", ".join(SPECS))
    return SPECS[model_type]


def shipped_configs(model_type: str) -> dict:
    return {name: assets.load_config(model_type, name) for name in spec_for(model_type).components}
