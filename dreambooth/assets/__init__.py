"""Offline assets shipped with the package: the CLIP BPE tokenizer files and
full-size component configs (diffusers / transformers config dicts) for the
supported Stable Diffusion model types.

Only the standard library is imported at module import time; transformers is
imported lazily inside :func:`load_tokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "ASSETS_DIR",
    "CONFIGS_DIR",
    "tokenizer_dir",
    "load_tokenizer",
    "config_path",
    "load_config",
    "available_configs",
]

ASSETS_DIR: Path = Path(__file__).resolve().parent
CONFIGS_DIR: Path = ASSETS_DIR / "configs"

_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_dir() -> Path:
    """Directory holding the CLIP tokenizer files (vocab.json, merges.txt, ...)."""
    return ASSETS_DIR / "tokenizer"


def load_tokenizer(max_length: int = 77, pad_token: str | None = None, use_fast: bool = True):
    """Load the shipped CLIP BPE tokenizer.

    Works offline (``local_files_only=True``) on transformers 4.x and 5.x and
    produces identical ids on both: on transformers 5 ``CLIPTokenizer`` is the
    Rust (``tokenizers``) implementation; on transformers 4 the same
    implementation is ``CLIPTokenizerFast`` (built from vocab.json/merges.txt
    at load time), which is used unless ``use_fast=False``. The pure-Python
    transformers-4 ``CLIPTokenizer`` differs on some inputs (it splits CJK
    characters into separate words when ``ftfy`` is absent, and applies ftfy's
    text fixes when it is present).

    Args:
        max_length: ``model_max_length`` of the tokenizer (77 for all SD models).
        pad_token: override of the padding token. ``None`` keeps the CLIP default
            ``"<|endoftext|>"`` (id 49407, used by SD 1.x and SDXL's first text
            encoder); SD 2.x and SDXL's second (OpenCLIP) tokenizer pad with
            ``"!"`` (id 0).
    """
    directory = tokenizer_dir()
    missing = [name for name in _TOKENIZER_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer asset(s) missing from {directory}: {', '.join(missing)}")

    import transformers

    cls = transformers.CLIPTokenizer
    if use_fast:
        # transformers 5: CLIPTokenizerFast is an alias of CLIPTokenizer.
        cls = getattr(transformers, "CLIPTokenizerFast", None) or cls

    kwargs: dict[str, Any] = {"model_max_length": int(max_length)}
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    return cls.from_pretrained(str(directory), local_files_only=True, **kwargs)


def config_path(model_type: str, component: str) -> Path:
    """Path of ``configs/<model_type>/<component>.json``."""
    for part, what in ((model_type, "model_type"), (component, "component")):
        if not part or "/" in part or "\\" in part or part.startswith("."):
            raise ValueError(f"invalid {what}: {part!r}")
    return CONFIGS_DIR / model_type / f"{component}.json"


def available_configs() -> dict[str, list[str]]:
    """Mapping model_type -> sorted list of components with a shipped config."""
    out: dict[str, list[str]] = {}
    if CONFIGS_DIR.is_dir():
        for sub in sorted(CONFIGS_DIR.iterdir()):
            if sub.is_dir():
                comps = sorted(p.stem for p in sub.glob("*.json"))
                if comps:
                    out[sub.name] = comps
    return out


def load_config(model_type: str, component: str) -> dict:
    """Read a shipped component config, e.g. ``load_config("v1x", "unet")``.

    Returns a fresh dict on every call (safe to mutate).
    """
    path = config_path(model_type, component)
    if not path.is_file():
        known = available_configs()
        raise FileNotFoundError(
            f"no shipped config for model_type={model_type!r} component={component!r} "
            f"(looked for {path}); available: {known}"
        )
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data
