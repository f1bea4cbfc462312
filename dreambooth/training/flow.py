"""Flux's objective, rectified flow, as diffusers' train_dreambooth_lora_flux.py trains it: a
point between the latents (t = 0) and noise (t = 1), x_t = (1 - t) x_0 + t e, with t drawn
uniformly and shifted toward noise by the spec's shift (t' = s t / (1 + (s - 1) t)); the
transformer reads x_t as packed 2x2 patches with their positions, the text as T5's states with
CLIP's pooled vector, t (and, for dev, the guidance it was distilled with) and predicts the
velocity e - x_0. Pure helpers and one step, tested against independent sums.

SD3.5, as diffusers' train_dreambooth_lora_sd3.py trains it by default: the same interpolation,
t drawn logit-normal (sigmoid of a standard normal) as an index into SD3's scheduler (shift 3),
the MMDiT reading x_t unpacked with t x 1000, its output preconditioned (x_t - t v, "as in
EDM") against x_0, which is t^2 times the velocity loss with no further weighting."""
from __future__ import annotations

import torch

from . import backends
from .loss import draw_noise, dreambooth_loss, take_rows


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: each 2x2 patch one token (channels, then the patch)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """pack's inverse, for latents of height h and width w."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """[(h/2) (w/2), 3]: each packed token's (0, row, column), its rotary position."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift of flow matching schedulers (shift 1: t itself)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_loss(transformer, latents, cond: dict, noise, sigmas, n_instance: int,
              prior_weight: float, guidance: float | None) -> tuple:
    """Interpolate, predict the velocity and return dreambooth_loss(...) against e - x_0."""
    b, _, h, w = latents.shape
    s = sigmas.reshape(-1, 1, 1, 1).to(latents.dtype)
    noisy = (1 - s) * latents + s * noise
    hidden = cond["hidden"]
    extra = {} if guidance is None else {
        "guidance": torch.full((b,), guidance, device=latents.device, dtype=torch.float32)}
    pred = transformer(hidden_states=pack(noisy), timestep=sigmas,
                       pooled_projections=cond["pooled"], encoder_hidden_states=hidden,
                       txt_ids=torch.zeros(hidden.shape[1], 3, device=latents.device),
                       img_ids=image_ids(h, w, latents.device), return_dict=False, **extra)[0]
    return dreambooth_loss(unpack(pred, h, w), noise - latents, n_instance, prior_weight)


def sd3_draws(gen, n: int, scheduler) -> tuple:
    """(sigmas, timesteps) of n samples: a logit-normal u picks the scheduler's step
    int(u x 1000), as the SD3 script's compute_density_for_timestep_sampling('logit_normal')
    (the trainer's own scheduler: its tables move to the generator's device)."""
    u = torch.sigmoid(torch.randn((n,), generator=gen, device=gen.device))
    if scheduler.sigmas.device != gen.device:  # the tables to the device once, not each step
        scheduler.sigmas = scheduler.sigmas.to(gen.device)  # (a copy that waits for the host)
        scheduler.timesteps = scheduler.timesteps.to(gen.device)
    sigmas = scheduler.sigmas
    index = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(sigmas) - 1)
    return sigmas[index], scheduler.timesteps[index]


def sd3_loss(transformer, latents, cond: dict, noise, sigmas, timesteps, n_instance: int,
             prior_weight: float) -> tuple:
    """Interpolate, predict, precondition (x_t - t v) and return dreambooth_loss against x_0."""
    s = sigmas.reshape(-1, 1, 1, 1).to(latents.dtype)
    noisy = (1 - s) * latents + s * noise
    pred = transformer(hidden_states=noisy, timestep=timesteps,
                       encoder_hidden_states=cond["hidden"], pooled_projections=cond["pooled"],
                       return_dict=False)[0]
    return dreambooth_loss(noisy - s * pred, latents, n_instance, prior_weight)


def frozen_dtype(comp, module, device: torch.device) -> torch.dtype:
    """The dtype a frozen module runs in on `device` (to cache the prompts and latents, and for
    previews): fp32, but Flux's and SD3.5's text encoders on a GPU in bf16 (T5-XXL's 4.8B
    weights: 17.7 GiB in fp32, 8.9 in bf16; T5 overflows in fp16, not in bf16). They run once,
    to cache the prompts, and leave the GPU (Trainer.park_frozen)."""
    if comp.spec.flow and device.type == "cuda" and \
            any(module is te for te in comp.text_encoders):
        return torch.bfloat16
    return torch.float32


def big_text_encoder(comp):
    """The text encoder a flow model's previews and class images run without, their prompts'
    states cached beforehand (DataFeed): T5-XXL (8.9 GiB in bf16), which would not fit a 16 GB
    card beside the fp8 transformer (Flux: 11.1 GiB); None for the other families. The CLIPs
    stay (1.6 GiB at most), so the pipeline keeps finding its device where it computes."""
    return {"flux": comp.text_encoder_2, "sd3": comp.text_encoder_3}.get(comp.spec.family)


def preview_modules(comp, frozen: list) -> list:
    """The frozen modules previews need on the GPU: all but T5 (big_text_encoder)."""
    big = big_text_encoder(comp)
    return [m for m in frozen if m is not big]


def ready_to_generate(trainer) -> None:
    """Before class images are made: T5 leaves the GPU (the prompts' states are cached:
    DataFeed.collect), then the transformer comes to it, so the two never share it."""
    big = big_text_encoder(trainer.comp)
    if big is not None and trainer.device.type == "cuda":
        backends.park([big], trainer.stored)
    trainer.place_unet()


def flow_step(trainer, order, b: int, rng, gen) -> tuple:
    """Trainer.step_loss for Flux and SD3.5: the batch, its noise and timesteps (drawn for the
    whole global batch, as step_draws does), the loss."""
    cfg, spec, device = trainer.cfg, trainer.comp.spec, trainer.device
    latents, cond, _, n_inst, rows, n_global = trainer.feed.batch(order, b, rng, gen, None)
    noise = draw_noise((n_global, *latents.shape[1:]), gen, gen.device, cfg.offset_noise)
    cond = {k: v.to(device) for k, v in cond.items()}
    if spec.family == "sd3":
        sigmas, timesteps = sd3_draws(gen, n_global, trainer.scheduler)
        return sd3_loss(trainer.models[0], latents, cond, take_rows(noise, rows),
                        take_rows(sigmas, rows), take_rows(timesteps, rows), n_inst,
                        cfg.prior_loss_weight)
    sigmas = shifted(torch.rand((n_global,), generator=gen, device=gen.device), spec.shift)
    return flow_loss(trainer.models[0], latents, cond, take_rows(noise, rows),
                     take_rows(sigmas, rows), n_inst, cfg.prior_loss_weight, spec.guidance)
