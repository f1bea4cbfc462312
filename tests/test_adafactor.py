"""Our Adafactor: transformers' update rule (checked against it), conv weights factored as the
matrix (out, in*k*k), its state counted as memory_count counts it, an exact resume, and a
state saved by transformers' Adafactor converted when loaded."""
import io

import pytest
import torch

from dreambooth.training.adafactor import Adafactor
from dreambooth.training.memory_count import optimizer_state_bytes
from dreambooth.training.optim import Bucketed

SETTINGS = {"lr": 1e-2, "weight_decay": 1e-2}


def transformers_adafactor(params):
    from transformers.optimization import Adafactor as Theirs
    return Theirs(params, scale_parameter=False, relative_step=False, warmup_init=False,
                  **SETTINGS)


def run(optimizer, p, grads):
    for g in grads:
        p.grad = g.clone()
        optimizer.step()


FOREACH = pytest.mark.parametrize("foreach", [False, True], ids=["stacked", "foreach"])


@FOREACH
@pytest.mark.parametrize("shape", [(24, 40), (40,)])
def test_matrices_and_vectors_step_as_transformers_does(shape, foreach):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) * 10 ** -i for i in range(6)]
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    run(Adafactor([ours], **SETTINGS, foreach=foreach), ours, grads)
    run(transformers_adafactor([theirs]), theirs, grads)
    assert not torch.equal(ours, w)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@FOREACH
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_conv_weight_keeps_one_row_and_one_column_and_learns(dtype, foreach):
    g = torch.Generator().manual_seed(1)
    target = torch.randn(8, 4, 3, 3, generator=g)
    p = torch.nn.Parameter(torch.randn(8, 4, 3, 3, generator=g).to(dtype))
    opt = Adafactor([p], lr=5e-2, foreach=foreach)
    losses = []
    for _ in range(20):
        loss = ((p.float() - target) ** 2).sum()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = opt.state[p]
    assert state["exp_avg_sq_row"].shape == (8,) and state["exp_avg_sq_col"].shape == (36,)
    assert all(t.dtype == torch.float32 for t in state.values() if torch.is_tensor(t))
    assert p.dtype == dtype and torch.isfinite(p).all()
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("shape", [(320, 640, 3, 3), (320, 640, 1, 1), (320, 1024), (320,)])
def test_the_state_is_what_memory_count_says(shape):
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = Adafactor([p], lr=1e-3)
    p.grad = torch.ones(shape)
    opt.step()
    held = sum(t.numel() * t.element_size() for t in opt.state[p].values() if torch.is_tensor(t))
    assert held == optimizer_state_bytes("adafactor", [shape])


@pytest.mark.parametrize("first_way,then", [(False, False), (True, True), (False, True)],
                         ids=["stacked", "foreach", "stacked-then-foreach"])
def test_a_saved_state_continues_bit_identically(first_way, then):
    """(A state saved by one way of stepping is resumed by the other too: a snapshot moved
    between a CPU and a GPU.)"""
    g = torch.Generator().manual_seed(2)
    shapes = [(6, 5, 3, 3), (7, 9), (11,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(5)]

    def steps(opt, ps, gs):
        for step_grads in gs:
            for p, grad in zip(ps, step_grads):
                p.grad = grad.clone()
            opt.step()

    first = Adafactor(params, **SETTINGS, foreach=first_way)
    steps(first, params, grads[:3])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as a snapshot saves it
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    second = Adafactor(resumed, **SETTINGS, foreach=then)
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    first.foreach = then
    steps(first, params, grads[3:])
    steps(second, resumed, grads[3:])
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))


def test_a_state_saved_by_transformers_adafactor_is_converted_on_resume():
    """A snapshot from before: one transformers Adafactor per weight (the old per-weight
    layout, "inner"), whose conv state is row (8, 4, 3) and col (8, 4, 3). It loads into a
    Bucketed optimizer over ours and steps on."""
    g = torch.Generator().manual_seed(3)
    shapes = [(8, 4, 3, 3), (8, 4), (8,)]
    w = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    old_params = [torch.nn.Parameter(t.clone()) for t in w]
    old = [transformers_adafactor([{"params": [p], "lr": 1e-2}]) for p in old_params]
    for _ in range(3):
        for opt, p, grad in zip(old, old_params, grads):
            p.grad = grad.clone()
            opt.step()
    saved = {"inner": [opt.state_dict() for opt in old], "lr": [1e-2], "initial_lr": [None],
             "generator": torch.Generator().manual_seed(0).get_state()}
    conv = saved["inner"][0]["state"][0]
    assert conv["exp_avg_sq_row"].shape == (8, 4, 3)
    new_params = [torch.nn.Parameter(t.clone()) for t in w]
    new = Bucketed([{"params": new_params, "lr": 1e-2}],
                   lambda groups: Adafactor(groups, **SETTINGS), in_backward=False)
    new.load_state_dict(saved)
    from dreambooth.training.state import converted_states
    assert converted_states(new) == 1  # the conv weight's: the resume says so
    (converted,) = [s for inner in new.inner_states() for s in inner.values()
                    if "exp_avg_sq_col" in s and s["exp_avg_sq_col"].shape == (36,)]
    assert converted["exp_avg_sq_row"].shape == (8,)
    assert converted["step"] == 3 and "RMS" not in converted
    # the row is the old rows' mean over the same entries
    torch.testing.assert_close(converted["exp_avg_sq_row"],
                               conv["exp_avg_sq_row"].float().mean(dim=(1, 2)))
    for p, q, grad in zip(new_params, old_params, grads):
        p.data.copy_(q.data)
        p.grad = grad.clone()
    new.step()
    assert all(torch.isfinite(p.float()).all() for p in new_params)
    # matrices and vectors were not converted: they step on as transformers would
    for opt, q, grad in zip(old, old_params, grads):
        q.grad = grad.clone()
        opt.step()
    for i in (1, 2):
        torch.testing.assert_close(new_params[i], old_params[i], rtol=1e-6, atol=1e-7)


@FOREACH
@pytest.mark.parametrize("batch", [None, 100])
def test_weights_of_one_shape_step_together_as_each_would_alone(batch, foreach, monkeypatch):
    """The update of many weights together (multi-tensor ops, in batches of BATCH_ELEMENTS
    numbers) is the update each weight gets from an optimizer of its own."""
    import dreambooth.training.adafactor as module
    if batch:
        monkeypatch.setattr(module, "BATCH_ELEMENTS", batch)
        monkeypatch.setattr(module, "STACK_ELEMENTS", batch)
    g = torch.Generator().manual_seed(4)
    shapes = [(6, 5, 3, 3), (7, 9), (6, 5, 3, 3), (11,), (7, 9), (11,), (7, 9)]
    w = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    together = [torch.nn.Parameter(t.clone()) for t in w]
    alone = [torch.nn.Parameter(t.clone()) for t in w]
    opt = Adafactor(together, **SETTINGS, foreach=foreach)
    opts = [Adafactor([p], **SETTINGS, foreach=foreach) for p in alone]
    for step_grads in grads:
        for p, q, grad in zip(together, alone, step_grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        for o in opts:
            o.step()
    for p, q, start in zip(together, alone, w):
        assert not torch.equal(p, start)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
