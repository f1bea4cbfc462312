"""The reference in the step profile (bench/profile_reference.py): the step of diffusers'
train_dreambooth.py, counted on fake tensors as ours is, waits for the device where the real
script does, and our step at the benchmark's ours_best settings takes at most 0.8x its
dispatcher ops (issue 13's target)."""
from __future__ import annotations

import pytest

from bench.profile_reference import (OURS, REFERENCE, TARGET, comparison, comparison_cases,
                                     describe, profile_row)

SLACK = 1.05  # as tests/test_profile.py holds its counts
# Python function calls per step (ours_best, reference), torch 2.13 and diffusers 0.42.1
# 12 244 before the lean attention forward (leanattn.py), 9 684 before the park's cast without
# autograd.Function's Python wrappers (leanfn.py), 8 000 before a model's layers were cast in
# one node by the park (parkgroup.py), 6 980 before the park stepped its fp32 .grad weights
# with its first chunk (one optimizer step fewer)
PY_CALLS_TINY = (6_909, 17_664)
PY_CALLS_REAL = (9_737, 18_975)  # 14 872, then 12 312, 10 664, 9 808 before those


_ROWS: dict = {}


def _rows(resolution=None, tiny=False) -> list[dict]:
    """Ours and the reference, profiled once a session at each size."""
    from dreambooth.model.tiny import tiny_configs
    if (resolution, tiny) not in _ROWS:
        _ROWS[resolution, tiny] = [profile_row(case, resolution,
                                               tiny_configs("v1x") if tiny else None)
                                   for case in comparison_cases()]
    return _ROWS[resolution, tiny]


def test_the_reference_waits_for_the_device_where_the_script_does():
    """Per step: the batch's three tensors (pixels, token ids, attention mask) copied to the
    device by accelerate's DataLoader, blocking, and the loss read for the log; nothing else
    (the sizes don't matter to where a sync comes from: the tiny model)."""
    ours, ref = _rows(64, tiny=True)
    assert ref["name"] == REFERENCE and ref["settings"]["script"] == "train_dreambooth.py"
    assert ref["syncs_by_kind"] == {"blocking host -> device copy": 3,
                                    "scalar read of a device tensor (.item(), bool(), float())": 1}
    assert ours["name"] == OURS and ours["host_syncs"] == 0 and ours["read_syncs"] == 1
    assert ref["ops"] > 1000 and ref["peak_bytes"] > 0  # forward, backward, update all ran


@pytest.mark.once
def test_ours_best_takes_at_most_0_8x_the_references_dispatcher_ops():
    """At real size (SD1.5, 512 px): measured 5 638 / 8 183 = 0.689 with torch 2.13, diffusers
    0.42.1 (and 11.65 / 16.40 GiB peak); 6 195 (0.757) before our gradients were kept in
    bf16."""
    c = comparison(_rows())
    assert c["ops_ratio"] <= TARGET, describe(c)
    assert c["host_syncs"] == [0, 4]
    # and the Python the host runs for it: at most the reference's (issue 25), measured
    # PY_CALLS_REAL with the tested packages
    assert c["python_calls"][0] <= c["python_calls"][1], describe(c)
    assert c["python_calls"][0] <= PY_CALLS_REAL[0] * SLACK, describe(c)


@pytest.mark.once
def test_ours_best_runs_at_most_the_references_python_calls_on_the_tiny_model():
    """Python function calls per step (profile_calls.py: ours, the libraries' and torch's own,
    not the fake-tensor machinery), ours_best against the reference, on the tiny model (the
    rows the sync test above made): the park's per-layer cast and the step's per-weight
    bookkeeping were 23 747 calls against the reference's 17 664 (its VAE and text encoder
    included) before they were cut to PY_CALLS_TINY."""
    ours, ref = _rows(64, tiny=True)
    assert ours["python_calls"] <= ref["python_calls"], (ours["python_calls_by"],
                                                         ref["python_calls_by"])
    assert ours["python_calls"] <= PY_CALLS_TINY[0] * SLACK, ours["python_calls_by"]
    assert ref["python_calls"] >= PY_CALLS_TINY[1] / SLACK  # the counting still sees them
    assert ours["python_calls_by"]["ours"] > 0 and ref["python_calls_by"]["torch"] > 0
