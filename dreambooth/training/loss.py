"""The maths of one DreamBooth step, as pure functions (tested against independent sums)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config.errors import TrainingError


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights per sample (Hang et al. 2023), for epsilon or v targets."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    weights = torch.clamp(snr, max=gamma) / snr
    if scheduler.config.prediction_type == "v_prediction":
        weights = torch.clamp(snr, max=gamma) / (snr + 1.0)
    return weights


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int,
                    prior_weight: float, weights: torch.Tensor | None = None) -> tuple:
    """(total, instance, prior) loss: the first n_instance samples are the instance half of the
    batch, the rest the class half; total = instance mse + prior_weight x class mse."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    if weights is not None:
        per_sample = per_sample * weights
    instance = per_sample[:n_instance].mean()
    if per_sample.shape[0] > n_instance:
        prior = per_sample[n_instance:].mean()
        return instance + prior_weight * prior, instance, prior
    return instance, instance, torch.zeros_like(instance)


def draw_noise(shape, generator: torch.Generator | None, device, offset: float = 0.0
               ) -> torch.Tensor:
    """fp32 Gaussian noise of `shape` drawn on `device`; `offset`: a per-channel shift."""
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if offset:
        shift = torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=device,
                            dtype=torch.float32)
        noise = noise + offset * shift
    return noise


def step_draws(gen: torch.Generator, shape, scheduler, offset: float, rows: list[int]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) of a step: drawn for the whole global batch of `shape` (the same on
    every process) on the generator's device, so nothing is copied to the device; this
    process's `rows` of them."""
    noise = draw_noise(shape, gen, gen.device, offset)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (shape[0],),
                              generator=gen, device=gen.device)
    return take_rows(noise, rows), take_rows(timesteps, rows)


def take_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows] by slices of consecutive rows (a process's instance rows, then its class rows):
    no index tensor to copy to the device; all rows: t itself."""
    if rows == list(range(t.shape[0])):
        return t
    runs, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            runs.append(t[rows[start]:rows[i - 1] + 1])
            start = i
    return torch.cat(runs) if len(runs) > 1 else runs[0]


def compute_loss(unet, scheduler, latents, encoder_hidden_states, noise, timesteps,
                 n_instance: int, prior_weight: float, min_snr_gamma: float = 0.0,
                 unet_kwargs: dict | None = None) -> tuple:
    """Noise the latents at the timesteps, predict, and return dreambooth_loss(...)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states, **(unet_kwargs or {})).sample
    target = prediction_target(scheduler, latents, noise, timesteps)
    weights = snr_weights(scheduler, timesteps, min_snr_gamma) if min_snr_gamma > 0 else None
    return dreambooth_loss(pred, target, n_instance, prior_weight, weights)


def check_finite(value: float, step: int) -> None:
    """Stop at a non-finite loss read from the device, naming its step. Nothing was saved from
    the weights after it (a read comes before every save, sample and snapshot)."""
    if not math.isfinite(value):
        raise TrainingError(
            f"The loss became {value} at step {step}; training stopped, and the checkpoints "
            "already saved are kept.",
            "With fp16 this is usually an overflow: use bf16 or a lower learning rate.")
