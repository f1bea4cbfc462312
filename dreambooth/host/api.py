"""HTTP API under /dreambooth/v1 on the host's FastAPI app (the WebUI's, from on_app_started).

Only plain Request/JSONResponse, so the same code runs on fastapi 0.94 + pydantic 1 (A1111 1.10)
and on newer fastapi + pydantic 2 (Forge). Under the WebUI's --api-auth every route needs HTTP
basic auth. Errors are JSON: {"detail": [{"field", "value", "why", "fix"}, ...]}.
"""
from __future__ import annotations

import base64
import binascii
import json
import secrets
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..config import Problem, TrainingConfig
from ..config.errors import ConfigError
from .interface import Host, sniff_model_type
from .runner import RunManager
from .ui.actions import host_defaults

PREFIX = "/dreambooth/v1"


def _problems(problems: list[Problem], status: int = 422) -> JSONResponse:
    detail = [{"field": p.field, "value": _jsonable(p.value), "why": p.why, "fix": p.fix}
              for p in problems]
    return JSONResponse({"detail": detail}, status_code=status)


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"detail": message, **extra}, status_code=status)


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


class Api:
    def __init__(self, host: Host, manager: RunManager) -> None:
        self.host, self.manager = host, manager

    def guard(self, request: Request) -> JSONResponse | None:
        if check_auth(request.headers.get("authorization", ""), self.host.api_auth):
            return None
        return JSONResponse({"detail": "Not authenticated"}, status_code=401,
                            headers={"WWW-Authenticate": "Basic"})

    async def body(self, request: Request) -> dict | JSONResponse:
        raw = await request.body()
        try:
            data = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _problems([Problem("(body)", "", f"is not valid JSON ({e})",
                                      "send one JSON object")])
        if not isinstance(data, dict):
            return _problems([Problem("(body)", type(data).__name__, "is not a JSON object",
                                      "send one {...} object")])
        return data

    # -- routes --------------------------------------------------------------------------------
    async def models(self, request: Request):
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

    async def config_body(self, request: Request):
        """The request's JSON object with the host's defaults filled in, or the error response."""
        if (denied := self.guard(request)) is not None:
            return denied
        data = await self.body(request)
        if isinstance(data, JSONResponse):
            return data
        for key, value in host_defaults(self.host).items():
            data.setdefault(key, value)
        return data

    async def create(self, request: Request):
        data = await self.config_body(request)
        if isinstance(data, JSONResponse):
            return data
        if "model_type" not in data and isinstance(data.get("source_checkpoint"), str):
            data["model_type"] = sniff_model_type(data["source_checkpoint"]) or "v1x"
        try:
            config = TrainingConfig.from_dict(data)
        except ConfigError as e:
            return _problems(e.problems)
        wanted = ("model_name", "source_checkpoint", "model_type", "work_dir")
        problems = [p for p in config.validate() if p.field in wanted]
        if problems:
            return _problems(problems)
        folder = Path(config.work_dir) / config.model_name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(config.to_json(), encoding="utf-8")
        return JSONResponse({"name": config.model_name, "settings": str(folder / "config.json"),
                             "config": config.to_dict()}, status_code=201)

    async def train(self, request: Request):
        data = await self.config_body(request)
        if isinstance(data, JSONResponse):
            return data
        try:
            config = TrainingConfig.from_dict(data).check()
        except ConfigError as e:
            return _problems(e.problems)
        if self.host.missing_dependencies():
            return _error(503, "Training needs packages that are not installed.",
                          missing=self.host.missing_dependencies())
        try:
            self.manager.start(config)
        except RuntimeError as e:
            return _error(409, str(e))
        return JSONResponse(self.manager.status().to_dict(), status_code=202)

    async def status(self, request: Request):
        if (denied := self.guard(request)) is not None:
            return denied
        return self.manager.status().to_dict()

    async def cancel(self, request: Request):
        if (denied := self.guard(request)) is not None:
            return denied
        return {"cancelling": self.manager.cancel(), **self.manager.status().to_dict()}

    async def save(self, request: Request):
        return self.command(request, "save")

    async def sample(self, request: Request):
        return self.command(request, "sample")

    def command(self, request: Request, what: str):
        """202 when the running job was asked (it acts at its next step), 409 when none runs."""
        if (denied := self.guard(request)) is not None:
            return denied
        if not self.manager.request(what):
            return _error(409, f"Nothing is training, so there is nothing to {what}.")
        return JSONResponse({"requested": what, **self.manager.status().to_dict()},
                            status_code=202)

    async def outputs(self, request: Request):
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
