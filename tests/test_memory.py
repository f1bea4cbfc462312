"""The memory estimate and its advice, on the CPU (meta-device models: no memory, no weights).

These check what can be checked without a GPU: exact parameter counts, the direction of every
setting's effect, linearity in the batch, the order and minimality of the advice. Whether the
estimate is within 15% of a measured peak is for `python -m bench` on a GPU (calibration)."""
from __future__ import annotations

import sys

import pytest
from patience import run

from dreambooth import Concept, TrainingConfig
from dreambooth.training.advice import MARGIN, STEPS, suggest
from dreambooth.training.memory import GIB, estimate
from dreambooth.training.memory_count import numel, optimizer_state_bytes, parameter_shapes

IMAGES = (10, 0)  # instance, class images: the folders need not exist


def sd15(**changes) -> TrainingConfig:
    base = TrainingConfig(concepts=(Concept("/nowhere", "photo of sks dog"),),
                          mixed_precision="bf16", resolution=512)
    return base.replace(**changes)


def peak(**changes) -> int:
    return estimate(sd15(**changes), IMAGES).total


def test_parameter_counts_of_sd15_come_from_its_configs():
    counts = {k: numel(v) for k, v in parameter_shapes("v1x").items()}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def test_optimizer_state_per_choice():
    shapes = [(320, 320), (320,)]  # one 8-bit-sized matrix, one small vector
    n = 320 * 320 + 320
    assert optimizer_state_bytes("adamw", shapes) == 8 * n
    assert optimizer_state_bytes("adamw_8bit", shapes) == 2 * 320 * 320 + 8 * 320
    assert optimizer_state_bytes("adafactor", shapes) == 4 * (320 + 320) + 4 * 320
    assert optimizer_state_bytes("lion", shapes) == 4 * n


@pytest.mark.parametrize("lower, higher", [
    ({"gradient_checkpointing": True}, {}),
    ({}, {"batch_size": 2}),
    ({"batch_size": 2}, {"batch_size": 4}),
    ({}, {"resolution": 768}),
    ({"optimizer": "adamw_8bit"}, {}),
    ({"optimizer": "adafactor"}, {}),
    ({}, {"train_text_encoder": True}),
    ({}, {"use_ema": True}),
    ({}, {"attention": "default"}),  # plain attention keeps the T x T matrices
    ({"use_lora": True}, {}),
    ({"use_lora": True}, {"use_lora": True, "lora_text_encoder": True}),
])
def test_each_setting_moves_the_peak_the_right_way(lower, higher):
    assert peak(**lower) < peak(**higher)


def test_prior_preservation_doubles_the_activations():
    plain = estimate(sd15(), IMAGES)
    prior = estimate(sd15(concepts=(Concept("/nowhere", "photo of sks dog", "photo of a dog",
                                            "", 1),)), (10, 10))
    assert prior.parts["activations"] == 2 * plain.parts["activations"]


def test_activations_are_linear_in_the_batch_and_weights_are_not():
    one, four = estimate(sd15(), IMAGES), estimate(sd15(batch_size=4), IMAGES)
    assert four.parts["activations"] == pytest.approx(4 * one.parts["activations"], rel=1e-6)
    assert four.parts["weights"] == one.parts["weights"]
    assert four.parts["optimizer"] == one.parts["optimizer"]


def test_the_parts_of_a_full_fine_tune_add_up(monkeypatch):
    from dreambooth.training import parked
    from dreambooth.training.memory_count import linear_conv_shapes
    cast = linear_conv_shapes("v1x")["unet"]  # Linear/Conv2d weights and biases
    unet, matrices = numel(parameter_shapes("v1x")["unet"]), numel(cast)
    large = numel([s for s in cast if numel([s]) >= parked.RECAST_ELEMENTS])
    # gradients in fp32 (8-bit AdamW is stepped whole): all of them; autocast's bf16 copies
    plain = estimate(sd15(optimizer="adamw_8bit"), IMAGES)
    assert plain.parts["gradients"] == 4 * unet and plain.parts["autocast copies"] == 2 * unet
    # AdamW: the Linear/Conv2d gradients kept in bf16, plus the fp32 scratch of one 128 MiB
    # chunk; the largest weights' bf16 copies are not kept through the forward
    e = estimate(sd15(), IMAGES)
    monkeypatch.setenv("WORLD_SIZE", "2")  # not with several processes (DDP reduces .grad)
    assert estimate(sd15(), IMAGES).parts["gradients"] == 4 * unet
    assert 0 <= e.parts["gradients"] - (4 * unet - 2 * matrices) <= parked.CHUNK_BYTES
    assert e.parts["optimizer"] == 8 * unet
    assert e.parts["autocast copies"] == 2 * (unet - large)
    assert 12 * GIB < e.total < 24 * GIB  # the issue measured 16.6-19.5 GB for such a step
    assert e.phase and e.describe().startswith(f"about {e.gib:.1f} GiB")


def test_without_cached_latents_the_vae_encodes_every_step():
    assert estimate(sd15(cache_latents=False), IMAGES).parts["vae encode"] > 0
    assert estimate(sd15(cache_latents=True), IMAGES).parts["vae encode"] == 0


def test_no_advice_when_it_fits():
    advice = suggest(sd15(), 80 * GIB, n_images=IMAGES)
    assert advice.changes == () and advice.fits
    assert "80.0 GiB are free" in advice.message


def _fits(config, changes: dict, free: int) -> bool:
    candidate = config.replace(**changes)
    return not candidate.validate(check_paths=False) and \
        estimate(candidate, IMAGES).total <= free * (1 - MARGIN)


def test_advice_fits_needs_every_change_and_says_them_in_the_documented_order():
    greedy = sd15(train_text_encoder=True, mixed_precision="no", cache_latents=False,
                  batch_size=4)
    order = [name for step, _ in STEPS for name, _ in step]
    for free_gib in (40, 20, 16, 12, 10, 8, 6):
        advice = suggest(greedy, free_gib * GIB, n_images=IMAGES)
        changes = dict(advice.changes)
        assert advice.fits and _fits(greedy, changes, free_gib * GIB), free_gib
        assert f"It fits (about {advice.after.gib:.1f} GiB)" in advice.message or not changes
        # in STEPS order (a step's own fields together)
        firsts = [name for name in changes if name != "optimizer" or
                  "bf16_weights" not in changes]
        assert firsts == sorted(firsts, key=order.index)
        for step, _ in STEPS:  # minimal: without any one of its steps it would not fit
            fields = [k for k, _ in step]
            if fields[0] in changes:
                fewer = {k: v for k, v in changes.items() if k not in fields}
                assert not _fits(greedy, fewer, free_gib * GIB), (free_gib, fields)


def test_auto_picks_the_plan_that_slows_training_least_not_the_first_in_the_list():
    """The issue's case: on a 10 GiB GPU the default SD1.5 run fits with 8-bit AdamW and the
    fused optimizer (no slower); the list order would have turned on gradient checkpointing
    (+33% compute) first."""
    from dreambooth.training.advice import SLOWER, _greedy
    config = sd15(mixed_precision="auto", cache_latents=True)
    free = 10 * GIB
    advice = suggest(config, free, n_images=IMAGES)
    assert dict(advice.changes) == {"optimizer": "adamw_8bit", "fused_optimizer": True}
    listed = _greedy(config, free, "bf16", IMAGES, estimate(config, IMAGES))
    assert dict(listed.changes)["gradient_checkpointing"] is True
    assert SLOWER["gradient_checkpointing"] > 1.0
    assert "update the weights inside backward" in advice.message
    assert "checkpointing" not in advice.message


def test_auto_stores_a_loras_frozen_unet_in_fp8_when_nothing_exact_is_enough():
    """A LoRA with gradient checkpointing (2.6 GiB by the estimate, 1.8 with fp8_base) on a
    GPU with 2.3 GiB free: only its frozen UNet in fp8 makes it fit; a full fine-tune is never
    offered it (its UNet trains)."""
    config = sd15(use_lora=True, mixed_precision="auto", gradient_checkpointing=True)
    exact = suggest(config, 4 * GIB, n_images=IMAGES)
    assert exact.fits and "fp8_base" not in dict(exact.changes)  # it fits without
    advice = suggest(config, int(2.3 * GIB), n_images=IMAGES)
    assert advice.fits and dict(advice.changes).get("fp8_base") is True, advice.message
    assert "fp8" in advice.message
    assert not config.replace(**dict(advice.changes)).validate(check_paths=False)
    full = suggest(sd15(mixed_precision="auto"), int(2.3 * GIB), n_images=IMAGES)
    assert "fp8_base" not in dict(full.changes)


def test_a_change_the_config_refuses_is_never_advised():
    """Gradient accumulation refuses the fused optimizer: the advice goes without it (this
    used to raise AttributeError in the check itself)."""
    config = sd15(mixed_precision="auto", cache_latents=True, gradient_accumulation_steps=2)
    advice = suggest(config, 10 * GIB, n_images=IMAGES)
    assert advice.fits and "fused_optimizer" not in dict(advice.changes)
    assert not config.replace(**dict(advice.changes)).validate(check_paths=False)


def test_advice_says_so_when_nothing_is_enough():
    advice = suggest(sd15(train_text_encoder=True, batch_size=2), 2 * GIB, n_images=IMAGES)
    assert not advice.fits and advice.changes
    assert "Even if you stop training the text encoder" in advice.message
    assert "lower the resolution" in advice.message


def test_module_imports_no_training_stack_and_the_core_does_not_import_it():
    code = ("import sys, dreambooth, dreambooth.config; assert 'dreambooth.training.memory' not in "
            "sys.modules; import dreambooth.training.memory; "
            "bad = [m for m in ('diffusers', 'transformers', 'accelerate') if m in sys.modules]; "
            "assert not bad, bad")
    run([sys.executable, "-c", code], 10, check=True)
