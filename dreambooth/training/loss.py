"""The maths of one DreamBooth step, as pure functions (tested against independent sums)."""
from __future__ import annotations

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


def noise_like(latents: torch.Tensor, generator: torch.Generator | None,
               offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise for the latents; `offset` adds a per-channel shift (offset noise)."""
    noise = torch.randn(latents.shape, generator=generator, device=generator.device
                        if generator is not None else latents.device, dtype=torch.float32)
    if offset:
        shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator,
                            device=noise.device, dtype=torch.float32)
        noise = noise + offset * shift
    return noise.to(latents.device, latents.dtype)


def compute_loss(unet, scheduler, latents, encoder_hidden_states, noise, timesteps,
                 n_instance: int, prior_weight: float, min_snr_gamma: float = 0.0,
                 unet_kwargs: dict | None = None) -> tuple:
    """Noise the latents at the timesteps, predict, and return dreambooth_loss(...)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states, **(unet_kwargs or {})).sample
    target = prediction_target(scheduler, latents, noise, timesteps)
    weights = snr_weights(scheduler, timesteps, min_snr_gamma) if min_snr_gamma > 0 else None
    return dreambooth_loss(pred, target, n_instance, prior_weight, weights)


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss.detach()).all():
        raise TrainingError(
            f"The loss became {loss.item()} at step {step}; training stopped before the "
            "update, and the checkpoints already saved are kept.",
            "With fp16 this is usually an overflow: use bf16 or a lower learning rate.")
