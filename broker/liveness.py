"""Liveness: which stages are up, and what happens to the jobs of a stage that dies or wedges.

A stage is alive while its latest heartbeat says ready and is younger than `[watchdog]
heartbeat_timeout_s` (`alive`, the one place that decides it; dispatch and `/ready` ask it).

The watchdog, run once a second by the broker loop:
- `check_stages`: a stage whose heartbeats stopped is down.
- `check_progress`: a stage holding a job without reporting progress (accepted, step, checkpoint)
  within the deadline (`[watchdog] progress_timeout_s`, or `progress_factor` x the measured time
  of that stage for jobs of that size, whichever is longer) is wedged (a step that never returns,
  while its heartbeat thread carries on).

A stage that is down or wedged is SIGKILLed (`kill_stage`, after checking /proc that the pid still
is that stage process), supervisord restarts it, and the jobs it held are dispatched again as a new
attempt, or failed once out of attempts (`requeue_lost`). A heartbeat from a new process of a stage
means the old one died: its jobs are lost the same way.

A repeated heartbeat of the same process only refreshes the stage's record: it never touches the
store. Reports under stage names the config does not know are dropped by the broker before they
get here (broker/broker.py).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from broker.inflight import StageSeen
from broker.progress import timing_key
from broker.store import Job
from common import messages as m
from common import procs
from common.logs import job_context

if TYPE_CHECKING:
    from broker.broker import Broker

log = logging.getLogger(__name__)


class Liveness:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.config = broker.config
        self.inflight = broker.inflight
        watchdog = self.config.watchdog
        self.heartbeat_timeout = watchdog.heartbeat_timeout_s
        self.progress_timeout = watchdog.progress_timeout_s
        self.progress_factor = watchdog.progress_factor
        self.kills = watchdog.kill

    def alive(self, stage: str) -> bool:
        seen = self.inflight.stages.get(stage)
        return seen is not None and seen.beat.ready and time.monotonic() - seen.seen < self.heartbeat_timeout

    # ---- heartbeats ----
    def on_heartbeat(self, beat: m.Heartbeat) -> None:
        if (beat.pid, beat.start_ticks) in self.inflight.killed:
            return  # sent before the watchdog killed it
        was_alive = self.alive(beat.stage)
        self.inflight.stages[beat.stage] = StageSeen(beat, time.monotonic())
        # Jobs held by any other process of this stage died with it. (Checked on every heartbeat,
        # in memory: a late report of a dead process can name it after its successor came up.)
        lost = self.inflight.held_by(beat.stage, lambda pid: pid is not None and pid != beat.pid)
        if lost:
            self.requeue_lost(beat.stage, lost, f"restarted (now pid {beat.pid})")
        if lost or (not was_alive and beat.ready):
            if not was_alive and beat.ready:
                log.info("stage %s is up (pid %d)", beat.stage, beat.pid)
            self.broker.dispatcher.dispatch()

    # ---- the watchdog ----
    def check_stages(self) -> None:
        """A stage that stopped sending heartbeats is lost, with the jobs it held."""
        now = time.monotonic()
        for stage, seen in list(self.inflight.stages.items()):
            if now - seen.seen > self.heartbeat_timeout:
                self.stage_down(stage, f"sent no heartbeat for {now - seen.seen:.0f} s")

    def progress_deadline(self, job: Job, stage: str) -> float:
        """Longest a stage may hold `job` without a report: the configured timeout, or a multiple
        of that stage's measured time per report (per step for a DiT) for jobs of this size."""
        mean = self.broker.store.timings(timing_key(job.params)).get(stage)
        if mean is None:
            return self.progress_timeout
        if self.config.stage(stage).kind == "dit":
            dits = sum(1 for s in job.route if self.config.stage(s).kind == "dit")
            mean /= max(1.0, job.params["steps"] / max(1, dits))
        return max(self.progress_timeout, self.progress_factor * mean)

    def check_progress(self) -> None:
        now = time.monotonic()
        for record in list(self.inflight.jobs.values()):
            stage = record.watched
            if stage is None:
                continue
            with job_context(record.job_id):
                job = self.broker.store.get(record.job_id)
                if job is None or job.status != "processing":
                    record.watched = None
                    continue
                deadline = self.progress_deadline(job, stage)
                idle = now - record.progressed_at
                if idle > deadline:
                    record.watched = None
                    log.error("no progress in %s for %.0f s (deadline %.0f s)", stage, idle, deadline)
                    self.stage_down(stage, f"made no progress on job {record.job_id} for {idle:.0f} s")

    def stage_down(self, stage: str, why: str) -> None:
        """`stage` is dead or wedged: kill its process if it still runs, dispatch its jobs again."""
        seen = self.inflight.stages.pop(stage, None)  # jobs sent to it from now on wait for its next process
        if seen is not None:
            self.kill_stage(stage, seen.beat, why)
        lost = self.inflight.held_by(stage, lambda pid: pid is not None)
        if lost:
            self.requeue_lost(stage, lost, why)
        self.broker.dispatcher.dispatch()

    def kill_stage(self, stage: str, beat: m.Heartbeat, why: str) -> None:
        """SIGKILL the process whose heartbeats named `stage`, once /proc shows that pid is still that
        very process (same command line, same start time), never a later one that reuses the pid."""
        if not self.kills:
            return
        if not procs.is_stage_process(beat.pid, self.config.stage(stage).kind, stage, beat.start_ticks):
            log.warning("stage %s (pid %d) %s; that process is gone (or not on this host): nothing to kill",
                        stage, beat.pid, why)
            return
        try:
            os.kill(beat.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.inflight.killed.add((beat.pid, beat.start_ticks))
        log.error("watchdog killed stage %s (pid %d): it %s; supervisord restarts it", stage, beat.pid, why)

    def requeue_lost(self, stage: str, job_ids: list[str], why: str) -> None:
        """The jobs `job_ids` died in `stage`: queue each again (a new attempt), or fail it once out of
        attempts."""
        log.warning("stage %s %s while holding %d job(s)", stage, why, len(job_ids))
        for job_id in job_ids:
            self.inflight.forget(job_id)
            job = self.broker.store.get(job_id)
            if job is None or job.status != "processing":
                continue
            with job_context(job_id):
                self._requeue_or_fail(job, stage)

    def _requeue_or_fail(self, job: Job, stage: str) -> None:
        if job.attempt >= self.broker.max_attempts:
            error = {"code": "STAGE_CRASHED", "details": {"stage": stage, "attempts": job.attempt},
                     "message": f"stage {stage} failed while running this job {job.attempt} times; giving up"}
            if self.broker.fail(job, error, stage=stage, attempt=job.attempt):
                log.error("failed after %d attempts: %s died each time", job.attempt, stage)
        elif self.broker.store.requeue(job.id, job.attempt, keep_attempt=True):
            log.warning("lost in %s at attempt %d; dispatching again", stage, job.attempt)
