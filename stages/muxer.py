"""Muxer stage: uint8 frames -> H.264 (yuv420p) MP4 with PyAV.

The file is written to a temporary name in the results folder and renamed into place, so a reader
never sees a partial MP4.
"""

from __future__ import annotations

import logging
import os
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from common import messages as m
from common.errors import InvalidRequest, OutputError
from common.runtime import Stage, stage_main

log = logging.getLogger(__name__)

SAFE_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def write_mp4(frames: np.ndarray, fps: int, path: Path, crf: int = 18, preset: str = "medium") -> None:
    """Encode (F, H, W, 3) uint8 frames to `path` atomically."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InvalidRequest(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise InvalidRequest(f"yuv420p needs even width and height, got {width}x{height}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps, 1))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf), "preset": preset}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"could not write the video: {exc.strerror or exc}", {"errno": exc.errno}) from None
    finally:
        if tmp.exists():
            tmp.unlink()


class MuxerStage(Stage):
    kind = "muxer"

    def setup(self) -> None:
        self.results_dir = self.config.results_dir
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.crf = int(self.spec.options.get("crf", 18))
        self.preset = str(self.spec.options.get("preset", "medium"))

    def handle(self, msg: m.Message) -> list[m.Message]:
        if not isinstance(msg, m.MuxJob):
            raise InvalidRequest(f"muxer does not take {msg.type_name}")
        if not SAFE_JOB_ID.match(msg.job_id):
            raise InvalidRequest("job id may only hold letters, digits, '-' and '_'", {"job_id": msg.job_id[:80]})
        frames = msg.frames.numpy()
        path = self.results_dir / f"{msg.job_id}.mp4"
        write_mp4(frames, msg.params.fps, path, self.crf, self.preset)
        log.info("wrote %s (%d frames %dx%d @ %d fps)", path, len(frames), frames.shape[2], frames.shape[1], msg.params.fps)
        return [
            m.JobDone(
                job_id=msg.job_id,
                attempt=msg.attempt,
                path=str(path),
                num_frames=len(frames),
                width=int(frames.shape[2]),
                height=int(frames.shape[1]),
                fps=msg.params.fps,
            )
        ]


def main() -> None:
    stage_main(MuxerStage)


if __name__ == "__main__":
    main()
