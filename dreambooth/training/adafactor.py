"""Adafactor as the `lowest` memory preset runs it: no first moment, a fixed learning rate, and
a second moment factored as one row and one column per weight.

    opt = Adafactor(params, lr=1e-5, weight_decay=1e-2)

The update is transformers' Adafactor with scale_parameter, relative_step and warmup_init off
(a test compares the two): the squared gradient plus eps1 goes into a moving average that keeps
1 - t^-0.8 of itself at step t; the gradient is divided by that average's square root, scaled
down to an RMS of at most clip_threshold, and multiplied by the learning rate; weight decay takes
lr * weight_decay of the weight before the update. What differs is which dims are factored.
transformers keeps averages over a weight's last two dims, so a conv weight (out, in, k, k) keeps
two (out, in, k) tensors, 2/3 of the weight's size. Here every weight with two or more dims is
the matrix (out, in*k*k): a row of `out` numbers and a column of in*k*k (for a matrix that is
what transformers keeps). A 1-d weight keeps the full average.

The statistics and the arithmetic are fp32: a bf16 or fp16 weight is updated in fp32 and copied
back (Bucketed passes its bf16 weights as fp32 stand-ins and does the stochastic rounding
itself). Weights of the same shape are updated together, stacked (up to BATCH_ELEMENTS numbers
at a time): a step is a few dozen ops per shape, not per weight, which for a UNet (686 weights,
a few dozen shapes) is most of its ops. A step reads no device tensor, since the step count is a
Python int. A state saved by
transformers' Adafactor, with statistics over the last two dims, is converted when it is loaded
(see `_refactored`), so a snapshot from before this module resumes.
"""
from __future__ import annotations

import math

import torch


BATCH_ELEMENTS = 16 * 2 ** 20  # weights stacked into one update: fp32 temporaries of 64 MiB


class Adafactor(torch.optim.Optimizer):
    """eps is transformers' pair: eps[0] is added to the squared gradient; eps[1] bounds the
    parameter scaling, which is off, and is kept so that saved param groups match."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0,
                 eps: tuple = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "eps": eps,
                                  "clip_threshold": clip_threshold, "decay_rate": decay_rate})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            batches: dict = {}  # weights of one shape, dtype, device and step count
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients.")
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                key = (tuple(p.shape), p.dtype, p.grad.dtype, p.device, state["step"])
                batches.setdefault(key, []).append(p)
            for (shape, *_, step), ps in batches.items():
                size = max(1, BATCH_ELEMENTS // max(1, ps[0].numel()))
                for i in range(0, len(ps), size):
                    self._update(ps[i:i + size], shape, step, group)
        return loss

    def _update(self, ps: list, shape: tuple, step: int, group: dict) -> None:
        """One update of weights of the same shape, stacked: a few ops for all of them."""
        n, eps1, lr = len(ps), group["eps"][0], group["lr"]
        beta = 1.0 - math.pow(step, group["decay_rate"])
        grad = torch.stack([p.grad for p in ps])
        if grad.dtype != torch.float32:
            grad = grad.float()
        states = [self.state[p] for p in ps]
        if len(shape) >= 2:
            grad = grad.view(n, shape[0], -1)
            row = _stacked(states, "exp_avg_sq_row", shape[0], grad)
            col = _stacked(states, "exp_avg_sq_col", grad.shape[-1], grad)
            squared = grad.square().add_(eps1)
            row.mul_(beta).add_(squared.mean(dim=-1), alpha=1.0 - beta)
            col.mul_(beta).add_(squared.mean(dim=-2), alpha=1.0 - beta)
            del squared  # before the update is made: two stacked temporaries at a time
            update = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1) * \
                col.unsqueeze(-2).rsqrt()
            update.mul_(grad)
        else:
            grad = grad.view(n, -1)
            second = _stacked(states, "exp_avg_sq", grad.shape[-1], grad)
            second.mul_(beta).add_(grad.square().add_(eps1), alpha=1.0 - beta)
            update = second.rsqrt().mul_(grad)
        del grad
        update = update.view(n, -1)
        # the RMS clipping, weight by weight; the learning rate goes with the subtraction
        rms = torch.linalg.vector_norm(update, dim=1)
        update.div_(rms.div_(update.shape[1] ** 0.5 * group["clip_threshold"])
                    .clamp_(min=1.0).unsqueeze(1))
        fp32 = ps[0].dtype == torch.float32
        weights = ps if fp32 else list(torch.stack(ps).float().unbind(0))
        if group["weight_decay"] != 0:
            torch._foreach_add_(weights, weights, alpha=-group["weight_decay"] * lr)
        torch._foreach_sub_(weights, update.view(n, *shape).unbind(0), alpha=lr)
        if not fp32:
            torch._foreach_copy_(ps, weights)

    def load_state_dict(self, state_dict: dict) -> None:
        """Also converts transformers' statistics (counted in `converted`: such a resume is
        close to, not bit-identical with, an uninterrupted run)."""
        super().load_state_dict(state_dict)
        self.converted = 0
        for state in self.state.values():
            state.pop("RMS", None)  # transformers' (unused with parameter scaling off)
            if "exp_avg_sq_row" in state and state["exp_avg_sq_row"].dim() > 1:
                self.converted += 1
                state["exp_avg_sq_row"], state["exp_avg_sq_col"] = _refactored(
                    state["exp_avg_sq_row"], state["exp_avg_sq_col"])


def _stacked(states: list, key: str, size: int, like: torch.Tensor) -> torch.Tensor:
    """The statistic `key` of the weights of one update, as one fp32 tensor (n, size) on the
    gradient's device whose rows are the weights' states (views): made once, so a step neither
    stacks nor copies back. Zeros at the first step; a loaded state (separate tensors, in the
    weight's dtype) is stacked into one at its first step."""
    first = states[0].get(key)
    if first is not None and first.dtype == torch.float32 and first.device == like.device:
        base = first._base
        if base is not None and base.shape == (len(states), size) and all(
                s[key]._base is base and s[key].storage_offset() == i * size
                for i, s in enumerate(states)):
            return base
    if first is None:
        stacked = torch.zeros(len(states), size, dtype=torch.float32, device=like.device)
    else:
        stacked = torch.stack([s[key] for s in states]).to(device=like.device,
                                                           dtype=torch.float32)
    for state, view in zip(states, stacked.unbind(0)):
        state[key] = view
    return stacked


def _refactored(row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' statistics of a weight with 3+ dims, row (*lead, a) and col (*lead, b),
    as ours: the second moment they stand for, row x col / mean(row) over (a, b), averaged
    over the matrix (lead[0], rest)'s rows and columns. The row comes out as exact as it was
    (both factorings keep the mean over the same entries); the column is as close as the
    old factoring allows."""
    row, col = row.float(), col.float()
    full = row.unsqueeze(-1) * (col / row.mean(dim=-1, keepdim=True)).unsqueeze(-2)
    full = full.reshape(full.shape[0], -1)
    return full.mean(dim=1), full.mean(dim=0)
