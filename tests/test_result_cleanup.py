"""A job that did not complete leaves no MP4 behind.

The muxer can finish a job just after the client cancelled it (the chaos soak found one such MP4
left in results/ for good). These tests drive an in-process Broker, with its real store and real
files, through the reports a muxer sends.
"""

from __future__ import annotations

import time
from pathlib import Path

from broker.broker import Broker
from common import messages as m
from common import spool


def submit(broker: Broker) -> str:
    return str(broker.api.submit({"request": {"prompt": "x", "model": "t2v", "quality": "draft"}})["job_id"])


def write_mp4(broker: Broker, job_id: str) -> Path:
    """What the muxer does when it finishes: results/<job>.mp4."""
    path = broker.config.results_dir / f"{job_id}.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64)
    return path


def done(job_id: str, path: Path, attempt: int = 1) -> m.JobDone:
    return m.JobDone(job_id=job_id, attempt=attempt, path=str(path), num_frames=5, width=32, height=32, fps=16)


def test_an_mp4_written_after_the_job_was_cancelled_is_removed(broker: Broker) -> None:
    job_id = submit(broker)
    broker.api.cancel({"job_id": job_id})
    path = write_mp4(broker, job_id)  # the muxer was already writing when the cancel came
    broker.on_report(done(job_id, path))
    assert not path.exists()
    job = broker.store.get(job_id)
    assert job is not None and job.status == "cancelled" and job.output_path is None


def test_an_mp4_left_by_an_earlier_attempt_goes_when_the_job_fails(broker: Broker) -> None:
    job_id = submit(broker)
    path = write_mp4(broker, job_id)
    job = broker.store.get(job_id)
    assert job is not None
    broker.fail(job, {"code": "STAGE_CRASHED", "message": "m", "details": {}}, stage="muxer")
    assert not path.exists()


def test_a_completed_job_keeps_its_mp4_when_a_late_report_comes(broker: Broker) -> None:
    job_id = submit(broker)
    attempt = broker.store.start(job_id)  # dispatched (no stage runs here to take it)
    assert attempt == 1
    path = write_mp4(broker, job_id)
    broker.on_report(done(job_id, path, attempt))
    job = broker.store.get(job_id)
    assert job is not None and job.status == "completed"
    broker.on_report(done(job_id, path, attempt))  # a second delivery of the same report
    broker.on_report(done(job_id, path, attempt + 5))  # an attempt the store never had
    assert path.exists()


def test_the_sweep_removes_mp4s_of_jobs_that_did_not_complete_and_leaves_others(broker: Broker) -> None:
    cancelled = submit(broker)
    broker.api.cancel({"job_id": cancelled})
    orphan = write_mp4(broker, cancelled)  # its JobDone never reached the broker
    unknown = write_mp4(broker, "f" * 32)  # not in this store: not ours to judge
    queued = submit(broker)
    pending = write_mp4(broker, queued)  # a job still running may be mid-write
    broker.dispatcher.sweep_spool()
    assert not orphan.exists()
    assert unknown.exists() and pending.exists()


def test_a_checkpoint_written_after_the_cancel_is_removed_when_its_report_comes(broker: Broker) -> None:
    """The text encoder does not look for a cancel in its one pass: it may write the DiT's
    checkpoint after the job's spool folder went, and only its report says so."""
    job_id = str(broker.api.submit({"request": {"prompt": "x", "model": "t2v", "quality": "draft"}})["job_id"])
    attempt = broker.store.start(job_id)
    assert attempt == 1
    broker.api.cancel({"job_id": job_id})
    path = spool.checkpoint_path(broker.config, job_id, "dit_high")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"checkpoint")
    broker.on_report(m.StageReport(job_id, attempt, "text_encoder", "checkpoint", at=time.time(), to="dit_high"))
    assert not spool.job_dir(broker.config, job_id).exists()
