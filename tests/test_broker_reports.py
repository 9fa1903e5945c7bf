"""The broker's report handling: heartbeats, stage reports and failures, hostile or out of order.

Most tests drive one in-process Broker through its handlers (`on_report`, the periodic checks) with
a controllable clock; the first runs `python -m broker.broker` as a process and talks to it over its
real sockets, the way a stray peer would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker.broker import Broker
from broker.progress import timing_key
from common import messages as m
from common.config import Config
from common.sockets import SocketOptions, make_socket
from tests.helpers import ROOT, short_tmpdir, stack_env, wait_for


class Clock:
    """Stands in for time.monotonic, so a test can let a heartbeat age without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(time, "monotonic", fake)
    return fake


@pytest.fixture
def state() -> Iterator[Path]:
    path = short_tmpdir("wsr-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_broker(state: Path, **env: str) -> Broker:
    return Broker(Config.load(environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(state), **env}))


def beat(stage: str, pid: int, ready: bool = True) -> m.Heartbeat:
    return m.Heartbeat(stage=stage, pid=pid, ready=ready)


ROUTE = ["text_encoder", "dit_high", "dit_low", "vae", "muxer"]
PIDS = {stage: 10_000 + i for i, stage in enumerate(ROUTE)}  # no such processes: nothing is ever killed


def submit(broker: Broker) -> str:
    job = broker.api.submit({"request": {"prompt": "x", "model": "t2v", "quality": "draft"}})
    return str(job["job_id"])


# ---- a running broker process ----------------------------------------------------------------


def test_heartbeat_from_unknown_stage_over_the_socket_does_not_crash_the_broker(state: Path) -> None:
    """A stray peer's well-formed heartbeat, under a name the config does not know, is ignored: the
    same broker process is still up and serving after that heartbeat would have timed out."""
    env = stack_env(state, state / "models", WAN_SERVER__WATCHDOG__HEARTBEAT_TIMEOUT_S="1")
    config = Config.load(environ=env)
    log_path = state / "broker.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "broker.broker"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    ctx = zmq.Context()
    reports = make_socket(ctx, zmq.PUSH, config.endpoint("reports"), bind=False, options=SocketOptions(immediate=False))
    api = make_socket(ctx, zmq.DEALER, config.endpoint("broker"), bind=False, options=SocketOptions(immediate=False))
    calls = 0

    def ready() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        api.send_multipart(m.encode(m.ApiRequest(request_id=str(calls), op="ready", args={})))
        assert api.poll(10_000), f"the broker did not answer:\n{log_path.read_text()}"
        reply = m.decode(api.recv_multipart(), config.limits)
        assert isinstance(reply, m.ApiReply) and reply.ok and reply.request_id == str(calls)
        assert reply.result is not None
        return reply.result

    try:
        wait_for(lambda: b"broker up" in log_path.read_bytes() or proc.poll() is not None, 60, "the broker to start")
        pid = proc.pid
        reports.send_multipart(m.encode(m.Heartbeat(stage="not_a_stage", pid=os.getpid(), ready=True)))
        # A known stage's heartbeat sent after it: once that one has timed out, so has the stray one.
        reports.send_multipart(m.encode(m.Heartbeat(stage="vae", pid=os.getpid(), ready=True)))
        wait_for(lambda: ready()["stages"]["vae"], 10, "the vae heartbeat to arrive")
        wait_for(lambda: not ready()["stages"]["vae"], 10, "the vae heartbeat to time out")
        # The watchdog has dealt with the timed-out heartbeats (the test's pid is no stage: nothing is killed).
        gone = f"stage vae (pid {os.getpid()}) sent no heartbeat"
        wait_for(lambda: gone in log_path.read_text() or proc.poll() is not None, 10, "the watchdog's check")
        assert proc.poll() is None, log_path.read_text()
        assert "not_a_stage" not in ready()["stages"] and proc.pid == pid
        assert "not_a_stage" in log_path.read_text()  # logged, once
        assert log_path.read_text().count("not_a_stage") == 1
    finally:
        for sock in (reports, api):
            sock.close(0)
        ctx.term()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


# ---- handlers, in process ----------------------------------------------------------------------


def test_reports_from_unknown_stages_are_ignored(state: Path, clock: Clock) -> None:
    broker = make_broker(state)
    try:
        job_id = submit(broker)
        attempt = broker.store.start(job_id)
        for msg in (beat("not_a_stage", 4242),
                    m.StageReport(job_id=job_id, attempt=attempt or 1, stage="not_a_stage", event="accepted"),
                    m.JobFailed(job_id=job_id, attempt=attempt or 1, stage="not_a_stage",
                                error={"code": "X", "message": "x", "details": {}})):
            broker.on_report(msg)
        clock.now += 3600  # long past any heartbeat timeout
        broker.liveness.check_stages()
        broker.liveness.check_progress()
        broker.dispatcher.dispatch()
        assert "not_a_stage" not in broker.api.ready({})["stages"]
        job = broker.store.get(job_id)
        assert job is not None and job.status == "processing" and job.stage is None  # untouched
    finally:
        broker.close()


@pytest.mark.parametrize("error", [
    "boom",                                    # not a map at all (only possible in process)
    {"error": "boom"},                         # error.error not a map
    {"error": {"message": "no code"}},         # no code
    {"code": 7, "message": ["not", "text"]},   # code and message of the wrong type
    {},
])
def test_job_failed_with_a_malformed_error_fails_the_job_with_a_structured_error(
        state: Path, error: Any) -> None:
    broker = make_broker(state)
    try:
        job_id = submit(broker)
        attempt = broker.store.start(job_id)
        assert attempt == 1
        broker.on_report(m.JobFailed(job_id=job_id, attempt=attempt, stage="vae", error=error))
        job = broker.store.get(job_id)
        assert job is not None and job.status == "failed"
        assert job.error is not None
        assert isinstance(job.error["code"], str) and job.error["code"]
        assert isinstance(job.error["message"], str) and isinstance(job.error["details"], dict)
        assert job.error["details"].get("stage") == "vae"
    finally:
        broker.close()


def test_a_well_formed_job_failed_keeps_its_error(state: Path) -> None:
    broker = make_broker(state)
    try:
        job_id = submit(broker)
        attempt = broker.store.start(job_id)
        assert attempt == 1
        body = {"error": {"code": "GPU_OUT_OF_MEMORY", "message": "out of memory", "details": {"stage": "vae"}}}
        broker.on_report(m.JobFailed(job_id=job_id, attempt=attempt, stage="vae", error=body))
        job = broker.store.get(job_id)
        assert job is not None and job.status == "failed" and job.error == body["error"]
    finally:
        broker.close()


def test_stage_alive_follows_the_configured_heartbeat_timeout(state: Path, clock: Clock) -> None:
    broker = make_broker(state, WAN_SERVER__WATCHDOG__HEARTBEAT_TIMEOUT_S="30")
    try:
        broker.on_report(beat("vae", PIDS["vae"]))
        assert broker.api.ready({})["stages"]["vae"]
        clock.now += 20  # many heartbeat intervals, but within the configured timeout
        assert broker.api.ready({})["stages"]["vae"]
        broker.liveness.check_stages()
        assert broker.api.ready({})["stages"]["vae"]
        clock.now += 11  # past it
        assert not broker.api.ready({})["stages"]["vae"]
        broker.liveness.check_stages()
        assert not broker.api.ready({})["stages"]["vae"]
    finally:
        broker.close()


def count_statements(broker: Broker) -> list[str]:
    statements: list[str] = []
    broker.store.db.set_trace_callback(statements.append)
    return statements


def test_repeat_heartbeats_do_not_touch_the_store(state: Path) -> None:
    broker = make_broker(state)
    try:
        submit(broker)  # a queued job: dispatch has something to look at
        for stage in ROUTE:
            broker.on_report(beat(stage, PIDS[stage], ready=False))
        statements = count_statements(broker)
        for _ in range(5):
            for stage in ROUTE:
                broker.on_report(beat(stage, PIDS[stage], ready=False))
        assert statements == []
        # A stage coming up, or a new process of a stage, may act.
        broker.on_report(beat("vae", PIDS["vae"], ready=True))
        assert statements
    finally:
        broker.close()


def dispatched(broker: Broker, state: Path) -> tuple[str, zmq.Socket, zmq.Context]:
    """A job dispatched for real to a PULL socket standing in for text_encoder."""
    ctx = zmq.Context()
    pull = make_socket(ctx, zmq.PULL, broker.config.endpoint("text_encoder"), bind=True)
    for stage in ROUTE:
        broker.on_report(beat(stage, PIDS[stage]))
    job_id = submit(broker)

    def sent() -> bool:
        broker.dispatcher.dispatch()
        job = broker.store.get(job_id)
        return job is not None and job.status == "processing"

    wait_for(sent, 10, "the job to be dispatched")
    msg = m.decode(pull.recv_multipart(), broker.limits)
    assert isinstance(msg, m.EncodeJob) and msg.job_id == job_id and msg.attempt == 1
    return job_id, pull, ctx


def test_a_late_forwarded_report_does_not_move_a_job_back(state: Path) -> None:
    broker = make_broker(state)
    job_id, pull, ctx = dispatched(broker, state)
    try:
        def report(stage: str, event: str, to: str = "") -> None:
            broker.on_report(m.StageReport(job_id=job_id, attempt=1, stage=stage, event=event, to=to,
                                           pid=PIDS[stage]))

        report("text_encoder", "accepted")
        # text_encoder's `forwarded` arrives late, after dit_high and dit_low have moved the job on.
        report("dit_high", "accepted")
        report("dit_high", "forwarded", to="dit_low")
        report("dit_low", "accepted")
        report("text_encoder", "forwarded", to="dit_high")
        job = broker.store.get(job_id)
        assert job is not None and job.stage == "dit_low" and job.status == "processing"
        # dit_high restarting does not touch the job: dit_low holds it.
        broker.on_report(beat("dit_high", PIDS["dit_high"] + 1))
        job = broker.store.get(job_id)
        assert job is not None and job.status == "processing" and job.attempt == 1 and job.stage == "dit_low"
        # dit_low restarting loses it: it is dispatched again as a new attempt.
        broker.on_report(beat("dit_low", PIDS["dit_low"] + 1))
        job = broker.store.get(job_id)
        assert job is not None and (job.status, job.attempt) in (("queued", 1), ("processing", 2))
    finally:
        pull.close(0)
        ctx.term()
        broker.close()


def test_a_forwarded_report_later_than_the_jobs_end_loses_no_stage_timing(state: Path) -> None:
    """Reports of two processes come in no set order: the VAE's `forwarded` may reach the broker
    after the muxer took the job and finished it. The VAE's time then ends at the muxer's
    `accepted`; every stage of the route has its timing in the job and in the shape's means (which
    the next job's ETA needs), recorded once."""
    broker = make_broker(state)
    job_id, pull, ctx = dispatched(broker, state)
    try:
        def report(stage: str, event: str, to: str = "") -> None:
            broker.on_report(m.StageReport(job_id=job_id, attempt=1, stage=stage, event=event, to=to,
                                           pid=PIDS[stage]))

        for stage, after in zip(ROUTE[:3], ROUTE[1:4], strict=True):
            report(stage, "accepted")
            report(stage, "forwarded", to=after)
        report("vae", "accepted")
        report("muxer", "accepted")
        broker.on_report(m.JobDone(job_id=job_id, attempt=1, path=str(state / "x.mp4"), num_frames=5, width=32,
                                   height=32, fps=16))
        report("vae", "forwarded", to="muxer")  # late: the job is complete
        job = broker.store.get(job_id)
        assert job is not None and job.status == "completed"
        assert set(ROUTE) <= set(job.timings), job.timings
        means = broker.store.timings(timing_key(job.params))
        assert set(means) == set(ROUTE)
        n = dict(broker.store.db.execute("SELECT stage, n FROM stage_timings").fetchall())
        assert n == dict.fromkeys(ROUTE, 1)
    finally:
        pull.close(0)
        ctx.term()
        broker.close()


def test_an_exception_in_one_handler_is_logged_with_the_job_id_and_the_broker_goes_on(
        state: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    broker = make_broker(state)
    try:
        job_id = submit(broker)
        assert broker.store.start(job_id) == 1

        def boom(*args: Any) -> None:
            raise RuntimeError("a bug in a handler")

        monkeypatch.setattr(broker.progress, "on_stage_report", boom)
        monkeypatch.setattr(broker.liveness, "check_stages", boom)
        with caplog.at_level("ERROR"):
            broker.handle_report(m.encode(m.StageReport(job_id=job_id, attempt=1, stage="vae", event="accepted")))
            broker.guarded(broker.liveness.check_stages)
            broker.handle_report([b"not msgpack"])
        failed = [r for r in caplog.records if r.exc_info and "StageReport" in r.getMessage()]
        assert failed and getattr(failed[0], "job_id", None) == job_id
        assert any(r.exc_info and "boom failed" in r.getMessage() for r in caplog.records)  # the periodic check
        # Still serving: the next report is handled.
        monkeypatch.undo()
        broker.handle_report(m.encode(m.StageReport(job_id=job_id, attempt=1, stage="text_encoder", event="accepted")))
        job = broker.store.get(job_id)
        assert job is not None and job.stage == "text_encoder"
    finally:
        broker.close()
