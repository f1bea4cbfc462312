"""Who may talk to the standalone server (`python -m dreambooth ui`): requests must name it by
the address or name it is bound to (a page on another site that rebinds its own DNS name to
127.0.0.1 sends its own name: 403), and a POST from another site's page is refused (403).
A plain ASGI wrapper, standard library only."""
from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


def _name(netloc: str) -> str:
    """'Host: example.org:7861' or '[::1]:7861' -> the name alone, lower case."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].split("]", 1)[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def _is_loopback(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return name == "localhost"


def allowed_names(bound: str, extra: tuple = ()) -> set[str] | None:
    """The Host names a request may carry, or None (any) when bound to every interface and no
    name is given: there is no single name to check then."""
    names = {_name(n) for n in extra if n}
    if bound in WILDCARDS:
        return names or None
    names.add(_name(bound) if ":" not in bound else bound.lower())
    if _is_loopback(bound.strip("[]")):
        names.update(LOOPBACK_NAMES)
    return names


class HostGuard:
    """ASGI middleware: 403 for a request naming another host, or a POST (or a websocket) whose
    Origin names another one."""

    def __init__(self, app, names: set[str] | None) -> None:
        self.app, self.names = app, names

    def _refusal(self, scope) -> str:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        host = _name(headers.get("host", ""))
        if self.names is not None and host not in self.names:
            return "This server does not answer to that host name."
        if scope["type"] == "websocket" or scope.get("method") in ("POST", "PUT", "PATCH",
                                                                    "DELETE"):
            origin = headers.get("origin", "")
            if origin and (origin == "null"
                           or urlsplit(origin).netloc.lower() != headers.get("host", "").lower()):
                return "Requests from another site's page are refused."
        return ""

    async def __call__(self, scope, receive, send):
        why = self._refusal(scope) if scope.get("type") in ("http", "websocket") else ""
        if not why:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": why}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def protect(app, names: set[str] | None) -> None:
    """Put HostGuard in front of a running Starlette/FastAPI app (gradio's, after launch)."""
    inner = app.middleware_stack or app.build_middleware_stack()
    if not isinstance(inner, HostGuard):
        app.middleware_stack = HostGuard(inner, names)


def check_auth_pairs(value: str) -> str:
    """'' when `value` ('user:password[,user2:password2]') is usable, else why not."""
    if not value:
        return ""
    for pair in value.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            return "--auth needs user:password pairs (comma-separated), e.g. --auth alice:s3cret"
    return ""
