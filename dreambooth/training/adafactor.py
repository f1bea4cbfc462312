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
itself). A step reads no device tensor, since the step count is a Python int. A state saved by
transformers' Adafactor, with statistics over the last two dims, is converted when it is loaded
(see `_refactored`), so a snapshot from before this module resumes.
"""
from __future__ import annotations

import math

import torch


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
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad if p.grad.dtype == torch.float32 else p.grad.float()
        if grad.is_sparse:
            raise RuntimeError("Adafactor does not support sparse gradients.")
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        beta = 1.0 - math.pow(state["step"], group["decay_rate"])
        if grad.dim() >= 2:
            update = _factored(state, grad.reshape(grad.shape[0], -1), beta, group["eps"][0])
        else:
            update = _full(state, grad, beta, group["eps"][0])
        rms = update.norm(2) / (update.numel() ** 0.5)
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(group["lr"])
        weight = p if p.dtype == torch.float32 else p.float()
        if group["weight_decay"] != 0:
            weight.add_(weight, alpha=-group["weight_decay"] * group["lr"])
        weight.sub_(update.view(weight.shape))
        if weight is not p:
            p.copy_(weight)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():
            state.pop("RMS", None)  # transformers' (unused with parameter scaling off)
            if "exp_avg_sq_row" in state and state["exp_avg_sq_row"].dim() > 1:
                state["exp_avg_sq_row"], state["exp_avg_sq_col"] = _refactored(
                    state["exp_avg_sq_row"], state["exp_avg_sq_col"])


def _fp32(state: dict, key: str, size: int, like: torch.Tensor) -> torch.Tensor:
    """The statistic `key`: zeros at the first step; fp32 on the gradient's device (a loaded
    state takes the weight's dtype, which for a bf16 weight is bf16)."""
    if key not in state:
        state[key] = torch.zeros(size, dtype=torch.float32, device=like.device)
    elif state[key].dtype != torch.float32 or state[key].device != like.device:
        state[key] = state[key].to(device=like.device, dtype=torch.float32)
    return state[key]


def _factored(state: dict, grad: torch.Tensor, beta: float, eps1: float) -> torch.Tensor:
    """The update direction of a weight seen as the matrix `grad` (rows, cols), new tensor."""
    row = _fp32(state, "exp_avg_sq_row", grad.shape[0], grad)
    col = _fp32(state, "exp_avg_sq_col", grad.shape[1], grad)
    squared = grad.square().add_(eps1)
    row.mul_(beta).add_(squared.mean(dim=-1), alpha=1.0 - beta)
    col.mul_(beta).add_(squared.mean(dim=-2), alpha=1.0 - beta)
    del squared  # before the update is made: one weight-sized temporary at a time
    update = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1) * \
        col.unsqueeze(-2).rsqrt()
    return update.mul_(grad)


def _full(state: dict, grad: torch.Tensor, beta: float, eps1: float) -> torch.Tensor:
    """The update direction of a 1-d weight, from its full second moment; new tensor."""
    second = _fp32(state, "exp_avg_sq", grad.numel(), grad)
    second.mul_(beta).add_(grad.square().add_(eps1), alpha=1.0 - beta)
    return second.rsqrt().mul_(grad)


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
