"""scripts/dreambooth_tab.py under Forge: the Forge-shaped stand-in (tests/webui_stub/forge,
after lllyasviel/stable-diffusion-webui-forge dfdcbab6), where sd_models.reload_model_weights
and send_model_to_cpu/device are empty and only main_entry's loading parameters change the
model a generation uses. The training child is a shell script that says what a run says (a
checkpoint saved, finished): what is tested is the glue around it, not training."""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

sys.path.insert(0, str(Path(__file__).parent / "webui_stub"))
from dreambooth_test_helpers import REPO, deadline, load_webui  # noqa: E402

from dreambooth.config import TrainingConfig  # noqa: E402
from dreambooth.config import events as ev  # noqa: E402


@pytest.fixture
def forge(monkeypatch, tmp_path):
    mods, glue = load_webui(monkeypatch, tmp_path / "forge", forge=True)
    monkeypatch.setattr(glue, "missing_dependencies", lambda python=None: ([], ""))
    glue.STATE.clear()
    yield mods, glue
    for key in list(glue.db_runner.MANAGERS):
        manager = glue.db_runner.MANAGERS.pop(key)
        manager.cancel()
        manager.wait(deadline(60))


def start_forge(mods) -> object:
    """Forge as it starts (main_entry sets the loading parameters from the option) and a first
    generation, which loads base.safetensors onto the GPU; returns that model."""
    sd_models = mods["sd_models"]
    (Path(sd_models.model_path) / "base.safetensors").write_bytes(b"base")
    sd_models.list_models()
    mods["main_entry"].refresh_model_loading_parameters()
    model = mods["processing"].process_images()
    assert sd_models.loads == ["base.safetensors"] and model.device == "cuda"
    return model


def fake_child(folder: Path, saved: Path) -> str:
    """An interpreter that, called as `python -m dreambooth train ...`, writes `saved` and says
    so as a run does on its event stream."""
    lines = [e.to_json() for e in (ev.CheckpointSaved(str(saved), 2),
                                   ev.Finished(str(saved), 2, 0.1))]
    script = folder / "fake_python"
    script.write_text("#!/bin/sh\nprintf x > '%s'\ncat <<'EOF'\n%s\nEOF\n"
                      % (saved, "\n".join(lines)), encoding="utf-8")
    script.chmod(0o755)
    return str(script)


def run(glue, mods, tmp_path, monkeypatch, saved: Path):
    """One run through the real run manager; the memory manager's record gains a
    ("child started",) where the child starts."""
    host, manager = glue._manager()
    host.python = fake_child(tmp_path, saved)
    real_start = glue.db_runner.TrainingRun.start

    def start(self):
        mods["memory_management"].calls.append(("child started",))
        return real_start(self)
    monkeypatch.setattr(glue.db_runner.TrainingRun, "start", start)
    manager.start(TrainingConfig(model_name="forge_dog", work_dir=str(host.paths.work_dir),
                                 output_dir=str(saved.parent)))
    p = manager.wait(deadline(60))
    assert p.state == "finished", (p.error, p.messages)
    return host, manager


@pytest.mark.parametrize("option_named_it", [False, True])
def test_a_run_frees_forges_gpu_and_use_in_txt2img_switches_the_model(
        forge, tmp_path, monkeypatch, option_named_it):
    """Done when (issue 22): the run unloads through Forge's memory manager before the child
    and calls nothing after; Use in txt2img makes the next generation use the picked file,
    also when Forge's option already names it (the state the old glue left behind)."""
    mods, glue = forge
    sd_models, shared, mm = mods["sd_models"], mods["shared"], mods["memory_management"]
    model = start_forge(mods)
    mm.calls.clear()
    sd_models.calls.clear()
    final = Path(sd_models.model_path) / "forge_dog_2.safetensors"
    host, manager = run(glue, mods, tmp_path, monkeypatch, final)
    assert mm.calls == [("unload_all_models",), ("child started",)]  # before, nothing after
    assert model.device == "cpu" and sd_models.loads == ["base.safetensors"]
    assert [c[0] for c in sd_models.calls] == ["list_models"]  # none of A1111's moves
    assert shared.state.history == [("begin", "dreambooth"), ("end", "dreambooth")]
    assert final.name in sd_models.checkpoint_tiles()
    if option_named_it:
        shared.opts.set("sd_model_checkpoint", final.name)
    from dreambooth.ui.actions import TabActions
    assert f"txt2img now uses {final.name}" in TabActions(host, manager).use_in_txt2img(str(final))
    # the page then shows the title in Forge's dropdown: its change handler loads nothing more
    assert mods["main_entry"].checkpoint_change(final.name) is False
    used = mods["processing"].process_images()
    assert used.sd_checkpoint_info.filename == str(final) and used.device == "cuda"
    assert sd_models.loads == ["base.safetensors", final.name]


def test_the_stand_in_loads_only_through_forges_path_and_the_glue_picks_it(forge):
    """AUTOMATIC1111's calls change nothing in Forge (what the issue saw: "Model: base"), and
    the glue uses them only where sd_models has no forge_model_reload."""
    mods, glue = forge
    sd_models, shared = mods["sd_models"], mods["shared"]
    start_forge(mods)
    (Path(sd_models.model_path) / "other.safetensors").write_bytes(b"other")
    sd_models.list_models()
    info = sd_models.checkpoints_list["other.safetensors"]
    shared.opts.set("sd_model_checkpoint", info.title)
    glue.A1111Calls().load(info)
    assert mods["processing"].process_images().sd_checkpoint_info.name == "base.safetensors"
    assert isinstance(glue._manager()[0].calls, glue.ForgeCalls)
    glue.ForgeCalls().load(info)
    assert mods["processing"].process_images().sd_checkpoint_info.name == "other.safetensors"


def test_under_the_a1111_stand_in_the_glue_keeps_a1111s_calls(monkeypatch, tmp_path):
    mods, glue = load_webui(monkeypatch, tmp_path / "webui")
    monkeypatch.setattr(glue, "missing_dependencies", lambda python=None: ([], ""))
    host = glue.WebUIHost()
    assert type(host.calls) is glue.A1111Calls
    assert "modules_forge" not in sys.modules and "backend" not in sys.modules
    assert host.model_types and not any(t.startswith(("flux", "sd3")) for t in host.model_types)
    assert host.part_files() is None and host.selected_parts() == []  # the fields take paths


def test_the_tab_offers_flux_under_forge_only(forge, tmp_path):
    """Forge loads Flux LoRAs: its tab offers the flux-* types (AUTOMATIC1111 1.10's does not:
    the test above and test_ui_build)."""
    from dreambooth.ui import fields
    _, glue = forge
    host = glue._manager()[0]
    spec = next(s for s in fields.config_specs()["Model"] if s.key == "model_type")
    assert {"flux-dev", "flux-schnell", "sd3.5-medium", "sd3.5-large"} <= set(
        fields.host_model_types(spec, host).choices)
    # Forge ships FLUX.1-dev's T5 tokenizer: a new model's default where the folder is there
    assert host.t5_tokenizer_dir.endswith(glue.FORGE_T5_TOKENIZER)
    assert "t5_tokenizer_dir" not in glue.db_host.host_defaults(host)  # (not in the stand-in)
    host.t5_tokenizer_dir = str(tmp_path)
    assert glue.db_host.host_defaults(host)["t5_tokenizer_dir"] == str(tmp_path)


def test_a_lora_under_forge_joins_its_list_and_the_message_says_to_refresh_the_cards(
        forge, tmp_path, monkeypatch):
    mods, glue = forge
    import importlib
    networks = importlib.import_module("networks")  # Forge's sd_forge_lora has the same call
    lora = Path(mods["shared"].cmd_opts.lora_dir) / "forge_dog.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    host, manager = run(glue, mods, tmp_path, monkeypatch, lora)
    assert "forge_dog" in networks.available_networks
    from dreambooth.ui.actions import TabActions
    log = TabActions(host, manager).status_view().log
    assert "<lora:forge_dog:1>" in log and "Press Refresh in the Lora tab" in log
    from dreambooth.host.interface import Host
    alone = TabActions(Host(host.paths), manager).status_view().log  # no Lora tab to refresh
    assert "<lora:forge_dog:1>" in alone and "Refresh" not in alone


def test_a_new_embedding_reaches_forges_loaded_text_encoder(forge):
    mods, glue = forge
    model = start_forge(mods)
    folder = Path(mods["shared"].cmd_opts.embeddings_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sks_dog.safetensors").write_bytes(b"x")
    assert "sks_dog" not in model.text_processing_engine.embeddings.word_embeddings
    glue._manager()[0].refresh_embeddings()
    assert "sks_dog" in model.text_processing_engine.embeddings.word_embeddings


def test_no_offload_flag_leaves_forges_model_alone(forge):
    mods, glue = forge
    model = start_forge(mods)
    mods["shared"].cmd_opts.dreambooth_no_offload = True
    mods["memory_management"].calls.clear()
    with glue._manager()[0].model_offloaded():
        assert mods["call_queue"].queue_lock.locked()
    assert mods["memory_management"].calls == [] and model.device == "cuda"


def test_the_forge_stand_in_has_forges_signatures_and_page_elements(forge):
    """As Forge dfdcbab6 defines them; the page script refreshes Forge's list by its button."""
    mods, _ = forge
    expected = {
        ("main_entry", "checkpoint_change"): "(ckpt_name: str, save=True, refresh=True)",
        ("main_entry", "refresh_model_loading_parameters"): "()",
        ("main_entry", "refresh_models"): "()",
        ("main_entry", "find_files_with_extensions"): "(base_path, extensions)",
        ("main_entry", "modules_change"): "(module_values: list, save=True, refresh=True) -> bool",
        ("memory_management", "unload_all_models"): "()",
        ("sd_models", "forge_model_reload"): "()",
        ("sd_models", "reload_model_weights"): "(sd_model=None, info=None, forced_reload=False)",
        ("sd_models", "send_model_to_cpu"): "(m)",
        ("sd_models", "send_model_to_device"): "(m)",
        ("sd_models", "unload_model_weights"): "(sd_model=None, info=None)",
    }
    for (module, name), signature in expected.items():
        assert str(inspect.signature(getattr(mods[module], name))) == signature, name
    with gr.Blocks() as page:
        mods["main_entry"].make_checkpoint_manager_ui()
    blocks = list(page.blocks.values())
    assert [b for b in blocks if getattr(b, "elem_id", None) == "forge_refresh_checkpoint"]
    assert [b for b in blocks if "model_selection" in (getattr(b, "elem_classes", None) or [])]
    assert '"forge_refresh_checkpoint"' in (REPO / "javascript" / "dreambooth.js").read_text()


def test_forges_part_files_are_the_tabs_dropdowns_by_name(forge, tmp_path):
    """Issue 26: under Forge, the Flux / SD3.5 part fields list what Forge's "VAE / Text
    Encoder" picker lists (models/VAE, models/text_encoder, --text-encoder-dir), by file name;
    each starts on the one file its name suggests, Forge's top-bar pick where several do; the
    saved settings hold the paths (Load shows the names again); the tab's refresh re-reads."""
    from dreambooth.host.parts import PART_FIELDS
    from dreambooth.ui import fields
    from dreambooth.ui.tab import build_tab
    mods, glue = forge
    models, main_entry = Path(mods["paths"].models_path), mods["main_entry"]
    far = tmp_path / "encoders"  # Forge's --text-encoder-dir, outside its models folder
    mods["shared"].cmd_opts.text_encoder_dir = str(far)
    files = [models / "VAE" / "ae.safetensors", models / "VAE" / "sdxl_vae.safetensors",
             models / "text_encoder" / "clip_l.safetensors",
             models / "text_encoder" / "clip_g.safetensors",
             models / "text_encoder" / "t5xxl_fp16.safetensors",
             far / "t5xxl_fp8_e4m3fn.safetensors"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    assert main_entry.module_list == {}  # Forge reads it when it builds its top bar, after tabs
    host, manager = glue._manager()
    tab = build_tab(host, manager)
    w = tab.widgets
    assert all(isinstance(w[k], gr.Dropdown) for k in PART_FIELDS)
    assert sorted(n if isinstance(n, str) else n[0] for n in w["flux_ae"].choices) == \
        sorted(f.name for f in files)
    assert (w["flux_clip_l"].value, w["flux_ae"].value, w["sd35_clip_g"].value) == (
        "clip_l.safetensors", "ae.safetensors", "clip_g.safetensors")
    assert not w["flux_t5xxl"].value and not w["sd35_vae"].value  # two T5s; no SD3 VAE
    main_entry.modules_change(["t5xxl_fp8_e4m3fn.safetensors", "ae.safetensors"])
    assert tab.actions.part_value("flux_t5xxl", "", tab.parts, guess=True) == \
        "t5xxl_fp8_e4m3fn.safetensors"
    values, _ = fields.config_to_values(tab.actions.default_config())
    values.update(model_name="fluxdog", flux_clip_l="clip_l.safetensors",
                  flux_t5xxl="t5xxl_fp8_e4m3fn.safetensors", flux_ae=" ae.safetensors")
    assert "Settings saved" in tab.actions.save_settings(values, 1)
    saved = json.loads((host.paths.work_dir / "fluxdog" / "config.json").read_text())
    assert (saved["flux_clip_l"], saved["flux_t5xxl"], saved["flux_ae"]) == (
        str(files[2]), str(files[5]), str(files[0]))
    shown = dict(zip(tab.widgets, tab.on_load("fluxdog")[2 + fields.MAX_CONCEPTS:]))
    assert shown["flux_t5xxl"] == "t5xxl_fp8_e4m3fn.safetensors"
    (models / "text_encoder" / "t5xxl_fp8_e4m3fn_scaled.safetensors").write_bytes(b"x")
    updates = tab.on_refresh()
    assert len(updates) == 1 + len(tab.part_widgets) == 1 + len(PART_FIELDS)
    assert "t5xxl_fp8_e4m3fn_scaled.safetensors" in str(updates[PART_FIELDS.index(
        "flux_t5xxl") + 1]) and "t5xxl_fp8_e4m3fn_scaled.safetensors" in main_entry.module_list
