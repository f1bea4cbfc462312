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
        self.shaped: dict = {}  # id(statistic) -> (it, its view shaped to broadcast)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            sets: dict = {}  # weights of one step count, dtypes and device
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients.")
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                sets.setdefault((p.dtype, p.grad.dtype, p.device, state["step"]), []).append(p)
            for (*_, step), ps in sets.items():
                for batch in _batches(ps, BATCH_ELEMENTS):
                    self._update(batch, step, group)
        return loss

    def _update(self, ps: list, step: int, group: dict) -> None:
        """One update of weights `ps`, together: multi-tensor ops but two means per matrix."""
        eps1, lr = group["eps"][0], group["lr"]
        beta = 1.0 - math.pow(step, group["decay_rate"])
        grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in ps]
        factored = [i for i, p in enumerate(ps) if p.dim() >= 2]
        full = [i for i, p in enumerate(ps) if p.dim() < 2]
        rows, cols = self._statistics(ps, grads, factored)
        seconds = [self._statistic(ps[i], "exp_avg_sq", ps[i].shape, grads[i]) for i in full]
        squared = torch._foreach_mul(grads, grads)
        torch._foreach_add_(squared, eps1)
        means = [squared[i].mean(dim=tuple(range(1, ps[i].dim())), keepdim=True)
                 for i in factored] + [squared[i].mean(dim=0, keepdim=True) for i in factored]
        averages = rows + cols + seconds
        torch._foreach_mul_(averages, beta)
        torch._foreach_add_(averages, means + [squared[i] for i in full], alpha=1.0 - beta)
        del squared, means
        update = []
        if factored:  # (row / mean(row)) ^ -1/2 x col ^ -1/2, the outer product by broadcasting
            row_means = torch._foreach_norm(rows, 1)  # the sums: every entry is positive
            torch._foreach_div_(row_means, [float(r.numel()) for r in rows])
            scaled = torch._foreach_div(rows, row_means)
            torch._foreach_rsqrt_(scaled)
            update = torch._foreach_mul(scaled, torch._foreach_rsqrt(cols))
            del scaled
        if full:
            update += torch._foreach_rsqrt(seconds)
        order = factored + full
        torch._foreach_mul_(update, [grads[i] for i in order])
        del grads
        # the RMS clipping, weight by weight; the learning rate goes with the subtraction
        rms = torch._foreach_norm(update)
        torch._foreach_div_(rms, [u.numel() ** 0.5 * group["clip_threshold"] for u in update])
        torch._foreach_clamp_min_(rms, 1.0)
        torch._foreach_div_(update, rms)
        chosen = [ps[i] for i in order]
        fp32 = chosen[0].dtype == torch.float32
        weights = chosen if fp32 else [p.float() for p in chosen]
        if group["weight_decay"] != 0:
            torch._foreach_add_(weights, weights, alpha=-group["weight_decay"] * lr)
        torch._foreach_sub_(weights, update, alpha=lr)
        if not fp32:
            torch._foreach_copy_(chosen, weights)

    def _statistics(self, ps: list, grads: list, factored: list) -> tuple[list, list]:
        """The row and column averages of the matrices among `ps`, as views that broadcast
        against the weight: (out, 1, ...) and (1, in, k, ...)."""
        rows = [self._statistic(ps[i], "exp_avg_sq_row", (-1,) + (1,) * (ps[i].dim() - 1),
                                grads[i]) for i in factored]
        cols = [self._statistic(ps[i], "exp_avg_sq_col", (1, *ps[i].shape[1:]), grads[i])
                for i in factored]
        return rows, cols

    def _statistic(self, p, key: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """The statistic `key` of weight p (fp32, on the gradient's device; zeros at the first
        step), through a view of `shape` made once."""
        state = self.state[p]
        kept = state.get(key)
        if kept is None or kept.dtype != torch.float32 or kept.device != like.device:
            size = p.shape[0] if key.endswith("row") else p.numel() // p.shape[0] \
                if key.endswith("col") else p.numel()
            kept = state[key] = torch.zeros(size, dtype=torch.float32, device=like.device) \
                if kept is None else kept.to(device=like.device, dtype=torch.float32)
        made = self.shaped.get(id(kept))
        if made is None or made[0] is not kept:
            made = self.shaped[id(kept)] = (kept, kept.view(shape))
        return made[1]

    def load_state_dict(self, state_dict: dict) -> None:
        """Also converts transformers' statistics (counted in `converted`: such a resume is
        close to, not bit-identical with, an uninterrupted run)."""
        super().load_state_dict(state_dict)
        self.converted, self.shaped = 0, {}
        for state in self.state.values():
            state.pop("RMS", None)  # transformers' (unused with parameter scaling off)
            if "exp_avg_sq_row" in state and state["exp_avg_sq_row"].dim() > 1:
                self.converted += 1
                state["exp_avg_sq_row"], state["exp_avg_sq_col"] = _refactored(
                    state["exp_avg_sq_row"], state["exp_avg_sq_col"])


def _batches(ps: list, limit: int) -> list[list]:
    """`ps` in runs of at most `limit` numbers (a larger weight alone)."""
    batches, size = [], 0
    for p in ps:
        if not batches or size + p.numel() > limit:
            batches.append([])
            size = 0
        batches[-1].append(p)
        size += p.numel()
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
