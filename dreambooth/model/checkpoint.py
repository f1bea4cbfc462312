"""Reading and writing checkpoint files: safe loading, atomic writes, save precision, metadata."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..config.errors import CheckpointError

try:  # a write that fails inside safetensors (a full disk) raises its own error type
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # pragma: no cover
    _SafetensorError = OSError

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state dict, metadata) of a single-file checkpoint, never running code from the file."""
    state, metadata = open_checkpoint(path)
    if isinstance(state, LazyState):
        state = {k: state[k] for k in state}
    return state, metadata


def open_checkpoint(path: str | os.PathLike) -> tuple[Mapping, dict]:
    """As read_checkpoint, but a .safetensors file's tensors are read when asked for (a
    LazyState): what loading a model goes through, one tensor at a time."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"The checkpoint '{path}' does not exist.",
                              "Check the path, or pick a checkpoint from the list.")
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path), {}
    raise CheckpointError(f"'{path.name}' is not a .safetensors or .ckpt file.",
                          "Choose a single-file Stable Diffusion checkpoint.")


def _read_safetensors(path: Path) -> tuple["LazyState", dict]:
    """The file's tensors as a LazyState (each read when asked for) and its metadata. The file
    is checked by safetensors itself (header, offsets within the file) before anything is
    read."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
        state = LazyState(path)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"'{path.name}' is not a readable .safetensors file ({e}).",
                              "The file may be truncated (an interrupted download or copy): "
                              "download or copy it again.") from None
    return state, metadata


_SAFETENSORS_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}


class LazyState(Mapping):
    """A .safetensors file's tensors by name, each read from the file when it is asked for: a
    fresh tensor every time, nothing kept here. Loading a model then holds one copy of each
    weight at a time (the file's, until its converted one is made), not the whole file beside
    the model, and the file is read with plain reads, not a memory map whose pages would count
    in the process's memory until it is closed. `dtype(name)` and `shape(name)` come from the
    header, without reading the tensor."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._ready: dict = {}  # prefetched: name -> tensor (or the error reading it)
        self._pending: set = set()
        self._cond = threading.Condition()
        self._stop = False
        with open(self.path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        self._start = 8 + size
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
        for key, entry in self._entries.items():
            if entry["dtype"] not in _SAFETENSORS_TORCH:
                raise ValueError(f"tensor {key!r} has the unsupported dtype {entry['dtype']}")

    def prefetch(self, keys, dtype: torch.dtype | None) -> None:
        """Read `keys` (in file order), their floating tensors converted to `dtype` (None: as
        stored), on a thread of their own, while the caller goes on (importing and building
        the model: Python work, while reading and converting release the GIL). Asked for, a
        prefetched tensor is waited for and handed over (not kept here)."""
        keys = sorted(keys, key=lambda k: self._entries[k]["data_offsets"][0])
        self._pending = set(keys)

        def work() -> None:
            for key in keys:
                if self._stop:
                    return
                try:
                    value = self._read(key)
                    if dtype is not None and value.is_floating_point() and \
                            value.dtype != dtype:
                        value = value.to(dtype)
                except BaseException as e:  # handed to whoever asks for this tensor
                    value = e
                with self._cond:
                    self._pending.discard(key)
                    self._ready[key] = value
                    self._cond.notify_all()
        threading.Thread(target=work, name="checkpoint-prefetch", daemon=True).start()

    def close(self) -> None:
        """Stop prefetching and drop what was prefetched and not asked for."""
        with self._cond:
            self._stop = True
            self._pending.clear()
            self._ready.clear()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._pending or key in self._ready:
            with self._cond:
                self._cond.wait_for(lambda: key in self._ready or key not in self._pending)
                value = self._ready.pop(key, None)
            if isinstance(value, BaseException):
                raise value
            if value is not None:
                return value
        return self._read(key)

    def _read(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        dtype = _SAFETENSORS_TORCH[entry["dtype"]]
        begin, end = entry["data_offsets"]
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        data = torch.empty(end - begin, dtype=torch.uint8)  # not zeroed: the read fills it
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._start + begin)
            if f.readinto(memoryview(data.numpy())) != end - begin:
                raise CheckpointError(f"'{self.path.name}' ends inside the tensor {key}.",
                                      "The file is truncated: download or copy it again.")
        return data.view(dtype).reshape(entry["shape"])

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def dtype(self, key: str) -> torch.dtype:
        return _SAFETENSORS_TORCH[self._entries[key]["dtype"]]

    def shape(self, key: str) -> tuple:
        return tuple(self._entries[key]["shape"])


def tensor_shape(state, key: str) -> tuple:
    """A tensor's shape, from a LazyState's header (or a view's that has `shape`: nothing
    read) or the tensor itself."""
    return tuple(state.shape(key)) if callable(getattr(state, "shape", None)) \
        else tuple(state[key].shape)


def tensor_dtype(state, key: str) -> torch.dtype:
    """A tensor's dtype, from a LazyState's header (nothing read) or the tensor itself."""
    return state.dtype(key) if isinstance(state, LazyState) else state[key].dtype


def _read_pickle(path: Path) -> dict:
    """Tensors and plain containers only, no code runs: torch's weights-only loader, then (for
    the training-framework objects old SD .ckpt files carry) an allow-list unpickler that turns
    those into inert placeholders and refuses everything else."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        obj = _read_pickle_allow_listed(path, first)
    except Exception as e:  # a damaged file fails inside the unpickler in many ways

        raise CheckpointError(f"'{path.name}' is not a readable checkpoint ({e}).",
                              "The file may be truncated or not a model: download it again.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"'{path.name}' does not hold a model state dict.",
                              "Choose a Stable Diffusion checkpoint file.")
    return obj


class _Inert:
    """Stands in for a harmless object (a trainer callback) of an old checkpoint; never called."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


# Module prefixes whose objects old checkpoints hold beside the weights, never needed to load them.
_INERT_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")
_ALLOWED = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
            ("torch._utils", "_rebuild_parameter"), ("torch", "Size"), ("builtins", "set"),
            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
            ("numpy", "dtype"), ("_codecs", "encode")}
_STORAGES = {"FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage",
             "IntStorage", "ByteStorage", "BoolStorage", "CharStorage", "ShortStorage"}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith(_INERT_PREFIXES):
            return _Inert
        if (module, name) in _ALLOWED or (module == "torch" and name in _STORAGES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


class _AllowListPickle:
    Unpickler = _AllowListUnpickler
    load = staticmethod(lambda fh, **kw: _AllowListUnpickler(fh, **kw).load())


def _read_pickle_allow_listed(path: Path, first: Exception):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False,
                          pickle_module=_AllowListPickle)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"'{path.name}' was refused: it holds Python objects beyond tensors, which could run "
            f"code when loaded ({str(e).splitlines()[0][:200]}).",
            "Use a .safetensors version of this model, or convert the file with a tool you "
            "trust.") from None
    except Exception as e:  # a damaged file fails inside the unpickler in many ways
        raise CheckpointError(f"'{path.name}' is not a readable checkpoint ({e}).",
                              "The file may be truncated or not a model: download it again.") from None


def cast_for_save(state: dict, precision: str, fp32_keys=()) -> dict:
    """Floating tensors to the save precision (those of `fp32_keys` to fp32); integer buffers
    untouched; contiguous, unshared."""
    dtype, out, seen = SAVE_DTYPES[precision], {}, set()
    for k, v in state.items():
        v = v.detach()
        if v.is_floating_point():
            v = v.to(torch.float32 if k in fp32_keys else dtype)
        v = v.contiguous()
        if v.data_ptr() in seen:
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    return out


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)  # read it where /proc can't tell (set back at once)
        os.umask(mask)
        return mask


def _space_note(folder: Path, needed: int | None) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    need = f"it needs about {needed / 2**20:.1f} MB and " if needed else ""
    return f"; {need}{free / 2**20:.1f} MB are free there"


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, overwrite: bool = False,
                needed: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside `final`; on success it is renamed to `final`, else deleted.
    The file gets the permissions the user's umask gives (not mkstemp's 0600). `needed`: its
    size, said when the disk fills up."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise CheckpointError(f"'{final}' already exists and was not replaced.",
                              "Choose another model name, or turn on 'overwrite'.")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
    except OSError as e:
        raise CheckpointError(f"Can't write into '{final.parent}' ({e.strerror}).",
                              "Choose a folder you can write to, with free space.") from None
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) make it 0600
        os.replace(tmp, final)
    except (OSError, _SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        why = getattr(e, "strerror", None) or " ".join(str(e).split())[:200]
        raise CheckpointError(f"Writing '{final}' failed ({why}); nothing was replaced"
                              f"{_space_note(final.parent, needed)}.", "Check the free space "
                              "and permissions of the folder.") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_safetensors(path: str | os.PathLike, state: dict, metadata: dict | None = None,
                      overwrite: bool = False) -> Path:
    """Write atomically: a crash leaves either the old file or the new one, never half of one;
    one tensor at a time (streamed.write_streamed), never a copy of the whole state."""
    from .streamed import data_size, write_streamed
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path, overwrite, data_size(state)) as tmp:
        with open(tmp, "wb") as fh:
            write_streamed(fh, state, meta)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_with(path: str | os.PathLike, writer: Callable[[Path], None],
               overwrite: bool = True) -> Path:
    with atomic_path(path, overwrite) as tmp:
        writer(tmp)
    return Path(path)
