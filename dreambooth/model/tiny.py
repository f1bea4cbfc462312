"""Tiny models of each family's shape and synthetic images: the demo, the tests, smoke benchmarks.

The architecture is the real one (same block types and key layout), with few channels, so a
tiny checkpoint converts, trains and saves through exactly the code a full-size one does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_RESOLUTION = 64


def tiny_configs(model_type: str = "v1x") -> dict:
    """The shipped configs of `model_type` with few channels and layers: the same block types,
    key layout and conditioning (SDXL: two encoders, pooled text, size/crop ids)."""
    from .spec import shipped_configs, spec_for
    spec = spec_for(model_type)
    configs = {name: dict(cfg) for name, cfg in shipped_configs(model_type).items()}
    for slot in spec.text_encoders:
        configs[slot.component].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, projection_dim=32)
    unet = configs["unet"]
    unet.update(block_out_channels=[32, 32, 64, 64], attention_head_dim=8,
                cross_attention_dim=32 * len(spec.text_encoders),
                sample_size=TINY_RESOLUTION // 8)
    if spec.family == "sdxl":  # 3 levels, deeper transformers further down, as the real one
        unet.update(block_out_channels=[32, 64, 64], transformer_layers_per_block=[1, 1, 2],
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    vae = configs["vae"]
    vae.update(block_out_channels=[32, 32, 32, 32], sample_size=TINY_RESOLUTION, layers_per_block=1)
    return configs


def make_tiny_checkpoint(path: str | Path, model_type: str = "v1x", seed: int = 0) -> Path:
    """Write a randomly initialised tiny single-file checkpoint (seconds on a CPU)."""
    from .components import build_random
    from .single_file import save_single_file
    comp = build_random(model_type, tiny_configs(model_type), seed=seed)
    calibrate_vae(comp)
    return save_single_file(comp, path, overwrite=True)


def calibrate_vae(comp) -> None:
    """Give the random VAE the statistics of a trained one: a near-deterministic posterior
    (tiny variance, as SD's VAE has) and a scaling factor that makes latents unit-variance
    (what SD's 0.18215 does), so training on the tiny model sees the images, not noise."""
    import torch
    vae = comp.vae
    latent = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent:] = 0.0
        vae.quant_conv.bias[latent:] = -12.0  # log-variance: std ~ 0.0025
        pixels = torch.stack([_as_tensor(pattern_image(kind, TINY_RESOLUTION, i))
                              for kind in ("checker", "blob", "noise") for i in range(4)])
        std = vae.encode(pixels).latent_dist.mean.std().item()
    factor = round(1.0 / max(std, 1e-6), 5)
    comp.configs["vae"]["scaling_factor"] = factor
    vae.register_to_config(scaling_factor=factor)


def _as_tensor(image):
    import torch
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def pattern_image(kind: str, size: int = TINY_RESOLUTION, seed: int = 0):
    """A distinctive synthetic picture: 'checker' (the instance), 'blob' (the class), 'noise'."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    if kind == "checker":
        cells = 4 + seed % 3
        board = ((np.floor(x * cells) + np.floor(y * cells)) % 2)[..., None]
        img = board * np.array([230, 40, 40]) + (1 - board) * np.array([30, 30, 200])
        img = img + rng.normal(0, 6, img.shape)
    elif kind == "blob":
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        inside = (((x - cx) ** 2 + (y - cy) ** 2) < r * r)[..., None]
        img = inside * np.array([60, 170, 60]) + (1 - inside) * np.array([200, 200, 170])
        img = img + rng.normal(0, 6, img.shape)
    else:
        img = rng.uniform(0, 255, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_images(folder: str | Path, kind: str, count: int, size: int = TINY_RESOLUTION,
                 seed: int = 0) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = folder / f"{kind}_{i:03d}.png"
        pattern_image(kind, size, seed + i).save(p)
        paths.append(p)
    return paths
