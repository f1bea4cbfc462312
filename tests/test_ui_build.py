"""The tab builds under the installed gradio (3.41 in one venv, 4.x in another), every config
widget is a real component keyed by its field, and the buttons' handlers work on values."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from dreambooth.host.interface import Host, sniff_model_type, standalone_paths
from dreambooth.ui import fields
from dreambooth.ui.tab import build_tab

sys.path.insert(0, str(Path(__file__).parent / "webui_stub"))
from dreambooth_test_helpers import quick_values, tiny_inputs, train_python  # noqa: E402,F401


@pytest.fixture
def host(tmp_path):
    paths = standalone_paths(tmp_path / "ui")
    paths.checkpoints_dir.mkdir(parents=True)
    return Host(paths)


def test_tab_builds_with_a_widget_per_field_and_no_torch(host):
    tab = build_tab(host)
    assert isinstance(tab.blocks, gr.Blocks)
    assert sorted(tab.widgets) == sorted(fields.all_keys())
    assert "torch" not in sys.modules
    ids = [c.elem_id for c in tab.blocks.blocks.values() if getattr(c, "elem_id", None)]
    assert len(ids) == len(set(ids)) and all(i.startswith("dreambooth_") for i in ids)


def test_widgets_show_the_field_defaults_and_limits(host):
    tab = build_tab(host)
    w = tab.widgets
    assert w["steps_per_image"].value == 100 and w["optimizer"].value == "adamw"
    assert w["work_dir"].value == str(host.paths.work_dir)
    assert w["output_dir"].value == str(host.paths.checkpoints_dir)
    assert isinstance(w["cache_latents"], gr.Checkbox)
    assert isinstance(w["source_checkpoint"], gr.Dropdown)


def test_checkpoint_dropdown_lists_the_hosts_checkpoints_and_refreshes(host, tmp_path):
    (host.paths.checkpoints_dir / "a.safetensors").write_bytes(b"x")
    tab = build_tab(host)
    assert "a.safetensors" in str(tab.widgets["source_checkpoint"].choices)
    (host.paths.checkpoints_dir / "b.safetensors").write_bytes(b"x")
    assert "b.safetensors" in str(tab.on_refresh())


def test_a_host_without_flux_offers_no_flux_type_and_says_why(tmp_path):
    from dreambooth.host.interface import types_without_flux
    paths = standalone_paths(tmp_path / "a1111")
    paths.checkpoints_dir.mkdir(parents=True)
    a1111 = Host(paths)
    a1111.model_types = types_without_flux()
    a1111.part_files = lambda: None  # AUTOMATIC1111 lists no Flux / SD3.5 files
    tab = build_tab(a1111)
    widget = tab.widgets["model_type"]
    assert isinstance(tab.widgets["flux_clip_l"], gr.Textbox) and not tab.part_widgets
    assert isinstance(tab.on_refresh(), dict)  # the checkpoint list's update alone
    assert "sdxl" in str(widget.choices) and "flux" not in str(widget.choices)
    assert "sd3" not in str(widget.choices)
    assert "has no Flux or SD3.5" in widget.info
    everything = str(build_tab(Host(paths)).widgets["model_type"].choices)
    assert all(t in everything for t in ("flux-dev", "sd3.5-medium", "sd3.5-large"))
    import json
    import struct
    header = json.dumps({"double_blocks.0.img_attn.norm.key_norm.scale": {
        "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (paths.checkpoints_dir / "flux1-schnell.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + b"\0" * 4)
    update, message = build_tab(a1111).on_source("flux1-schnell.safetensors", "v1x")
    assert "value" not in update and "flux-schnell" in message and "has no Flux" in message


def test_the_standalone_tab_lists_part_files_beside_its_checkpoints(host):
    """Flux's / SD3.5's part fields choose among the files of the checkpoints folder and of
    VAE/ and text_encoder/ beside it (a WebUI's models folder), by name, each starting on
    the one file its name suggests; a path still goes in (the dropdown takes any value)."""
    from dreambooth.host.parts import likely_part
    models = host.paths.checkpoints_dir
    for f in (models / "flux1-dev.safetensors", models / "clip_l.safetensors",
              models.parent / "VAE" / "ae.safetensors", models.parent / "VAE" / "notes.txt",
              models.parent / "text_encoder" / "t5xxl_fp16.safetensors"):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    tab = build_tab(host)
    w = tab.widgets
    assert isinstance(w["flux_t5xxl"], gr.Dropdown) and w["flux_t5xxl"].allow_custom_value
    assert tab.parts["ae.safetensors"] == str(models.parent / "VAE" / "ae.safetensors")
    assert "notes.txt" not in tab.parts and "flux1-dev.safetensors" in tab.parts
    assert (w["flux_clip_l"].value, w["flux_t5xxl"].value, w["flux_ae"].value) == (
        "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors")
    assert not w["sd35_clip_g"].value
    listed = dict.fromkeys(["clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors",
                            "t5xxl_fp8_e4m3fn.safetensors", "flux_vae.safetensors",
                            "sd3.5_vae.safetensors", "ae_fp16.safetensors"], "")
    guesses = {f: likely_part(f, listed) for f in ("flux_clip_l", "sd35_clip_g", "flux_t5xxl",
                                                   "flux_ae", "sd35_vae")}
    assert guesses == {"flux_clip_l": "clip_l.safetensors", "sd35_clip_g": "clip_g.safetensors",
                       "flux_t5xxl": "", "flux_ae": "", "sd35_vae": "sd3.5_vae.safetensors"}
    assert likely_part("flux_ae", listed, ["/m/VAE/flux_vae.safetensors"]) == \
        "flux_vae.safetensors"
    # listed as Forge lists them, never a default: a GGUF or a scaled fp8 file (not read here)
    assert likely_part("flux_t5xxl", dict.fromkeys(["t5-v1_1-xxl-encoder-Q8_0.gguf"], "")) == ""
    assert likely_part("flux_t5xxl", dict.fromkeys(["t5xxl_fp8_e4m3fn_scaled.safetensors",
                                                    "t5xxl_fp16.safetensors"], "")) == \
        "t5xxl_fp16.safetensors"


def test_model_type_is_detected_from_the_checkpoint_header(host, tmp_path):
    import json
    import struct
    header = json.dumps({"cond_stage_model.model.transformer.resblocks.0.ln_1.weight": {
        "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = host.paths.checkpoints_dir / "sd2.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    assert sniff_model_type(path) == "v2x-512"
    tab = build_tab(host)
    update, message = tab.on_source("sd2.safetensors", "v1x")
    assert update["value"] == "v2x-512" and "detected" in message


def test_concept_panels_add_and_remove(host):
    tab = build_tab(host)
    n, *boxes = tab.on_count(3)
    assert n == 3 and [b["visible"] for b in boxes] == [True, True, True, False]
    assert tab.on_count(0)[0] == 1 and tab.on_count(99)[0] == fields.MAX_CONCEPTS


def test_train_with_bad_values_lists_every_problem_and_starts_nothing(host):
    tab = build_tab(host)
    args = [1] + [tab.widgets[k].value for k in tab.widgets]
    args[1 + list(tab.widgets).index("model_name")] = "bad/name"
    message = tab.on_train(*args)
    assert "model_name" in message and "source_checkpoint" in message and "concepts" in message
    assert not tab.actions.manager.busy()


def test_settings_save_and_load_as_the_cli_json(host, tmp_path):
    from dreambooth import TrainingConfig
    tab = build_tab(host)
    values = {k: tab.widgets[k].value for k in tab.widgets}
    values.update({"model_name": "dog", "learning_rate": 3e-6,
                   "concepts[0].instance_prompt": "photo of sks dog",
                   "concepts[0].instance_data_dir": str(host.paths.data_dir / "dog")})
    assert "Settings saved" in tab.actions.save_settings(values, 1)
    saved = host.paths.work_dir / "dog" / "config.json"
    assert TrainingConfig.load(saved).learning_rate == 3e-6  # what `--config` reads
    out = tab.on_load("dog")
    assert "Loaded" in out[0] and out[1] == 1
    loaded = dict(zip(tab.widgets, out[2 + fields.MAX_CONCEPTS:]))
    assert loaded["learning_rate"] == 3e-6 and loaded["concepts[0].instance_prompt"] == \
        "photo of sks dog"


@pytest.mark.slow
def test_train_button_runs_the_child_and_streams_progress(host, tiny_inputs, train_python,
                                                         tmp_path):
    host.python = train_python
    tab = build_tab(host)
    values = {k: tab.widgets[k].value for k in tab.widgets}
    values.update(quick_values(tiny_inputs, host.paths.work_dir, host.paths.checkpoints_dir))
    message = tab.on_train(1, *[values[k] for k in tab.widgets])
    assert "started" in message, message
    frames = list(tab.stream())
    progress, result, gallery, loss, final, log, saved, banner, models, use = frames[-1]
    assert "data-state='finished'" in progress and "Saved" in result
    assert Path(final).is_file() and Path(final).parent == host.paths.checkpoints_dir
    assert "<polyline" in loss or len(frames) >= 1
    assert use["visible"] is False  # standalone: no txt2img to switch to
    assert "VRAM" not in progress  # a CPU run has none
    assert banner == ""  # the "started" banner clears when the run ends
    assert "'quick'" in str(models["choices"])  # "Saved models" re-read
    saved = [f[6] for f in frames if "choices" in f[6]][-1]  # sent when the list grows
    assert saved["choices"] == [final] and saved["value"] == final
    assert all(f[7] != "" for f in frames[:-1])  # the banner stays while the run runs


def test_bad_values_then_the_stream_keeps_the_error_banner(host):
    """The stream after a refused Train must not wipe the banner that says why."""
    tab = build_tab(host)
    assert "Please fix" in tab.on_train(*([1] + [tab.widgets[k].value for k in tab.widgets]))
    frames = list(tab.stream())
    assert len(frames) == 1 and frames[0][7] != "" and frames[0][-1]["visible"] is False


def test_every_checkpoint_of_a_cancelled_run_is_offered_for_txt2img(host, tmp_path):
    """Intermediate saves and a cancelled run's last save are listed; LoRA files are not
    (they are used from the prompt); a path the run did not save is refused."""
    from dreambooth.host.runner import Progress

    class WithTxt2img(Host):
        chosen: list = []

        def select_checkpoint(self, path):
            self.chosen.append(path)
            return Path(path).name

    host = WithTxt2img(host.paths)
    tab = build_tab(host)
    ckpt = host.paths.checkpoints_dir
    saved = [str(ckpt / "dog_4.safetensors"), str(host.paths.lora_dir / "dog_4.safetensors"),
             str(ckpt / "dog_6.safetensors")]
    p = Progress(state="cancelled", saved=saved, final_path=saved[-1], device="cuda")
    tab.actions.manager.status = lambda: p
    view = tab.actions.status_view()
    assert view.checkpoints == [saved[0], saved[2]] and view.selected == saved[2]
    assert view.can_use and "VRAM" in view.progress_html
    assert "dog_4" in tab.actions.use_in_txt2img(saved[0]) and host.chosen == [saved[0]]
    assert "not a checkpoint this run saved" in tab.actions.use_in_txt2img("/etc/passwd")
    assert "not a checkpoint this run saved" in tab.actions.use_in_txt2img(saved[1])
    assert host.chosen == [saved[0]]


def test_cancel_stop_now_and_requests_answer_in_words(host):
    """Cancel saves; Stop now says it does not; a Save now is answered by what the run can
    do: sent, held until the run can act, or refused while it stops."""
    tab = build_tab(host)
    actions, manager = tab.actions, tab.actions.manager
    assert "Nothing is training" in actions.cancel() and "Nothing" in actions.stop_now()
    stops = []
    manager.cancel = lambda now=False: stops.append(now) or True
    assert "saves a checkpoint and its resume state" in actions.cancel()
    assert "not saved" in actions.stop_now() and stops == [False, True]
    for answer, words in (("sent", "Asked for a checkpoint: it is made at the next step."),
                          ("queued", "still starting; it is made at its first step"),
                          ("ending", "takes no more requests"), ("idle", "Nothing is training")):
        manager.request = lambda what, answer=answer: answer
        assert words in actions.save_now(), answer
    manager.request = lambda what: "sent"
    assert "Asked for preview images: they are made at the next step." in actions.sample_now()
    ids = [c.elem_id for c in tab.blocks.blocks.values() if getattr(c, "elem_id", None)]
    assert "dreambooth_stop_now" in ids
