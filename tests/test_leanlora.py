"""The lean forward of peft's LoRA layers (training/leanlora.py): peft's ops (less a cast that
autocast undoes), so the output and every gradient are bit-identical, in fp32 and under bf16
autocast; a layer with a hook, or one whose adapter is off, runs peft's own forward."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dreambooth.training.leanlora import streamline
from dreambooth.training.lora import inject


def _model(seed=0, alpha=8.0):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("to_q", nn.Linear(8, 16))
    model.add_module("act", nn.GELU())
    model.add_module("to_k", nn.Linear(16, 8, bias=False))
    params = inject(model, 4, alpha, ("to_q", "to_k"))
    with torch.no_grad():
        for p in params:  # lora_B starts at zero: give the adapter something to say
            p.normal_()
    return model


def _run(model, x, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().sum().backward()
    return out, [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("alpha", [8.0, 4.0], ids=["scaled", "alpha=rank"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_lean_forward_is_peft_bit_for_bit(autocast, alpha):
    """(alpha = rank: peft's scaling of 1.0, which the lean forward leaves out)"""
    peft_model = _model(alpha=alpha)
    lean = copy.deepcopy(peft_model)
    assert streamline([lean]) == 2
    x = torch.randn(3, 8)
    out, grads = _run(peft_model, x, autocast)
    lean_out, lean_grads = _run(lean, x, autocast)
    assert out.dtype == lean_out.dtype and torch.equal(out, lean_out)
    assert len(grads) == 4 and all(torch.equal(a, b) for a, b in zip(grads, lean_grads))


class _ThreeLayers(nn.Module):
    """to_q and to_k run in forward, to_v not (a weight without a gradient this step)."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.to_k(torch.nn.functional.gelu(self.to_q(x)))


def _graph(t) -> list[str]:
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.append(type(node).__name__)
            todo += [n for n, _ in node.next_functions]
    return names


def test_under_autocast_the_weights_are_cast_once_a_forward_in_one_node():
    """Under bf16 autocast (its cache on) the LoRA weights of a model's lean layers are cast
    once a forward, all in one autograd node, instead of autocast's cast and node a weight:
    over two SGD steps the outputs, the gradients (None for the unused layer's) and the weights
    are peft's bit for bit, and the copies of the first forward are not those of the second."""
    torch.manual_seed(0)
    peft_model = _ThreeLayers()
    inject(peft_model, 4, 4.0, ("to_q", "to_k", "to_v"))
    for p in peft_model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    lean = copy.deepcopy(peft_model)
    assert streamline([lean]) == 3
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
            for m in (peft_model, lean)]
    for step in range(2):
        x = torch.randn(3, 8)
        outs = []
        for model, opt in zip((peft_model, lean), opts):
            out, grads = _run(model, x, autocast=True)
            outs.append((out, grads, _graph(out)))
            opt.step()
            opt.zero_grad()
        (out, grads, graph), (lean_out, lean_grads, lean_graph) = outs
        assert torch.equal(out, lean_out) and len(grads) == 6
        assert [g is None for g in grads] == [g is None for g in lean_grads] == \
            [False] * 4 + [True] * 2
        assert all(torch.equal(a, b) for a, b in zip(grads, lean_grads) if a is not None)
        assert graph.count("ToCopyBackward0") >= 4 and "ToCopyBackward0" not in lean_graph
        assert lean_graph.count("_DownBackward") == 1  # (the copies transposed in it, too)
        assert graph.count("TBackward0") == 4 and "TBackward0" not in lean_graph
    assert all(torch.equal(a, b) for a, b in zip(peft_model.parameters(), lean.parameters()))
    lean.to_q(x)  # a layer called alone, outside its model's forward: autocast's own cast
    assert not lean.to_q._lean_casts.open


def test_a_hooked_or_disabled_layer_runs_pefts_forward():
    model = _model()
    streamline([model])
    seen = []
    model.to_q.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 8)
    model(x)
    assert seen == [(2, 16)]  # the hook ran: through nn.Module's call
    model.to_k.enable_adapters(False)
    plain = model.to_k.base_layer(model.act(model.to_q(x)))
    assert torch.equal(model(x), plain)  # the adapter off: the base layer alone


def test_the_lean_forward_makes_a_fraction_of_pefts_python_calls():
    """Python function calls (cProfile, builtins not counted) of a forward and backward
    through two LoRA layers (and a GELU, in an nn.Sequential): 98 with peft's forward, 28 with
    the lean one (35 fewer a layer: peft's checks, properties, ModuleDict lookups and four
    nn.Module calls; the lean forward makes two, itself and one check)."""
    import cProfile

    def calls(model, x) -> int:
        profiler = cProfile.Profile()
        profiler.enable()
        model(x).sum().backward()
        profiler.disable()
        return sum(e.callcount for e in profiler.getstats() if not isinstance(e.code, str))
    peft_model = _model()
    lean = copy.deepcopy(peft_model)
    streamline([lean])
    x = torch.randn(3, 8)
    calls(peft_model, x), calls(lean, x)  # (first calls: imports, caches)
    plain, ours = calls(peft_model, x), calls(lean, x)
    assert plain - ours >= 2 * 30, (plain, ours)
