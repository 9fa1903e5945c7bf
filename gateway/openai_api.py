"""The OpenAI-style video API under /v1, beside /api/v1: what the `openai` SDK's `client.videos`
(and the tools that speak `/v1/videos`) send.

- POST /v1/videos: JSON, or multipart/form-data (the SDK sends multipart since 2.27, file or not)
  with an optional `input_reference` image file part (in JSON: `{"image_url": "data:image/...;base64,..."}`
  or the data URL itself). Fields: `model` (our ids and aliases; default the profile's first model),
  `prompt`, `seconds` (-> custom_options.duration), `size` "WxH" (-> custom_options.resolution), every
  top-level field of the /api/v1 request (common/catalog.py: quality_preset, negative_prompt, seed,
  priority, custom_options, ...) and every custom option flat (steps, cfg_scale, fps, num_frames, ...).
  The result is an /api/v1 request, submitted exactly as POST /api/v1/generate submits it
  (Gateway.submit): the same admission, limits, API keys, per-key isolation and Idempotency-Key.
- GET /v1/videos/{id}, GET /v1/videos (cursor: after, limit, order), DELETE /v1/videos/{id}
  (cancels a job that is not final, removes its files and forgets it), GET /v1/videos/{id}/content
  ?variant=video|thumbnail|spritesheet (the stills are JPEGs made from the MP4, gateway/thumbnails.py).

The Video object: status queued / in_progress / completed / failed (a cancelled job is failed with
error code `cancelled`), integer progress, Unix-second times. Errors on /v1 have the OpenAI shape
`{"error": {"message", "type", "code", "param"}}`: `OpenAIErrors` rewrites the structured error
(common/errors.py) of any /v1 response, including auth's refusals, so there is one source of errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from typing import TYPE_CHECKING, Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import catalog
from common.errors import (
    InvalidMultipart,
    ResultNotAvailable,
    ServerError,
    UnsupportedMediaType,
    ValidationError,
)
from gateway import thumbnails
from gateway.uploads import decode_base64_image, too_large

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)

PREFIX = "/v1"
IMAGE_FIELD = "input_reference"
VARIANTS = ("video", "thumbnail", "spritesheet")
STATUS = {"queued": "queued", "processing": "in_progress", "completed": "completed", "failed": "failed",
          "cancelled": "failed"}
POLL_AFTER_MS = 500  # what the SDK's poll helpers wait between retrieves (header openai-poll-after-ms)
MAX_FORM_FIELDS = 64
MULTIPART_OVERHEAD = 64 << 10
# Multipart sends every value as text; these fields are turned back into what the catalog says they are.
NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
INTEGER = re.compile(r"^-?\d{1,20}$")
# Ours, in the request: what the /v1 names map to, and what they may not also be given as.
MAPPED = {"size": "resolution", "seconds": "duration"}
# The field an error names (admission names the /api/v1 request's) -> the /v1 name.
PARAMS = {"custom_options.resolution": "size", "custom_options.duration": "seconds", "image": IMAGE_FIELD}


# ---- the request ----------------------------------------------------------------------------------

def _bad(param: str, message: str) -> ValidationError:
    return ValidationError(message, {"field": param})


def _from_text(name: str, value: str, kind: str) -> Any:
    """A multipart value as the JSON value the field takes ("" and "null" are null)."""
    if value in ("", "null"):
        return None
    if kind == "integer" and INTEGER.match(value):
        return int(value)
    if kind == "number" and NUMBER.match(value):
        return float(value)
    if kind in ("integer", "number"):
        raise _bad(name, f"{name} must be a number, got {value[:32]!r}")
    if kind == "object":  # custom_options as one JSON text part
        try:
            return json.loads(value)
        except ValueError:
            raise _bad(name, f"{name} must be a JSON object") from None
    return value


def _kind(name: str) -> str:
    if name == "seconds":
        return "number"
    spec = catalog.REQUEST_FIELDS.get(name) or catalog.OPTION_FIELDS.get(name)
    return spec.kind if spec is not None else "string"


def form_to_json(fields: list[tuple[str, str]]) -> dict[str, Any]:
    """Multipart text fields -> the JSON object they stand for; `custom_options[steps]` (as the SDK
    writes a nested object of extra_body) goes into `custom_options`, as does a `custom_options`
    part holding a JSON object."""
    body: dict[str, Any] = {}
    for name, value in fields:
        outer, _, inner = name.partition("[")
        if inner:
            if outer != "custom_options" or not inner.endswith("]") or inner[:-1] not in catalog.OPTION_FIELDS:
                raise _bad(name[:64], f"unknown field {name[:64]!r}")
            options = body.setdefault("custom_options", {})
            if not isinstance(options, dict):
                raise _bad("custom_options", "custom_options is given twice")
            options[inner[:-1]] = _from_text(name, value, _kind(inner[:-1]))
            continue
        if name in body:
            raise _bad(name[:64], f"{name[:64]} is given twice")
        body[name] = _from_text(name, value, _kind(name))
    return body


def to_generate(body: Any, default_model: str) -> dict[str, Any]:
    """A /v1 create body (without its image) -> the /api/v1 generate request it stands for."""
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object", {"got": type(body).__name__})
    request: dict[str, Any] = {"model": default_model}
    options: dict[str, Any] = {}
    for name, value in body.items():
        if name == "custom_options":
            if value is not None and not isinstance(value, dict):
                raise _bad("custom_options", "custom_options must be an object")
            options.update(value or {})
        elif name in catalog.REQUEST_FIELDS:  # every field of the /api/v1 request, as it is
            request[name] = value
        elif name in catalog.OPTION_FIELDS and name not in MAPPED.values():  # a custom option, flat
            options[name] = value
        elif name == "size" and value is not None:
            options["resolution"] = value
        elif name == "seconds" and value is not None:
            options["duration"] = _seconds(value)
        elif name not in MAPPED:
            raise _bad(str(name)[:64], f"unknown field {str(name)[:64]!r}")
    if options:
        request["custom_options"] = options
    return request


def _seconds(value: Any) -> Any:
    """`seconds` is a string in the OpenAI API ("4"); a number is taken too."""
    if isinstance(value, str):
        if not NUMBER.match(value):
            raise _bad("seconds", f"seconds must be a number of seconds, got {value[:32]!r}")
        return float(value)
    return value


def json_image(value: Any) -> str:
    """The base64 (or data: URL) of a JSON body's `input_reference`."""
    if isinstance(value, dict):
        if "file_id" in value:
            raise _bad(IMAGE_FIELD, "file ids are not supported; send the image as a file part or a data: URL")
        value = value.get("image_url")
    if not isinstance(value, str):
        raise _bad(IMAGE_FIELD, "input_reference must be {\"image_url\": \"data:image/...;base64,...\"}")
    if value.startswith(("http://", "https://")):
        raise _bad(IMAGE_FIELD, "image URLs are not fetched; send the image as a file part or a data: URL")
    return value


# ---- the Video object -----------------------------------------------------------------------------

def _seconds_text(frames: Any, fps: Any) -> str:
    if not isinstance(frames, int) or not isinstance(fps, int) or fps <= 0:
        return "0"
    return f"{frames / fps:.3g}"


def video_object(job: dict[str, Any]) -> dict[str, Any]:
    """The broker's `video` body -> the OpenAI Video object."""
    status = str(job["status"])
    error: dict[str, Any] | None = None
    if status == "cancelled":
        error = {"code": "cancelled", "message": "the job was cancelled"}
    elif status == "failed":
        err = job.get("error") or {}
        error = {"code": str(err.get("code", "JOB_FAILED")).lower(), "message": str(err.get("message", "failed"))}
    created, finished = job.get("created_at"), job.get("finished_at")
    return {
        "id": job["job_id"],
        "object": "video",
        "status": STATUS.get(status, status),
        "progress": 100 if status == "completed" else min(99, math.floor(float(job.get("progress") or 0) * 100)),
        "created_at": int(created) if created is not None else 0,
        "completed_at": int(finished) if finished is not None else None,
        "expires_at": None,  # results are kept until deleted
        "model": job.get("model"),
        "seconds": _seconds_text(job.get("num_frames"), job.get("fps")),
        "size": f"{job.get('width')}x{job.get('height')}",
        "prompt": job.get("prompt"),
        "remixed_from_video_id": None,
        "error": error,
    }


# ---- the routes -----------------------------------------------------------------------------------

class OpenAIApi:
    """The /v1 routes, on the Gateway's broker client, limits and submit."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def routes(self) -> list[Route]:
        return [
            Route(f"{PREFIX}/videos", self.create, methods=["POST"]),
            Route(f"{PREFIX}/videos", self.list, methods=["GET"]),
            Route(f"{PREFIX}/videos/{{job_id}}", self.retrieve, methods=["GET"]),
            Route(f"{PREFIX}/videos/{{job_id}}", self.delete, methods=["DELETE"]),
            Route(f"{PREFIX}/videos/{{job_id}}/content", self.content, methods=["GET"]),
        ]

    async def create(self, request: Request) -> Response:
        from gateway.app import check_representable, parse_json, read_body, replay_headers

        g = self.gateway
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        image: tuple[bytes, str] | None = None
        if ctype == "multipart/form-data":
            raw = await read_body(request, g.max_body + g.uploads.max_upload_bytes + MULTIPART_OVERHEAD)
            body, image = await self.read_form(request, raw)
        elif ctype in ("", "application/json", "text/json", "text/plain") or ctype.endswith("+json"):
            raw = await read_body(request, g.max_body + g.uploads.max_base64_chars)
            body = parse_json(raw)
            if isinstance(body, dict) and body.get(IMAGE_FIELD) is not None:
                image = decode_base64_image(json_image(body.pop(IMAGE_FIELD)), g.uploads)
            elif isinstance(body, dict):
                body.pop(IMAGE_FIELD, None)
            if image is None and len(raw) > g.max_body:
                raise too_large(g.max_body)
        else:
            raise UnsupportedMediaType(f"send application/json or multipart/form-data, not {ctype[:64]}",
                                       {"allowed": ["application/json", "multipart/form-data"]})
        generate = to_generate(body, g.config.model_names()[0])
        check_representable(generate)
        result = await g.submit(request, generate, image, api="v1")
        headers = replay_headers(result)
        job = await g.call("video", job_id=result["job_id"], owner=principal_owner(request))
        return JSONResponse(video_object(job), headers=headers)

    async def read_form(self, request: Request, raw: bytes) -> tuple[dict[str, Any], tuple[bytes, str] | None]:
        g = self.gateway

        async def stream() -> Any:
            yield raw

        parser = MultiPartParser(request.headers, stream(), max_files=1, max_fields=MAX_FORM_FIELDS,
                                 max_part_size=g.max_body)
        try:
            form = await parser.parse()
        except MultiPartException:
            raise InvalidMultipart("the multipart body could not be parsed (bad boundary, part headers, sizes or "
                                   f"more than {MAX_FORM_FIELDS} fields)", {"file_parts": [IMAGE_FIELD]}) from None
        fields: list[tuple[str, str]] = []
        image: tuple[bytes, str] | None = None
        try:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name != IMAGE_FIELD:
                        raise InvalidMultipart(f"the only file part is {IMAGE_FIELD}", {"field": name[:64]})
                    data = await value.read(g.uploads.max_upload_bytes + 1)
                    if len(data) > g.uploads.max_upload_bytes:
                        raise too_large(g.uploads.max_upload_bytes)
                    image = (data, (value.content_type or "").split(";")[0].strip().lower())
                else:
                    fields.append((name, value))
        finally:
            await form.close()
        return form_to_json(fields), image

    async def retrieve(self, request: Request) -> Response:
        job = await self.gateway.call("video", job_id=job_id(request), owner=principal_owner(request))
        return JSONResponse(video_object(job), headers={"openai-poll-after-ms": str(POLL_AFTER_MS)})

    async def list(self, request: Request) -> Response:
        q = request.query_params
        limit = q.get("limit", "20")
        if not INTEGER.match(limit):
            raise _bad("limit", "limit must be an integer")
        args: dict[str, Any] = {"limit": int(limit), "order": q.get("order", "desc"), "owner": principal_owner(request)}
        if q.get("after"):
            args["after"] = q["after"]
        page = await self.gateway.call("videos", **args)
        data = [video_object(j) for j in page["jobs"]]
        return JSONResponse({"object": "list", "data": data, "has_more": page["has_more"],
                             "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    async def delete(self, request: Request) -> Response:
        body = await self.gateway.call("delete", job_id=job_id(request), owner=principal_owner(request))
        return JSONResponse({"id": body["job_id"], "object": "video.deleted", "deleted": bool(body["deleted"])})

    async def content(self, request: Request) -> Response:
        g = self.gateway
        variant = request.query_params.get("variant", "video")
        if variant not in VARIANTS:
            raise ValidationError(f"variant must be one of {', '.join(VARIANTS)}", {"field": "variant",
                                                                                   "allowed": list(VARIANTS)})
        job = await g.call("video", job_id=job_id(request), owner=principal_owner(request))
        found = g.result_file(job["job_id"], job.get("output_path")) if job["status"] == "completed" else None
        if found is None:
            raise ResultNotAvailable("the video has no content (yet)", {"status": STATUS.get(job["status"])})
        path, stat = found
        if variant == "video":
            return FileResponse(path, media_type="video/mp4", filename=f"{job['job_id']}.mp4", stat_result=stat)
        try:
            async with g.decode_slots:
                if variant == "thumbnail":
                    jpeg = await asyncio.to_thread(thumbnails.thumbnail, path)
                else:
                    jpeg, _, _ = await asyncio.to_thread(thumbnails.spritesheet, path)
        except thumbnails.NoFrames:
            raise ResultNotAvailable("the video's frames could not be read") from None
        return Response(jpeg, media_type="image/jpeg")


def job_id(request: Request) -> str:
    from gateway.app import job_id_of

    return job_id_of(request)


def principal_owner(request: Request) -> str | None:
    from gateway.app import owner_of

    return owner_of(request)


# ---- errors in the OpenAI shape -------------------------------------------------------------------

def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def openai_error(body: Any, status: int) -> dict[str, Any]:
    """A structured error body (common/errors.py) -> {"error": {"message", "type", "code", "param"}}."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {}
    details = err.get("details") if isinstance(err.get("details"), dict) else {}
    param = details.get("field") if details else None
    if isinstance(param, str):  # named as the /v1 request names it
        param = PARAMS.get(param, param.removeprefix("custom_options."))
    return {"error": {"message": str(err.get("message", "error")), "type": error_type(status),
                      "code": str(err.get("code", "INTERNAL_ERROR")).lower(),
                      "param": param if isinstance(param, str) else None}}


def is_v1(path: str) -> bool:
    return path == PREFIX or path.startswith(f"{PREFIX}/")


class OpenAIErrors:
    """ASGI middleware: on /v1 paths, an error response's structured body becomes the OpenAI shape
    (its status and headers stay); an exception no handler took becomes a 500 in that shape."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_v1(scope["path"]):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []
        started = False

        async def rewrite(message: Message) -> None:
            nonlocal start, started
            if message["type"] == "http.response.start":
                started = True
                ctype = dict(message.get("headers", [])).get(b"content-type", b"")
                if message["status"] >= 400 and ctype.startswith(b"application/json"):
                    start = message  # held until the body is whole
                    return
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                status = start["status"]
                try:
                    body = json.loads(b"".join(chunks))
                except ValueError:
                    body = {}
                content = json.dumps(openai_error(body, status)).encode()
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                if status == 409:  # a conflict (a reused Idempotency-Key) is not cured by sending it again
                    headers.append((b"x-should-retry", b"false"))
                await send({**start, "headers": [*headers, (b"content-length", str(len(content)).encode())]})
                await send({"type": "http.response.body", "body": content})
                return
            await send(message)

        try:
            await self.app(scope, receive, rewrite)
        except Exception:
            log.exception("unexpected error on %s", scope["path"][:100])
            if started:
                raise
            err = ServerError("internal error")
            response = JSONResponse(openai_error(err.to_dict(), err.http_status), status_code=err.http_status)
            await response(scope, receive, send)
