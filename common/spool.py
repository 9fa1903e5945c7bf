"""A job's spool folder (`Config.job_spool(job_id)`): its working files while it runs.

Uploaded inputs and checkpoints live there. A checkpoint is the whole wire message a stage sent to
the next stage (e.g. the DiT hand-off: latents + full UniPC state), written atomically (temp file,
fsync, rename, fsync of the folder) under the name of the stage it was sent to, so a job lost in
that stage (or later) can be sent to it again without redoing the work before it. The broker
removes the folder once the job is final (`remove_job`, the one place that does).

Live previews (small images the DiT stage writes while it denoises) live in `<job>/previews/`;
when the job completes, the broker keeps its latest one beside the MP4 (`<results>/<job_id>.<name>`)
until the MP4 goes; a job that does not complete loses them with its folder.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from common.config import Config
from common.errors import InvalidRequest

if TYPE_CHECKING:
    from common.wire import Limits

log = logging.getLogger(__name__)

SAFE_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CHECKPOINT_SUFFIX = ".ckpt"
# A preview's file name: the steps done when it was made, and its format. Nothing else is served.
PREVIEW_NAME = re.compile(r"^step-[0-9]{4}\.(jpg|webp)$")
PREVIEW_TYPES = {"jpg": "image/jpeg", "webp": "image/webp"}


def check_job_id(job_id: str) -> str:
    if not SAFE_JOB_ID.match(job_id):
        raise InvalidRequest("job id may only hold letters, digits, '-' and '_'", {"job_id": job_id[:80]})
    return job_id


def job_dir(config: Config, job_id: str) -> Path:
    return config.job_spool(check_job_id(job_id))


def checkpoint_path(config: Config, job_id: str, stage: str) -> Path:
    return job_dir(config, job_id) / f"{stage}{CHECKPOINT_SUFFIX}"


def clip_frames_path(config: Config, job_id: str, clip: int) -> Path:
    """Where the VAE keeps an S2V job's decoded clip (uint8 frames, `.npy`) until the last clip's
    frames go to the muxer (`<spool>/<job_id>/clips/clip-NNNN.npy`)."""
    return job_dir(config, job_id) / "clips" / f"clip-{int(clip):04d}.npy"


def preview_name(step: int, extension: str) -> str:
    return f"step-{step:04d}.{extension}"


def preview_path(config: Config, job_id: str, name: str) -> Path:
    """Where a running job's preview `name` is written (`<spool>/<job_id>/previews/<name>`)."""
    if not PREVIEW_NAME.match(name):
        raise InvalidRequest("not a preview name", {"name": name[:40]})
    return job_dir(config, job_id) / "previews" / name


def kept_preview_path(config: Config, job_id: str, name: str) -> Path:
    """Where a completed job's latest preview is kept, beside its MP4."""
    if not PREVIEW_NAME.match(name) or not SAFE_JOB_ID.match(job_id):
        raise InvalidRequest("not a preview name", {"name": name[:40]})
    return config.results_dir / f"{job_id}.{name}"


def write_preview(config: Config, job_id: str, name: str, data: bytes) -> Path:
    """Write a preview image whole (temp file + rename, so a reader never sees half of one). Not
    fsynced: a preview lost in a power cut is replaced by the next one, and the DiT stage should not
    wait on the disk between two steps."""
    path = preview_path(config, job_id, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def keep_preview(config: Config, job_id: str, name: str) -> bool:
    """The job completed: move its latest preview out of the spool folder (which goes next) to sit
    beside the MP4 (a rename; a copy when the two folders are on different file systems). True if
    it was kept."""
    try:
        source, kept = preview_path(config, job_id, name), kept_preview_path(config, job_id, name)
        try:
            os.replace(source, kept)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            write_atomic(kept, source.read_bytes())
    except (OSError, InvalidRequest):
        return False
    return True


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename the fully written `tmp` (in the same folder) onto `path` so that, even after a crash or
    power loss, a reader sees the old file or the whole new one: fsync, rename, fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably (see `replace_durably`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        replace_durably(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_checkpoint(config: Config, job_id: str, stage: str, frames: list[Any]) -> Path:
    """Store the encoded message `frames` (header + buffers) that were sent to `stage`."""
    path = checkpoint_path(config, job_id, stage)
    body = msgpack.packb({"stage": stage, "frames": [memoryview(f.buffer if hasattr(f, "buffer") else f)
                                                     for f in frames]}, use_bin_type=True)
    write_atomic(path, body)
    return path


def read_checkpoint(config: Config, job_id: str, stage: str, limits: Limits) -> list[bytes]:
    """The wire frames of the checkpoint of `job_id` at `stage` (decode them with `messages.decode`)."""
    body = msgpack.unpackb(checkpoint_path(config, job_id, stage).read_bytes(), raw=False,
                           max_bin_len=limits.max_message_bytes)
    if not isinstance(body, dict) or body.get("stage") != stage or not isinstance(body.get("frames"), list):
        raise InvalidRequest("checkpoint file is not a checkpoint of this stage", {"stage": stage})
    frames: list[bytes] = body["frames"]
    return frames


def remove_job(config: Config, job_id: str) -> None:
    """Remove a job's spool folder (uploads, checkpoints): the job is final and needs none of it."""
    try:
        folder = job_dir(config, job_id)
    except InvalidRequest:
        return
    shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():
        log.warning("could not remove the spool folder of job %s", job_id)


def sweep(config: Config, job_final: Callable[[str], bool | None], min_age_s: float = 3600.0) -> list[str]:
    """Remove the spool folders of final jobs, and of unknown jobs (`job_final` returns None) left
    untouched for `min_age_s` (a folder may be written just before its job is submitted).
    Returns the job ids removed."""
    removed: list[str] = []
    try:
        entries = list(config.spool_dir.iterdir())
    except FileNotFoundError:
        return removed
    now = time.time()
    for entry in entries:
        if not entry.is_dir() or not SAFE_JOB_ID.match(entry.name):
            continue
        final = job_final(entry.name)
        if final is False:
            continue
        try:
            age = now - entry.stat().st_mtime
        except FileNotFoundError:
            continue
        if final or age >= min_age_s:
            remove_job(config, entry.name)
            removed.append(entry.name)
    return removed


RESULT_SUFFIXES = (".mp4", ".mkv")  # the MP4, and the lossless master a job may ask for


def result_path(config: Config, job_id: str, suffix: str = ".mp4") -> Path:
    """Where the muxer writes the job's MP4 (or, with `suffix` ".mkv", its lossless master)."""
    return config.results_dir / f"{job_id}{suffix}"


def remove_result(config: Config, job_id: str) -> bool:
    """Remove the files of a job that did not complete, the MP4 and the lossless master (a muxer can
    finish a job just after it was cancelled or failed). True if there was one."""
    if not SAFE_JOB_ID.match(job_id):
        return False
    for kept in config.results_dir.glob(f"{job_id}.step-*"):  # its kept preview goes with it
        if PREVIEW_NAME.match(kept.name[len(job_id) + 1:]):
            kept.unlink(missing_ok=True)
    removed = False
    for suffix in RESULT_SUFFIXES:
        try:
            result_path(config, job_id, suffix).unlink()
            removed = True
        except FileNotFoundError:
            pass
    return removed


def sweep_results(config: Config, job_status: Callable[[str], str | None]) -> list[str]:
    """Remove the files (MP4, lossless master) of jobs that are final but not completed (their
    JobDone came while the broker was down, or was dropped). Files of unknown jobs are left alone.
    Returns the job ids."""
    removed: set[str] = set()
    try:
        entries = list(config.results_dir.iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        job_id = entry.name.split(".", 1)[0]
        suffixes = (*RESULT_SUFFIXES, *(f".{ext}" for ext in PREVIEW_TYPES))
        if entry.suffix not in suffixes or not SAFE_JOB_ID.match(job_id) or job_id in removed:
            continue
        if job_status(job_id) in ("failed", "cancelled") and remove_result(config, job_id):
            removed.add(job_id)
    return sorted(removed)
