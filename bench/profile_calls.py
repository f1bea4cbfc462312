"""Python function calls per step, counted beside the dispatcher ops (profile_count.StepCounter):
on a GPU every one of them is host time the device may wait for, and the op count can't see it.

Counted: calls of Python functions (not C builtins) made by the step: ours (dreambooth/), the
libraries' (diffusers, accelerate, transformers, peft, the standard library) and torch's own
Python (nn.Module's call machinery, the optimizers, autograd.Function.apply...). Not counted:
the fake-tensor machinery that does the counting, which a real step never runs. cProfile
counts, and is switched off for the whole of each dispatch (FakeTensorMode's Python, the
decompositions, the counter itself, everything under StepCounter.__torch_dispatch__); calls
that run outside a dispatch but only because of the counting (FakeTensor's Python properties,
torch's __torch_function__ handling for the function mode, the counter's own bookkeeping)
are left out by where their code is (MACHINERY). A frame live when the counting was switched
off is counted once, as cProfile counts it then (tested).
"""
from __future__ import annotations

import cProfile
import os
import types
import weakref
from collections import Counter

_BENCH = os.path.dirname(os.path.abspath(__file__))
_PACKAGE = os.path.dirname(_BENCH)
_TORCH = os.path.dirname(os.path.abspath(__import__("torch").__file__))
MACHINERY = tuple(os.path.join(_TORCH, *p.split("/")) for p in (
    "_subclasses/", "_prims/", "_prims_common/", "_refs/", "_decomp/",
    "_meta_registrations.py", "fx/experimental/", "utils/_python_dispatch.py",
    "overrides.py", "_library/")) + tuple(os.path.join(_BENCH, f) for f in (
        "profile_count.py", "profile_device.py", "profile_calls.py"))
TOP = 12  # functions listed, the most called first
# the counter's storage-freed callbacks, and the fake tensors' weak-valued memos' (a real
# tensor is in none)
_FINALIZE = {weakref.finalize.__call__.__code__} | {
    c for c in weakref.WeakValueDictionary.__init__.__code__.co_consts
    if isinstance(c, types.CodeType) and c.co_name == "remove"}
# The dispatcher looks up a rule for each dispatch to a Python mode (find_torch_dispatch_rule,
# in MACHINERY), through torch._disable_dynamo's wrapper: these wrapper functions run once for
# each lookup, and as often again for the wrapped functions a real step calls
_RULE = ("_library/simple_registry.py", "find_torch_dispatch_rule")
_WRAPPER = {("_dynamo/eval_frame.py", "_fn"), ("_dynamo/eval_frame.py", "_callback_from_stance"),
            ("compiler/__init__.py", "is_exporting"), ("_compile.py", "inner")}


def category(filename: str) -> str | None:
    """'ours', 'torch', 'libraries' (anything else: diffusers, accelerate, the standard
    library; the reference's script and accelerate's stand-ins in bench/ count here), or
    None for the counting machinery."""
    if filename.startswith(MACHINERY):
        return None
    if filename.startswith(os.path.join(_PACKAGE, "dreambooth") + os.sep):
        return "ours"
    if filename.startswith(_TORCH + os.sep):
        return "torch"
    return "libraries"


class PythonCalls:
    """start() ... pause()/resume() around each dispatch ... figures()."""

    def __init__(self, on: bool = True) -> None:
        self.on, self.profiler, self.depth = on, None, 0

    def start(self) -> None:
        if self.on:
            self.profiler, self.depth = cProfile.Profile(), 0
            self.profiler.enable()

    def pause(self) -> None:
        if self.profiler is not None:
            if self.depth == 0:
                self.profiler.disable()
            self.depth += 1

    def resume(self) -> None:
        if self.profiler is not None:
            self.depth -= 1
            if self.depth == 0:
                self.profiler.enable()

    def figures(self) -> dict:
        """{"total", "ours", "torch", "libraries", "top": the 12 most called, by name}."""
        if self.profiler is None:
            return {"total": 0, "ours": 0, "torch": 0, "libraries": 0, "top": {}}
        self.profiler.disable()
        counts = Counter()
        for entry in self.profiler.getstats():
            code = entry.code
            if not isinstance(code, str) and code not in _FINALIZE:  # not a builtin
                counts[code] += entry.callcount
        lookups = sum(n for code, n in counts.items() if _torch_name(code) == _RULE)
        by_kind, by_function = Counter(), Counter()
        for code, n in counts.items():
            kind = category(code.co_filename)
            if _torch_name(code) in _WRAPPER:
                n -= min(n, lookups)
            if kind is not None and n:
                by_kind[kind] += n
                by_function[f"{_short(code.co_filename)}:{code.co_firstlineno}"
                            f"({code.co_name})"] += n
        self.profiler = None
        return {"total": sum(by_kind.values()), **{k: by_kind[k] for k in
                                                    ("ours", "torch", "libraries")},
                "top": dict(by_function.most_common(TOP))}


def _short(filename: str) -> str:
    for root in (_PACKAGE, os.path.dirname(_TORCH)):  # ours and bench/; site-packages
        if filename.startswith(root + os.sep):
            return os.path.relpath(filename, root)
    return os.path.basename(filename)  # the standard library


def _torch_name(code) -> tuple:
    """(path within torch, function name) of a code object of torch's; else ('', name)."""
    name = code.co_filename
    within = name[len(_TORCH) + 1:] if name.startswith(_TORCH + os.sep) else ""
    return within.replace(os.sep, "/"), code.co_name
