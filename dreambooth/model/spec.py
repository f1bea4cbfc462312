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
    family: str  # "v1", "v2", "sdxl", "flux", "sd3": single-file layout, conditioning, LDM yaml, LoRA names
    resolution: int
    prediction_type: str  # the scheduler's: "epsilon", "v_prediction" or "flow"
    architecture: str  # modelspec.architecture id
    text_encoders: tuple = ()
    # the computed (not learned) buffers the original architecture's checkpoints carry, each
    # [num_train_timesteps] and fp32 in every save precision
    buffers: tuple = ()
    # flow matching (Flux, SD3.5): the timestep shift, the guidance the transformer is given (dev's
    # guidance embedding; None: none), the tokens of T5 read
    shift: float = 1.0
    guidance: float | None = None
    t5_tokens: int = 0

    @property
    def flow(self) -> bool:
        """A flow-matching transformer (Flux, SD3.5): its text states cached, T5 kept parked."""
        return self.prediction_type == "flow"

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
LDM_BUFFERS = (  # ldm.models.diffusion.ddpm.LatentDiffusion.register_schedule
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2")
SGM_BUFFERS = ("denoiser.sigmas",)  # sgm DiffusionEngine's DiscreteDenoiser
FLUX_TE = (TextEncoderSlot("text_encoder", "", lora_prefix="lora_te1"),
           TextEncoderSlot("text_encoder_2", "", "t5", lora_prefix="lora_te2"))
SD3_TE = (TextEncoderSlot("text_encoder", "text_encoders.clip_l.transformer.",
                          with_projection=True, lora_prefix="lora_te1"),
          TextEncoderSlot("text_encoder_2", "text_encoders.clip_g.transformer.",
                          with_projection=True, pad_token="!", lora_prefix="lora_te2"),
          TextEncoderSlot("text_encoder_3", "text_encoders.t5xxl.transformer.", "t5",
                          lora_prefix="lora_te3"))
SPECS = {
    "v1x": ModelSpec("v1x", "Stable Diffusion 1.x", "v1", 512, "epsilon", "stable-diffusion-v1",
                     V1_TE, LDM_BUFFERS),
    "v2x-512": ModelSpec("v2x-512", "Stable Diffusion 2.x 512 (epsilon)", "v2", 512, "epsilon",
                         "stable-diffusion-v2-512", V2_TE, LDM_BUFFERS),
    "v2x-768-v": ModelSpec("v2x-768-v", "Stable Diffusion 2.x 768-v (v-prediction)", "v2", 768,
                           "v_prediction", "stable-diffusion-v2-768-v", V2_TE, LDM_BUFFERS),
    "sdxl": ModelSpec("sdxl", "Stable Diffusion XL", "sdxl", 1024, "epsilon",
                      "stable-diffusion-xl-v1-base", XL_TE, SGM_BUFFERS),
    # as diffusers' train_dreambooth_lora_flux.py trains them: its scheduler's shift, its
    # default guidance 3.5 (dev), T5's 512 tokens (schnell: 256, as its pipeline reads)
    "flux-dev": ModelSpec("flux-dev", "FLUX.1 [dev]", "flux", 1024, "flow", "flux-1-dev",
                          FLUX_TE, shift=3.0, guidance=3.5, t5_tokens=512),
    "flux-schnell": ModelSpec("flux-schnell", "FLUX.1 [schnell]", "flux", 1024, "flow",
                              "flux-1-schnell", FLUX_TE, shift=1.0, t5_tokens=256),
    # as diffusers' train_dreambooth_lora_sd3.py trains them: SD3's scheduler (shift 3.0),
    # T5's 77 tokens (its max_sequence_length)
    "sd3.5-medium": ModelSpec("sd3.5-medium", "Stable Diffusion 3.5 Medium", "sd3", 1024,
                              "flow", "stable-diffusion-3.5-medium", SD3_TE, shift=3.0,
                              t5_tokens=77),
    "sd3.5-large": ModelSpec("sd3.5-large", "Stable Diffusion 3.5 Large", "sd3", 1024, "flow",
                             "stable-diffusion-3.5-large", SD3_TE, shift=3.0, t5_tokens=77),
}


def spec_for(model_type: str) -> ModelSpec:
    if model_type not in SPECS:
        raise CheckpointError(f"Model type '{model_type}' is not supported by this version.",
                              "Supported: " + ", ".join(SPECS))
    return SPECS[model_type]


def shipped_configs(model_type: str) -> dict:
    return {name: assets.load_config(model_type, name) for name in spec_for(model_type).components}
