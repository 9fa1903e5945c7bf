"""Who is calling: API-key authentication, per-key rate limits and the Origin check, as one ASGI middleware.

`[gateway] auth`: `auto` (the default) requires a key unless the gateway listens on a loopback
address; `required` always; `off` never, and is refused on a non-loopback host (the gateway will
not start). With auth on, every route but `/health` and the web studio's page and files (they hold
no data) needs `Authorization: Bearer <token>`; a WebSocket may send the token in that header or,
from a browser (which cannot set headers), as the subprotocol pair `["wan.bearer", "<token>"]`.
Refusals happen before a WebSocket is accepted: the handshake gets the HTTP error (401, 403 or 429)
with the structured body.

A request that carries an `Origin` header (every browser request, HTTP or WebSocket) must come
from the gateway's own origin or one in `[gateway] allowed_origins` ("*" allows any): so a web
page elsewhere can neither drive a loopback server with auth off nor open its WebSocket.

An origin in `allowed_origins` also gets CORS headers (`CorsMiddleware`, outside `AuthMiddleware`), so a
browser app served from it can read the responses: its preflights are answered without a key (browsers
never send one on a preflight), and the errors auth answers with (401, 429) carry the headers too, so
the app can read the structured body. A refused origin gets no CORS header at all: its preflight and
its requests get the 403.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.config import Config
from common.errors import ConfigError, OriginNotAllowed, RateLimited, ServerError, Unauthorized
from gateway.keys import KeyStore, keys_path
from gateway.web import is_studio_path

log = logging.getLogger(__name__)

AUTH_MODES = ("auto", "required", "off")
OPEN_PATHS = frozenset({"/health"})
WS_SUBPROTOCOL = "wan.bearer"
# What a browser app may send and read across origins, beyond the CORS-safelisted headers.
CORS_REQUEST_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key")
CORS_EXPOSED_HEADERS = ("Retry-After", "Content-Range", "Idempotent-Replayed")


@dataclass(frozen=True)
class Principal:
    """The caller. `key_id` is the owner recorded on its jobs ("" for the local user with auth off)."""

    key_id: str
    admin: bool
    rate_per_minute: int | None = None
    max_active_jobs: int | None = None
    subprotocol: str | None = None  # the WebSocket subprotocol to accept with, when the token came in one

    @property
    def owner_filter(self) -> str | None:
        """Whose jobs this caller may see: its own, or everyone's (None) for an admin."""
        return None if self.admin else self.key_id


LOCAL = Principal(key_id="", admin=True)


def principal_of(scope: Scope) -> Principal:
    principal: Principal = scope.get("state", {}).get("principal", LOCAL)
    return principal


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def auth_required(config: Config, host: str) -> bool:
    """Whether the gateway on `host` requires keys; ConfigError for an unknown mode or `off` off loopback."""
    mode = config.gateway.auth
    if mode not in AUTH_MODES:
        raise ConfigError(f"[gateway] auth must be one of {', '.join(AUTH_MODES)}", {"auth": mode[:32]})
    if mode == "off" and not is_loopback(host):
        raise ConfigError(f"refusing to serve {host} with [gateway] auth = \"off\": anyone who can reach it could run "
                          "and read every job; use auth = \"auto\" or \"required\" and create keys with "
                          "`python -m gateway.keys create NAME`", {"host": host})
    return mode == "required" or (mode == "auto" and not is_loopback(host))


class RateLimiter:
    """A token bucket per key: `per_minute` requests a minute, in bursts of up to `per_minute`."""

    def __init__(self) -> None:
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, per_minute: int, now: float | None = None) -> float:
        """0 when the request may go; else the seconds until it could."""
        now = time.monotonic() if now is None else now
        tokens, last = self.buckets.get(key, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - last) * per_minute / 60.0)
        if tokens >= 1.0:
            self.buckets[key] = (tokens - 1.0, now)
            return 0.0
        self.buckets[key] = (tokens, now)
        return (1.0 - tokens) * 60.0 / per_minute


def allowed_origins(config: Config) -> frozenset[str]:
    """`[gateway] allowed_origins` as compared with a request's Origin (which never ends in "/")."""
    return frozenset(o.rstrip("/") for o in config.gateway.allowed_origins)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


class AuthMiddleware:
    def __init__(self, app: ASGIApp, config: Config, required: bool):
        self.app = app
        self.required = required
        section = config.gateway
        self.allowed_origins = allowed_origins(config)
        self.default_rate = section.rate_limit_per_minute
        self.default_max_active = section.max_active_jobs_per_key
        self.keys = KeyStore(keys_path(config)) if required else None
        self.limiter = RateLimiter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            headers = _headers(scope)
            self.check_origin(headers)
            principal = self.authenticate(scope, headers)
        except ServerError as exc:
            await self.refuse(exc, scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    def check_origin(self, headers: dict[str, str]) -> None:
        origin = headers.get("origin")
        if origin is None or "*" in self.allowed_origins or origin.rstrip("/") in self.allowed_origins:
            return
        if urlsplit(origin).netloc == headers.get("host"):
            return  # same origin: a page the gateway itself served
        raise OriginNotAllowed("this origin may not use the API; add it to [gateway] allowed_origins",
                               {"origin": origin[:200]})

    def authenticate(self, scope: Scope, headers: dict[str, str]) -> Principal:
        offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")]
        bearer_offered = scope["type"] == "websocket" and WS_SUBPROTOCOL in offered
        path = scope["path"]
        if not self.required or path in OPEN_PATHS or (scope["type"] == "http" and is_studio_path(path)):
            # A client that sends its key anyway still gets the subprotocol it offered: strict
            # clients (Node's `ws`) fail a handshake that accepts none of theirs.
            return replace(LOCAL, subprotocol=WS_SUBPROTOCOL) if bearer_offered else LOCAL
        assert self.keys is not None
        token, subprotocol = None, None
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            token = value.strip()
        elif bearer_offered and offered.index(WS_SUBPROTOCOL) + 1 < len(offered):
            token, subprotocol = offered[offered.index(WS_SUBPROTOCOL) + 1], WS_SUBPROTOCOL
        if token is None:
            raise Unauthorized("an API key is required: send Authorization: Bearer <token>")
        key = self.keys.verify(token)
        if key is None:
            log.warning("refused %s %s: unknown or revoked API key", scope["type"], scope["path"][:100])
            raise Unauthorized("the API key is not valid")
        rate = key.rate_per_minute or self.default_rate
        wait = self.limiter.take(key.id, rate)
        if wait > 0:
            raise RateLimited(f"over {rate} requests a minute for this key; retry later",
                              {"limit_per_minute": rate, "retry_after": max(1, math.ceil(wait))})
        return Principal(key_id=key.id, admin=key.admin, rate_per_minute=rate,
                         max_active_jobs=key.max_active_jobs or self.default_max_active, subprotocol=subprotocol)

    async def refuse(self, exc: ServerError, scope: Scope, receive: Receive, send: Send) -> None:
        """The structured error, as an HTTP response (also as a WebSocket handshake's denial)."""
        response_headers: dict[str, Any] = {}
        if exc.http_status == 401:
            response_headers["WWW-Authenticate"] = 'Bearer realm="wan-server"'
        if exc.http_status == 429:
            response_headers["Retry-After"] = str(exc.details.get("retry_after", 10))
        response = JSONResponse(exc.to_dict(), status_code=exc.http_status, headers=response_headers)
        await response(scope, receive, send)


class CorsMiddleware(CORSMiddleware):
    """Starlette's CORS middleware for `[gateway] allowed_origins`; it goes outside `AuthMiddleware`.

    Starlette answers a preflight from any other origin itself (400, listing the allowed methods and
    headers) and sends `Access-Control-Expose-Headers` to every origin; here another origin gets no
    CORS header: its preflight goes on to `AuthMiddleware`, which refuses the origin with the
    structured 403 (the gateway's own origin never sends one)."""

    def __init__(self, app: ASGIApp, config: Config, methods: tuple[str, ...]):
        super().__init__(app, allow_origins=sorted(allowed_origins(config)), allow_methods=methods,
                         allow_headers=CORS_REQUEST_HEADERS, expose_headers=CORS_EXPOSED_HEADERS)

    def is_allowed_origin(self, origin: str) -> bool:
        return super().is_allowed_origin(origin.rstrip("/"))  # as AuthMiddleware.check_origin compares it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and "access-control-request-method" in headers and not self.is_allowed_origin(origin):
                await self.simple_response(scope, receive, send, request_headers=headers)
                return
        await super().__call__(scope, receive, send)

    async def send(self, message: Message, send: Send, request_headers: Headers) -> None:
        origin = request_headers.get("origin")
        if message["type"] != "http.response.start" or origin is None or self.is_allowed_origin(origin):
            await super().send(message, send, request_headers)
            return
        # Still `Vary: Origin`: a cache must not hand this answer to an allowed origin, nor its answer here.
        MutableHeaders(scope=message).add_vary_header("Origin")
        await send(message)


class UnexpectedErrors:
    """The structured 500 for an exception no handler took, rendered inside `CorsMiddleware`.

    An `Exception` entry in Starlette's exception handlers is served by its outermost layer, outside
    every middleware, so a browser on an allowed origin could not read that 500. Here the answer
    passes back through the CORS layer like any other. A response already started cannot be replaced:
    the exception goes on up (uvicorn closes the connection)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
            log.exception("unexpected error on %s", scope.get("path", "?"))
            response = JSONResponse(ServerError("internal error").to_dict(), status_code=500)
            await response(scope, receive, send)
