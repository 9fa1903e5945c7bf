"""Muxer stage: uint8 frames -> post-processing -> MP4 (H.264, HEVC or AV1), and a lossless master.

Per job: the VAE's frames go through the job's post-processing (stages/postprocess.py:
interpolation with minterpolate or RIFE, upscaling), streamed frame by frame into the MP4's
encoder (stages/encoders.py); with `lossless_master`, the same source frames also go, untouched,
into an FFV1 Matroska file.
A speech-to-video job (`JobParams.audio`) also gets its audio: the file the broker stored in the
job's spool folder, checked against its sha256, cut to the video from the audio time of frame 0
and encoded as AAC (stages/soundtrack.py; the master carries it as float PCM).
With `rife_weights` set, the muxer loads that RIFE model at startup on its `device` (and `dtype`
on CUDA); a file whose keys or shapes do not match stops startup with MODEL_LOAD_ERROR. So does
`upscale_weights`: the super-resolution model (stages/upscale.py), loaded the same way.
Every file is written to a temporary name in the results folder, fsynced and renamed into place
(and the folder fsynced) only once every output is complete, so a reader never sees a partial
file, even after a crash or power loss, and a job that fails part way leaves none of its files.
A write that fails (disk full, the file size limit, a results folder that is not writable) fails
the job with `RESULT_WRITE_ERROR` and removes the temporary files; temporary files left by a
muxer process that was killed are removed when the next one starts.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common import messages as m
from common.errors import InvalidRequest
from stages import postprocess, rife, upscale
from stages.base import Stage
from stages.encoders import Encoding, Track, check_frames, job_encoding, write_outputs
from stages.placement import Placement, module_bytes
from stages.runtime import stage_main
from stages.soundtrack import Soundtrack, decode

log = logging.getLogger(__name__)

SAFE_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TEMP_NAME = re.compile(r"^\.[A-Za-z0-9_-]{1,64}\.(?:mp4|mkv)\.(\d+)\.tmp$")


def write_mp4(frames: np.ndarray, fps: int, path: Path, crf: int = 18, preset: str = "medium",
              before_trailer: Callable[[], None] | None = None, metadata: dict[str, str] | None = None) -> None:
    """Encode (F, H, W, 3) uint8 frames to an H.264 MP4 at `path` atomically (no post-processing)."""
    write_outputs(frames, fps, path, Encoding("h264", crf, 8, preset), before_trailer=before_trailer,
                  metadata=metadata)


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


def postprocess_metadata(applied: dict[str, object]) -> dict[str, str]:
    """The post-processing that ran, recorded in the files' tags."""
    if not applied:
        return {}
    parts = [f"{k}={v}" for k, v in sorted(applied.items()) if not isinstance(v, dict)]
    parts += [f"{k}={v['method']}" for k, v in sorted(applied.items()) if isinstance(v, dict)]
    return {"comment": f"wan-server: post-processed: {', '.join(parts)}"}


class MuxerStage(Stage):
    kind = "muxer"
    rife: rife.Interpolator | None = None  # with `rife_weights`: loaded by setup()
    upscaler: upscale.Upscaler | None = None  # with `upscale_weights`: loaded by setup()

    def setup(self) -> None:
        # Past a file size limit (RLIMIT_FSIZE) a write must fail with EFBIG, not kill the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its banner at every job otherwise
        self.results_dir = self.config.results_dir
        try:
            self.results_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # each job reports it; the process stays up for when it is fixed
            log.error("results folder is not usable: %s", exc.strerror)
        for name in remove_stale_temp_files(self.results_dir):
            log.warning("removed %s, left by a muxer that was killed while writing", name)
        if self.spec.rife_weights:  # a file that does not match is refused here (MODEL_LOAD_ERROR), not at a job
            self.placement = Placement.from_spec(self.spec)
            self.rife = rife.Interpolator(self.config.path(self.spec.rife_weights), self.placement.device,
                                          self.placement.dtype)
            self.placement.components["rife"] = module_bytes(self.rife.model)
            log.info("RIFE v%s from %s (sha256 %s) on %s, %s", rife.VERSION, self.rife.path, self.rife.sha256[:12],
                     self.rife.device, self.rife.describe()["dtype"])
        if self.spec.upscale_weights:  # likewise: refused here, never run with random weights
            self.placement = self.placement or Placement.from_spec(self.spec)
            self.upscaler = upscale.Upscaler(self.config.path(self.spec.upscale_weights), self.placement.device,
                                             self.placement.dtype, self.spec.upscale_tile,
                                             self.spec.upscale_tile_overlap)
            self.placement.components["upscale"] = module_bytes(self.upscaler.model)
            u = self.upscaler.describe()
            log.info("upscale model %s x%d from %s (sha256 %s) on %s, %s, tiles of %d + %d", u["architecture"],
                     u["scale"], self.upscaler.path, self.upscaler.sha256[:12], u["device"], u["dtype"],
                     self.upscaler.tile, self.upscaler.overlap)

    def handle(self, msg: m.Message) -> list[m.Message]:
        if not isinstance(msg, m.MuxJob):
            raise InvalidRequest(f"muxer does not take {msg.type_name}")
        if not SAFE_JOB_ID.match(msg.job_id):
            raise InvalidRequest("job id may only hold letters, digits, '-' and '_'", {"job_id": msg.job_id[:80]})
        frames = msg.frames.numpy()
        check_frames(frames)
        p = msg.params
        plan = postprocess.plan(p, int(frames.shape[2]), int(frames.shape[1]), self.rife, self.upscaler)
        encoding = job_encoding(p.encoding, self.spec)
        path = self.results_dir / f"{msg.job_id}.mp4"
        master = self.results_dir / f"{msg.job_id}.mkv" if p.encoding.get("lossless_master") else None
        sound = track = None
        if p.audio is not None:  # s2v: the job's audio file, in its spool folder
            sound = Soundtrack.of_job(self.config.job_spool(msg.job_id), p.audio, self.spec.audio_bitrate)
            track = Track(decode(sound.path), sound.start_s, sound.bitrate)
        outputs = write_outputs(frames, p.fps, path, encoding, plan=plan, master=master,
                                before_trailer=lambda: self.fault_point("write"),
                                between_frames=lambda: self.check_cancelled(msg.job_id),
                                metadata=postprocess_metadata(plan.applied()), audio=track)
        main = outputs[0]
        audio: dict[str, Any] = {}
        if sound is not None and track is not None:  # the job's audio, and the MP4's track made of it
            audio = {"sha256": sound.sha256, "duration_s": round(track.samples.duration_s, 6), **main.audio_track}
        log.info("wrote %s (%d frames %dx%d @ %d fps, %s)%s", path, main.frames, main.width, main.height, main.fps,
                 encoding.codec, " and its lossless master" if master is not None else "")
        return [
            m.JobDone(
                job_id=msg.job_id,
                attempt=msg.attempt,
                path=str(path),
                num_frames=main.frames,
                width=main.width,
                height=main.height,
                fps=main.fps,
                outputs=[o.describe() for o in outputs],
                postprocess=plan.applied(),
                audio=audio,
            )
        ]


def main() -> None:
    stage_main(MuxerStage)


if __name__ == "__main__":
    main()
