"""The broker process: owns every job; admits, dispatches, tracks progress, cancels, recovers.

This module is the process: its sockets and its loop, which receives a message, hands it to the
handler for its kind and goes on. The concepts live in their own modules:

- broker/api.py        the API operations (submit, status, result, cancel, list, models, presets, ready)
- broker/dispatch.py   queue order, dispatch (entry stage, resume from a checkpoint), recovery at start
- broker/liveness.py   heartbeats, which stages are alive, the watchdog (deadlines, kill_stage)
- broker/progress.py   StageReport / JobDone / JobFailed -> the job's stage, progress, timings, ETA
- broker/inflight.py   the in-memory record of each job in flight and of each stage's heartbeat
- broker/events.py     what the broker publishes (JobEvent to the gateway, CancelJob to the stages)
- broker/metrics.py    the numbers behind GET /metrics (counters, histograms, gauges read at render)
- broker/webhooks.py   the delivery thread: each final job's webhook, signed, from the store's outbox
- broker/store.py      the job store (SQLite): every transition is written there before it is acted on
- broker/admission.py, broker/memory.py, broker/fairness.py: request resolution, memory fit, fair order

Sockets (named for their peer):
- `recv_from_gateway` ROUTER at endpoint `broker`: ApiRequest -> ApiReply.
- `publish` PUB at endpoint `events`: JobEvent (topic `job`), CancelJob (topic `cancel`).
- `recv_from_stages` PULL at endpoint `reports`: StageReport, JobDone, JobFailed, Heartbeat.
- one PUSH per first stage of a route (`stage_socket`), to dispatch EncodeJob / ResumeJob.

Nothing that arrives on a socket stops the loop: a message that does not decode is logged and
dropped, a report under a stage name the config does not know is ignored (logged at most once a
minute per name), and an exception in one handler or periodic check is logged (with the job id)
and the loop goes on.

    python -m broker.broker [--config PROFILE]
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from types import FrameType
from typing import Any

import zmq

from broker import admission
from broker.api import Api
from broker.dispatch import Dispatcher
from broker.events import Events
from broker.inflight import InFlight
from broker.liveness import Liveness
from broker.metrics import BrokerMetrics
from broker.progress import Progress
from broker.store import Job, JobStore
from broker.webhooks import Deliveries
from common import messages as m
from common import spool
from common.config import PROJECT_ROOT, Config, load_or_exit
from common.errors import ServerError, UnknownOperation, WireError
from common.logs import job_context, setup_logging
from common.sockets import SocketOptions, make_socket, stop_authenticators, use_curve
from gateway.keys import keys_path  # keys with their own webhook secret

log = logging.getLogger(__name__)

# How long close() lets replies and events already queued go out before dropping them.
CLOSE_LINGER_MS = 500
# An ignored report of one kind is logged at most this often; at most this many kinds are remembered.
IGNORED_LOG_INTERVAL_S = 60.0
IGNORED_KINDS_MAX = 256


def code_version() -> str:
    try:
        version = metadata.version("wan-server")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


class Broker:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.limits = config.limits
        admission.check_presets(config)  # a profile with a broken preset fails at start, not per job
        self.max_attempts = config.admission.max_attempts
        self.stage_names = frozenset(config.stage_names())
        self.store = JobStore(config.state_dir / "jobs.sqlite3")
        self.version = code_version()
        self.ctx = zmq.Context()
        opts = SocketOptions(hwm=10_000, max_message_bytes=self.limits.max_message_bytes, immediate=False)
        self.recv_from_gateway = make_socket(self.ctx, zmq.ROUTER, config.endpoint("broker"), bind=True, options=opts)
        self.publish = make_socket(self.ctx, zmq.PUB, config.endpoint("events"), bind=True, options=opts)
        self.recv_from_stages = make_socket(self.ctx, zmq.PULL, config.endpoint("reports"), bind=True, options=opts)
        self._send_to: dict[str, zmq.Socket[bytes]] = {}
        self.events = Events(self.publish)
        self.inflight = InFlight()
        self.liveness = Liveness(self)
        self.dispatcher = Dispatcher(self)
        self.progress = Progress(self)
        self.api = Api(self)
        self.metrics = BrokerMetrics(self)
        # Started by run(): a Broker built by a test that drives its handlers sends no webhooks.
        self.webhooks = Deliveries(config.webhooks, self.store.path, keys_path(config), on_outcome=self.metrics.webhook)
        self._ignored: dict[str, float] = {}  # what was ignored -> when it was last logged
        self.running = True

    # ---- shared by the handlers ----
    def stage_socket(self, stage: str) -> zmq.Socket[bytes]:
        if stage not in self._send_to:
            opts = SocketOptions(send_timeout_ms=0, max_message_bytes=self.limits.max_message_bytes)
            self._send_to[stage] = make_socket(
                self.ctx, zmq.PUSH, self.config.endpoint(stage), bind=False, options=opts
            )
        return self._send_to[stage]

    def route_stages(self) -> set[str]:
        return {s for model in self.config.model_names() for s in self.config.route(model)}

    def finalize(self, job_id: str, completed: bool = False) -> None:
        """The job is final: drop what the broker tracks for it, and its spool folder; unless it
        completed, also an MP4 an earlier attempt may have left."""
        job = self.store.get(job_id)
        if job is not None and job.final:
            self.metrics.job_final(job)
            if job.webhook_url:  # the store's trigger queued its delivery with the final state
                self.webhooks.wake()
        self.inflight.forget(job_id)
        if completed and job is not None and job.preview:
            spool.keep_preview(self.config, job_id, job.preview)  # the latest preview stays with the MP4
        spool.remove_job(self.config, job_id)
        if not completed and spool.remove_result(self.config, job_id):
            log.info("removed the MP4 of job %s, which did not complete", job_id)

    def fail(self, job: Job, error: dict[str, Any], *, stage: str, attempt: int | None = None) -> bool:
        """Fail the job (only that attempt, when given) and tell the gateway; False if it had moved on."""
        if not self.store.finish(job.id, "failed", attempt=attempt, error=error):
            return False
        self.events.job(job, "error", {"error": error, "stage": stage})
        self.finalize(job.id)
        return True

    # ---- handlers: one message each ----
    def on_report(self, msg: m.Message) -> None:
        """A report from a stage: heartbeats go to liveness, job reports to progress."""
        if isinstance(msg, (m.Heartbeat, m.StageReport, m.JobFailed)) and msg.stage not in self.stage_names:
            self._ignore(f"stage {msg.stage[:64]!r}", f"{msg.type_name} from stage {msg.stage[:64]!r}, which is not "
                         "in the config (a stray peer, or a stage renamed on another host?)")
        elif isinstance(msg, m.Heartbeat):
            self.liveness.on_heartbeat(msg)
        elif isinstance(msg, (m.StageReport, m.JobDone, m.JobFailed)):
            with job_context(msg.job_id):
                self.progress.on_report(msg)
        else:
            self._ignore(f"type {msg.type_name}", f"a {msg.type_name} on the reports socket, which takes only reports")

    def _ignore(self, kind: str, what: str) -> None:
        now = time.monotonic()
        if now - self._ignored.get(kind, -IGNORED_LOG_INTERVAL_S) < IGNORED_LOG_INTERVAL_S:
            return
        if len(self._ignored) >= IGNORED_KINDS_MAX:  # a peer inventing names must not grow this without bound
            self._ignored.clear()
        self._ignored[kind] = now
        log.warning("ignored %s (logged once a minute)", what)

    def on_request(self, req: m.ApiRequest) -> m.ApiReply:
        handler = self.api.ops.get(req.op)
        if handler is None:
            raise UnknownOperation(f"unknown operation {req.op[:32]!r}")
        return m.ApiReply(request_id=req.request_id, ok=True, result=handler(req.args))

    # ---- the loop ----
    def handle_request(self, parts: list[Any]) -> None:
        identity, body = parts[0], parts[1:]
        request_id = ""
        try:
            req = m.decode(body, self.limits)
            if not isinstance(req, m.ApiRequest):
                raise UnknownOperation(f"expected ApiRequest, got {req.type_name}")
            request_id = req.request_id
            reply = self.on_request(req)
            frames = m.encode(reply)
        except ServerError as exc:
            if isinstance(exc, WireError):
                log.error("dropped a bad request: %s %s", exc.code, exc.message)
            error = exc.to_dict()["error"]
            self.metrics.api_error(exc.code)
            frames = m.encode(m.ApiReply(request_id=request_id, ok=False, error=error, http_status=exc.http_status))
        except Exception as exc:  # never let one request take the broker down
            log.exception("request failed")
            self.metrics.api_error("INTERNAL_ERROR")
            frames = m.encode(m.ApiReply(request_id=request_id, ok=False, http_status=500, error={
                "code": "INTERNAL_ERROR", "message": "internal error", "details": {"type": type(exc).__name__}}))
        self.recv_from_gateway.send_multipart([identity, *frames])

    def handle_report(self, parts: list[Any]) -> None:
        try:
            msg = m.decode(parts, self.limits)
        except WireError as exc:
            log.error("dropped a bad report: %s %s", exc.code, exc.message)
            return
        try:
            self.on_report(msg)
        except Exception:  # one report must not take the broker down
            job_id = getattr(msg, "job_id", None)
            log.exception("handling a %s failed; the broker goes on", msg.type_name,
                          extra={"job_id": job_id if isinstance(job_id, str) else None})

    def guarded(self, check: Callable[[], None]) -> None:
        """Run a periodic check; an exception is logged (the checks set the job id) and the loop goes on."""
        try:
            check()
        except Exception:
            log.exception("%s failed; the broker goes on", getattr(check, "__qualname__", check))

    def run(self) -> None:
        self.dispatcher.recover()
        self.webhooks.start()  # deliveries still pending from before a restart go out first
        for stage in sorted(self.route_stages()):  # connect early: a fresh PUSH has no peer yet
            self.stage_socket(stage)
        poller = zmq.Poller()
        poller.register(self.recv_from_gateway, zmq.POLLIN)
        poller.register(self.recv_from_stages, zmq.POLLIN)
        log.info("broker up (%s); %d jobs queued", self.version, self.store.count("queued"))
        last_check, last_sweep = 0.0, time.monotonic()
        while self.running:
            events = dict(poller.poll(200))
            if self.recv_from_stages in events:
                for _ in range(1000):  # drain reports first: they free capacity
                    try:
                        parts = self.recv_from_stages.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.handle_report(parts)
            if self.recv_from_gateway in events:
                try:
                    parts = self.recv_from_gateway.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    parts = []
                if parts:
                    self.handle_request(parts)
            if time.monotonic() - last_check > 1.0:
                last_check = time.monotonic()
                self.guarded(self.liveness.check_stages)
                self.guarded(self.liveness.check_progress)
                self.guarded(self.dispatcher.dispatch)
            if time.monotonic() - last_sweep > 60.0:
                last_sweep = time.monotonic()
                self.guarded(self.dispatcher.sweep_spool)
        self.close()

    def close(self) -> None:
        self.webhooks.stop()
        # Replies and events already queued get a moment to go out. Jobs queued to a stage are
        # dropped: they are `processing` in the store, and the next broker dispatches them again.
        for sock in (self.recv_from_gateway, self.publish):
            sock.close(CLOSE_LINGER_MS)
        for sock in (self.recv_from_stages, *self._send_to.values()):
            sock.close(0)
        stop_authenticators()
        self.ctx.term()
        self.store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="run the broker process")
    parser.add_argument("--config", help="profile TOML (default: $WAN_SERVER_CONFIG or the tiny profile)")
    args = parser.parse_args(argv)
    config = load_or_exit(args.config)
    setup_logging(config.log_level)
    use_curve(config.curve_keys())
    broker = Broker(config)

    def stop(signum: int, frame: FrameType | None) -> None:
        broker.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    broker.run()
    log.info("broker stopped")


if __name__ == "__main__":
    main()
