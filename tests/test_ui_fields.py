"""The tab's widgets and the config fields stay in sync; values <-> config round-trip.
Standard library only (runs in every venv)."""
from __future__ import annotations

import dataclasses
import sys

import pytest
from patience import run

from dreambooth import Concept, TrainingConfig
from dreambooth.config.errors import ConfigError
from dreambooth.ui import fields


def _config_keys() -> list[str]:
    return [s.key for specs in fields.config_specs().values() for s in specs]


def test_every_config_field_has_a_widget_and_every_widget_names_a_field():
    names = {f.name for f in dataclasses.fields(TrainingConfig)} - {"concepts"} - \
        set(fields.ALIASES)  # an older spelling has no widget: its newer field has one
    assert set(fields.ALIASES.values()) <= names
    keys = _config_keys()
    assert sorted(keys) == sorted(names)  # each field once, nothing else
    for i in range(fields.MAX_CONCEPTS):
        assert {s.name for s in fields.concept_specs(i)} == \
            {f.name for f in dataclasses.fields(Concept)}
        assert all(s.key == f"concepts[{i}].{s.name}" for s in fields.concept_specs(i))
    assert len(set(fields.all_keys())) == len(fields.all_keys())


def test_every_field_has_a_human_label():
    """A label written for people ("Learning-rate warm-up steps"), never the field name with its
    first letter raised ("Lr warmup steps"); the LABELS table holds no stale names."""
    named = [f for C in (TrainingConfig, Concept) for f in dataclasses.fields(C)
             if f.name != "concepts"]
    missing = [f.name for f in named if f.name not in fields.LABELS]
    assert not missing, f"fields without a label in fields.LABELS: {missing}"
    assert set(fields.LABELS) <= {f.name for f in named}
    for spec in [s for ss in fields.config_specs().values() for s in ss] + \
            fields.concept_specs(0):
        assert spec.label == fields.LABELS[spec.name] and "_" not in spec.label


def test_layout_names_only_real_fields():
    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    for section, listed in fields.SECTIONS.items():
        assert set(listed) <= names, f"{section} names unknown fields"
    assert fields.BASIC <= names
    assert fields.CONCEPT_BASIC <= {f.name for f in dataclasses.fields(Concept)}


def test_basic_view_is_small_and_advanced_fields_are_hidden():
    specs = [s for ss in fields.config_specs().values() for s in ss]
    basic = [s for s in specs if not s.advanced] + \
        [s for s in fields.concept_specs(0) if not s.advanced]
    assert 15 <= len(basic) <= 24
    by_name = {f.name: f for f in dataclasses.fields(TrainingConfig)}
    for s in specs:  # a field the config calls advanced is never in the basic view
        if by_name[s.name].metadata.get("advanced"):
            assert s.advanced, s.name


def test_a_new_config_field_still_gets_a_widget(monkeypatch):
    monkeypatch.setitem(fields.SECTIONS, "Saving", ("output_dir",))
    other = fields.config_specs()["Other"]
    assert {"save_precision", "overwrite"} <= {s.name for s in other}
    assert all(s.advanced for s in other)


def test_widget_kinds_follow_field_types():
    specs = {s.key: s for ss in fields.config_specs().values() for s in ss}
    assert specs["optimizer"].kind == "dropdown" and "adamw" in specs["optimizer"].choices
    assert specs["cache_latents"].kind == "checkbox"
    assert specs["steps_per_image"].kind == "int" and specs["steps_per_image"].minimum == 1
    assert specs["learning_rate"].kind == "float"
    assert specs["model_name"].kind == "text"


def test_values_round_trip_through_the_config(tmp_path):
    config = TrainingConfig(
        model_name="dog", source_checkpoint="/x/sd15.safetensors", steps_per_image=150,
        learning_rate=1e-5, optimizer="lion", use_ema=True,
        concepts=(Concept("a", "photo of sks dog", "photo of a dog", "c", 5, "sks dog"),
                  Concept("b", "photo of zwx cat")))
    values, count = fields.config_to_values(config)
    assert count == 2
    assert fields.values_to_config(values, count) == config


def test_gradio_number_floats_become_ints_and_blank_concepts_are_dropped():
    values, _ = fields.config_to_values(TrainingConfig())
    values.update({"steps_per_image": 7.0, "batch_size": 2.0, "learning_rate": 1,
                   "concepts[0].instance_data_dir": " imgs ",
                   "concepts[0].instance_prompt": "sks", "concepts[1].instance_prompt": "",
                   "concepts[0].class_images_per_instance": 3.0})
    config = fields.values_to_config(values, 3)
    assert config.steps_per_image == 7 and isinstance(config.steps_per_image, int)
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert len(config.concepts) == 1 and config.concepts[0].instance_data_dir == "imgs"
    assert config.concepts[0].class_images_per_instance == 3


def test_concepts_past_the_visible_count_are_ignored():
    values, _ = fields.config_to_values(TrainingConfig())
    values.update({"concepts[0].instance_prompt": "a", "concepts[0].instance_data_dir": "x",
                   "concepts[1].instance_prompt": "b", "concepts[1].instance_data_dir": "y"})
    assert len(fields.values_to_config(values, 1).concepts) == 1
    assert len(fields.values_to_config(values, 2).concepts) == 2


def test_unknown_widget_keys_are_refused():
    with pytest.raises(KeyError):
        fields.values_to_config({"learning_rte": 1e-6})


def test_wrong_types_become_config_problems_naming_the_field():
    values, _ = fields.config_to_values(TrainingConfig())
    values["batch_size"] = "two"
    config = fields.values_to_config(values)
    assert any(p.field == "batch_size" for p in config.validate(check_paths=False))


def test_host_side_modules_import_no_torch_gradio_or_webui():
    code = ("import sys, dreambooth, dreambooth.host.interface, dreambooth.host.runner, dreambooth.ui, "
            "dreambooth.ui.fields, dreambooth.ui.render, dreambooth.ui.actions, "
            "dreambooth.ui.standalone, dreambooth.config, dreambooth.config.events\n"
            "bad = [m for m in ('torch', 'gradio', 'modules', 'diffusers', 'transformers', "
            "'numpy', 'fastapi') if m in sys.modules]\n"
            "print(','.join(bad))")
    out = run([sys.executable, "-c", code], 10, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_problems_are_reported_all_at_once_as_config_errors():
    values, _ = fields.config_to_values(TrainingConfig())
    values.update({"model_name": "a/b", "resolution": 100})
    with pytest.raises(ConfigError) as e:
        fields.values_to_config(values).check(check_paths=False)
    assert {"model_name", "resolution", "concepts"} <= {p.field for p in e.value.problems}


def test_model_type_is_sniffed_from_the_header_and_the_yaml_beside_it(tmp_path):
    import json
    import struct

    from dreambooth.host.interface import sniff_model_type

    def write(name, keys, meta=None):
        header = {k: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for k in keys}
        if meta:
            header["__metadata__"] = meta
        raw = json.dumps(header).encode()
        path = tmp_path / name
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
        return path
    v1 = write("v1.safetensors", ["cond_stage_model.transformer.text_model.final_layer_norm.weight"])
    v2 = write("v2.safetensors", ["cond_stage_model.model.transformer.resblocks.0.ln_1.weight"])
    xl = write("xl.safetensors", ["conditioner.embedders.1.model.ln_final.weight"])
    assert (sniff_model_type(v1), sniff_model_type(v2), sniff_model_type(xl)) == \
        ("v1x", "v2x-512", "sdxl")
    (tmp_path / "v2.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert sniff_model_type(v2) == "v2x-768-v"
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 20)
    assert sniff_model_type(tmp_path / "junk.safetensors") is None
    assert sniff_model_type(tmp_path / "missing.safetensors") is None
