"""fp8_base: a frozen UNet stored in fp8 and upcast per layer. The layer computes what the full
layer computes with the (de-quantised) fp8 weight, autograd keeps no upcast copy, validation
refuses a full fine-tune, the 'lowest' preset turns it on for a LoRA, and a tiny LoRA trains
through the real trainer on it: class images and previews are drawn, the LoRA file is written,
and the merged checkpoint is the LoRA merged into the untouched source weights."""
import pytest
import torch
from torch import nn

from dreambooth import Concept, TrainingConfig
from dreambooth.config import events as ev
from dreambooth.model.checkpoint import read_checkpoint
from dreambooth.model.single_file import load_single_file
from dreambooth.training import fp8
from dreambooth.training.lora import inject
from dreambooth.training.advice import lowest, plan
from dreambooth.training.trainer import Trainer
from test_embedding import read_back, run, settings
from test_lora import _saved, merge_by_module_names


def _layers():
    torch.manual_seed(0)
    return [nn.Linear(64, 48), nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.Conv2d(8, 16, 1, bias=False)]


def _input(layer):
    shape = (3, 5, 64) if isinstance(layer, nn.Linear) else (2, 8, 9, 9)
    return torch.randn(shape, requires_grad=True)


@pytest.mark.parametrize("i", range(3))
def test_a_stored_layer_computes_with_its_dequantised_weight(i):
    layer, reference = _layers()[i], _layers()[i]
    fp8.place(layer, torch.device("cpu"), torch.float32)
    assert layer.weight.dtype == fp8.FP8 and not layer.weight.requires_grad
    dequantised = layer.weight.float() * layer.weight_scale
    relative = (dequantised - reference.weight).abs() / reference.weight.abs().clamp_min(1e-3)
    assert relative.max() <= 1 / 16 + 1e-6  # e4m3 with the scale: within 1/16 of each value
    with torch.no_grad():
        reference.weight.copy_(dequantised)
    x = _input(layer)
    out = layer(x)
    out.square().sum().backward()
    grad, x.grad = x.grad, None
    expected = reference(x)
    expected.square().sum().backward()
    assert torch.allclose(out, expected, atol=1e-5) and torch.allclose(grad, x.grad, atol=1e-5)


def test_autocast_computes_in_its_dtype_and_backward_keeps_no_upcast_copy():
    layer = _layers()[1]
    fp8.place(layer, torch.device("cpu"), torch.bfloat16)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    x = _input(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    # the fp8 weight (the model's own tensor) and its scale: no upcast weight, no input
    assert {t.dtype for t in saved} <= {fp8.FP8, torch.float32} and \
        all(t is layer.weight or t is layer.weight_scale for t in saved if t.dim())
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_lora_layers_over_fp8_weights_are_fp32_and_freshly_initialised():
    module = nn.Sequential(nn.Linear(32, 32), nn.Conv2d(32, 32, 1))
    fp8.place(module, torch.device("cpu"), torch.bfloat16)
    params = inject(module, 4, 4.0, ("0", "1"))
    assert len(params) == 4 and {p.dtype for p in params} == {torch.float32}
    down = [p for p in params if p.abs().sum() > 0]
    assert len(down) == 2  # up is zero, down random: not a coarse fp8 copy of a random matrix
    assert all((d.to(fp8.FP8).float() != d).any() for d in down)
    assert module[0].base_layer.weight.dtype == fp8.FP8


def _config(**changes):
    return TrainingConfig(concepts=(Concept("/d", "photo of sks dog"),), **changes)


def test_validation_refuses_fp8_for_a_full_fine_tune_only():
    problems = _config(fp8_base=True).validate(check_paths=False)
    assert [(p.field, "full fine-tune" in p.why) for p in problems] == [("fp8_base", True)]
    assert "method to 'lora'" in problems[0].fix
    for method in ("lora", "textual_inversion"):
        changes = {"embedding_token": "sks"} if method == "textual_inversion" else {}
        assert _config(fp8_base=True, method=method, **changes).validate(check_paths=False) == []


def test_lowest_preset_stores_a_frozen_unet_in_fp8():
    planned, said = plan(_config(method="lora", memory_preset="lowest"), None)
    assert planned.fp8_base is True and "fp8_base = True" in said[0]
    assert planned.validate(check_paths=False) == []
    assert lowest(_config(method="textual_inversion", embedding_token="sks"))["fp8_base"] is True
    assert "fp8_base" not in lowest(_config())


def test_lora_trains_on_an_fp8_base_and_merges_into_the_untouched_weights(tiny_source,
                                                                          instance_dir, tmp_path):
    cfg = TrainingConfig(
        model_name="lora", source_checkpoint=str(tiny_source), work_dir=str(tmp_path / "runs"),
        output_dir=str(tmp_path / "out"), lora_dir=str(tmp_path / "Lora"), resolution=64,
        center_crop=True, batch_size=2, steps_per_image=1, method="lora", lora_rank=4,
        lora_alpha=8.0, lora_learning_rate=1e-2, lora_merge=True, fp8_base=True,
        mixed_precision="bf16", sample_every_epochs=1, sample_steps=2, state_every_steps=1,
        class_generation_steps=2, concepts=(Concept(
            str(instance_dir), "photo of sks pattern", "photo of a pattern",
            str(tmp_path / "class"), 1),)).check()
    events, seen = [], []

    def on_event(e):
        events.append(e)
        if isinstance(e, ev.Step):  # the weights as the step left them
            unet = trainer.comp.unet
            seen.append(({p.dtype for n, p in unet.named_parameters() if n.endswith(
                "base_layer.weight")}, {p.dtype for p in unet.parameters() if p.requires_grad},
                         {p.dtype for n, p in unet.named_parameters() if n.endswith("bias")}))
    trainer = Trainer(cfg, ev.EventBus(on_event), ev.CancelToken())
    result = trainer.run()
    assert len(list((tmp_path / "class").glob("*.png"))) == 4  # made by the fp8 UNet too
    assert result.steps == 2 and seen == [({fp8.FP8}, {torch.float32}, {torch.bfloat16})] * 2
    assert all(torch.isfinite(torch.tensor(x)) for x in result.losses)
    assert any(isinstance(e, ev.Message) and e.text.startswith("fp8_base: ") for e in events)
    assert any(isinstance(e, ev.SampleSaved) for e in events)  # inference upcasts too
    assert fp8.stored_bytes(trainer.comp.unet) > 0.9 * sum(
        p.numel() for n, p in trainer.comp.unet.named_parameters() if "lora_" not in n
        and p.dim() > 1)
    lora, _ = read_checkpoint(result.path)
    assert {v.dtype for v in lora.values()} == {torch.float32}
    assert any(torch.count_nonzero(v) for k, v in lora.items() if "lora_up" in k)  # it learnt
    # the merged checkpoint: the LoRA merged into the source's own weights, not the fp8 copy
    base = load_single_file(str(tiny_source), "v1x")
    merge_by_module_names(base, lora)
    merged, _ = read_checkpoint(tmp_path / "out" / "lora_2_merged.safetensors")
    expected, _ = read_checkpoint(_saved(base, tmp_path))
    assert merged.keys() == expected.keys()
    assert all(torch.allclose(merged[k], v, atol=1e-6) for k, v in expected.items())
    fp8_copy = {k: v.float() * trainer.comp.unet.get_submodule(k.rsplit(".", 1)[0]).weight_scale
                for k, v in trainer.comp.unet.state_dict().items() if v.dtype == fp8.FP8}
    assert fp8_copy  # and the fp8 copy differs from the source: the merge did not start there
    source = load_single_file(str(tiny_source), "v1x").unet.state_dict()
    assert any(not torch.equal(v, source[k.replace("base_layer.", "")]) for k, v in
               fp8_copy.items())


def test_textual_inversion_learns_through_an_fp8_unet(tiny_source, instance_dir, tmp_path):
    """The embedding's gradient comes back through every stored layer's backward."""
    trainer = run(settings(tiny_source, "v1x", instance_dir, tmp_path, fp8_base=True))
    assert fp8.stored_bytes(trainer.comp.unet) > 0
    tensors, _ = read_back(trainer.result.path)
    source = load_single_file(str(tiny_source), "v1x")
    te, tok = source.text_encoders[0], source.tokenizers[0]
    init = te.get_input_embeddings().weight[tok("pattern", add_special_tokens=False).input_ids[0]]
    assert not torch.allclose(tensors["emb_params"].float(), init.expand(2, -1))
    assert all(torch.isfinite(torch.tensor(x)) for x in trainer.result.losses)


# fp8 and the weights DDP leaves out are ours on torch, the same in both core venvs; two
# processes under the oldest accelerate: test_distributed
@pytest.mark.once
@pytest.mark.slow
def test_two_processes_train_on_an_fp8_base(tiny_source, instance_dir, tmp_path):
    """DDP sends a model's weights between processes when it wraps it, which gloo can't do for
    fp8: the stored weights are left out (they are the same on every process)."""
    import os
    import subprocess
    import sys

    from patience import deadline
    cfg = TrainingConfig(
        model_name="two", source_checkpoint=str(tiny_source), work_dir=str(tmp_path / "runs"),
        output_dir=str(tmp_path / "out"), lora_dir=str(tmp_path / "Lora"), resolution=64,
        center_crop=True, steps_per_image=1, method="lora", lora_rank=4, fp8_base=True,
        concepts=(Concept(str(instance_dir), "photo of sks pattern"),))
    (tmp_path / "two.json").write_text(cfg.to_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dreambooth", "train", "--config", str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=deadline(100))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "Lora" / "two_2.safetensors").is_file()


@pytest.mark.once
def test_a_cpu_layer_looks_its_weight_up_bit_for_bit_as_the_conversion_makes_it():
    """On a CPU each fp8 byte is looked up among the 256 values the conversion makes (6x
    faster there): every code (both NaNs, both zeros, the subnormals) in every compute dtype
    and at several scales gives the bits the conversion gives, and a layer's output and input
    gradient through the table are those of the conversion (a GPU's path: no table)."""
    codes = (torch.randperm(256 * 12, generator=torch.Generator().manual_seed(0)) % 256)
    for amax in (448.0, 5.3, 0.0371):  # scale 1, and two of SD's weights' sizes
        layer, plain = nn.Linear(64, 48), nn.Linear(64, 48, device="meta")
        fp8.place(layer, torch.device("cpu"), torch.float32)
        fp8.place(plain, torch.device("meta"), torch.float32)
        assert plain._fp8_tables is None  # placed elsewhere than a CPU: converted, not looked up
        layer.weight.data = codes[:48 * 64].to(torch.uint8).view(fp8.FP8).reshape(48, 64)
        layer.weight_scale.fill_(amax / fp8.FP8_MAX)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            table = fp8.tables(layer, dtype)
            assert table.dtype == dtype and table.shape == (256,)
            looked_up = fp8.upcast(layer.weight, layer.weight_scale, dtype, table)
            converted = fp8.upcast(layer.weight, layer.weight_scale, dtype)
            bits = {1: torch.int8, 2: torch.int16, 4: torch.int32}[converted.element_size()]
            assert torch.equal(looked_up.view(bits), converted.view(bits))
            assert looked_up.isnan().sum() == (codes[:48 * 64] % 128 == 127).sum()
        finite = codes[:48 * 64] % 127 + 128 * (codes[:48 * 64] // 128)  # no NaN code
        layer.weight.data = finite.to(torch.uint8).view(fp8.FP8).reshape(48, 64)
        x = torch.randn(3, 5, 64, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.float().square().sum().backward()
        got, x.grad = (out, x.grad), None
        layer._fp8_tables = None  # the conversion, as on a GPU
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.float().square().sum().backward()
        assert torch.equal(got[0].view(torch.int16), out.view(torch.int16))
        assert torch.equal(got[1], x.grad) and got[1].isfinite().all()
