"""Where the step's tensors are: the fake tensors all live on the CPU device (see profile.py),
so this function mode follows which of them stand for host memory and which for the GPU, and
counts the copies between the two that make the host wait.

Seen at the Python level, before the dispatcher: `.to(...)`, `.cuda()`, `.cpu()` and the
factories. The training device is `torch.device("cuda")` to the trainer; here it becomes the
CPU. Read as on a CUDA run:
- a move to "cuda" (the trainer's device) or to a `torch.device('cpu')` object (which, in this
  emulation, is what `x.device` of a device tensor says) goes to the device; from a host tensor
  it is a host -> device copy, which blocks unless non_blocking;
- `.cpu()` and `.to("cpu")` (a string) go to the host; from a device tensor: a sync;
  (a `torch.device('cpu')` object is ambiguous here: FakeTensor's own `.device` can't be
  intercepted, and torch's C++ helpers hand back real devices. Taking it as the device is right
  for every move in the step: its random draws come from the trainer's generator, which lives
  on the device, and land there;)
- a factory drawing from one of the host's generators (`host_generators`: none in the
  trainer's step since its generator moved to the device), given no device, or given the
  string "cpu" makes a host tensor; `torch.tensor(data, device="cuda")` is a host -> device copy.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

FACTORIES = {"randn", "rand", "randint", "zeros", "ones", "empty", "full", "arange",
             "linspace", "randperm", "normal", "tensor", "as_tensor", "eye"}
FROM_DATA = {"tensor", "as_tensor"}
CPU = torch.device("cpu")


def _where(value):
    """'device', 'host' or None (not a device argument) for a device argument as written."""
    if isinstance(value, torch.device):
        return "device"  # "cuda" (the trainer's), or a device tensor's .device
    if isinstance(value, str) and not value.startswith(("float", "bfloat", "int", "bool")):
        return "host" if value.split(":")[0] == "cpu" else "device"
    return None


def _to_cpu(value):
    return CPU if _where(value) is not None else value


class OnDevice(TorchFunctionMode):
    def __init__(self, counter, host_generators=()) -> None:
        super().__init__()
        self.counter = counter
        self.host_generators = list(host_generators)  # CPU generators of the host (the trainer's)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        is_method = bool(args) and isinstance(args[0], torch.Tensor) and \
            getattr(torch.Tensor, name, None) is func
        if is_method and name in ("to", "cuda", "cpu"):
            return self.move(func, name, args, kwargs)
        if not is_method and name in FACTORIES and getattr(torch, name, None) is func:
            return self.factory(func, name, args, kwargs)
        return func(*args, **kwargs)

    def move(self, func, name, args, kwargs):
        src = args[0]
        if name == "cuda":
            dest, args, kwargs = "device", (src,), {k: v for k, v in kwargs.items()
                                                 if k == "non_blocking"}
            func = torch.Tensor.to
        elif name == "cpu":
            dest = "host"
        else:
            wanted = [w for w in map(_where, (*args[1:], kwargs.get("device"))) if w]
            if args[1:] and isinstance(args[1], torch.Tensor):  # .to(other)
                wanted = ["host" if self.counter.is_host(args[1]) else "device"]
            dest = wanted[0] if wanted else None
            args = (src, *map(_to_cpu, args[1:]))
            kwargs = {k: (_to_cpu(v) if k == "device" else v) for k, v in kwargs.items()}
        src_host = self.counter.is_host(src)
        out = func(*args, **kwargs)
        if dest is None or (dest == "host") == src_host:
            return out
        if src_host and src.dim() > 0 and not kwargs.get("non_blocking"):
            self.counter.sync("blocking host -> device copy")
        elif not src_host:
            self.counter.sync("device -> host copy")
        if out is src or out.untyped_storage()._cdata == src.untyped_storage()._cdata:
            out = out.clone()  # a copy on a real run
        self.counter.mark(out, host=dest == "host")
        return out

    def factory(self, func, name, args, kwargs):
        generator = kwargs.get("generator")
        where = _where(kwargs.get("device"))
        if any(generator is g for g in self.host_generators) or kwargs.get("device") is None:
            dest = "host"  # drawn on the host, or torch's default device
        else:
            dest = where or "device"
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _to_cpu(kwargs["device"])}
        out = func(*args, **kwargs)
        if name in FROM_DATA and dest == "device":
            self.counter.sync("blocking host -> device copy")
        for t in out if isinstance(out, (tuple, list)) else (out,):  # (no Python of torch's
            if isinstance(t, torch.Tensor):                            # counted: profile_calls)
                self.counter.mark(t, host=dest == "host")
        return out

