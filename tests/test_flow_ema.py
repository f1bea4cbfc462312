"""EMA of a Flux / SD3.5 LoRA (use_ema): the average is kept of the transformer's LoRA alone (not a
copy of its frozen base), the LoRA file is written from it, a resumed run goes on with it, and
the memory estimate counts it. lora_merge for Flux: the source transformer with the LoRA file
applied, streamed."""
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.config import events as ev
from dreambooth.config.errors import DreamboothError
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


@pytest.mark.once
def test_flux_lora_merge_is_the_source_with_the_file_applied(tiny_flux, instance_dir, tmp_path):
    """lora_merge for Flux: a transformer-only file in BFL's layout in the checkpoints folder
    (the all-in-one fp8 source's prefix and other parts left out) whose weights, read back
    into diffusers' layout, are the trained model's with peft's own merge of its LoRA; written
    holding about a weight and its update at a time, not the transformer."""
    import copy
    from peft.tuners.lora import LoraLayer
    from dreambooth.model import flux_keys
    from dreambooth.model.streamed import write_streamed
    from dreambooth.training.flux_merge import bfl_layout, merged_transformer
    cfg = flux_config(tiny_flux, instance_dir, tmp_path, lora_merge=True, batch_size=2,
                      model_name="merge")
    trainer = Trainer(cfg.check(), ev.EventBus(lambda e: None), ev.CancelToken())
    result = trainer.run()
    (merged,) = cfg.resolved_output_dir.glob("*_merged.safetensors")
    assert merged.name == result.path.stem + "_merged.safetensors"
    shapes, _, _ = read_layout(merged)
    assert shapes == bfl_layout(trainer.comp.configs["unet"])
    unet = copy.deepcopy(trainer.comp.unet)
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    want = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items()
            if ".lora_" not in k}
    got = load_file(str(merged))
    read = flux_keys.to_diffusers(got)
    assert read.keys() == want.keys()
    for key, value in read.items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-6)
    # an all-in-one source: its transformer's keys, unprefixed, the rest left out
    from safetensors.torch import save_file
    lora, plain = load_file(str(result.path)), load_file(cfg.source_checkpoint)
    aio = tmp_path / "aio.safetensors"
    save_file({**{"model.diffusion_model." + k: v for k, v in plain.items()},
               "first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2)}, str(aio))
    from_aio = merged_transformer(str(aio), lora, torch.float32)
    assert from_aio.keys() == got.keys() == plain.keys()
    assert all(torch.equal(from_aio[k].make(), got[k]) for k in got)
    with pytest.raises(DreamboothError, match="lacks"):
        merged_transformer(str(aio), {**lora, "lora_unet_x.lora_down.weight": lora[next(
            iter(lora))]}, torch.float32)
    # written (the source read, each weight merged, cast and written in turn) holding about
    # one fp32 weight at a time: torch's allocations, as its profiler records them (counts)
    sizes = [torch.Size(shape).numel() * 4 for shape in shapes.values()]
    state = merged_transformer(cfg.source_checkpoint, load_file(str(result.path)),
                               torch.float32)
    with open(os.devnull, "wb") as sink:
        held = _peak_tensor_bytes(lambda: write_streamed(sink, state))
    assert held <= 3 * max(sizes) < sum(sizes) // 3, (held, max(sizes), sum(sizes))


def _peak_tensor_bytes(call) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    held = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in
                            prof.profiler.kineto_results.events() if e.name() == "[memory]"):
        held += nbytes
        peak = max(peak, held)
    return peak
