"""Stills of a finished video for GET /v1/videos/{id}/content: a thumbnail (one frame) and a
spritesheet (a grid of frames spread over the clip), both JPEG, made from the MP4 with PyAV.

Made on request from the result file (nothing is cached, so deleting the MP4 removes everything a
job has); the gateway runs them in a worker thread, a few at a time. Frames are shrunk as they are
decoded, so a long clip never holds more than its small tiles in memory. No torch here: the
gateway does not load it.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import av
from PIL import Image

THUMBNAIL_MAX_SIDE = 1280
TILE_MAX_SIDE = 256
SPRITESHEET_TILES = 16  # at most; a clip with fewer frames shows each of them
JPEG_QUALITY = 85


class NoFrames(Exception):
    """The file holds no video frame that decodes."""


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _frames(path: Path, max_side: int, stop_at: int | None = None) -> list[Image.Image]:
    """The video's frames, each shrunk to fit `max_side`; only the first `stop_at` + 1 if given."""
    tiles: list[Image.Image] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                width, height = _fit(frame.width, frame.height, max_side)
                small = frame.reformat(width=width, height=height, format="rgb24")
                tiles.append(Image.fromarray(small.to_ndarray()))
                if stop_at is not None and len(tiles) > stop_at:
                    break
    except (av.FFmpegError, IndexError, OSError):
        raise NoFrames() from None
    if not tiles:
        raise NoFrames()
    return tiles


def frame_count(path: Path) -> int:
    """The frame count the container states (0 when it does not say)."""
    try:
        with av.open(str(path)) as container:
            return int(container.streams.video[0].frames or 0)
    except (av.FFmpegError, IndexError, OSError):
        raise NoFrames() from None


def thumbnail(path: Path) -> bytes:
    """The middle frame of the video, as a JPEG."""
    middle = frame_count(path) // 2
    frames = _frames(path, THUMBNAIL_MAX_SIDE, stop_at=middle)
    return _jpeg(frames[min(middle, len(frames) - 1)])


def spritesheet(path: Path, tiles: int = SPRITESHEET_TILES) -> tuple[bytes, int, int]:
    """Up to `tiles` frames spread evenly over the video, left to right and top to bottom in a grid
    of ceil(sqrt(n)) columns, as one JPEG; returns (JPEG, columns, rows)."""
    frames = _frames(path, TILE_MAX_SIDE)
    n = min(tiles, len(frames))
    picked = [frames[round(i * (len(frames) - 1) / max(1, n - 1))] for i in range(n)]
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    width, height = picked[0].size
    sheet = Image.new("RGB", (columns * width, rows * height))
    for i, tile in enumerate(picked):
        sheet.paste(tile, ((i % columns) * width, (i // columns) * height))
    return _jpeg(sheet), columns, rows
