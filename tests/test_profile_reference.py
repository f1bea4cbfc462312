"""The reference in the step profile (bench/profile_reference.py): the step of diffusers'
train_dreambooth.py, counted on fake tensors as ours is, waits for the device where the real
script does, and our step at the benchmark's ours_best settings takes at most 0.8x its
dispatcher ops (issue 13's target)."""
from __future__ import annotations

import pytest

from bench.profile_reference import (OURS, REFERENCE, TARGET, comparison, comparison_cases,
                                     describe, profile_row)


def _rows(resolution=None, tiny=False) -> list[dict]:
    from dreambooth.model.tiny import tiny_configs
    return [profile_row(case, resolution, tiny_configs("v1x") if tiny else None)
            for case in comparison_cases()]


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
