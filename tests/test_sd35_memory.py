"""The memory estimate, the presets and the step profile of an SD3.5 LoRA (memory_flux.py,
shared with Flux): the estimate (without its GPU-only constants) within 10% of the peak the
profile's fake-tensor step holds for a 0+1 blocks deep SD3.5 large at full width and 1024 px
(the full size: `python -m bench --profile --only sd35_large_lora_r16_lowest_1024`); the full
size's activations built from shorter counts exactly; 'lowest' and 'auto' storing the MMDiT in
fp8 and checkpointing it."""
import pytest
from flow_helpers import estimate_is_the_count

from dreambooth import Concept, TrainingConfig
from dreambooth.training import memory_flux
from dreambooth.training.advice import lowest, plan, suggest
from dreambooth.training.memory import GIB, estimate

SHORT = (0, 1)  # SD3.5 large's blocks in the profiled one: 1 and the last (full size: 37 and it)


def sd35_lora(**changes) -> TrainingConfig:
    settings = dict(model_name="s", model_type="sd3.5-large", method="lora", resolution=1024,
                    lora_rank=16, lora_alpha=16.0, mixed_precision="bf16", concepts=(Concept("/nonexistent", "photo of sks"),))
    return TrainingConfig(**{**settings, **changes})


@pytest.mark.once
def test_sd35_estimate_is_the_step_profile_count(tmp_path):
    """A 0+1 blocks deep SD3.5 large LoRA r16 at 1024 px under 'lowest' (fp8_base, gradient
    checkpointing): the step makes no host sync (the scheduler's tables are on the device),
    the read of the losses one, and the estimate of its training step is within 10% of the
    peak the step holds."""
    from bench.profile import sd35_cases
    from dreambooth.model.sd35 import full_size_configs
    case = {c.name: c for c in sd35_cases()}["sd35_large_lora_r16_lowest_1024"]
    estimate_is_the_count(case, full_size_configs("sd3.5-large", SHORT), SHORT, tmp_path)


@pytest.mark.once
def test_sd35_activations_come_from_shorter_counts_exactly():
    """What a 0+4 blocks deep SD3.5 large keeps for backward, from the 0+2 and 0+3 deep ones'
    counts (as the full size's is: the counts the estimate below makes), equals its own count,
    with and without checkpointing."""
    for checkpointing in (True, False):
        args = ("sd3.5-large", 1024, checkpointing, 16, "transformer")
        assert memory_flux.extrapolated(*args, (0, 4)) == memory_flux._counted(*args, (0, 4))


@pytest.mark.once
def test_lowest_and_auto_store_sd35_in_fp8_and_checkpoint_it():
    """'lowest' sets fp8_base and gradient checkpointing for an SD3.5 LoRA (no longer refused);
    'auto' proposes both where only both fit; fp8_base stores the MMDiT's Linear weights in one
    byte each (and a 4-byte scale each); large under 'lowest' fits a 16 GB card; the full-size
    configs the counts use are the ones read off SAI's files (test_sd35)."""
    from test_sd35 import LARGE, MEDIUM
    from dreambooth.model.sd35 import full_size_configs
    for model_type, conf in (("sd3.5-medium", MEDIUM), ("sd3.5-large", LARGE)):
        unet = full_size_configs(model_type)["unet"]
        assert {k: unet[k] for k in conf} == conf
    cfg = sd35_lora()
    assert lowest(cfg) == {"gradient_checkpointing": True, "fp8_base": True}
    planned, said = plan(cfg.replace(memory_preset="lowest"), None)
    assert planned.fp8_base and planned.gradient_checkpointing and "fp8_base" in said[0]
    plain, least = estimate(cfg, (20, 0)), estimate(planned, (20, 0))
    parts = memory_flux._parts("sd3.5-large", None)
    bf16 = estimate(cfg.replace(gradient_checkpointing=True), (20, 0))
    assert bf16.parts["weights"] - least.parts["weights"] == \
        parts["linear"] - 4 * parts["linears"]
    assert parts["linear"] > 7 * GIB and least.total < bf16.total < plain.total
    assert least.total < 16 * GIB
    both = suggest(cfg, int(least.total / 0.85), n_images=(20, 0))
    assert dict(both.changes) == {"gradient_checkpointing": True, "fp8_base": True}
