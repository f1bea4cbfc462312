"""HTTP API under /dreambooth/v1: start, status, cancel on the real child; bad JSON -> 422 with
the field named; no auth -> 401 when the WebUI's --api-auth is set."""
from __future__ import annotations

import base64
import shutil
import sys
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from dreambooth.host import api
from dreambooth.host.interface import Host, standalone_paths
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
