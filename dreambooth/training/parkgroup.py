"""The gradient park's casts, a model's layers at once (issue 25: on a GPU every Python call of
a step is host time the kernels may wait for).

Through `parked._Cast`, each Linear/Conv2d casts its weight in a node of its own, and backward
calls Python once per layer to hand its gradient to the park. Here the layers of one model that
ran once in a step (learnt at the park's first steps: `learn`) are cast together, in one node
(`CastGroup`), when the first of them runs; each takes its cast as it runs, and backward hands
every gradient to the park in one call (`collect`), once it has them all. The same casts and the
same gradients, bit for bit (one cast per layer either way, and a layer's gradient reaches the
park as it left the layer); no Python per layer in backward, one autograd node per model.

A layer that ran more than once in a step, or a large one cast again in backward (`_recast`), or
one recomputed by gradient checkpointing keeps its own node, as do all of a park whose gradients
the fused optimizer takes weight by weight in backward (the group's arrive together, at its end).
A grouped layer run a second time in a step (its group cast already) casts through its own node
too, its gradients summed with the group's as `GradPark.receive` sums any two.
"""
from __future__ import annotations

import torch

from . import leanfn


class CastGroup(torch.autograd.Function):
    """Every weight (and bias) of a group to bf16 in one node; their gradients (bf16) to the
    park in one call, once backward has them all."""

    @staticmethod
    def forward(ctx, park, group, *params):
        ctx.set_materialize_grads(False)  # (a layer that gets no gradient: None, not zeros)
        ctx.park, ctx.group, ctx.cached = park, group, torch.is_autocast_cache_enabled()
        return tuple([p.to(torch.bfloat16) for p in params])

    @staticmethod
    def backward(ctx, *grads):
        collect(ctx.park, ctx.group, grads, ctx.cached)
        return (None,) * (2 + len(grads))


_apply = leanfn.lean(CastGroup)  # (outside functorch's transforms only: parked._forward)


class Group:
    """Layers of one model cast in one node: their weights and biases in one list, by id too."""

    def __init__(self) -> None:
        self.set([])

    def set(self, modules: list) -> None:
        self.modules, self.biased = modules, [m.bias is not None for m in modules]
        self.params = [p for m in modules for p in (m.weight, m.bias) if p is not None]
        self.ids = [id(p) for p in self.params]


def cast(park, m) -> "torch.Tensor | tuple | None":
    """The bf16 weight (and bias) of `m`, a grouped layer, as parked._Cast gives them: its group
    cast when its first layer runs in a step, the others' kept in `park.casts` until they run
    (each popped then: freed once its layer's backward has run, as before); None where the
    group is cast already this step (a second use: its own node)."""
    group = m._group
    if id(group) in park.cast_now:
        return None
    park.cast_now.add(id(group))
    outs = iter(_apply(park, group, *group.params))
    park.casts.update({k: (next(outs), next(outs)) if b else next(outs)
                       for k, b in zip(group.modules, group.biased)})
    return park.casts.pop(m)


def collect(park, group: Group, grads: tuple, cached: bool) -> None:
    """A group's gradients into the park (None for a layer whose output got none), as
    GradPark.receive takes them one by one."""
    slots = park.slots
    for key, weight, grad in zip(group.ids, group.params, grads):
        if grad is None:
            continue
        if key in slots:  # (a second use, through its own node)
            park.receive(weight, grad, cached)
        elif grad._base is None or grad._base.numel() == grad.numel():
            slots[key] = grad
        else:  # (a view of part of a larger tensor: not kept alive by it)
            slots[key] = grad.clone()


def learn(park) -> None:
    """At a step: the layers that ran since the last one, still ungrouped, join their model's
    group if they ran once, or keep their own node for good; this step's casts left unused
    (a layer that did not run) are dropped."""
    uses, park.uses = park.uses, []
    park.casts.clear()
    park.cast_now.clear()
    counts: dict = {}
    for m in uses:
        counts[m] = counts.get(m, 0) + 1
    changed = set()
    for m, n in counts.items():
        m._group = park.home[m] if n == 1 else False
        if m._group:
            changed.add(m._group)
    for group in changed:
        group.set([m for m in park.modules if m._group is group])
