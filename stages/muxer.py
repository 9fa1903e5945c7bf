"""Muxer stage: uint8 frames -> H.264 (yuv420p) MP4 with PyAV.

The file is written to a temporary name in the results folder, fsynced and renamed into place
(and the folder fsynced), so a reader never sees a partial MP4, even after a crash or power loss.
A write that fails (disk full, the file size limit, a results folder that is not writable) fails
the job with `RESULT_WRITE_ERROR` and removes the temporary file; temporary files left by a muxer
process that was killed are removed when the next one starts.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from common import messages as m
from common.errors import InvalidRequest, OutputError
from common.spool import replace_durably
from stages.base import Stage
from stages.runtime import stage_main

log = logging.getLogger(__name__)

SAFE_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TEMP_NAME = re.compile(r"^\.[A-Za-z0-9_-]{1,64}\.mp4\.(\d+)\.tmp$")


def write_error(exc: OSError) -> OutputError:
    """The structured error for a failed write: the errno and its text, never a path."""
    code = exc.errno or 0
    name = errno.errorcode.get(code, "UNKNOWN")
    return OutputError(f"could not write the video: {os.strerror(code) if code else 'I/O error'}",
                       {"errno": code, "reason": name})


def write_mp4(frames: np.ndarray, fps: int, path: Path, crf: int = 18, preset: str = "medium",
              before_trailer: Callable[[], None] | None = None, metadata: dict[str, str] | None = None) -> None:
    """Encode (F, H, W, 3) uint8 frames to `path` atomically. `before_trailer` is called once every
    frame is in the temporary file, before the index (moov) that makes it playable; `metadata` goes
    into the container's tags."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InvalidRequest(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise InvalidRequest(f"yuv420p needs even width and height, got {width}x{height}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(tmp), mode="w", format="mp4") as container:
            container.metadata.update(metadata or {})
            stream = container.add_stream("libx264", rate=Fraction(fps, 1))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf), "preset": preset}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
            if before_trailer is not None:
                before_trailer()
        # The job is recorded completed once the JobDone report leaves: the video must be on
        # disk by then, as checkpoints are.
        replace_durably(tmp, path)
    except OSError as exc:
        raise write_error(exc) from None
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass


def remove_stale_temp_files(folder: Path) -> list[str]:
    """Remove the temporary MP4s of muxer processes that no longer run (killed while writing)."""
    removed: list[str] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_NAME.match(entry.name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # that muxer still runs (another replica): its file is in use
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        try:
            entry.unlink()
            removed.append(entry.name)
        except OSError:
            pass
    return removed


def postprocess_metadata(p: m.JobParams) -> dict[str, str]:
    """The preset's post-processing, recorded in the MP4 as requested and not applied."""
    if not p.postprocess:
        return {}
    wanted = ", ".join(f"{k}={v}" for k, v in sorted(p.postprocess.items()))
    return {"comment": f"wan-server: post-processing requested, not applied: {wanted}"}


class MuxerStage(Stage):
    kind = "muxer"

    def setup(self) -> None:
        # Past a file size limit (RLIMIT_FSIZE) a write must fail with EFBIG, not kill the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        self.results_dir = self.config.results_dir
        try:
            self.results_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # each job reports it; the process stays up for when it is fixed
            log.error("results folder is not usable: %s", exc.strerror)
        for name in remove_stale_temp_files(self.results_dir):
            log.warning("removed %s, left by a muxer that was killed while writing", name)
        self.crf = self.spec.crf
        self.preset = self.spec.preset

    def handle(self, msg: m.Message) -> list[m.Message]:
        if not isinstance(msg, m.MuxJob):
            raise InvalidRequest(f"muxer does not take {msg.type_name}")
        if not SAFE_JOB_ID.match(msg.job_id):
            raise InvalidRequest("job id may only hold letters, digits, '-' and '_'", {"job_id": msg.job_id[:80]})
        frames = msg.frames.numpy()
        path = self.results_dir / f"{msg.job_id}.mp4"
        write_mp4(frames, msg.params.fps, path, self.crf, self.preset,
                  before_trailer=lambda: self.fault_point("write"), metadata=postprocess_metadata(msg.params))
        log.info("wrote %s (%d frames %dx%d @ %d fps)",
                 path, len(frames), frames.shape[2], frames.shape[1], msg.params.fps)
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
