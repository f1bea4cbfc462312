"""Counting what a training step asks of a device, on fake tensors: dispatcher ops, host syncs
and live bytes (the caching allocator's 512-byte blocks). No kernel runs and no memory is
allocated; every figure comes from the ops the step dispatches.

    with FakeTensorMode(allow_non_fake_inputs=True), StepCounter() as counter:
        ...build...
        counter.start_step(); step(); figures = counter.figures()
"""
from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .profile_calls import PythonCalls

BLOCK = 512  # the CUDA caching allocator rounds every allocation up to this
aten = torch.ops.aten
# ops that make the host wait for the device (their result is needed on the host)
SCALAR_READS = {aten._local_scalar_dense.default, aten.item.default}
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default,
                  aten._unique2.default, aten.unique_consecutive.default}
# metadata queries a Python tensor subclass answers through the dispatcher (device, sizes,
# strides): on a real tensor they are C++ field reads, not ops
METADATA = {"sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous",
            "is_strides_like_format", "is_non_overlapping_and_dense"}


def is_metadata(func) -> bool:
    return func.namespace == "prim" or func.overloadpacket.__name__ in METADATA


def blocks(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


class StepCounter(TorchDispatchMode):
    """Counts ops and host syncs between start_step() and figures(); tracks live device bytes
    always.

    Every fake tensor lives on the CPU device (see profile.py); which of them stand for host
    memory is tracked here, per storage: a tensor made from host data, or by an op whose tensor
    inputs are all host tensors, is a host tensor; everything else is on the device. The
    function mode in profile_device.py marks the moves and factories it sees. A host read
    (`.item()`, `bool(t)`) of a device tensor is a sync; it is answered with a harmless value
    (1 / True), as fake tensors have no data: the step goes on as when the loss is finite."""

    def __init__(self, python_calls: bool = True) -> None:
        super().__init__()
        self.sizes: dict = {}  # storage key -> bytes (rounded) of each live fake storage
        self.host: set = set()  # storage keys that stand for host memory
        self.live = self.peak = 0  # device bytes
        self.counting = False
        self.ops = 0
        self.syncs: Counter = Counter()
        self.by_op: Counter = Counter()
        self.calls = PythonCalls(python_calls)  # the step's Python calls, outside dispatch

    # -- the step ---------------------------------------------------------------------------
    def start_step(self) -> None:
        self.counting, self.ops, self.peak = True, 0, self.live
        self.syncs, self.by_op = Counter(), Counter()
        self.calls.start()

    def figures(self) -> dict:
        self.counting = False
        return {"ops": self.ops, "python_calls": self.calls.figures(),
                "host_syncs": sum(self.syncs.values()),
                "syncs_by_kind": dict(self.syncs), "peak_bytes": self.peak,
                "live_bytes_after": self.live}

    def sync(self, kind: str) -> None:
        if self.counting:
            self.calls.pause()  # (the profile's own bookkeeping)
            self.syncs[kind] += 1
            self.calls.resume()

    # -- where a tensor is ------------------------------------------------------------------
    def is_host(self, t: torch.Tensor) -> bool:
        if not _is_fake(t):
            return t.device.type == "cpu"  # a real tensor the step reads (scheduler tables)
        try:
            return t.untyped_storage()._cdata in self.host
        except Exception:
            return False

    def mark(self, t: torch.Tensor, host: bool) -> None:
        self.calls.pause()  # (the profile's own bookkeeping)
        try:
            self._mark(t, host)
        finally:
            self.calls.resume()

    def _mark(self, t: torch.Tensor, host: bool) -> None:
        if not _is_fake(t):
            return
        self.track(t)
        key = t.untyped_storage()._cdata
        if host and key not in self.host:
            self.host.add(key)
            self.live -= self.sizes.get(key, 0)
        elif not host and key in self.host:
            self.host.discard(key)
            self.live += self.sizes.get(key, 0)
            self.peak = max(self.peak, self.live)

    # -- dispatch ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.pause()  # none of what runs in here runs in a real step
        try:
            return self._dispatch(func, args, kwargs or {})
        finally:
            self.calls.resume()

    def _dispatch(self, func, args, kwargs):
        if is_metadata(func):
            return func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if self.counting:
            self.ops += 1
            self.by_op[func.overloadpacket.__name__] += 1
            if func in DATA_DEPENDENT and not all(self.is_host(t) for t in inputs):
                self.sync(f"data-dependent shape ({func.overloadpacket.__name__})")
        if func in SCALAR_READS:
            t = args[0]
            if not self.is_host(t):
                self.sync("scalar read of a device tensor (.item(), bool(), float())")
            return True if t.dtype == torch.bool else 1 if not t.is_floating_point() else 1.0
        if func is aten.copy_.default and self.counting:
            dst, src = args[0], args[1]
            if self.is_host(src) and not self.is_host(dst) and src.dim() > 0:
                self.sync("blocking host -> device copy")
            elif self.is_host(dst) and not self.is_host(src):
                self.sync("device -> host copy")
        out = func(*args, **kwargs)
        host = bool(inputs) and all(self.is_host(t) for t in inputs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and _is_fake(t):
                self.track(t, host)
        return out

    # -- memory -----------------------------------------------------------------------------
    def track(self, t: torch.Tensor, host: bool = False) -> None:
        """Count a tensor's storage once, until the storage is freed (its Python object lives
        exactly as long as the storage does)."""
        try:
            storage = t.untyped_storage()
        except Exception:  # sparse/nested: none here
            return
        key = storage._cdata
        if key in self.sizes:
            return
        self.sizes[key] = size = blocks(storage.nbytes())
        if host:
            self.host.add(key)
        else:
            self.live += size
            self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self.release, key)

    def release(self, key) -> None:
        size = self.sizes.pop(key, 0)
        if key in self.host:
            self.host.discard(key)
        else:
            self.live -= size


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)
