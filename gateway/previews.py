"""Serving live previews: `GET /api/v1/previews/{job_id}/{name}`.

The route asks the broker for the job's status with the caller's owner filter first (another
user's job is 404 `JOB_NOT_FOUND`, as on every route), then reads the file this module finds by
the job id and a name of the fixed form `step-NNNN.jpg|webp` (`common.spool.PREVIEW_NAME`); nothing
else the client sends becomes a path. A running job's previews are in its spool folder; a
completed job keeps its latest one beside the MP4. The file must be a regular file, opened without
following symlinks, and small.
"""

from __future__ import annotations

import os
from pathlib import Path
from stat import S_ISREG

from common import spool
from common.config import Config
from common.errors import InvalidRequest

MAX_PREVIEW_BYTES = 8 << 20  # a preview is at most 512 px on its long side: far less than this


def preview_file(config: Config, job_id: str, name: str, status: str) -> tuple[bytes, str] | None:
    """(image bytes, media type) of the job's preview `name`, or None when there is none."""
    if not spool.PREVIEW_NAME.match(name):
        return None
    try:
        if status == "processing":
            path = spool.preview_path(config, job_id, name)
        elif status == "completed":
            path = spool.kept_preview_path(config, job_id, name)
        else:
            return None  # a job that did not complete keeps no previews
    except InvalidRequest:
        return None
    data = read_regular(path)
    return None if data is None else (data, spool.PREVIEW_TYPES[name.rsplit(".", 1)[1]])


def open_regular(path: Path) -> tuple[int, os.stat_result] | None:
    """`path` opened read-only without following a symlink in its last part (nor blocking on a
    FIFO), with its stat, if it is a regular file; None otherwise. The caller closes the fd."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        stat = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not S_ISREG(stat.st_mode):
        os.close(fd)
        return None
    return fd, stat


def read_regular(path: Path) -> bytes | None:
    opened = open_regular(path)
    if opened is None:
        return None
    fd, stat = opened
    try:
        if stat.st_size > MAX_PREVIEW_BYTES:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_PREVIEW_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
