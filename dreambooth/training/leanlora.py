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
fp32, which autocast undoes before the matmul (bit for bit: see _autocast_in), and casts the
LoRA weights down once a forward of the model, all in one autograd call (_Casts), as
autocast's cache would keep them; peft's scaling of 1.0 (alpha = rank) is left out (x 1.0 is
x, in forward and in backward). A layer in any other state, or called with other arguments,
runs peft's forward.
"""
from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from .leanfn import call, lean

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
        layers = [m for m in model.modules()
                  if type(m) is Linear and "forward" not in vars(m) and _plain(m)]
        casts = _Casts(model, layers) if layers else None
        for at, m in enumerate(layers):
            m.forward = MethodType(_forward, m)
            m._lean_casts, m._lean_at = casts, 2 * at  # (plain attributes: no __getattr__)
        count += len(layers)
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


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # peft's forward unless this call is the plain one (one active adapter, not merged, not
    # disabled) through three modules that can run without nn.Module's call (no hooks on them
    # or global ones, no compiled call, no JIT trace). (Inline, and modules and parameters read
    # from their dicts: each function call, nn.Module's __getattr__ too, is a Python call.)
    if args or kwargs or self._disable_adapters or self.merged_adapters \
            or self._active_adapter not in (ADAPTER, [ADAPTER]) \
            or _M._global_forward_hooks or _M._global_forward_pre_hooks \
            or _M._global_backward_hooks or _M._global_backward_pre_hooks \
            or torch._C._get_tracing_state():
        return type(self).forward(self, x, *args, **kwargs)
    modules = self._modules
    base, down, up = modules["base_layer"], modules["lora_A"]._modules[ADAPTER], \
        modules["lora_B"]._modules[ADAPTER]
    for module in (base, down, up):
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks \
                or module._backward_pre_hooks \
                or getattr(module, "_compiled_call_impl", None) is not None:
            return type(self).forward(self, x, *args, **kwargs)
    if type(base) is nn.Linear and "forward" not in vars(base):
        result = F.linear(x, base._parameters["weight"], base._parameters["bias"])
    else:  # its own forward (fp8_base's upcast): what Module.__call__ would call
        result = base.forward(x)
    dtype = result.dtype
    weight, up_weight = down._parameters["weight"], up._parameters["weight"]
    if x.dtype != weight.dtype and getattr(self, "cast_input_dtype_enabled", True):
        kind = x.device.type  # (_autocast_in, inline where torch can say)
        if not (torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == x.dtype
                if _MODES else _autocast_in(x)):
            x = x.to(dtype=weight.dtype)
    casts = self._lean_casts
    copies = (casts.copies if casts.copies is not None else casts.make(x.device.type)) \
        if casts.open else ()  # this forward's copies in autocast's dtype, if it has them
    if copies:  # transposed already: F.linear without a bias is matmul(x, weight.t())
        at = self._lean_at
        lora = torch.matmul(torch.matmul(x, copies[at]), copies[at + 1])
    else:
        lora = F.linear(F.linear(x, weight), up_weight)
    scaling = self.scaling[ADAPTER]
    # (x 1.0 is x, bit for bit, in forward and in backward: alpha = rank leaves it out)
    result = result + (lora if scaling == 1 else lora * scaling)
    return result if result.dtype is dtype else result.to(dtype)


class _Casts:
    """The LoRA weights of a model's lean layers (each layer's down and up, in order), cast
    down to autocast's dtype once a forward of the model, all in one autograd call, where
    autocast would cast each as its layer runs and keep the copy in its cache for the rest of
    its region (the weights that train: fp32 leaves). The same copies and the same gradients
    (cast back up to fp32, as the backward of autocast's cast does), in one autograd node
    instead of two a weight (the cast's and the transpose's of F.linear, which the copies
    have already: a matmul with them is F.linear's own), and without autocast's second
    dispatch of each matmul whose weight it casts (SD1.5's attention LoRA: 256 weights).
    Only where autocast caches its casts (a checkpointed run turns the cache off: its
    recompute casts again) and outside torch.compile's tracing; the copies last one forward
    of the model (its hooks), as autocast's cache lasts its region."""

    def __init__(self, model, layers) -> None:
        self.weights = tuple(m._modules[side]._modules[ADAPTER]._parameters["weight"]
                             for m in layers for side in ("lora_A", "lora_B"))
        self.open, self.copies = False, None
        model.register_forward_pre_hook(self.start)
        model.register_forward_hook(self.end, always_call=True)

    def start(self, module, args) -> None:
        self.open, self.copies = True, None

    def end(self, module, args, output) -> None:
        self.open, self.copies = False, None

    def make(self, kind: str) -> tuple:
        """The copies for this forward, or () where autocast would not cache its casts. Under
        torch.compile's tracing: () and no state changed (what a traced layer reads of this
        object is the same at every step: no guard fails, nothing is compiled again)."""
        if not _MODES or torch.compiler.is_compiling():
            return ()
        self.copies = ()
        if not (torch.is_autocast_enabled(kind) and torch.is_autocast_cache_enabled()):
            return ()
        weights = self.weights
        if {(w.dtype, w.device) for w in weights} == {(torch.float32, weights[0].device)} \
                and weights[0].device.type == kind:
            self.copies = call(_Down, _down, torch.get_autocast_dtype(kind), *weights)
        return self.copies


class _Down(torch.autograd.Function):
    """Each fp32 weight cast to `dtype` (what autocast's cast of it makes) and transposed
    (what F.linear takes of it); backward: each gradient transposed back and cast up to fp32
    (what those two nodes make of it), None for a weight this forward left unused. (Through
    one flat buffer it would be two kernels, not one a weight, on a GPU, but twice the
    dispatcher ops: the views in and out of it.)"""

    @staticmethod
    def forward(ctx, dtype, *weights):
        ctx.set_materialize_grads(False)
        return tuple([w.to(dtype).t() for w in weights])

    @staticmethod
    def backward(ctx, *grads):
        return (None, *[g if g is None else g.t().float() for g in grads])


_down = lean(_Down)


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
