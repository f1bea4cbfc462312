"""Images from the model: class images for prior preservation, and preview samples."""
from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
import torch

from ..config.flux import sample_guidance
from ..model.checkpoint import write_with
from .images import scan_images

CLASS_BATCH = 4


def make_pipeline(comp, unet=None, text_encoder=None, device=None, text_encoder_2=None):
    """The diffusers pipeline of the model's family over the working model (no safety checker,
    no watermark, no downloads): StableDiffusionPipeline, StableDiffusionXLPipeline or
    FluxPipeline / StableDiffusion3Pipeline (its unet: the transformer)."""
    if comp.spec.flow:
        return _flow_pipeline(comp, unet, text_encoder, text_encoder_2)
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    scheduler = DDIMScheduler.from_config(comp.configs["scheduler"])
    parts = dict(vae=comp.vae, text_encoder=text_encoder or comp.text_encoder,
                 tokenizer=comp.tokenizer, unet=unet or comp.unet, scheduler=scheduler)
    if comp.spec.family == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder_2=text_encoder_2 or comp.text_encoder_2,
                                         tokenizer_2=comp.tokenizer_2, add_watermarker=False,
                                         force_zeros_for_empty_prompt=True, **parts)
    else:
        pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flow_pipeline(comp, transformer, text_encoder, text_encoder_2):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    sd3 = {"text_encoder_3": comp.text_encoder_3, "tokenizer_3": comp.tokenizer_3} \
        if comp.spec.family == "sd3" else {}
    pipe = (StableDiffusion3Pipeline if sd3 else FluxPipeline)(
        scheduler=forge_scheduler(comp),
        vae=comp.vae, text_encoder=text_encoder or comp.text_encoder, tokenizer=comp.tokenizer,
        text_encoder_2=text_encoder_2 or comp.text_encoder_2, tokenizer_2=comp.tokenizer_2,
        transformer=transformer or comp.unet, **sd3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Forge's flow predictors (backend/modules/k_prediction.py at dfdcbab6): the noise levels of
# their tables (Flux: 10 000, t shifted by mu, which dev fixes at 1.15, an image of 4096 tokens
# whatever the size, and schnell at 1.0; SD3.5: 1000, shifted by 3.0)
FORGE_MU = {"flux-dev": 1.15, "flux-schnell": 1.0}


def forge_sigmas(spec, steps: int) -> list[float]:
    """The noise levels of `steps` steps of Forge's 'Simple' schedule (modules/sd_schedulers.py),
    the one its 'flux' preset picks: every (table / steps)-th level of the predictor's table from
    the top (the final 0 is the scheduler's)."""
    size = 10000 if spec.family == "flux" else 1000
    ts = [(size - int(x * (size / steps))) / size for x in range(steps)]
    if spec.family == "flux":
        e = math.exp(FORGE_MU[spec.name])
        return [e / (e + (1 / t - 1)) for t in ts]
    return [spec.shift * t / (1 + (spec.shift - 1) * t) for t in ts]


@functools.cache
def _simple_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    class SimpleSchedule(FlowMatchEulerDiscreteScheduler):
        """diffusers' flow-match Euler step (Forge's 'Euler' on a flow model) over Forge's
        'Simple' levels of `spec` (forge_sigmas), whatever sigmas or mu a pipeline passes."""
        spec = None

        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None,
                          **kwargs):
            n = num_inference_steps or len(sigmas)
            levels = np.array(forge_sigmas(self.spec, n), dtype=np.float32)
            super().set_timesteps(n, device=device, sigmas=levels, mu=mu, **kwargs)
    return SimpleSchedule


def forge_scheduler(comp):
    """The scheduler a flow model's class images and previews are drawn with: Forge's default
    sampler and schedule for it ('Euler', 'Simple'); the levels are given unshifted (shift 1)."""
    config = {**comp.configs["scheduler"], "shift": 1.0, "use_dynamic_shifting": False}
    scheduler = _simple_schedule().from_config(config)
    scheduler.spec = comp.spec
    return scheduler


def sample_settings(comp, guidance_scale: float) -> tuple[float, dict]:
    """(guidance, the pipeline's other arguments) a model samples with: SD's classifier-free
    guidance as configured; Flux and SD3.5: guidance_scale, or Forge's default while it keeps
    SD's (config.flux.sample_guidance), and T5's tokens as training reads them."""
    if not comp.spec.flow:
        return guidance_scale, {}
    tokenizer = comp.tokenizer_3 if comp.spec.family == "sd3" else comp.tokenizer_2
    return sample_guidance(comp.model_type, guidance_scale), {  # spec.t5_tokens
        "max_sequence_length": tokenizer.model_max_length}


def preview_prompt(concept) -> str:
    """The prompt a concept's previews are drawn with."""
    return concept.sample_prompt or concept.instance_prompt.replace("[filewords]", "")


def cached_states(comp, cached: dict | None, prompt: str) -> dict | None:
    """The states a flow model's pipeline is given instead of `prompt`, from the feed's cache:
    the prompt's and, for SD3.5 (its CFG), the empty prompt's as the negative, as the pipeline
    would encode them (None: SD's pipelines run their text encoders)."""
    if not comp.spec.flow or not cached:
        return None
    states = dict(cached[prompt])
    if comp.spec.family == "sd3":
        states.update({"negative_" + k: v for k, v in cached[""].items()})
    return states


PIPELINE_NAMES = {"hidden": "prompt_embeds", "pooled": "pooled_prompt_embeds",
                  "negative_hidden": "negative_prompt_embeds",
                  "negative_pooled": "negative_pooled_prompt_embeds"}


def prompt_arguments(prompt: str, n: int, embeds: dict | None) -> dict:
    """The pipeline's prompt arguments for n images: the prompt, or (Flux, SD3.5) its cached
    states (cached_states), which the pipeline takes instead of running the text encoders."""
    if embeds is None:
        return {"prompt": [prompt] * n}
    return {PIPELINE_NAMES[k]: v[None].expand(n, *v.shape) for k, v in embeds.items()}


def slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:60] or "class"


@torch.no_grad()
def generate_images(pipe, prompt: str, count: int, folder: Path, stem: str, start: int,
                    resolution: int, steps: int, guidance: float, seed: int,
                    dtype: torch.dtype = torch.float32, on_image=None,
                    extra: dict | None = None, embeds: dict | None = None) -> list[Path]:
    """Generate `count` images of `prompt` into folder as <stem>_<n>.png, n from `start`
    (`extra`: the pipeline's other arguments, sample_settings; `embeds`: the prompt's cached
    states, prompt_arguments)."""
    device = (getattr(pipe, "unet", None) or pipe.transformer).device
    written = []
    for first in range(0, count, CLASS_BATCH):
        n = min(CLASS_BATCH, count - first)
        gen = torch.Generator(device="cpu").manual_seed(seed + start + first)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            images = pipe(**prompt_arguments(prompt, n, embeds), height=resolution,
                          width=resolution, num_inference_steps=steps, guidance_scale=guidance,
                          generator=gen, **(extra or {})).images
        for k, image in enumerate(images):
            path = folder / f"{stem}_{start + first + k:05d}.png"
            write_with(path, lambda tmp, im=image: im.save(tmp, format="PNG"), overwrite=True)
            written.append(path)
            if on_image:
                on_image(path)
    return written


def ensure_class_images(comp, concept, needed: int, folder: Path, cfg, device, dtype,
                        say, cached: dict | None = None) -> list[Path]:
    """Reuse the class images already in `folder`; generate the missing ones with the base model
    (Flux / SD3.5: from the class prompt's states `cached` by the feed, on the modules the
    trainer placed, T5 parked off the device)."""
    folder.mkdir(parents=True, exist_ok=True)
    found, _bad = scan_images(folder)
    missing = max(0, needed - len(found))
    say(f"Class images for '{concept.class_prompt}': found {len(found)}, generating {missing}.")
    if missing:
        pipe = make_pipeline(comp)
        embeds = cached_states(comp, cached, concept.class_prompt)
        if embeds is None:
            pipe.to(device)
        numbers = [int(m.group(1)) for p in folder.iterdir()
                   if (m := re.fullmatch(r"class_(\d+)\.png", p.name))]
        start = max(numbers, default=-1) + 1
        guidance, extra = sample_settings(comp, cfg.guidance_scale)
        found += generate_images(pipe, concept.class_prompt, missing, folder, "class", start,
                                 cfg.resolution, cfg.class_generation_steps, guidance,
                                 cfg.seed, dtype, extra=extra, embeds=embeds)
    return sorted(found)[:needed]
