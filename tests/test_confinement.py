"""A client can only touch what the host offers: every path a remote caller names (HTTP API,
tab handlers) stays inside the host's folders; `..`, absolute paths elsewhere, symlinks out,
FIFOs, devices and URLs are refused naming the field, and nothing on disk changes."""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import struct
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from dreambooth.host import api  # noqa: E402
from dreambooth.host.confine import SHORT  # noqa: E402
from dreambooth.host.guard import (HostGuard, allowed_names, check_auth_pairs,  # noqa: E402
                                   protect)
from dreambooth.host.interface import Checkpoint, Host, standalone_paths  # noqa: E402
from dreambooth.host.runner import RunManager  # noqa: E402
from dreambooth.ui.actions import TabActions  # noqa: E402

pytestmark = pytest.mark.reliability


def _fake_safetensors(path: Path) -> None:
    header = json.dumps({"__metadata__": {}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)


class OddHost(Host):
    """A host whose list also offers a FIFO and a device (as a WebUI's list might)."""

    def list_checkpoints(self):
        odd = [Checkpoint("fifo.safetensors", str(self.paths.checkpoints_dir / "fifo.safetensors")),
               Checkpoint("stdin.safetensors", "/proc/self/fd/0"),
               Checkpoint("zero.safetensors", "/dev/zero")]
        return super().list_checkpoints() + odd


@pytest.fixture
def world(tmp_path):
    """The host's folders with a checkpoint and images, an 'outside' with a secret, a symlink
    out of every root and a FIFO."""
    paths = standalone_paths(tmp_path / "ui", lora_dir=tmp_path / "ui" / "lora",
                             data_dir=tmp_path / "ui" / "data")
    for folder in (paths.checkpoints_dir, paths.work_dir, paths.lora_dir, paths.data_dir):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    _fake_safetensors(paths.checkpoints_dir / "base.safetensors")
    (paths.data_dir / "dog").mkdir()
    (paths.data_dir / "dog" / "1.png").write_bytes(b"png")
    outside = tmp_path / "outside"
    (outside / "imgs").mkdir(parents=True)
    (outside / "imgs" / "1.png").write_bytes(b"png")
    _fake_safetensors(outside / "secret.safetensors")
    os.mkfifo(paths.checkpoints_dir / "fifo.safetensors")
    (paths.work_dir / "pipe").mkdir()
    os.mkfifo(paths.work_dir / "pipe" / "config.json")
    host = OddHost(paths)
    app = fastapi.FastAPI()
    manager = RunManager(host, cancel_grace_s=5)
    api.mount(app, host, manager)
    return {"host": host, "client": TestClient(app), "manager": manager, "root": tmp_path,
            "outside": outside, "actions": TabActions(host, manager)}


def tree_hash(root: Path) -> str:
    """Every entry under `root` (not following symlinks): its path, kind and content."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            h.update(str(p.relative_to(root)).encode())
            if p.is_symlink():
                h.update(b"L" + os.readlink(p).encode())
            elif p.is_file():
                h.update(b"F" + p.read_bytes())
            else:
                h.update(b"D" if p.is_dir() else b"O")
    return h.hexdigest()


def _good(world) -> dict:
    return {"model_name": "dog", "source_checkpoint": "base.safetensors", "resolution": 64,
            "concepts": [{"instance_data_dir": "dog", "instance_prompt": "photo of sks dog"}]}


# field -> values that leave the host's folders (each: 403 naming the field)
def _dir_values(world, field):
    outside = world["outside"]
    return ["../../../outside", str(outside), str(outside / "imgs"), "/etc", "/tmp",
            "escape", "escape/imgs", "dog/../../../outside", "~", "/proc/self/cwd",
            "s3://someone-elses-bucket/models"]  # a URL would carry the host's credentials


DIR_FIELDS = ["work_dir", "output_dir", "lora_dir", "resume", "logging_dir",
              "concepts[0].instance_data_dir", "concepts[0].class_data_dir"]
CASES = [(f, i) for f in DIR_FIELDS for i in range(11)]


def _set(body: dict, field: str, value) -> dict:
    if field.startswith("concepts[0]."):
        body["concepts"][0][field.split(".", 1)[1]] = value
    else:
        body[field] = value
    return body


@pytest.mark.parametrize("route", ["/models", "/train"])
@pytest.mark.parametrize("field,case", CASES)
def test_api_refuses_folders_outside_the_hosts(world, route, field, case):
    value = _dir_values(world, field)[case]
    before = tree_hash(world["root"])
    r = world["client"].post(api.PREFIX + route, json=_set(_good(world), field, value))
    named = {d["field"] for d in r.json()["detail"]}
    assert r.status_code == 403 and field in named, r.json()
    assert "leaves the folders this host offers" in json.dumps(r.json())
    assert tree_hash(world["root"]) == before and not world["manager"].busy()


@pytest.mark.parametrize("field", ["flux_clip_l", "flux_t5xxl", "flux_ae", "t5_tokenizer_dir",
                                   "sd35_clip_g"])
def test_flux_files_come_from_the_hosts_models_folder(world, field):
    """A remote caller names Flux's (and SD3.5's) files inside the host's models folder (or the work dir),
    never elsewhere."""
    from dreambooth import TrainingConfig
    from dreambooth.host.confine import confine
    for value in (str(world["outside"] / "secret.safetensors"), "../../outside/x"):
        r = world["client"].post(api.PREFIX + "/train", json={**_good(world), field: value})
        assert r.status_code == 403 and field in {d["field"] for d in r.json()["detail"]}
    models = world["host"].paths.checkpoints_dir.parent
    cfg = TrainingConfig.from_dict({**_good(world), field: "models/text_encoder/clip_l"})
    assert getattr(confine(cfg, world["host"]), field) == str(models / "models/text_encoder"
                                                                        "/clip_l")
    assert not world["manager"].busy()


SOURCES = ["{outside}/secret.safetensors", "../../outside/secret.safetensors",
           "/proc/self/fd/0", "/dev/zero", "http://169.254.169.254/latest/meta-data",
           "file:///etc/passwd", "escape/secret.safetensors", "fifo.safetensors",
           "stdin.safetensors", "zero.safetensors", "base.safetensors\x00.txt", "",
           "{ckpt}/../../outside/secret.safetensors"]


@pytest.mark.parametrize("route", ["/models", "/train"])
@pytest.mark.parametrize("source", SOURCES)
def test_api_sources_come_from_the_hosts_list_and_are_regular_files(world, route, source):
    value = source.format(outside=world["outside"],
                          ckpt=world["host"].paths.checkpoints_dir)
    before = tree_hash(world["root"])
    r = world["client"].post(api.PREFIX + route,
                             json={**_good(world), "source_checkpoint": value})
    detail = {d["field"]: d for d in r.json()["detail"]}
    assert r.status_code == 422 and "source_checkpoint" in detail, r.json()
    assert tree_hash(world["root"]) == before and not world["manager"].busy()


MODEL_NAMES = ["../evil", "a/../../b", "/tmp/evil", "..", "escape", "x" * 5000, "a\\..\\b"]


@pytest.mark.parametrize("route", ["/models", "/train"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_api_model_names_stay_one_folder_inside_the_work_dir(world, route, name):
    before = tree_hash(world["root"])
    r = world["client"].post(api.PREFIX + route, json={**_good(world), "model_name": name})
    named = {d["field"] for d in r.json()["detail"]}
    assert r.status_code in (403, 422) and "model_name" in named, r.json()
    assert len(r.text) < 4 * SHORT + 2000  # a huge value is never echoed back whole
    assert tree_hash(world["root"]) == before


@pytest.mark.parametrize("value", ["dog", "{data}/dog", "./dog/../dog"])
def test_api_takes_what_the_host_offers(world, value):
    """The control: folders inside the roots (relative ones count from the field's root)."""
    value = value.format(data=world["host"].paths.data_dir)
    body = _set(_good(world), "concepts[0].instance_data_dir", value)
    body["output_dir"] = "out"
    r = world["client"].post(api.PREFIX + "/models", json=body)
    assert r.status_code == 201, r.json()
    config = r.json()["config"]
    assert config["source_checkpoint"] == str(world["host"].paths.checkpoints_dir /
                                              "base.safetensors")
    assert config["output_dir"] == str(world["host"].paths.checkpoints_dir.resolve() / "out")
    assert (world["host"].paths.work_dir / "dog" / "config.json").is_file()


# -- the tab's handlers ----------------------------------------------------------------------
def _values(world, field, value) -> dict:
    values = {"model_name": "dog", "source_checkpoint": "base.safetensors",
              "concepts[0].instance_data_dir": "dog",
              "concepts[0].instance_prompt": "photo of sks dog", "resolution": 64}
    values[field] = value
    return values


HANDLERS = ["train", "save_settings", "create_model"]


@pytest.mark.parametrize("handler", HANDLERS)
@pytest.mark.parametrize("field,case", CASES)
def test_tab_refuses_folders_outside_the_hosts(world, handler, field, case):
    value = _dir_values(world, field)[case]
    before = tree_hash(world["root"])
    banner = getattr(world["actions"], handler)(_values(world, field, value), 1)
    assert "dreambooth-error" in banner and field in banner, banner
    assert "leaves the folders this host offers" in banner
    assert tree_hash(world["root"]) == before and not world["manager"].busy()


@pytest.mark.parametrize("handler", ["train", "create_model"])
@pytest.mark.parametrize("source", SOURCES)
def test_tab_sources_come_from_the_hosts_list(world, handler, source):
    value = source.format(outside=world["outside"], ckpt=world["host"].paths.checkpoints_dir)
    before = tree_hash(world["root"])
    banner = getattr(world["actions"], handler)(_values(world, "source_checkpoint", value), 1)
    assert "dreambooth-error" in banner and "source_checkpoint" in banner, banner
    assert world["actions"].detect_type(value) is None
    assert tree_hash(world["root"]) == before and not world["manager"].busy()


@pytest.mark.parametrize("name", MODEL_NAMES + ["pipe", "/etc", "../../outside", ""])
def test_load_settings_reads_only_a_model_folder_inside_the_work_dir(world, name):
    before = tree_hash(world["root"])
    values, count, banner = world["actions"].load_settings(name)
    assert "dreambooth-error" in banner and ("model_name" in banner or "--config" in banner)
    assert count == 1 and values["model_name"] == "my_model"  # the defaults, nothing read
    assert tree_hash(world["root"]) == before


# -- how the routes run and who may call them ------------------------------------------------
def test_routes_are_plain_functions_run_in_a_thread(world):
    routes = [r for r in world["client"].app.routes if r.path.startswith(api.PREFIX)]
    assert len(routes) == 8  # models (GET, POST), train, status, cancel, save, sample, outputs
    assert not any(inspect.iscoroutinefunction(r.endpoint) for r in routes)


@pytest.mark.parametrize("headers,content,status", [
    ({"content-type": "text/plain"}, b"{}", 415),
    ({"content-type": "application/x-www-form-urlencoded"}, b"model_name=x", 415),
    ({"content-type": "multipart/form-data; boundary=x"}, b"--x--", 415),
    ({}, b"{}", 415),
    ({"content-type": "application/json", "origin": "http://evil.example"}, b"{}", 403),
    ({"content-type": "application/json", "origin": "null"}, b"{}", 403),
    ({"content-type": "application/json", "referer": "http://evil.example/x"}, b"{}", 403),
    ({"content-type": "application/json", "origin": "http://testserver"}, b"{}", 200),
])
@pytest.mark.parametrize("route", ["/cancel", "/models", "/train"])
def test_posts_must_be_json_from_the_same_site(world, headers, content, status, route):
    before = tree_hash(world["root"])
    r = world["client"].post(api.PREFIX + route, content=content, headers=headers)
    if status == 200 and route != "/cancel":
        status = 422  # accepted as a request, then the empty config is refused
    assert r.status_code == status, r.text
    assert tree_hash(world["root"]) == before


def test_a_huge_body_is_refused_unread(world):
    r = world["client"].post(api.PREFIX + "/train", content=b"{" + b" " * (2 << 20) + b"}",
                             headers={"content-type": "application/json"})
    assert r.status_code == 413 and len(r.text) < 1000


def _guarded(names):
    app = fastapi.FastAPI()
    app.add_api_route("/x", lambda: {"ok": True}, methods=["GET", "POST"])
    protect(app, names)
    return TestClient(app)


@pytest.mark.parametrize("bound,host,method,origin,status", [
    ("127.0.0.1", "127.0.0.1:7861", "GET", None, 200),
    ("127.0.0.1", "localhost:7861", "GET", None, 200),
    ("127.0.0.1", "[::1]:7861", "GET", None, 200),
    ("127.0.0.1", "evil.example:7861", "GET", None, 403),  # DNS rebinding
    ("127.0.0.1", "evil.example", "POST", None, 403),
    ("127.0.0.1", "127.0.0.1.evil.example", "GET", None, 403),
    ("127.0.0.1", "localhost:7861", "POST", "http://evil.example", 403),
    ("127.0.0.1", "localhost:7861", "POST", "null", 403),
    ("127.0.0.1", "localhost:7861", "POST", "http://localhost:7861", 200),
    ("box.lan", "box.lan:7861", "GET", None, 200),
    ("box.lan", "localhost:7861", "GET", None, 403),
    ("0.0.0.0", "anything:7861", "GET", None, 200),  # no single name to check
    ("0.0.0.0", "anything:7861", "POST", "http://evil.example", 403),
])
def test_the_standalone_server_answers_only_to_its_name(bound, host, method, origin, status):
    client = _guarded(allowed_names(bound))
    headers = {"host": host, **({"origin": origin} if origin else {})}
    r = client.request(method, "/x", headers=headers)
    assert r.status_code == status, r.text
    assert isinstance(client.app.middleware_stack, HostGuard)


@pytest.mark.parametrize("auth,ok", [("", True), ("alice:pw", True), ("a:b,c:d", True),
                                     ("alice", False), ("alice:", False), (":pw", False),
                                     ("a:b,c", False)])
def test_auth_needs_user_password_pairs(auth, ok, capsys):
    assert (check_auth_pairs(auth) == "") is ok
    if not ok:
        pytest.importorskip("gradio")
        from dreambooth.ui import standalone
        assert standalone.main(["--auth", auth, "--root", "/nonexistent/never"]) == 2
        assert "--auth needs user:password" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["nope.safetensors", "/etc/passwd"])
def test_an_unknown_source_does_not_make_the_host_rescan(world, monkeypatch, source):
    calls = []
    monkeypatch.setattr(world["host"], "refresh_checkpoints", lambda: calls.append(1))
    r = world["client"].post(api.PREFIX + "/train", json={**_good(world),
                                                          "source_checkpoint": source})
    assert r.status_code == 422 and calls == []
    assert "dreambooth-error" in world["actions"].train(
        _values(world, "source_checkpoint", source), 1) and calls == []


# -- CORS: no page of another site (nor a sandboxed one, Origin 'null') may read an answer ------
OWN = "http://127.0.0.1:7861"
ORIGINS = ["null", "https://evil.example", OWN]
OUR_GETS = ["/status", "/models", "/outputs"]
OUR_POSTS = ["/cancel", "/save", "/sample", "/train", "/models"]


def _allowance(r) -> dict:
    return {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("access-control-")}


def _permissive(app) -> None:
    """The host's CORS middleware at its most open: gradio 4's (it takes 'null' for localhost,
    and any origin when the Host is not a local name), else starlette's echoing every origin."""
    try:
        from gradio.route_utils import CustomCORSMiddleware
        app.add_middleware(CustomCORSMiddleware)
    except ImportError:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origin_regex=".*", allow_credentials=True,
                           allow_methods=["*"], allow_headers=["*"])


def _webui_like(world):
    from dreambooth.host.guard import guard_cors
    app = fastapi.FastAPI()
    _permissive(app)
    app.add_api_route("/config", lambda: {"the": "webui's own"}, methods=["GET"])
    api.mount(app, world["host"], world["manager"])
    guard_cors(app, api.PREFIX, world["host"].origin_allowed)  # as scripts/ does
    return TestClient(app, base_url=OWN)


def _request(client, method, path, origin):
    headers = {"origin": origin, "content-type": "application/json"}
    if method == "OPTIONS":
        headers.update({"access-control-request-method": "POST",
                        "access-control-request-headers": "content-type"})
    return client.request(method, path, headers=headers,
                          content=b"{}" if method == "POST" else None)


@pytest.mark.parametrize("origin", ORIGINS)
@pytest.mark.parametrize("method,route", [("GET", r) for r in OUR_GETS]
                         + [("POST", r) for r in OUR_POSTS]
                         + [("OPTIONS", r) for r in OUR_GETS + OUR_POSTS])
def test_our_routes_give_no_cors_allowance_to_another_site(world, method, route, origin):
    before = tree_hash(world["root"])
    r = _request(_webui_like(world), method, api.PREFIX + route, origin)
    if origin == OWN:  # the page's own origin: answered (a POST's body may still be refused)
        assert r.status_code != 403 and r.status_code < 500, r.text
        assert _allowance(r).get("access-control-allow-origin") in (None, OWN)
    else:
        assert r.status_code == 403 and "another site" in r.json()["detail"], r.text
        assert _allowance(r) == {}, r.headers
    assert tree_hash(world["root"]) == before and not world["manager"].busy()


def test_an_origin_the_owner_opened_keeps_its_allowance_and_the_hosts_routes_are_its_own(
        world, monkeypatch):
    """The WebUI's --cors-allow-origins names sites its owner trusts: they pass. The WebUI's
    own routes (its /config here) are left as its middleware answers them."""
    monkeypatch.setattr(world["host"], "origin_allowed", "https://mine.example".__eq__)
    client = _webui_like(world)
    r = _request(client, "GET", api.PREFIX + "/status", "https://mine.example")
    assert r.status_code == 200
    assert _allowance(_request(client, "OPTIONS", api.PREFIX + "/train", "https://mine.example"))
    r = _request(client, "GET", "/config", "null")
    assert r.status_code == 200  # not ours to change: reported, see the README


@pytest.fixture(scope="module")
def standalone_server(tmp_path_factory):
    """`python -m dreambooth ui` on a free port of 127.0.0.1: (port, its own origin)."""
    pytest.importorskip("gradio")
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    root = tmp_path_factory.mktemp("standalone")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dreambooth", "ui", "--port", str(port),
                             "--root", str(root / "ui")], stdout=log, stderr=subprocess.STDOUT,
                            cwd=root, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    end = time.monotonic() + 180
    while True:  # its line says the guards stand (gradio answers from its launch on)
        try:
            if "Dreambooth UI on" in (root / "server.log").read_text():
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.fail((root / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    yield port, f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)
    log.close()


def _raw(port, method, path, origin):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Origin": origin, "Content-Type": "application/json"}
    if method == "OPTIONS":
        headers.update({"Access-Control-Request-Method": "POST",
                        "Access-Control-Request-Headers": "content-type"})
    conn.request(method, path, body=b"{}" if method == "POST" else None, headers=headers)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, body


def test_the_standalone_server_gives_no_page_of_another_site_a_cors_allowance(standalone_server):
    """Every route, gradio's /config and /info included: GET, POST and a preflight, from a
    sandboxed page ('null'), another site and the page itself."""
    port, own = standalone_server
    gets = ["/", "/config", "/info"] + [api.PREFIX + r for r in OUR_GETS]
    posts = [api.PREFIX + r for r in OUR_POSTS]
    wrong = []
    for origin in ["null", "https://evil.example", own]:
        for method, path in [("GET", p) for p in gets] + [("POST", p) for p in posts] \
                + [("OPTIONS", p) for p in gets + posts]:
            status, headers, body = _raw(port, method, path, origin)
            allowance = {k: v for k, v in headers.items() if k.startswith("access-control-")}
            foreign = origin != own
            ok = (not allowance and (status == 403 or (method == "GET" and not path.startswith(
                api.PREFIX)))) if foreign else (status < 500 and status != 403 and  # gradio 3: *
                                                allowance.get("access-control-allow-origin",
                                                              own) in (own, "*"))
            if not ok:
                wrong.append(f"{method} {path} Origin {origin}: {status} {allowance} {body[:80]}")
    assert not wrong, "\n".join(wrong)


def test_a_part_file_named_as_the_host_lists_it_is_that_file(world):
    """Flux's / SD3.5's part files by the name the host lists (Forge's VAE / Text Encoder list;
    here the standalone host's): the name is the listed file, wherever the host keeps it. What
    the list leaves out (a symlink out, a FIFO), and any path beside a listed file outside the
    roots, are checked as every path is."""
    import dataclasses
    from dreambooth import TrainingConfig
    from dreambooth.host.confine import confine
    host, outside = world["host"], world["outside"]
    encoders = host.paths.checkpoints_dir.parent / "text_encoder"
    encoders.mkdir()
    _fake_safetensors(encoders / "clip_l.safetensors")
    (host.paths.checkpoints_dir / "leak.safetensors").symlink_to(outside / "secret.safetensors")
    listed = host.part_files()
    assert listed["clip_l.safetensors"] == str(encoders / "clip_l.safetensors")
    assert "leak.safetensors" not in listed and "fifo.safetensors" not in listed
    cfg = TrainingConfig.from_dict({**_good(world), "flux_clip_l": "clip_l.safetensors",
                                    "sd35_clip_l": str(encoders / "clip_l.safetensors")})
    assert confine(cfg, host).flux_clip_l == confine(cfg, host).sd35_clip_l == \
        str(encoders / "clip_l.safetensors")
    far = outside / "t5" / "t5xxl_fp16.safetensors"  # a host's folder outside ours
    far.parent.mkdir()
    _fake_safetensors(far)
    host.part_files = lambda: {**listed, far.name: str(far)}
    cfg = dataclasses.replace(cfg, flux_t5xxl=far.name)
    assert confine(cfg, host).flux_t5xxl == str(far)
    before = tree_hash(world["root"])
    for value in ("models/leak.safetensors", str(outside / "secret.safetensors"),
                  str(far.parent / "other.safetensors"), "../t5/t5xxl_fp16.safetensors"):
        r = world["client"].post(api.PREFIX + "/train", json={**_good(world), "flux_t5xxl": value})
        assert r.status_code == 403 and "flux_t5xxl" in {d["field"] for d in r.json()["detail"]}
    assert tree_hash(world["root"]) == before and not world["manager"].busy()
