"""The gateway: REST under /api/v1 and WebSocket /ws, in front of the broker (Starlette + uvicorn).

Every error is `{"success": false, "error": {"code", "message", "details"}}` with its HTTP status;
no stack trace ever reaches a client. Videos are served by job id only (the broker knows the
path); no path from the client reaches the file system.

    python -m gateway.app [--config PROFILE] [--host 127.0.0.1] [--port 8001]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
from pathlib import Path
from stat import S_ISREG
from typing import Any

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from common import messages as m
from common.config import Config
from common.errors import ServerError
from common.logs import setup_logging
from common.sockets import use_curve
from gateway.auth import AuthMiddleware, auth_required, principal_of
from gateway.broker_client import BrokerClient
from gateway.openapi import openapi_document
from gateway.uploads import UploadLimits, check_image, decode_base64_image, parse_multipart, too_large

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
JSON_TYPES = {"", "application/json", "text/json", "text/plain"}
MULTIPART_OVERHEAD = 64 << 10  # part headers and boundaries around the request and the image
STATUS_FIELDS = ("job_id", "status", "progress", "eta", "stage", "queue_position", "error")


class ApiError(ServerError):
    pass


def error_response(exc: ServerError) -> JSONResponse:
    headers = {}
    if exc.http_status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="wan-server"'
    if exc.http_status == 429:
        headers["Retry-After"] = str(exc.details.get("retry_after", 10))
    return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers=headers)


def api_error(code: str, message: str, http_status: int, **details: Any) -> ApiError:
    err = ApiError(message, details, code=code)
    err.http_status = http_status
    return err


def job_id_of(request: Request) -> str:
    job_id = request.path_params["job_id"]
    if not JOB_ID.match(job_id):
        raise api_error("JOB_NOT_FOUND", "no such job", 404, job_id=job_id[:80])
    return job_id


def owner_of(request: Request) -> str | None:
    """Whose jobs the caller may see: its own key id's, or everyone's (None) for an admin or with auth off."""
    return principal_of(request.scope).owner_filter


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes: from Content-Length
    before anything is read, or while reading a chunked body that has none."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:  # also bounds chunked bodies with no Content-Length
            raise too_large(limit)
    return bytes(body)


def parse_json(body: bytes) -> Any:
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise api_error("INVALID_JSON", f"request body is not valid JSON: {exc}", 400) from None
    except RecursionError:
        raise api_error("INVALID_JSON", "request body is nested too deeply", 400) from None
    check_representable(value)
    return value


def check_representable(value: Any, depth: int = 0) -> None:
    """Refuse what JSON can spell but the broker's wire format cannot carry: lone surrogates
    ("\\ud800" escapes are not text), integers beyond 64 bits, absurd nesting."""
    if depth > 32:
        raise api_error("INVALID_JSON", "request body is nested too deeply", 400, max_depth=32)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise api_error("INVALID_JSON", "request body holds a string that is not valid Unicode", 400) from None
    elif isinstance(value, bool) or value is None or isinstance(value, float):
        return
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise api_error("VALIDATION_ERROR", "request body holds an integer beyond 64 bits", 422)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_representable(key, depth + 1)
            check_representable(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_representable(item, depth + 1)


class Gateway:
    def __init__(self, config: Config, host: str = "127.0.0.1"):
        self.config = config
        section = config.section("gateway")
        self.auth = auth_required(config, host)
        self.max_body = int(section.get("max_body_bytes", 1 << 20))
        self.uploads = UploadLimits.from_config(section)
        # Decoding an image holds up to max_image_pixels x 4 bytes: bound how many run at once.
        self.decode_slots = asyncio.Semaphore(int(section.get("max_concurrent_decodes", 2)))
        self.broker: BrokerClient | None = None
        self.subscribers: set[Subscriber] = set()

    # ---- REST ----
    async def generate(self, request: Request) -> Response:
        body, image = await self.read_generate(request)
        who = principal_of(request.scope)
        limit = who.max_active_jobs if self.auth else None
        args: dict[str, Any] = {"request": body, "owner": who.key_id, "max_active": limit}
        if image is not None:
            data, declared = image
            async with self.decode_slots:
                png, width, height = await asyncio.to_thread(check_image, data, declared, self.uploads)
            args["image"] = torch.frombuffer(bytearray(png), dtype=torch.uint8)
            args["image_size"] = [width, height]
        result = await self.broker.call("submit", **args)
        return JSONResponse(result, status_code=202)

    async def read_generate(self, request: Request) -> tuple[Any, tuple[bytes, str] | None]:
        """(request object, (image bytes, declared type) or None) from a JSON or multipart body."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            limit = self.max_body + self.uploads.max_upload_bytes + MULTIPART_OVERHEAD
            raw = await read_body(request, limit)
            body, data, declared = await parse_multipart(request.headers, raw, self.max_body, self.uploads)
            return body, (data, declared)
        if ctype not in JSON_TYPES and not ctype.endswith("+json"):
            raise api_error(
                "UNSUPPORTED_MEDIA_TYPE", f"send application/json or multipart/form-data, not {ctype[:64]}", 415,
                allowed=["application/json", "multipart/form-data"],
            )
        raw = await read_body(request, self.max_body + self.uploads.max_base64_chars)
        body = parse_json(raw)
        if isinstance(body, dict) and body.get("image") is not None:
            return body, decode_base64_image(body.pop("image"), self.uploads)
        if isinstance(body, dict):
            body.pop("image", None)  # "image": null is no image
        if len(raw) > self.max_body:  # only an image may take a JSON body past max_body_bytes
            raise too_large(self.max_body)
        return body, None

    async def status(self, request: Request) -> Response:
        body = await self.broker.call("status", job_id=job_id_of(request), owner=owner_of(request))
        return JSONResponse({k: body[k] for k in STATUS_FIELDS if k in body})

    async def result(self, request: Request) -> Response:
        body = await self.broker.call("result", job_id=job_id_of(request), owner=owner_of(request))
        body.pop("output_path", None)
        return JSONResponse(body)

    async def cancel(self, request: Request) -> Response:
        body = await self.broker.call("cancel", job_id=job_id_of(request), owner=owner_of(request))
        return JSONResponse({k: body[k] for k in STATUS_FIELDS if k in body})

    async def jobs(self, request: Request) -> Response:
        q = request.query_params
        try:
            limit = int(q.get("limit", "20"))
            offset = int(q.get("offset", "0"))
        except ValueError:
            raise api_error("VALIDATION_ERROR", "limit and offset must be integers", 422) from None
        if not (1 <= limit <= 100 and 0 <= offset <= 10**9):
            raise api_error("VALIDATION_ERROR", "limit must be 1..100 and offset >= 0", 422)
        args: dict[str, Any] = {"limit": limit, "offset": offset, "owner": owner_of(request)}
        if "status" in q:
            args["status"] = q["status"]
        return JSONResponse(await self.broker.call("list", **args))

    async def models(self, request: Request) -> Response:
        return JSONResponse(await self.broker.call("models"))

    async def presets(self, request: Request) -> Response:
        return JSONResponse(await self.broker.call("presets"))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        body = await self.broker.call("ready")
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    async def file(self, request: Request) -> Response:
        body = await self.broker.call("result", job_id=job_id_of(request), owner=owner_of(request))
        found = self.result_file(body["job_id"], body.get("output_path")) if body["status"] == "completed" else None
        if found is None:
            raise api_error("RESULT_NOT_AVAILABLE", "the job has no video (yet)", 404, status=body["status"])
        path, stat = found
        return FileResponse(path, media_type="video/mp4", filename=f"{body['job_id']}.mp4", stat_result=stat)

    def result_file(self, job_id: str, path: str | None) -> tuple[Path, os.stat_result] | None:
        """The job's video: `<results_dir>/<job_id>.mp4`, a regular file, not a symlink; else None.

        Only the job id (checked against JOB_ID) names the file; whatever else is in the results
        folder (a symlink or a FIFO planted under a job's name) is never served."""
        if not path:
            return None
        candidate = Path(path)
        if candidate.name != f"{job_id}.mp4" or candidate.parent.resolve() != self.config.results_dir.resolve():
            return None
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            stat = os.fstat(fd)
        finally:
            os.close(fd)
        return (candidate, stat) if S_ISREG(stat.st_mode) else None

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(auth=self.auth))

    # ---- WebSocket ----
    async def ws(self, websocket: WebSocket) -> None:
        who = principal_of(websocket.scope)
        await websocket.accept(subprotocol=who.subprotocol)
        sub = Subscriber(websocket, who.owner_filter)
        self.subscribers.add(sub)
        sender = asyncio.create_task(sub.pump())
        try:
            while True:
                try:
                    data = await websocket.receive_json()
                except (json.JSONDecodeError, KeyError, ValueError):
                    await sub.send({"event": "error", "error": {"code": "INVALID_JSON", "message": "send JSON objects"}})
                    continue
                try:
                    await self.on_ws_message(sub, data)
                except ServerError as exc:  # e.g. the broker is restarting: say so, keep the socket
                    sub.queue.put_nowait({"event": "error", "error": exc.to_dict()["error"]})
        except WebSocketDisconnect:
            pass
        finally:
            self.subscribers.discard(sub)
            sender.cancel()

    async def on_ws_message(self, sub: Subscriber, data: Any) -> None:
        action = data.get("action") if isinstance(data, dict) else None
        if action == "subscribe" and data.get("all") is True:
            sub.all = True
            listing = await self.broker.call("list", limit=100, offset=0, owner=sub.owner)
            for job in listing["jobs"]:
                if job["status"] in ("queued", "processing"):
                    sub.queue.put_nowait({"event": "snapshot", **job})
        elif action == "subscribe" and isinstance(data.get("job_id"), str) and JOB_ID.match(data["job_id"]):
            job_id = data["job_id"]
            # Events that arrive while the snapshot is fetched are held, then sent after it, so
            # nothing falls between the two and nothing older than the snapshot follows it.
            sub.held[job_id] = []
            try:
                job = await self.broker.call("status", job_id=job_id, owner=sub.owner)
            except ServerError as exc:
                sub.held.pop(job_id, None)
                sub.queue.put_nowait({"event": "error", "job_id": job_id, "error": exc.to_dict()["error"]})
                return
            snapshot = {"event": "snapshot", **{k: job[k] for k in STATUS_FIELDS if k in job}}
            if job["status"] == "completed":
                snapshot["output_url"] = f"/api/v1/files/{job['job_id']}.mp4"
            sub.queue.put_nowait(snapshot)
            for event in sub.held.pop(job_id, []):
                if event["event"] != "progress" or event["progress"] >= job["progress"]:
                    sub.queue.put_nowait(event)
            sub.jobs.add(job_id)
        elif action == "unsubscribe":
            if isinstance(data.get("job_id"), str):
                sub.jobs.discard(data["job_id"])
            sub.all = sub.all and data.get("all") is not True
        else:
            sub.queue.put_nowait({"event": "error", "error": {
                "code": "VALIDATION_ERROR",
                "message": 'send {"action": "subscribe", "job_id": "<id>"} or {"action": "subscribe", "all": true}',
            }})

    def on_event(self, event: m.JobEvent) -> None:
        payload = {"event": event.event, "job_id": event.job_id, **event.data}
        for sub in list(self.subscribers):
            if sub.owner is not None and event.owner != sub.owner:
                continue  # another user's job
            if event.job_id in sub.held:
                sub.held[event.job_id].append(payload)
            elif sub.all or event.job_id in sub.jobs:
                with contextlib.suppress(asyncio.QueueFull):  # a client that stopped reading
                    sub.queue.put_nowait(payload)

    # ---- app ----
    def app(self) -> Starlette:
        routes = [
            Route("/api/v1/generate", self.generate, methods=["POST"]),
            Route("/api/v1/status/{job_id}", self.status, methods=["GET"]),
            Route("/api/v1/result/{job_id}", self.result, methods=["GET"]),
            Route("/api/v1/cancel/{job_id}", self.cancel, methods=["POST"]),
            Route("/api/v1/jobs", self.jobs, methods=["GET"]),
            Route("/api/v1/models", self.models, methods=["GET"]),
            Route("/api/v1/presets", self.presets, methods=["GET"]),
            Route("/api/v1/files/{job_id}.mp4", self.file, methods=["GET", "HEAD"]),
            Route("/api/v1/openapi.json", self.openapi, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            WebSocketRoute("/ws", self.ws),
        ]

        async def server_error(request: Request, exc: ServerError) -> Response:
            return error_response(exc)

        async def http_error(request: Request, exc: HTTPException) -> Response:
            codes = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}
            err = api_error(codes.get(exc.status_code, "HTTP_ERROR"), str(exc.detail), exc.status_code)
            return error_response(err)

        async def unexpected(request: Request, exc: Exception) -> Response:
            log.exception("unexpected error on %s", request.url.path)
            return error_response(api_error("INTERNAL_ERROR", "internal error", 500))

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.broker = BrokerClient(self.config)
            self.broker.listeners.append(self.on_event)
            self.broker.start()
            try:
                yield
            finally:
                await self.broker.close()

        return Starlette(
            routes=routes,
            lifespan=lifespan,
            exception_handlers={ServerError: server_error, HTTPException: http_error, Exception: unexpected},
            middleware=[Middleware(AuthMiddleware, config=self.config, required=self.auth)],
        )


class Subscriber:
    """One WebSocket client: what it subscribed to, and its outgoing queue (bounded)."""

    def __init__(self, websocket: WebSocket, owner: str | None = None):
        self.websocket = websocket
        self.owner = owner  # whose jobs it may follow; None: everyone's
        self.jobs: set[str] = set()
        self.all = False
        self.held: dict[str, list[dict[str, Any]]] = {}  # job -> events waiting for its snapshot
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10_000)

    async def send(self, payload: dict[str, Any]) -> None:
        await self.websocket.send_json(payload)

    async def pump(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                await self.send(await self.queue.get())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="run the HTTP/WebSocket gateway")
    parser.add_argument("--config", help="profile TOML (default: $WAN_SERVER_CONFIG or the tiny profile)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    config = Config.load(args.config)
    setup_logging(config.log_level)
    use_curve(config.curve_keys())
    section = config.section("gateway")
    host = args.host or section.get("host", "127.0.0.1")
    port = args.port or int(section.get("port", 8001))
    try:
        gateway = Gateway(config, host)
    except ServerError as exc:
        log.error("%s: %s", exc.code, exc.message)
        raise SystemExit(2) from None
    log.info("gateway on %s:%d, API keys %s", host, port, "required" if gateway.auth else "off (loopback only)")
    uvicorn.run(gateway.app(), host=host, port=port, log_level="warning", ws="websockets-sansio")


if __name__ == "__main__":
    main()
