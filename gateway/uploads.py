"""Reading a generate request that carries input files, and checking them, in the gateway.

A request with an image comes either as `multipart/form-data` with a `request` part (the JSON
request object, as the JSON body would be) and a file part per input (`image`; for s2v-14B also
`audio` and `pose_video`; for video-to-video `video`; each at most once), or as a JSON body with an
`image` field holding the file base64-encoded (a `data:image/...;base64,` prefix is allowed; `audio`,
`pose_video` and `video` alike).
Everything is bounded before it is read: the body (each file's bound, `[gateway] max_upload_bytes`
for an image, plus `max_body_bytes` for the rest, also for chunked bodies with no Content-Length), the number of
multipart parts, the image's pixels (from its header, before any pixel is decoded). The image must
be PNG, JPEG or WebP by its magic bytes (and by its declared type, when one is given), and must
decode completely; it is then re-encoded as an RGB PNG (EXIF orientation applied), which is what the
broker stores in the job's spool folder. An audio file is checked by common/audio.py (its bytes,
its declared type, decoded to the end within the duration, channel and rate bounds) and a pose
video or a video-to-video input here (MP4 or WebM, and for `video` also MKV, by its bytes, every
frame decoded, within the frame and pixel bounds); the broker stores them as they came.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import av
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from common import catalog
from common.config import GatewaySection
from common.errors import (
    ImageTooLarge,
    InvalidAudio,
    InvalidImage,
    InvalidJson,
    InvalidMultipart,
    InvalidVideo,
    PayloadTooLarge,
    ServerError,
    UnsupportedMediaType,
)

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
TYPE_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png"}
UNTYPED = {"", "application/octet-stream"}  # a part with no useful declared type: the magic bytes decide
FILE_PARTS: tuple[str, ...] = tuple(catalog.INPUTS)  # image, audio, pose_video, video: each at most once
MULTIPART_PARTS = ("request", *FILE_PARTS)
# type, PyAV demuxer; which a video input takes: the types its catalog entry lists (pose_video: MP4, WebM)
VIDEO_FORMATS = {"mp4": ("video/mp4", "mov"), "webm": ("video/webm", "matroska"),
                 "mkv": ("video/x-matroska", "matroska")}
VIDEO_ALIASES = {"video/x-m4v": "video/mp4", "video/quicktime": "video/mp4", "audio/webm": "video/webm",
                 "video/mkv": "video/x-matroska", "video/matroska": "video/x-matroska"}


@dataclass(frozen=True)
class UploadLimits:
    max_upload_bytes: int = 10 << 20
    max_image_pixels: int = 4096 * 4096
    max_parts: int = len(MULTIPART_PARTS)
    max_audio_bytes: int = 32 << 20
    max_video_bytes: int = 32 << 20
    max_video_frames: int = 2000

    @classmethod
    def from_config(cls, section: GatewaySection) -> UploadLimits:
        return cls(
            max_upload_bytes=section.max_upload_bytes,
            max_image_pixels=section.max_image_pixels,
            max_audio_bytes=section.max_audio_bytes,
            max_video_bytes=section.max_video_bytes,
            max_video_frames=section.max_video_frames,
        )

    def max_bytes(self, field: str) -> int:
        """The largest file taken for the input `field`."""
        return {"audio": self.max_audio_bytes, "pose_video": self.max_video_bytes,
                "video": self.max_video_bytes}.get(field, self.max_upload_bytes)

    @property
    def max_files_bytes(self) -> int:
        """Every input file of one request together, at their bounds."""
        return sum(self.max_bytes(name) for name in FILE_PARTS)

    @property
    def max_base64_chars(self) -> int:
        return 4 * ((self.max_upload_bytes + 2) // 3)

    @property
    def max_files_base64_chars(self) -> int:
        return sum(4 * ((self.max_bytes(name) + 2) // 3) + 64 for name in FILE_PARTS)


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body over {limit} bytes", {"limit": limit})


# ---- multipart ----


async def parse_multipart(
    headers: Headers, body: bytes, max_request_bytes: int, limits: UploadLimits
) -> tuple[Any, bytes, str]:
    """(request object, image bytes, declared image type) from a multipart/form-data body of
    exactly `request` and `image`, read whole (the /v1 API's shape)."""
    request, files = await parse_multipart_files(headers, body, max_request_bytes, limits, ("image",))
    data, declared = files["image"]
    return request, data, declared


async def parse_multipart_files(
    headers: Headers, body: bytes, max_request_bytes: int, limits: UploadLimits, required: tuple[str, ...] = (),
) -> tuple[Any, dict[str, tuple[bytes, str]]]:
    """(request object, {input name: (file bytes, declared type)}) from a multipart/form-data body
    read whole: a `request` part and one file part per input given (at least one), each at most once."""

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(headers, stream(), max_files=len(FILE_PARTS), max_fields=1,
                             max_part_size=max_request_bytes)
    try:
        form = await parser.parse()
    except MultiPartException:
        # Starlette's own wording is not part of our API; the parts it must have are.
        raise InvalidMultipart(
            "the multipart body could not be parsed (bad boundary, part headers or sizes)",
            {"parts": list(MULTIPART_PARTS)},
        ) from None
    allowed = ["request", *(required or FILE_PARTS)]
    files: dict[str, tuple[bytes, str]] = {}
    try:
        items = form.multi_items()
        names = [name for name, _ in items]
        files_given = [name for name in names if name != "request"]
        if (len(items) > limits.max_parts or names.count("request") != 1 or len(set(names)) != len(names)
                or not set(names) <= set(allowed) or not files_given or not set(required) <= set(names)):
            got = [name[:64] for name in names[:8]]
            shape = "exactly the parts" if required else "a request part and at least one file part of"
            raise InvalidMultipart(f"a multipart request has {shape} {allowed}, each once, got {got}",
                                   {"parts": allowed, "got": got})
        request_part = form["request"]
        if not isinstance(request_part, str):
            raise InvalidMultipart("the request part must be a JSON field, not a file")
        for name in files_given:
            part = form[name]
            if not isinstance(part, UploadFile):
                raise InvalidMultipart(f"the {name} part must be a file part (with a filename)")
            data = await part.read(limits.max_bytes(name) + 1)
            if len(data) > limits.max_bytes(name):
                raise file_too_big(name, limits)
            files[name] = data, (part.content_type or "").split(";")[0].strip().lower()
    finally:
        await form.close()
    try:
        request = json.loads(request_part)
    except json.JSONDecodeError as exc:
        raise InvalidJson("the request part is not valid JSON", {"line": exc.lineno, "column": exc.colno}) from None
    return request, files


# ---- base64 in a JSON body ----


def decode_base64_image(value: Any, limits: UploadLimits) -> tuple[bytes, str]:
    """(image bytes, declared type from a data: URL or '') from the JSON body's `image` field."""
    if not isinstance(value, str):
        raise InvalidImage("image must be a base64 string", {"field": "image"})
    declared = ""
    if value.startswith("data:"):
        head, sep, value = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise InvalidImage("an image data URL must be data:<type>;base64,<data>", {"field": "image"})
        declared = head[5 : -len(";base64")].strip().lower()
    if len(value) > limits.max_base64_chars + 4:
        raise image_too_big(len(value) * 3 // 4, limits)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage("image is not valid base64", {"field": "image"}) from None
    if len(data) > limits.max_upload_bytes:
        raise image_too_big(len(data), limits)
    return data, declared


def image_too_big(size: int, limits: UploadLimits) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the image is over {limits.max_upload_bytes} bytes", {"limit": limits.max_upload_bytes, "field": "image"}
    )


def file_too_big(field: str, limits: UploadLimits) -> PayloadTooLarge:
    limit = limits.max_bytes(field)
    return PayloadTooLarge(f"the {field} file is over {limit} bytes", {"limit": limit, "field": field})


INVALID: dict[str, type[ServerError]] = {"image": InvalidImage, "audio": InvalidAudio, "pose_video": InvalidVideo,
                                         "video": InvalidVideo}


def decode_base64_file(field: str, value: Any, limits: UploadLimits) -> tuple[bytes, str]:
    """(file bytes, declared type from a data: URL or '') from the JSON body's `field` (audio, pose_video)."""
    if field == "image":
        return decode_base64_image(value, limits)
    invalid = INVALID[field]
    if not isinstance(value, str):
        raise invalid(f"{field} must be a base64 string", {"field": field})
    declared = ""
    if value.startswith("data:"):
        head, sep, value = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise invalid(f"a {field} data URL must be data:<type>;base64,<data>", {"field": field})
        declared = head[5 : -len(";base64")].strip().lower()
    limit = limits.max_bytes(field)
    if len(value) > 4 * ((limit + 2) // 3) + 4:
        raise file_too_big(field, limits)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{field} is not valid base64", {"field": field}) from None
    if len(data) > limit:
        raise file_too_big(field, limits)
    return data, declared


# ---- the pose video ----


def sniff_video(data: bytes) -> str | None:
    """"mp4" (an ISO-BMFF `ftyp` box), "webm" or "mkv" (an EBML header whose doctype is webm or
    matroska), or None."""
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return "mp4"
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        if b"webm" in data[:64]:
            return "webm"
        if b"matroska" in data[:64]:
            return "mkv"
    return None


def check_video(data: bytes, declared: str, limits: UploadLimits, field: str = "pose_video") -> dict[str, Any]:
    """Validate and fully decode an uploaded video; returns {format, width, height, frames, fps}.

    Runs in a worker thread. MP4 or WebM by its bytes (and its declared type, when given); every
    frame decoded, within `max_video_frames` and each within `max_image_pixels`; a file that decodes
    fewer frames than its header counts (truncated) is refused."""
    accepted = [fmt for fmt, (kind, _) in VIDEO_FORMATS.items() if kind in catalog.INPUTS[field].media_types]
    allowed = sorted(VIDEO_FORMATS[fmt][0] for fmt in accepted)
    if len(data) > limits.max_video_bytes:
        raise file_too_big(field, limits)
    if not data:
        raise InvalidVideo(f"the {field} file is empty", {"field": field})
    fmt = sniff_video(data)
    if fmt is None or fmt not in accepted:
        names = " or ".join({"mp4": "MP4", "webm": "WebM", "mkv": "MKV"}[f] for f in accepted)
        raise UnsupportedMediaType(f"the {field} file is not {names}", {"field": field, "allowed": allowed})
    kind, demuxer = VIDEO_FORMATS[fmt]
    declared = VIDEO_ALIASES.get(declared, declared)
    if declared not in UNTYPED and declared != kind:
        raise UnsupportedMediaType(
            f"the {field} file was sent as {declared[:64]} but its content is {kind}",
            {"field": field, "declared": declared[:64], "detected": kind, "allowed": allowed},
        )
    corrupt = InvalidVideo(f"the {fmt.upper()} video does not decode completely (truncated or corrupt)",
                           {"field": field})
    try:
        container = av.open(io.BytesIO(data), mode="r", format=demuxer)
    except (av.FFmpegError, ValueError):
        raise corrupt from None
    with container:
        if not container.streams.video:
            raise InvalidVideo(f"the {field} file has no video stream", {"field": field})
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width < 1 or height < 1 or width * height > limits.max_image_pixels:
            raise InvalidVideo(
                f"the {field} frames are {width}x{height}; at most {limits.max_image_pixels} pixels are taken",
                {"field": field, "width": width, "height": height, "max_pixels": limits.max_image_pixels})
        frames, end = 0, 0.0
        try:
            for packet in container.demux(stream):
                for frame in stream.decode(packet):
                    frames += 1
                    if frame.time is not None:
                        end = max(end, frame.time)
                    if frames > limits.max_video_frames:
                        raise InvalidVideo(f"the {field} file has more than {limits.max_video_frames} frames",
                                           {"field": field, "max_frames": limits.max_video_frames})
        except (av.FFmpegError, ValueError):
            raise corrupt from None
        declared_frames = stream.frames
        rate = stream.average_rate or stream.guessed_rate
        # The length the file states: the stream's (MP4), else the container's (WebM's Segment Duration).
        declared_s = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                      else (container.duration or 0) / 1e6)
    if frames == 0 or (declared_frames and frames < declared_frames):
        raise corrupt
    frame_s = 1 / float(rate) if rate else 0.0
    if declared_s and frame_s and end + frame_s < declared_s - 1.5 * frame_s:  # frames missing at the end
        raise corrupt
    return {"format": fmt, "width": width, "height": height, "frames": frames,
            "fps": round(float(rate), 6) if rate else None}


# ---- the image itself ----


def sniff(data: bytes) -> str | None:
    """The format named by the file's magic bytes, among the allowed ones."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def check_image(data: bytes, declared: str, limits: UploadLimits) -> tuple[bytes, int, int]:
    """Validate and fully decode an uploaded image; returns (RGB PNG bytes, width, height).

    Runs in a worker thread (it decodes); raises the ServerError with the 4xx to send. A decoder's
    own complaint is logged by nobody and sent to nobody: Pillow's texts may name its internals.
    """
    allowed = sorted(FORMATS.values())
    if len(data) > limits.max_upload_bytes:
        raise image_too_big(len(data), limits)
    if not data:
        raise InvalidImage("the image is empty", {"field": "image"})
    fmt = sniff(data)
    if fmt is None:
        raise UnsupportedMediaType("the image is not PNG, JPEG or WebP", {"field": "image", "allowed": allowed})
    declared = TYPE_ALIASES.get(declared, declared)
    if declared not in UNTYPED and declared != FORMATS[fmt]:
        raise UnsupportedMediaType(
            f"the image was sent as {declared[:64]} but its content is {FORMATS[fmt]}",
            {"field": "image", "declared": declared[:64], "detected": FORMATS[fmt], "allowed": allowed},
        )
    # Pillow refuses images over 2x Image.MAX_IMAGE_PIXELS when it opens them; our own limit (far
    # below) is checked from the header before any pixel is decoded.
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])  # reads the header only
    except Image.DecompressionBombError:
        raise pixels_error(None, None, limits) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidImage(f"the {FORMATS[fmt]} image's header does not decode", {"field": "image"}) from None
    with img:
        width, height = img.size
        if width < 1 or height < 1 or width * height > limits.max_image_pixels:
            raise pixels_error(width, height, limits)
        try:
            img.load()  # a truncated or corrupt file fails here (LOAD_TRUNCATED_IMAGES stays off)
            rgb = ImageOps.exif_transpose(img).convert("RGB")
        except Exception:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error ...
            raise InvalidImage(
                f"the {FORMATS[fmt]} image does not decode completely (truncated or corrupt)", {"field": "image"}
            ) from None
    out = io.BytesIO()
    rgb.save(out, "PNG", compress_level=1)
    return out.getvalue(), rgb.width, rgb.height


def pixels_error(width: int | None, height: int | None, limits: UploadLimits) -> ImageTooLarge:
    size = f"{width}x{height}" if width is not None else "too many"
    return ImageTooLarge(
        f"the image has {size} pixels; at most {limits.max_image_pixels} pixels are taken",
        {"field": "image", "width": width, "height": height, "max_pixels": limits.max_image_pixels},
    )
