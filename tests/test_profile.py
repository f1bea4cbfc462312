"""The step profile (`python -m bench --profile`) holds its figures: no later change may add a
host sync to a training step, or more than 5% dispatcher ops or peak live memory.

The figures were measured with the tested package set (constraints/newest.txt): other torch or
diffusers releases dispatch other ops, so this runs with that set only (marked once). When a
change lowers a figure, lower it here too."""
from __future__ import annotations

import pytest

from bench.profile import profile_case, profile_cases

SLACK = 1.05
# configuration -> (resolution, tiny model?, host syncs, ops per step, peak live bytes)
HELD = {
    # the per-weight path at the tiny size: its op count is per weight, not per pixel
    "full_adamw_bs1_fused": (64, True, 2, 14381, 36_779_008),
    # the default full fine-tune at real size (SD1.5, 512 px): 13.03 GiB
    "full_adamw_bs1": (512, False, 2, 6199, 13_988_681_728),
}


@pytest.mark.once
@pytest.mark.parametrize("name", sorted(HELD))
def test_step_profile_holds_its_figures(name):
    from dreambooth.model.tiny import tiny_configs
    resolution, tiny, syncs, ops, peak = HELD[name]
    case = {c.name: c for c in profile_cases()}[name]
    r = profile_case(case, resolution, tiny_configs("v1x") if tiny else None)
    assert r["host_syncs"] <= syncs, r["syncs_by_kind"]
    assert r["ops"] <= ops * SLACK, (r["ops"], r["top_ops"])
    assert r["peak_bytes"] <= peak * SLACK, r["peak_gib"]
    # and it is a step: forward, backward and an update all ran
    assert r["ops"] > 1000 and r["peak_bytes"] > 0
