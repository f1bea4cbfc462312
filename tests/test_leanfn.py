"""Autograd Functions without torch's Python wrappers (training/leanfn.py): fp8_base's upcast
and the gradient park's cast run no Python of torch.autograd.Function in forward or backward,
give what the full apply gives, and torch.compile traces the lean apply without a break."""
from __future__ import annotations

import cProfile

import pytest
import torch
from torch import nn

from dreambooth.training import fp8, leanfn

# torch only, and torch is the same in both core venvs
pytestmark = pytest.mark.once


def _function_py_calls(run) -> int:
    """Python calls made by `run` in torch/autograd/function.py (apply, its wrappers, the
    backward node's apply and user-function lookup)."""
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    return sum(e.callcount for e in profiler.getstats() if not isinstance(e.code, str)
               and e.code.co_filename.endswith(("autograd/function.py", "autograd\\function.py")))


def _stored_layers():
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    fp8.place(layers, torch.device("cpu"), torch.float32)
    return layers


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def test_lean_functions_run_no_python_of_autograd_function():
    """fp8's upcast and the park's cast (leanfn.lean at import), forward and backward: 0 calls
    in autograd/function.py (the full apply: 2 there a call, its backward node's 2, and
    functorch's unwrapping elsewhere, one call per argument and two)."""
    from dreambooth.training import parked

    layers = _stored_layers()
    x = torch.randn(4, 16, requires_grad=True)
    assert _function_py_calls(lambda: layers(x).sum().backward()) == 0
    park = parked.GradPark([nn.Linear(16, 8)])
    linear = park.modules[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _function_py_calls(lambda: linear(x).float().sum().backward()) == 0
    assert set(park.slots) == {id(linear.weight), id(linear.bias)}  # through the park
    full = _function_py_calls(lambda: _Twice.apply(x).sum().backward())
    assert full >= 2, full  # (the counting sees the full apply's Python: 4 with torch 2.13)


def test_the_lean_apply_gives_the_full_applys_result():
    apply = leanfn.lean(_Twice)
    x = torch.randn(5, requires_grad=True)
    lean = leanfn.call(_Twice, apply, x)
    lean.sum().backward()
    grad, x.grad = x.grad, None
    _Twice.apply(x).sum().backward()
    assert torch.equal(lean, x * 2) and torch.equal(grad, x.grad)
    assert lean.grad_fn.__class__ is _Twice._backward_cls


def test_torch_compile_traces_the_fp8_layers_lean_apply_whole():
    """fullgraph: a graph break would raise; the output and the input's gradient are those of
    the eager layers, bit for bit (backend 'eager': dynamo's capture, no code generation)."""
    torch._dynamo.reset()
    layers = _stored_layers()
    x = torch.randn(4, 16, requires_grad=True)
    eager = layers(x)
    eager.square().sum().backward()
    grad, x.grad = x.grad, None
    compiled = torch.compile(layers, backend="eager", fullgraph=True)(x)
    compiled.square().sum().backward()
    assert torch.equal(compiled, eager) and torch.equal(x.grad, grad)
