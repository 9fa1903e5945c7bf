"""Structured errors: `{"success": false, "error": {"code", "message", "details"}}`.

Every failure that can reach a client or another process is one of these types, so it can be
turned into that body (or carried in a message) without losing its code. This module is the only
way to build one: each class fixes its code and HTTP status; `ServerError(..., code=, http_status=)`
is only for rebuilding an error received from another process (the broker's reply to the gateway).

What a client sees is written for the client: a message and details never hold exception text
from a library, a file path, a spool folder or a key (the tests check every error body they get).
"""

from __future__ import annotations

from typing import Any


class ServerError(Exception):
    """Base of every error the server reports. `code` is stable API; `message` is for people."""

    code = "INTERNAL_ERROR"
    http_status = 500

    def __init__(
        self, message: str, details: dict[str, Any] | None = None, *, code: str | None = None,
        http_status: int | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.details = dict(details or {})
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status

    def to_dict(self) -> dict[str, Any]:
        return {"success": False, "error": {"code": self.code, "message": self.message, "details": self.details}}

    @classmethod
    def from_dict(cls, body: dict[str, Any], http_status: int | None = None) -> ServerError:
        err = body.get("error", body)
        return cls(str(err.get("message", "")), dict(err.get("details") or {}), code=str(err.get("code", cls.code)),
                   http_status=http_status)


class ConfigError(ServerError):
    code = "CONFIG_ERROR"


class ModelLoadError(ServerError):
    code = "MODEL_LOAD_ERROR"


class InvalidRequest(ServerError):
    code = "INVALID_REQUEST"
    http_status = 422


class JobFailedError(ServerError):
    code = "JOB_FAILED"


class JobCancelled(ServerError):
    code = "JOB_CANCELLED"
    http_status = 409


class OutputError(ServerError):
    """The result could not be written (disk full, file size limit, folder unwritable). The details
    name the errno, never a path."""

    code = "RESULT_WRITE_ERROR"


class ValidationError(InvalidRequest):
    code = "VALIDATION_ERROR"


class ModelNotServed(InvalidRequest):
    code = "MODEL_NOT_SERVED"


class JobNotFound(ServerError):
    code = "JOB_NOT_FOUND"
    http_status = 404


class QueueFull(ServerError):
    code = "QUEUE_FULL"
    http_status = 429


class NotCancellable(ServerError):
    code = "JOB_NOT_CANCELLABLE"
    http_status = 409


class IdempotencyKeyReused(ServerError):
    """An Idempotency-Key sent again within its lifetime with a different request body."""

    code = "IDEMPOTENCY_KEY_REUSED"
    http_status = 409


class TooManyActiveJobs(ServerError):
    """The key already has its limit of queued + running jobs."""

    code = "TOO_MANY_ACTIVE_JOBS"
    http_status = 429


class Unauthorized(ServerError):
    """No API key, or one that is unknown or revoked (the body does not say which of the two)."""

    code = "UNAUTHORIZED"
    http_status = 401


class OriginNotAllowed(ServerError):
    """A WebSocket handshake from a browser origin not in `[gateway] allowed_origins`."""

    code = "ORIGIN_NOT_ALLOWED"
    http_status = 403


class Forbidden(ServerError):
    """A valid key that may not use this route (an admin-only route, such as /metrics)."""

    code = "FORBIDDEN"
    http_status = 403


class RateLimited(ServerError):
    """The key sent more requests in the last minute than its limit."""

    code = "RATE_LIMITED"
    http_status = 429


class UnknownOperation(ServerError):
    code = "UNKNOWN_OPERATION"
    http_status = 400


class BrokerUnavailable(ServerError):
    code = "BROKER_UNAVAILABLE"
    http_status = 503


class WebhookNotAllowed(InvalidRequest):
    """A `webhook_url` the server will not call: webhooks are not configured, its host is not in
    `[webhooks] allowed_hosts`, or it names a private, loopback or link-local address not listed there."""

    code = "WEBHOOK_NOT_ALLOWED"


class LoraNotFound(InvalidRequest):
    """A `custom_options.loras` name that is not in the server's LoRA folder (GET /api/v1/loras)."""

    code = "LORA_NOT_FOUND"


class LoraIncompatible(InvalidRequest):
    """A LoRA that does not fit the requested model (its keys or shapes), or is not a safetensors file."""

    code = "LORA_INCOMPATIBLE"


class InsufficientMemory(ServerError):
    """Refused at submit: the job's estimated peak memory does not fit the configured devices."""

    code = "INSUFFICIENT_GPU_MEMORY"
    http_status = 422


class OutOfMemory(ServerError):
    """A job ran out of device memory while it ran (torch.OutOfMemoryError, or the CPU allocator)."""

    code = "GPU_OUT_OF_MEMORY"
    http_status = 507


class StageTimeout(ServerError):
    code = "STAGE_TIMEOUT"
    http_status = 504


# --- HTTP requests the gateway refuses before the broker sees them -------------------------------


class InvalidJson(ServerError):
    """The body (or the multipart `request` part) is not JSON the server can carry."""

    code = "INVALID_JSON"
    http_status = 400


class InvalidMultipart(ServerError):
    code = "INVALID_MULTIPART"
    http_status = 400


class UnsupportedMediaType(ServerError):
    """A body or an image of a type the API does not take; `details.allowed` lists those it does."""

    code = "UNSUPPORTED_MEDIA_TYPE"
    http_status = 415


class PayloadTooLarge(ServerError):
    code = "PAYLOAD_TOO_LARGE"
    http_status = 413


class InvalidImage(InvalidRequest):
    """The image is not valid base64, is empty, or does not decode completely."""

    code = "INVALID_IMAGE"


class ImageTooLarge(ServerError):
    """More pixels than `[gateway] max_image_pixels` (read from the image's header)."""

    code = "IMAGE_TOO_LARGE"
    http_status = 413


class InvalidAudio(InvalidRequest):
    """The audio is not valid base64, is empty, does not decode completely (truncated or corrupt), or
    has a channel count or sample rate outside the bounds (the details name the bound)."""

    code = "INVALID_AUDIO"


class AudioTooLong(ServerError):
    """More seconds of audio than `[gateway] max_audio_seconds` (counted while decoding, not read from
    the header)."""

    code = "AUDIO_TOO_LONG"
    http_status = 413


class InvalidVideo(InvalidRequest):
    """An input video (s2v's pose video) is not valid base64, is empty, does not decode completely, or
    has no frame, more frames or larger frames than the bounds (the details name the bound)."""

    code = "INVALID_VIDEO"


class ResultNotAvailable(ServerError):
    """The job has no video (yet): not completed, or its file is gone."""

    code = "RESULT_NOT_AVAILABLE"
    http_status = 404


class JobNotCompleted(ServerError):
    """POST /api/v1/promote of a job that has not completed (queued, running, failed, cancelled):
    there is no video to re-render yet, or none will come."""

    code = "JOB_NOT_COMPLETED"
    http_status = 409


class ResultExpired(ServerError):
    """A completed job whose video is gone (deleted by the results sweep, or removed): a promote has
    nothing to start from."""

    code = "RESULT_EXPIRED"
    http_status = 410


class RouteNotFound(ServerError):
    code = "NOT_FOUND"
    http_status = 404


class MethodNotAllowed(ServerError):
    code = "METHOD_NOT_ALLOWED"
    http_status = 405


class HttpError(ServerError):
    """Any other HTTP-level refusal from the web framework; its status is the framework's."""

    code = "HTTP_ERROR"
    http_status = 400


# --- wire format --------------------------------------------------------------------------------


class WireError(ServerError):
    """A message could not be decoded. The receiver logs it and drops the message."""

    code = "WIRE_ERROR"
    http_status = 400


class MalformedHeader(WireError):
    code = "WIRE_MALFORMED_HEADER"


class UnknownMessageType(WireError):
    code = "WIRE_UNKNOWN_TYPE"


class FieldError(WireError):
    code = "WIRE_BAD_FIELD"


class FrameMismatch(WireError):
    code = "WIRE_FRAME_MISMATCH"


class BadDtype(WireError):
    code = "WIRE_BAD_DTYPE"


class BadShape(WireError):
    code = "WIRE_BAD_SHAPE"


class MessageTooLarge(WireError):
    code = "WIRE_MESSAGE_TOO_LARGE"
    http_status = 413


# --- stage process faults ------------------------------------------------------------------------


class StageStopping(ServerError):
    """The stage process is stopping (SIGTERM): it drops the job it holds; the broker sends it again."""

    code = "STAGE_STOPPING"
    http_status = 503


class CheckpointError(ServerError):
    """A job's checkpoint could not be read back; the broker sends the job again from the start."""

    code = "CHECKPOINT_ERROR"
