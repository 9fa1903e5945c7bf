"""Dispatch: which queued job goes out next, where it enters its route, and recovery after a restart.

Queued jobs go out in fair order (users take turns, broker/fairness.py), at most
`[admission] max_inflight_per_route` at a time per route, and only when every stage the job still
has to pass is alive (broker/liveness.py), or it would wait in a dead one.

A job enters its route at its latest checkpoint when it has one (`ResumeJob` to that stage: the
stage replays the message it checkpointed), else at the head of its route (`EncodeJob`). Each
dispatch is a new attempt (`store.start`); reports of older attempts are ignored. A send that does
not go out (the stage's queue is full) takes the attempt back and the job stays in line.

After a broker restart every job that was processing is queued again with its attempt kept, so the
next dispatch is a new attempt (`recover`); spool folders of final or unknown jobs are swept.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import zmq

from broker.fairness import fair_order
from broker.store import Job
from common import messages as m
from common import spool
from common.config import Config
from common.logs import job_context

if TYPE_CHECKING:
    from broker.broker import Broker

log = logging.getLogger(__name__)


def entry_stage(job: Job) -> str:
    """Where the job starts: at its latest checkpoint, else at the head of its route."""
    return job.checkpoint if job.checkpoint in job.route else job.route[0]


def stages_ahead(config: Config, job: Job, first: str) -> list[str]:
    """The stages a job entering its route at `first` still has to pass: the rest of the route,
    and for an S2V job of several clips (broker/progress.py) also the DiT..VAE cycle before
    `first` (its next clips go round it again)."""
    route = job.route
    ahead = route[route.index(first):]
    if (job.params.get("num_clips") or 0) > 1:
        cycle = [s for s in route if config.stage(s).kind in ("dit", "vae")]
        ahead = [*(s for s in cycle if s not in ahead), *ahead]
    return ahead


class Dispatcher:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.store = broker.store
        self.max_inflight = broker.config.admission.max_inflight_per_route
        self.last_served: dict[str, float] = {}  # owner -> when a job of theirs was last dispatched
        self._positions: tuple[int, dict[str, int]] = (-1, {})  # queue positions, valid while the store is unchanged

    def queue_order(self) -> tuple[list[Job], dict[str, int]]:
        """Queued jobs in the order they will be dispatched, and the jobs in flight per route."""
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
        alive = self.broker.liveness.alive
        order, inflight = self.queue_order()
        for job in order:
            key = ",".join(job.route)
            first = entry_stage(job)
            ready = all(alive(s) for s in stages_ahead(self.broker.config, job, first))
            if inflight.get(key, 0) >= self.max_inflight or not ready:
                continue
            try:
                sent = self._send(job, first)
            except Exception:  # one job that cannot be sent must not hold up the rest every second
                with job_context(job.id):
                    log.exception("could not dispatch the job; failing it")
                self.broker.fail(job, {"code": "INTERNAL_ERROR", "message": "the job could not be dispatched",
                                       "details": {"stage": first}}, stage=first)
                continue
            if sent:
                inflight[key] = inflight.get(key, 0) + 1
                self.last_served[job.owner] = time.monotonic()

    def _send(self, job: Job, first: str) -> bool:
        attempt = self.store.start(job.id)
        if attempt is None:
            return False
        msg: m.Message
        if first == job.route[0] and not job.checkpoint:
            params = m.JobParams(**job.params)
            image = str(self.broker.api.image_path(job.id)) if params.image_sha256 else None
            # S2V: the audio and pose video the broker stored in the job's spool folder.
            folder = self.broker.config.job_spool(job.id)
            audio = str(folder / params.audio["file"]) if params.audio else None
            pose = str(folder / params.pose_video["file"]) if params.pose_video else None
            video = str(folder / params.video["file"]) if params.video else None  # video-to-video's input
            msg = m.EncodeJob(job_id=job.id, attempt=attempt, route=job.route, params=params, image_path=image,
                              audio_path=audio, pose_path=pose, video_path=video)
        else:
            msg = m.ResumeJob(job_id=job.id, attempt=attempt, stage=first)
        with job_context(job.id):
            try:
                self.broker.stage_socket(first).send_multipart(m.encode(msg), flags=zmq.NOBLOCK)
            except zmq.Again:
                self.store.requeue(job.id, attempt)
                log.warning("%s did not take the job; it stays in line", first)
                return False
            self.broker.inflight.dispatched(job.id, attempt, job.route, first)
            if isinstance(msg, m.ResumeJob):
                log.info("dispatched attempt %d to %s, resuming from its checkpoint", attempt, first)
            else:
                log.info("dispatched attempt %d to %s", attempt, first)
        if attempt == 1:
            self.broker.events.job(job, "status", {"status": "processing"})
        return True

    # ---- after a restart ----
    def recover(self) -> None:
        """Every job that was processing when the broker stopped is dispatched again with a new attempt."""
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

        for job_id in spool.sweep(self.broker.config, job_final):
            log.info("removed the spool folder of job %s", job_id)

        def job_status(job_id: str) -> str | None:
            job = self.store.get(job_id)
            return None if job is None else job.status

        for job_id in spool.sweep_results(self.broker.config, job_status):
            log.info("removed the MP4 of job %s, which did not complete", job_id)
