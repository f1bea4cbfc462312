"""EMA of a Flux / SD3.5 LoRA (use_ema): the average is kept of the transformer's LoRA alone (not a
copy of its frozen base), the LoRA file is written from it, a resumed run goes on with it, and
the memory estimate counts it."""
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.config import events as ev
from dreambooth.model.filecheck import read_layout
from dreambooth.training.trainer import Trainer
from test_flux import flux_config, tiny_flux  # noqa: F401 (the session's tiny Flux)


def _lora(unet) -> dict:
    # (trainable copies: EMAModel copies a frozen parameter rather than average it)
    return {n: p.detach().clone().requires_grad_(True) for n, p in unet.named_parameters()
            if p.requires_grad}


@pytest.mark.once
def test_flux_lora_ema_is_saved(tiny_flux, instance_dir, tmp_path):
    """Two steps with use_ema: the EMA holds the LoRA's parameters only; the LoRA file holds
    diffusers' EMAModel average of the two steps' weights (as a separate EMAModel over copies
    of them makes it), not the last step's, and is the file the saver writes from those."""
    from diffusers.training_utils import EMAModel
    cfg = flux_config(tiny_flux, instance_dir, tmp_path, use_ema=True, ema_decay=0.9,
                      batch_size=2, model_name="ema")
    trainer = Trainer(cfg.check(), ev.EventBus(lambda e: None), ev.CancelToken())
    seen, after = [], Trainer.after_update
    trainer.after_update = lambda step: (seen.append(_lora(trainer.comp.unet)),
                                         after(trainer, step))
    result = trainer.run()
    unet = trainer.comp.unet
    assert len(seen) == 2 and result.path.is_file()
    lora = [p for n, p in unet.named_parameters() if ".lora_" in n]
    assert [id(p) for p in trainer.ema_params] == [id(p) for p in lora]
    assert sum(s.numel() for s in trainer.ema.shadow_params) == sum(p.numel() for p in lora) \
        < sum(p.numel() for p in unet.parameters()) // 10
    names = list(seen[0])
    check = EMAModel([seen[0][n].clone() for n in names], decay=0.9)
    for weights in seen:
        check.step([weights[n] for n in names])
    saved = load_file(str(result.path))
    assert read_layout(result.path)[0] and saved
    for p, value in zip(lora, check.shadow_params):  # the file from the expected weights
        p.data.copy_(value)
    expected = trainer.saver.output_path(2).with_name("expected.safetensors")
    trainer.saver.save_lora(2, expected, {}, unet.state_dict(), {
        "epochs": trainer.epochs, "items": trainer.feed.items, "class_images": 0})
    want = load_file(str(expected))
    assert saved.keys() == want.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], want[key], rtol=0, atol=1e-6)
    last = seen[-1]
    assert any(not torch.allclose(last[n], value) for n, value in zip(names,
                                                                      check.shadow_params))


@pytest.mark.once
def test_flux_estimate_counts_the_lora_ema():
    """FLUX.1-dev at full width (2+2 blocks deep, as the profile test's), r16, 1024 px: the
    estimate's EMA is the fp32 copy of the parameters the trainer's EMA averages on the LoRA'd
    transformer (ema_parameters), and adds that much to the training step's peak: a small part
    of the transformer's weights, not a second transformer."""
    from dreambooth.training import memory_flux
    from dreambooth.training.saver import ema_parameters
    from test_flux_memory import SHORT, flux_lora
    cfg = flux_lora(fp8_base=True, gradient_checkpointing=True)
    plain, _, _ = memory_flux.flow_peak(cfg, (20, 0), 1.0, 0, SHORT, caching=False)
    peak, parts, _ = memory_flux.flow_peak(cfg.replace(use_ema=True), (20, 0), 1.0, 0,
                                           SHORT, caching=False)
    model = memory_flux._meta_transformer("flux-dev", SHORT, 16, "attention")
    averaged = ema_parameters(SimpleNamespace(spec=SimpleNamespace(flow=True)), model)
    assert parts["ema"] == 4 * sum(p.numel() for p in averaged) == peak - plain
    assert 0 < parts["ema"] < parts["weights"] // 20


@pytest.mark.once
def test_flux_lora_ema_resumes_exactly(tiny_flux, instance_dir, tmp_path):
    """A Flux LoRA run with use_ema stopped after step 3 of 4 and resumed from its snapshot
    ends with the LoRA file an uninterrupted run writes, bit for bit (the EMA's averages of
    the LoRA are in the snapshot and go back where they were)."""
    from dreambooth import train
    from test_resume import stop_at
    cfg = flux_config(tiny_flux, instance_dir, tmp_path, use_ema=True, ema_decay=0.9,
                      state_every_steps=2, cpu_threads=1, deterministic="on")
    straight = train(cfg.replace(model_name="straight"))
    cancel, stopped = ev.CancelToken(), cfg.replace(model_name="stopped")
    train(stopped, stop_at(3, cancel), cancel)
    resumed = train(stopped)
    a, b = load_file(str(straight.path)), load_file(str(resumed.path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
