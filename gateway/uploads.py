"""Reading a generate request that carries an image, and checking the image, in the gateway.

A request with an image comes either as `multipart/form-data` with exactly two parts, `request`
(the JSON request object, as the JSON body would be) and `image` (a file part), or as a JSON body
with an `image` field holding the file base64-encoded (a `data:image/...;base64,` prefix is
allowed). Everything is bounded before it is read: the body (`[gateway] max_upload_bytes` plus
`max_body_bytes` for the rest, also for chunked bodies with no Content-Length), the number of
multipart parts, the image's pixels (from its header, before any pixel is decoded). The image must
be PNG, JPEG or WebP by its magic bytes (and by its declared type, when one is given), and must
decode completely; it is then re-encoded as an RGB PNG (EXIF orientation applied), which is what the
broker stores in the job's spool folder.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from common.config import GatewaySection
from common.errors import (
    ImageTooLarge,
    InvalidImage,
    InvalidJson,
    InvalidMultipart,
    PayloadTooLarge,
    UnsupportedMediaType,
)

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
TYPE_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png"}
UNTYPED = {"", "application/octet-stream"}  # a part with no useful declared type: the magic bytes decide
MULTIPART_PARTS = ("request", "image")


@dataclass(frozen=True)
class UploadLimits:
    max_upload_bytes: int = 10 << 20
    max_image_pixels: int = 4096 * 4096
    max_parts: int = len(MULTIPART_PARTS)

    @classmethod
    def from_config(cls, section: GatewaySection) -> UploadLimits:
        return cls(
            max_upload_bytes=section.max_upload_bytes,
            max_image_pixels=section.max_image_pixels,
        )

    @property
    def max_base64_chars(self) -> int:
        return 4 * ((self.max_upload_bytes + 2) // 3)


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body over {limit} bytes", {"limit": limit})


# ---- multipart ----


async def parse_multipart(
    headers: Headers, body: bytes, max_request_bytes: int, limits: UploadLimits
) -> tuple[Any, bytes, str]:
    """(request object, image bytes, declared image type) from a multipart/form-data body read whole."""

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(headers, stream(), max_files=1, max_fields=1, max_part_size=max_request_bytes)
    try:
        form = await parser.parse()
    except MultiPartException:
        # Starlette's own wording is not part of our API; the parts it must have are.
        raise InvalidMultipart(
            "the multipart body could not be parsed (bad boundary, part headers or sizes)",
            {"parts": list(MULTIPART_PARTS)},
        ) from None
    try:
        items = form.multi_items()
        names = [name for name, _ in items]
        if len(items) > limits.max_parts or sorted(names) != sorted(MULTIPART_PARTS):
            got = [name[:64] for name in names[:8]]
            raise InvalidMultipart(
                f"a multipart request has exactly the parts {list(MULTIPART_PARTS)}, got {got}",
                {"parts": list(MULTIPART_PARTS), "got": got},
            )
        request_part, image_part = form["request"], form["image"]
        if not isinstance(image_part, UploadFile):
            raise InvalidMultipart("the image part must be a file part (with a filename)")
        if not isinstance(request_part, str):
            raise InvalidMultipart("the request part must be a JSON field, not a file")
        data = await image_part.read(limits.max_upload_bytes + 1)
        declared = (image_part.content_type or "").split(";")[0].strip().lower()
    finally:
        await form.close()
    if len(data) > limits.max_upload_bytes:
        raise image_too_big(len(data), limits)
    try:
        request = json.loads(request_part)
    except json.JSONDecodeError as exc:
        raise InvalidJson("the request part is not valid JSON", {"line": exc.lineno, "column": exc.colno}) from None
    return request, data, declared


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
