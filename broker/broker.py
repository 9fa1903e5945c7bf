"""The broker process: owns every job, admits, dispatches, tracks progress, cancels, recovers.

Sockets (all from the factory, named for their peer):
- `recv_from_gateway` ROUTER at endpoint `broker`: ApiRequest -> ApiReply.
- `publish` PUB at endpoint `events`: JobEvent (topic `job`) for the gateway, CancelJob (topic
  `cancel`) for the stages.
- `recv_from_stages` PULL at endpoint `reports`: StageReport, JobDone, JobFailed, Heartbeat.
- one PUSH per first stage of a route, to dispatch EncodeJob.

Every transition is written to the store before it is published or acted on. On start, jobs that
were processing are dispatched again with a new attempt; reports of older attempts are ignored.
A job dispatched again starts at its latest checkpoint (`ResumeJob` to that stage) when it has one.

Watchdog: a stage whose heartbeats stop, or that holds a job without reporting progress (accepted,
step, checkpoint) within the deadline (`[watchdog] progress_timeout_s`, or `progress_factor` x the
measured time of that stage for jobs of that size, whichever is longer), is wedged: the broker
SIGKILLs the process that sent its heartbeats (after checking /proc that the pid still is that stage
process), supervisord restarts it, and its jobs are dispatched again.

    python -m broker.broker [--config PROFILE]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import subprocess
import time
import uuid
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
import zmq

from broker import admission, memory
from broker.fairness import fair_order
from broker.store import FINAL, Job, JobStore
from common import messages as m
from common import procs, spool
from common.config import PROJECT_ROOT, Config
from common.errors import (
    JobNotFound,
    NotCancellable,
    QueueFull,
    ServerError,
    TooManyActiveJobs,
    UnknownOperation,
    ValidationError,
    WireError,
)
from common.logs import job_context, setup_logging
from common.sockets import SocketOptions, make_socket, stop_authenticators, use_curve

log = logging.getLogger(__name__)

# Share of a job's progress each stage kind accounts for (the DiT share is split by steps).
PROGRESS_WEIGHTS = {"text_encoder": 0.05, "dit": 0.80, "vae": 0.10, "muxer": 0.05}


def code_version() -> str:
    try:
        version = metadata.version("wan-server")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


def timing_key(params: dict[str, Any]) -> str:
    return f"{params['model']}:{params['width']}x{params['height']}x{params['num_frames']}:{params['steps']}"


class Broker:
    def __init__(self, config: Config):
        self.config = config
        self.limits = config.limits
        admission.check_presets(config)  # a profile with a broken preset fails at start, not per job
        adm = config.section("admission")
        self.max_queued = int(adm.get("max_queued", 100))
        self.max_inflight = int(adm.get("max_inflight_per_route", 4))
        self.store = JobStore(config.state_dir / "jobs.sqlite3")
        self.version = code_version()
        self.ctx = zmq.Context.instance()
        opts = SocketOptions(hwm=10_000, max_message_bytes=self.limits.max_message_bytes, immediate=False)
        self.recv_from_gateway = make_socket(self.ctx, zmq.ROUTER, config.endpoint("broker"), bind=True, options=opts)
        self.publish = make_socket(self.ctx, zmq.PUB, config.endpoint("events"), bind=True, options=opts)
        self.recv_from_stages = make_socket(self.ctx, zmq.PULL, config.endpoint("reports"), bind=True, options=opts)
        self._send_to: dict[str, zmq.Socket] = {}
        self.heartbeats: dict[str, tuple[m.Heartbeat, float]] = {}
        self.stage_started: dict[tuple[str, str], float] = {}  # (job, stage) -> accepted at
        # Where each running job is: the stage holding it, or the stage it was forwarded to. A job
        # at a stage whose process dies or restarts is lost there and is dispatched again.
        # (stage, pid of its process then; None while the stage is down, for a job in transit to
        # whatever process comes up next)
        self.location: dict[str, tuple[str, int | None]] = {}
        self.stage_pid: dict[str, int | None] = {}
        self.lost_stages: set[str] = set()
        self.last_served: dict[str, float] = {}  # owner -> when a job of theirs was last dispatched
        self._positions: tuple[int, dict[str, int]] = (-1, {})  # queue positions, valid while the store is unchanged
        self.max_attempts = int(adm.get("max_attempts", 3))
        watchdog = config.section("watchdog")
        self.heartbeat_timeout = float(watchdog.get("heartbeat_timeout_s", 3 * config.heartbeat_interval + 2))
        self.progress_timeout = float(watchdog.get("progress_timeout_s", 120))
        self.progress_factor = float(watchdog.get("progress_factor", 3))
        self.watchdog_kills = bool(watchdog.get("kill", True))
        # job -> (stage holding it, when it last reported progress there): what the watchdog watches.
        self.watch: dict[str, tuple[str, float]] = {}
        self.killed: set[tuple[int, int]] = set()  # (pid, start ticks) the watchdog killed
        self.running = True
        self.ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "submit": self.op_submit,
            "status": self.op_status,
            "result": self.op_result,
            "cancel": self.op_cancel,
            "list": self.op_list,
            "models": self.op_models,
            "presets": self.op_presets,
            "ready": self.op_ready,
        }

    # ---- helpers ----
    def _stage_socket(self, stage: str) -> zmq.Socket:
        if stage not in self._send_to:
            opts = SocketOptions(send_timeout_ms=0, max_message_bytes=self.limits.max_message_bytes)
            self._send_to[stage] = make_socket(self.ctx, zmq.PUSH, self.config.endpoint(stage), bind=False, options=opts)
        return self._send_to[stage]

    def _job(self, args: dict[str, Any]) -> Job:
        job_id = args.get("job_id")
        job = self.store.get(job_id) if isinstance(job_id, str) else None
        owner = args.get("owner")
        if job is None or (owner is not None and job.owner != owner):
            raise JobNotFound("no such job", {"job_id": str(job_id)[:80]})
        return job

    def _emit(self, job: Job, event: str, data: dict[str, Any]) -> None:
        msg = m.JobEvent(job_id=job.id, event=event, data=data, owner=job.owner)
        self.publish.send_multipart([b"job", *m.encode(msg)])

    def stage_alive(self, stage: str) -> bool:
        entry = self.heartbeats.get(stage)
        if entry is None:
            return False
        beat, seen = entry
        return beat.ready and time.monotonic() - seen < 3 * self.config.heartbeat_interval + 1

    def route_stages(self) -> set[str]:
        return {s for model in self.config.model_names() for s in self.config.route(model)}

    def eta(self, job: Job) -> float | None:
        """Seconds until the job should finish, from measured stage timings; None until measured."""
        if job.final:
            return 0.0
        means = self.store.timings(timing_key(job.params))
        if any(stage not in means for stage in job.route):
            return None
        total = sum(means[s] for s in job.route)
        remaining = total * (1.0 - job.progress)
        if job.status == "queued":
            position = self.queue_position(job) or 1
            running = self.store.count("processing")
            slots = max(1, self.max_inflight)
            remaining += max(means.values()) * ((position - 1 + running) / slots)
        return round(remaining, 2)

    def status_body(self, job: Job) -> dict[str, Any]:
        body = {
            "job_id": job.id,
            "status": job.status,
            "progress": round(job.progress, 4),
            "eta": self.eta(job),
            "stage": job.stage,
            "queue_position": self.queue_position(job),
            "attempt": job.attempt,
            "created_at": job.created_at,
        }
        if job.error:
            body["error"] = job.error
        return body

    def result_body(self, job: Job) -> dict[str, Any]:
        return {
            "job_id": job.id,
            "status": job.status,
            "output_url": f"/api/v1/files/{job.id}.mp4" if job.status == "completed" else None,
            "output_path": job.output_path if job.status == "completed" else None,  # for the gateway only
            "error": job.error,
            "metadata": {
                "model": job.model,
                "quality_preset": job.preset,
                "params": job.params,
                "seed": job.params["seed"],
                # What the preset asked for beyond generation; nothing applies it yet.
                "postprocess": {"requested": job.params.get("postprocess") or {}, "applied": False},
                "route": job.route,
                "attempts": job.attempt,
                "timings": job.timings,
                "created_at": job.created_at,
                "started_at": job.started_at,
                "finished_at": job.finished_at,
                "code_version": self.version,
            },
        }

    # ---- API operations ----
    def op_submit(self, args: dict[str, Any]) -> dict[str, Any]:
        png = self.uploaded_image(args.get("image"))
        sha = None if png is None else hashlib.sha256(png).hexdigest()
        size = args.get("image_size")
        ok = png is not None and isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)
        size = (size[0], size[1]) if ok else None
        preset, params, priority = admission.resolve(self.config, args.get("request"), image_sha256=sha, image_size=size)
        route = self.config.route(params.model)
        memory.check(self.config, params, route, {s: hb for s, (hb, _) in self.heartbeats.items()})
        if self.store.count("queued") >= self.max_queued:
            raise QueueFull(f"the queue is full ({self.max_queued} jobs waiting); try again later",
                            {"max_queued": self.max_queued, "retry_after": 10})
        owner = str(args.get("owner") or "")
        max_active = args.get("max_active")
        if isinstance(max_active, int) and self.store.count_active(owner) >= max_active:
            raise TooManyActiveJobs(f"this key already has {max_active} jobs queued or running; wait for one to end",
                                    {"max_active_jobs": max_active, "retry_after": 10})
        job_id = uuid.uuid4().hex
        if png is not None:
            self.write_image(job_id, png)  # on disk before the job exists, so a queued job always has it
        try:
            job = self.store.add(
                job_id, owner, params.model, preset, asdict(params), route, priority
            )
        except BaseException:
            spool.remove_job(self.config, job_id)
            raise
        with job_context(job_id):
            log.info("queued %s/%s %dx%d x%d frames, %d steps%s", params.model, preset, params.width, params.height,
                     params.num_frames, params.steps, f" for key {owner}" if owner else "")
        self._emit(job, "status", {"status": "queued"})
        self.dispatch()
        job = self.store.get(job_id)
        assert job is not None
        return {
            "job_id": job.id,
            "status": job.status,
            "created_at": job.created_at,
            "eta_seconds": self.eta(job),
            "queue_position": self.queue_position(job),
        }

    def op_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.status_body(self._job(args))

    def op_result(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.result_body(self._job(args))

    def op_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        job = self._job(args)
        if job.final:
            raise NotCancellable(f"job is already {job.status}", {"job_id": job.id, "status": job.status})
        error = {"code": "JOB_CANCELLED", "message": "cancelled by the client", "details": {}}
        if self.store.finish(job.id, "cancelled", error=error):
            self.publish.send_multipart([b"cancel", *m.encode(m.CancelJob(job_id=job.id))])
            with job_context(job.id):
                log.info("cancelled (was %s)", job.status)
            self._emit(job, "status", {"status": "cancelled"})
            self._finalize(job.id)
            self.dispatch()
        return self.status_body(self.store.get(job.id))  # type: ignore[arg-type]

    def op_list(self, args: dict[str, Any]) -> dict[str, Any]:
        status = args.get("status")
        if status is not None and status not in ("queued", "processing", *FINAL):
            raise ValidationError(f"unknown status {str(status)[:32]!r}", {"field": "status"})
        limit, offset = int(args.get("limit", 20)), int(args.get("offset", 0))
        jobs, total = self.store.list(status, limit, offset, args.get("owner"))
        return {"jobs": [self.status_body(j) for j in jobs], "total": total, "limit": limit, "offset": offset}

    def op_models(self, args: dict[str, Any]) -> dict[str, Any]:
        models = []
        for name in admission.MODELS:
            served = name in self.config.model_names()
            entry: dict[str, Any] = {"id": name, "served": served,
                                     "aliases": [a for a, full in admission.ALIASES.items() if full == name]}
            if served:
                entry.update(
                    resolutions=admission.supported_resolutions(self.config, name),
                    max_frames=admission.max_frames(self.config, name),
                    presets=list(admission.preset_table(self.config, name)),
                    ready=all(self.stage_alive(s) for s in self.config.route(name)),
                )
            models.append(entry)
        return {"models": models}

    def op_presets(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "presets": {name: admission.preset_table(self.config, name) for name in self.config.model_names()},
            "postprocess_applied": False,  # interpolate_fps / upscale are recorded, not applied yet
        }

    def op_ready(self, args: dict[str, Any]) -> dict[str, Any]:
        stages = {s: self.stage_alive(s) for s in sorted(self.route_stages())}
        return {"ready": all(stages.values()), "stages": stages}

    # ---- the job's spool folder (uploaded image; hand-off checkpoints) ----
    def uploaded_image(self, value: Any) -> bytes | None:
        """The PNG the gateway validated and re-encoded, sent as a uint8 tensor; None without one."""
        if value is None:
            return None
        limit = int(self.config.section("gateway").get("max_image_pixels", 4096 * 4096)) * 4 + (1 << 20)
        if not isinstance(value, bytes) or len(value) > limit:  # LOCAL to i9-gateway; the broker helper's version wins
            raise ValidationError("the image must reach the broker as PNG bytes", {"field": "image"})
        png = value
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValidationError("the image must reach the broker as PNG bytes", {"field": "image"})
        return png

    def image_path(self, job_id: str) -> Path:
        return self.config.job_spool(job_id) / "image.png"

    def write_image(self, job_id: str, png: bytes) -> None:
        """Write the job's image durably (temp file, fsync, rename, fsync the folder)."""
        spool.write_atomic(self.image_path(job_id), png)

    # ---- dispatch ----
    def queue_order(self) -> tuple[list[Job], dict[str, int]]:
        """Queued jobs in the order they will be dispatched (users take turns: broker/fairness.py),
        and the jobs in flight per route."""
        inflight: dict[str, int] = {}
        by_owner: dict[str, int] = {}
        for job in self.store.by_status("processing"):
            key = ",".join(job.route)
            inflight[key] = inflight.get(key, 0) + 1
            by_owner[job.owner] = by_owner.get(job.owner, 0) + 1
        return fair_order(self.store.by_status("queued"), by_owner, self.last_served), inflight

    def queue_position(self, job: Job) -> int | None:
        """1-based place in dispatch order; None when not queued."""
        if job.status != "queued":
            return None
        version = self.store.db.total_changes  # the broker is the store's only writer
        if self._positions[0] != version:
            order, _ = self.queue_order()
            self._positions = (version, {j.id: i + 1 for i, j in enumerate(order)})
        return self._positions[1].get(job.id)

    def dispatch(self) -> None:
        order, inflight = self.queue_order()
        for job in order:
            key = ",".join(job.route)
            first = self.entry_stage(job)
            # Every stage the job still has to pass must be up, or it would wait in a dead one.
            ready = all(self.stage_alive(s) for s in job.route[job.route.index(first):])
            if inflight.get(key, 0) >= self.max_inflight or not ready:
                continue
            if self._send(job, first):
                inflight[key] = inflight.get(key, 0) + 1
                self.location[job.id] = (first, self.stage_pid.get(first))
                self.last_served[job.owner] = time.monotonic()

    @staticmethod
    def entry_stage(job: Job) -> str:
        """Where the job starts: at its latest checkpoint, else at the head of its route."""
        return job.checkpoint if job.checkpoint in job.route else job.route[0]

    def _send(self, job: Job, first: str) -> bool:
        attempt = self.store.start(job.id)
        if attempt is None:
            return False
        msg: m.Message
        if first == job.route[0] and not job.checkpoint:
            params = m.JobParams(**job.params)
            image = str(self.image_path(job.id)) if params.image_sha256 else None
            msg = m.EncodeJob(job_id=job.id, attempt=attempt, route=job.route, params=params, image_path=image)
        else:
            msg = m.ResumeJob(job_id=job.id, attempt=attempt, stage=first)
        try:
            self._stage_socket(first).send_multipart(m.encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.store.requeue(job.id, attempt)
            with job_context(job.id):
                log.warning("%s did not take the job; it stays in line", first)
            return False
        with job_context(job.id):
            if isinstance(msg, m.ResumeJob):
                log.info("dispatched attempt %d to %s, resuming from its checkpoint", attempt, first)
            else:
                log.info("dispatched attempt %d to %s", attempt, first)
        if attempt == 1:
            self._emit(job, "status", {"status": "processing"})
        return True

    def recover(self) -> None:
        """After a restart: every job that was processing is dispatched again with a new attempt."""
        for job in self.store.by_status("processing"):
            with job_context(job.id):
                log.warning("was processing at attempt %d when the broker stopped; dispatching again", job.attempt)
            self.store.requeue(job.id, job.attempt, keep_attempt=True)
        self.sweep_spool()

    def sweep_spool(self) -> None:
        """Remove spool folders the broker missed (it stopped between finishing a job and removing
        them, or a stage wrote a checkpoint after the job was cancelled)."""

        def job_final(job_id: str) -> bool | None:
            job = self.store.get(job_id)
            return None if job is None else job.final

        for job_id in spool.sweep(self.config, job_final):
            log.info("removed the spool folder of job %s", job_id)

    def _forget(self, job_id: str) -> None:
        for key in [k for k in self.stage_started if k[0] == job_id]:
            del self.stage_started[key]
        self.location.pop(job_id, None)
        self.watch.pop(job_id, None)

    def _finalize(self, job_id: str) -> None:
        """The job is final: drop what the broker tracks for it, and its spool folder."""
        self._forget(job_id)
        spool.remove_job(self.config, job_id)

    # ---- watchdog ----
    def check_stages(self) -> None:
        """A stage that stopped sending heartbeats is lost, with the jobs it held."""
        now = time.monotonic()
        for stage, (_, seen) in list(self.heartbeats.items()):
            if now - seen > self.heartbeat_timeout:
                self.stage_down(stage, f"sent no heartbeat for {now - seen:.0f} s")

    def progress_deadline(self, job: Job, stage: str) -> float:
        """Longest a stage may hold `job` without a report: the configured timeout, or a multiple
        of that stage's measured time per report (per step for a DiT) for jobs of this size."""
        mean = self.store.timings(timing_key(job.params)).get(stage)
        if mean is None:
            return self.progress_timeout
        if self.config.stage(stage).kind == "dit":
            dits = sum(1 for s in job.route if self.config.stage(s).kind == "dit")
            mean /= max(1.0, job.params["steps"] / max(1, dits))
        return max(self.progress_timeout, self.progress_factor * mean)

    def check_progress(self) -> None:
        """A stage holding a job that reports no progress within the deadline is wedged (a step
        that never returns heartbeats on from its other thread)."""
        now = time.monotonic()
        for job_id, (stage, seen) in list(self.watch.items()):
            job = self.store.get(job_id)
            if job is None or job.status != "processing":
                self.watch.pop(job_id, None)
                continue
            deadline = self.progress_deadline(job, stage)
            if now - seen > deadline:
                self.watch.pop(job_id, None)
                with job_context(job_id):
                    log.error("no progress in %s for %.0f s (deadline %.0f s)", stage, now - seen, deadline)
                self.stage_down(stage, f"made no progress on job {job_id} for {now - seen:.0f} s")

    def stage_down(self, stage: str, why: str) -> None:
        """`stage` is dead or wedged: kill its process if it still runs, dispatch its jobs again."""
        entry = self.heartbeats.pop(stage, None)
        self.lost_stages.add(stage)
        self.stage_pid[stage] = None  # jobs sent to it from now on wait for its next process
        if entry is not None:
            self.kill_stage(stage, entry[0], why)
        self.on_stage_lost(stage, lambda pid: pid is not None, why)

    def kill_stage(self, stage: str, beat: m.Heartbeat, why: str) -> None:
        """SIGKILL the process whose heartbeats named `stage`, once /proc shows that pid is still that
        very process (same command line, same start time), never a later one that reuses the pid."""
        if not self.watchdog_kills:
            return
        if not procs.is_stage_process(beat.pid, self.config.stage(stage).kind, stage, beat.start_ticks):
            log.warning("stage %s (pid %d) %s; that process is gone (or not on this host): nothing to kill",
                        stage, beat.pid, why)
            return
        try:
            os.kill(beat.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.killed.add((beat.pid, beat.start_ticks))
        log.error("watchdog killed stage %s (pid %d): it %s; supervisord restarts it", stage, beat.pid, why)

    def on_stage_lost(self, stage: str, dead: Callable[[int | None], bool], why: str) -> None:
        """Dispatch again every job held by a dead process of `stage`; fail those out of attempts."""
        lost = [job_id for job_id, (where, pid) in self.location.items() if where == stage and dead(pid)]
        if lost:
            log.warning("stage %s %s while holding %d job(s)", stage, why, len(lost))
        for job_id in lost:
            job = self.store.get(job_id)
            self._forget(job_id)
            if job is None or job.status != "processing":
                continue
            with job_context(job_id):
                if job.attempt >= self.max_attempts:
                    error = {"code": "STAGE_CRASHED", "details": {"stage": stage, "attempts": job.attempt},
                             "message": f"stage {stage} failed while running this job {job.attempt} times; giving up"}
                    if self.store.finish(job_id, "failed", attempt=job.attempt, error=error):
                        log.error("failed after %d attempts: %s died each time", job.attempt, stage)
                        self._emit(job, "error", {"error": error, "stage": stage})
                        self._finalize(job_id)
                elif self.store.requeue(job_id, job.attempt, keep_attempt=True):
                    log.warning("lost in %s at attempt %d; dispatching again", stage, job.attempt)
        self.dispatch()

    # ---- reports ----
    def on_report(self, msg: m.Message) -> None:
        if isinstance(msg, m.Heartbeat):
            if (msg.pid, msg.start_ticks) in self.killed:
                return  # sent before the watchdog killed it
            was = self.stage_alive(msg.stage)
            self.heartbeats[msg.stage] = (msg, time.monotonic())
            self.stage_pid[msg.stage] = msg.pid
            # Jobs held by any other process of this stage died with it.
            self.on_stage_lost(msg.stage, lambda pid: pid is not None and pid != msg.pid, f"restarted (now pid {msg.pid})")
            self.lost_stages.discard(msg.stage)
            if not was and msg.ready:
                log.info("stage %s is up (pid %d)", msg.stage, msg.pid)
                self.dispatch()
            return
        job = self.store.get(getattr(msg, "job_id", ""))
        if job is None or job.final or getattr(msg, "attempt", None) != job.attempt:
            return  # a stale attempt, a cancelled job, or a job we never had
        with job_context(job.id):
            if isinstance(msg, m.StageReport):
                self.on_stage_report(job, msg)
            elif isinstance(msg, m.JobDone):
                self.on_done(job, msg)
            elif isinstance(msg, m.JobFailed):
                error = msg.error.get("error", msg.error)
                if error.get("code") == "CHECKPOINT_ERROR" and job.attempt < self.max_attempts:
                    # The checkpoint is unreadable: start over rather than fail the job.
                    self.store.set_checkpoint(job.id, job.attempt, None)
                    if self.store.requeue(job.id, job.attempt, keep_attempt=True):
                        log.warning("checkpoint in %s unreadable at attempt %d; dispatching again from the start",
                                    msg.stage, job.attempt)
                        self._forget(job.id)
                        self.dispatch()
                    return
                if self.store.finish(job.id, "failed", attempt=msg.attempt, error=error):
                    log.error("failed in %s: %s", msg.stage, error.get("message"))
                    self._emit(job, "error", {"error": error, "stage": msg.stage})
                    self._finalize(job.id)
                    self.dispatch()

    def _progress_at(self, job: Job, stage: str, fraction: float) -> float:
        """Job progress when `stage` of the route is `fraction` done."""
        done = 0.0
        kinds = [self.config.stage(s).kind for s in job.route]
        dit_count = max(1, kinds.count("dit"))
        for s, kind in zip(job.route, kinds):
            weight = PROGRESS_WEIGHTS.get(kind, 0.0) / (dit_count if kind == "dit" else 1)
            if s == stage:
                return done + weight * fraction
            done += weight
        return done

    def on_stage_report(self, job: Job, r: m.StageReport) -> None:
        timings = dict(job.timings)
        now = time.time()
        # Reports of two stages may arrive out of order (the next stage's `accepted` before this
        # one's `forwarded`): a report only moves the watch of the stage that sent it.
        if r.event in ("accepted", "step") or (r.event == "checkpoint" and self.watch.get(job.id, ("",))[0] == r.stage):
            self.watch[job.id] = (r.stage, time.monotonic())
        if r.event == "accepted":
            self.location[job.id] = (r.stage, r.pid or self.stage_pid.get(r.stage))
            self.stage_started[(job.id, r.stage)] = now
            progress = self._progress_at(job, r.stage, 0.0)
        elif r.event == "checkpoint":
            if r.to in job.route and self.store.set_checkpoint(job.id, r.attempt, r.to):
                log.info("attempt %d: checkpoint for %s written", r.attempt, r.to)
            return
        elif r.event == "step":
            kinds = [self.config.stage(s).kind for s in job.route]
            dits = [s for s, k in zip(job.route, kinds) if k == "dit"]
            base = self._progress_at(job, dits[0], 0.0) if dits else 0.0
            progress = base + PROGRESS_WEIGHTS["dit"] * r.step / max(1, r.total_steps)
        elif r.event == "forwarded":
            if self.watch.get(job.id, ("",))[0] == r.stage:
                self.watch.pop(job.id, None)
            if r.to:
                self.location[job.id] = (r.to, self.stage_pid.get(r.to))
            started = self.stage_started.pop((job.id, r.stage), None)
            if started is not None:
                timings[r.stage] = {"start": started, "end": now, "seconds": round(now - started, 4)}
                self.store.record_timing(timing_key(job.params), r.stage, now - started)
            progress = self._progress_at(job, r.stage, 1.0)
        else:
            return
        progress = min(progress, 0.99)
        # Where the job is now: after `forwarded`, the stage it went to. (Reports of two processes
        # can arrive out of order: a late `forwarded` must not move the job back a stage.)
        where = r.to if r.event == "forwarded" and r.to else r.stage
        if self.store.progress(job.id, r.attempt, where, progress, timings):
            job = self.store.get(job.id)  # type: ignore[assignment]
            self._emit(job, "progress", {"progress": round(job.progress, 4), "eta": self.eta(job), "stage": r.stage,
                                         "attempt": r.attempt})

    def on_done(self, job: Job, done: m.JobDone) -> None:
        timings = dict(job.timings)
        now = time.time()
        last = job.route[-1]
        started = self.stage_started.pop((job.id, last), None)
        if started is not None:
            timings[last] = {"start": started, "end": now, "seconds": round(now - started, 4)}
            self.store.record_timing(timing_key(job.params), last, now - started)
        if job.started_at:
            timings["total_seconds"] = round(now - job.started_at, 4)
        if self.store.finish(job.id, "completed", attempt=done.attempt, output_path=done.path, timings=timings):
            log.info("completed: %s", done.path)
            self._emit(job, "progress", {"progress": 1.0, "eta": 0.0, "stage": job.route[-1]})
            self._emit(job, "complete", {"output_url": f"/api/v1/files/{job.id}.mp4"})
            self._finalize(job.id)
            self.dispatch()

    # ---- loop ----
    def handle_request(self, parts: list[Any]) -> None:
        identity, body = parts[0], parts[1:]
        request_id = ""
        try:
            req = m.decode(body, self.limits)
            if not isinstance(req, m.ApiRequest):
                raise UnknownOperation(f"expected ApiRequest, got {req.type_name}")
            request_id = req.request_id
            handler = self.ops.get(req.op)
            if handler is None:
                raise UnknownOperation(f"unknown operation {req.op[:32]!r}")
            reply = m.ApiReply(request_id=request_id, ok=True, result=handler(req.args))
        except ServerError as exc:
            if isinstance(exc, WireError):
                log.error("dropped a bad request: %s %s", exc.code, exc.message)
            reply = m.ApiReply(request_id=request_id, ok=False, error=exc.to_dict()["error"], http_status=exc.http_status)
        except Exception as exc:  # never let one request take the broker down
            log.exception("request failed")
            reply = m.ApiReply(request_id=request_id, ok=False, http_status=500,
                               error={"code": "INTERNAL_ERROR", "message": "internal error", "details": {"type": type(exc).__name__}})
        self.recv_from_gateway.send_multipart([identity, *m.encode(reply)])

    def run(self) -> None:
        self.recover()
        for stage in sorted(self.route_stages()):  # connect early: a fresh PUSH has no peer yet
            self._stage_socket(stage)
        poller = zmq.Poller()
        poller.register(self.recv_from_gateway, zmq.POLLIN)
        poller.register(self.recv_from_stages, zmq.POLLIN)
        log.info("broker up (%s); %d jobs queued", self.version, self.store.count("queued"))
        last_dispatch, last_sweep = 0.0, time.monotonic()
        while self.running:
            events = dict(poller.poll(200))
            if self.recv_from_stages in events:
                for _ in range(1000):  # drain reports first: they free capacity
                    try:
                        parts = self.recv_from_stages.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        self.on_report(m.decode(parts, self.limits))
                    except WireError as exc:
                        log.error("dropped a bad report: %s %s", exc.code, exc.message)
            if self.recv_from_gateway in events:
                self.handle_request(self.recv_from_gateway.recv_multipart(copy=False))
            if time.monotonic() - last_dispatch > 1.0:
                last_dispatch = time.monotonic()
                self.check_stages()
                self.check_progress()
                self.dispatch()
            if time.monotonic() - last_sweep > 60.0:
                last_sweep = time.monotonic()
                self.sweep_spool()
        self.close()

    def close(self) -> None:
        for sock in [self.recv_from_gateway, self.publish, self.recv_from_stages, *self._send_to.values()]:
            sock.close(0)
        stop_authenticators()
        self.store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="run the broker process")
    parser.add_argument("--config", help="profile TOML (default: $WAN_SERVER_CONFIG or the tiny profile)")
    args = parser.parse_args(argv)
    config = Config.load(args.config)
    setup_logging(config.log_level)
    use_curve(config.curve_keys())
    broker = Broker(config)

    def stop(signum, frame):
        broker.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    broker.run()
    log.info("broker stopped")
    logging.shutdown()
    os._exit(0)  # the store is closed; do not wait on interpreter teardown (see common/runtime.py)


if __name__ == "__main__":
    main()
