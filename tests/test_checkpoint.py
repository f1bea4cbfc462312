"""Single file in, working model, single file out: same keys, shapes and values; loads in diffusers."""
import json

import pytest
import torch

from dreambooth import CheckpointError
from dreambooth.assets import load_tokenizer
from dreambooth.model.checkpoint import read_checkpoint, write_safetensors
from dreambooth.model.single_file import ldm_state, load_single_file, save_single_file
from dreambooth.model.spec import COMPONENTS_KEY
from dreambooth.model.workdir import load_working_dir, save_working_dir


def test_tokenizer_ships_with_the_package(no_network):
    tok = load_tokenizer()
    assert tok("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    padded = tok("a dog", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_single_file_round_trip_is_exact(tiny_source, tmp_path, no_network):
    original, meta = read_checkpoint(tiny_source)
    comp = load_single_file(str(tiny_source), "v1x")
    out = save_single_file(comp, tmp_path / "again.safetensors")
    again, _ = read_checkpoint(out)
    assert set(again) == set(original)
    for key in original:
        assert again[key].shape == original[key].shape, key
        assert torch.equal(again[key], original[key]), key
    assert json.loads(meta[COMPONENTS_KEY])["unet"]["block_out_channels"] == [32, 32, 64, 64]


def test_layout_is_the_one_the_webui_loads(tiny_source):
    state, _ = read_checkpoint(tiny_source)
    prefixes = {k.split(".")[0] for k in state}
    assert {"model", "first_stage_model", "cond_stage_model"} <= prefixes
    for key in ("model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.input_blocks.3.0.op.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.output_blocks.2.1.conv.weight",
                "model.diffusion_model.output_blocks.5.2.conv.weight",
                "model.diffusion_model.out.2.weight", "model.diffusion_model.time_embed.0.weight",
                "first_stage_model.encoder.mid.attn_1.q.weight",
                "first_stage_model.decoder.up.3.block.0.conv1.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                "cond_stage_model.transformer.text_model.embeddings.position_ids",
                "alphas_cumprod"):
        assert key in state, key
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4


def test_half_model_casts_floats_only(tiny_source, tmp_path):
    comp = load_single_file(str(tiny_source), "v1x")
    state, _ = read_checkpoint(save_single_file(comp, tmp_path / "half.safetensors", "fp16"))
    assert state["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert state["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    buffers = [k for k in state if "." not in k]  # the schedule: betas, alphas_cumprod, ...
    assert len(buffers) == 12 and all(state[k].dtype == torch.float32 for k in buffers)
    assert torch.allclose(state["alphas_cumprod"], comp.noise_scheduler().alphas_cumprod,
                          rtol=1e-6, atol=0)


def test_output_reloads_into_diffusers_and_generates(tiny_source, no_network):
    from dreambooth.data.sampling import make_pipeline
    comp = load_single_file(str(tiny_source), "v1x")
    pipe = make_pipeline(comp)
    image = pipe("photo of sks pattern", height=64, width=64, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_working_dir_is_a_diffusers_folder_both_ends_read(tiny_source, tmp_path, no_network):
    from diffusers import StableDiffusionPipeline
    comp = load_single_file(str(tiny_source), "v1x")
    folder = save_working_dir(comp, tmp_path / "working")
    te_keys = set(read_checkpoint(folder / "text_encoder" / "model.safetensors")[0])
    assert all(k.startswith("text_model.") for k in te_keys)
    assert (folder / "tokenizer" / "vocab.json").is_file()
    assert (folder / "tokenizer" / "merges.txt").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    for name, module in (("unet", pipe.unet), ("vae", pipe.vae)):
        ours = getattr(comp, name).state_dict()
        assert all(torch.equal(ours[k], v) for k, v in module.state_dict().items()), name
    ours_te = comp.text_encoder.state_dict()
    for k, v in pipe.text_encoder.state_dict().items():
        assert torch.equal(ours_te[k], v), k
    back = load_working_dir(folder)
    assert set(ldm_state(back)) == set(ldm_state(comp))


def test_type_mismatch_is_refused_in_plain_words(tiny_source):
    with pytest.raises(CheckpointError) as err:
        load_single_file(str(tiny_source), "sdxl")
    assert "v1x" in str(err.value)


def test_checkpoint_without_vae_is_refused(tiny_source, tmp_path):
    state, meta = read_checkpoint(tiny_source)
    unet_only = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    path = write_safetensors(tmp_path / "novae.safetensors", unet_only, meta)
    with pytest.raises(CheckpointError) as err:
        load_single_file(str(path), "v1x")
    assert "VAE" in str(err.value)


def test_a_safetensors_file_is_read_one_tensor_at_a_time_as_safetensors_reads_it(tmp_path):
    """LazyState (what loading reads a .safetensors through) gives every dtype and shape as
    safetensors' own reader does, reads nothing until asked, and prefetches (converted) on a
    thread whose tensors it hands over once."""
    from safetensors.torch import load_file, save_file

    from dreambooth.model.checkpoint import LazyState, open_checkpoint
    g = torch.Generator().manual_seed(0)
    tensors = {"a.f16": torch.randn(3, 4, generator=g).half(),
               "b.bf16": torch.randn(5, generator=g).bfloat16(),
               "c.f32": torch.randn(2, 2, 2, generator=g),
               "d.i64": torch.arange(7)[None], "e.bool": torch.tensor([True, False]),
               "f.empty": torch.zeros(0, 3), "g.u8": torch.arange(9, dtype=torch.uint8)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    state, metadata = open_checkpoint(path)
    assert isinstance(state, LazyState) and metadata == {"k": "v"}
    assert read_checkpoint(path)[0].keys() == state.keys()  # read_checkpoint: a plain dict
    theirs = load_file(str(path))
    assert set(state) == set(theirs) and len(state) == len(theirs)
    for key, value in theirs.items():
        assert state.dtype(key) == value.dtype and state.shape(key) == tuple(value.shape)
        assert state[key].dtype == value.dtype and torch.equal(state[key], value)
    state.prefetch(["a.f16", "c.f32", "d.i64"], torch.float32)
    handed = state["a.f16"]
    assert handed.dtype == torch.float32  # converted on the thread
    torch.testing.assert_close(handed, theirs["a.f16"].float())
    assert state["a.f16"].dtype == torch.float16  # handed over once: asked again, read again
    assert state["d.i64"].dtype == torch.int64  # not floating: as stored
    assert not state._ready or set(state._ready) == {"c.f32"}
    state.close()
    assert state["c.f32"].dtype == torch.float32 and not state._ready


def test_a_tensor_the_prefetch_could_not_read_fails_where_it_is_asked_for(tmp_path):
    """A file cut short after safetensors checked it (or failing to read): the error reaches
    the loader as a sentence, not a dead thread and a hang."""
    from safetensors.torch import save_file

    from dreambooth.config.errors import CheckpointError
    from dreambooth.model.checkpoint import open_checkpoint
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(1000)}, str(path))
    state, _ = open_checkpoint(path)
    with open(path, "r+b") as f:  # cut after the check: the read finds the end of the file
        f.truncate(path.stat().st_size - 100)
    state.prefetch(["w"], torch.float32)
    with pytest.raises(CheckpointError, match="truncated"):
        state["w"]


def test_a_model_loads_in_fp32_or_as_the_file_stores_it(tiny_source, tmp_path):
    """dtype=None keeps an fp16 file's weights in fp16 (what training loads: each component is
    cast as it goes to the device, so the host never holds an fp32 copy of all of it); the
    default gives fp32 of the same values."""
    half = save_single_file(load_single_file(str(tiny_source), "v1x"), tmp_path / "h.safetensors",
                            "fp16")
    stored = load_single_file(str(half), "v1x", None)
    full = load_single_file(str(half), "v1x")
    for a, b in ((stored.unet, full.unet), (stored.vae, full.vae),
                 (stored.text_encoders[0], full.text_encoders[0])):
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        assert {p.dtype for p in pa.values()} == {torch.float16}
        assert {p.dtype for p in pb.values()} == {torch.float32}
        assert all(torch.equal(pa[k].float(), pb[k]) for k in pb)


def test_frozen_modules_park_in_the_dtype_they_were_loaded_in(tiny_source, tmp_path):
    """After caching, the VAE and frozen text encoders leave the GPU: back in the file's fp16
    (exactly: they ran in fp32 from those values), not in the fp32 they ran in."""
    from dreambooth.training import backends
    half = save_single_file(load_single_file(str(tiny_source), "v1x"), tmp_path / "h.safetensors",
                            "fp16")
    comp = load_single_file(str(half), "v1x", None)
    modules = [comp.vae, *comp.text_encoders]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    stored = backends.stored_dtypes(modules)
    assert set(stored.values()) == {torch.float16}
    for m in modules:
        m.to(torch.float32)  # as they run on the GPU for the caches
    backends.park(modules, stored)
    for m, saved in zip(modules, before):
        now = m.state_dict()
        assert all(now[k].dtype == v.dtype and torch.equal(now[k], v) for k, v in saved.items())
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).half())
    assert backends.stored_dtypes([mixed]) == {id(mixed): None}  # mixed: parked as they run
