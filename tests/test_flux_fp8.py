"""fp8_base for a Flux LoRA: the frozen transformer's Linear weights stored in fp8 (per-weight
scale), an fp8 file's weights kept as the file has them, the text encoders in bf16 on a GPU at
most and off it once the prompts are cached; a tiny Flux trains on it, saves its LoRA, and its
loss is close to the full-precision run's."""
from types import SimpleNamespace

import pytest
import torch

from dreambooth.config import events as ev
from dreambooth.training import flow, fp8, flux_lora
from dreambooth.training.trainer import Trainer
from test_flux import flux_config, tiny_flux  # noqa: F401 (the session's tiny Flux)


@pytest.fixture(scope="module")
def flux_files(tiny_flux, tmp_path_factory):
    """The session's tiny FLUX.1-dev files, and its transformer again as an all-in-one fp8
    file."""
    from safetensors.torch import load_file, save_file
    path = tmp_path_factory.mktemp("tiny_flux_fp8") / "flux1-dev-fp8.safetensors"
    bfl = load_file(tiny_flux["source_checkpoint"])
    save_file({"model.diffusion_model." + k: v.to(fp8.FP8) for k, v in bfl.items()}, str(path))
    return tiny_flux, str(path)


def _train(files, instance_dir, tmp_path, name, **changes):
    settings = dict(steps_per_image=1, batch_size=2, log_every_steps=1, seed=3)
    cfg = flux_config(files, instance_dir, tmp_path, model_name=name, **{**settings, **changes})
    events = []
    trainer = Trainer(cfg.check(), ev.EventBus(events.append), ev.CancelToken())
    return trainer, trainer.run(), events


def _base_linears(transformer) -> list:
    return [m for path, m in transformer.named_modules()
            if fp8.storable(path, m) and type(m) is torch.nn.Linear]


@pytest.mark.once
def test_flux_lora_trains_on_an_fp8_base(flux_files, instance_dir, tmp_path):
    """Two steps on an fp8 base: every frozen Linear of the transformer is fp8 with its scale,
    the LoRA layers fp32 and trained, the LoRA file in kohya's layout; the losses within 5% of
    the same run's on the full-precision base (the weights differ by fp8's rounding only)."""
    files, _ = flux_files
    plain_trainer, plain, _ = _train(files, instance_dir, tmp_path / "a", "plain")
    trainer, stored, events = _train(files, instance_dir, tmp_path / "b", "fp8", fp8_base=True)
    unet = trainer.comp.unet
    linears = _base_linears(unet)
    assert linears and all(m.weight.dtype == fp8.FP8 and fp8.is_stored(m) for m in linears)
    assert not any(fp8.is_stored(m) for m in _base_linears(plain_trainer.comp.unet))
    lora = [p for n, p in unet.named_parameters() if ".lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert any("transformer's" in e.text and "fp8" in e.text for e in events
               if isinstance(e, ev.Message))
    assert stored.path.is_file() and stored.path.parent == tmp_path / "b" / "Lora"
    from dreambooth.model.filecheck import read_layout
    assert read_layout(stored.path)[0] == flux_lora.expected_layout(trainer.comp, trainer.cfg)
    assert len(stored.losses) == len(plain.losses) == 2
    for a, b in zip(stored.losses, plain.losses):
        assert abs(a / b - 1) < 0.05, (stored.losses, plain.losses)


@pytest.mark.once
def test_an_fp8_file_is_stored_as_it_is(flux_files, instance_dir, tmp_path):
    """A transformer read from an fp8 file goes to the fp8 storage without a full-precision
    copy: its weights are the file's own bytes with scale 1, so a run on it computes exactly
    what the run that upcasts the same file computes (the first step; the LoRA layers over fp8
    weights are initialised afresh in fp32, lora._fp32_over_fp8, so the second differs a
    little)."""
    from safetensors.torch import load_file
    from dreambooth.model import flux_keys
    from dreambooth.model.flux import load_flux
    files, fp8_file = flux_files
    comp = load_flux(SimpleNamespace(**{**files, "source_checkpoint": fp8_file,
                                        "model_type": "flux-dev"}), dtype=None)
    fp8.place(comp.unet, torch.device("cpu"), torch.bfloat16)
    expected = flux_keys.to_diffusers({k.split(".", 2)[2]: v
                                       for k, v in load_file(fp8_file).items()})
    for path, m in comp.unet.named_modules():
        if fp8.is_stored(m):
            assert m.weight_scale.item() == 1.0
            assert torch.equal(m.weight.view(torch.uint8),
                               expected[path + ".weight"].view(torch.uint8)), path
    on_file = {**files, "source_checkpoint": fp8_file}
    _, upcast, _ = _train(on_file, instance_dir, tmp_path / "a", "upcast")
    _, kept, _ = _train(on_file, instance_dir, tmp_path / "b", "kept", fp8_base=True)
    assert kept.losses[0] == pytest.approx(upcast.losses[0], rel=1e-6)
    assert kept.losses[1] == pytest.approx(upcast.losses[1], rel=0.01)  # (LoRA drawn afresh)


@pytest.mark.once
def test_flux_text_encoders_run_in_bf16_on_a_gpu_and_leave_it_once_cached():
    """On a GPU Flux's (and SD3.5's) frozen text encoders are placed in bf16 (T5-XXL in fp32 is
    17.7 GiB), and
    they are among the modules parked off the GPU once the prompts are cached; on the CPU, and
    for SD's encoders and every VAE, fp32 as before."""
    te, te2, vae = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)

    def comp(family):
        from dreambooth.model.spec import spec_for
        model_type = {"flux": "flux-dev", "sd3": "sd3.5-large", "sdxl": "sdxl"}[family]
        return SimpleNamespace(spec=spec_for(model_type), text_encoders=[te, te2], vae=vae)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert flow.frozen_dtype(comp("flux"), te2, gpu) == torch.bfloat16
    assert flow.frozen_dtype(comp("flux"), te, gpu) == torch.bfloat16
    assert flow.frozen_dtype(comp("flux"), vae, gpu) == torch.float32
    assert flow.frozen_dtype(comp("flux"), te2, cpu) == torch.float32
    assert flow.frozen_dtype(comp("sd3"), te2, gpu) == torch.bfloat16  # SD3.5's T5 too
    assert flow.frozen_dtype(comp("sdxl"), te2, gpu) == torch.float32
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = SimpleNamespace(cache_latents=True, trains_text_encoder=False)
    trainer.comp = comp("flux")
    assert trainer.frozen_modules() == [vae, te, te2]


@pytest.mark.once
def test_flux_previews_come_from_cached_prompt_states(flux_files, instance_dir, tmp_path):
    """A Flux preview is drawn from the prompt's states cached with the training prompts', T5
    left where it was parked (it would not fit beside the transformer on a 16 GB card): T5
    never runs for it, and the image is the one the pipeline draws from the prompt itself."""
    import numpy as np
    from PIL import Image
    from dreambooth.data.sampling import (generate_images, make_pipeline, preview_prompt,
                                          sample_settings)
    files, _ = flux_files
    trainer, _, _ = _train(files, instance_dir, tmp_path, "previews", batch_size=1,
                           sample_steps=2)
    comp, cfg = trainer.comp, trainer.cfg
    assert flow.preview_modules(comp, trainer.frozen_modules()) == [comp.vae, comp.text_encoder]
    calls = []
    comp.text_encoder_2.register_forward_hook(lambda *a: calls.append(1))
    events = []
    trainer.saver.emit = events.append
    trainer.sample(2)
    assert calls == [] and [type(e).__name__ for e in events] == ["SampleSaved"]
    prompt = preview_prompt(cfg.concepts[0])
    pipe = make_pipeline(comp, unet=comp.unet, text_encoder=comp.text_encoder)
    guidance, extra = sample_settings(comp, cfg.guidance_scale)
    drawn = [np.asarray(Image.open(generate_images(
        pipe, prompt, 1, tmp_path / name, "x", 0, cfg.resolution, 2, guidance, cfg.seed,
        extra=extra, embeds=embeds)[0])) for name, embeds in
        (("cached", trainer.feed.embeddings[prompt]), ("prompt", None))]
    assert calls == [1]  # (the second, from the prompt)
    assert np.array_equal(*drawn)
    assert np.array_equal(drawn[0], np.asarray(Image.open(events[0].path)))


def class_images_from_states(cfg, monkeypatch, tmp_path, t5_name: str) -> None:
    """Set a run up (its missing class images made): T5 never runs once they are begun, and each class image is the one the pipeline draws from the class prompt itself."""
    import numpy as np
    from PIL import Image
    from dreambooth.data.sampling import generate_images, make_pipeline, sample_settings
    from dreambooth.data import feed
    from dreambooth.training import trainer as trainer_module
    calls, load, ensure = [], trainer_module.load_model, feed.ensure_class_images

    def hooked(*args, **kwargs):
        comp, revision = load(*args, **kwargs)
        getattr(comp, t5_name).register_forward_hook(lambda *a: calls.append("t5"))
        comp.unet.register_forward_hook(lambda *a: calls.append("transformer"))
        return comp, revision
    monkeypatch.setattr(trainer_module, "load_model", hooked)
    monkeypatch.setattr(feed, "ensure_class_images",
                        lambda *a, **k: calls.append("generate") or ensure(*a, **k))
    trainer = Trainer(cfg.check(), ev.EventBus(lambda e: None), ev.CancelToken())
    trainer.setup()
    start = calls.index("generate")  # (T5 ran before, for the prompts' states)
    assert "t5" in calls[:start] and "transformer" in calls and "t5" not in calls[start:]
    made = [it.path for it in trainer.feed.class_items[0]]
    comp, concept = trainer.comp, cfg.concepts[0]
    assert len(made) == 2 and all(p.name == f"class_{k:05d}.png" for k, p in enumerate(made))
    guidance, extra, seen = *sample_settings(comp, cfg.guidance_scale), len(calls)
    drawn = generate_images(make_pipeline(comp), concept.class_prompt, 2, tmp_path / "prompt",
                            "x", 0, cfg.resolution, cfg.class_generation_steps, guidance,
                            cfg.seed, extra=extra)
    assert "t5" in calls[seen:]  # (the pipeline's own encoding: the hook sees T5 run)
    for a, b in zip(made, drawn):  # (SD3.5's pooled states, encoded one prompt at a time for
        # the cache, two at a time by the pipeline, may differ by a float32 ulp: a pixel by 1)
        diff = np.asarray(Image.open(a)).astype(int) - np.asarray(Image.open(b)).astype(int)
        assert np.abs(diff).max() <= 1 and np.count_nonzero(diff) <= diff.size // 100


@pytest.mark.once
def test_flux_class_images_come_from_cached_prompt_states(flux_files, tmp_path, monkeypatch):
    """Prior preservation on a small GPU: the class prompt's states are cached before the
    transformer comes to the device and T5 leaves it (flow.ready_to_generate), so the missing
    class images are drawn without T5, the same images as from the prompt."""
    from dreambooth import Concept
    from dreambooth.model.tiny import write_images
    files, _ = flux_files
    write_images(tmp_path / "inst", "checker", 2)
    concept = Concept(str(tmp_path / "inst"), "photo of sks dog", class_prompt="photo of a dog",
                      class_images_per_instance=1)
    cfg = flux_config(files, None, tmp_path, concepts=(concept,), class_generation_steps=2)
    class_images_from_states(cfg, monkeypatch, tmp_path, "text_encoder_2")
