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
itself). The weights of a group (in Bucketed: of a bucket) are updated together by torch's
multi-tensor `_foreach_*` ops, as torch.optim.Adafactor's foreach path does: per weight, only
the two means over a dimension the factoring needs (no multi-tensor op reduces along a dim);
everything else is a few dozen ops for all of them (up to BATCH_ELEMENTS numbers at a time, the
size of the fp32 temporaries). The row and column statistics are kept with views shaped to
broadcast against the weight ((out, 1, ...) and (1, in, k, k)), made once. A step reads no
device tensor, since the step count is a Python int. A state saved by transformers' Adafactor,
with statistics over the last two dims, is converted when it is loaded (see `_refactored`), so
a snapshot from before this module resumes.
"""
from __future__ import annotations

import math

import torch


BATCH_ELEMENTS = 32 * 2 ** 20  # numbers updated at once: fp32 temporaries of 128 MiB (one at
# a time: the squared gradients, then the update), a bucket of Bucketed's 64 MiB of bf16 weights


class Adafactor(torch.optim.Optimizer):
    """eps is transformers' pair: eps[0] is added to the squared gradient; eps[1] bounds the
    parameter scaling, which is off, and is kept so that saved param groups match."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0,
                 eps: tuple = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "eps": eps,
                                  "clip_threshold": clip_threshold, "decay_rate": decay_rate})
        self.plans: dict = {}  # ids of a group's weights with gradients -> _Plan (see step)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            ready = []
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("Adafactor does not support sparse gradients.")
                    ready.append(p)
            if not ready:
                continue
            key = tuple(map(id, ready))
            plan = self.plans.get(key)
            if plan is None or not plan.current():  # new weights, or a state made or loaded
                plan = self.plans[key] = _Plan(self, ready)
            for state in plan.states:
                state["step"] = state.get("step", 0) + 1
            steps = {state["step"] for state in plan.states}
            if len(steps) == 1:
                step = steps.pop()
                for batch in plan.batches:
                    self._update(batch, step, group)
                continue
            sets: dict = {}  # weights stepped apart before: grouped by their counts
            for p, state in zip(ready, plan.states):
                sets.setdefault(state["step"], []).append(p)
            for step, ps in sets.items():
                for batch in _Plan(self, ps).batches:
                    self._update(batch, step, group)
        return loss

    def _update(self, b: "_Batch", step: int, group: dict) -> None:
        """One update of the weights of batch `b`, together: multi-tensor ops but two means
        per matrix."""
        eps1, lr = group["eps"][0], group["lr"]
        beta = 1.0 - math.pow(step, group["decay_rate"])
        grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in b.params]
        squared = torch._foreach_mul(grads, grads)
        torch._foreach_add_(squared, eps1)
        n = len(b.rows)
        means = [squared[i].mean(dim=dims, keepdim=True) for i, dims in enumerate(b.dims)] + \
            [squared[i].mean(dim=0, keepdim=True) for i in range(n)] + list(squared[n:])
        torch._foreach_mul_(b.averages, beta)
        torch._foreach_add_(b.averages, means, alpha=1.0 - beta)
        del squared, means
        update = []
        if n:  # (row / mean(row)) ^ -1/2 x col ^ -1/2, the outer product by broadcasting
            row_means = torch._foreach_norm(b.rows, 1)  # the sums: every entry is positive
            torch._foreach_div_(row_means, b.row_sizes)
            scaled = torch._foreach_div(b.rows, row_means)
            torch._foreach_rsqrt_(scaled)
            update = list(torch._foreach_mul(scaled, torch._foreach_rsqrt(b.cols)))
            del scaled
        if b.seconds:
            update += torch._foreach_rsqrt(b.seconds)
        torch._foreach_mul_(update, grads)
        del grads
        # the RMS clipping, weight by weight; the learning rate goes with the subtraction
        rms = torch._foreach_norm(update)
        torch._foreach_div_(rms, [root * group["clip_threshold"] for root in b.roots])
        torch._foreach_clamp_min_(rms, 1.0)
        torch._foreach_div_(update, rms)
        fp32 = b.params[0].dtype == torch.float32
        weights = b.params if fp32 else [p.float() for p in b.params]
        if group["weight_decay"] != 0:
            torch._foreach_add_(weights, weights, alpha=-group["weight_decay"] * lr)
        torch._foreach_sub_(weights, update, alpha=lr)
        if not fp32:
            torch._foreach_copy_(b.params, weights)

    def statistic(self, p, state: dict, key: str, size: int) -> torch.Tensor:
        """The statistic `key` of weight p: fp32, on the gradient's device, `size` numbers
        (zeros at the first step)."""
        kept = state.get(key)
        device = p.grad.device
        if kept is None or kept.dtype != torch.float32 or kept.device != device:
            kept = state[key] = torch.zeros(size, dtype=torch.float32, device=device) \
                if kept is None else kept.to(device=device, dtype=torch.float32)
        return kept

    def load_state_dict(self, state_dict: dict) -> None:
        """Also converts transformers' statistics (counted in `converted`: such a resume is
        close to, not bit-identical with, an uninterrupted run)."""
        super().load_state_dict(state_dict)
        self.converted, self.plans = 0, {}
        for state in self.state.values():
            state.pop("RMS", None)  # transformers' (unused with parameter scaling off)
            if "exp_avg_sq_row" in state and state["exp_avg_sq_row"].dim() > 1:
                self.converted += 1
                state["exp_avg_sq_row"], state["exp_avg_sq_col"] = _refactored(
                    state["exp_avg_sq_row"], state["exp_avg_sq_col"])


class _Plan:
    """What a step of a group's weights `ps` (those with gradients) needs, made once for them:
    their states, and their batches (of at most BATCH_ELEMENTS numbers, one dtype and device
    each) with the statistics' views. current(): the states still hold those tensors."""

    def __init__(self, opt: Adafactor, ps: list) -> None:
        self.states = [opt.state[p] for p in ps]
        sets: dict = {}
        for p, state in zip(ps, self.states):
            sets.setdefault((p.dtype, p.grad.dtype, p.grad.device), []).append((p, state))
        self.batches = [_Batch(opt, batch) for pairs in sets.values()
                        for batch in _batches(pairs, BATCH_ELEMENTS)]

    def current(self) -> bool:
        for b in self.batches:
            for state, key, kept in b.kept:
                if state.get(key) is not kept:
                    return False
        return True


class _Batch:
    """Weights updated together: the matrices first (their row and column statistics as views
    that broadcast against the weight: (out, 1, ...) and (1, in, k, ...)), then the others."""

    def __init__(self, opt: Adafactor, pairs: list) -> None:
        matrices = [(p, s) for p, s in pairs if p.dim() >= 2]
        others = [(p, s) for p, s in pairs if p.dim() < 2]
        self.params = [p for p, _ in matrices + others]
        self.kept, self.rows, self.cols, self.seconds = [], [], [], []
        for p, state in matrices:
            row = opt.statistic(p, state, "exp_avg_sq_row", p.shape[0])
            col = opt.statistic(p, state, "exp_avg_sq_col", p.numel() // p.shape[0])
            self.rows.append(row.view(-1, *(1,) * (p.dim() - 1)))
            self.cols.append(col.view(1, *p.shape[1:]))
            self.kept += [(state, "exp_avg_sq_row", row), (state, "exp_avg_sq_col", col)]
        for p, state in others:
            second = opt.statistic(p, state, "exp_avg_sq", p.numel())
            self.seconds.append(second.view(p.shape))
            self.kept.append((state, "exp_avg_sq", second))
        self.averages = self.rows + self.cols + self.seconds
        self.dims = [tuple(range(1, p.dim())) for p, _ in matrices]
        self.row_sizes = [float(r.numel()) for r in self.rows]
        self.roots = [p.numel() ** 0.5 for p in self.params]


def _batches(pairs: list, limit: int) -> list[list]:
    """(weight, state) `pairs` in runs of at most `limit` numbers (a larger weight alone)."""
    batches, size = [], 0
    for pair in pairs:
        n = pair[0].numel()
        if not batches or size + n > limit:
            batches.append([])
            size = 0
        batches[-1].append(pair)
        size += n
    return batches


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
