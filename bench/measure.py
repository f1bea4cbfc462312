"""Clocks, FLOP counts, peak memory, device peaks, and moving a run's state on and off the GPU."""
from __future__ import annotations

import gc
import platform
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets, no sparsity). Longest name matched
# first, so "H100 PCIe" wins over "H100".
BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "H800": 989.0,
    "GH200": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0,
    "RTX 4090": 165.2,
}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(name: str) -> float | None:
    """The device's dense bf16 peak, or None where it is not in the table (CPUs, unknown GPUs)."""
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return BF16_PEAK_TFLOPS[key]
    return None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cpu_sdpa_mapping() -> dict:
    """FlopCounterMode counts CUDA attention kernels but not the CPU flash kernel: add it."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    mapping = {}
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None:
        mapping[forward] = lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v)
    if backward is not None:
        mapping[backward] = lambda g, q, k, v, *a, out_shape=None, **kw: \
            fc.sdpa_backward_flop_count(g, q, k, v)
    return mapping


def count_flops(step) -> int:
    """FLOPs of one call of `step()` (matmuls, convolutions, attention; forward and backward):
    FlopCounterMode's formulas, totalled by a lean mode of their own. FlopCounterMode also
    follows which module each op runs in and decomposes every op it has no formula for, in
    Python: a third of the smoke's time went to that (the totals are the same)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = _Flops(FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping())
                     .flop_registry)
    with counter:
        step()
    return counter.total


class _Flops(TorchDispatchMode):
    def __init__(self, registry: dict) -> None:
        super().__init__()
        self.registry, self.total = registry, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


class Clock:
    """Total time and peak memory over the timed blocks of one run; without CUDA also the
    process's CPU time per step of each block (`per_step`, see steps_per_s)."""

    def __init__(self) -> None:
        self.seconds, self.steps, self.peak_allocated, self.peak_reserved = 0.0, 0, 0, 0
        self.per_step: list = []

    def steps_per_s(self) -> float:
        """On a GPU: steps over the synchronised wall time. On a CPU (the smoke): one over the
        median of the blocks' CPU seconds per step (time.process_time), so that a shared
        machine's other work and its speed drifting between blocks move it least (run with
        --rounds equal to --steps, the runs alternate step by step)."""
        if self.per_step:
            return 1.0 / statistics.median(self.per_step)
        return self.steps / self.seconds

    def time(self, step, n: int) -> float:
        """Run `step()` n times; returns the last loss."""
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = float("nan")
        for _ in range(n):
            loss = step()
        sync()
        self.seconds += time.perf_counter() - start
        if not cuda:
            self.per_step.append((time.process_time() - cpu_start) / n)
        loss = float(loss)  # ours leaves it on the device: read after the clock stops
        self.steps += n
        if cuda:
            self.peak_allocated = max(self.peak_allocated, torch.cuda.max_memory_allocated())
            self.peak_reserved = max(self.peak_reserved, torch.cuda.max_memory_reserved())
        return loss


def move(obj, device) -> None:
    """Move modules, optimizer states and (nested) dicts/tuples of tensors to `device`, in place.
    An optimizer's `step` counters stay where the optimizer keeps them (AdamW: on the CPU; on the
    GPU each step would read them back, ~1 400 syncs a step that the real script never does)."""
    if isinstance(obj, torch.nn.Module):
        obj.to(device)
    elif isinstance(obj, torch.optim.Optimizer) or hasattr(obj, "optimizer"):
        opt = obj if isinstance(obj, torch.optim.Optimizer) else obj.optimizer
        states = opt.inner_states() if hasattr(opt, "inner_states") else [opt.state]
        if hasattr(opt, "move_scratch"):  # Bucketed's bf16 scratch
            opt.move_scratch(device)
        for state in (s for states_ in states for s in states_.values()):
            for k, v in state.items():
                if torch.is_tensor(v) and k != "step":
                    state[k] = v.to(device)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _moved(v, device)


def _moved(v, device):
    if torch.is_tensor(v):
        return v.to(device)
    if isinstance(v, (tuple, list)):
        return type(v)(_moved(x, device) for x in v)
    if isinstance(v, dict):
        return {k: _moved(x, device) for k, x in v.items()}
    return v


def release() -> None:
    """A finished or parked run's GPU memory back to the allocator's pool, its cycles collected
    first so that their tensors go too. Without a GPU (the smoke size: tiny models) there is
    nothing worth a full collection, which took 0.3-0.8 s each, a dozen per configuration."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def free(acc) -> None:
    """A closed run's GPU memory back: accelerate's free_memory (its references to the models
    and optimizer dropped, a full collection, the cache emptied). Without a GPU nothing: the
    run's objects go with it, and the collection took 0.3 s a run (as release())."""
    if torch.cuda.is_available():
        acc.free_memory()
