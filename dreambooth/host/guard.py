"""Who may talk to the standalone server (`python -m dreambooth ui`): requests must name it by
the address or name it is bound to (a page on another site that rebinds its own DNS name to
127.0.0.1 sends its own name: 403), and a POST from another site's page is refused (403).
No page of another site (nor a sandboxed page, whose Origin is 'null') gets a CORS allowance
to read an answer, whatever gradio's middleware added (CorsGuard; in the WebUI it guards our
routes only). Plain ASGI wrappers, standard library only."""
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


UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
FOREIGN = "Requests from another site's page are refused."


def cross_site(headers, method: str = "GET") -> bool:
    """True when the request comes from a page of another site: its Origin names another host
    than the one it was sent to, or is 'null' (a sandboxed or file: page); for a POST (and the
    like) without an Origin, its Referer does, or the browser says 'cross-site'."""
    origin = headers.get("origin") or ""
    if not origin and method.upper() in UNSAFE_METHODS:
        origin = headers.get("referer") or ""
    if not origin:
        return headers.get("sec-fetch-site", "") == "cross-site"
    netloc = urlsplit(origin).netloc if origin != "null" else ""
    return not netloc or netloc.lower() != headers.get("host", "").lower()


def _headers(scope) -> dict:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _answer(send, status: int, why: str) -> None:
    body = json.dumps({"detail": why}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class CorsGuard:
    """ASGI middleware for the paths under `prefix`: a request from another site's page (or a
    sandboxed one, Origin 'null') gets no CORS allowance, whatever the app behind it (gradio
    4's middleware answers 'null' as if it were localhost) adds: its preflight is answered 403
    and every Access-Control-* header is taken off the other answers. `allowed(origin)`: the
    origins the host's owner opened (the WebUI's --cors-allow-origins) pass untouched."""

    def __init__(self, app, prefix: str = "", allowed=lambda origin: False) -> None:
        self.app, self.prefix, self.allowed = app, prefix, allowed

    def _applies(self, scope, headers: dict) -> bool:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if not (path.startswith(self.prefix) or path.startswith(root + self.prefix)):
            return False
        origin = headers.get("origin", "")
        return bool(origin) and cross_site(headers) and not self.allowed(origin)

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        if not self._applies(scope, headers):
            return await self.app(scope, receive, send)
        if scope.get("method") == "OPTIONS" and "access-control-request-method" in headers:
            return await _answer(send, 403, FOREIGN)

        async def without_allowance(message):
            if message.get("type") == "http.response.start":
                message = {**message, "headers": [
                    (k, v) for k, v in message.get("headers", [])
                    if not bytes(k).lower().startswith(b"access-control-")]}
            await send(message)
        await self.app(scope, receive, without_allowance)


class HostGuard:
    """ASGI middleware: 403 for a request naming another host, or a POST (or a websocket) whose
    Origin names another one."""

    def __init__(self, app, names: set[str] | None) -> None:
        self.app, self.names = app, names

    def _refusal(self, scope) -> str:
        headers = _headers(scope)
        host = _name(headers.get("host", ""))
        if self.names is not None and host not in self.names:
            return "This server does not answer to that host name."
        if scope["type"] == "websocket" or scope.get("method") in UNSAFE_METHODS:
            origin = headers.get("origin", "")
            if origin and cross_site(headers):
                return FOREIGN
        return ""

    async def __call__(self, scope, receive, send):
        why = self._refusal(scope) if scope.get("type") in ("http", "websocket") else ""
        if not why:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _answer(send, 403, why)


def protect(app, names: set[str] | None) -> None:
    """Put HostGuard, then CorsGuard on every path, in front of a running Starlette/FastAPI app
    (gradio's, after launch)."""
    inner = app.middleware_stack or app.build_middleware_stack()
    if not isinstance(inner, HostGuard):
        app.middleware_stack = HostGuard(CorsGuard(inner), names)


def guard_cors(app, prefix: str, allowed=lambda origin: False) -> None:
    """Put CorsGuard for the paths under `prefix` in front of a running app (the WebUI's: its
    other routes are the WebUI's business and stay as they are)."""
    inner = app.middleware_stack or app.build_middleware_stack()
    if not (isinstance(inner, CorsGuard) and inner.prefix == prefix):
        app.middleware_stack = CorsGuard(inner, prefix, allowed)


def check_auth_pairs(value: str) -> str:
    """'' when `value` ('user:password[,user2:password2]') is usable, else why not."""
    if not value:
        return ""
    for pair in value.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            return "--auth needs user:password pairs (comma-separated), e.g. --auth alice:s3cret"
    return ""
