"""The learning tests' yardstick: the mean denoising loss of a folder's images under a prompt,
with fixed noise and timesteps, so two models (or one before and after) are compared on the same
draws. Written from diffusers' scheduler and the loaded components, not the trainer's loop."""
import random

import torch

from dreambooth.data.images import load_image, scan_images
from dreambooth.training.loss import compute_loss

TIMESTEPS = (50, 150, 300, 500)


def denoising_loss(comp, folder, prompt: str, rounds: int = 1) -> float:
    """`rounds` passes over TIMESTEPS, one fresh noise per timestep (seeded: the same for every
    model compared)."""
    from diffusers import DDPMScheduler
    comp.unet.eval()
    scheduler = DDPMScheduler.from_config(comp.configs["scheduler"])
    images, _ = scan_images(folder)
    with torch.no_grad():
        pixels = torch.stack([load_image(p, 64, True, random.Random(0)) for p in images])
        latents = comp.vae.encode(pixels).latent_dist.mean * comp.vae.config.scaling_factor
        ids = comp.tokenizer([prompt] * len(images), padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids
        hidden = comp.text_encoder(ids)[0]
        g, total, steps = torch.Generator().manual_seed(123), 0.0, TIMESTEPS * rounds
        for t in steps:
            noise = torch.randn(latents.shape, generator=g)
            loss, _, _ = compute_loss(comp.unet, scheduler, latents, hidden, noise,
                                      torch.full((len(images),), t), len(images), 0.0)
            total += loss.item()
    return total / len(steps)
