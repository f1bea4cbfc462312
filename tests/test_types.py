"""Every model type (v1x, v2x-512, v2x-768-v, sdxl): single file <-> diffusers both ways, bit
for bit; the full-size key layout against the committed reference lists and the public key
names; the OpenCLIP text towers against an independent forward; detection and refusals; the
WebUI's yaml; metadata, hash and the post-save check; training each new family end to end."""
import gzip
import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from dreambooth import CheckpointError, Concept, train
from dreambooth.model.checkpoint import read_checkpoint
from dreambooth.model.components import build_meta, te_state
from dreambooth.model.detect import check_model_type, detect_model_type
from dreambooth.model.ldm_yaml import needs_yaml, render
from dreambooth.model.openclip import from_openclip, to_openclip
from dreambooth.model.single_file import ldm_state, load_single_file, save_single_file
from dreambooth.model.spec import SPECS
from dreambooth.model.workdir import load_working_dir, save_working_dir

TYPES = ["v1x", "v2x-512", "v2x-768-v", "sdxl"]
DATA = Path(__file__).parent / "data"
TITLES = {n: s.title for n, s in SPECS.items()}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return {t: tiny_checkpoints(t) for t in TYPES}


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# -- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", TYPES)
def test_single_file_to_diffusers_to_single_file_is_bit_identical(model_type, tiny, tmp_path,
                                                                  no_network):
    original, _ = read_checkpoint(tiny[model_type])
    comp = load_single_file(str(tiny[model_type]), model_type)
    assert_same(original, read_checkpoint(save_single_file(comp, tmp_path / "a.safetensors"))[0])
    folder = save_working_dir(comp, tmp_path / "diffusers")
    back = load_working_dir(folder)
    assert_same(original, read_checkpoint(save_single_file(back, tmp_path / "b.safetensors"))[0])


@pytest.mark.parametrize("model_type", ["v2x-512", "sdxl"])
def test_the_diffusers_folder_loads_in_diffusers_with_the_same_weights(model_type, tiny, tmp_path,
                                                                       no_network):
    from diffusers import DiffusionPipeline
    comp = load_single_file(str(tiny[model_type]), model_type)
    pipe = DiffusionPipeline.from_pretrained(str(save_working_dir(comp, tmp_path / "d")),
                                             local_files_only=True)
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if model_type == "sdxl"
                                   else "StableDiffusionPipeline")
    for name in ("unet", "vae"):
        theirs = getattr(pipe, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(comp, name).state_dict().items())
    for slot in comp.spec.text_encoders:
        assert_same(te_state(getattr(comp, slot.component)),
                    te_state(getattr(pipe, slot.component)))
        tokenizer = getattr(pipe, slot.component.replace("text_encoder", "tokenizer"))
        assert tokenizer.pad_token == (slot.pad_token or "<|endoftext|>")  # OpenCLIP pads with !


def test_sd2_keeps_the_unused_last_text_layer_bit_identical(tiny):
    """SD 2.x conditions on the penultimate layer: the diffusers model has one layer fewer than
    the file; the last layer, the projection and logit_scale travel along untouched."""
    original, _ = read_checkpoint(tiny["v2x-512"])
    comp = load_single_file(str(tiny["v2x-512"]), "v2x-512")
    assert comp.text_encoder.config.num_hidden_layers == 2
    kept = [k for k in original if ".resblocks.2." in k]
    assert len(kept) == 12 and set(kept) <= set(comp.extra)
    assert {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"} \
        <= set(comp.extra)
    assert all(torch.equal(comp.extra[k], original[k]) for k in comp.extra)


# -- the full-size layout ---------------------------------------------------------------------
def reference(model_type: str) -> dict:
    text = gzip.decompress((DATA / f"layout_{model_type}.txt.gz").read_bytes()).decode()
    rows = [line.split("\t") for line in text.splitlines() if not line.startswith("#")]
    return {k: tuple(int(d) for d in s.split(",") if d) for k, s in rows}


@pytest.mark.parametrize("model_type", TYPES)
def test_full_size_layout_equals_the_committed_reference(model_type):
    written = {k: tuple(v.shape) for k, v in ldm_state(build_meta(model_type)).items()}
    assert written == reference(model_type)


PUBLIC = {  # names and shapes every released checkpoint of the family has
    "v1x": {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight":
                (49408, 768),
            "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
            "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight":
                (1280, 768),
            "model.diffusion_model.time_embed.0.weight": (1280, 320),
            "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
            "first_stage_model.quant_conv.weight": (8, 8, 1, 1), "alphas_cumprod": (1000,)},
    "v2x-512": {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
                "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight":
                    (320, 1024),
                "cond_stage_model.model.token_embedding.weight": (49408, 1024),
                "cond_stage_model.model.positional_embedding": (77, 1024),
                "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
                "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024),
                "cond_stage_model.model.ln_final.weight": (1024,),
                "cond_stage_model.model.text_projection": (1024, 1024),
                "cond_stage_model.model.logit_scale": ()},
    "sdxl": {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
             "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight":
                 (3840, 1280),
             "conditioner.embedders.1.model.text_projection": (1280, 1280),
             "conditioner.embedders.1.model.logit_scale": (),
             "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight":
                 (77, 768),
             "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight":
                 (768, 3072),
             "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
             "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight":
                 (1280, 2048),
             "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight":
                 (1280, 5120),
             "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
             "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
             "denoiser.sigmas": (1000,)},
}
PARAMETERS = {  # published parameter counts of the components
    "v1x": {"model.diffusion_model.": 859_520_964, "first_stage_model.": 83_653_863,
            "cond_stage_model.transformer.": 123_060_480 + 77},  # + position_ids
    "v2x-512": {"model.diffusion_model.": 865_910_724, "first_stage_model.": 83_653_863},
    "sdxl": {"model.diffusion_model.": 2_567_463_684, "first_stage_model.": 83_653_863,
             "conditioner.embedders.1.model.": 694_659_840 + 1},  # + logit_scale
}


@pytest.mark.parametrize("model_type", ["v1x", "v2x-512", "sdxl"])
def test_reference_holds_the_public_names_and_parameter_counts(model_type):
    ref = reference(model_type)
    for key, shape in PUBLIC[model_type].items():
        assert ref.get(key) == shape, key
    for prefix, count in PARAMETERS[model_type].items():
        assert sum(torch.Size(s).numel() for k, s in ref.items() if k.startswith(prefix)) == count
    if model_type == "sdxl":
        assert not any(k.startswith(("cond_stage_model.", "alphas_cumprod")) for k in ref)
    if model_type == "v2x-512":  # the 24-layer OpenCLIP ViT-H text tower, 23 of them in diffusers
        assert sum(torch.Size(s).numel() for k, s in ref.items()
                   if k.startswith("cond_stage_model.") and ".resblocks.23." not in k
                   and not k.endswith(("text_projection", "logit_scale"))) == 340_387_840


# -- OpenCLIP against an independent forward ------------------------------------------------------
def openclip_forward(oc: dict, ids: torch.Tensor, layers: int, heads: int) -> torch.Tensor:
    """OpenCLIP's text tower from torch primitives: nn.MultiheadAttention takes the fused
    in_proj as it is, so the q/k/v order is checked against the real thing."""
    x = oc["token_embedding.weight"][ids] + oc["positional_embedding"]
    width, n = x.shape[-1], ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        mha = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        mha.load_state_dict({"in_proj_weight": oc[p + "attn.in_proj_weight"],
                             "in_proj_bias": oc[p + "attn.in_proj_bias"],
                             "out_proj.weight": oc[p + "attn.out_proj.weight"],
                             "out_proj.bias": oc[p + "attn.out_proj.bias"]})
        h = F.layer_norm(x, (width,), oc[p + "ln_1.weight"], oc[p + "ln_1.bias"])
        x = x + mha(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = F.layer_norm(x, (width,), oc[p + "ln_2.weight"], oc[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, oc[p + "mlp.c_fc.weight"], oc[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, oc[p + "mlp.c_proj.weight"], oc[p + "mlp.c_proj.bias"])
    return x


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["v2x-512", "sdxl"])
def test_openclip_layout_computes_what_openclip_computes(model_type, tiny):
    comp = load_single_file(str(tiny[model_type]), model_type)
    slot = comp.spec.text_encoders[-1]
    state, _ = read_checkpoint(tiny[model_type])
    oc = {k[len(slot.prefix):]: v for k, v in state.items() if k.startswith(slot.prefix)}
    te = getattr(comp, slot.component).eval()
    ids = torch.tensor([[49406, 320, 1125, 539, 48136, 49407] + [0] * 71])
    ln = lambda x: F.layer_norm(x, (x.shape[-1],), oc["ln_final.weight"], oc["ln_final.bias"])  # noqa
    heads = te.config.num_attention_heads
    if model_type == "v2x-512":  # penultimate of the file's 3 layers, then ln_final
        expected = ln(openclip_forward(oc, ids, 2, heads))
        assert torch.allclose(te(ids)[0], expected, atol=1e-5)
    else:  # SDXL: penultimate hidden state; pooled = ln_final(last)[eos] @ text_projection
        out = te(ids, output_hidden_states=True)
        assert torch.allclose(out.hidden_states[-2], openclip_forward(oc, ids, 1, heads), atol=1e-5)
        pooled = ln(openclip_forward(oc, ids, 2, heads))[0, 5] @ oc["text_projection"]
        assert torch.allclose(out[0][0], pooled, atol=1e-5)
    hf, rest = from_openclip(oc, te.config.num_hidden_layers, slot.with_projection)
    assert_same({**to_openclip(hf), **rest}, oc)


# -- detection and refusals ----------------------------------------------------------------------
@pytest.mark.parametrize("chosen", TYPES)
@pytest.mark.parametrize("found", TYPES)
def test_type_is_detected_and_a_mismatch_refused_in_words(found, chosen, tiny):
    state, meta = read_checkpoint(tiny[found])
    assert detect_model_type(state, meta) == found
    if found == chosen:
        check_model_type(state, meta, None, chosen, "x.safetensors", TITLES)
        return
    with pytest.raises(CheckpointError) as err:
        check_model_type(state, meta, None, chosen, "x.safetensors", TITLES)
    assert f"is a {found} checkpoint" in err.value.message and chosen in err.value.message
    assert err.value.hint == f"Set the model type to {found}."


def test_sd2_512_and_768_v_differ_only_by_metadata_or_yaml(tiny):
    state, _ = read_checkpoint(tiny["v2x-512"])
    for chosen in ("v2x-512", "v2x-768-v"):  # no evidence: either is taken as chosen
        check_model_type(state, {}, None, chosen, "x", TITLES)
    v_yaml = "model:\n  params:\n    parameterization: \"v\"\n"
    assert detect_model_type(state, {}, v_yaml) == "v2x-768-v"
    assert detect_model_type(state, {"modelspec.prediction_type": "v"}) == "v2x-768-v"
    eps_yaml = "model:\n  params:\n    linear_start: 0.00085\n"
    assert detect_model_type(state, {}, eps_yaml) == "v2x-512"
    with pytest.raises(CheckpointError, match="the .yaml beside it says so"):
        check_model_type(state, {}, v_yaml, "v2x-512", "x", TITLES)


@pytest.mark.parametrize("change, words", [
    (lambda s: s.update({"model.diffusion_model.input_blocks.0.0.weight":
                         torch.zeros(32, 9, 3, 3)}), "an inpainting model"),
    (lambda s: s.update({"conditioner.embedders.0.model.ln_final.weight": torch.zeros(4)}),
     "an SDXL refiner"),
    (lambda s: s.update({"model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k"
                         ".weight": torch.zeros(64, 48)}), "does not fit together"),
])
def test_other_kinds_of_models_are_refused_in_words(tiny, change, words):
    state, meta = read_checkpoint(tiny["v1x"])
    change(state)
    with pytest.raises(CheckpointError, match=words):
        check_model_type(state, meta, None, "v1x", "x", TITLES)


# -- the WebUI's yaml --------------------------------------------------------------------------
def test_yaml_where_the_webui_would_guess_wrong(tiny):
    assert [needs_yaml(build_meta(t)) for t in TYPES] == [False, False, True, False]
    for t in TYPES:  # the tiny models are non-standard: all get one
        assert tiny[t].with_suffix(".yaml").is_file()
    v = yaml.safe_load(render(build_meta("v2x-768-v")))["model"]["params"]
    assert v["parameterization"] == "v" and v["scale_factor"] == 0.18215
    unet = v["unet_config"]["params"]  # as in Stability's v2-inference-v.yaml
    assert (unet["model_channels"], unet["channel_mult"], unet["num_head_channels"],
            unet["context_dim"], unet["attention_resolutions"], unet["num_res_blocks"]) == \
        (320, [1, 2, 4, 4], 64, 1024, [4, 2, 1], 2) and unet["use_linear_in_transformer"]
    assert v["cond_stage_config"]["params"]["layer"] == "penultimate"
    xl = yaml.safe_load(render(build_meta("sdxl")))["model"]["params"]  # as sd_xl_base.yaml
    net = xl["network_config"]["params"]
    assert (net["adm_in_channels"], net["transformer_depth"], net["attention_resolutions"],
            net["channel_mult"], net["context_dim"], net["num_head_channels"]) == \
        (2816, [1, 2, 10], [4, 2], [1, 2, 4], 2048, 64)
    assert xl["conditioner_config"]["params"]["emb_models"][2]["params"]["outdim"] == 256


def test_a_source_yaml_is_copied_to_the_output(tiny, tmp_path):
    source = tmp_path / "mine.safetensors"
    source.write_bytes(tiny["v1x"].read_bytes())
    source.with_suffix(".yaml").write_text("# my own config\nmodel: {}\n")
    comp = load_single_file(str(source), "v1x")
    out = save_single_file(comp, tmp_path / "out" / "trained.safetensors")
    assert out.with_suffix(".yaml").read_text() == "# my own config\nmodel: {}\n"


# -- metadata, hash, the post-save check -----------------------------------------------------------
def test_metadata_and_the_hash_the_webui_would_compute(tiny):
    state, meta = read_checkpoint(tiny["v2x-768-v"])
    data = tiny["v2x-768-v"].read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    xl = read_checkpoint(tiny["sdxl"])[1]
    assert xl["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_a_file_that_fails_the_post_save_check_is_not_left(tiny, tmp_path, monkeypatch):
    from dreambooth.model import single_file
    comp = load_single_file(str(tiny["sdxl"]), "sdxl")
    real = single_file.reference_layout
    monkeypatch.setattr(single_file, "reference_layout",
                        lambda c: {**real(c), "model.diffusion_model.extra.weight": (1,)})
    with pytest.raises(CheckpointError, match="does not have the layout.*missing model"):
        save_single_file(comp, tmp_path / "bad.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_sdxl_half_file_carries_the_denoiser_sigmas_in_fp32(tiny, tmp_path, precision):
    """sgm's DiscreteDenoiser: sqrt((1 - alphas_cumprod) / alphas_cumprod) of the scaled-linear
    schedule, ascending, computed here independently with numpy."""
    import numpy as np
    comp = load_single_file(str(tiny["sdxl"]), "sdxl")
    state, _ = read_checkpoint(save_single_file(comp, tmp_path / "xl.safetensors", precision))
    sigmas = state["denoiser.sigmas"]
    assert sigmas.dtype == torch.float32 and sigmas.shape == (1000,)
    assert state["model.diffusion_model.out.2.weight"].dtype == getattr(torch, {
        "fp16": "float16", "bf16": "bfloat16"}[precision])
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    cumprod = np.cumprod(1.0 - betas)
    assert np.allclose(sigmas.numpy(), np.sqrt((1 - cumprod) / cumprod), rtol=1e-6, atol=0)
    assert round(sigmas[0].item(), 4) == 0.0292 and round(sigmas[-1].item(), 3) == 14.615


def test_an_sdxl_file_without_the_denoiser_sigmas_fails_the_check(tiny, tmp_path, monkeypatch):
    from dreambooth.model import single_file
    comp = load_single_file(str(tiny["sdxl"]), "sdxl")
    real = single_file.ldm_state
    monkeypatch.setattr(single_file, "ldm_state", lambda *a, **k: {
        key: v for key, v in real(*a, **k).items() if key != "denoiser.sigmas"})
    with pytest.raises(CheckpointError, match="missing denoiser.sigmas"):
        save_single_file(comp, tmp_path / "bad.safetensors")
    assert list(tmp_path.iterdir()) == []


# -- training each new family ----------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["v2x-768-v", "sdxl"])
def test_training_sd2_and_sdxl_with_their_text_encoders(model_type, tiny, instance_dir, tmp_path):
    cfg = dict(model_name=model_type, source_checkpoint=str(tiny[model_type]),
               model_type=model_type, work_dir=str(tmp_path / "runs"),
               output_dir=str(tmp_path / "out"), resolution=64, center_crop=True, batch_size=2,
               steps_per_image=1, learning_rate=1e-3, text_encoder_learning_rate=1e-3,
               train_text_encoder=True, concepts=(Concept(str(instance_dir), "photo of sks"),))
    from dreambooth import TrainingConfig
    result = train(TrainingConfig(**cfg))
    before, _ = read_checkpoint(tiny[model_type])
    after, meta = read_checkpoint(result.path)
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    prefix = SPECS[model_type].text_encoders[-1].prefix  # the OpenCLIP tower
    assert any(k.startswith(prefix + "transformer.resblocks.0.") for k in changed)
    assert any(k.startswith("model.diffusion_model.") for k in changed)
    if model_type == "v2x-768-v":
        assert not any(".resblocks.2." in k or "logit_scale" in k for k in changed)
        assert "parameterization: v" in result.path.with_suffix(".yaml").read_text()
        assert meta["modelspec.prediction_type"] == "v"
    else:
        assert any(k.startswith("conditioner.embedders.0.") for k in changed)
        assert any(k.startswith("model.diffusion_model.label_emb.") for k in changed)
