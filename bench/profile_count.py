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

BLOCK = 512  # the CUDA caching allocator rounds every allocation up to this
aten = torch.ops.aten
# ops that make the host wait for the device (their result is needed on the host)
SCALAR_READS = {aten._local_scalar_dense.default, aten.item.default}
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default,
                  aten._unique2.default, aten.unique_consecutive.default}
COPIES = {aten._to_copy.default, aten.copy_.default}
# metadata queries a Python tensor subclass answers through the dispatcher (device, sizes,
# strides): on a real tensor they are C++ field reads, not ops
METADATA = {"sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous",
            "is_strides_like_format", "is_non_overlapping_and_dense"}


def is_metadata(func) -> bool:
    return func.namespace == "prim" or func.overloadpacket.__name__ in METADATA


def blocks(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


class StepCounter(TorchDispatchMode):
    """Counts ops and host syncs between start_step() and figures(); tracks live bytes always.

    A host read (`.item()`, `bool(t)`) is answered here with a harmless value (1 / True), as fake
    tensors have no data: the step goes on as it would when the loss is finite."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict = {}  # storage key -> bytes (rounded) of each live storage
        self.live = self.peak = 0
        self.counting = False
        self.ops = 0
        self.syncs: Counter = Counter()
        self.by_op: Counter = Counter()

    # -- the step ---------------------------------------------------------------------------
    def start_step(self) -> None:
        self.counting, self.ops, self.peak = True, 0, self.live
        self.syncs, self.by_op = Counter(), Counter()

    def figures(self) -> dict:
        self.counting = False
        return {"ops": self.ops, "host_syncs": sum(self.syncs.values()),
                "syncs_by_kind": dict(self.syncs), "peak_bytes": self.peak,
                "live_bytes_after": self.live}

    # -- dispatch ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_metadata(func):
            return func(*args, **kwargs)
        if self.counting:
            self.ops += 1
            self.by_op[func.overloadpacket.__name__] += 1
            kind = self.sync_kind(func, args, kwargs)
            if kind:
                self.syncs[kind] += 1
        if func in SCALAR_READS:
            t = args[0]
            return True if t.dtype == torch.bool else 1 if not t.is_floating_point() else 1.0
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    @staticmethod
    def sync_kind(func, args, kwargs) -> str:
        if func in SCALAR_READS:
            return "scalar read (.item(), bool(), float())"
        if func in DATA_DEPENDENT:
            return f"data-dependent shape ({func.overloadpacket.__name__})"
        if func in COPIES:
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0].device if func is aten.copy_.default else \
                torch.device(kwargs.get("device") or src.device)
            if src.device.type != "cpu" and dst.type == "cpu":
                return "device -> host copy"
            if src.device.type == "cpu" and dst.type != "cpu" and not kwargs.get("non_blocking"):
                return "blocking host -> device copy"
        return ""

    # -- memory -----------------------------------------------------------------------------
    def track(self, t: torch.Tensor) -> None:
        """Count a tensor's storage once, until the storage is freed (its Python object lives
        exactly as long as the storage does)."""
        if t.device.type == "meta" and not _is_fake(t):
            return
        try:
            storage = t.untyped_storage()
        except Exception:  # sparse/nested: none here
            return
        key = storage._cdata
        if key in self.sizes:
            return
        self.sizes[key] = size = blocks(storage.nbytes())
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self.release, key)

    def release(self, key) -> None:
        self.live -= self.sizes.pop(key, 0)


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)
