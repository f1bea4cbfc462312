"""Gradient checkpointing with less Python: the same recompute as torch's non-reentrant
checkpoint (torch.utils.checkpoint), without its bookkeeping.

torch's checkpoint keeps, for each tensor a block saves for backward, a holder, a weak
reference, a handle in a weak dictionary per backward, the tensor's metadata for its
determinism check and a few internal asserts: about 20 Python calls per saved tensor, 33 000
of the 53 500 of a 'lowest' step on SD1.5's UNet. Here the forward keeps a slot for each saved
tensor (one call) and the block's inputs; the first unpack in backward runs the block again,
with grad, under the forward's autocast state, putting each tensor it saves into its slot, in
order, until it has them all (torch's early stop); a slot's tensor is freed when backward reads
it or releases the slot (as torch's). The recomputed ops and the tensors backward reads are
those of torch's checkpoint, so the gradients are the same, bits and all, and so is the peak
(tests/test_selective.py, tests/test_memory_levers.py, the step profile).

It does not stash the RNG state (torch does, for blocks that draw random numbers): a block with
an active dropout (`draws`) runs under torch's checkpoint, as does a block traced by
torch.compile (dynamo knows torch's checkpoint, not these hooks). A second backward through the
same graph recomputes the block again.

    unet.enable_gradient_checkpointing(...)  ->  enable(unet)   (optim.trainable_groups)
    checkpoint(block.forward, *args, **kwargs)                  (selective.checkpoint_blocks)
"""
from __future__ import annotations

import inspect
import weakref

import torch


class _Stop(Exception):
    """The recompute has every tensor backward needs (the rest of the block is not run)."""


class _Slot:
    """What autograd keeps of one saved tensor: its recomputed value once the block has run
    again (freed with the slot when backward releases it, whether it read it or not)."""
    __slots__ = ("t", "__weakref__")


class _Frame:
    """One checkpointed call: what recomputes it, and a weak reference to each of its slots."""
    __slots__ = ("run", "args", "kwargs", "versions", "autocast", "slots")

    def __init__(self, run, args, kwargs) -> None:
        self.run, self.args, self.kwargs = run, args, kwargs
        self.versions = [(t, t._version) for t in args if isinstance(t, torch.Tensor)]
        self.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d),
                          torch.is_autocast_cache_enabled()) for d in _devices(args)]
        self.slots = []

    def pack(self, t):
        slot = _Slot()
        self.slots.append(weakref.ref(slot))
        return slot

    def unpack(self, slot: _Slot):
        t = getattr(slot, "t", None)
        if t is None:  # the first unpack (or one of a second backward): run the block again
            self.recompute()
            t = slot.t
        slot.t = None
        return t

    def recompute(self) -> None:
        """Run the block again, each tensor it saves into its slot (those backward still
        holds), stopping at the last (torch's early stop)."""
        if any(t._version != v for t, v in self.versions):
            raise RuntimeError("A checkpointed block's input was modified in place after its "
                               "forward; its recompute would differ.")
        slots, left = iter(self.slots), [len(self.slots)]

        def keep(t):  # (detached: a tensor saved by the op that made it would be a cycle)
            t = t.detach() if t.requires_grad else t
            slot = next(slots)()
            if slot is not None:
                slot.t = t
            left[0] -= 1
            if not left[0]:
                raise _Stop
            return t
        grad = torch.is_grad_enabled()
        _push(keep, _same)  # (torch's saved_tensors_hooks and enable_grad, less their Python)
        torch._C._set_grad_enabled(True)
        try:
            with _Autocast(self.autocast):
                self.run(*self.args, **self.kwargs)
        except _Stop:
            pass
        finally:
            torch._C._set_grad_enabled(grad)
            _pop()


def _same(t):
    return t


# what torch.autograd.graph.saved_tensors_hooks enters and exits (three Python calls a use)
_push = torch._C._autograd._push_saved_tensors_default_hooks
_pop = torch._C._autograd._pop_saved_tensors_default_hooks


def _devices(args) -> list:
    """The device types whose autocast state the recompute restores: CPU's, and the
    accelerator's the block's tensors are on (as torch's checkpoint)."""
    kinds = {t.device.type for t in args if isinstance(t, torch.Tensor)} - {"cpu", "meta"}
    return ["cpu", *sorted(kinds)]


class _Autocast:
    """The autocast state of the forward, for the recompute (run in backward, outside it)."""
    __slots__ = ("states", "contexts")

    def __init__(self, states) -> None:
        self.states, self.contexts = states, []

    def __enter__(self):
        for device, enabled, dtype, cache in self.states:
            context = torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache)
            context.__enter__()
            self.contexts.append(context)

    def __exit__(self, *exc):
        while self.contexts:
            self.contexts.pop().__exit__(*exc)


def checkpoint(run, *args, **kwargs):
    """run(*args, **kwargs), its saved tensors recomputed in backward (see the module's text);
    torch's checkpoint under torch.compile's tracing."""
    if not torch.is_grad_enabled():
        return run(*args, **kwargs)
    if torch.compiler.is_compiling():
        from torch.utils.checkpoint import checkpoint as torch_checkpoint
        return torch_checkpoint(run, *args, use_reentrant=False, **kwargs)
    frame = _Frame(run, args, kwargs)
    _push(frame.pack, frame.unpack)  # (saved_tensors_hooks, less its Python)
    try:
        return run(*args, **kwargs)
    finally:
        _pop()


def draws(block) -> bool:
    """Whether the block draws random numbers in training (an active dropout), which the lean
    checkpoint would not replay: such a block runs under torch's checkpoint."""
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0
               for m in block.modules())


def _module_checkpoint(module, *args):
    """diffusers' gradient_checkpointing_func: (block, *inputs) -> its output."""
    lean = module.__dict__.get("_lean_checkpoint")
    if lean is None:
        lean = module.__dict__["_lean_checkpoint"] = not draws(module)
    if lean:
        return checkpoint(module.__call__, *args)
    from torch.utils.checkpoint import checkpoint as torch_checkpoint
    return torch_checkpoint(module.__call__, *args, use_reentrant=False)


def enable(model) -> bool:
    """Gradient checkpointing of a diffusers model through the lean checkpoint where its
    diffusers takes a checkpointing function, else diffusers' own (torch's);
    whether it is the lean one (0.31, the oldest supported, takes none)."""
    takes = "gradient_checkpointing_func" in \
        inspect.signature(model.enable_gradient_checkpointing).parameters
    if takes:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=_module_checkpoint)
    else:
        model.enable_gradient_checkpointing()
    return takes
