"""HTTP API under /dreambooth/v1 on the host's FastAPI app (the WebUI's, from on_app_started).

Only plain Request/JSONResponse, so the same code runs on fastapi 0.94 + pydantic 1 (A1111 1.10)
and on newer fastapi + pydantic 2 (Forge). Under the WebUI's --api-auth every route needs HTTP
basic auth. Errors are JSON: {"detail": [{"field", "value", "why", "fix"}, ...]}, values cut to
200 characters. Every path in a request stays inside the host's folders (dreambooth.host.confine:
403 naming the field otherwise); the source is a checkpoint from the host's list. A POST must be
application/json and not come from another site's page (403), so a web page can't drive it.
"""
from __future__ import annotations

import base64
import binascii
import json
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from ..config import Problem, TrainingConfig
from ..config.errors import ConfigError
from .confine import checked, pick_source, refused, short
from .interface import Host, host_defaults, sniff_model_type
from .runner import RunManager

PREFIX = "/dreambooth/v1"


REFUSED = {"idle": "Nothing is training, so there is nothing to {what}.",
           "ending": "The run is stopping or has stopped, so it takes no more requests.",
           "unsupported": "This system has no signal to ask a running job to {what}."}
MAX_BODY = 1 << 20  # a config is a few KiB; more is refused unread


def _problems(problems: list[Problem], status: int = 422) -> JSONResponse:
    detail = [{"field": short(p.field), "value": short(_jsonable(p.value)), "why": short(p.why),
               "fix": short(p.fix)} for p in problems]
    return JSONResponse({"detail": detail}, status_code=status)


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"detail": short(message), **extra}, status_code=status)


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


def foreign_origin(headers) -> bool:
    """True when the request comes from a page of another site: its Origin (or, without one,
    Referer) names another host than the one it was sent to, or is 'null'."""
    origin = headers.get("origin") or headers.get("referer") or ""
    if not origin:
        return headers.get("sec-fetch-site", "") == "cross-site"
    netloc = urlsplit(origin).netloc if origin != "null" else ""
    return not netloc or netloc.lower() != headers.get("host", "").lower()


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

    def guard(self, request: Request) -> JSONResponse | None:
        if not check_auth(request.headers.get("authorization", ""), self.host.api_auth):
            return JSONResponse({"detail": "Not authenticated"}, status_code=401,
                                headers={"WWW-Authenticate": "Basic"})
        if request.method == "POST":
            if foreign_origin(request.headers):
                return _error(403, "Requests from another site's page are refused.")
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return _problems([Problem("(content-type)", kind, "is not application/json",
                                          "send the body as JSON with that content type")], 415)
        return None

    def body(self, request: Request, raw: bytes | None) -> dict | JSONResponse:
        if (denied := self.guard(request)) is not None:
            return denied
        if raw is None:
            return _problems([Problem("(body)", "", f"is over {MAX_BODY} bytes",
                                      "send a smaller JSON object")], 413)
        try:
            data = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _problems([Problem("(body)", "", f"is not valid JSON ({e})",
                                      "send one JSON object")])
        if not isinstance(data, dict):
            return _problems([Problem("(body)", type(data).__name__, "is not a JSON object",
                                      "send one {...} object")])
        return data

    # -- routes (plain functions: FastAPI runs them in a thread, file I/O never blocks the loop)
    def models(self, request: Request):
        if (denied := self.guard(request)) is not None:
            return denied
        root = self.host.paths.work_dir
        models = []
        if root.is_dir():
            for folder in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
                models.append({"name": folder.name, "settings": str(folder / "config.json")})
        checkpoints = [{"title": c.title, "filename": c.filename}
                       for c in self.host.list_checkpoints()]
        return {"models": models, "checkpoints": checkpoints}

    def config(self, request: Request, raw: bytes | None, wanted: tuple = ()):
        """The request's config with the host's defaults filled in, every path confined to the
        host's folders and the source picked from its list, validated (only the `wanted`
        fields when given); or the error response naming every problem at once."""
        data = self.body(request, raw)
        if isinstance(data, JSONResponse):
            return data
        for key, value in host_defaults(self.host).items():
            data.setdefault(key, value)
        try:
            source = pick_source(self.host, data.get("source_checkpoint"))
        except ConfigError:
            source = None  # confine() below names the field with the others
        if source is not None and "model_type" not in data:
            data["model_type"] = sniff_model_type(source) or "v1x"
        try:
            keep = (lambda field: field in wanted) if wanted else (lambda field: True)
            return checked(TrainingConfig.from_dict(data), self.host, keep=keep)
        except ConfigError as e:
            return _problems(e.problems, 403 if refused(e.problems) else 422)

    def create(self, request: Request, raw: bytes | None = Depends(raw_body)):
        config = self.config(request, raw, ("model_name", "source_checkpoint", "model_type",
                                            "work_dir"))
        if isinstance(config, JSONResponse):
            return config
        folder = Path(config.work_dir) / config.model_name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(config.to_json(), encoding="utf-8")
        return JSONResponse({"name": config.model_name, "settings": str(folder / "config.json"),
                             "config": config.to_dict()}, status_code=201)

    def train(self, request: Request, raw: bytes | None = Depends(raw_body)):
        config = self.config(request, raw)
        if isinstance(config, JSONResponse):
            return config
        if self.host.missing_dependencies():
            return _error(503, "Training needs packages that are not installed.",
                          missing=self.host.missing_dependencies())
        try:
            self.manager.start(config)
        except RuntimeError as e:
            return _error(409, str(e))
        return JSONResponse(self.manager.status().to_dict(), status_code=202)

    def status(self, request: Request):
        if (denied := self.guard(request)) is not None:
            return denied
        return self.manager.status().to_dict()

    def cancel(self, request: Request, raw: bytes | None = Depends(raw_body)):
        """{} stops after the running step and saves; {"now": true} stops at once, unsaved."""
        data = self.body(request, raw)
        if isinstance(data, JSONResponse):
            return data
        now = data.get("now", False)
        if not isinstance(now, bool):
            return _problems([Problem("now", now, "is not true or false", "send true to stop at "
                                      "once without saving, false (or nothing) to save first")])
        return {"cancelling": self.manager.cancel(now=now), **self.manager.status().to_dict()}

    def save(self, request: Request, raw: bytes | None = Depends(raw_body)):
        return self.command(request, raw, "save")

    def sample(self, request: Request, raw: bytes | None = Depends(raw_body)):
        return self.command(request, raw, "sample")

    def command(self, request: Request, raw: bytes | None, what: str):
        """202 when the job was asked (it acts at its next step; "queued": it is still
        starting and is asked once it can act), 409 with the reason otherwise."""
        data = self.body(request, raw)
        if isinstance(data, JSONResponse):
            return data
        answer = self.manager.request(what)
        if answer not in ("sent", "queued"):
            return _error(409, REFUSED[answer].format(what=what))
        return JSONResponse({"requested": what, "queued": answer == "queued",
                             **self.manager.status().to_dict()}, status_code=202)

    def outputs(self, request: Request):
        if (denied := self.guard(request)) is not None:
            return denied
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
        app.add_api_route(PREFIX + path, endpoint, methods=[method])
    return api
