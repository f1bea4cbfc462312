"""Gradients kept in bf16 (training/parked.py): the same update as a plain bf16 step, in half
the gradient memory; where it applies and where it does not."""
from __future__ import annotations

import pytest
import torch

from dreambooth.training import parked
from test_memory_levers import run, unet_weights

# torch only, and torch is the same in both core venvs
pytestmark = pytest.mark.once


@pytest.mark.parametrize("clip,fused,checkpointing", [
    (0.0, False, False), (1e-3, False, False), (1e-3, False, True), (0.0, True, False),
    (1e-3, True, False)])
def test_parked_gradients_train_exactly_as_a_plain_bf16_step(quick_config, monkeypatch, clip,
                                                            fused, checkpointing):
    """Stepped by the park after backward, or (fused) by the optimizer's buckets in backward;
    1e-3: every step is clipped (globally, or bucket by bucket when fused). 4 steps."""
    base = quick_config.replace(mixed_precision="bf16", train_text_encoder=True,
                                max_grad_norm=clip, memory_preset="off", fused_optimizer=fused,
                                gradient_checkpointing=checkpointing, steps_per_image=1)
    received = []
    receive = parked.GradPark.receive
    monkeypatch.setattr(parked.GradPark, "receive",
                        lambda self, w, g, *a: (received.append(g.dtype), receive(self, w, g, *a)))
    kept = run(base.replace(model_name="kept"))
    assert received and set(received) == {torch.bfloat16}
    park = kept.park or kept.optimizer.optimizer.park
    assert park.modules and (kept.park is None) == fused
    assert not park.slots  # nothing is held between steps
    assert all(p.grad is None for m in kept.models for p in m.parameters())
    monkeypatch.setattr(parked, "attach", lambda *a: None)
    plain = run(base.replace(model_name="plain"))
    a, b = unet_weights(kept.result.path), unet_weights(plain.result.path)
    source = unet_weights(quick_config.source_checkpoint)
    assert any(not torch.equal(a[k], source[k].float()) for k in a)  # it did train
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    if fused and clip:  # clipped bucket by bucket: the buckets follow the order gradients
        # arrive in, which differs a little (a bias before its weight): Adam's step is at
        # most about lr wherever the clipping differs
        assert worst <= 2 * base.learning_rate * kept.result.steps, worst
    else:
        assert worst == 0.0, worst


def test_where_gradients_are_kept_in_bf16(quick_config):
    """Only where it is exact: bf16, one process, no accumulation, a full fine-tune, no
    compile, an optimizer stepped a chunk at a time (or the fused one, a bucket at a time)."""
    base = quick_config.replace(mixed_precision="bf16")
    assert parked.applies(base, "bf16")
    assert parked.applies(base.replace(optimizer="prodigy", fused_optimizer=True), "bf16")
    for cfg, precision, processes, distributed in [
            (base, "fp16", 1, "NO"), (base, "no", 1, "NO"), (base, "bf16", 2, "MULTI_GPU"),
            (base, "bf16", 1, "DEEPSPEED"),
            (base.replace(gradient_accumulation_steps=2), "bf16", 1, "NO"),
            (base.replace(use_lora=True), "bf16", 1, "NO"),
            (base.replace(method="textual_inversion"), "bf16", 1, "NO"),
            (base.replace(bf16_weights=True), "bf16", 1, "NO"),
            (base.replace(compile="blocks"), "bf16", 1, "NO"),
            (base.replace(optimizer="prodigy"), "bf16", 1, "NO")]:
        assert not parked.applies(cfg, precision, processes, distributed)


class _OwnForward(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class _Net(torch.nn.Module):
    """A Linear used twice, a large one (cast again in backward), a conv, a norm, and a
    Linear subclass with its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.twice = torch.nn.Linear(8, 8)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.own = _OwnForward(8, 8)
        self.big = torch.nn.Linear(8, 8, bias=False)

    def forward(self, x):
        h = self.twice(self.twice(x))
        h = self.conv(h.view(2, 8, 1, -1)).flatten(2).transpose(1, 2).reshape(-1, 8)
        return self.big(self.own(self.norm(h.view(2, 8, -1)).transpose(1, 2).reshape(-1, 8)))


def _grads(net, park, x, cache=True) -> dict:
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache):
        loss = net(x).float().square().mean()
    loss.backward()
    if park is not None:
        park.take(list(net.parameters()))
    out = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("cache", [True, False])  # autocast's cache is off when checkpointing
def test_the_park_gives_the_gradients_of_a_plain_backward(monkeypatch, cache):
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(16, 8)
    plain = _grads(net, None, x, cache)
    monkeypatch.setattr(parked, "RECAST_ELEMENTS", 64)  # self.big's 64 values: cast again
    park = parked.GradPark([net])
    assert {m for m in park.modules} == {net.twice, net.conv, net.big}  # not the subclass
    received = {}
    receive = park.receive
    park.receive = lambda w, g, *a: (received.setdefault(w, []).append(g.dtype), receive(w, g, *a))
    got = _grads(net, park, x, cache)
    assert not park.slots
    assert received[net.twice.weight] == [torch.bfloat16] * 2  # summed in fp32, as backward
    assert net.norm.weight not in received and net.own.weight not in received
    for name in plain:
        assert torch.equal(got[name], plain[name]), name
    park.release()  # the scratch dropped (the benchmark's move): made again when needed
    assert park.scratch is None
    again = _grads(net, park, x, cache)
    assert park.scratch is not None and all(torch.equal(again[n], plain[n]) for n in plain)
    park.detach()
    assert "forward" not in vars(net.twice) and not park.modules
    assert all(torch.equal(g, plain[n]) for n, g in _grads(net, None, x, cache).items())


class _Twice(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.twice, self.last = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        return self.last(self.twice(self.twice(self.first(x))))


def _fused_run(park: bool, cache: bool, steps: int = 3):
    from dreambooth.training.optim import Bucketed
    torch.manual_seed(0)
    net, x = _Twice(), torch.randn(16, 8)
    opt = Bucketed([{"params": list(net.parameters()), "lr": 1e-2}],
                   lambda groups: torch.optim.AdamW(groups, lr=1e-2), True, 0.0, 0,
                   bucket_bytes=4)  # a bucket a weight: the most chances to finish one early
    if park:
        opt.park = parked.GradPark([net], True, opt.bucket_bytes // 4)
        opt.park.plan([b.params for b in opt.buckets])
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache):
            loss = net(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return net.state_dict(), opt.state_dict()["state"]


@pytest.mark.parametrize("cache", [True, False])
def test_the_fused_optimizer_steps_a_twice_used_weight_once_with_both_gradients(cache):
    """A weight's bucket completes when backward's hook on the weight runs: once, after both
    uses, not at the first gradient that reaches the park."""
    (plain, plain_state), (kept, kept_state) = _fused_run(False, cache), _fused_run(True, cache)
    assert [int(s["step"]) for s in kept_state.values()] == \
        [int(s["step"]) for s in plain_state.values()] == [3] * 6
    assert all(torch.equal(plain[k], kept[k]) for k in plain)


def _train(net, park, x, steps: int = 3) -> None:
    """AdamW steps, clipped, the last one running the net twice (its layers' second uses)."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x) if step < steps - 1 else net(x) + net(x)
            loss = out.float().square().mean()
        loss.backward()
        if park is not None:
            park.step(opt, 1e-3)
        else:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1e-3)
            opt.step()
            opt.zero_grad(set_to_none=True)


def test_a_models_layers_cast_in_one_node_train_exactly_as_a_plain_bf16_step(monkeypatch):
    """From the second step the layers that ran once are cast together (parkgroup.py): one
    node, their gradients in one call; the twice-used one and the large one keep their own
    node; a grouped layer run again in a step (the last one here) casts through its own
    node, its gradients summed with the group's as backward sums them."""
    from dreambooth.training import parkgroup
    monkeypatch.setattr(parked, "RECAST_ELEMENTS", 500)  # the conv's 576 values: cast again
    torch.manual_seed(0)
    plain, x = _Net(), torch.randn(16, 8)
    net = _Net()
    net.load_state_dict(plain.state_dict())
    park = parked.GradPark([net])
    collected = []
    collect = parkgroup.collect
    monkeypatch.setattr(parkgroup, "collect",
                        lambda park, group, grads, cached: (collected.append(len(grads)),
                                                            collect(park, group, grads, cached)))
    _train(net, park, x)
    _train(plain, None, x)
    assert net.big._group is park.home[net.big] and net.big._group.modules == [net.big]
    assert net.twice._group is False and net.conv._group is False
    assert collected == [1, 1]  # the big one's weight (no bias), at steps 2 and 3
    assert not park.slots and not park.casts
    for (name, a), b in zip(net.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name
