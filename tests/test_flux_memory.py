"""The memory estimate and the step profile of a Flux.1 LoRA: the estimate (without its GPU-only
constants) within 10% of the peak the profile's fake-tensor step holds, at full width and 1024
px but 2+2 blocks deep (the full-size profile takes minutes on this CPU: `python -m bench
--profile --only flux_dev_lora_r16_lowest_1024`); the full-size count built from shorter ones
exactly; 'lowest' and 'auto' turning on fp8_base and gradient checkpointing for Flux."""
import pytest
from flow_helpers import estimate_is_the_count

from dreambooth import Concept, TrainingConfig
from dreambooth.training import memory_flux
from dreambooth.training.advice import lowest, plan, suggest
from dreambooth.training.memory import GIB, estimate

SHORT = (2, 2)  # double, single blocks of the profiled Flux (full size: 19, 38)


def flux_lora(**changes) -> TrainingConfig:
    settings = dict(model_name="f", model_type="flux-dev", method="lora", resolution=1024,
                    lora_rank=16, lora_alpha=16.0, lora_targets="attention",
                    mixed_precision="bf16", concepts=(Concept("/nonexistent", "photo of sks"),))
    return TrainingConfig(**{**settings, **changes})


@pytest.mark.once
def test_flux_estimate_is_the_step_profile_count(tmp_path):
    """A 2+2 blocks deep FLUX.1-dev LoRA r16 at 1024 px under 'lowest' (fp8_base, gradient
    checkpointing): the step makes no host sync, the read of the losses one, and the estimate
    of its training step is within 10% of the peak the step holds."""
    from bench.profile import flux_cases
    from dreambooth.model.flux import full_size_configs
    case = {c.name: c for c in flux_cases()}["flux_dev_lora_r16_lowest_1024"]
    estimate_is_the_count(case, full_size_configs("flux-dev", SHORT), SHORT, tmp_path)


@pytest.mark.once
def test_full_size_activations_come_from_shorter_counts_exactly():
    """What a 3+3 blocks deep Flux keeps for backward, from the 2+2, 3+2 and 2+3 deep ones'
    counts (as the full size's is) equals its own count, with and without checkpointing."""
    for checkpointing in (True, False):
        args = ("flux-dev", 1024, checkpointing, 16, "attention")
        assert memory_flux.extrapolated(*args, (3, 3)) == memory_flux._counted(*args, (3, 3))


@pytest.mark.once
def test_lowest_and_auto_store_flux_in_fp8_and_checkpoint_it():
    """'lowest' sets fp8_base and gradient checkpointing for a Flux LoRA; 'auto' proposes both
    where only both fit, checkpointing alone where it fits alone; fp8_base stores the
    transformer's Linear weights in one byte each (and a 4-byte scale each)."""
    cfg = flux_lora()
    assert lowest(cfg) == {"gradient_checkpointing": True, "fp8_base": True}
    planned, said = plan(cfg.replace(memory_preset="lowest"), None)
    assert planned.fp8_base and planned.gradient_checkpointing and "fp8_base" in said[0]
    plain, least = estimate(cfg, (20, 0)), estimate(planned, (20, 0))
    parts = memory_flux._parts("flux-dev", None)
    bf16 = estimate(cfg.replace(gradient_checkpointing=True), (20, 0))
    assert bf16.parts["weights"] - least.parts["weights"] == \
        parts["linear"] - 4 * parts["linears"]
    assert parts["linear"] > 11 * GIB and least.total < bf16.total < plain.total
    both = suggest(cfg, int(least.total / 0.85), n_images=(20, 0))
    assert dict(both.changes) == {"gradient_checkpointing": True, "fp8_base": True}
    alone = suggest(cfg, int(bf16.total / 0.85), n_images=(20, 0))
    assert dict(alone.changes) == {"gradient_checkpointing": True}
    # on a GPU without bf16 neither preset switches Flux to fp16 (its activations overflow it)
    full = cfg.replace(mixed_precision="no")
    assert "mixed_precision" not in lowest(full, "fp16")
    tight = suggest(full, int(least.total / 0.85), half="fp16", n_images=(20, 0))
    assert "mixed_precision" not in dict(tight.changes) and "fp16" not in tight.message
    assert lowest(full, "bf16")["mixed_precision"] == "bf16"
