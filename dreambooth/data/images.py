"""Training images: found and checked up front, captions, resize and crop, batches."""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FILEWORDS = "[filewords]"
MAX_PIXELS = 64_000_000  # refuse decompression bombs long before they eat the RAM
MAX_SIDE_RATIO = 20  # thinner: resizing to cover the training square would need gigabytes


@dataclass(frozen=True)
class Item:
    path: Path
    prompt: str
    is_class: bool = False
    concept: int = 0


def scan_images(folder: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(readable images, [(unreadable file, why)]) of a folder, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"The image folder '{folder}' does not exist.", "Check the path.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    good, bad = [], []
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        why = _unreadable(p)
        (bad.append((p, why)) if why else good.append(p))
    return good, bad


def _unreadable(path: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    return f"{img.width}x{img.height} is too large"
                if min(img.size) < 8:
                    return f"{img.width}x{img.height} is too small"
                if max(img.size) > MAX_SIDE_RATIO * min(img.size):
                    return (f"{img.width}x{img.height} is more than {MAX_SIDE_RATIO} times as long "
                            "as it is wide, too thin to crop a training picture from")
                img.load()
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"damaged ({str(e)[:80]})"
    return None


def instance_items(folder: str | Path, prompt: str, warn) -> list[Item]:
    """The usable instance images of a concept; unreadable ones are skipped with a warning."""
    good, bad = scan_images(folder)
    if bad:
        listed = ", ".join(f"{p.name} ({why})" for p, why in bad[:10])
        warn(f"{len(bad)} file(s) in '{folder}' could not be used and are skipped: {listed}")
    seen: dict[str, Path] = {}
    for p in good:
        twin = seen.setdefault(p.name.lower(), p)
        if twin is not p:
            warn(f"'{twin.name}' and '{p.name}' in '{folder}' differ only in case; both are used "
                 "here, but on Windows or macOS one would replace the other. Rename one.")
    if not good:
        others = [p for p in Path(folder).iterdir() if p.is_file()]
        detail = f"it holds {len(others)} file(s), none a readable image" if others else "it is empty"
        raise DataError(f"No training images in '{folder}': {detail}.",
                        "Put .jpg, .png or .webp pictures of your subject there.")
    if FILEWORDS not in prompt:
        return [Item(p, prompt) for p in good]
    from .captions import caption_for, warn_captions
    found = {p: caption_for(p, warn) for p in good}
    warn_captions(folder, prompt, found, warn)
    return [Item(p, prompt.replace(FILEWORDS, found[p][0]).strip()) for p in good]


def load_image(path: Path, resolution: int, center_crop: bool, rng: random.Random,
               flip: bool = False) -> torch.Tensor:
    """An RGB image as a [3, res, res] tensor in [-1, 1], upright, shorter side resized, cropped."""
    from PIL import Image, ImageOps
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.BICUBIC)
    if center_crop:
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    else:
        left, top = rng.randint(0, img.width - resolution), rng.randint(0, img.height - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_rgb(img):
    """Any PIL mode as RGB; transparency composited on white, 16-bit scaled to 8-bit."""
    from PIL import Image
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr / peak * 255).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")
