"""The lean forward of diffusers' Attention modules (training/leanattn.py): the processor called
as diffusers' forward calls it (the same output), without inspecting its signature each call;
extra keyword arguments still go through diffusers' forward."""
from __future__ import annotations

import copy

import torch

from dreambooth.training.leanattn import streamline


def _calls(fn) -> int:
    import cProfile
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    return sum(e.callcount for e in profiler.getstats() if not isinstance(e.code, str))


def test_the_lean_attention_forward_gives_diffusers_output_with_fewer_python_calls():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    torch.manual_seed(0)
    plain = Attention(16, cross_attention_dim=8, heads=2, dim_head=8)
    plain.set_processor(AttnProcessor2_0())
    lean = copy.deepcopy(plain)
    assert streamline(torch.nn.Sequential(lean)) == 1
    x, context = torch.randn(1, 6, 16), torch.randn(1, 4, 8)
    assert torch.equal(plain(x, context), lean(x, context))
    _calls(lambda: plain(x, context)), _calls(lambda: lean(x, context))  # (first calls)
    # 123 -> 43 with diffusers 0.42.1: its forward's inspect.signature is about 80 calls
    assert _calls(lambda: lean(x, context)) <= _calls(lambda: plain(x, context)) - 50
    # an extra keyword argument: diffusers' forward, which drops it (and warns)
    assert torch.equal(lean(x, context, unknown_argument=1), plain(x, context))
