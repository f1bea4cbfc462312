"""diffusers' `Attention.forward` without its per-call signature inspection (issue 25: on a GPU
every Python call of a step is host time the kernels may wait for).

Each call of diffusers' Attention.forward inspects its processor's `__call__` signature
(`inspect.signature`: about 80 of the 120 Python calls an attention call makes) only to filter
and warn about extra keyword arguments, then calls the processor. SD1.5's UNet has 32 attention
modules, called once a forward (twice with gradient checkpointing). `streamline` gives each
Attention module whose forward is diffusers' own a forward that, called without extra keyword
arguments (how the UNet calls them), calls the processor as diffusers' forward would: the same
call, so the same result; with extra keyword arguments it runs diffusers' forward.
"""
from __future__ import annotations

from types import MethodType


def streamline(model) -> int:
    """Give every Attention module of `model` with diffusers' own forward the lean one; how
    many got it."""
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # (diffusers is always there for a UNet; a stand-in model has none)
        return 0
    count = 0
    for m in model.modules():
        if isinstance(m, Attention) and type(m).forward is Attention.forward \
                and "forward" not in vars(m):
            m.forward = MethodType(_forward, m)
            count += 1
    return count


def _forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None,
             **cross_attention_kwargs):
    if cross_attention_kwargs:  # diffusers' filtering and warning
        return type(self).forward(self, hidden_states, encoder_hidden_states, attention_mask,
                                  **cross_attention_kwargs)
    return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask)
