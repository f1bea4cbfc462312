"""Losses left on the device and read every few steps; a non-finite one skipped on the device
and reported with its step; a step's draws taken by rows without an index tensor."""
import pytest
import torch

from dreambooth.config.errors import TrainingError
from dreambooth.training.loss import take_rows
from dreambooth.training.losslog import LossLog, fused_parts, skip_update_unless_finite
from dreambooth.training.state import restore_generator


def test_losses_are_read_when_due_in_step_order():
    log, plain = LossLog(3), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for step in range(1, 8):
        log.micro(torch.tensor(float(step)), plain)
        log.end_update(step, last=step == 7)
        assert log.loss_at(step) == (float(step) if step in (3, 6, 7) else None)
    assert log.values == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0] and not log.pending


def test_an_update_is_the_mean_of_its_micro_steps_and_a_read_stops_at_the_first_bad_one():
    log, plain = LossLog(10), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for step, micro in enumerate(([1.0, 3.0], [2.0, float("nan")], [float("inf"), 1.0]), 1):
        for value in micro:
            log.micro(torch.tensor(value), plain)
        log.end_update(step)
    with pytest.raises(TrainingError) as err:
        log.read()
    assert "became nan at step 2" in err.value.message and "bf16" in err.value.hint
    assert log.values == [2.0]


def _adamw(fused: bool):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    return p, torch.optim.AdamW([p], lr=0.1, fused=fused)


def test_a_fused_optimizer_skips_a_non_finite_update_on_the_device():
    p, opt = _adamw(True)
    ref_p, ref = _adamw(True)
    assert fused_parts(opt) == [opt] and fused_parts(_adamw(False)[1]) == []
    for loss in (1.0, float("nan"), 2.0):
        p.grad = torch.full_like(p, loss)  # a non-finite loss: non-finite gradients
        skip_update_unless_finite(opt, [torch.tensor(loss)])
        opt.step()
        if loss == loss:  # the reference never sees the bad step
            ref_p.grad = torch.full_like(ref_p, loss)
            ref.step()
    # the bad step left weights, moments and step count as they were
    assert opt.state[p]["step"].item() == 2 == ref.state[ref_p]["step"].item()
    assert torch.equal(p, ref_p)
    assert torch.equal(opt.state[p]["exp_avg"], ref.state[ref_p]["exp_avg"])


def test_a_plain_optimizer_is_not_asked_to_skip():
    p, opt = _adamw(False)
    assert skip_update_unless_finite(opt, [torch.tensor(float("nan"))]) is False
    assert getattr(opt, "found_inf", None) is None


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [0, 1], [2, 3], [1, 3], [0, 2, 3], [3]])
def test_take_rows_is_indexing(rows):
    t = torch.arange(4 * 5).reshape(4, 5)
    assert torch.equal(take_rows(t, rows), t[rows])


def test_a_generator_state_from_another_device_kind_reseeds():
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    restore_generator(gen, state, 5)
    assert torch.equal(gen.get_state(), state)
    restore_generator(gen, torch.zeros(16, dtype=torch.uint8), 5)  # a CUDA generator's size
    a = torch.randn(3, generator=gen)
    restore_generator(gen, torch.zeros(16, dtype=torch.uint8), 5)
    assert torch.equal(a, torch.randn(3, generator=gen))
