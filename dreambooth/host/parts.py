"""The separate part files of a Flux / SD3.5 run (text encoders, autoencoder) as the host lists
them: by file name, the way Forge's "VAE / Text Encoder" picker lists models/VAE and
models/text_encoder (modules_forge.main_entry.refresh_models / module_list, read at
lllyasviel/stable-diffusion-webui-forge dfdcbab6). Standard library only.

A host's list maps a file name to its path; the tab shows the names, the config holds the path
(confine.py maps a listed name back), and each field starts on the one listed file its name
suggests (clip_l*, t5xxl*, ae* ...), preferring what the user picked in Forge's top bar.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterable

from ..config.flux import FLUX_FILES
from ..config.sd35 import SD35_FILES

PART_FIELDS = FLUX_FILES + SD35_FILES
# the file endings Forge's refresh_models lists (a file name ending so, any folder depth)
PART_ENDINGS = ("ckpt", "pt", "bin", "safetensors", "gguf")


def _plain(name: str) -> str:
    """A file name's stem in lower case with only its letters and digits ('t5xxl_fp16')."""
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return re.sub(r"[^a-z0-9]", "", stem.lower())


def _is_ae(name: str) -> bool:
    plain, stem = _plain(name), name.lower().rsplit(".", 1)[0]
    return stem == "ae" or stem.startswith(("ae_", "ae-")) or (
        "flux" in plain and ("vae" in plain or plain.endswith("ae")))


# what a file name that suits each field looks like
LIKELY: dict[str, Callable[[str], bool]] = {
    "flux_clip_l": lambda n: _plain(n).startswith("clipl"),
    "sd35_clip_l": lambda n: _plain(n).startswith("clipl"),
    "sd35_clip_g": lambda n: _plain(n).startswith("clipg"),
    "flux_t5xxl": lambda n: "t5xxl" in _plain(n) or "t5v11xxl" in _plain(n),
    "sd35_t5xxl": lambda n: "t5xxl" in _plain(n) or "t5v11xxl" in _plain(n),
    "flux_ae": _is_ae,
    "sd35_vae": lambda n: "sd3" in _plain(n) and "vae" in _plain(n),
}


def scan_parts(folders: Iterable[Path], confined: bool = True) -> dict[str, str]:
    """File name -> path of every file under `folders` whose name ends in one of Forge's
    endings, as Forge's refresh_models walks them (a later folder's file wins a name).
    `confined`: only regular files whose real path stays in their folder are listed (not a
    symlink out, a FIFO or a device)."""
    found: dict[str, str] = {}
    for folder in folders:
        base = os.path.realpath(folder)
        for root, _, files in os.walk(folder):
            for name in sorted(files):
                path = os.path.join(root, name)
                if not name.endswith(PART_ENDINGS):
                    continue
                if confined and not (os.path.realpath(path).startswith(base + os.sep)
                                     and os.path.isfile(path)):
                    continue
                found[name] = os.path.abspath(path)
    return found


def likely_part(field: str, listed: dict[str, str], selected: Iterable[str] = ()) -> str:
    """The listed file name that `field` most likely wants: the one whose name suits it, or,
    where several do, the one of those the user picked in the host's own picker (`selected`:
    paths or names); '' when that leaves none or more than one."""
    # a GGUF or ComfyUI's scaled fp8 file is listed (Forge loads them) but never a default:
    # this version reads neither
    fits = [n for n in listed if LIKELY[field](n) and n.lower().endswith(".safetensors")
            and "scaled" not in n.lower()]
    picked = {os.path.basename(str(s)) for s in selected}
    if len(fits) > 1:
        fits = [n for n in fits if n in picked]
    return fits[0] if len(fits) == 1 else ""


def listed_part(listed: dict[str, str] | None, value) -> str | None:
    """The path of the listed file `value` names (by its name or its path), else None."""
    if not listed or not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    if value in listed:
        return listed[value]
    wanted = os.path.abspath(value) if os.path.isabs(value) else None
    return next((p for p in listed.values() if wanted and os.path.abspath(p) == wanted), None)


def shown_part(listed: dict[str, str] | None, value) -> str:
    """What the tab shows for a field holding `value`: the listed file's name where it is a
    listed path, else the value as it is."""
    if listed and isinstance(value, str) and os.path.isabs(value):
        found = next((n for n, p in listed.items() if os.path.abspath(p) ==
                      os.path.abspath(value)), None)
        if found:
            return found
    return value
