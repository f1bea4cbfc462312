"""HTTP API under /dreambooth/v1 on the host's FastAPI app (the WebUI's, from on_app_started).

Only plain Request/JSONResponse, so the same code runs on fastapi 0.94 + pydantic 1 (A1111 1.10)
and on newer fastapi + pydantic 2 (Forge). Under the WebUI's --api-auth every route needs HTTP
basic auth. Every answer is JSON with a status: a problem with the request is 4xx, its body
{"detail": [{"field", "value", "why", "fix"}, ...]} (values cut to 200 characters) or
{"detail": sentence, "fix": sentence}; 500 is kept for our own bugs, said as such, the traceback
in the log file it names (`Api.answering`, the one boundary every route goes through). Every
path in a request stays inside the host's folders (dreambooth.host.confine: 403 naming the
field otherwise); the source is a checkpoint from the host's list. A request from another
site's page (its Origin, or a sandboxed page's 'null') is refused (403), and a POST must be
application/json, so a web page can neither read nor drive the API.
"""
from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import os
import secrets
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..config import Problem, TrainingConfig
from ..config.errors import CheckpointError, ConfigError, DreamboothError, short_repr
from ..config.folders import claim_model_dir
from ..config.runlog import failure
from ..config.textfile import parse_json
from .confine import SHORT, checked, pick_source, refused, short, training_now
from .guard import FOREIGN, cross_site
from .interface import Host, host_defaults, sniff_model_type
from .runner import RunManager

PREFIX = "/dreambooth/v1"
REFUSED = {"idle": "Nothing is training, so there is nothing to {what}.",
           "ending": "The run is stopping or has stopped, so it takes no more requests.",
           "unsupported": "This system has no signal to ask a running job to {what}."}
MAX_BODY = 1 << 20  # a config is a few KiB; more is refused unread
SETTINGS = "config.json"


class Refused(DreamboothError):
    """A request the API turns down with `status`: a sentence (and its fix), or `problems`."""

    def __init__(self, status: int, message: str = "", hint: str = "",
                 problems: list | None = None, headers: dict | None = None, **extra) -> None:
        super().__init__(message, hint)
        self.status, self.problems, self.headers, self.extra = status, problems, headers, extra


def clean(value, depth: int = 0):
    """`value` as JSON can carry it: no NaN/Infinity (null), no lone surrogates (escaped), no
    number too long to write, nothing nested past 64 levels."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool) or (isinstance(value, int)
                                                    and value.bit_length() < 10_000):
        return value
    if depth < 64 and isinstance(value, dict):
        return {clean(str(k)): clean(v, depth + 1) for k, v in value.items()}
    if depth < 64 and isinstance(value, (list, tuple)):
        return [clean(v, depth + 1) for v in value]
    return short_repr(value)


def reply(content, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(clean(content), status_code=status, headers=headers)


def _shown(value):
    """A problem's value as the answer echoes it: short, whatever it holds."""
    if isinstance(value, str):
        return short(value)
    try:
        if len(json.dumps(value, allow_nan=False)) <= SHORT:
            return value
    except (TypeError, ValueError, RecursionError):
        pass
    return short_repr(value, SHORT)


def _problems(problems: list[Problem], status: int = 422, headers=None) -> JSONResponse:
    detail = [{"field": short(p.field), "value": _shown(p.value), "why": short(p.why, 1000),
               "fix": short(p.fix, 2000)} for p in problems]
    return reply({"detail": detail}, status, headers)


def _error(status: int, message: str, hint: str = "", headers=None, **extra) -> JSONResponse:
    return reply({"detail": short(message, 2000), **({"fix": short(hint, 2000)} if hint else {}),
                  **extra}, status, headers)


def check_auth(header: str, credentials: str) -> bool:
    """True when `header` ('Basic base64(user:pass)') matches one of 'u:p,u2:p2'."""
    if not credentials:
        return True
    if not header.lower().startswith("basic "):
        return False
    try:
        given = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    pairs = [c.strip() for c in credentials.split(",") if ":" in c]
    return any(secrets.compare_digest(given.encode(), pair.encode()) for pair in pairs)


async def raw_body(request: Request) -> bytes | None:
    """The request's body, or None when it is over MAX_BODY (read without blocking the loop;
    the routes themselves are plain functions run in a thread)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class Api:
    def __init__(self, host: Host, manager: RunManager) -> None:
        self.host, self.manager = host, manager

    def answering(self, endpoint):
        """`endpoint` behind the API's one boundary: whatever it returns or raises becomes a
        JSON answer with a status; an exception we did not foresee is a 500 that says "this is
        a bug" and names the log file holding its traceback (also said in the host's log)."""
        @functools.wraps(endpoint)  # FastAPI reads the endpoint's parameters through this
        def route(*args, **kwargs):
            try:
                result = endpoint(*args, **kwargs)
                return result if isinstance(result, Response) else reply(result)
            except Refused as e:
                if e.problems:
                    return _problems(e.problems, e.status, e.headers)
                return _error(e.status, e.message, e.hint, e.headers, **e.extra)
            except ConfigError as e:
                return _problems(e.problems, 403 if refused(e.problems) else 422)
            except DreamboothError as e:
                return _error(422, e.message, e.hint)
            except Exception as e:  # our bug: one sentence out, the traceback to the log
                err = failure(e, what="The request")
                self.host.log(f"{err.message} {err.hint}")
                return _error(500, err.message, err.hint)
        return route

    def guard(self, request: Request) -> None:
        """Refused (401, 403, 415) unless the caller may make this request."""
        if not check_auth(request.headers.get("authorization", ""), self.host.api_auth):
            raise Refused(401, "Not authenticated", headers={"WWW-Authenticate": "Basic"})
        if cross_site(request.headers, request.method) \
                and not self.host.origin_allowed(request.headers.get("origin", "")):
            raise Refused(403, FOREIGN, "Call the API from a program (curl, Python) or from "
                          "this server's own page.")
        if request.method == "POST":
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise Refused(415, problems=[Problem("(content-type)", kind,
                                                     "is not application/json",
                                                     "send the body as JSON with that content "
                                                     "type")])

    def body(self, request: Request, raw: bytes | None) -> dict:
        self.guard(request)
        if raw is None:
            raise Refused(413, problems=[Problem("(body)", "", f"is over {MAX_BODY} bytes",
                                                 "send a smaller JSON object")])
        data = parse_json(raw or b"{}", "(body)")
        if not isinstance(data, dict):
            raise ConfigError([Problem("(body)", type(data).__name__, "is not a JSON object",
                                       "send one {...} object")])
        return data

    # -- routes (plain functions: FastAPI runs them in a thread, file I/O never blocks the loop)
    def models(self, request: Request):
        self.guard(request)
        root = self.host.paths.work_dir
        models = []
        if root.is_dir():
            for folder in sorted(p for p in root.iterdir() if (p / SETTINGS).is_file()):
                models.append({"name": folder.name, "settings": str(folder / SETTINGS)})
        checkpoints = [{"title": c.title, "filename": c.filename}
                       for c in self.host.list_checkpoints()]
        return {"models": models, "checkpoints": checkpoints}

    def config(self, request: Request, raw: bytes | None,
               keep=lambda field: True) -> TrainingConfig:
        """The request's config with the host's defaults filled in, every path confined to the
        host's folders and the source picked from its list, validated (the fields `keep`
        accepts); or ConfigError naming every problem at once."""
        data = self.body(request, raw)
        for key, value in host_defaults(self.host).items():
            data.setdefault(key, value)
        try:
            source = pick_source(self.host, data.get("source_checkpoint"))
        except ConfigError:
            source = None  # confine() below names the field with the others
        if source is not None and "model_type" not in data:
            try:
                data["model_type"] = sniff_model_type(source, strict=True) or "v1x"
            except CheckpointError as e:
                raise ConfigError([Problem("source_checkpoint", data["source_checkpoint"],
                                           e.message, e.hint)]) from None
        return checked(TrainingConfig.from_dict(data), self.host, keep=keep)

    def create(self, request: Request, raw: bytes | None = Depends(raw_body)):
        """The model's folder and settings (201): every setting valid, its concepts may come
        later; 409 while a run of that model is going on (the run writes its settings back
        when it ends: a change now would be lost)."""
        config = self.config(request, raw, keep=lambda field: field != "concepts")
        folder = Path(config.work_dir) / config.model_name
        self.not_training(folder, config.model_name)
        claim_model_dir(folder)
        path = folder / SETTINGS
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(config.to_json(), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DreamboothError(f"The settings could not be written to '{path}' "
                                  f"({e.strerror or e}).", "Check that the work folder is "
                                  "writable and has free space.") from None
        return reply({"name": config.model_name, "settings": str(path),
                      "config": config.to_dict()}, 201)

    def not_training(self, folder: Path, name: str) -> None:
        why = training_now(self.manager, folder, name)
        if why:
            raise Refused(409, why, "Wait for the run to end (or cancel it), then send the "
                          "settings again.")

    def train(self, request: Request, raw: bytes | None = Depends(raw_body)):
        config = self.config(request, raw)
        if self.host.missing_dependencies():
            raise Refused(503, "Training needs packages that are not installed.",
                          missing=self.host.missing_dependencies())
        try:
            self.manager.start(config)
        except RuntimeError as e:
            raise Refused(409, str(e)) from None
        return reply(self.manager.status().to_dict(), 202)

    def status(self, request: Request):
        self.guard(request)
        return self.manager.status().to_dict()

    def cancel(self, request: Request, raw: bytes | None = Depends(raw_body)):
        """{} stops after the running step and saves; {"now": true} stops at once, unsaved."""
        now = self.body(request, raw).get("now", False)
        if not isinstance(now, bool):
            raise Refused(422, problems=[Problem("now", now, "is not true or false", "send true "
                                                 "to stop at once without saving, false (or "
                                                 "nothing) to save first")])
        return {"cancelling": self.manager.cancel(now=now), **self.manager.status().to_dict()}

    def save(self, request: Request, raw: bytes | None = Depends(raw_body)):
        return self.command(request, raw, "save")

    def sample(self, request: Request, raw: bytes | None = Depends(raw_body)):
        return self.command(request, raw, "sample")

    def command(self, request: Request, raw: bytes | None, what: str):
        """202 when the job was asked (it acts at its next step; "queued": it is still
        starting and is asked once it can act), 409 with the reason otherwise."""
        self.body(request, raw)
        answer = self.manager.request(what)
        if answer not in ("sent", "queued"):
            raise Refused(409, REFUSED[answer].format(what=what))
        return reply({"requested": what, "queued": answer == "queued",
                      **self.manager.status().to_dict()}, 202)

    def outputs(self, request: Request):
        self.guard(request)
        files = {}
        for p in self.manager.history + [self.manager.status()]:
            for path in p.saved:
                if Path(path).is_file():
                    files[path] = {"path": path, "model_name": p.model_name,
                                   "bytes": Path(path).stat().st_size}
        return {"outputs": list(files.values())}


def mount(app: FastAPI, host: Host, manager: RunManager) -> Api:
    """Add the routes to `app` (the WebUI's FastAPI app, or the standalone one)."""
    api = Api(host, manager)
    for path, endpoint, method in (("/models", api.models, "GET"),
                                   ("/models", api.create, "POST"),
                                   ("/train", api.train, "POST"),
                                   ("/status", api.status, "GET"),
                                   ("/cancel", api.cancel, "POST"),
                                   ("/save", api.save, "POST"),
                                   ("/sample", api.sample, "POST"),
                                   ("/outputs", api.outputs, "GET")):
        app.add_api_route(PREFIX + path, api.answering(endpoint), methods=[method])
    return api
