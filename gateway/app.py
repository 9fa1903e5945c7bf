"""The gateway: REST under /api/v1 and WebSocket /ws, in front of the broker (Starlette + uvicorn).

Every error is `{"success": false, "error": {"code", "message", "details"}}` with its HTTP status;
no stack trace, library exception text, file path or key ever reaches a client (errors are built
only from the types in common/errors.py). Videos are served by job id only (the broker knows the
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
from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from common import audio
from common import messages as m
from common.config import Config, load_or_exit
from common.errors import (
    HttpError,
    InvalidJson,
    JobNotFound,
    MethodNotAllowed,
    ResultNotAvailable,
    RouteNotFound,
    ServerError,
    UnsupportedMediaType,
    ValidationError,
)
from common.logs import setup_logging
from common.sockets import use_curve
from gateway.auth import AuthMiddleware, CorsMiddleware, UnexpectedErrors, auth_required, principal_of
from gateway.broker_client import BrokerClient
from gateway.metrics import GatewayMetrics
from gateway.openai_api import OpenAIApi, OpenAIErrors
from gateway.openapi import openapi_document
from gateway.previews import open_regular, preview_file
from gateway.uploads import (
    FILE_PARTS,
    UploadLimits,
    check_image,
    check_video,
    decode_base64_file,
    parse_multipart_files,
    too_large,
)
from gateway.web import studio_routes

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
JSON_TYPES = {"", "application/json", "text/json", "text/plain"}
MULTIPART_OVERHEAD = 64 << 10  # part headers and boundaries around the request and the image
STATUS_FIELDS = ("job_id", "status", "progress", "eta", "stage", "queue_position", "error", "preview_url",
                 "group_id")
ACTIVE = ("processing", "queued")
SAFE_ID = re.compile(r"^[\w-]{1,80}$")  # what of a malformed job id may be echoed back (never a path)
TOO_SLOW = "too slow: event queue full"
HTTP_STATUSES = {s.value for s in HTTPStatus}


def error_response(exc: ServerError) -> JSONResponse:
    headers = {}
    if exc.http_status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="wan-server"'
    if exc.http_status == 429:
        headers["Retry-After"] = str(exc.details.get("retry_after", 10))
    return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers=headers)


def replay_headers(result: dict[str, Any]) -> dict[str, str]:
    """`Idempotent-Replayed: true` when the broker answered a create with the job an earlier one made."""
    return {"Idempotent-Replayed": "true"} if result.pop("idempotent_replay", False) else {}


def job_id_of(request: Request) -> str:
    job_id: str = request.path_params["job_id"]
    if not JOB_ID.match(job_id):
        raise JobNotFound("no such job", {"job_id": job_id} if SAFE_ID.match(job_id) else {})
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
    except json.JSONDecodeError as exc:
        raise InvalidJson("request body is not valid JSON", {"line": exc.lineno, "column": exc.colno}) from None
    except UnicodeDecodeError:
        raise InvalidJson("request body is not valid JSON: it is not UTF-8 text") from None
    except RecursionError:
        raise InvalidJson("request body is nested too deeply") from None
    check_representable(value)
    return value


def check_representable(value: Any, depth: int = 0) -> None:
    """Refuse what JSON can spell but the broker's wire format cannot carry: lone surrogates
    ("\\ud800" escapes are not text), integers beyond 64 bits, absurd nesting."""
    if depth > 32:
        raise InvalidJson("request body is nested too deeply", {"max_depth": 32})
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidJson("request body holds a string that is not valid Unicode") from None
    elif isinstance(value, bool) or value is None or isinstance(value, float):
        return
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise ValidationError("request body holds an integer beyond 64 bits")
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
        section = config.gateway
        self.auth = auth_required(config, host)
        self.max_body = section.max_body_bytes
        self.uploads = UploadLimits.from_config(section)
        self.audio_limits = audio.AudioLimits.from_config(section)
        # Decoding an image holds up to max_image_pixels x 4 bytes: bound how many run at once.
        self.decode_slots = asyncio.Semaphore(section.max_concurrent_decodes)
        # A WebSocket client whose queue of unsent events fills (it stopped reading) is dropped.
        self.ws_queue_size = section.ws_queue_size
        self.ws_close_timeout_s = section.ws_close_timeout_s
        self.snapshot_page_size = section.snapshot_page_size  # jobs per broker `list` call
        self.listener_restart_s = section.listener_restart_s
        self.broker: BrokerClient | None = None
        self.subscribers: set[Subscriber] = set()

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """One broker operation (the client exists once the app's lifespan has started)."""
        assert self.broker is not None
        return await self.broker.call(op, **args)

    # ---- REST ----
    async def generate(self, request: Request) -> Response:
        body, files = await self.read_generate(request)
        image = files.pop("image", None)
        result = await self.submit(request, body, image, api="api/v1", media=files)
        return JSONResponse(result, status_code=202, headers=replay_headers(result))

    async def submit(self, request: Request, body: Any, image: tuple[bytes, str] | None, api: str,
                     media: dict[str, tuple[bytes, str]] | None = None) -> dict[str, Any]:
        """The broker's `submit` for the caller (its key, its limit, its Idempotency-Key), shared by
        POST /api/v1/generate and POST /v1/videos; `api` tells the two apart in the key's fingerprint.
        `media`: s2v's `audio` and `pose_video` files, (bytes, declared type) each; every file is
        checked (decoded to the end) here, before the broker sees the request."""
        who = principal_of(request.scope)
        limit = who.max_active_jobs if self.auth else None
        args: dict[str, Any] = {"request": body, "owner": who.key_id, "max_active": limit}
        key = request.headers.get("idempotency-key")
        if key is not None:
            args.update(idempotency_key=key, api=api)
        if image is not None:
            data, declared = image
            async with self.decode_slots:
                png, width, height = await asyncio.to_thread(check_image, data, declared, self.uploads)
            args["image"] = png  # msgpack binary
            args["image_size"] = [width, height]
        media = media or {}
        if "audio" in media:
            data, declared = media["audio"]
            async with self.decode_slots:
                info = await asyncio.to_thread(audio.probe, data, declared, self.audio_limits)
            args["audio"] = data  # as it came: the muxer puts this very audio in the MP4
            args["audio_info"] = {"format": info.format, "sample_rate": info.sample_rate, "channels": info.channels,
                                  "samples": round(info.duration_s * info.sample_rate), "duration_s": info.duration_s}
        if "pose_video" in media:
            data, declared = media["pose_video"]
            async with self.decode_slots:
                args["pose_video_info"] = await asyncio.to_thread(check_video, data, declared, self.uploads)
            args["pose_video"] = data
        if "video" in media:  # video-to-video's input
            data, declared = media["video"]
            async with self.decode_slots:
                args["video_info"] = await asyncio.to_thread(check_video, data, declared, self.uploads, "video")
            args["video"] = data
        return await self.call("submit", **args)

    async def promote(self, request: Request) -> Response:
        """POST /api/v1/promote/{job_id}: re-render the caller's finished job at a higher preset
        from its own frames (the broker's `promote` finds the job, its video, and submits the child)."""
        body = parse_json(await read_body(request, self.max_body))
        who = principal_of(request.scope)
        args: dict[str, Any] = {"job_id": job_id_of(request), "request": body, "owner": who.key_id,
                                "owner_filter": owner_of(request),
                                "max_active": who.max_active_jobs if self.auth else None}
        key = request.headers.get("idempotency-key")
        if key is not None:
            args.update(idempotency_key=key, api="api/v1/promote")
        result = await self.call("promote", **args)
        return JSONResponse(result, status_code=202, headers=replay_headers(result))

    async def read_generate(self, request: Request) -> tuple[Any, dict[str, tuple[bytes, str]]]:
        """(request object, {input name: (file bytes, declared type)}) from a JSON or multipart body."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            limit = self.max_body + self.uploads.max_files_bytes + MULTIPART_OVERHEAD
            raw = await read_body(request, limit)
            return await parse_multipart_files(request.headers, raw, self.max_body, self.uploads)
        if ctype not in JSON_TYPES and not ctype.endswith("+json"):
            raise UnsupportedMediaType(
                f"send application/json or multipart/form-data, not {ctype[:64]}",
                {"allowed": ["application/json", "multipart/form-data"]},
            )
        raw = await read_body(request, self.max_body + self.uploads.max_files_base64_chars)
        body = parse_json(raw)
        files: dict[str, tuple[bytes, str]] = {}
        if isinstance(body, dict):
            for name in FILE_PARTS:
                value = body.pop(name, None)  # "image": null is no image
                if value is not None:
                    files[name] = decode_base64_file(name, value, self.uploads)
        if not files and len(raw) > self.max_body:  # only input files may take a JSON body past max_body_bytes
            raise too_large(self.max_body)
        return body, files

    async def status(self, request: Request) -> Response:
        body = await self.call("status", job_id=job_id_of(request), owner=owner_of(request))
        return JSONResponse({k: body[k] for k in STATUS_FIELDS if k in body})

    async def result(self, request: Request) -> Response:
        body = await self.call("result", job_id=job_id_of(request), owner=owner_of(request))
        body.pop("output_path", None)
        return JSONResponse(body)

    async def cancel(self, request: Request) -> Response:
        body = await self.call("cancel", job_id=job_id_of(request), owner=owner_of(request))
        return JSONResponse({k: body[k] for k in STATUS_FIELDS if k in body})

    async def jobs(self, request: Request) -> Response:
        q = request.query_params
        try:
            limit = int(q.get("limit", "20"))
            offset = int(q.get("offset", "0"))
        except ValueError:
            raise ValidationError("limit and offset must be integers") from None
        if not (1 <= limit <= 100 and 0 <= offset <= 10**9):
            raise ValidationError("limit must be 1..100 and offset >= 0")
        args: dict[str, Any] = {"limit": limit, "offset": offset, "owner": owner_of(request)}
        if "status" in q:
            args["status"] = q["status"]
        if "group_id" in q:  # the n variants of one request, in seed order
            args["group_id"] = q["group_id"]
        return JSONResponse(await self.call("list", **args))

    async def models(self, request: Request) -> Response:
        return JSONResponse(await self.call("models"))

    async def loras(self, request: Request) -> Response:
        return JSONResponse(await self.call("loras"))

    async def presets(self, request: Request) -> Response:
        return JSONResponse(await self.call("presets"))

    async def health(self, request: Request) -> Response:
        """ok while the broker listeners run; 503 "degraded" while one is down (it is being restarted),
        since the gateway then answers requests but sends no job events (or no replies)."""
        if self.broker is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        listeners = self.broker.listener_state()
        if self.broker.healthy:
            return JSONResponse({"status": "ok", "listeners": listeners})
        return JSONResponse({"status": "degraded", "listeners": listeners}, status_code=503)

    async def ready(self, request: Request) -> Response:
        body = await self.call("ready")
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    async def file(self, request: Request) -> Response:
        body = await self.call("result", job_id=job_id_of(request), owner=owner_of(request))
        found = self.result_file(body["job_id"], body.get("output_path")) if body["status"] == "completed" else None
        if found is None:
            raise ResultNotAvailable("the job has no video (yet)", {"status": body["status"]})
        path, stat = found
        return FileResponse(path, media_type="video/mp4", filename=f"{body['job_id']}.mp4", stat_result=stat)

    async def preview(self, request: Request) -> Response:
        """A live preview image, with the same owner check as the video (gateway/previews.py)."""
        body = await self.call("status", job_id=job_id_of(request), owner=owner_of(request))
        found = await asyncio.to_thread(preview_file, self.config, body["job_id"], request.path_params["name"],
                                        body["status"])
        if found is None:
            raise ResultNotAvailable("the job has no such preview (it was replaced, or the job ended)",
                                     {"status": body["status"]})
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "private, no-cache"})

    async def master_file(self, request: Request) -> Response:
        """The job's lossless master (FFV1 in Matroska), when it asked for one; the same owner check."""
        body = await self.call("result", job_id=job_id_of(request), owner=owner_of(request))
        name = f"{body['job_id']}.mkv"
        listed = any(o.get("url") == f"/api/v1/files/{name}" for o in body.get("outputs") or [])
        found = (self.result_file(body["job_id"], str(self.config.results_dir / name), ".mkv")
                 if body["status"] == "completed" and listed else None)
        if found is None:
            raise ResultNotAvailable("the job has no lossless master", {"status": body["status"]})
        path, stat = found
        return FileResponse(path, media_type="video/x-matroska", filename=name, stat_result=stat)

    def result_file(self, job_id: str, path: str | None, suffix: str = ".mp4") -> tuple[Path, os.stat_result] | None:
        """The job's video: `<results_dir>/<job_id><suffix>`, a regular file, not a symlink; else None.

        Only the job id (checked against JOB_ID) names the file; whatever else is in the results
        folder (a symlink or a FIFO planted under a job's name) is never served."""
        if not path:
            return None
        candidate = Path(path)
        if candidate.name != f"{job_id}{suffix}" or candidate.parent.resolve() != self.config.results_dir.resolve():
            return None
        opened = open_regular(candidate)
        if opened is None:
            return None
        fd, stat = opened
        os.close(fd)
        return candidate, stat

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(auth=self.auth))

    # ---- WebSocket ----
    async def ws(self, websocket: WebSocket) -> None:
        who = principal_of(websocket.scope)
        await websocket.accept(subprotocol=who.subprotocol)
        sub = Subscriber(websocket, who.owner_filter, self.ws_queue_size)
        self.subscribers.add(sub)
        tasks = [asyncio.create_task(sub.pump()), asyncio.create_task(self.read_ws(sub)),
                 asyncio.create_task(sub.too_slow.wait())]
        try:
            # Ends when the client goes (the reader or the pump sees it) or when it is dropped.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if sub.too_slow.is_set():
                await self.drop(sub)
        finally:
            self.subscribers.discard(sub)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def read_ws(self, sub: Subscriber) -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                try:
                    data = await sub.websocket.receive_json()
                except (json.JSONDecodeError, KeyError, ValueError):
                    sub.offer({"event": "error", "error": InvalidJson("send JSON objects").to_dict()["error"]})
                    continue
                if sub.too_slow.is_set():
                    continue  # being closed: what it asks for now would not be sent anyway
                try:
                    await self.on_ws_message(sub, data)
                except ServerError as exc:  # e.g. the broker is restarting: say so, keep the socket
                    sub.offer({"event": "error", "error": exc.to_dict()["error"]})
                except Exception:  # a fault of ours on one message: logged, and the socket stays up
                    log.exception("WebSocket message failed")
                    sub.offer({"event": "error", "error": ServerError("internal error").to_dict()["error"]})

    async def drop(self, sub: Subscriber) -> None:
        """Close a client that stopped reading, with a reason, instead of holding its events without bound.

        The close frame goes out after what the socket already holds; a client that never reads
        again does not get it, and its connection is dropped after `ws_close_timeout_s`."""
        self.subscribers.discard(sub)  # no more events are queued for it
        log.warning("dropped a WebSocket client: %s (%d events queued)", TOO_SLOW, sub.queue.qsize())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sub.websocket.close(code=1008, reason=TOO_SLOW), self.ws_close_timeout_s)

    async def active_jobs(self, owner: str | None) -> list[dict[str, Any]]:
        """Every queued and processing job `owner` may see, paged through the broker's `list` by status
        (a page of the newest jobs of any status would miss older active ones behind finished ones)."""
        jobs: dict[str, dict[str, Any]] = {}
        for status in ACTIVE:
            offset = 0
            while True:
                page = await self.call("list", status=status, limit=self.snapshot_page_size, offset=offset, owner=owner)
                for job in page["jobs"]:
                    jobs.setdefault(job["job_id"], job)  # a job that moved on while we paged is listed once
                offset += len(page["jobs"])
                if not page["jobs"] or offset >= page["total"]:
                    break
        return [job for job in jobs.values() if job["status"] in ACTIVE]

    async def on_ws_message(self, sub: Subscriber, data: Any) -> None:
        action = data.get("action") if isinstance(data, dict) else None
        if action == "subscribe" and data.get("all") is True:
            sub.all = True
            for job in await self.active_jobs(sub.owner):
                sub.offer({"event": "snapshot", **job})
        elif action == "subscribe" and isinstance(data.get("job_id"), str) and JOB_ID.match(data["job_id"]):
            job_id = data["job_id"]
            # Events that arrive while the snapshot is fetched are held, then sent after it, so
            # nothing falls between the two and nothing older than the snapshot follows it.
            sub.held[job_id] = []
            try:
                job = await self.call("status", job_id=job_id, owner=sub.owner)
            except ServerError as exc:
                sub.held.pop(job_id, None)
                sub.offer({"event": "error", "job_id": job_id, "error": exc.to_dict()["error"]})
                return
            snapshot = {"event": "snapshot", **{k: job[k] for k in STATUS_FIELDS if k in job}}
            if job["status"] == "completed":
                snapshot["output_url"] = f"/api/v1/files/{job['job_id']}.mp4"
            sub.offer(snapshot)
            for event in sub.held.pop(job_id, []):
                if event["event"] != "progress" or event["progress"] >= job["progress"]:
                    sub.offer(event)
            sub.jobs.add(job_id)
        elif action == "unsubscribe":
            if isinstance(data.get("job_id"), str):
                sub.jobs.discard(data["job_id"])
            sub.all = sub.all and data.get("all") is not True
        else:
            usage = 'send {"action": "subscribe", "job_id": "<id>"} or {"action": "subscribe", "all": true}'
            sub.offer({"event": "error", "error": ValidationError(usage).to_dict()["error"]})

    def on_event(self, event: m.JobEvent) -> None:
        payload = {"event": event.event, "job_id": event.job_id, **event.data}
        for sub in list(self.subscribers):
            if sub.owner is not None and event.owner != sub.owner:
                continue  # another user's job
            if event.job_id in sub.held:
                sub.held[event.job_id].append(payload)
            elif sub.all or event.job_id in sub.jobs:
                sub.offer(payload)

    # ---- app ----
    def app(self) -> Starlette:
        routes = [
            Route("/api/v1/generate", self.generate, methods=["POST"]),
            Route("/api/v1/status/{job_id}", self.status, methods=["GET"]),
            Route("/api/v1/result/{job_id}", self.result, methods=["GET"]),
            Route("/api/v1/cancel/{job_id}", self.cancel, methods=["POST"]),
            Route("/api/v1/promote/{job_id}", self.promote, methods=["POST"]),
            Route("/api/v1/jobs", self.jobs, methods=["GET"]),
            Route("/api/v1/models", self.models, methods=["GET"]),
            Route("/api/v1/loras", self.loras, methods=["GET"]),
            Route("/api/v1/presets", self.presets, methods=["GET"]),
            Route("/api/v1/files/{job_id}.mp4", self.file, methods=["GET", "HEAD"]),
            Route("/api/v1/files/{job_id}.mkv", self.master_file, methods=["GET", "HEAD"]),
            Route("/api/v1/previews/{job_id}/{name}", self.preview, methods=["GET"]),
            Route("/api/v1/openapi.json", self.openapi, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/metrics", GatewayMetrics(self.call, self.subscribers).route, methods=["GET"]),
            WebSocketRoute("/ws", self.ws),
            *OpenAIApi(self).routes(),  # /v1/videos
            *studio_routes(),  # the web page at /, and its files under /studio/
        ]

        async def server_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, ServerError)
            return error_response(exc)

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            err: ServerError
            if exc.status_code == 404:
                err = RouteNotFound("no such route")
            elif exc.status_code == 405:
                err = MethodNotAllowed("method not allowed on this route")
            else:  # Starlette's detail is its status phrase unless a handler gave one; ours never do
                phrase = HTTPStatus(exc.status_code).phrase if exc.status_code in HTTP_STATUSES else "HTTP error"
                err = HttpError(phrase, http_status=exc.status_code)
            return error_response(err)

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self.broker = BrokerClient(self.config, restart_s=self.listener_restart_s)
            self.broker.listeners.append(self.on_event)
            self.broker.start()
            try:
                yield
            finally:
                await self.broker.close()

        # The methods a browser app may use across origins: those of the routes (HEAD comes with GET).
        methods = tuple(sorted({method for r in routes if isinstance(r, Route) for method in r.methods or ()}))
        return Starlette(
            routes=routes,
            lifespan=lifespan,
            exception_handlers={ServerError: server_error, HTTPException: http_error},
            # CORS outermost: it answers preflights before auth asks for a key, and adds its headers to
            # auth's refusals and to the structured 500 of an exception no handler took.
            middleware=[Middleware(CorsMiddleware, config=self.config, methods=methods),
                        Middleware(OpenAIErrors),  # /v1 errors in the OpenAI shape, auth's refusals too
                        Middleware(UnexpectedErrors),
                        Middleware(AuthMiddleware, config=self.config, required=self.auth)],
        )


class Subscriber:
    """One WebSocket client: what it subscribed to, and its outgoing queue (bounded)."""

    def __init__(self, websocket: WebSocket, owner: str | None = None, queue_size: int = 10_000):
        self.websocket = websocket
        self.owner = owner  # whose jobs it may follow; None: everyone's
        self.jobs: set[str] = set()
        self.all = False
        self.held: dict[str, list[dict[str, Any]]] = {}  # job -> events waiting for its snapshot
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_size)
        self.too_slow = asyncio.Event()  # its queue filled: the handler closes it

    def offer(self, payload: dict[str, Any]) -> None:
        """Queue one event for the client, never waiting: a full queue marks the client too slow."""
        if self.too_slow.is_set():
            return
        try:
            self.queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.too_slow.set()

    async def pump(self) -> None:
        """Send queued events in order; ends when the client is gone (the send raises)."""
        while True:
            await self.websocket.send_json(await self.queue.get())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="run the HTTP/WebSocket gateway")
    parser.add_argument("--config", help="profile TOML (default: $WAN_SERVER_CONFIG or the tiny profile)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    config = load_or_exit(args.config)
    setup_logging(config.log_level)
    use_curve(config.curve_keys())
    host = args.host or config.gateway.host
    port = args.port or config.gateway.port
    try:
        gateway = Gateway(config, host)
    except ServerError as exc:
        log.error("%s: %s", exc.code, exc.message)
        raise SystemExit(2) from None
    log.info("gateway on %s:%d, API keys %s", host, port, "required" if gateway.auth else "off (loopback only)")
    uvicorn.run(gateway.app(), host=host, port=port, log_level="warning", ws="websockets-sansio")


if __name__ == "__main__":
    main()
