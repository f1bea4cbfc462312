"""The optimizer implementation a GPU takes, taken on any device, and said as it ran.

torch's AdamW picks its implementation from where the weights are: fused or foreach (a few
multi-tensor kernels for all the weights) for CUDA weights, a Python loop over the weights
(`_single_tensor_adam`, a dozen ops per weight) for CPU weights unless told otherwise. Without
a GPU the benchmark's rows would all take that loop, which a GPU run never does, and the
smoke's host time would be mostly it. So every row takes its GPU path here: the reference's
AdamW foreach (what the script gets on CUDA: it passes neither flag), ours fused
(backends._adamw asks for it on CUDA). Both exist on the CPU in torch >= 2.4.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import torch


def torch_optimizers(optimizer) -> list:
    """The torch optimizers that step: inside accelerate's wrapper, and each bucket's inner
    one for optim.Bucketed."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if hasattr(inner, "buckets"):
        return [b.inner for b in inner.buckets]
    return [inner]


def foreach_as_on_cuda(optimizer) -> None:
    """What torch.optim.AdamW picks by itself for CUDA weights: the foreach implementation
    (for the step, and for zero_grad)."""
    for opt in torch_optimizers(optimizer):
        opt.defaults["foreach"] = True
        for group in opt.param_groups:
            group["foreach"] = True


@contextlib.contextmanager
def fused_adamw():
    """Within: our AdamW is built fused on any device, as backends._adamw builds it on CUDA
    (the trainer builds one per bucket again when it rebuckets, so the whole run is within)."""
    from dreambooth.training import backends
    plain = backends.OPTIMIZERS["adamw"]

    def fused(groups, cfg, device):
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                 fused=True) if _fused_here(device) else plain(groups, cfg, device)
    with mock.patch.dict(backends.OPTIMIZERS, adamw=fused):
        yield


def _fused_here(device) -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    return torch.device(device).type in _get_fused_kernels_supported_devices()


def implementation(optimizer) -> str:
    """What stepped, as it ran: 'fused', 'foreach' or 'for-loop' for torch's optimizers
    (joined where buckets differ), else the optimizer's class (our Adafactor with its way:
    'foreach' on CUDA, 'stacked' by shape elsewhere)."""
    seen = []
    for opt in torch_optimizers(optimizer):
        if not isinstance(opt, torch.optim.Adam):  # AdamW is one
            name = type(opt).__name__ + (f" {opt.way}" if hasattr(opt, "way") else "")
        else:
            group = opt.param_groups[0]
            fused, foreach = group.get("fused"), group.get("foreach")
            if fused is None and foreach is None:
                from torch.optim.optimizer import _default_to_fused_or_foreach
                fused, foreach = _default_to_fused_or_foreach(
                    [p for p in group["params"]], differentiable=False, use_fused=False)
            name = "fused" if fused else "foreach" if foreach else "for-loop"
        if name not in seen:
            seen.append(name)
    return "/".join(seen)
