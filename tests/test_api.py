"""HTTP API under /dreambooth/v1: start, status, cancel on the real child; bad JSON -> 422 with
the field named; no auth -> 401 when the WebUI's --api-auth is set."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from dreambooth.config import TrainingConfig
from dreambooth.host import api
from dreambooth.host.interface import Checkpoint, Host, standalone_paths
from dreambooth.host.runner import RunManager

sys.path.insert(0, str(Path(__file__).parent / "webui_stub"))
from dreambooth_test_helpers import deadline, tiny_inputs, train_python, wait_for  # noqa: E402,F401


_MANAGERS: list = []


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test():
    """A test that fails mid-run must not leave its training child running (and loading the
    machine for the tests after it)."""
    yield
    while _MANAGERS:
        manager = _MANAGERS.pop()
        manager.cancel()
        manager.wait(60)


def _client(tmp_path, auth="", python=sys.executable):
    paths = standalone_paths(tmp_path / "ui")
    host = Host(paths, python=python, api_auth=auth)
    app = fastapi.FastAPI()
    manager = RunManager(host, cancel_grace_s=60)
    _MANAGERS.append(manager)
    api.mount(app, host, manager)
    return TestClient(app), host, manager


def _basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _offer(host, tiny) -> dict:
    """The tiny checkpoint and images copied into the host's folders (a remote caller may only
    name what the host offers): {"checkpoint": its title, "instance": the folder}."""
    host.paths.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny["checkpoint"], host.paths.checkpoints_dir / "tiny.safetensors")
    images = host.paths.data_dir / "images"
    if not images.is_dir():
        shutil.copytree(tiny["instance"], images)
    return {"checkpoint": "tiny.safetensors", "instance": images}


def _body(tiny, host, steps_per_image=1):
    offered = _offer(host, tiny)
    return {"model_name": "api_dog", "source_checkpoint": offered["checkpoint"],
            "resolution": 64, "center_crop": True, "steps_per_image": steps_per_image,
            "learning_rate": 1e-4, "output_dir": str(host.paths.checkpoints_dir / "out"),
            "concepts": [{"instance_data_dir": str(offered["instance"]),
                          "instance_prompt": "photo of sks pattern"}]}


def test_auth_is_required_when_the_webui_sets_it(tmp_path):
    client, _, _ = _client(tmp_path, auth="alice:secret,bob:pw")
    assert client.get("/dreambooth/v1/status").status_code == 401
    assert client.get("/dreambooth/v1/status",
                      headers=_basic("alice", "wrong")).status_code == 401
    assert client.get("/dreambooth/v1/status",
                      headers={"Authorization": "Basic !!!"}).status_code == 401
    ok = client.get("/dreambooth/v1/status", headers=_basic("bob", "pw"))
    assert ok.status_code == 200 and ok.json()["state"] == "idle"
    assert client.post("/dreambooth/v1/train", json={}).status_code == 401


def test_no_auth_configured_means_open_routes(tmp_path):
    client, _, _ = _client(tmp_path)
    assert client.get("/dreambooth/v1/status").status_code == 200
    assert client.get("/dreambooth/v1/outputs").json() == {"outputs": []}


def test_bad_json_and_bad_fields_are_422_naming_the_field(tmp_path):
    client, _, manager = _client(tmp_path)
    r = client.post("/dreambooth/v1/train", content=b"{not json",
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "(body)"
    r = client.post("/dreambooth/v1/train", json=[1, 2])
    assert r.status_code == 422 and "not a JSON object" in r.json()["detail"][0]["why"]
    r = client.post("/dreambooth/v1/train", json={"learning_rte": 1e-6, "batch_size": "two"})
    detail = {d["field"]: d for d in r.json()["detail"]}
    assert r.status_code == 422 and "did you mean 'learning_rate'" in detail["learning_rte"]["fix"]
    r = client.post("/dreambooth/v1/train", json={"batch_size": 0, "model_name": "a/b"})
    fields = {d["field"] for d in r.json()["detail"]}
    assert r.status_code == 422 and {"batch_size", "model_name", "concepts",
                                     "source_checkpoint"} <= fields
    assert not manager.busy()


def test_create_model_writes_the_settings_and_lists_it(tmp_path, tiny_inputs):
    client, host, _ = _client(tmp_path)
    r = client.post("/dreambooth/v1/models", json={
        "model_name": "dog", "source_checkpoint": _offer(host, tiny_inputs)["checkpoint"]})
    assert r.status_code == 201, r.json()
    assert r.json()["config"]["model_type"] == "v1x"  # detected from the file
    assert (host.paths.work_dir / "dog" / "config.json").is_file()
    models = client.get("/dreambooth/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["dog"]
    r = client.post("/dreambooth/v1/models", json={"model_name": "x", "source_checkpoint": "no"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "source_checkpoint"


@pytest.mark.slow
def test_start_status_cancel_on_the_real_child(tmp_path, tiny_inputs, train_python):
    client, host, manager = _client(tmp_path, python=train_python)
    r = client.post("/dreambooth/v1/train", json=_body(tiny_inputs, host, 300))
    assert r.status_code == 202, r.json()
    assert client.post("/dreambooth/v1/train",
                       json=_body(tiny_inputs, host)).status_code == 409
    # the loss is read every log_every_steps (10): the status keeps the last one read
    wait_for(lambda: client.get("/dreambooth/v1/status").json()["loss"] is not None, timeout=300)
    status = client.get("/dreambooth/v1/status").json()
    assert status["state"] == "running" and status["total_steps"] > status["step"]
    assert status["loss"] is not None and status["active"] is True
    assert client.post("/dreambooth/v1/cancel", json={}).json()["cancelling"] is True
    final = manager.wait(deadline(120))
    assert final.state == "cancelled"
    status = client.get("/dreambooth/v1/status").json()
    assert status["state"] == "cancelled" and not status["active"]
    assert status["outcome"].startswith(f"Cancelled at step {status['step']} of ")
    assert status["state_path"] and status["state_path"] in status["outcome"]
    assert status["final_path"] in status["outcome"]
    outputs = client.get("/dreambooth/v1/outputs").json()["outputs"]
    assert [o["path"] for o in outputs] == [status["final_path"]]
    assert Path(status["final_path"]).is_file()


def test_save_and_sample_now_without_a_run_say_so(tmp_path):
    client, _, manager = _client(tmp_path, auth="alice:secret")
    assert client.post("/dreambooth/v1/save", json={}).status_code == 401
    for what in ("save", "sample"):
        r = client.post(f"/dreambooth/v1/{what}", json={}, headers=_basic("alice", "secret"))
        assert r.status_code == 409 and f"nothing to {what}" in r.json()["detail"]


def test_save_now_asks_the_running_job(tmp_path, monkeypatch):
    client, _, manager = _client(tmp_path)
    asked = []
    monkeypatch.setattr(manager, "request", lambda what: asked.append(what) or "sent")
    assert client.post("/dreambooth/v1/save", content=b"x").status_code == 415  # not JSON
    r = client.post("/dreambooth/v1/save", json={})
    assert r.status_code == 202 and r.json()["requested"] == "save" and asked == ["save"]
    assert r.json()["queued"] is False


@pytest.mark.parametrize("answer, status, words", [
    ("queued", 202, None), ("ending", 409, "stopping or has stopped"),
    ("unsupported", 409, "no signal"), ("idle", 409, "Nothing is training")])
def test_save_now_while_a_run_starts_or_ends_is_queued_or_refused_in_a_sentence(
        tmp_path, monkeypatch, answer, status, words):
    """Before the child can act the request waits for it (202, queued); while it stops or
    after it ended it is refused (409), never sent to a process that is exiting."""
    client, _, manager = _client(tmp_path)
    monkeypatch.setattr(manager, "request", lambda what: answer)
    r = client.post("/dreambooth/v1/sample", json={})
    assert r.status_code == status
    assert r.json()["queued"] is True if words is None else words in r.json()["detail"]


def test_cancel_takes_now_to_stop_at_once(tmp_path, monkeypatch):
    client, _, manager = _client(tmp_path)
    asked = []
    monkeypatch.setattr(manager, "cancel", lambda now=False: asked.append(now) or True)
    assert client.post("/dreambooth/v1/cancel", json={}).json()["cancelling"] is True
    assert client.post("/dreambooth/v1/cancel", json={"now": True}).status_code == 200
    r = client.post("/dreambooth/v1/cancel", json={"now": "yes"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "now"
    assert asked == [False, True]


# -- one boundary: every request gets a status and a sentence, 500 only for our own bugs ---------
from hostile_configs import body_cases  # noqa: E402

V1_KEY = "cond_stage_model.transformer.text_model.final_layer_norm.weight"


def _header_file(path: Path, header) -> Path:
    """A .safetensors file holding only `header` (no tensor data: nothing here reads any)."""
    import json
    import struct
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def _world(tmp_path, host_class=Host):
    paths = standalone_paths(tmp_path / "ui")
    host = host_class(paths)
    _header_file(paths.checkpoints_dir / "base.safetensors",
                 {V1_KEY: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    (paths.data_dir / "dog").mkdir(parents=True)
    app = fastapi.FastAPI()
    manager = RunManager(host, cancel_grace_s=5)  # starts no run
    api.mount(app, host, manager)
    return TestClient(app, raise_server_exceptions=False), host, manager


def _valid(**changes) -> dict:
    return {"model_name": "dog", "source_checkpoint": "base.safetensors", "resolution": 64,
            "concepts": [{"instance_data_dir": "dog", "instance_prompt": "photo of sks dog"}],
            **changes}


def _assert_said(r, words=()):
    """A 4xx in JSON whose text holds every word, with no traceback and nothing huge echoed."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert "Traceback" not in r.text and len(r.text) < 20_000
    text = json.dumps(r.json())  # valid JSON, whatever the request held
    assert all(w in text for w in words), (words, text[:1000])


@pytest.mark.parametrize("route", ["/train", "/models"])
@pytest.mark.parametrize("case", body_cases(), ids=lambda c: c[0])
def test_the_clis_hostile_configs_are_4xx_sentences_here_too(tmp_path, route, case):
    """The kept corpus the CLI answers in one sentence (hostile_configs.py), as request bodies:
    100 000-deep nesting, 5000-digit numbers, lone surrogates, NaN, names and folders longer
    than the file system takes..."""
    name, data, words = case
    client, host, manager = _world(tmp_path)
    if name == "utf16_no_bom_bytes":  # JSON's detection reads a UTF-16 body: its key is named
        words = ["is not a known setting"]
    r = client.post(api.PREFIX + route, content=data,
                    headers={"content-type": "application/json"})
    _assert_said(r, words)
    assert not manager.busy() and not list(host.paths.work_dir.glob("*/config.json"))


@pytest.mark.parametrize("field,value,words", [
    ("model_name", "a\ud800b", ["model_name", "\\ud800"]),
    ("model_name", "\U0001F600" * 70, ["model_name", "bytes"]),
    ("work_dir", "x" * 300, ["work_dir", "255 bytes"]),
    ("output_dir", "o/" * 2100, ["output_dir", "4095 bytes"]),
    ("learning_rate", float("nan"), ["learning_rate"]),
    ("resolution", 10 ** 4000, ["resolution", "digits"]),
    ("concepts", [{"instance_data_dir": "dog", "instance_prompt": "\udcff"}], ["instance_prompt"]),
], ids=["surrogate", "280_bytes", "300_byte_folder", "4200_byte_path", "nan", "4000_digits",
        "prompt_surrogate"])
def test_values_the_file_system_or_json_cant_take_are_named(tmp_path, field, value, words):
    client, host, _ = _world(tmp_path)
    body = json.dumps(_valid(**{field: value}), ensure_ascii=True)  # "\ud800" escapes, NaN
    for route in ("/models", "/train"):
        r = client.post(api.PREFIX + route, content=body.encode(),
                        headers={"content-type": "application/json"})
        _assert_said(r, words)
    assert not list(host.paths.work_dir.glob("*/config.json"))


@pytest.mark.parametrize("header,words", [
    ([1, 2], ["base.safetensors", "header is a JSON list"]),
    ({"__metadata__": "v2", V1_KEY: {}}, ["__metadata__ is not a JSON object"]),
    ({"__metadata__": {"dreambooth.model_type": ["x"]},
      "cond_stage_model.model.transformer.x": {}}, None),  # odd metadata: read, not a crash
    ("text", ["header is a JSON str"]),
])
def test_a_damaged_checkpoint_header_is_a_sentence(tmp_path, header, words):
    client, host, _ = _world(tmp_path)
    _header_file(host.paths.checkpoints_dir / "base.safetensors", header)
    r = client.post(api.PREFIX + "/models", json=_valid())
    if words is None:
        assert r.status_code == 201 and r.json()["config"]["model_type"] == "v2x-512", r.text
        return
    _assert_said(r, ["source_checkpoint", "Choose another checkpoint", *words])
    assert r.status_code == 422


def test_our_own_bug_is_a_500_that_says_so_and_logs_the_traceback(tmp_path, monkeypatch):
    client, host, manager = _world(tmp_path)
    said = []
    monkeypatch.setattr(host, "log", said.append)

    def broken():
        raise KeyError("planted")
    monkeypatch.setattr(manager, "status", broken)
    r = client.get(api.PREFIX + "/status")
    assert r.status_code == 500 and "This is a bug" in r.json()["detail"]
    assert "KeyError" in r.json()["detail"] and "report it" in r.json()["fix"]
    log = Path(r.json()["detail"].split("the log is at '")[1].split("'")[0])
    assert "Traceback" in log.read_text() and "planted" in log.read_text()
    assert said and "This is a bug" in said[0]


def test_a_run_folder_name_too_long_for_the_file_system_is_a_sentence(tmp_path):
    from dreambooth.config.errors import DreamboothError
    from dreambooth.host.runner import _unique
    with pytest.raises(DreamboothError, match="can't be made .*too long"):
        _unique(tmp_path / ("x" * 300) / "runs" / "stamp")
    assert _unique(tmp_path / "runs") == tmp_path / "runs"


# -- sources by the names a user sees -------------------------------------------------------------
class TitledHost(Host):
    """A host listing checkpoints as the WebUI does: 'sub/name.safetensors [hash]'."""

    def list_checkpoints(self):
        return [Checkpoint(f"{c.title} [93316a775d]", c.filename)
                for c in super().list_checkpoints()]


@pytest.mark.parametrize("name", ["base.safetensors [93316a775d]", "base.safetensors",
                                  "{ckpt}/base.safetensors", "sd/v1.safetensors",
                                  "v1.safetensors", "sd/v1.safetensors [93316a775d]"])
def test_a_source_is_taken_by_title_path_relative_path_or_file_name(tmp_path, name):
    client, host, _ = _world(tmp_path, TitledHost)
    _header_file(host.paths.checkpoints_dir / "sd" / "v1.safetensors", {V1_KEY: {}})
    r = client.post(api.PREFIX + "/models",
                    json=_valid(source_checkpoint=name.format(ckpt=host.paths.checkpoints_dir)))
    assert r.status_code == 201, r.text
    wanted = "v1.safetensors" if "v1" in name else "base.safetensors"
    assert Path(r.json()["config"]["source_checkpoint"]).name == wanted


def test_an_unknown_or_ambiguous_source_lists_the_valid_names(tmp_path):
    client, host, _ = _world(tmp_path, TitledHost)
    _header_file(host.paths.checkpoints_dir / "sd" / "base.safetensors", {V1_KEY: {}})
    r = client.post(api.PREFIX + "/models", json=_valid(source_checkpoint="nope.safetensors"))
    fix = r.json()["detail"][0]["fix"]
    assert r.status_code == 422 and "'base.safetensors [93316a775d]'" in fix
    assert "'sd/base.safetensors [93316a775d]'" in fix
    r = client.post(api.PREFIX + "/models", json=_valid(source_checkpoint="base.safetensors"))
    # the title 'base.safetensors [..]' is the top-level file's: taken, not ambiguous
    assert r.status_code == 201, r.text
    (host.paths.checkpoints_dir / "base.safetensors").unlink()
    _header_file(host.paths.checkpoints_dir / "other" / "base.safetensors", {V1_KEY: {}})
    r = client.post(api.PREFIX + "/models", json=_valid(source_checkpoint="base.safetensors",
                                                        model_name="cat"))
    detail = r.json()["detail"][0]
    assert r.status_code == 422 and "names 2 checkpoints" in detail["why"], r.text
    assert "other/base.safetensors" in detail["fix"] and "sd/base.safetensors" in detail["fix"]


def test_a_folder_outside_names_each_root_once(tmp_path):
    client, host, _ = _world(tmp_path)
    r = client.post(api.PREFIX + "/models", json=_valid(
        concepts=[{"instance_data_dir": "/etc", "instance_prompt": "x"}]))
    detail = {d["field"]: d for d in r.json()["detail"]}
    fix = detail["concepts[0].instance_data_dir"]["fix"]
    assert r.status_code == 403 and fix.count(str(host.paths.work_dir)) == 1, fix


# -- settings of a model that is training ---------------------------------------------------------
def test_settings_of_the_model_in_training_are_refused_not_lost(tmp_path, monkeypatch):
    """The run writes its settings back when it ends: an edit now would silently vanish."""
    client, host, manager = _world(tmp_path)
    assert client.post(api.PREFIX + "/models", json=_valid()).status_code == 201
    settings = host.paths.work_dir / "dog" / "config.json"
    before = settings.read_text()
    run = type("Run", (), {"config": TrainingConfig(work_dir=str(host.paths.work_dir),
                                                   model_name="dog")})()
    monkeypatch.setattr(manager, "run", run)
    monkeypatch.setattr(manager, "busy", lambda: True)
    r = client.post(api.PREFIX + "/models", json=_valid(resolution=128))
    assert r.status_code == 409 and "being trained now" in r.json()["detail"]
    assert "Wait for the run to end" in r.json()["fix"] and settings.read_text() == before
    r = client.post(api.PREFIX + "/models", json=_valid(model_name="cat"))
    assert r.status_code == 201  # another model's settings are free
    from dreambooth.ui.actions import TabActions
    values = {"model_name": "dog", "source_checkpoint": "base.safetensors", "resolution": 128,
              "work_dir": str(host.paths.work_dir),
              "concepts[0].instance_data_dir": "dog", "concepts[0].instance_prompt": "a sks dog"}
    for button in ("save_settings", "create_model"):  # the tab's buttons: the same refusal
        banner = getattr(TabActions(host, manager), button)(values, 1)
        assert "being trained now" in banner and settings.read_text() == before, banner


def test_settings_of_a_model_a_command_line_run_holds_are_refused(tmp_path):
    import os
    import socket
    client, host, _ = _world(tmp_path)
    folder = host.paths.work_dir / "dog"
    assert client.post(api.PREFIX + "/models", json=_valid()).status_code == 201
    lock = folder / ".train.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    r = client.post(api.PREFIX + "/models", json=_valid(resolution=128))
    assert r.status_code == 409 and f"process {os.getpid()}" in r.json()["detail"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    lock.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    assert client.post(api.PREFIX + "/models", json=_valid(resolution=128)).status_code == 201
