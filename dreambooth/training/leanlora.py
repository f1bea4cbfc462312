"""A peft LoRA Linear's forward without peft's per-call bookkeeping: the same ops, fewer Python
calls (issue 25: on a GPU every Python call of a step is host time the kernels may wait for).

peft's `lora.Linear.forward` checks its arguments, pops keyword arguments, reads three
properties, looks its adapter up in three ModuleDicts and calls four modules (the base layer,
lora_A, lora_B and an Identity dropout), each through nn.Module's call machinery: about 30
Python calls a layer and step (SD1.5 attention LoRA: 128 layers, twice with checkpointing).
`streamline` gives each plain layer (one adapter, 'default', active and not merged, no dropout,
no variant such as peft's DoRA, bias-free lora_A/lora_B) a forward that makes peft's
ops in peft's order (so the result and the gradients are bit-identical: tested), calling the
base layer's own forward directly where it has no hooks (fp8_base's upcasting forward
included). Under autocast it also leaves out peft's cast of the input up to the LoRA weights'
fp32, which autocast undoes before the matmul (bit for bit: see _autocast_in). A layer in any
other state, or called with other arguments, runs peft's forward.
"""
from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER = "default"
_MODES = hasattr(torch, "get_autocast_dtype")  # torch >= 2.4: autocast's state by device type


def streamline(models: list) -> int:
    """Give every plain peft LoRA Linear in `models` the lean forward; how many got it."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # no peft: no peft layers
        return 0
    count = 0
    for model in models:
        for m in model.modules():
            if type(m) is Linear and "forward" not in vars(m) and _plain(m):
                m.forward = MethodType(_forward, m)
                count += 1
    return count


def _plain(m) -> bool:
    if list(m.lora_A) != [ADAPTER] or list(m.lora_B) != [ADAPTER] \
            or getattr(m, "lora_variant", {}) or ADAPTER not in m.lora_dropout:
        return False
    down, up = m.lora_A[ADAPTER], m.lora_B[ADAPTER]
    return (isinstance(m.lora_dropout[ADAPTER], nn.Identity)
            and all(type(x) is nn.Linear and x.bias is None and "forward" not in vars(x)
                    for x in (down, up)))


_M = nn.modules.module


def _direct(self) -> bool:
    """Whether this layer's three modules can be run without nn.Module's call (no hooks on
    them or global ones, no compiled call, no JIT trace), and this call is the plain one (one
    active adapter, not merged, not disabled)."""
    if self._disable_adapters or self.merged_adapters \
            or self._active_adapter not in (ADAPTER, [ADAPTER]) \
            or _M._global_forward_hooks or _M._global_forward_pre_hooks \
            or _M._global_backward_hooks or _M._global_backward_pre_hooks \
            or torch._C._get_tracing_state():
        return False
    modules = self._modules
    for module in (modules["base_layer"], modules["lora_A"]._modules[ADAPTER],
                   modules["lora_B"]._modules[ADAPTER]):
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks \
                or module._backward_pre_hooks \
                or getattr(module, "_compiled_call_impl", None) is not None:
            return False
    return True


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or not _direct(self):
        return type(self).forward(self, x, *args, **kwargs)
    # (modules and parameters read from their dicts: nn.Module's __getattr__ is a Python call)
    modules = self._modules
    base, down, up = modules["base_layer"], modules["lora_A"]._modules[ADAPTER], \
        modules["lora_B"]._modules[ADAPTER]
    if type(base) is nn.Linear and "forward" not in vars(base):
        result = F.linear(x, base._parameters["weight"], base._parameters["bias"])
    else:  # its own forward (fp8_base's upcast): what Module.__call__ would call
        result = base.forward(x)
    dtype = result.dtype
    weight = down._parameters["weight"]
    if x.dtype != weight.dtype and getattr(self, "cast_input_dtype_enabled", True):
        kind = x.device.type  # (_autocast_in, inline where torch can say)
        if not (torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == x.dtype
                if _MODES else _autocast_in(x)):
            x = x.to(dtype=weight.dtype)
    result = result + F.linear(F.linear(x, weight), up._parameters["weight"]) \
        * self.scaling[ADAPTER]
    return result.to(dtype)


def _autocast_in(x: torch.Tensor) -> bool:
    """Whether autocast runs x's device in x's dtype: then peft's cast of x up to its fp32
    LoRA weights is undone, bit for bit, by autocast's cast back down before the matmul (and in
    backward the gradient goes down, up and down again), so it is left out: two copies of the
    activation a layer. Where torch can't say (before 2.4), peft's cast is kept."""
    kind = x.device.type
    try:
        return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == x.dtype
    except (AttributeError, TypeError):
        return False
