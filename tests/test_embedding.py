"""Textual inversion and pivotal tuning, through the real trainer on the tiny models: the
embedding file has the WebUI's layout (read back with safetensors itself, not our code), only the
new token's vectors change, the embedding alone lowers the instance loss, a pivotal LoRA differs
from a plain one and its card's prompt names the embedding, bad input is refused before
training."""
import json

import pytest
import torch
from denoise import denoising_loss
from safetensors import safe_open

from dreambooth import Concept, TrainingConfig
from dreambooth.config import events as ev
from dreambooth.config.errors import ConfigError, DreamboothError
from dreambooth.model.single_file import load_single_file
from dreambooth.model.tiny import write_images
from dreambooth.training.trainer import Trainer

PROMPT = "photo of sks pattern"
TI_STEPS = 40


@pytest.fixture(scope="module")
def sources(tiny_checkpoints):
    return {t: tiny_checkpoints(t) for t in ("v1x", "sdxl")}


def settings(source, model_type, instance_dir, tmp_path, **changes) -> TrainingConfig:
    base = dict(model_name="emb", source_checkpoint=str(source), model_type=model_type,
                work_dir=str(tmp_path / "runs"), output_dir=str(tmp_path / "out"),
                lora_dir=str(tmp_path / "Lora"), embedding_dir=str(tmp_path / "embeddings"),
                resolution=64, center_crop=True, batch_size=2, steps_per_image=1,
                method="textual_inversion", embedding_token="sks", embedding_init_word="pattern",
                embedding_vectors=2, embedding_learning_rate=5e-2, state_every_steps=0,
                concepts=(Concept(str(instance_dir), PROMPT),))
    return TrainingConfig(**{**base, **changes}).check()


def run(cfg: TrainingConfig) -> Trainer:
    events = []
    trainer = Trainer(cfg, ev.EventBus(events.append), ev.CancelToken())
    trainer.result = trainer.run()
    trainer.saved = [e.path for e in events if isinstance(e, ev.CheckpointSaved)]
    return trainer


def read_back(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.slow
@pytest.mark.parametrize("model_type, layout", [
    ("v1x", {"emb_params": (2, 32)}),
    ("sdxl", {"clip_l": (2, 32), "clip_g": (2, 32)}),
])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_textual_inversion_writes_the_webui_embedding_and_changes_nothing_else(
        sources, instance_dir, tmp_path, model_type, layout, precision):
    cfg = settings(sources[model_type], model_type, instance_dir, tmp_path,
                   save_precision=precision)
    trainer = run(cfg)
    steps = trainer.total_steps
    path = tmp_path / "embeddings" / f"emb_{steps}.safetensors"
    assert trainer.saved == [str(path)] and trainer.result.path == path
    tensors, meta = read_back(path)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == layout
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
    assert all(v.dtype == dtype for v in tensors.values())
    assert meta["name"] == f"emb_{steps}" and meta["step"] == str(steps)
    assert meta["dreambooth.token"] == "sks" and meta["dreambooth.model_type"] == model_type
    assert meta["sd_checkpoint_name"] == sources[model_type].stem
    # nothing else was written: no checkpoint, no LoRA, no working model
    assert not (tmp_path / "out").exists() and not (tmp_path / "Lora").exists()

    # only the new vectors learnt: every weight of the source is bit-identical
    source = load_single_file(str(sources[model_type]), model_type)
    comp = trainer.comp
    for name in ("unet", "vae", *[s.component for s in comp.spec.text_encoders]):
        trained = getattr(comp, name).state_dict()
        for key, value in getattr(source, name).state_dict().items():
            assert torch.equal(trained[key].float(), value.float()), (name, key)
        extra = set(trained) - set(getattr(source, name).state_dict())
        assert all(k.endswith("embeddings.token_embedding.vectors") for k in extra), extra
    # and the vectors moved away from the init word's row
    keys = list(layout)
    for key, te, tok in zip(keys, source.text_encoders, source.tokenizers):
        init = te.get_input_embeddings().weight[tok("pattern", add_special_tokens=False)
                                                .input_ids[0]]
        assert not torch.allclose(tensors[key].float(), init.expand(2, -1).to(dtype).float())


@pytest.mark.slow
def test_pivotal_lora_differs_from_a_plain_lora_and_its_card_names_the_embedding(
        sources, instance_dir, tmp_path):
    common = dict(method="lora", lora_rank=4, lora_alpha=4.0, lora_learning_rate=1e-2,
                  steps_per_image=2)
    plain = run(settings(sources["v1x"], "v1x", instance_dir, tmp_path / "a", **common))
    pivotal = run(settings(sources["v1x"], "v1x", instance_dir, tmp_path / "b", pivotal=True,
                           **common))
    steps = pivotal.total_steps
    lora_a = tmp_path / "a" / "Lora" / f"emb_{steps}.safetensors"
    lora_b = tmp_path / "b" / "Lora" / f"emb_{steps}.safetensors"
    emb = tmp_path / "b" / "embeddings" / f"emb_{steps}.safetensors"
    assert plain.saved == [str(lora_a)] and pivotal.saved == [str(emb), str(lora_b)]
    a, _ = read_back(lora_a)
    b, _ = read_back(lora_b)
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    tensors, _ = read_back(emb)
    assert tuple(tensors["emb_params"].shape) == (2, 32)
    card = json.loads(lora_b.with_suffix(".json").read_text())
    assert card["activation text"] == f"photo of emb_{steps} pattern"
    assert not (tmp_path / "a" / "embeddings").exists()


def eval_loss(comp, folder, vectors=None) -> float:
    """The denoising loss of the instance images under PROMPT; `vectors`: the embedding (SD 1.x)
    in place of 'sks', put there independently of our code: new tokens in the tokenizer, their
    rows appended to the text encoder's matrix. Four rounds: the fall measured is small."""
    prompt = PROMPT
    if vectors is not None:
        tok, te = comp.tokenizer, comp.text_encoder
        names = [f"<v{i}>" for i in range(len(vectors))]
        tok.add_tokens(names)
        te.resize_token_embeddings(len(tok))
        with torch.no_grad():
            te.get_input_embeddings().weight[-len(vectors):] = vectors
        prompt = PROMPT.replace("sks", " ".join(names))
    return denoising_loss(comp, folder, prompt, rounds=4)


@pytest.fixture(scope="module")
def attentive_source(sources, tmp_path_factory):
    """The tiny v1x source with its cross-attention turned up (every attn2 value and output
    projection x8): a random tiny UNet barely listens to the text, so whatever an embedding
    learns moves its loss by a fraction of a percent, less than the draws' noise; a trained
    model listens, and so does this one."""
    from safetensors.torch import load_file, save_file
    with safe_open(str(sources["v1x"]), framework="pt") as f:
        metadata = f.metadata()
    weights = load_file(str(sources["v1x"]))
    loud = [k for k in weights if "attn2.to_v.weight" in k or "attn2.to_out.0.weight" in k]
    assert loud
    for key in loud:
        weights[key] = weights[key] * 8
    path = tmp_path_factory.mktemp("attentive") / "attentive_v1x.safetensors"
    save_file(weights, str(path), metadata=metadata)
    return path


@pytest.mark.slow
@pytest.mark.once  # nothing version-sensitive beyond what the other tests run
def test_the_embedding_alone_lowers_the_instance_loss(attentive_source, tmp_path):
    """Everything but the new token's vectors is frozen, so any fall of the loss is theirs
    (measured: -7.1% with 1 or 2 threads; the random draws' noise is well under 1%)."""
    instance = tmp_path / "instance"
    write_images(instance, "checker", 4)
    source = attentive_source
    cfg = settings(source, "v1x", instance, tmp_path, steps_per_image=TI_STEPS,
                   batch_size=4, embedding_learning_rate=5e-3, embedding_vectors=16)
    trainer = run(cfg)
    tensors, _ = read_back(trainer.result.path)
    init = tensors["emb_params"][:1].clone()
    word = load_single_file(str(source), "v1x")
    row = word.text_encoder.get_input_embeddings().weight[
        word.tokenizer("pattern", add_special_tokens=False).input_ids[0]].detach()
    before = eval_loss(load_single_file(str(source), "v1x"), instance,
                       row.expand(16, -1).clone())
    after = eval_loss(load_single_file(str(source), "v1x"), instance,
                      tensors["emb_params"].float())
    print(f"\ninstance loss: initial embedding {before:.5f}, trained {after:.5f} "
          f"({(after - before) / before:+.2%})")
    assert init.shape == (1, 32) and after < 0.97 * before


def test_bad_embedding_settings_are_refused_with_the_field_and_the_fix(sources, instance_dir,
                                                                       tmp_path):
    with pytest.raises(ConfigError) as e:
        settings(sources["v1x"], "v1x", instance_dir, tmp_path, embedding_token="zzz")
    assert "concepts[0].instance_prompt" in str(e.value) and "zzz" in str(e.value)
    with pytest.raises(ConfigError) as e:
        settings(sources["v1x"], "v1x", instance_dir, tmp_path, use_lora=True)
    assert "use_lora" in str(e.value) and "textual_inversion" in str(e.value)
    with pytest.raises(ConfigError) as e:
        settings(sources["v1x"], "v1x", instance_dir, tmp_path, pivotal=True)
    assert "pivotal" in str(e.value) and "method" in str(e.value)
    with pytest.raises(ConfigError) as e:
        settings(sources["v1x"], "v1x", instance_dir, tmp_path, embedding_init_word="a dog")
    assert "embedding_init_word" in str(e.value)


@pytest.mark.parametrize("case", ["multi_token_init", "clash"])
def test_refused_before_training_and_nothing_written(sources, instance_dir, tmp_path, case):
    changes = {"embedding_init_word": "sksqzvwx"} if case == "multi_token_init" else {}
    cfg = settings(sources["v1x"], "v1x", instance_dir, tmp_path, **changes)
    folder = tmp_path / "embeddings"
    if case == "clash":
        folder.mkdir()
        for step in range(1, 9):  # whichever step the run ends at
            (folder / f"emb_{step}.safetensors").write_bytes(b"mine")
    events = []
    with pytest.raises(DreamboothError) as e:
        Trainer(cfg, ev.EventBus(events.append), ev.CancelToken()).run()
    text = f"{e.value.message} {e.value.hint}"
    if case == "clash":
        assert "already exists" in text and "overwrite" in text
        assert all(p.read_bytes() == b"mine" for p in folder.iterdir())
        assert len(list(folder.iterdir())) == 8
    else:
        assert "embedding_init_word" in text and "one token" in text
        assert not folder.exists()
    assert not any(isinstance(x, (ev.Step, ev.CheckpointSaved)) for x in events)


def test_an_old_config_with_use_lora_loads_as_method_lora():
    old = {"model_name": "x", "use_lora": True, "lora_rank": 8}  # version 0, no method
    cfg = TrainingConfig.from_dict(old)
    assert cfg.method == "lora" and cfg.use_lora is True
    again = TrainingConfig.from_json(cfg.to_json())
    assert again == cfg
    assert TrainingConfig(method="lora").use_lora is True
    assert cfg.replace(method="dreambooth").use_lora is False
    assert cfg.replace(use_lora=False).method == "dreambooth"
    assert TrainingConfig().replace(use_lora=True).method == "lora"


def test_a_snapshot_from_before_method_resumes_as_the_same_run():
    from dreambooth.training.state import config_differences
    new = TrainingConfig(use_lora=True).to_dict()
    old = {k: v for k, v in new.items() if k not in (
        "method", "pivotal", "embedding_token", "embedding_init_word", "embedding_vectors",
        "embedding_learning_rate", "embedding_dir")}
    assert config_differences(old, new) == []
    assert config_differences(old, TrainingConfig().to_dict()) != []


def webui_embedding_names(folder) -> dict:
    """What WebUI 1.10.1's embedding database makes of the .safetensors files of `folder`: a file
    of one tensor (SD 1.x/2.x) or of clip_l and clip_g (SDXL) is an embedding named by its file
    stem; any other layout (a LoRA) is skipped."""
    names = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors, _ = read_back(path)
        if len(tensors) == 1 or set(tensors) == {"clip_l", "clip_g"}:
            names[path.stem] = path
    return names


def test_pivotal_lora_and_embedding_in_one_folder_keep_both_files(sources, instance_dir,
                                                                   tmp_path):
    """lora_dir = embedding_dir with overwrite on: the LoRA used to replace the embedding saved a
    moment before (same name) and the card named a file that was gone."""
    shared = tmp_path / "shared"
    cfg = settings(sources["v1x"], "v1x", instance_dir, tmp_path, method="lora", pivotal=True,
                   lora_rank=2, lora_alpha=2.0, batch_size=4, lora_dir=str(shared),
                   embedding_dir=str(shared), overwrite=True)
    trainer = run(cfg)
    steps = trainer.total_steps
    lora, emb = shared / f"emb_{steps}.safetensors", shared / f"emb_{steps}_emb.safetensors"
    assert trainer.saved == [str(emb), str(lora)] and trainer.result.path == lora
    assert webui_embedding_names(shared) == {emb.stem: emb}  # the LoRA is not an embedding
    assert any(k.startswith("lora_unet_") for k in read_back(lora)[0])  # <lora:emb_N:1>
    card = json.loads(lora.with_suffix(".json").read_text())
    assert card["activation text"] == f"photo of {emb.stem} pattern"


@pytest.mark.parametrize("layout", ["textual_inversion", "pivotal", "pivotal_one_folder"])
def test_the_tab_names_the_embedding_and_the_lora_the_run_saved(tmp_path, layout):
    from dreambooth.host.interface import Host, standalone_paths
    from dreambooth.host.runner import Progress
    from dreambooth.ui.actions import TabActions
    one = layout == "pivotal_one_folder"
    paths = standalone_paths(tmp_path, lora_dir=tmp_path / ("shared" if one else "Lora"),
                             embeddings_dir=tmp_path / ("shared" if one else "embeddings"))
    emb, lora = paths.embeddings_dir, paths.lora_dir
    saved = {"textual_inversion": [emb / "m_4.safetensors", emb / "m_12.safetensors"],
             "pivotal": [emb / "m_12.safetensors", lora / "m_12.safetensors"],
             "pivotal_one_folder": [emb / "m_12_emb.safetensors", lora / "m_12.safetensors"]}
    files = [str(p) for p in saved[layout]]
    manager = type("Idle", (), {"status": lambda self: Progress("finished", "m", saved=files,
                                                                 final_path=files[-1]),
                                "busy": lambda self: False})()
    log = TabActions(Host(paths), manager).status_view().log
    word = "m_12_emb" if one else "m_12"
    assert f"Embedding saved: write {word} in a prompt" in log
    assert ("<lora:m_12:1>" in log) == (layout != "textual_inversion"), log


def test_a_textual_inversion_run_says_nothing_of_a_text_encoder_it_never_trained(
        sources, instance_dir, tmp_path):
    events = []
    cfg = settings(sources["v1x"], "v1x", instance_dir, tmp_path, batch_size=4)
    Trainer(cfg, ev.EventBus(events.append), ev.CancelToken()).run()
    said = [e.text for e in events if isinstance(e, ev.Message)]
    assert not any("ext encoder" in t or "stopped training" in t for t in said), said


@pytest.mark.parametrize("changes, step, expect", [
    ({"method": "textual_inversion", "embedding_token": "sks"}, 8, ""),  # ran to the end
    ({"method": "textual_inversion", "embedding_token": "sks"}, 4,
     "The embedding of 'sks' stopped training at step 4 (text_encoder_steps_ratio 0.5 of 8"),
    ({"train_text_encoder": True}, 4, "The text encoder stopped training at step 4"),
    ({"train_text_encoder": True}, 0, "The text encoder is not trained (text_encoder_steps_"),
    ({"method": "lora", "lora_text_encoder": True}, 0,
     "The text encoder's LoRA layers are not trained"),
    ({}, 4, ""),  # a plain run: the text encoder never learnt
])
def test_what_text_encoder_steps_ratio_stops_is_named(changes, step, expect):
    from dreambooth.training.advice import text_encoder_stop
    said = text_encoder_stop(TrainingConfig(text_encoder_steps_ratio=0.5, **changes), step, 8)
    assert said.startswith(expect) and bool(said) == bool(expect), said


def test_textual_inversion_that_would_stop_early_is_refused_before_training():
    """The embedding is all a textual-inversion run trains: stopping it at a share of the steps
    would leave the rest of the run changing nothing (pivotal tuning still trains its LoRA)."""
    ti = TrainingConfig(method="textual_inversion", embedding_token="sks",
                        text_encoder_steps_ratio=0.5)
    fields = [p.field for p in ti.validate()]
    assert "text_encoder_steps_ratio" in fields
    assert "text_encoder_steps_ratio" not in [p.field for p in ti.replace(
        text_encoder_steps_ratio=1.0).validate()]
    pivotal = ti.replace(method="lora", pivotal=True)
    assert "text_encoder_steps_ratio" not in [p.field for p in pivotal.validate()]
