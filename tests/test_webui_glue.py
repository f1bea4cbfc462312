"""scripts/dreambooth_tab.py against the stand-in WebUI modules (tests/webui_stub): the tab
registers; it renders a banner instead of vanishing when something is broken; training from
the tab's values writes a checkpoint into the WebUI's models folder, refreshes the checkpoint
list and moves the WebUI's model off the GPU and back; "use in txt2img" selects it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

sys.path.insert(0, str(Path(__file__).parent / "webui_stub"))
from dreambooth_test_helpers import deadline, load_webui, quick_values, tiny_inputs, train_python, wait_for  # noqa: E402,F401


@pytest.fixture
def webui(monkeypatch, tmp_path, train_python):
    mods, glue = load_webui(monkeypatch, tmp_path / "webui",
                            ("--dreambooth-python", train_python))
    yield mods, glue
    for key in list(glue.db_runner.MANAGERS):
        manager = glue.db_runner.MANAGERS.pop(key)
        manager.cancel()
        manager.wait(deadline(60))


def test_tab_and_settings_register_with_the_webui(webui):
    mods, glue = webui
    cb = mods["script_callbacks"]
    tabs = cb.ui_tabs_callback()
    assert cb.errors == []
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert isinstance(blocks, gr.Blocks) and (title, elem_id) == ("Dreambooth", "dreambooth")
    cb.ui_settings_callback()
    info = mods["shared"].opts.data_labels["dreambooth_cancel_grace_s"]
    assert info.section == ("dreambooth", "Dreambooth")
    assert "a save in progress is never cut" in info.label and "next Cancel" in info.label


def test_the_cancel_grace_is_read_when_cancel_is_pressed(webui):
    """Changing the setting needs no restart: the manager built with the tab reads it at each
    Cancel (a value the settings file holds by hand falls back to the default)."""
    mods, glue = webui
    mods["script_callbacks"].ui_settings_callback()
    _, manager = glue._manager()
    opts = mods["shared"].opts
    assert manager.grace() == 30.0
    opts.set("dreambooth_cancel_grace_s", 300)
    assert manager.grace() == 300.0
    opts.set("dreambooth_cancel_grace_s", "soon")
    assert manager.grace() == 30.0


def test_paths_follow_the_webuis_flags(webui, tmp_path, monkeypatch):
    mods, glue = webui
    host, _ = glue._manager()
    models = Path(mods["paths"].models_path)
    assert host.paths.checkpoints_dir == Path(mods["sd_models"].model_path)
    assert host.paths.work_dir == models / "dreambooth"
    assert host.paths.lora_dir == models / "Lora"
    mods["shared"].cmd_opts.ckpt_dir = str(tmp_path / "ckpts")
    mods["shared"].cmd_opts.dreambooth_dir = str(tmp_path / "db")
    mods["shared"].cmd_opts.api_auth = "u:p"
    other = glue.WebUIHost()
    assert other.paths.checkpoints_dir == tmp_path / "ckpts"
    assert other.paths.work_dir == tmp_path / "db" and other.api_auth == "u:p"
    assert other.paths.data_dir == tmp_path / "db"  # image folders: the work dir by default
    mods["shared"].cmd_opts.dreambooth_data_dir = str(tmp_path / "images")
    assert glue.WebUIHost().paths.data_dir == tmp_path / "images"


def test_embeddings_go_to_the_webuis_embeddings_dir_and_reload_it(webui, tmp_path):
    mods, glue = webui
    import modules.sd_hijack as sd_hijack
    host, _ = glue._manager()
    assert host.paths.embeddings_dir == Path(mods["paths"].data_path) / "embeddings"
    mods["shared"].cmd_opts.embeddings_dir = str(tmp_path / "emb")  # --embeddings-dir
    other = glue.WebUIHost()
    assert other.paths.embeddings_dir == tmp_path / "emb"
    from dreambooth.ui.actions import host_defaults
    assert host_defaults(other)["embedding_dir"] == str(tmp_path / "emb")
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "mine_5.safetensors").write_bytes(b"x")
    db = sd_hijack.model_hijack.embedding_db
    other.refresh_embeddings()
    assert db.reloads[-1] is True and "mine_5" in db.word_embeddings


def test_a_broken_tab_shows_a_banner_instead_of_vanishing(webui, monkeypatch):
    mods, glue = webui
    import dreambooth.ui.tab as tab_module

    def broken(*a, **k):
        raise ImportError("No module named 'something_needed'")
    monkeypatch.setattr(tab_module, "build_tab", broken)
    tabs = mods["script_callbacks"].ui_tabs_callback()
    assert mods["script_callbacks"].errors == [] and len(tabs) == 1
    blocks = tabs[0][0]
    html = [c.value for c in blocks.blocks.values() if isinstance(c, gr.HTML)]
    assert any("something_needed" in h and "install.py" in h for h in html)


def test_a_package_that_fails_to_import_still_gives_a_tab(monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name == "dreambooth" or name.startswith("dreambooth."):
            raise ImportError("broken install")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", failing)
    mods, glue = load_webui(monkeypatch, tmp_path / "webui")
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert "broken install" in glue.LOAD_ERROR
    tabs = mods["script_callbacks"].ui_tabs_callback()
    assert len(tabs) == 1 and tabs[0][1:] == ("Dreambooth", "dreambooth")


def test_missing_training_packages_show_a_banner_with_the_fix(webui, monkeypatch):
    mods, glue = webui
    monkeypatch.setattr(glue, "missing_dependencies",
                        lambda python=None: (["diffusers==0.31.0"], "python -m pip install x"))
    glue.STATE.clear()
    blocks = mods["script_callbacks"].ui_tabs_callback()[0][0]
    html = " ".join(c.value for c in blocks.blocks.values() if isinstance(c, gr.HTML))
    assert "diffusers==0.31.0" in html and "python -m pip install x" in html


@pytest.mark.slow
def test_training_from_the_tab_lands_in_txt2img(webui, tiny_inputs, tmp_path):
    mods, glue = webui
    sd_models, shared = mods["sd_models"], mods["shared"]
    sd_models.list_models()
    before = sd_models.StubModel(None)  # the WebUI's loaded model, on the GPU
    shared.sd_model = before
    from dreambooth.ui.tab import Tab
    host, manager = glue._manager()
    tab = Tab(host, manager)
    tab.build()
    values = {k: tab.widgets[k].value for k in tab.widgets}
    values.update(quick_values(tiny_inputs, host.paths.work_dir, host.paths.checkpoints_dir,
                               name="webui_dog"))
    host.refresh_checkpoints()  # the copied checkpoint joins the WebUI's list
    assert "started" in tab.on_train(1, *[values[k] for k in tab.widgets])
    wait_for(lambda: before.device == "cpu" or not manager.busy(), timeout=120)
    moved_off = before.device == "cpu"
    frames = list(tab.stream())
    p = manager.status()
    assert p.state == "finished", (p.error, p.messages)
    final = Path(p.final_path)
    assert final.parent == Path(sd_models.model_path) and final.is_file()
    assert moved_off and before.device == "cuda"  # off the GPU while training, back after
    names = [c[0] for c in sd_models.calls]
    # off the GPU, trained, the list re-read while still holding the GPU queue, then back
    assert names.index("send_model_to_cpu") < len(names) - 1 - names[::-1].index("list_models") \
        < names.index("send_model_to_device")
    assert shared.state.history == [("begin", "dreambooth"), ("end", "dreambooth")]
    # the list was re-read while the GPU queue was held: a queued txt2img never sees it empty
    assert [c for c in sd_models.calls if c[0] == "list_models"][-1] == ("list_models", True)
    titles = sd_models.checkpoint_tiles()
    assert final.name in titles  # selectable without pressing refresh
    assert frames[-1][-1]["visible"] is True  # "use in txt2img" offered
    listed = [f[6] for f in frames if "choices" in f[6]][-1]  # sent when the list grows
    assert listed["value"] == str(final)  # ... for the run's final checkpoint
    assert "not a checkpoint this run saved" in tab.actions.use_in_txt2img(
        str(Path(sd_models.model_path) / "tiny_v1x.safetensors"))  # only what the run saved
    message = tab.actions.use_in_txt2img(listed["value"])
    assert final.name in message
    assert shared.opts.sd_model_checkpoint == final.name
    assert shared.sd_model.sd_checkpoint_info.filename == str(final)


def test_the_stand_in_has_the_webuis_signatures(webui):
    """The signatures our glue relies on, as stable-diffusion-webui v1.10.1 defines them."""
    import inspect
    mods, _ = webui
    expected = {
        ("script_callbacks", "on_ui_tabs"): "(callback, *, name=None)",
        ("script_callbacks", "on_ui_settings"): "(callback, *, name=None)",
        ("script_callbacks", "on_app_started"): "(callback, *, name=None)",
        ("sd_models", "list_models"): "()",
        ("sd_models", "checkpoint_tiles"): "(use_short=False)",
        ("sd_models", "reload_model_weights"): "(sd_model=None, info=None, forced_reload=False)",
        ("sd_models", "unload_model_weights"): "(sd_model=None, info=None)",
        ("sd_models", "send_model_to_cpu"): "(m)",
        ("sd_models", "send_model_to_device"): "(m)",
        ("call_queue", "wrap_gradio_gpu_call"): "(func, extra_outputs=None)",
        ("shared", "refresh_checkpoints"): "()",
    }
    for (module, name), signature in expected.items():
        assert str(inspect.signature(getattr(mods[module], name))) == signature, name
    assert str(inspect.signature(mods["shared"].state.begin)) == "(job: str = '(unknown)')"
    assert str(inspect.signature(mods["shared"].opts.set)) == \
        "(key, value, is_api=False, run_callbacks=True)"
    info = mods["shared"].OptionInfo(1, "x", section=("dreambooth", "Dreambooth"))
    assert info.section == ("dreambooth", "Dreambooth")
    import modules.sd_hijack as sd_hijack
    assert str(inspect.signature(sd_hijack.model_hijack.embedding_db
                                 .load_textual_inversion_embeddings)) == "(force_reload=False)"
    import modules.ui_common as ui_common
    assert str(inspect.signature(ui_common.create_refresh_button)) == \
        "(refresh_component, refresh_method, refreshed_args, elem_id)"


def test_offload_moves_the_model_and_restores_it_even_on_error(webui):
    mods, glue = webui
    sd_models, shared = mods["sd_models"], mods["shared"]
    model = shared.sd_model = sd_models.StubModel(None)
    host, _ = glue._manager()
    with pytest.raises(RuntimeError):
        with host.model_offloaded():
            assert model.device == "cpu" and mods["call_queue"].queue_lock.locked()
            raise RuntimeError("the child could not start")
    assert model.device == "cuda" and not mods["call_queue"].queue_lock.locked()
    assert shared.state.history == [("begin", "dreambooth"), ("end", "dreambooth")]


def test_offload_on_a_fork_without_send_model_to_cpu_unloads_and_reloads(webui, monkeypatch):
    mods, glue = webui
    sd_models, shared = mods["sd_models"], mods["shared"]
    (Path(sd_models.model_path) / "base.safetensors").write_bytes(b"x")
    sd_models.list_models()
    shared.sd_model = sd_models.load_model()
    monkeypatch.delattr(sd_models, "send_model_to_cpu")
    host, _ = glue._manager()
    sd_models.calls.clear()
    with host.model_offloaded():
        pass
    assert [c[0] for c in sd_models.calls] == ["unload_model_weights", "reload_model_weights"]


def test_api_routes_mount_on_the_webuis_app_under_its_auth(webui):
    fastapi = pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient
    mods, glue = webui
    mods["shared"].cmd_opts.api_auth = "user:pw"
    glue.STATE.clear()
    app = fastapi.FastAPI()
    mods["script_callbacks"].app_started_callback(None, app)
    assert not [r for r in app.routes if "/dreambooth/" in getattr(r, "path", "")]  # no --api
    mods["shared"].cmd_opts.api = True
    app = fastapi.FastAPI()
    mods["script_callbacks"].app_started_callback(None, app)
    assert mods["script_callbacks"].errors == []
    client = TestClient(app)
    assert client.get("/dreambooth/v1/status").status_code == 401
    r = client.get("/dreambooth/v1/models", auth=("user", "pw"))
    assert r.status_code == 200 and r.json()["models"] == []


def test_our_routes_in_the_webui_give_no_cors_allowance_to_another_site(webui):
    """The WebUI's app answers CORS itself (gradio 4's middleware allows a sandboxed page,
    Origin 'null'); the glue keeps our routes out of it, except for the sites the WebUI's
    --cors-allow-origins names."""
    fastapi = pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient
    from starlette.middleware.cors import CORSMiddleware
    mods, glue = webui
    mods["shared"].cmd_opts.api = True
    mods["shared"].cmd_opts.cors_allow_origins = "https://mine.example"
    glue.STATE.clear()
    app = fastapi.FastAPI()
    app.add_middleware(CORSMiddleware, allow_origin_regex=".*", allow_credentials=True,
                       allow_methods=["*"], allow_headers=["*"])
    mods["script_callbacks"].app_started_callback(None, app)
    client = TestClient(app, base_url="http://127.0.0.1:7860")
    for origin in ("null", "https://evil.example"):
        r = client.get("/dreambooth/v1/status", headers={"origin": origin})
        assert r.status_code == 403 and not [k for k in r.headers
                                             if k.lower().startswith("access-control-")]
        r = client.options("/dreambooth/v1/train", headers={
            "origin": origin, "access-control-request-method": "POST"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = client.get("/dreambooth/v1/status", headers={"origin": "https://mine.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == \
        "https://mine.example"
    assert client.get("/dreambooth/v1/status",
                      headers={"origin": "http://127.0.0.1:7860"}).status_code == 200


@pytest.mark.slow
def test_a_lora_from_the_tab_lands_in_the_lora_list(webui, tiny_inputs, monkeypatch):
    mods, glue = webui
    from dreambooth.config import TrainingConfig
    if "method" not in TrainingConfig.__dataclass_fields__:
        pytest.skip("this core has no LoRA output")
    import importlib
    networks = importlib.import_module("networks")  # the built-in Lora extension's module
    from dreambooth.ui.tab import Tab
    host, manager = glue._manager()
    tab = Tab(host, manager)
    tab.build()
    values = {k: tab.widgets[k].value for k in tab.widgets}
    values.update(quick_values(tiny_inputs, host.paths.work_dir, host.paths.checkpoints_dir,
                               name="webui_lora"))
    host.refresh_checkpoints()  # the copied checkpoint joins the WebUI's list
    values.update({"method": "lora", "lora_rank": 4})  # the tab's Method dropdown
    assert values["lora_dir"] == str(Path(mods["shared"].cmd_opts.lora_dir))
    assert "started" in tab.on_train(1, *[values[k] for k in tab.widgets])
    frames = list(tab.stream())
    p = manager.status()
    assert p.state == "finished", (p.error, p.messages)
    assert Path(p.final_path).parent == Path(mods["shared"].cmd_opts.lora_dir)
    assert "webui_lora" in " ".join(networks.available_networks)
    assert frames[-1][-1]["visible"] is False and "<lora:" in frames[-1][5]
    assert "Press Refresh in the Lora tab" in frames[-1][5]  # the page's cards are cached
