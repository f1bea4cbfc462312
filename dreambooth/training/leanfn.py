"""An autograd Function called without torch's Python wrappers around it (issue 25: on a GPU
every Python call of a step is host time the kernels may wait for).

`Function.apply` checks default arguments and unwraps functorch's dead wrappers before it
calls the C++ apply (4 Python calls and one per argument, a call); in backward, the
Function's node calls its backward class's `apply`, which looks the user's backward up (two
calls). Both matter only under functorch's transforms (vmap, grad...), where `call` runs the
full apply; elsewhere the node's apply is the Function's own backward and the forward goes
straight to the C++ apply (torch.compile traces it as it traces `Function.apply`: tested).
For a Function with a plain `backward` (no `vjp`, no boxed gradients).

    _apply = lean(_Cast)            # once, where the Function is defined
    out = call(_Cast, _apply, a, b)
"""
from __future__ import annotations

import torch


def lean(function: type) -> object:
    """The C++ apply of `function` (a torch.autograd.Function subclass); its backward node
    made to call `function.backward` itself."""
    if function.vjp is torch.autograd.Function.vjp \
            and not getattr(function, "boxed_grads_call", False):
        function._backward_cls.apply = function.backward
    return super(torch.autograd.Function, function).apply


def call(function: type, apply, *args):
    """function.apply(*args), through `apply` (from lean) outside functorch's transforms."""
    if torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return apply(*args)
