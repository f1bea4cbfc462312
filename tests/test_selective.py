"""Selective gradient checkpointing (checkpoint_blocks 'selective', training/selective.py): the
gradients of no checkpointing, fewer tensors kept, the 'auto' preset's choice between none,
selective and full, and the config field. Its memory against the step profile's count:
tests/test_profile.py."""
from __future__ import annotations

import copy

import pytest
import torch

from dreambooth import Concept, TrainingConfig
from dreambooth.training import leanckpt, parked, selective
from dreambooth.training.advice import MARGIN, plan, suggest
from dreambooth.training.memory import GIB, estimate
from dreambooth.training.memory_count import BLOCKS

# torch and diffusers' UNet only, run once (the UNet's blocks are the same in both sets)
pytestmark = pytest.mark.once
IMAGES = (10, 0)


@pytest.fixture(scope="module")
def tiny():
    from dreambooth.model.components import build_random
    from dreambooth.model.tiny import tiny_configs
    comp = build_random("v1x", tiny_configs("v1x"))
    return comp.unet, comp.configs


def _grads(unet, saved: list) -> dict:
    """One bf16 training step's gradients (the trainer's way: autocast without its weight
    cache, the gradient park), counting the tensors autograd keeps for backward."""
    torch.manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    park = parked.GradPark([unet])
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        out = unet(latents, torch.tensor([10, 500]), text).sample
    out.float().square().mean().backward()
    park.take(list(unet.parameters()))
    grads = {n: p.grad for n, p in unet.named_parameters()}
    park.detach()
    return grads


def test_selective_checkpointing_gives_the_gradients_of_none(tiny, monkeypatch):
    """The chosen blocks of a tiny UNet recomputed in backward: every gradient bit-identical to
    a step without checkpointing, with fewer tensors kept; the gradient park casts weights
    again in backward (all of them here) except inside the recomputed blocks, where its hooks
    would take the checkpoint's place."""
    unet, configs = tiny
    monkeypatch.setattr(parked, "RECAST_ELEMENTS", 1)
    names = selective.chosen_blocks(configs, 64, "sdpa")
    every = [n for n, m in unet.named_modules() if type(m).__name__ in BLOCKS]
    assert names and set(names) < set(every), names
    assert selective.describe(configs, 64, "sdpa").startswith(
        f"Selective gradient checkpointing: {len(names)} of the UNet's {len(every)} blocks")
    plain_saved, chosen_saved = [], []
    plain = _grads(copy.deepcopy(unet).train(), plain_saved)
    chosen = copy.deepcopy(unet).train()
    selective.checkpoint_blocks(chosen, names)
    inside = {id(m) for n in names for m in chosen.get_submodule(n).modules()}
    park = parked.GradPark([chosen])
    assert {m._recast for m in park.modules if id(m) in inside} == {False}
    assert {m._recast for m in park.modules if id(m) not in inside} == {True}
    park.detach()
    got = _grads(chosen, chosen_saved)
    assert len(chosen_saved) < len(plain_saved)
    assert plain.keys() == got.keys() and all(g is not None for g in got.values())
    for name, grad in plain.items():
        assert torch.equal(got[name], grad), name
    with torch.no_grad():  # previews: no checkpoint, the same output
        x = (torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 77, 32))
        assert torch.equal(chosen(*x).sample, unet.eval()(*x).sample)


def test_the_lean_checkpoint_gives_torchs_gradients(tiny, monkeypatch):
    """Full gradient checkpointing through leanckpt (what the trainer enables): every block run
    again once in backward, and every gradient bit-identical to torch's checkpoint (diffusers'
    default), the gradient park on; a block with an active dropout is left to torch's."""
    unet, _ = tiny
    monkeypatch.setattr(parked, "RECAST_ELEMENTS", 1)
    torchs, lean = copy.deepcopy(unet).train(), copy.deepcopy(unet).train()
    torchs.enable_gradient_checkpointing()
    assert leanckpt.enable(lean)
    made, runs, init, recompute = [], [], leanckpt._Frame.__init__, leanckpt._Frame.recompute
    monkeypatch.setattr(leanckpt._Frame, "__init__", lambda f, *a: made.append(f) or init(f, *a))
    monkeypatch.setattr(leanckpt._Frame, "recompute", lambda f: runs.append(f) or recompute(f))
    want, got = _grads(torchs, []), _grads(lean, [])
    # each checkpointed call (all blocks but the middle block's first ResNet) once
    assert len(made) == sum(type(m).__name__ in BLOCKS for m in unet.modules()) - 1
    assert len(runs) == len(made) and {id(f) for f in runs} == {id(f) for f in made}
    assert want.keys() == got.keys() and all(g is not None for g in got.values())
    for name, grad in want.items():
        assert torch.equal(got[name], grad), name
    block = next(m for m in lean.modules() if type(m).__name__ == "ResnetBlock2D")
    assert not leanckpt.draws(block)
    block.dropout.p = 0.1
    assert leanckpt.draws(block)


def sd15(**changes) -> TrainingConfig:
    base = TrainingConfig(concepts=(Concept("/nowhere", "photo of sks dog"),),
                          mixed_precision="bf16", resolution=512, use_lora=True, lora_rank=16,
                          method="lora", cache_latents=True, batch_size=1)
    return base.replace(**changes)


def test_auto_chooses_none_selective_or_full_checkpointing_by_the_free_memory():
    """A LoRA that does not fit without checkpointing: 'auto' turns on selective checkpointing
    where it is enough (the cheaper recompute), every block where it is not, and says which."""
    none = sd15()
    peaks = {name: estimate(none.replace(**changes), IMAGES).total for name, changes in [
        ("none", {}), ("selective", {"gradient_checkpointing": True,
                                     "checkpoint_blocks": "selective"}),
        ("full", {"gradient_checkpointing": True})]}
    assert peaks["full"] < peaks["selective"] < peaks["none"], peaks
    free = int((peaks["selective"] + peaks["none"]) / 2 / (1 - MARGIN))  # selective fits
    advice = suggest(none, free, n_images=IMAGES)
    assert dict(advice.changes) == {"checkpoint_blocks": "selective",
                                    "gradient_checkpointing": True}, advice.message
    assert "checkpoint_blocks 'selective'" in advice.message
    planned, said = plan(none, free, n_images=IMAGES)
    assert planned.checkpoint_blocks == "selective" and planned.gradient_checkpointing
    assert "The 'auto' memory preset has made these changes." in said[-1]
    free = int((peaks["full"] + peaks["selective"]) / 2 / (1 - MARGIN))  # only full fits
    advice = suggest(none, free, n_images=IMAGES)
    assert dict(advice.changes) == {"gradient_checkpointing": True}, advice.message  # all
    assert none.checkpoint_blocks == "all"  # blocks already: not a change
    assert "'selective'" not in advice.message
    assert advice.after.total == peaks["full"]
    # and selective costs less recompute than full (what makes it the first choice)
    assert 0 < selective.recompute_share("v1x", 512, "sdpa") < 0.5


def test_checkpoint_blocks_is_checked_and_old_configs_keep_all_blocks():
    problems = sd15(checkpoint_blocks="selective").validate(check_paths=False)
    assert [(p.field, p.fix) for p in problems] == [
        ("checkpoint_blocks", "turn gradient_checkpointing on, or set checkpoint_blocks to "
                              "'all'")]
    assert not sd15(checkpoint_blocks="selective", gradient_checkpointing=True).validate(
        check_paths=False)
    assert [p.field for p in sd15(checkpoint_blocks="some").validate(check_paths=False)] == \
        ["checkpoint_blocks"]
    for transformer in ("flux-dev", "sd3.5-medium"):
        other = sd15(model_type=transformer, checkpoint_blocks="selective",
                     gradient_checkpointing=True)
        assert "checkpoint_blocks" in [p.field for p in other.validate(check_paths=False)]
    old = sd15(gradient_checkpointing=True).to_dict()
    old.pop("checkpoint_blocks")  # a file written before the field
    loaded = TrainingConfig.from_dict(old)
    assert loaded.checkpoint_blocks == "all" and selective.full(loaded)
