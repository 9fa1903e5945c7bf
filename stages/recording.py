"""Recording a stage's wire traffic, and replaying it in-process.

With `runtime.record_dir` set, every message a stage receives and what its `handle` returned for it
are written as raw wire frames, one msgpack file per message (`<seq>-<job id>.msgpack` under
`<record_dir>/<stage>/`): `{"stage", "job_id", "in": [frames], "out": [[frames], ...] | None}`.
`replay_file` feeds such a file to a stage's `handle` and returns both outputs, to compare them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import msgpack

from common import messages as m
from common.wire import Limits
from stages.base import Stage

log = logging.getLogger(__name__)


def frame_bytes(frame: Any) -> bytes:
    """The bytes of a frame as sent (bytes, a buffer, or a zmq.Frame received with copy=False)."""
    return bytes(memoryview(frame.buffer if hasattr(frame, "buffer") else frame))


class Recorder:
    """Writes one stage's recordings; a recorder without a folder records nothing."""

    def __init__(self, folder: Path | None, stage: str):
        self.folder = folder
        self.stage = stage

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def record(self, seq: int, job_id: str | None, incoming: list[bytes], outgoing: list[list[Any]] | None) -> None:
        if self.folder is None:
            return
        body = {
            "stage": self.stage,
            "job_id": job_id,
            "in": incoming,
            "out": None if outgoing is None else [[frame_bytes(f) for f in parts] for parts in outgoing],
        }
        path = self.folder / f"{seq:06d}-{job_id or 'undecodable'}.msgpack"
        tmp = path.with_suffix(".tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(msgpack.packb(body, use_bin_type=True))
            tmp.replace(path)
        except OSError as exc:  # a recording is a debugging aid: losing one must not stop the stage
            log.warning("could not record message %d: %s", seq, exc.strerror)
            tmp.unlink(missing_ok=True)


def replay_file(
    path: str | os.PathLike[str], stage: Stage, limits: Limits
) -> tuple[list[list[bytes]], list[list[bytes]]]:
    """Feed a recorded message to `stage.handle` in-process; returns (recorded outputs, replayed outputs)."""
    body = msgpack.unpackb(Path(path).read_bytes(), raw=False)
    msg = m.decode(body["in"], limits)
    replayed = [[frame_bytes(f) for f in m.encode(out)] for out in stage.handle(msg)]
    return body["out"], replayed
