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
itself). Where the weights are on CUDA (`foreach`, torch's own pick for its optimizers), the
weights of a group (in Bucketed: of a bucket) are updated together by torch's multi-tensor
`_foreach_*` ops, as torch.optim.Adafactor's foreach path does: per weight, only the two means
along a dim that the factoring needs (no multi-tensor op reduces along a dim); everything else
is about 20 ops for all of them (up to BATCH_ELEMENTS numbers at a time, the size of the fp32
temporaries), planned once (the statistics' views that broadcast against the weight, (out, 1,
...) and (1, in, k, k)). Elsewhere, where a multi-tensor op runs weight by weight (a CPU), the
weights of one shape are updated together, stacked (up to STACK_ELEMENTS numbers at a time): a
few dozen ops per shape. Either way reads the other's state. A step reads no device tensor,
since the step count is a Python int. A state saved by transformers' Adafactor, with statistics
over the last two dims, is converted when it is loaded (see `_refactored`), so a snapshot from
before this module resumes.
"""
from __future__ import annotations

import math

import torch


STACK_ELEMENTS = 16 * 2 ** 20  # weights stacked into one update: fp32 temporaries of 64 MiB
BATCH_ELEMENTS = 32 * 2 ** 20  # numbers updated at once: fp32 temporaries of 128 MiB (one at
# a time: the squared gradients, then the update), a bucket of Bucketed's 64 MiB of bf16 weights


class Adafactor(torch.optim.Optimizer):
    """eps is transformers' pair: eps[0] is added to the squared gradient; eps[1] bounds the
    parameter scaling, which is off, and is kept so that saved param groups match."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0,
                 eps: tuple = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, foreach: bool | None = None) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "eps": eps,
                                  "clip_threshold": clip_threshold, "decay_rate": decay_rate})
        # multi-tensor ops (as torch's optimizers, by default where the weights are on CUDA),
        # else the weights of one shape stacked (fewer kernels on a CPU, which runs a
        # multi-tensor op weight by weight)
        self.foreach = foreach
        self.plans: dict = {}  # ids of a group's weights with gradients -> _Plan (see step)

    @property
    def way(self) -> str:
        """How it steps: 'foreach' or 'stacked' (see the module's docstring)."""
        return "foreach" if self._foreach(self.param_groups[0]["params"][0]) else "stacked"

    def _foreach(self, p: torch.Tensor) -> bool:
        return self.foreach if self.foreach is not None else p.is_cuda

    def _plan(self, ps: list) -> "_Plan":
        """The cached plan of weights `ps` (rebuilt for new weights, or a state made or
        loaded since)."""
        key = tuple(map(id, ps))
        plan = self.plans.get(key)
        if plan is None or not plan.current():
            plan = self.plans[key] = _Plan(self, ps)
        return plan

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
            if not self._foreach(ready[0].grad):
                self._step_stacked(ready, group)
                continue
            plan = self._plan(ready)
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
                for batch in self._plan(ps).batches:
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

    def _update_stacked(self, ps: list, shape: tuple, step: int, group: dict) -> None:
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

    def _step_stacked(self, ready: list, group: dict) -> None:
        """The step without multi-tensor ops: the weights of one shape stacked."""
        batches: dict = {}  # weights of one shape, dtype, device and step count
        for p in ready:
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
            key = (tuple(p.shape), p.dtype, p.grad.dtype, p.device, state["step"])
            batches.setdefault(key, []).append(p)
        for (shape, *_, step), ps in batches.items():
            size = max(1, STACK_ELEMENTS // max(1, ps[0].numel()))
            for i in range(0, len(ps), size):
                self._update_stacked(ps[i:i + size], shape, step, group)

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
