import dataclasses
import json
import sys

import pytest
from patience import run

from dreambooth import Concept, ConfigError, TrainingConfig
from dreambooth.config import SCHEMA_VERSION, field_help, migrate


def full_config():
    """Every field set to a non-default value."""
    return TrainingConfig(
        model_name="dog_v2", source_checkpoint="/m/sd15.safetensors", model_type="v2x-512",
        output_dir="/o", work_dir="/w",
        concepts=(Concept("/d", "photo of sks dog", "photo of a dog", "/c", 3, "sks dog on a beach"),
                  Concept("/e", "[filewords], sks style")),
        steps_per_image=150, save_every_epochs=5, sample_every_epochs=7, batch_size=2,
        gradient_accumulation_steps=3, learning_rate=1e-5, text_encoder_learning_rate=3e-6,
        lr_scheduler="cosine", lr_warmup_steps=11, optimizer="adamw_8bit", weight_decay=0.05,
        max_grad_norm=0.5, mixed_precision="bf16", attention="xformers",
        gradient_checkpointing=True, checkpoint_blocks="selective", cache_latents=False,
        train_text_encoder=True,
        text_encoder_steps_ratio=0.25, use_ema=True, ema_decay=0.999, prior_loss_weight=0.7,
        resolution=768, center_crop=True, hflip=True, offset_noise=0.05, min_snr_gamma=5.0,
        seed=1234, save_precision="bf16", class_generation_steps=30, sample_steps=25,
        guidance_scale=6.0, overwrite=True, state_every_steps=25, log_every_steps=3, resume="never",
        use_lora=True, lora_rank=32, lora_alpha=8.0, lora_text_encoder=True,
        lora_targets="transformer+conv", lora_conv_rank=4, lora_conv_alpha=2.0,
        network="lokr", loha_rank=4, loha_alpha=2.0, lokr_factor=-1, lokr_rank=4, lokr_alpha=2.0,
        dora_wd=True, glora_rank=4, oft_block_size=16, oft_constraint=0.5, train_norm=True,
        lora_learning_rate=2e-4, lora_text_encoder_learning_rate=1e-5, lora_dir="/l",
        lora_merge=True, bucketing=True, bucket_no_upscale=True, memory_preset="lowest",
        fused_optimizer=True, bf16_weights=True, fp8_base=True, deterministic="off", cpu_threads=3,
        compile="blocks",
        pivotal=True, embedding_token="zwx", embedding_init_word="dog", embedding_vectors=3,
        embedding_learning_rate=1e-3, embedding_dir="/e", log_with="tensorboard",
        logging_dir="/t", flux_clip_l="/f/clip_l.safetensors", flux_t5xxl="/f/t5.safetensors",
        flux_ae="/f/ae.safetensors", t5_tokenizer_dir="/f/tokenizer_2",
        sd35_clip_l="/s/clip_l.safetensors", sd35_clip_g="/s/clip_g.safetensors",
        sd35_t5xxl="/s/t5.safetensors", sd35_vae="/s/vae.safetensors")


def test_every_field_round_trips_through_json():
    cfg = full_config()
    defaults = TrainingConfig()
    for f in dataclasses.fields(TrainingConfig):  # the fixture really changes every field
        assert getattr(cfg, f.name) != getattr(defaults, f.name), f.name
    text = cfg.to_json()
    assert json.loads(text)["schema_version"] == SCHEMA_VERSION
    assert TrainingConfig.from_json(text) == cfg
    assert TrainingConfig.from_json(text).to_json() == text


def test_defaults_are_valid_apart_from_what_only_the_user_can_give():
    problems = TrainingConfig().validate(check_paths=False)
    assert [p.field for p in problems] == ["concepts"]


@pytest.mark.parametrize("field,value", [
    ("model_type", "v3"), ("optimizer", "sgd"), ("mixed_precision", "fp8"),
    ("attention", "flash"), ("lr_scheduler", "step"), ("save_precision", "int8"),
    ("steps_per_image", -5), ("steps_per_image", 0), ("batch_size", 0), ("learning_rate", -1.0),
    ("learning_rate", float("nan")), ("resolution", 500), ("resolution", "512"),
    ("train_text_encoder", "yes"), ("text_encoder_steps_ratio", 1.5), ("prior_loss_weight", -1.0),
    ("seed", -1), ("model_name", "../etc"), ("model_name", "/abs/path"), ("model_name", "a" * 300),
    ("model_name", "con"), ("model_name", "bad|name"), ("model_name", ""),
    ("gradient_accumulation_steps", 1.5), ("source_checkpoint", ""),
])
def test_every_invalid_value_yields_a_message_naming_the_field(field, value):
    cfg = TrainingConfig(concepts=(Concept("/d", "photo of sks dog"),)).replace(**{field: value})
    problems = cfg.validate(check_paths=False) + ([] if field != "source_checkpoint"
                                                  else cfg.validate(check_paths=True))
    assert any(p.field == field for p in problems), problems
    message = str(ConfigError(problems))
    assert field in message


def test_concept_problems_name_the_concept_field():
    cfg = TrainingConfig(concepts=(Concept("", ""), Concept("/d", "x", class_images_per_instance=2)))
    fields = {p.field for p in cfg.validate(check_paths=False)}
    assert {"concepts[0].instance_data_dir", "concepts[0].instance_prompt",
            "concepts[1].class_prompt"} <= fields


def test_validate_returns_all_problems_at_once():
    cfg = TrainingConfig(optimizer="sgd", batch_size=0, resolution=7)
    assert len(cfg.validate(check_paths=False)) >= 4


def test_unknown_keys_are_rejected_with_a_did_you_mean_hint():
    data = TrainingConfig().to_dict()
    data["learning_rat"] = 1e-5
    data["concepts"] = [{"instance_data_dir": "/d", "instance_promt": "x"}]
    with pytest.raises(ConfigError) as err:
        TrainingConfig.from_dict(data)
    text = str(err.value)
    assert "did you mean 'learning_rate'" in text
    assert "concepts[0].instance_promt" in text and "did you mean 'instance_prompt'" in text


def test_bad_json_is_reported_with_its_place():
    with pytest.raises(ConfigError) as err:
        TrainingConfig.from_json('{"model_name": "x",}')
    assert "line 1" in str(err.value)


def test_old_files_migrate():
    old = {"model_name": "m", "half_model": True, "concepts": []}
    assert TrainingConfig.from_dict(old).save_precision == "fp16"
    assert migrate({"schema_version": 0, "half_model": False}) == {"save_precision": "fp32"}
    with pytest.raises(ConfigError):
        TrainingConfig.from_dict({"schema_version": SCHEMA_VERSION + 1})


def test_every_setting_has_help_text():
    assert all(help_text for _, help_text, _, _ in field_help())


def test_importing_the_core_loads_neither_webui_gradio_nor_torch():
    code = ("import sys, dreambooth, dreambooth.config, dreambooth.config.events; "
            "bad = [m for m in ('modules', 'gradio', 'torch', 'diffusers', 'transformers') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = run([sys.executable, "-c", code], 10, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_config_reference_is_current():
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("config_table", root / "tools/config_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    readme = (root / "README.md").read_text()
    assert tool.replace_in(readme) == readme, "run: python tools/config_table.py --write"
