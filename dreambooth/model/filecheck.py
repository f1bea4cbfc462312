"""Outputs that load the first time: each file is written under a temporary name, given the
hash the WebUI would otherwise compute (`sshs_model_hash`), re-opened and compared with the
layout it must have, and only then takes its final name. A mismatch fails loudly and leaves
nothing under the final name."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..config.errors import CheckpointError
from .checkpoint import atomic_path
from .streamed import data_size, save_dtype, write_streamed

HASH_KEY = "sshs_model_hash"
PLACEHOLDER = "dreambooth-hash-pending".ljust(64, "-")  # same length as a sha256 hex digest
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def data_hash(path: str | os.PathLike) -> str:
    """sha256 of a .safetensors file's tensor data (everything after the header): the hash the
    WebUI's Lora list and kohya's tools call sshs_model_hash / addnet hash."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fill_hash(path: Path, digest: str | None = None) -> str:
    """Replace the placeholder in the header with the data hash (`digest`, or read from the
    file); the header keeps its length, so the data (and with it the hash) stays where it
    was."""
    digest = digest or data_hash(path)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
        at = header.find(PLACEHOLDER.encode())
        if at < 0 or header.find(PLACEHOLDER.encode(), at + 1) >= 0:
            raise CheckpointError("The hash could not be written into the file header.",
                                  "This is a bug; please report it.")
        f.seek(8 + at)
        f.write(digest.encode())
    return digest


def read_layout(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(key -> shape, key -> safetensors dtype, metadata) of a file, without loading tensors
    (read by safetensors itself; as numpy, which maps no torch storage over the file)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as f:
        slices = {k: f.get_slice(k) for k in f.keys()}
        shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
        dtypes = {k: s.get_dtype() for k, s in slices.items()}
        return shapes, dtypes, dict(f.metadata() or {})


def layout_problems(path: str | os.PathLike, expected: dict, dtype=None,
                    fp32_keys=()) -> list[str]:
    """What differs between a written file and the expected key -> shape layout (and, when
    given, the floating dtype; `fp32_keys` must be fp32 in any precision): empty when right."""
    shapes, dtypes, _ = read_layout(path)
    problems = [f"missing {k}" for k in sorted(set(expected) - set(shapes))]
    problems += [f"unexpected {k}" for k in sorted(set(shapes) - set(expected))]
    problems += [f"{k} has shape {list(shapes[k])}, expected {list(expected[k])}"
                 for k in sorted(expected) if k in shapes and shapes[k] != tuple(expected[k])]
    if dtype is not None:
        want = SAFETENSORS_DTYPES[str(dtype).replace("torch.", "")]
        wants = {k: "F32" if k in fp32_keys else want for k in dtypes}
        problems += [f"{k} is {d}, expected {wants[k]}" for k, d in sorted(dtypes.items())
                     if d in SAFETENSORS_DTYPES.values() and d != wants[k]]
    return problems


def write_verified(path: str | os.PathLike, state: dict, metadata: dict, expected: dict,
                   overwrite: bool = False, dtype=None, what: str = "checkpoint",
                   fp32_keys=()) -> Path:
    """Write `state` (tensors or streamed.Deferred ones) to `path` atomically with `metadata`
    and its sshs_model_hash, one tensor at a time, its floating tensors in `dtype` (those of
    `fp32_keys` in fp32; None: as they are), after checking the written file against
    `expected` (key -> shape)."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta[HASH_KEY] = PLACEHOLDER
    dtype_of = save_dtype(dtype, fp32_keys)
    with atomic_path(path, overwrite, data_size(state, dtype_of)) as tmp:
        with open(tmp, "wb") as fh:
            digest = write_streamed(fh, state, meta, dtype_of)
        _fill_hash(tmp, digest)
        problems = layout_problems(tmp, expected, dtype, fp32_keys)
        if problems:
            raise CheckpointError(
                f"The {what} written for '{Path(path).name}' does not have the layout it must "
                f"have ({len(problems)} difference(s): {'; '.join(problems[:3])}); it was not "
                "kept.", "This is a bug; please report it with the log. No file was replaced.")
    return Path(path)
