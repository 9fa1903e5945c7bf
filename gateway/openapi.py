"""The OpenAPI document of the gateway (served at /api/v1/openapi.json; tests check it against the routes)."""

from __future__ import annotations

from typing import Any

from broker.admission import ALIASES, MODELS, PRESETS

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

GENERATE_REQUEST = {
    "type": "object",
    "required": ["prompt", "model"],
    "additionalProperties": False,
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": 2000},
        "negative_prompt": {"type": "string", "maxLength": 2000},
        "model": {"type": "string", "enum": [*MODELS, *ALIASES]},
        "quality_preset": {"type": "string", "enum": list(PRESETS)},
        "quality": {"type": "string", "enum": list(PRESETS), "description": "alias of quality_preset"},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
        "priority": {"type": "integer", "minimum": -10, "maximum": 10},
        "custom_options": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "steps": {"type": "integer", "minimum": 1},
                "cfg_scale": {"type": "number", "minimum": 0, "maximum": 20},
                "cfg_scale_2": {"type": "number", "minimum": 0, "maximum": 20},
                "resolution": {"type": "string", "pattern": "^[0-9]+x[0-9]+$", "description": "WxH, one the model supports"},
                "fps": {"type": "integer", "minimum": 1, "maximum": 60},
                "duration": {"type": "number", "exclusiveMinimum": 0, "description": "seconds; frames = 4n+1 nearest duration x fps"},
                "num_frames": {"type": "integer", "minimum": 1, "description": "4n+1"},
            },
        },
    },
}

# The JSON body may carry the image base64-encoded; multipart/form-data carries the same request
# object in a `request` part and the file in an `image` part.
GENERATE_JSON = {
    **GENERATE_REQUEST,
    "properties": {
        **GENERATE_REQUEST["properties"],
        "image": {
            "type": "string", "contentEncoding": "base64",
            "description": "input image, PNG/JPEG/WebP, base64 (a data:image/...;base64, URL is accepted); "
                           "required by i2v-A14B, optional for ti2v-5B, refused by the others",
        },
    },
}

GENERATE_MULTIPART = {
    "type": "object",
    "required": ["request", "image"],
    "additionalProperties": False,
    "properties": {
        "request": {**GENERATE_REQUEST, "description": "the JSON request object (part Content-Type application/json)"},
        "image": {"type": "string", "contentMediaType": "image/png, image/jpeg, image/webp",
                  "description": "the input image file (a file part, with a filename)"},
    },
}

STATUS = {
    "type": "object",
    "required": ["job_id", "status", "progress", "eta"],
    "properties": {
        "job_id": {"type": "string"},
        "status": {"type": "string", "enum": ["queued", "processing", "completed", "failed", "cancelled"]},
        "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "eta": {"type": ["number", "null"], "description": "seconds, from measured stage timings; null until measured"},
        "stage": {"type": ["string", "null"]},
        "queue_position": {"type": ["integer", "null"]},
        "error": {"type": "object"},
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
    },
}

RESULT = {
    "type": "object",
    "required": ["job_id", "status", "output_url", "metadata"],
    "properties": {
        "job_id": {"type": "string"},
        "status": {"type": "string"},
        "output_url": {"type": ["string", "null"]},
        "error": {"type": ["object", "null"]},
        "metadata": {"type": "object"},
    },
}

OBJECT = {"type": "object"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): _json(ERROR, "error") for c in codes}


JOB_ID_PARAM = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}


AUTH_DESCRIPTION = (
    "API keys (`python -m gateway.keys create NAME`) are sent as `Authorization: Bearer <token>`; the WebSocket "
    "also takes the subprotocol pair [\"wan.bearer\", \"<token>\"]. Keys are required unless the gateway listens on "
    "loopback with [gateway] auth = auto (the default) or off. Errors of this layer: 401 UNAUTHORIZED (with "
    "WWW-Authenticate: Bearer), 403 ORIGIN_NOT_ALLOWED, 429 RATE_LIMITED (with Retry-After); POST /generate also "
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
                operation["responses"] = {**operation["responses"], **_errors(401, 403, 429)}
    return doc


def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "wan-server", "version": "1"},
        "paths": {
            "/api/v1/generate": {"post": {
                "summary": "Submit a generation job (JSON, or multipart/form-data with an input image)",
                "description": "Image errors: 413 PAYLOAD_TOO_LARGE (file over max_upload_bytes), 413 "
                               "IMAGE_TOO_LARGE (over max_image_pixels), 415 UNSUPPORTED_MEDIA_TYPE (not PNG/JPEG/"
                               "WebP by its magic bytes, or not what its declared type says; or a body that is "
                               "neither JSON nor multipart), 422 INVALID_IMAGE (bad base64, truncated or corrupt "
                               "file), 400 INVALID_MULTIPART (parts other than request + image), 422 "
                               "VALIDATION_ERROR (field image: i2v-A14B without an image, or a model that takes none "
                               "given one).",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": GENERATE_JSON},
                    "multipart/form-data": {"schema": GENERATE_MULTIPART, "encoding": {
                        "request": {"contentType": "application/json"},
                        "image": {"contentType": "image/png, image/jpeg, image/webp"},
                    }},
                }},
                "responses": {"202": _json(SUBMITTED, "queued"), **_errors(400, 413, 415, 422, 429, 503)},
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
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                ],
                "responses": {"200": _json(OBJECT), **_errors(422, 503)},
            }},
            "/api/v1/models": {"get": {"summary": "Models and what this server serves",
                                       "responses": {"200": _json(OBJECT), **_errors(503)}}},
            "/api/v1/presets": {"get": {"summary": "What each quality preset resolves to, per model",
                                        "responses": {"200": _json(OBJECT), **_errors(503)}}},
            "/api/v1/files/{job_id}.mp4": {"get": {
                "summary": "The video of a completed job (HTTP Range supported)", "parameters": [JOB_ID_PARAM],
                "responses": {"200": {"description": "MP4", "content": {"video/mp4": {}}},
                              "206": {"description": "partial MP4", "content": {"video/mp4": {}}}, **_errors(404, 503)},
            }},
            "/api/v1/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json(OBJECT)}}},
            "/health": {"get": {"summary": "The gateway process is alive", "responses": {"200": _json(OBJECT)}}},
            "/ready": {"get": {"summary": "Every stage on every route is up with its models loaded",
                               "responses": {"200": _json(OBJECT), "503": _json(OBJECT, "not ready")}}},
        },
        "x-websocket": {
            "/ws": "send {action: subscribe, job_id} or {action: subscribe, all: true}; receive snapshot, then "
                   "status | progress | complete | error events (a user's own jobs only, all of them for an admin); "
                   "the key and the Origin are checked before the handshake is accepted",
        },
    }
