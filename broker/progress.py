"""Progress: what the stages report about a job (StageReport, JobDone, JobFailed), turned into the
job's stage, progress, timings and ETA.

Reports of an attempt other than the job's current one, and reports about final jobs, are ignored.
A job's position only moves forward along its route within an attempt: reports of two stage
processes arrive on separate connections, so one stage's `forwarded` can land after the next
stage's `accepted` (broker/inflight.py `JobInFlight.move_to`).

Progress is the share of the route done: each stage kind weighs `PROGRESS_WEIGHTS` (the DiT share
split by steps). An S2V job passes the route's DiT..VAE part once per clip (`params.num_clips`):
that part's weight is shared out over the clips, so progress runs over all clips, each report
carrying its clip, and never goes backwards (a late report of an earlier clip or stage moves
nothing; the store keeps the highest progress).

Each stage's time from `accepted` to `forwarded` (or to JobDone, for the last) is recorded per job
shape (`timing_key`); ETAs and the watchdog's deadlines come from those means.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from broker.dispatch import entry_stage
from broker.inflight import JobInFlight
from broker.store import Job
from common import messages as m
from common import spool

if TYPE_CHECKING:
    from broker.broker import Broker

log = logging.getLogger(__name__)

# Share of a job's progress each stage kind accounts for (the DiT share is split by steps).
PROGRESS_WEIGHTS = {"text_encoder": 0.05, "dit": 0.80, "vae": 0.10, "muxer": 0.05}


# The stage kinds an S2V job passes once per clip.
CYCLE_KINDS = ("dit", "vae")


def clips_of(job: Job) -> int:
    """How many times the job passes its DiT..VAE stages (S2V: its clips; else 1)."""
    clips = job.params.get("num_clips") or 1
    return clips if isinstance(clips, int) and clips > 0 else 1


def is_cyclic(job: Job) -> bool:
    return clips_of(job) > 1


def timing_key(params: dict[str, Any]) -> str:
    """Jobs of one shape take about the same time per stage."""
    return f"{params['model']}:{params['width']}x{params['height']}x{params['num_frames']}:{params['steps']}"


def preview_url(job_id: str, name: str) -> str:
    return f"/api/v1/previews/{job_id}/{name}"


def failure(body: Any, stage: str) -> dict[str, Any]:
    """The structured error a JobFailed carries (`{"error": {code, message, details}}`, or the inner
    map); a body of any other shape fails the job with a generic JOB_FAILED naming the stage."""
    inner = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(inner, dict) and isinstance(inner.get("code"), str) and inner["code"]:
        error = dict(inner)
        if not isinstance(error.get("message"), str):
            error["message"] = f"stage {stage} failed the job"
        if not isinstance(error.get("details"), dict):
            error["details"] = {"stage": stage}
        return error
    return {"code": "JOB_FAILED", "message": f"stage {stage} failed the job", "details": {"stage": stage}}


class Progress:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.config = broker.config
        self.store = broker.store

    def on_report(self, msg: m.StageReport | m.JobDone | m.JobFailed) -> None:
        job = self.store.get(msg.job_id)
        if job is not None and isinstance(msg, m.JobDone) and job.status in ("failed", "cancelled"):
            # The muxer finished after the job was cancelled or failed: its MP4 must not stay behind.
            if spool.remove_result(self.broker.config, job.id):
                log.info("removed the MP4 of attempt %d, written after the job was %s", msg.attempt, job.status)
            return
        if job is None and isinstance(msg, m.JobDone):
            # The muxer finished a job deleted while it ran (DELETE /v1/videos): no one will fetch the MP4.
            if spool.remove_result(self.broker.config, msg.job_id):
                log.info("removed the MP4 of job %s, deleted while it ran", msg.job_id)
        if (job is None or job.final) and isinstance(msg, m.StageReport) and msg.event in ("preview", "checkpoint"):
            # A stage wrote into the job's spool folder (a DiT's preview, a checkpoint for the next
            # stage) just after the job ended or was deleted (DELETE /v1/videos), and so made the
            # folder again: remove it.
            spool.remove_job(self.broker.config, msg.job_id)
            return
        if job is None or job.final or msg.attempt != job.attempt:
            return  # a stale attempt, a cancelled job, or a job we never had
        if isinstance(msg, m.StageReport):
            self.on_stage_report(job, msg)
        elif isinstance(msg, m.JobDone):
            self.on_done(job, msg)
        else:
            self.on_failed(job, msg)

    def _record(self, job: Job) -> JobInFlight:
        record = self.broker.inflight.jobs.get(job.id)
        if record is None or record.attempt != job.attempt:
            # Dispatched by an earlier broker process or a test: where it is shows from its reports.
            record = JobInFlight(job.id, job.attempt, job.route, entry_stage(job), None)
            self.broker.inflight.jobs[job.id] = record
        return record

    def on_stage_report(self, job: Job, r: m.StageReport) -> None:
        if r.stage not in job.route:
            log.warning("ignored a %r report from %s, which is not on this job's route", r.event[:32], r.stage)
            return
        record = self._record(job)
        pid_of = self.broker.inflight.pid_of
        timings = dict(job.timings)
        now, tick = time.time(), time.monotonic()
        clip = r.clip if 0 <= r.clip < clips_of(job) else 0
        not_behind = record.position(r.stage, clip) >= record.position(record.stage, record.clip)
        if r.event == "accepted":
            if record.move_to(r.stage, r.pid or pid_of(r.stage), clip):
                record.progressed(r.stage, tick)
            # A job is in one stage at a time: a stage whose `forwarded` report has not come yet
            # (reports of two processes are not ordered) sent the job on before this one took it.
            # Its time ends here; else the job could end before that report and lose the timing.
            for stage in [s for s in record.started if s != r.stage]:
                self.end_timing(job, record, stage, now, timings)
            record.started[r.stage] = now
            self.broker.metrics.accepted(job.id, r.stage, r.at or now)
            progress = self.progress_at(job, r.stage, 0.0, clip)
        elif r.event == "step":
            if not_behind:
                record.progressed(r.stage, tick)
            self.broker.metrics.step(job.id, r.stage, r.at or now)
            dits = [s for s in job.route if self.config.stage(s).kind == "dit"]
            base = self.progress_at(job, dits[0], 0.0, clip) if dits else 0.0
            progress = base + PROGRESS_WEIGHTS["dit"] / clips_of(job) * r.step / max(1, r.total_steps)
        elif r.event == "cache":
            # A DiT's step cache (stages/caching.py): step = passes skipped, total_steps = passes run.
            timings["cache"] = {**(timings.get("cache") or {}),
                                r.stage: {"method": r.to[:32], "passes": r.total_steps, "skipped": r.step}}
            self.store.progress(job.id, r.attempt, record.stage, job.progress, timings)
            return
        elif r.event == "batch":
            # A DiT denoised the job in a batch (stages/batching.py): step = its size, total_steps = max_batch.
            timings["batch"] = {**(timings.get("batch") or {}), r.stage: {"size": r.step, "max_batch": r.total_steps}}
            self.store.progress(job.id, r.attempt, record.stage, job.progress, timings)
            return
        elif r.event == "checkpoint":
            if record.watched == r.stage:
                record.progressed(r.stage, tick)
            if r.to in job.route and self.checkpoint_ahead(job, record, r.to, clip) and self.store.set_checkpoint(
                    job.id, r.attempt, r.to, clip):
                log.info("attempt %d: checkpoint for %s written%s", r.attempt, r.to,
                         f" (clip {clip} of {clips_of(job)})" if is_cyclic(job) else "")
            return
        elif r.event == "preview":
            self.on_preview(job, r)
            return
        elif r.event == "forwarded":
            if record.watched == r.stage:
                record.watched = None
            if r.to in job.route:
                record.move_to(r.to, pid_of(r.to), clip)
                # The report names the clip it sent: a VAE sending the job back to a DiT before it
                # on the route finished the clip before that one.
                if job.route.index(r.to) <= job.route.index(r.stage):
                    clip = max(0, clip - 1)
            self.end_timing(job, record, r.stage, now, timings)
            progress = self.progress_at(job, r.stage, 1.0, clip)
        else:
            return
        if self.store.progress(job.id, r.attempt, record.stage, min(progress, 0.99), timings):
            job = self.store.get(job.id)  # type: ignore[assignment]
            data: dict[str, Any] = {"progress": round(job.progress, 4), "eta": self.eta(job), "stage": r.stage,
                                    "attempt": r.attempt}
            if is_cyclic(job):
                data.update(clip=record.clip, clips=clips_of(job))
            self.broker.events.job(job, "progress", data)

    def end_timing(self, job: Job, record: JobInFlight, stage: str, end: float, timings: dict[str, Any]) -> None:
        """`stage` is done with the job at `end`: its time goes into the job's timings and the
        shape's means (once: the first of its `forwarded` or the next stage's `accepted`)."""
        started = record.started.pop(stage, None)
        if started is None:
            return
        timings[stage] = {"start": started, "end": end, "seconds": round(end - started, 4)}
        self.store.record_timing(timing_key(job.params), stage, end - started)
        self.broker.metrics.busy(stage, end - started)

    def checkpoint_ahead(self, job: Job, record: JobInFlight, stage: str, clip: int) -> bool:
        """Whether a checkpoint for `stage` of clip `clip` is not behind the job's recorded one (two
        stages' reports may arrive out of order; the job must resume at its latest checkpoint)."""
        if job.checkpoint not in job.route:
            return True
        return record.position(stage, clip) >= record.position(job.checkpoint, job.checkpoint_clip or 0)

    def on_preview(self, job: Job, r: m.StageReport) -> None:
        """A DiT stage wrote a preview image into the job's spool folder: record it as the latest
        and announce it. The image itself never passes through the broker."""
        if not spool.PREVIEW_NAME.match(r.preview):
            log.warning("ignored a preview report from %s with a bad name", r.stage)
            return
        if self.store.set_preview(job.id, r.attempt, r.preview):
            self.broker.events.job(job, "preview", {"frame_url": preview_url(job.id, r.preview), "step": r.step,
                                                    "steps": r.total_steps, "stage": r.stage})

    def on_done(self, job: Job, done: m.JobDone) -> None:
        timings = dict(job.timings)
        now = time.time()
        last = job.route[-1]
        record = self.broker.inflight.jobs.get(job.id)
        if record is not None:
            self.end_timing(job, record, last, now, timings)
        if job.started_at:
            timings["total_seconds"] = round(now - job.started_at, 4)
        outputs = {"files": done.outputs, "postprocess": done.postprocess, "audio": done.audio}
        if self.store.finish(job.id, "completed", attempt=done.attempt, output_path=done.path, timings=timings,
                             outputs=outputs):
            log.info("completed: %s", done.path)
            self.broker.events.job(job, "progress", {"progress": 1.0, "eta": 0.0, "stage": last})
            self.broker.events.job(job, "complete", {"output_url": f"/api/v1/files/{job.id}.mp4"})
            self.broker.finalize(job.id, completed=True)
            self.broker.dispatcher.dispatch()

    def on_failed(self, job: Job, msg: m.JobFailed) -> None:
        error = failure(msg.error, msg.stage)
        if error["code"] == "CHECKPOINT_ERROR" and job.attempt < self.broker.max_attempts:
            # The checkpoint is unreadable: start over rather than fail the job.
            self.store.set_checkpoint(job.id, job.attempt, None)
            if self.store.requeue(job.id, job.attempt, keep_attempt=True):
                log.warning("checkpoint in %s unreadable at attempt %d; dispatching again from the start",
                            msg.stage, job.attempt)
                self.broker.inflight.forget(job.id)
                self.broker.dispatcher.dispatch()
            return
        if self.broker.fail(job, error, stage=msg.stage, attempt=msg.attempt):
            log.error("failed in %s: %s", msg.stage, error.get("message"))
            self.broker.dispatcher.dispatch()

    # ---- progress and ETA ----
    def progress_at(self, job: Job, stage: str, fraction: float, clip: int = 0) -> float:
        """Job progress when `stage` of the route is `fraction` done (in clip `clip`: the stages of
        the DiT..VAE cycle weigh their share divided by the job's clips, the clips before count
        whole)."""
        kinds = [self.config.stage(s).kind for s in job.route]
        dit_count = max(1, kinds.count("dit"))
        weights = [PROGRESS_WEIGHTS.get(k, 0.0) / (dit_count if k == "dit" else 1) for k in kinds]
        clips = clips_of(job)
        in_cycle = [k in CYCLE_KINDS for k in kinds]
        cycle_weight = sum(w for w, c in zip(weights, in_cycle, strict=True) if c)
        last_in_cycle = max((i for i, c in enumerate(in_cycle) if c), default=-1)
        done = 0.0
        for i, s in enumerate(job.route):
            weight = weights[i] / clips if in_cycle[i] else weights[i]
            if s == stage:
                before = cycle_weight * clip / clips if in_cycle[i] else 0.0
                return done + before + weight * fraction
            done += weight
            if i == last_in_cycle:  # past the cycle: every clip of it is done
                done += cycle_weight * (clips - 1) / clips
        return done

    def eta(self, job: Job) -> float | None:
        """Seconds until the job should finish, from measured stage timings; None until measured."""
        if job.final:
            return 0.0
        means = self.store.timings(timing_key(job.params))
        if any(stage not in means for stage in job.route):
            return None
        # An S2V job passes its DiT..VAE stages once per clip; their means are per pass.
        clips = clips_of(job)
        total = sum(means[s] * (clips if self.config.stage(s).kind in CYCLE_KINDS else 1) for s in job.route)
        remaining = total * (1.0 - job.progress)
        if job.status == "queued":
            dispatcher = self.broker.dispatcher
            position = dispatcher.queue_position(job) or 1
            running = self.store.count("processing")
            slots = max(1, dispatcher.max_inflight)
            remaining += max(means.values()) * ((position - 1 + running) / slots)
        return round(remaining, 2)
