"""The memory levers, end to end on the tiny model: the optimizer fused into backward, bf16
weights with stochastic rounding, the 'lowest' and 'auto' presets, and running out of memory."""
import copy
import json

import pytest
import torch

from dreambooth.config import events as ev
from dreambooth.config.errors import DreamboothError, TrainingError
from dreambooth.model.checkpoint import read_checkpoint
from dreambooth.training import trainer as trainer_module
from dreambooth.training.memory import GIB
from dreambooth.training.optim import Bucketed, stochastic_round_
from dreambooth.training.trainer import Trainer


# -- stochastic rounding ------------------------------------------------------------------------
@pytest.mark.once  # torch only, and torch is the same in both core venvs
def test_stochastic_rounding_is_unbiased_where_nearest_rounding_is_not():
    gen = torch.Generator().manual_seed(0)
    for value in (1.0 + 2 ** -10, -3.0 - 3 * 2 ** -9, 1e-3 * (1 + 2 ** -9)):
        x = torch.full((200_000,), value)
        rounded = stochastic_round_(torch.empty_like(x, dtype=torch.bfloat16), x, gen)
        neighbours = set(rounded.float().unique().tolist())
        assert len(neighbours) == 2  # only the two bf16 numbers around the value
        assert rounded.float().mean().item() == pytest.approx(value, rel=2e-5)
        assert x.to(torch.bfloat16).float()[0].item() != pytest.approx(value, rel=2e-5)
    exact = torch.tensor([0.0, 1.0, -2.5, 65536.0, float("inf")])
    assert torch.equal(stochastic_round_(torch.empty_like(exact, dtype=torch.bfloat16), exact,
                                         gen).float(), exact)


@pytest.mark.once  # torch only, and torch is the same in both core venvs
def test_small_updates_survive_on_bf16_weights():
    """lr x grad = 1e-4 is 40 times below half a bf16 step at 1.0: rounding to nearest loses every
    update, stochastic rounding keeps their sum."""
    def run(build_weight):
        w = build_weight()
        opt = Bucketed([{"params": [w], "lr": 1e-4}],
                        lambda groups: torch.optim.SGD(groups, lr=1.0), in_backward=False)
        for _ in range(100):
            w.grad = torch.ones_like(w)
            opt.step()
            opt.zero_grad()
        return w
    w = run(lambda: torch.nn.Parameter(torch.ones(20_000, dtype=torch.bfloat16)))
    assert w.dtype == torch.bfloat16
    assert w.float().mean().item() == pytest.approx(0.99, abs=2e-4)
    nearest = torch.ones(1, dtype=torch.bfloat16)
    for _ in range(100):
        nearest = (nearest.float() - 1e-4).to(torch.bfloat16)
    assert nearest.item() == 1.0


OLD_LAYOUT = "per weight"  # the one-optimizer-per-weight layout of earlier snapshots


@pytest.mark.parametrize("saved_bytes, loaded_bytes", [(1 << 30, 1 << 30), (0, 1 << 30),
                                                       (1 << 30, 0), (OLD_LAYOUT, 1 << 30)])
@pytest.mark.once  # torch only, and torch is the same in both core venvs
def test_state_round_trips_whatever_the_bucketing(saved_bytes, loaded_bytes):
    """Saved per weight: a state loads into any bucketing (0 bytes: a bucket per weight), and a
    snapshot of the earlier per-weight layout converts; the run goes on exactly."""
    def fresh():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(8, 8).to(torch.bfloat16)),
                torch.nn.Parameter(torch.randn(8).to(torch.bfloat16)),
                torch.nn.Parameter(torch.randn(8))]

    def opt_for(params, bucket_bytes):
        return Bucketed([{"params": params, "lr": 1e-2}],
                        lambda g: torch.optim.AdamW(g, lr=1.0), in_backward=False, seed=3,
                        bucket_bytes=0 if bucket_bytes == OLD_LAYOUT else bucket_bytes)

    def steps(params, opt, n):
        for i in range(n):
            for p in params:
                p.grad = torch.full_like(p, 0.1 * (i + 1))
            opt.step()

    a = fresh()
    opt_a = opt_for(a, saved_bytes)
    steps(a, opt_a, 3)
    saved = copy.deepcopy(opt_a.state_dict())  # as torch.save would keep it
    if saved_bytes == OLD_LAYOUT:  # {"inner": [each weight's optimizer's state], ...}
        saved = {"inner": [copy.deepcopy(opt_a.bucket_of[p].inner.state_dict()) for p in a],
                 **{k: saved[k] for k in ("lr", "initial_lr", "generator")}}
    weights = [p.detach().clone() for p in a]
    steps(a, opt_a, 2)
    b = [torch.nn.Parameter(w) for w in weights]
    opt_b = opt_for(b, loaded_bytes)
    opt_b.load_state_dict(saved)
    steps(b, opt_b, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.once  # torch only, and torch is the same in both core venvs
def test_a_state_for_other_weights_is_refused():
    def opt_for(params):
        return Bucketed([{"params": params, "lr": 1e-2}], lambda g: torch.optim.AdamW(g),
                        in_backward=False)
    two = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))]
    saved = opt_for(two).state_dict()
    with pytest.raises(DreamboothError, match="is for 2 weights, and this run trains 1"):
        opt_for(two[:1]).load_state_dict(saved)


# -- buckets in backward, on the tiny UNet ------------------------------------------------------
def tiny_unet():
    from dreambooth.model.components import build_random
    from dreambooth.model.tiny import tiny_configs
    return build_random("v1x", tiny_configs("v1x")).unet


def unet_loss(unet, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    cond = torch.randn(1, 7, unet.config.cross_attention_dim, generator=gen)
    return unet(x, torch.tensor([10 * seed + 1]), cond).sample.square().mean()


@pytest.mark.once  # torch only, and torch is the same in both core venvs
def test_buckets_update_in_backward_and_free_their_gradients():
    unet = tiny_unet()
    params = list(unet.parameters())
    before = [p.detach().clone() for p in params]
    opt = Bucketed([{"params": params, "lr": 1e-3}], lambda g: torch.optim.AdamW(g, lr=1.0),
                   in_backward=True, clip=1.0, bucket_bytes=64 * 1024)
    assert 5 < len(opt.buckets) < len(params) / 4
    updated, update = [], opt.update
    opt.update = lambda bucket: (updated.append(bucket), update(bucket))
    unet_loss(unet, 0).backward()
    # every bucket stepped within backward (every weight of the UNet gets a gradient), and
    # no gradient is left
    assert sorted(map(id, updated)) == sorted(map(id, opt.buckets))
    first_order = [id(p) for b in opt.buckets for p in b.params]
    stepped = len(updated)
    opt.step()  # nothing left to update; the buckets follow the order the gradients came in
    assert len(updated) == stepped
    assert [id(p) for b in opt.buckets for p in b.params] != first_order
    updated.clear()
    unet_loss(unet, 1).backward()
    assert [id(b) for b in updated] == [id(b) for b in opt.buckets]
    assert all(p.grad is None for p in params)
    assert all(not torch.equal(p, b) for p, b in zip(params, before) if b.abs().sum() > 0)
    after = [p.detach().clone() for p in params]
    opt.step()
    assert len(updated) == len(opt.buckets)  # nothing left over
    assert all(torch.equal(p, a) for p, a in zip(params, after))


@pytest.mark.once  # torch only, and torch is the same in both core venvs
def test_a_bucket_left_incomplete_by_backward_is_updated_by_step():
    used, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    params = [*unused.parameters(), *used.parameters()]
    kept = [p.detach().clone() for p in params]
    opt = Bucketed([{"params": params, "lr": 1e-2}], lambda g: torch.optim.AdamW(g, lr=1.0),
                   in_backward=True)
    assert len(opt.buckets) == 1
    used(torch.ones(2, 4)).sum().backward()
    assert all(p.grad is not None for p in used.parameters())  # waiting for the rest
    opt.step()
    assert all(p.grad is None for p in params)
    assert [torch.equal(p, k) for p, k in zip(params, kept)] == [True, True, False, False]


@pytest.mark.parametrize("clip, bucket_bytes", [(0.0, 64 * 1024), (1.0, 1 << 30)])
@pytest.mark.once  # torch only, and torch is the same in both core venvs
def test_bucketed_adamw_in_backward_equals_plain_adamw(clip, bucket_bytes):
    """AdamW on fp32 weights, stepped bucket by bucket in backward (foreach within a bucket, as
    on a GPU, where it is fused), makes the update torch's AdamW makes after backward, to 1e-6
    (float rounding: foreach and per-tensor AdamW order a few ops differently, and with one
    bucket its clipping is the plain step's global clipping, the norms summed in another
    order). Each step starts from the plain run's weights: a rounding difference in a weight
    changes the next gradients, and Adam turns a near-zero gradient's change into a step of up
    to lr (see the next test)."""
    plain_unet, unet = tiny_unet(), tiny_unet()
    plain = torch.optim.AdamW(plain_unet.parameters(), lr=1e-3, weight_decay=1e-2)
    params = list(unet.parameters())
    opt = Bucketed([{"params": params, "lr": 1e-3}],
                   lambda g: torch.optim.AdamW(g, lr=1.0, weight_decay=1e-2, foreach=True),
                   in_backward=True, clip=clip, bucket_bytes=bucket_bytes)
    worst = 0.0
    for seed in range(3):
        with torch.no_grad():
            torch._foreach_copy_(params, list(plain_unet.parameters()))
        unet_loss(plain_unet, seed).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(plain_unet.parameters(), clip)
        plain.step()
        plain.zero_grad()
        unet_loss(unet, seed).backward()
        opt.step()
        worst = max(worst, max((a - b).abs().max().item()
                               for a, b in zip(plain_unet.parameters(), params)))
    moved = max((a - b).abs().max().item()
                for a, b in zip(plain_unet.parameters(), tiny_unet().parameters()))
    assert moved > 1e-3  # it trained
    assert worst <= 1e-6, worst


# -- through the trainer ------------------------------------------------------------------------
def run(config, monkeypatch=None, free=None):
    messages = []
    bus = ev.EventBus(lambda e: messages.append(e.text) if isinstance(e, ev.Message) else None)
    t = Trainer(config.check(), bus, ev.CancelToken())
    if free is not None:
        monkeypatch.setattr(t, "free_gpu_memory", lambda device: free)
    t.result = t.run()
    t.messages = messages
    return t


def unet_weights(path) -> dict:
    state, _ = read_checkpoint(path)
    return {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}


def test_optimizer_in_backward_gives_the_plain_step_and_keeps_no_gradients(quick_config,
                                                                          tmp_path):
    base = quick_config.replace(max_grad_norm=0.0, train_text_encoder=True, memory_preset="off")
    plain = run(base.replace(model_name="plain"))
    fused = run(base.replace(model_name="fused", fused_optimizer=True))
    assert "in backward" in fused.optimizer_name and fused.fused
    assert all(p.grad is None for m in fused.models for p in m.parameters())
    a, b = unet_weights(plain.result.path), unet_weights(fused.result.path)
    source = unet_weights(quick_config.source_checkpoint)
    assert any(not torch.equal(a[k], source[k].float()) for k in a)  # it did train
    # the fused step sums gradients in another order, and Adam turns a near-zero gradient's
    # rounding into a step of up to about lr: no weight can be further apart than that over the
    # run, and nearly all are equal to float rounding
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    bound = 2 * base.learning_rate * plain.result.steps
    assert diffs.max().item() <= bound, (diffs.max().item(), bound)
    assert (diffs <= 1e-6).float().mean().item() >= 0.99


def test_lowest_preset_trains_bf16_weights_in_backward(quick_config):
    t = run(quick_config.replace(memory_preset="lowest", train_text_encoder=True,
                                 learning_rate=1e-4))
    cfg = t.cfg
    assert (cfg.fused_optimizer, cfg.bf16_weights, cfg.optimizer, cfg.gradient_checkpointing,
            cfg.train_text_encoder, cfg.mixed_precision) == \
        (True, True, "adafactor", True, False, "bf16")
    assert any(m.startswith("Memory preset 'lowest': ") and "train_text_encoder = False" in m
               for m in t.messages)
    assert {p.dtype for p in t.comp.unet.parameters()} == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(x)) for x in t.result.losses)
    trained, source = unet_weights(t.result.path), unet_weights(quick_config.source_checkpoint)
    changed = sum((trained[k] != source[k].to(torch.bfloat16).float()).sum().item()
                  for k in trained)
    assert changed > 0.5 * sum(v.numel() for v in trained.values())


def test_auto_preset_changes_what_it_must_and_off_only_advises(quick_config, monkeypatch):
    # the estimate is of the real-size architecture (v1x): 10 GiB free can't hold a full
    # fine-tune of SD1.5 with its text encoder in fp32
    greedy = quick_config.replace(train_text_encoder=True, steps_per_image=1, mixed_precision="no")
    auto = run(greedy.replace(model_name="auto"), monkeypatch, free=10 * GIB)
    assert auto.cfg.train_text_encoder is False
    said = [m for m in auto.messages if "The 'auto' memory preset has made" in m]
    assert said and "stop training the text encoder" in said[0]
    off = run(greedy.replace(model_name="off", memory_preset="off"), monkeypatch, free=10 * GIB)
    assert off.cfg == greedy.replace(model_name="off", memory_preset="off")
    assert any("Set memory_preset to 'auto'" in m for m in off.messages)
    roomy = run(greedy.replace(model_name="roomy"), monkeypatch, free=200 * GIB)
    assert roomy.cfg == greedy.replace(model_name="roomy")
    assert any("200.0 GiB are free" in m for m in roomy.messages)


@pytest.mark.once  # torch only, and torch is the same in both core venvs
def test_out_of_memory_says_what_to_change_and_loses_nothing(quick_config, monkeypatch):
    first = run(quick_config.replace(model_name="oom", memory_preset="off"))
    kept = first.result.path.read_bytes()

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(Trainer, "micro_step", oom)
    monkeypatch.setattr(trainer_module, "gpu_total_memory", lambda: 8 * GIB)
    events = []
    with pytest.raises(TrainingError) as err:
        trainer_module.train(quick_config.replace(model_name="oom", memory_preset="off",
                                                  train_text_encoder=True, overwrite=True),
                             events.append)
    assert err.value.message == "The GPU ran out of memory."
    hint = err.value.hint
    assert hint.startswith("With 8.0 GiB on this GPU: It fits") and "memory_preset" in hint
    # the changes that slow training least: the text encoder keeps training (issue 13)
    assert "8-bit AdamW" in hint and "inside backward" in hint and "intact" in hint
    assert "text encoder" not in hint and "checkpointing" not in hint
    failed = [e for e in events if isinstance(e, ev.Failed)]
    assert failed and failed[0].hint == hint
    assert first.result.path.read_bytes() == kept
    assert not (quick_config.replace(model_name="oom").model_dir / "lock").exists()


@pytest.mark.once  # our state and preset record; torch is the same in both core venvs
def test_auto_preset_resumes_with_the_settings_it_chose(quick_config, monkeypatch):
    """A run the 'auto' preset changed, interrupted, goes on with those changes even when more
    memory is free now (else its saved state would belong to another configuration)."""
    cfg = quick_config.replace(model_name="again", train_text_encoder=True, state_every_steps=1,
                               steps_per_image=2)
    cancel = ev.CancelToken()
    first = Trainer(cfg, ev.EventBus(lambda e: cancel.cancel() if isinstance(e, ev.Step)
                                     else None), cancel)
    monkeypatch.setattr(first, "free_gpu_memory", lambda device: 10 * GIB)
    assert first.run().cancelled and first.cfg.train_text_encoder is False
    second = run(cfg, monkeypatch, free=200 * GIB)
    assert any(m.startswith("Resuming with the settings the 'auto' memory preset chose")
               for m in second.messages)
    assert any(m.startswith("Resuming from step 1") for m in second.messages)
    assert second.cfg.train_text_encoder is False and not second.result.cancelled


@pytest.mark.once  # torch only, and torch is the same in both core venvs
def test_a_lowest_lora_snapshot_from_before_fp8_base_resumes_without_it(quick_config,
                                                                       monkeypatch):
    """The 'lowest' preset now stores a LoRA's frozen UNet in fp8. A run it began before that
    (its snapshot has no fp8_base) goes on as it began, saying so, instead of being refused
    as another configuration."""
    cfg = quick_config.replace(model_name="lowold", use_lora=True, memory_preset="lowest",
                               state_every_steps=1, steps_per_image=2)
    from dreambooth.training import advice
    before = advice.lowest  # the preset as it was: no fp8_base
    monkeypatch.setattr(advice, "lowest", lambda config, half="bf16": {
        k: v for k, v in before(config, half).items() if k != "fp8_base"})
    cancel = ev.CancelToken()
    first = Trainer(cfg, ev.EventBus(lambda e: cancel.cancel() if isinstance(e, ev.Step)
                                     else None), cancel)
    assert first.run().cancelled and first.cfg.fp8_base is False
    monkeypatch.setattr(advice, "lowest", before)
    assert run(cfg.replace(model_name="lownew", steps_per_image=1)).cfg.fp8_base is True
    (snapshot,) = (cfg.model_dir / "state").glob("step_*")  # as a snapshot from before
    info = json.loads((snapshot / "trainer.json").read_text())
    del info["config"]["fp8_base"]
    (snapshot / "trainer.json").write_text(json.dumps(info))
    second = run(cfg)
    assert any(m.startswith("Resuming with the settings the 'lowest' memory preset chose")
               and "fp8_base = False" in m for m in second.messages), second.messages
    assert any(m.startswith("Resuming from step 1") for m in second.messages)
    assert second.cfg.fp8_base is False and not second.result.cancelled
