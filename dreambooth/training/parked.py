"""Gradients kept in bf16 where that is exact: a full fine-tune's gradients take half the memory
(SD1.5: 1.6 GiB, not 3.2), the update is the same.

Under bf16 autocast a Linear or Conv2d runs on a bf16 copy of its fp32 weight: its gradient is
computed in bf16, then cast up to fp32 on its way to the weight. An fp32 gradient buffer holds
those bf16 values, exactly, in twice the bytes. `GradPark` casts those weights itself (the same
rounding as autocast's) and keeps each gradient as it comes, in bf16, instead of letting it
reach `.grad`. After backward, `step` clips by the global norm of every gradient (computed in
fp32, as clip_grad_norm_ does) and steps the run's own optimizer a chunk of weights at a time:
a chunk's gradients go back to fp32 in one scratch buffer (`CHUNK_BYTES`), are clipped, and the
optimizer steps those weights alone. Its state, and its snapshots, are those of a plain step.

The bf16 copy of a large weight (RECAST_ELEMENTS) is not kept for backward either: autograd
keeps the fp32 weight and casts it again when backward needs it (the weight is unchanged until
the update), so the end of the forward holds 1.1 GiB less on SD1.5's UNet, for 42 casts. Not
under gradient checkpointing, whose own hooks keep nothing of a block anyway.

With `fused_optimizer` (optim.Bucketed) a weight's gradient counts as arrived when backward's
hook on the weight runs (once, after all of its uses, with no .grad: its gradient is here); a
bucket takes its gradients from the park when it completes and steps in backward.

Exact wherever it applies (`applies`): bf16 mixed precision, one process (DDP and DeepSpeed
reduce `.grad`), no gradient accumulation (a sum of bf16 values is not one), a full fine-tune
with an optimizer that updates each weight on its own (PER_WEIGHT: stepping some of the
weights is stepping each of them) or the fused one, and no torch.compile (the park is Python,
outside a graph). With the fused optimizer's per-bucket clipping, the buckets (learnt from the
order gradients arrive in) may form a little differently, so a clip can differ. A weight that
gets a second gradient in one backward keeps the sum a plain backward makes (see `receive`;
within one autocast region, as the trainer runs each model). Layers that autocast runs in fp32
(norms, embeddings) keep fp32 `.grad`, and so do a Linear/Conv2d subclass with a forward of
its own and a module whose forward something else replaced.

From the second step, the layers of a model that ran once a step are cast together, in one
node, and backward hands their gradients over in one call (parkgroup.py: no Python per layer
in backward).
"""
from __future__ import annotations

from types import MethodType

import torch

from . import leanfn, parkgroup, selective
from .optim import split_buckets

CHUNK_BYTES = 128 * 2 ** 20  # of fp32 gradients stepped at once (the scratch buffer)
RECAST_ELEMENTS = 2 ** 22  # weights this large are cast again in backward (SD1.5: 42 of 282)
# optimizers stepped a chunk at a time: each weight's update is its own (torch's AdamW). Others
# (8-bit AdamW, whose step this can't test without a GPU; Prodigy's global estimate) keep fp32
# gradients unless fused, where each bucket steps whole
PER_WEIGHT = ("adamw",)


def applies(cfg, precision: str, processes: int = 1, distributed: str = "NO") -> bool:
    """Whether a run with `cfg` at mixed precision `precision` keeps its gradients in bf16:
    stepped by GradPark.step, or by the fused optimizer's buckets (any optimizer: a bucket
    steps whole) as they complete in backward."""
    return (precision == "bf16" and processes == 1 and distributed != "DEEPSPEED"
            and cfg.gradient_accumulation_steps == 1 and cfg.method == "dreambooth"
            and not cfg.use_lora and not cfg.bf16_weights and cfg.compile == "off"
            and (cfg.fused_optimizer or cfg.optimizer in PER_WEIGHT))


class _Cast(torch.autograd.Function):
    """A layer's fp32 weight (and bias) to bf16 for the forward, in one node; their gradients
    (bf16) to the park, not to .grad."""

    @staticmethod
    def forward(ctx, park, weight, bias):
        ctx.park, ctx.weight, ctx.bias = park, weight, bias
        ctx.cached = torch.is_autocast_cache_enabled()  # autocast's would be one cast, shared
        if bias is None:
            return weight.to(torch.bfloat16)
        return weight.to(torch.bfloat16), bias.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad, grad_bias=None):
        ctx.park.receive(ctx.weight, grad, ctx.cached)
        if ctx.bias is not None:
            ctx.park.receive(ctx.bias, grad_bias, ctx.cached)
        return None, None, None


# Function.apply and the backward node's apply less their Python wrappers (leanfn.py)
_apply = leanfn.lean(_Cast)


def _forward(self, x):
    """nn.Linear's or nn.Conv2d's forward, its weight and bias through the park where a
    gradient in bf16 is exact (one function, its tensors read from the module's dict:
    nn.Module's __getattr__ is a Python call)."""
    params = self._parameters
    weight, bias = params["weight"], params["bias"]
    if weight.requires_grad and torch.is_grad_enabled() \
            and torch.is_autocast_enabled(weight.device.type) \
            and torch.get_autocast_dtype(weight.device.type) == torch.bfloat16:
        park = self._park
        if torch._C._are_functorch_transforms_active():  # (leanfn.call, inline)
            cast = _Cast.apply(park, weight, bias)
        elif self._group and ((cast := park.casts.pop(self, None)) is not None
                              or (cast := parkgroup.cast(park, self)) is not None):
            pass  # cast with the rest of its group (parkgroup.py)
        else:
            if self._group is None:  # (learnt at the step: parkgroup.learn)
                park.uses.append(self)
            cast = _apply(park, weight, bias)
        weight, bias = (cast, None) if bias is None else cast
        if self._recast:  # cast by the park: see saving
            with self._park.saving(self, weight):
                return _layer(self, x, weight, bias)
    if self._conv:
        return self._conv_forward(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def _layer(self, x, weight, bias):
    if self._conv:
        return self._conv_forward(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


class _Recast:
    """What backward keeps of a large weight's bf16 copy: the fp32 weight and the view (cast
    again when backward needs it; the weight is unchanged until the update)."""
    __slots__ = ("weight", "size", "stride", "offset")

    def __init__(self, weight, t) -> None:
        self.weight, self.size, self.stride, self.offset = \
            weight, t.size(), t.stride(), t.storage_offset()

    def tensor(self) -> torch.Tensor:
        return self.weight.to(torch.bfloat16).as_strided(self.size, self.stride, self.offset)


FORWARDS = {torch.nn.Linear: _forward, torch.nn.Conv2d: _forward}


def attach(cfg, precision: str, acc, models: list, optimizer) -> "GradPark | None":
    """The park over `models` (the trained ones) where it applies, for the trainer to step;
    None where it does not, or where the fused optimizer takes the gradients as they come."""
    if not applies(cfg, precision, acc.num_processes, acc.distributed_type):
        return None
    inner = getattr(optimizer, "optimizer", optimizer)
    if getattr(inner, "in_backward", False):  # optim.Bucketed: a bucket steps as it completes
        # (a weight changes in backward once its bucket completes: after the one node that
        # casts it again has run)
        # (its layers each through their own node: the buckets take their gradients as each
        # weight's arrive, not all at the end of backward)
        inner.use_park(GradPark(models, not selective.full(cfg), inner.bucket_bytes // 4,
                                batch=False))
        return None
    return GradPark(models, recast=not selective.full(cfg))  # (its own hooks)


def update(acc, optimizer, park: "GradPark | None", models: list, max_norm: float,
           fused: bool) -> None:
    """The update after backward: from the park, or clipped (unless the fused optimizer has
    clipped bucket by bucket in backward) and stepped as usual."""
    if park is not None:
        park.step(optimizer, max_norm)
        return
    if acc.sync_gradients and max_norm > 0 and not fused:
        # the optimizer's weights, the ones with gradients: walking the models' parameters
        # each step (a LoRA's UNet has thousands more, frozen) was a third of ours' Python
        groups = getattr(optimizer, "optimizer", optimizer).param_groups
        acc.clip_grad_norm_([p for g in groups for p in g["params"]], max_norm)
    optimizer.step()


class GradPark:
    def __init__(self, models: list, recast: bool = True,
                 widest: int = CHUNK_BYTES // 4, batch: bool = True) -> None:
        # id(weight) -> its gradient of this step (bf16; fp32 if summed). By id: a tensor's
        # hash is a Python call, and the step looks weights up a few times each
        self.slots: dict = {}
        self.recast = recast  # large weights' bf16 copies are not kept for backward
        self.modules, self.home = [], {}  # (home: each layer's model's parkgroup.Group)
        for model in models:
            group = parkgroup.Group()
            for m in model.modules():
                kind = next((k for k in FORWARDS if isinstance(m, k)), None)
                # a subclass with a forward of its own, or a module whose forward was replaced
                # (hooks of other libraries), runs as it is (its .grad stays fp32)
                if kind is not None and type(m).forward is kind.forward \
                        and "forward" not in vars(m) and m.weight.dtype == torch.float32:
                    m._park, m.forward = self, MethodType(FORWARDS[kind], m)
                    m._conv = kind is torch.nn.Conv2d
                    m._recast = recast and m.weight.numel() >= RECAST_ELEMENTS \
                        and not getattr(m, "_recomputed", False)  # see saving; selective.py
                    # None: not learnt yet (parkgroup.learn); False: through its own node
                    m._group = None if batch and recast and not m._recast else False
                    self.modules.append(m)
                    self.home[m] = group
        self.parked = {id(p) for m in self.modules for p in (m.weight, m.bias)
                       if p is not None}
        # this step's casts of the grouped layers not yet run; the groups cast this step;
        # the layers run (not grouped yet) since the last step
        self.casts, self.cast_now, self.uses = {}, set(), []
        self.scratch, self.views = None, {}  # see take
        self.plans: dict = {}  # see _plan
        # values in the widest set taken at once: a chunk, a bucket, or a larger weight alone
        self.widest = max([widest] + [m.weight.numel() for m in self.modules])

    def release(self) -> None:
        """Drop the scratch buffer (and its views): made again where the weights are at the
        next step that needs it (the benchmark moves a run off the GPU between its rounds)."""
        self.scratch, self.views = None, {}
        self.casts.clear()
        self.cast_now.clear()

    def detach(self) -> None:
        """The modules run as they were made."""
        for m in self.modules:
            del m._park, m.forward, m._recast, m._conv, m._group
        self.modules, self.home, self.casts = [], {}, {}

    def saving(self, m, cast):
        """Around a large weight's forward (`_recast`: RECAST_ELEMENTS, when recast is on):
        autograd keeps, of the weight's bf16 copy `cast`, what casts it again in
        backward (1 op), not the copy: at the end of the forward, SD1.5's UNet holds 1.1 GiB
        less."""
        weight, copy = m.weight, id(cast)  # (by id: the hooks live as long as the saved)

        def pack(t):
            return _Recast(weight, t) if copy in (id(t), id(t._base)) else t

        def unpack(t):
            return t.tensor() if isinstance(t, _Recast) else t
        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def receive(self, weight, grad, shared: bool = True) -> None:
        """A weight's gradient from one use. A second use's is summed as a plain backward sums
        it: in bf16 where autocast would have shared one cached cast (`shared`), else in fp32
        (each use cast up on its own)."""
        key = id(weight)
        kept = self.slots.get(key)
        if kept is None:  # the tensor backward made, or a view of all of one (a transpose)
            whole = grad._base is None or grad._base.numel() == grad.numel()
            self.slots[key] = grad if whole else grad.clone()
        elif shared and kept.dtype == grad.dtype:
            self.slots[key] = kept + grad
        else:
            self.slots[key] = kept.float() + grad.float()

    def take(self, params: list) -> None:
        """The parked gradients of `params` into their .grad, in fp32: views of one scratch
        buffer, made once for a set of weights (no op per weight at a step); a weight that
        has a .grad too (it ran outside the park) gets the sum."""
        slots = self.slots
        chosen = [p for p in params if id(p) in slots]
        if not chosen:
            return
        views = self._views(chosen)
        grads = [slots.pop(id(p)) for p in chosen]
        torch._foreach_copy_(views, grads)
        for p, v in zip(chosen, views):
            p.grad = v if p.grad is None else v.add_(p.grad)

    def _views(self, params: list) -> list:
        key = tuple(map(id, params))
        views = self.views.get(key)
        if views is None:
            n = sum(p.numel() for p in params)
            if self.scratch is None or self.scratch.numel() < n:  # the old views go with it
                self.views, self.scratch = {}, None
                self.scratch = torch.empty(max(n, self.widest), dtype=torch.float32,
                                           device=params[0].device)
            views = self.views[key] = [v.view(p.shape) for v, p in zip(
                self.scratch[:n].split([p.numel() for p in params]), params)]
        return views

    def plan(self, sets: list) -> None:
        """Make the views for these sets of weights now (the fused optimizer's buckets, when
        it makes them), not at the first step that takes them."""
        self.views = {}
        for params in sets:
            if chosen := [p for p in params if id(p) in self.parked]:
                self._views(chosen)

    def _plan(self, groups: list) -> "_Plan":
        """What step() needs of the optimizer's groups, made once for them (the lists of
        weights are the same objects every step: step() puts them back)."""
        key = tuple((id(g["params"]), len(g["params"])) for g in groups)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = _Plan(groups, self.parked)
        return plan

    @torch.no_grad()
    def step(self, optimizer, max_norm: float) -> None:
        """Clip every gradient (parked and .grad) by their global norm, then step `optimizer`
        (accelerate's wrapper or a torch one) a chunk of weights at a time."""
        parkgroup.learn(self)
        groups = getattr(optimizer, "optimizer", optimizer).param_groups
        plan, slots = self._plan(groups), self.slots
        for p in plan.weights:
            if p.grad is not None and id(p) in slots:  # ran outside the park too: both, fp32
                slots[id(p)], p.grad = p.grad + slots[id(p)].float(), None
        grads = [slots.get(id(p), p.grad) for p in plan.weights]
        coef = self._clip_coef(grads, max_norm) if max_norm > 0 else None
        plain = [p for p, g in zip(plan.weights, grads) if g is not None
                 and id(p) not in slots]  # fp32, in .grad already
        chunks = plan.chunks if slots.keys() == plan.parked else [plan.split(c) for c in (
            split_buckets([p for p in plan.weights if id(p) in slots], CHUNK_BYTES))]
        if plain:  # stepped with the first chunk (each weight's update is its own)
            chunks = plan.with_plain(plain, chunks)
        try:
            for chunk, by_group in chunks:
                self.take(chunk)
                _step_chunk(optimizer, groups, chunk, by_group, coef)
        finally:
            for g, params in zip(groups, plan.saved):
                g["params"] = params
            slots.clear()

    def _clip_coef(self, grads: list, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_'s coefficient over `grads` (in the weights' order; bf16 ones'
        norms accumulated in fp32)."""
        present = [g for g in grads if g is not None]
        by_dtype = {}
        for i, g in enumerate(present):
            by_dtype.setdefault(g.dtype, []).append(i)
        norms = [None] * len(present)
        for idx in by_dtype.values():
            got = torch._foreach_norm([present[i] for i in idx], 2.0, dtype=torch.float32)
            for i, n in zip(idx, got):
                norms[i] = n
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        return torch.clamp(max_norm / (total + 1e-6), max=1.0)


class _Plan:
    """A set of optimizer groups as GradPark.step walks them: every weight in order, the
    parked ones cut into chunks (split_buckets, CHUNK_BYTES), each chunk's weights per group."""

    def __init__(self, groups: list, parked: set) -> None:
        self.saved = [g["params"] for g in groups]
        self.weights = [p for params in self.saved for p in params]
        self.group_of = {id(p): k for k, params in enumerate(self.saved) for p in params}
        self.count = len(groups)
        chunked = [p for p in self.weights if id(p) in parked]
        self.parked = set(map(id, chunked))
        self.chunks = [self.split(c) for c in split_buckets(chunked, CHUNK_BYTES)]
        self.merged: dict = {}  # see with_plain

    def with_plain(self, plain: list, chunks: list) -> list:
        """`chunks`, the first with the `plain` weights (fp32 .grad) too: one optimizer step
        fewer (made once for a set of them with the planned chunks)."""
        key = tuple(map(id, plain)) if chunks is self.chunks else None
        merged = self.merged.get(key)
        if merged is None:
            merged = self.split(plain + (chunks[0][0] if chunks else []))
            if key is not None:
                self.merged[key] = merged
        return [merged] + chunks[1:]

    def split(self, chunk: list) -> tuple:
        """(chunk, its weights group by group)."""
        by_group = [[] for _ in range(self.count)]
        for p in chunk:
            by_group[self.group_of[id(p)]].append(p)
        return chunk, by_group


def _step_chunk(optimizer, groups, chunk: list, by_group: list, coef) -> None:
    """Step `optimizer` over the weights of `chunk` alone (`by_group`: those of each group),
    clipped by `coef`."""
    if coef is not None:
        torch._foreach_mul_([p.grad for p in chunk], coef)
    for g, params in zip(groups, by_group):
        g["params"] = params
    optimizer.step()
    for p in chunk:
        p.grad = None
