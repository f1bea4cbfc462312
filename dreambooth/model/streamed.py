"""Writing a .safetensors file one tensor at a time.

The header (names, dtypes, shapes, offsets) is known before any data: each tensor's shape and
saved dtype are. So the header is written first, then each tensor is made (converted, cast to
the save precision, moved to the host), written and dropped: a save holds one converted tensor
beside the model, never a second copy of the whole state (safetensors' own `save_file` takes a
finished dict, and before 0.6 copies all of it into bytes first).

The data are laid out in the order safetensors' writer uses (highest dtype rank first, then by
name), so a file written here has the same data bytes, and the same data hash, as one written
by `save_file`; its header lists the metadata keys sorted.
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO, Callable

import torch

# safetensors' dtype names in the rank its writer orders data by (lowest first)
_RANK = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32",
         "F32", "F64", "I64", "U64")
NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
         torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
         torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
         torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3"}


@dataclass(frozen=True)
class Deferred:
    """A tensor to write that is made only when its turn comes (a concatenation, a transpose
    of the live weights): its shape and dtype are known before."""
    shape: tuple
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def ndim(self) -> int:
        return len(self.shape)


SaveDtype = Callable[[str, torch.dtype], torch.dtype]  # (key, its dtype) -> the dtype saved


def keep_dtype(key: str, dtype: torch.dtype) -> torch.dtype:
    return dtype


def save_dtype(dtype: torch.dtype | None, fp32_keys=()) -> SaveDtype:
    """The save precision as a rule: floating tensors in `dtype` (those of `fp32_keys` in
    fp32), others as they are; None: everything as it is."""
    if dtype is None:
        return keep_dtype
    return lambda key, have: (torch.float32 if key in fp32_keys else dtype) \
        if have.is_floating_point else have


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def plan(state: Mapping, dtype_of: SaveDtype = keep_dtype) -> list[tuple]:
    """[(key, saved dtype, shape, begin, end)] in the order the data are written."""
    rows = []
    for key, value in state.items():
        dtype = dtype_of(key, value.dtype)
        if dtype not in NAMES:
            raise ValueError(f"tensor {key!r} has a dtype safetensors can't store: {dtype}")
        rows.append((key, dtype, tuple(int(d) for d in value.shape)))
    rows.sort(key=lambda r: (-_RANK.index(NAMES[r[1]]), r[0]))
    out, at = [], 0
    for key, dtype, shape in rows:
        size = _numel(shape) * dtype.itemsize
        out.append((key, dtype, shape, at, at + size))
        at += size
    return out


def header_bytes(rows: list[tuple], metadata: dict | None) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces to a multiple of 8 (as
    safetensors pads it: the data then start aligned)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    for key, dtype, shape, begin, end in rows:
        header[key] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def data_size(state: Mapping, dtype_of: SaveDtype = keep_dtype) -> int:
    rows = plan(state, dtype_of)
    return rows[-1][4] if rows else 0


def write_streamed(fh: BinaryIO, state: Mapping, metadata: dict | None = None,
                   dtype_of: SaveDtype = keep_dtype) -> str:
    """Write `state` (tensors, or Deferred ones) to the open file `fh` as a .safetensors file,
    one tensor at a time; metadata values must be strings. Returns the sha256 of the data
    (the sshs_model_hash of the file)."""
    if sys.byteorder != "little":  # pragma: no cover - every host torch runs on is
        raise OSError("a .safetensors file is little-endian; this machine is not")
    rows = plan(state, dtype_of)
    fh.write(header_bytes(rows, metadata))
    digest = hashlib.sha256()
    for key, dtype, shape, begin, end in rows:
        value = state[key]
        tensor = value.make() if isinstance(value, Deferred) else value
        tensor = tensor.detach().to("cpu", dtype).contiguous()
        if tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {key!r} was made with shape {list(tensor.shape)}, "
                             f"not the {list(shape)} its header says")
        if end > begin:
            data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            digest.update(data)
            fh.write(data)
        del value, tensor
    return digest.hexdigest()
