"""The OpenAPI document of the gateway (served at /api/v1/openapi.json): /api/v1, and the
OpenAI-style /v1/videos (its errors in the OpenAI shape).

The request schemas are generated from common/catalog.py, the tables admission checks requests
against, so the document states the real bounds (and the schema fuzzer, tests/test_fuzz.py, tries
them). Routes, responses and security are written here, once.
"""

from __future__ import annotations

from typing import Any

from common import catalog
from common.catalog import Field

ERROR = {
    "type": "object",
    "required": ["success", "error"],
    "properties": {
        "success": {"type": "boolean", "enum": [False]},
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "object"}},
        },
    },
}


def field_schema(spec: Field) -> dict[str, Any]:
    """The JSON Schema of one catalog field."""
    schema: dict[str, Any] = {"type": [spec.kind, "null"] if spec.nullable else spec.kind}
    if spec.description:
        schema["description"] = spec.description
    if spec.default is not None:
        schema["default"] = spec.default
    if spec.enum:
        schema["enum"] = [*spec.enum, None] if spec.nullable else list(spec.enum)
    if spec.minimum is not None:
        schema["minimum"] = spec.minimum
    if spec.maximum is not None:
        schema["maximum"] = spec.maximum
    if spec.nonblank:
        schema["minLength"] = 1
        schema["pattern"] = r"\S"  # more than white space
    if spec.max_length is not None:
        schema["maxLength"] = spec.max_length
    if spec.pattern is not None:
        schema["pattern"] = spec.pattern
    if spec.kind == "object":
        schema.update({k: v for k, v in object_schema(spec.fields).items() if k != "type"})
    if spec.kind == "array":
        schema.update(items=object_schema(spec.fields), maxItems=spec.max_items)
    return schema


def object_schema(fields: tuple[Field, ...]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False,
                              "properties": {f.name: field_schema(f) for f in fields}}
    required = [f.name for f in fields if f.required]
    if required:
        schema["required"] = required
    return schema


def _input_description(name: str) -> str:
    uses = {"required by": "required", "optional for": "optional"}
    said = [f"{words} {', '.join(ids)}" for words, use in uses.items()
            if (ids := [x.id for x in catalog.CATALOG if x.takes(name) == use])]
    return f"{catalog.INPUTS[name].description}; {'; '.join(said)}; refused by the other models"


GENERATE_REQUEST = object_schema(catalog.REQUEST)

# The JSON body may carry each input file base64-encoded (null: none); multipart/form-data carries
# the same request object in a `request` part and each file in a part of the input's name.
GENERATE_JSON = {
    **GENERATE_REQUEST,
    "properties": {
        **GENERATE_REQUEST["properties"],
        **{name: {"type": ["string", "null"], "contentEncoding": "base64", "description": _input_description(name)}
           for name in catalog.INPUTS},
    },
}

GENERATE_MULTIPART = {
    "type": "object",
    "required": ["request"],  # and at least one file part: multipart exists to carry files
    "additionalProperties": False,
    "properties": {
        "request": {**GENERATE_REQUEST, "description": "the JSON request object (part Content-Type application/json)"},
        **{name: {"type": "string", "contentMediaType": ", ".join(spec.media_types),
                  "description": f"{_input_description(name)} (a file part, with a filename)"}
           for name, spec in catalog.INPUTS.items()},
    },
}

STATUS = {
    "type": "object",
    "required": ["job_id", "status", "progress", "eta"],
    "properties": {
        "job_id": {"type": "string"},
        "status": {"type": "string", "enum": list(catalog.JOB_STATUSES)},
        "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "eta": {"type": ["number", "null"], "description": "seconds, from measured stage timings; null until measured"},
        "stage": {"type": ["string", "null"]},
        "queue_position": {"type": ["integer", "null"]},
        "error": {"type": "object"},
        "preview_url": {"type": ["string", "null"],
                        "description": "the latest live preview image (while running; kept once completed)"},
        "group_id": {"type": ["string", "null"], "description": "the n variants' group; null for n = 1"},
    },
}

SUBMITTED = {
    "type": "object",
    "required": ["job_id", "status", "created_at", "eta_seconds", "queue_position"],
    "properties": {
        "job_id": {"type": "string"},
        "status": {"type": "string"},
        "created_at": {"type": "number"},
        "eta_seconds": {"type": ["number", "null"]},
        "queue_position": {"type": ["integer", "null"]},
        "group_id": {"type": ["string", "null"], "description": "the n variants' group; null for n = 1"},
        "job_ids": {"type": "array", "items": {"type": "string"}, "description": "every job made, job_id first"},
        "seeds": {"type": "array", "items": {"type": "integer"}, "description": "each job's seed, in job_ids order"},
        "jobs": {"type": "array", "items": {"type": "object"}, "description": "with n > 1: each job's submit status"},
    },
}

RESULT = {
    "type": "object",
    "required": ["job_id", "status", "output_url", "metadata"],
    "properties": {
        "job_id": {"type": "string"},
        "status": {"type": "string"},
        "output_url": {"type": ["string", "null"]},
        "outputs": {"type": "array", "description": "every file of a completed job: the MP4, then the lossless "
                    "master if asked for", "items": {"type": "object", "properties": {
                        "url": {"type": "string"}, "codec": {"type": "string"}, "container": {"type": "string"},
                        "width": {"type": "integer"}, "height": {"type": "integer"}, "fps": {"type": "integer"},
                        "bytes": {"type": "integer"}}}},
        "error": {"type": ["object", "null"]},
        "metadata": {"type": "object"},
    },
}

OBJECT = {"type": "object"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): _json(ERROR, "error") for c in codes}


def _v1_errors(*codes: int) -> dict[str, Any]:
    return {str(c): _json(V1_ERROR, "error (OpenAI shape)") for c in codes}


JOB_ID_PARAM = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
IDEMPOTENCY_PARAM = {
    "name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"},
    "description": "1 to 255 characters; the same key and body (per API key) within 24 h return the same job "
                   "(with Idempotent-Replayed: true), another body under the key is 409 IDEMPOTENCY_KEY_REUSED",
}

# ---- /v1: the OpenAI-style video API (gateway/openai_api.py) ----

V1_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "code", "param"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "code": {"type": "string", "description": "our error code, lower case"},
                       "param": {"type": ["string", "null"]}},
    }},
}

VIDEO = {
    "type": "object",
    "required": ["id", "object", "status", "progress", "created_at", "model", "seconds", "size"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["video"]},
        "status": {"type": "string", "enum": ["queued", "in_progress", "completed", "failed"]},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        "created_at": {"type": "integer"},
        "completed_at": {"type": ["integer", "null"]},
        "expires_at": {"type": ["integer", "null"]},
        "model": {"type": "string"},
        "seconds": {"type": "string"},
        "size": {"type": "string"},
        "prompt": {"type": ["string", "null"]},
        "remixed_from_video_id": {"type": ["string", "null"]},
        "error": {"type": ["object", "null"], "description": "{code, message}; a cancelled job: code cancelled"},
    },
}

VIDEO_LIST = {
    "type": "object",
    "required": ["object", "data", "has_more", "first_id", "last_id"],
    "properties": {
        "object": {"type": "string", "enum": ["list"]},
        "data": {"type": "array", "items": VIDEO},
        "has_more": {"type": "boolean"},
        "first_id": {"type": ["string", "null"]},
        "last_id": {"type": ["string", "null"]},
    },
}

VIDEO_DELETED = {
    "type": "object",
    "required": ["id", "object", "deleted"],
    "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["video.deleted"]},
                   "deleted": {"type": "boolean"}},
}


def _video_create() -> dict[str, Any]:
    """POST /v1/videos's JSON body: OpenAI's fields, each /api/v1 request field and each custom option flat."""
    from gateway.openai_api import MAPPED, NUMBER

    fields, options = catalog.REQUEST_FIELDS, catalog.OPTION_FIELDS
    duration, resolution = options["duration"], options["resolution"]
    props: dict[str, Any] = {
        "prompt": field_schema(fields["prompt"]),
        "model": {**field_schema(fields["model"]), "description": "a model id or its alias; default: the first "
                                                                  "model the profile serves"},
        "seconds": {"type": ["string", "number", "null"], "pattern": NUMBER.pattern, "minimum": duration.minimum,
                    "maximum": duration.maximum, "description": "clip length in seconds, a string as OpenAI's "
                    "(\"4\") or a number: custom_options.duration"},
        "size": {**field_schema(resolution), "type": ["string", "null"],
                 "description": "WxH, one the model supports: custom_options.resolution"},
        "input_reference": {
            "type": ["string", "object", "null"], "properties": {"image_url": {"type": "string"}},
            "description": "an input image: in JSON a data:image/...;base64, URL (or {image_url: <that>}); in "
                           "multipart/form-data a file part named input_reference. " + _input_description("image"),
        },
        **{f.name: field_schema(f) for f in catalog.REQUEST if f.name not in ("prompt", "model")},
        **{f.name: field_schema(f) for f in catalog.OPTIONS if f.name not in MAPPED.values()},
    }
    return {"type": "object", "additionalProperties": False, "required": ["prompt"], "properties": props}


def _v1_paths() -> dict[str, Any]:
    limit = next(f for f in catalog.LIST_QUERY if f.name == "limit")
    return {
        "/v1/videos": {
            "post": {
                "summary": "Create a video (OpenAI-style); the same job as POST /api/v1/generate makes",
                "description": "JSON, or multipart/form-data with the same fields as text parts (custom_options "
                               "as custom_options[steps] ...) and an optional input_reference file part.",
                "parameters": [IDEMPOTENCY_PARAM],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _video_create()}}},
                "responses": {"200": _json(VIDEO), **_v1_errors(400, 409, 413, 415, 422, 429, 503)},
            },
            "get": {
                "summary": "The caller's videos, newest first by default (cursor paging)",
                "parameters": [
                    {"name": "after", "in": "query", "schema": {"type": "string"},
                     "description": "the id of the last video of the previous page"},
                    {"name": "limit", "in": "query", "schema": field_schema(limit)},
                    {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"],
                                                                "default": "desc"}},
                ],
                "responses": {"200": _json(VIDEO_LIST), **_v1_errors(404, 422, 503)},
            },
        },
        "/v1/videos/{job_id}": {
            "get": {"summary": "A video job", "parameters": [JOB_ID_PARAM],
                    "responses": {"200": _json(VIDEO), **_v1_errors(404, 503)}},
            "delete": {"summary": "Delete a video: cancel it if it runs, remove its files, forget it",
                       "parameters": [JOB_ID_PARAM],
                       "responses": {"200": _json(VIDEO_DELETED), **_v1_errors(404, 503)}},
        },
        "/v1/videos/{job_id}/content": {"get": {
            "summary": "The MP4, or a JPEG thumbnail (the middle frame) or spritesheet (a grid of frames)",
            "parameters": [JOB_ID_PARAM, {"name": "variant", "in": "query", "schema": {
                "type": "string", "enum": ["video", "thumbnail", "spritesheet"], "default": "video"}}],
            "responses": {"200": {"description": "the content", "content": {"video/mp4": {}, "image/jpeg": {}}},
                          **_v1_errors(404, 422, 503)},
        }},
    }


AUTH_DESCRIPTION = (
    "API keys (`python -m gateway.keys create NAME`) are sent as `Authorization: Bearer <token>`; the WebSocket "
    "also takes the subprotocol pair [\"wan.bearer\", \"<token>\"]. Keys are required unless the gateway listens on "
    "loopback with [gateway] auth = auto (the default) or off. Errors of this layer: 401 UNAUTHORIZED (with "
    "WWW-Authenticate: Bearer), 403 ORIGIN_NOT_ALLOWED (or FORBIDDEN: /metrics without an admin key), "
    "429 RATE_LIMITED (with Retry-After); POST /generate also "
    "gives 429 TOO_MANY_ACTIVE_JOBS (the key's queued + running jobs at its limit) or QUEUE_FULL. A job of another "
    "user is 404 JOB_NOT_FOUND on every route, as if it did not exist; an admin key sees every job."
)
OPEN_PATHS = ("/health",)


def openapi_document(auth: bool = True) -> dict[str, Any]:
    """The document; with `auth` False (a loopback gateway with auth off) no route requires a key."""
    doc = _document()
    doc["info"]["description"] = AUTH_DESCRIPTION
    doc["components"] = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                        "description": "an API key token: wan_<key id>_<secret>"}}}
    if auth:
        doc["security"] = [{"bearer": []}]
    for path, item in doc["paths"].items():
        for operation in item.values():
            if path in OPEN_PATHS:
                operation["security"] = []
            else:
                auth_errors = _v1_errors if path.startswith("/v1/") else _errors
                operation["responses"] = {**operation["responses"], **auth_errors(401, 403, 429)}
    return doc


def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "wan-server", "version": "1"},
        "paths": {
            "/api/v1/generate": {"post": {
                "summary": "Submit a generation job (JSON, or multipart/form-data with input files: an image; for "
                           "s2v-14B an image, an audio file and optionally a pose video; for video-to-video a video)",
                "description": "Image errors: 413 PAYLOAD_TOO_LARGE (file over max_upload_bytes), 413 "
                               "IMAGE_TOO_LARGE (over max_image_pixels), 415 UNSUPPORTED_MEDIA_TYPE (not PNG/JPEG/"
                               "WebP by its magic bytes, or not what its declared type says; or a body that is "
                               "neither JSON nor multipart), 422 INVALID_IMAGE (bad base64, truncated or corrupt "
                               "file), 400 INVALID_MULTIPART (parts other than request + image / audio / pose_video, "
                               "each once), 422 VALIDATION_ERROR (field image: i2v-A14B without an image, or a model "
                               "that takes none given one; field audio likewise for s2v-14B). Audio errors (field "
                               "audio): 413 PAYLOAD_TOO_LARGE (over max_audio_bytes), 413 AUDIO_TOO_LONG (over "
                               "max_audio_seconds, counted while decoding), 415 UNSUPPORTED_MEDIA_TYPE (not WAV/FLAC/"
                               "MP3/OGG/M4A by its bytes, or not its declared type), 422 INVALID_AUDIO (bad base64, "
                               "truncated or corrupt, channels or sample rate outside 1-8 / 8-192 kHz). Pose video "
                               "errors (field pose_video): 413 PAYLOAD_TOO_LARGE, 415 UNSUPPORTED_MEDIA_TYPE (not "
                               "MP4/WebM), 422 INVALID_VIDEO (truncated, corrupt, too many or too large frames). "
                               "Video-to-video (field video, t2v-A14B and ti2v-5B): the same errors (MP4/WebM/MKV), "
                               "422 VALIDATION_ERROR (field video: a model that takes none, or with an image; field "
                               "strength: without a video; custom_options.num_frames: more "
                               "frames than the video gives).",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": GENERATE_JSON},
                    "multipart/form-data": {"schema": GENERATE_MULTIPART, "encoding": {
                        "request": {"contentType": "application/json"},
                        **{name: {"contentType": ", ".join(spec.media_types)} for name, spec in catalog.INPUTS.items()},
                    }},
                }},
                "parameters": [IDEMPOTENCY_PARAM],
                "responses": {"202": _json(SUBMITTED, "queued"), **_errors(400, 409, 413, 415, 422, 429, 503)},
            }},
            "/api/v1/promote/{job_id}": {"post": {
                "summary": "Re-render a completed job at a higher preset from its own video (video-to-video with "
                           "the same prompt, seed and LoRAs unless given); the child's result metadata names its "
                           "parent_job_id",
                "description": "The source is the job's lossless master if it has one, else its MP4. Errors: 404 "
                               "JOB_NOT_FOUND (no such job, or another user's), 409 JOB_NOT_COMPLETED (queued, "
                               "running, failed or cancelled), 410 RESULT_EXPIRED (its video is gone), 422 "
                               "VALIDATION_ERROR (quality_preset not above the job's: reason not_higher; num_frames, "
                               "duration or fps in custom_options; a model that takes no video; an image-conditioned "
                               "job), and those of POST /api/v1/generate for the child's request.",
                "parameters": [JOB_ID_PARAM, IDEMPOTENCY_PARAM],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": object_schema(catalog.PROMOTE)}}},
                "responses": {"202": _json(SUBMITTED, "queued"), **_errors(400, 404, 409, 410, 413, 422, 429, 503)},
            }},
            "/api/v1/status/{job_id}": {"get": {
                "summary": "A job's status, progress and ETA", "parameters": [JOB_ID_PARAM],
                "responses": {"200": _json(STATUS), **_errors(404, 503)},
            }},
            "/api/v1/result/{job_id}": {"get": {
                "summary": "A job's result: video URL and metadata", "parameters": [JOB_ID_PARAM],
                "responses": {"200": _json(RESULT), **_errors(404, 503)},
            }},
            "/api/v1/cancel/{job_id}": {"post": {
                "summary": "Cancel a queued or running job", "parameters": [JOB_ID_PARAM],
                "responses": {"200": _json(STATUS), **_errors(404, 409, 503)},
            }},
            "/api/v1/jobs": {"get": {
                "summary": "List jobs, newest first",
                "parameters": [{"name": f.name, "in": "query", "schema": field_schema(f)} for f in catalog.LIST_QUERY],
                "responses": {"200": _json(OBJECT), **_errors(422, 503)},
            }},
            "/api/v1/models": {"get": {"summary": "Models and what this server serves",
                                       "responses": {"200": _json(OBJECT), **_errors(503)}}},
            "/api/v1/loras": {"get": {"summary": "The LoRAs of the server's folder: name, files, sha256, the models "
                                                 "each fits (or why it is refused)",
                                      "responses": {"200": _json(OBJECT), **_errors(503)}}},
            "/api/v1/presets": {"get": {"summary": "What each quality preset resolves to, per model",
                                        "responses": {"200": _json(OBJECT), **_errors(503)}}},
            "/api/v1/files/{job_id}.mp4": {"get": {
                "summary": "The video of a completed job (HTTP Range supported)", "parameters": [JOB_ID_PARAM],
                "responses": {"200": {"description": "MP4", "content": {"video/mp4": {}}},
                              "206": {"description": "partial MP4", "content": {"video/mp4": {}}}, **_errors(404, 503)},
            }},
            "/api/v1/files/{job_id}.mkv": {"get": {
                "summary": "The lossless master (FFV1 in Matroska) of a completed job that asked for one "
                           "(custom_options.lossless_master; HTTP Range supported)", "parameters": [JOB_ID_PARAM],
                "responses": {"200": {"description": "Matroska", "content": {"video/x-matroska": {}}},
                              "206": {"description": "partial Matroska", "content": {"video/x-matroska": {}}},
                              **_errors(404, 503)},
            }},
            "/api/v1/previews/{job_id}/{name}": {"get": {
                "summary": "A live preview image of a job (JPEG or WebP, at most 512 px on its long side)",
                "parameters": [JOB_ID_PARAM, {"name": "name", "in": "path", "required": True,
                                              "schema": {"type": "string", "pattern": r"^step-[0-9]{4}\.(jpg|webp)$"}}],
                "responses": {"200": {"description": "the image", "content": {"image/jpeg": {}, "image/webp": {}}},
                              **_errors(404, 503)},
            }},
            "/api/v1/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json(OBJECT)}}},
            "/health": {"get": {"summary": "The gateway process is alive", "responses": {"200": _json(OBJECT)}}},
            "/ready": {"get": {"summary": "Every stage on every route is up with its models loaded",
                               "responses": {"200": _json(OBJECT), "503": _json(OBJECT, "not ready")}}},
            **_v1_paths(),
            "/metrics": {"get": {
                "summary": "Prometheus metrics (text format 0.0.4): jobs, queue, latencies, stages, device memory",
                "description": "With auth on, an admin key is needed: another key gets 403 FORBIDDEN.",
                "responses": {"200": {"description": "the Prometheus text exposition",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}},
                              **_errors(503)},
            }},
        },
        "x-websocket": {
            "/ws": "send {action: subscribe, job_id} or {action: subscribe, all: true}; receive snapshot, then "
                   "status | progress | preview {frame_url, step, steps} | complete | error events (a user's own "
                   "jobs only, all of them for an admin); "
                   "the key and the Origin are checked before the handshake is accepted",
        },
    }
