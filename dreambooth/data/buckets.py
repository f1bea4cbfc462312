"""Aspect-ratio bucketing: each image trains at the size closest to its own shape.

Bucket sides are multiples of 64 with an area of at most resolution x resolution and an aspect
ratio of at most 2; an image is resized to cover its bucket and cropped. Every batch is drawn
from one bucket (the UNet takes one latent size per batch). With bucketing off every image has
the square bucket and everything is exactly the square resize-and-crop of data.load_image.
The crop is reported as SDXL's size conditioning: (original height, width, crop top, left,
target height, width).
"""
from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..config.errors import DataError

STEP = 64
MAX_RATIO = 2.0
Bucket = tuple[int, int]  # (width, height)


def bucket_sizes(resolution: int, step: int = STEP, max_ratio: float = MAX_RATIO) -> list[Bucket]:
    """Every (width, height), sides multiples of `step`, area <= resolution**2, the largest of its
    aspect ratio, ratio <= max_ratio; sides no smaller than half the resolution."""
    area, low = resolution * resolution, max(step, resolution // 2 // step * step)
    found = set()
    for w in range(low, area // low + 1, step):
        h = min(area // w // step * step, int(w * max_ratio) // step * step)
        if h >= low and w / h <= max_ratio:
            found |= {(w, h), (h, w)}
    return sorted(found)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as it will be used: upright after its EXIF rotation."""
    from PIL import Image
    with Image.open(path) as img:
        w, h = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w
    return w, h


def choose(size: tuple[int, int], buckets: list[Bucket], no_upscale: bool,
           step: int = STEP) -> Bucket:
    """The bucket of the aspect ratio nearest the image's (the larger on a tie). With no_upscale,
    an image smaller than that bucket gets one of its own: its size scaled down to multiples of
    `step` (at most the largest bucket area), so it is never enlarged."""
    w, h = size
    ratio = math.log(w / h)
    best = min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))
    if no_upscale and (best[0] > w or best[1] > h):
        area = max(b[0] * b[1] for b in buckets)
        scale = min(1.0, math.sqrt(area / (w * h)))
        best = (max(step, int(w * scale) // step * step), max(step, int(h * scale) // step * step))
    return best


def plan(paths: list[Path], resolution: int, enabled: bool, no_upscale: bool) -> dict:
    """path -> bucket of every image (the square one for all when bucketing is off)."""
    if not enabled:
        return {p: (resolution, resolution) for p in paths}
    sizes = bucket_sizes(resolution)
    return {p: choose(image_size(p), sizes, no_upscale) for p in paths}


def describe(buckets: list[Bucket]) -> str:
    counts = Counter(buckets)
    return ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))


def batch_count(buckets: list[Bucket], batch: int, enabled: bool) -> int:
    """Batches in one epoch: within buckets, each bucket's last batch filled up by repeats."""
    if not enabled:
        return math.ceil(len(buckets) / batch)
    return sum(math.ceil(n / batch) for n in Counter(buckets).values())


def epoch_order(buckets: list[Bucket], batch: int, rng: random.Random, enabled: bool) -> list[int]:
    """Item indices for one epoch, `batch` at a time from one bucket each; the batches shuffled.
    Off: a plain shuffle (the last batch wraps around)."""
    n = len(buckets)
    if not enabled:
        return rng.sample(range(n), n)
    groups: dict = {}
    for i, b in enumerate(buckets):
        groups.setdefault(b, []).append(i)
    chunks = []
    for b in sorted(groups):
        idx = rng.sample(groups[b], len(groups[b]))
        idx += [idx[k % len(idx)] for k in range((-len(idx)) % batch)]
        chunks += [idx[k:k + batch] for k in range(0, len(idx), batch)]
    rng.shuffle(chunks)
    return [i for chunk in chunks for i in chunk]


def _deep_enough(resolution: int, factor: int, levels: int) -> bool:
    side = -(-resolution // factor)
    for _ in range(levels):
        side = -(-side // 2)
    return side >= 2


def refuse_resolution(resolution: int, vae_config, unet_config) -> None:
    """A resolution so small that the UNet's deeper levels would be one latent pixel (its
    group norms then fail)."""
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    if not hasattr(unet_config, "down_block_types"):  # Flux: 2x2 latent patches
        if resolution % (2 * factor):
            raise DataError(f"resolution = {resolution} is not a multiple of {2 * factor}, "
                            "which this model's latent patches need.",
                            f"Use {max(2 * factor, resolution // (2 * factor) * 2 * factor)}.")
        return
    levels = max(len(unet_config.down_block_types) - 2, 0)
    if not _deep_enough(resolution, factor, levels):
        smallest = next(r for r in range(8, 4097, 8) if _deep_enough(r, factor, levels))
        raise DataError(f"resolution = {resolution} is too small for this model: its UNet needs "
                        f"at least {smallest} pixels a side (it was made for "
                        f"{unet_config.sample_size * factor}).",
                        f"Use a resolution of {smallest} or more.")


def latent_shape(vae_config, bucket: Bucket) -> tuple[int, int, int]:
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    return (vae_config.latent_channels, bucket[1] // factor, bucket[0] // factor)


def load_bucketed(path: Path, bucket: Bucket, center_crop: bool, rng: random.Random,
                  flip: bool = False) -> tuple[torch.Tensor, tuple]:
    """([3, height, width] in [-1, 1], SDXL size conditioning) of an image resized to cover the
    bucket and cropped (centred, or at a place drawn from `rng`), optionally mirrored."""
    from PIL import Image, ImageOps

    from .images import to_rgb
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"The image '{path}' can't be read any more ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:120]}); it was there when the run started.",
                        "Put it back, or start the run again (the images are checked at the "
                        "start); cache_latents reads each image only once.") from None
    (bw, bh), (ow, oh) = bucket, img.size
    scale = max(bw / ow, bh / oh)
    img = img.resize((max(bw, round(ow * scale)), max(bh, round(oh * scale))), Image.BICUBIC)
    if center_crop:
        left, top = (img.width - bw) // 2, (img.height - bh) // 2
    else:
        left, top = rng.randint(0, img.width - bw), rng.randint(0, img.height - bh)
    width = img.width
    img = img.crop((left, top, left + bw, top + bh))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        left = width - bw - left  # where the crop sits in the mirrored picture
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), (oh, ow, top, left, bh, bw)
