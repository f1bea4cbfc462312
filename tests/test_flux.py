"""Flux.1 LoRA: a tiny Flux in the files Forge users have (BFL transformer, clip_l, t5xxl, ae, a
T5 tokenizer folder) detected, loaded and trained end to end; its file in kohya's Flux layout
read by diffusers' own kohya reader; at full size, the BFL key map checked against diffusers'
converter and the LoRA's every key against diffusers' reader."""
from types import SimpleNamespace

import pytest
from flow_helpers import FLUX_FULL, flow_lora_config
import torch

from dreambooth import Concept, TrainingConfig
from dreambooth.config.errors import ConfigError
from dreambooth.model import flux_keys
from dreambooth.model.detect import detect_model_type, flux_type
from dreambooth.model.tiny_flux import make_tiny_flux
from dreambooth.training import flux_lora
from dreambooth.training.lora import lora_pairs



@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A tiny FLUX.1-dev's files, built once per session (read them, never change them)."""
    return make_tiny_flux(tmp_path_factory.mktemp("tiny_flux"), "flux-dev")


def flux_config(files, instance_dir, tmp_path, **changes) -> TrainingConfig:
    return flow_lora_config("flux-dev", files, instance_dir, tmp_path, **changes)


@pytest.mark.once
def test_flux_types_are_told_from_the_keys():
    dev = {"double_blocks.0.img_attn.norm.key_norm.scale": 0, "guidance_in.in_layer.weight": 0}
    schnell = {"double_blocks.0.img_attn.norm.key_norm.scale": 0}
    assert flux_type(dev) == detect_model_type(dev) == "flux-dev"
    assert flux_type(schnell) == detect_model_type(schnell) == "flux-schnell"
    prefixed = {"model.diffusion_model." + k: v for k, v in dev.items()}
    assert detect_model_type(prefixed) == "flux-dev"
    assert flux_type({"model.diffusion_model.input_blocks.0.0.weight": 0}) is None


@pytest.mark.once
def test_headless_run_without_t5_tokenizer_refuses_before_loading(tiny_flux, instance_dir,
                                                                   tmp_path):
    from dreambooth.training.trainer import train
    cfg = flux_config({**tiny_flux, "t5_tokenizer_dir": ""}, instance_dir, tmp_path)
    with pytest.raises(ConfigError) as e:
        train(cfg)
    problems = {p.field: p for p in e.value.problems}
    assert set(problems) == {"t5_tokenizer_dir"}
    assert "none is downloaded" in problems["t5_tokenizer_dir"].why
    not_yet = flux_config(tiny_flux, instance_dir, tmp_path, method="dreambooth",
                          fp8_base=True).validate()
    assert {p.field for p in not_yet} == {"method", "fp8_base"}


@pytest.fixture(scope="module")
def full_meta():
    """A full-size FLUX.1-dev transformer on the meta device (shapes, no memory)."""
    from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        return FluxTransformer2DModel(**FLUX_FULL)


def thin_bfl(meta) -> dict:
    """Its BFL keys, each tensor one column whose rows count up (each tensor from its own
    start): the rows' order is what the converters change, at a few MB."""
    shapes = flux_keys.to_bfl(meta.state_dict(), 19, 38, True)
    return {k: torch.arange(v.shape[0], dtype=torch.float64)[:, None] + i * 1e6
            for i, (k, v) in enumerate(sorted(shapes.items()))}


def test_key_map_is_diffusers_converter_at_full_size(full_meta):
    from diffusers.loaders.single_file_utils import \
        convert_flux_transformer_checkpoint_to_diffusers as theirs
    bfl = thin_bfl(full_meta)
    ours = flux_keys.to_diffusers(dict(bfl))
    given = {"model.diffusion_model." + k: v for k, v in bfl.items()}
    expected = theirs(given)
    assert given == {}  # it used every key ours wrote
    assert set(ours) == set(expected)
    assert all(torch.equal(ours[k], expected[k]) for k in ours)
    assert {k: v.shape[0] for k, v in full_meta.state_dict().items()} == \
        {k: v.shape[0] for k, v in ours.items()}
    back = flux_keys.to_bfl(ours, 19, 38, True)
    assert set(back) == set(bfl) and all(torch.equal(back[k], bfl[k]) for k in bfl)
    assert flux_keys.transformer_config(bfl)["axes_dims_rope"] == [16, 56, 56]


def reader_deltas(kohya: dict) -> dict:
    """diffusers' own kohya Flux reader: module -> (lora_A, lora_B), alpha / rank folded in.
    A key it has no use for (any but a text encoder's) raises ValueError there."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    read = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    out = {}
    for key, value in read.items():
        module, _, part = key.removeprefix("transformer.").rpartition(".lora_")
        out.setdefault(module, {})[part] = value
    return {m: (p["A.weight"], p["B.weight"]) for m, p in out.items()}


def random_peft_state(module, targets: str, rank: int) -> dict:
    state = {}
    for path in flux_lora.target_paths(module, targets):
        rows, cols = module.get_submodule(path).weight.shape
        state[f"{path}.lora_A.default.weight"] = torch.randn(rank, cols)
        state[f"{path}.lora_B.default.weight"] = torch.randn(rows, rank)
    return state


def forge_key_map(bfl: dict) -> dict:
    """Forge's map (dfdcbab6, packages_3rdparty/comfyui_lora_collection/lora.py
    model_lora_keys_unet) onto its Flux model, whose module names are BFL's
    (backend/nn/flux.py): 'lora_unet_' + each weight's module path with '_' for '.'."""
    return {"lora_unet_" + k[:-len(".weight")].replace(".", "_"): k for k in bfl
            if k.endswith(".weight")}


def test_kohya_file_is_read_by_diffusers_and_mapped_by_forge_at_full_size(full_meta):
    """Every module of a full-size Flux.1-dev's LoRA: diffusers' reader uses every key and
    gives each module the update it trained (up @ down x alpha / rank); Forge's key map takes
    every stem to a weight of up @ down's shape, and its loader reads each stem's three keys."""
    meta = full_meta
    torch.manual_seed(0)
    state = random_peft_state(meta, "transformer", 1)
    comp = SimpleNamespace(configs={"unet": dict(meta.config)})
    cfg = SimpleNamespace(lora_alpha=2.0, lora_rank=1, lora_targets="transformer")
    kohya = flux_lora.kohya_state(comp, cfg, lora_pairs(state))
    layout = flux_lora.expected_layout(comp, cfg)
    assert {k: tuple(v.shape) for k, v in kohya.items()} == layout
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in layout
    assert "lora_unet_single_blocks_37_linear1.lora_up.weight" in layout
    bfl = flux_keys.to_bfl(meta.state_dict(), 19, 38, True)
    forge = forge_key_map(bfl)
    stems = {k.split(".")[0] for k in kohya}
    assert set(kohya) == {f"{s}.{leaf}" for s in stems
                          for leaf in ("lora_down.weight", "lora_up.weight", "alpha")}
    for stem in stems:
        shape = (kohya[f"{stem}.lora_up.weight"].shape[0],
                 kohya[f"{stem}.lora_down.weight"].shape[1])
        assert tuple(bfl[forge[stem]].shape) == shape, stem
    read = reader_deltas(kohya)
    assert set(read) == set(flux_lora.target_paths(meta, "transformer"))
    probe = torch.randn(3072, 2)
    for module, (a, b) in read.items():
        down = state[f"{module}.lora_A.default.weight"]
        up = state[f"{module}.lora_B.default.weight"]
        x = probe if down.shape[1] == 3072 else torch.randn(down.shape[1], 2)
        torch.testing.assert_close(b @ (a @ x), 2.0 * up @ (down @ x), rtol=1e-5, atol=1e-4)


def trained_deltas(unet, alpha: float) -> dict:
    """module path -> the update its trained peft LoRA makes (B @ A x alpha / rank)."""
    return {path: up.float() @ down.float() * alpha / down.shape[0]
            for path, (down, up) in lora_pairs(unet.state_dict()).items()}


def test_tiny_flux_trains_end_to_end_offline(tiny_flux, instance_dir, tmp_path, no_network):
    """Detected from its file, loaded from the four files and the tokenizer folder, its class
    images made with FluxPipeline, trained two steps on the flow objective with prior
    preservation, a preview made: a kohya Flux LoRA in lora_dir with exactly its layout whose
    every stem applied as the hosts do (up @ down x alpha / rank on BFL's stacked rows) is the
    trained update; the double blocks read by diffusers' own reader give the trained update
    too (its single blocks assume Flux.1's real width: proven at full size above)."""
    from safetensors.torch import load_file
    from dreambooth.config import events as ev
    from dreambooth.host.interface import sniff_model_type
    from dreambooth.model.filecheck import read_layout
    from dreambooth.training.trainer import Trainer
    assert sniff_model_type(tiny_flux["source_checkpoint"]) == "flux-dev"
    concept = Concept(str(instance_dir), "photo of sks dog", "photo of a dog",
                      class_images_per_instance=1)
    cfg = flux_config(tiny_flux, instance_dir, tmp_path, steps_per_image=1, batch_size=2,
                      gradient_checkpointing=True, concepts=(concept,), class_generation_steps=2,
                      sample_every_epochs=1, sample_steps=2, attention="default")
    events = []
    trainer = Trainer(cfg.check(), ev.EventBus(events.append), ev.CancelToken())
    result = trainer.run()
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    said = [e.text for e in events if isinstance(e, ev.Message) and e.level == "warning"]
    assert any("Memory attention 'default' is for SD's UNet" in t for t in said), said
    assert len(list((cfg.model_dir / "class_images").rglob("*.png"))) == 4
    assert [e.step for e in events if isinstance(e, ev.SampleSaved)] == [2]
    assert result.path.parent == tmp_path / "Lora"
    shapes, _, meta = read_layout(result.path)
    assert shapes == flux_lora.expected_layout(trainer.comp, cfg)
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_dim"] == "2"
    assert meta["ss_model_prediction_type"] == "raw" and meta["ss_weighting_scheme"] == "none"
    lora, trained = load_file(str(result.path)), trained_deltas(trainer.comp.unet, 4.0)
    assert lora["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 12.0
    assert all(d.abs().sum() > 0 for d in trained.values())  # every layer learnt
    stems: dict = {}
    for path, (stem, part, _) in flux_keys.lora_names(1, 1).items():
        if path in trained:
            stems.setdefault(stem, {})[part] = trained[path]
    for stem, parts in stems.items():
        down, up = lora[f"{stem}.lora_down.weight"], lora[f"{stem}.lora_up.weight"]
        host = up @ down * lora[f"{stem}.alpha"].item() / down.shape[0]
        torch.testing.assert_close(host, torch.cat([parts[i] for i in sorted(parts)]))
    read = reader_deltas({k: v for k, v in lora.items() if "_double_blocks_" in k})
    assert set(read) == {p for p in trained if p.startswith("transformer_blocks.")}
    for path, (a, b) in read.items():
        torch.testing.assert_close(b @ a, trained[path])


@pytest.mark.once
def test_tiny_flux_schnell_learns(tmp_path_factory, instance_dir, tmp_path):
    """schnell (no guidance embedding), 40 steps: the last quarter's loss is well below that of
    the same run with the learning rate 0 (the same images, noise and timesteps)."""
    files = make_tiny_flux(tmp_path_factory.mktemp("tiny_schnell"), "flux-schnell")
    from dreambooth.training.trainer import train

    def late_loss(lr: float, name: str) -> float:
        cfg = flux_config(files, instance_dir, tmp_path, model_type="flux-schnell",
                          model_name=name, steps_per_image=10, lora_rank=4,
                          lora_learning_rate=lr, log_every_steps=1, seed=1)
        losses = train(cfg.check()).losses
        assert len(losses) == 40
        return sum(losses[30:]) / 10
    trained, frozen = late_loss(1e-2, "trained"), late_loss(0.0, "frozen")
    assert trained < 0.85 * frozen


def test_an_fp8_all_in_one_prefixed_transformer_loads(tiny_flux, tmp_path):
    """Forge/ComfyUI's fp8 files, keys under 'model.diffusion_model.': detected and loaded as
    stored (upcast when placed), each weight the file's."""
    from safetensors.torch import load_file, save_file
    from dreambooth.host.interface import sniff_model_type
    from dreambooth.model.flux import load_flux
    bfl = load_file(tiny_flux["source_checkpoint"])
    fp8 = {"model.diffusion_model." + k: v.to(torch.float8_e4m3fn) for k, v in bfl.items()}
    path = tmp_path / "flux1-dev-fp8.safetensors"
    save_file(fp8, str(path))
    assert sniff_model_type(path) == "flux-dev"
    comp = load_flux(SimpleNamespace(**{**tiny_flux, "source_checkpoint": str(path),
                                        "model_type": "flux-dev"}), dtype=None)
    state = comp.unet.state_dict()
    assert all(v.dtype == torch.float8_e4m3fn for v in state.values())
    expected = flux_keys.to_diffusers({k.split(".", 2)[2]: v for k, v in fp8.items()})
    assert all(torch.equal(state[k].float(), v.float()) for k, v in expected.items())
    with pytest.raises(Exception, match="is a flux-dev checkpoint, but the model type is set to "
                                        "flux-schnell"):
        load_flux(SimpleNamespace(**{**tiny_flux, "model_type": "flux-schnell"}))
    scaled = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"  # ComfyUI's: weights x scales
    save_file({**load_file(tiny_flux["flux_t5xxl"]), "scaled_fp8": torch.zeros(0)}, str(scaled))
    with pytest.raises(Exception, match="is a scaled fp8 file"):
        load_flux(SimpleNamespace(**{**tiny_flux, "flux_t5xxl": str(scaled),
                                     "model_type": "flux-dev"}))


@pytest.mark.once
def test_a_cancelled_flux_run_resumes_where_it_stopped(tiny_flux, instance_dir, tmp_path):
    """Cancelled after step 3 (its state saved), the next run goes on at step 4 with the very
    losses the uninterrupted run has there."""
    from dreambooth.config import events as ev
    from dreambooth.training.trainer import train
    whole = train(flux_config(tiny_flux, instance_dir, tmp_path / "a", log_every_steps=1,
                              steps_per_image=2).check())
    cfg = flux_config(tiny_flux, instance_dir, tmp_path / "b", log_every_steps=1,
                      steps_per_image=2, state_every_steps=2)
    cancel = ev.CancelToken()
    first = train(cfg.check(), lambda e: isinstance(e, ev.Step) and e.step == 3
                  and cancel.cancel(), cancel)
    assert first.cancelled and first.steps == 3
    rest = train(cfg)
    assert rest.steps == 8 and rest.losses == whole.losses[3:]


def test_configs_from_real_size_files(full_meta):
    """Each part's config read off the shapes of full-size files (meta tensors: no memory):
    FLUX.1-dev's transformer, CLIP-L, T5-XXL (v1.1), the 16-channel autoencoder."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    from dreambooth import assets
    from dreambooth.model import convert, flux
    from dreambooth.model.components import te_state
    bfl = {"model.diffusion_model." + k: v
           for k, v in flux_keys.to_bfl(full_meta.state_dict(), 19, 38, True).items()}
    got = flux_keys.transformer_config(bfl)
    assert {k: got[k] for k in FLUX_FULL} == {**FLUX_FULL, "axes_dims_rope": [16, 56, 56]}
    clip = {k: v for k, v in assets.load_config("v1x", "text_encoder").items()
            if k not in ("architectures", "model_type")}
    xxl = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
    ae = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              use_quant_conv=False, use_post_quant_conv=False)
    with torch.device("meta"):
        clip_state = te_state(CLIPTextModel(CLIPTextConfig(**clip)))
        t5_state = T5EncoderModel(T5Config(**xxl, is_encoder_decoder=False)).state_dict()
        ae_model = AutoencoderKL(**ae)
    assert flux.clip_config(clip_state) == clip
    assert {k: flux.t5_config(t5_state)[k] for k in xxl} == xxl
    ldm = convert.to_ldm(ae_model.state_dict(), convert.vae_prefix_map(dict(ae_model.config)),
                         "", vae=True)
    assert {k: flux.ae_config(ldm)[k] for k in ae} == ae
    full = flux.full_size_configs("flux-dev")  # what the estimate and the profile count
    assert {k: full["unet"][k] for k in FLUX_FULL} == {**FLUX_FULL, "axes_dims_rope": [16, 56, 56]}
    assert full["text_encoder"] == clip and {k: full["text_encoder_2"][k] for k in xxl} == xxl
    assert {k: full["vae"][k] for k in ae} == ae
    assert not flux.full_size_configs("flux-schnell")["unet"]["guidance_embeds"]


def test_flow_maths_against_independent_sums():
    """Packing (each 2x2 patch one token, channels first), the ids, the shift, and the loss:
    the noisy input and the velocity target computed here by hand."""
    from dreambooth.training import flow
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6)
    tokens = flow.pack(x)
    assert tokens.shape == (2, 6, 12)
    for r in range(2):
        for c in range(3):
            patch = [x[1, ch, 2 * r + i, 2 * c + j] for ch in range(3) for i in (0, 1)
                     for j in (0, 1)]
            assert torch.equal(tokens[1, r * 3 + c], torch.stack(patch))
    assert torch.equal(flow.unpack(tokens, 4, 6), x)
    from diffusers import FluxPipeline  # the pipeline packs the same way
    assert torch.equal(FluxPipeline._pack_latents(x, 2, 3, 4, 6), tokens)
    assert flow.image_ids(4, 6, "cpu")[4].tolist() == [0.0, 1.0, 1.0]
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(flow.shifted(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(flow.shifted(t, 1.0), t)
    seen = {}

    def transformer(hidden_states, timestep, guidance=None, **kw):
        seen.update(hidden=hidden_states, t=timestep, guidance=guidance, **kw)
        return (torch.zeros_like(hidden_states),)
    noise, sigmas = torch.randn_like(x), torch.tensor([0.2, 0.9])
    cond = {"hidden": torch.randn(2, 5, 8), "pooled": torch.randn(2, 4)}
    total, inst, prior = flow.flow_loss(transformer, x, cond, noise, sigmas, 1, 0.5, 3.5)
    noisy = torch.stack([(1 - s) * x[i] + s * noise[i] for i, s in enumerate(sigmas.tolist())])
    assert torch.allclose(flow.unpack(seen["hidden"], 4, 6), noisy)
    assert seen["guidance"].tolist() == [3.5, 3.5] and seen["txt_ids"].shape == (5, 3)
    per_sample = ((noise - x) ** 2).mean(dim=(1, 2, 3))  # the prediction was 0
    assert torch.allclose(inst, per_sample[0]) and torch.allclose(prior, per_sample[1])
    assert torch.allclose(total, per_sample[0] + 0.5 * per_sample[1])


@pytest.mark.once  # our resume check
def test_a_new_part_file_in_the_hosts_list_does_not_block_an_sd_runs_resume():
    """The tab fills flux_* / sd35_* from the host's list for every new model: a file added
    there later changes those guesses, which only a run of that family reads."""
    from dreambooth.training.state import config_differences
    sd = TrainingConfig(flux_t5xxl="/m/t5xxl_fp16.safetensors", sd35_clip_g="/m/clip_g.st")
    later = sd.replace(flux_t5xxl="", sd35_clip_g="/m/other.st", t5_tokenizer_dir="/t")
    assert config_differences(sd.to_dict(), later.to_dict()) == []
    flux = sd.replace(model_type="flux-dev")
    assert config_differences(flux.to_dict(), later.replace(model_type="flux-dev").to_dict()) \
        == ["flux_t5xxl: '/m/t5xxl_fp16.safetensors' -> ''", "t5_tokenizer_dir: '' -> '/t'"]
    sd35 = sd.replace(model_type="sd3.5-large")
    assert config_differences(sd35.to_dict(), later.replace(model_type="sd3.5-large").to_dict()) \
        == ["sd35_clip_g: '/m/clip_g.st' -> '/m/other.st'", "t5_tokenizer_dir: '' -> '/t'"]


@pytest.mark.once  # our own check, before anything loads
def test_a_part_file_of_a_kind_not_read_here_is_refused_naming_the_field(tmp_path):
    gguf = tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    for model_type, field in (("flux-dev", "flux_t5xxl"), ("sd3.5-large", "sd35_t5xxl")):
        problems = TrainingConfig(model_type=model_type, method="lora",
                                  **{field: str(gguf)}).validate()
        said = [p for p in problems if p.field == field]
        assert said and ".gguf" in said[0].why and ".safetensors" in said[0].fix, problems


@pytest.mark.once  # our own checks of the files' keys
def test_a_part_file_of_another_kind_is_said_naming_its_field(tiny_flux):
    from dreambooth.config.errors import CheckpointError
    from dreambooth.model.flux import load_flux
    files = {k: v for k, v in tiny_flux.items()}
    for field, other, kind in (("flux_ae", "flux_clip_l", "Flux autoencoder"),
                               ("flux_t5xxl", "flux_ae", "T5-XXL"),
                               ("flux_clip_l", "flux_t5xxl", "CLIP-L")):
        with pytest.raises(CheckpointError, match=f"not a {kind}.*{field}"):
            load_flux(SimpleNamespace(**{**files, field: files[other], "model_type": "flux-dev"}))
