"""GET /metrics: the broker's numbers in the Prometheus text format, read back with prometheus-client's own parser.

The unit tests drive an in-process Broker (its real store) through the reports stages send; the
system tests run real jobs through the running tiny system and scrape the gateway.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.broker import Broker
from common import messages as m
from tests.helpers import System, wait_for

JOB_ID = re.compile(r"[0-9a-f]{32}")
ALLOWED_LABELS = {"model", "status", "stage", "code", "device", "outcome", "le"}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition: (sample name, its labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float:
    """The sample's value; 0 when the exposition has no such series (a counter never incremented)."""
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def check_labels(text: str, forbidden: list[str]) -> None:
    """Only the bounded label names, and no value that is a job id or holds a prompt."""
    for (_, labels) in samples(text):
        for key, val in labels:
            assert key in ALLOWED_LABELS, key
            assert not JOB_ID.search(val), (key, val)
            assert not any(f in val for f in forbidden), (key, val)


# ---- the broker, in process ----

def submit(broker: Broker, prompt: str = "a heron in the reeds") -> str:
    return str(broker.api.submit({"request": {"prompt": prompt, "model": "t2v", "quality": "draft"}})["job_id"])


def render(broker: Broker) -> str:
    return str(broker.api.ops["metrics"]({})["text"])


def run_through(broker: Broker, job_id: str) -> None:
    """What the stages of the job's route report, then the muxer's JobDone."""
    attempt = broker.store.start(job_id)
    assert attempt == 1
    job = broker.store.get(job_id)
    assert job is not None
    t = 1000.0
    for stage in job.route:
        broker.on_report(m.StageReport(job_id, attempt, stage, "accepted", at=t))
        if broker.config.stage(stage).kind == "dit":
            for i in (1, 2):
                t += 0.25
                broker.on_report(m.StageReport(job_id, attempt, stage, "step", i, 2, at=t))
        if stage != job.route[-1]:
            t += 0.5
            broker.on_report(m.StageReport(job_id, attempt, stage, "forwarded", at=t, to=job.route[job.route.index(
                stage) + 1]))
    path = broker.config.results_dir / f"{job_id}.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x00\x00\x18ftypisom")
    broker.on_report(m.JobDone(job_id=job_id, attempt=attempt, path=str(path), num_frames=5, width=32, height=32,
                               fps=16))


def test_final_states_latencies_steps_and_errors(broker: Broker) -> None:
    assert not [k for k in samples(render(broker)) if k[0] == "wan_jobs_total"]  # no job has ended yet
    done = submit(broker)
    assert value(render(broker), "wan_queue_depth", status="queued") == 1
    run_through(broker, done)
    job = broker.store.get(done)
    assert job is not None and job.status == "completed"
    cancelled = submit(broker)
    broker.api.cancel({"job_id": cancelled})
    failed = submit(broker)
    failed_job = broker.store.get(failed)
    assert failed_job is not None
    broker.fail(failed_job, {"code": "STAGE_CRASHED", "message": "m", "details": {}}, stage="vae")

    text = render(broker)
    assert value(text, "wan_jobs_total", model=job.model, status="completed") == 1
    assert value(text, "wan_jobs_total", model=job.model, status="cancelled") == 1
    assert value(text, "wan_jobs_total", model=job.model, status="failed") == 1
    assert value(text, "wan_job_errors_total", code="STAGE_CRASHED") == 1
    assert value(text, "wan_job_latency_seconds_count", model=job.model, status="completed") == 1
    assert value(text, "wan_job_latency_seconds_count", model=job.model, status="cancelled") == 1
    # Only the job that was dispatched waited in the queue for a start.
    assert value(text, "wan_job_queue_wait_seconds_count", model=job.model) == 1
    dits = [s for s in job.route if broker.config.stage(s).kind == "dit"]
    for stage in dits:
        assert value(text, "wan_stage_step_seconds_count", stage=stage) == 2
        assert value(text, "wan_stage_step_seconds_sum", stage=stage) == pytest.approx(0.5)
    for stage in job.route[:-1]:  # forwarded, so timed
        assert value(text, "wan_stage_busy_seconds_total", stage=stage) > 0
    assert value(text, "wan_queue_depth", status="queued") == 0
    assert value(text, "wan_queue_depth", status="processing") == 0
    assert broker.metrics._step_marks == {}  # nothing kept for jobs that ended
    check_labels(text, ["heron", "reeds"])


def test_api_errors_by_code(broker: Broker) -> None:
    frames = m.encode(m.ApiRequest(request_id="r1", op="status", args={"job_id": "0" * 32}))
    broker.handle_request([b"peer", *frames])  # the reply goes to a peer that is not there: dropped
    assert value(render(broker), "wan_api_errors_total", code="JOB_NOT_FOUND") == 1


def test_stage_up_and_device_memory_from_heartbeats(broker: Broker) -> None:
    stages = sorted(broker.route_stages())
    text = render(broker)
    assert all(value(text, "wan_stage_up", stage=s) == 0 for s in stages)
    assert ("wan_stage_up", frozenset({("stage", stages[0])})) in samples(text)  # down is 0, not absent
    beat = m.Heartbeat(stage=stages[0], pid=os.getpid(), ready=True, device="cuda:0", device_total_bytes=1000,
                       device_free_bytes=300, weight_bytes=200)
    broker.on_report(beat)
    text = render(broker)
    assert value(text, "wan_stage_up", stage=stages[0]) == 1
    assert all(value(text, "wan_stage_up", stage=s) == 0 for s in stages[1:])
    assert value(text, "wan_device_memory_total_bytes", stage=stages[0], device="cuda:0") == 1000
    assert value(text, "wan_device_memory_used_bytes", stage=stages[0], device="cuda:0") == 700
    assert value(text, "wan_stage_weight_bytes", stage=stages[0], device="cuda:0") == 200


# ---- the running system ----

def scrape(system: System, **kw: Any) -> str:
    status, headers, content = system.request("GET", "/metrics", **kw)
    assert status == 200, content
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return content.decode()


def test_metrics_after_real_jobs(api_system: System) -> None:
    s = api_system
    before = scrape(s)
    prompt = "a lighthouse keeper counts gulls"
    job_id = s.submit(prompt=prompt)
    body = s.wait_final(job_id)
    assert body["status"] == "completed", body
    status, result = s.json("GET", f"/api/v1/result/{job_id}")
    model = result["metadata"]["model"]

    # A cancelled job: cancelled while queued or running, whichever it is by then.
    other = s.submit(prompt="a second job, cancelled")
    assert s.json("POST", f"/api/v1/cancel/{other}")[0] == 200
    s.wait_idle()

    def counted() -> str | None:
        text = scrape(s)
        return text if value(text, "wan_jobs_total", model=model, status="cancelled") > value(
            before, "wan_jobs_total", model=model, status="cancelled") else None

    after = wait_for(counted, 10, "the cancelled job to be counted")
    for status_ in ("completed", "cancelled"):
        assert value(after, "wan_jobs_total", model=model, status=status_) == value(
            before, "wan_jobs_total", model=model, status=status_) + 1
        assert value(after, "wan_job_latency_seconds_count", model=model, status=status_) == value(
            before, "wan_job_latency_seconds_count", model=model, status=status_) + 1
    assert value(after, "wan_job_queue_wait_seconds_count", model=model) >= value(
        before, "wan_job_queue_wait_seconds_count", model=model) + 1
    for stage in s.config.route(model):
        assert value(after, "wan_stage_up", stage=stage) == 1
    # The stages that worked on the job (a draft may run every step in the high-noise expert) were
    # busy at least as long as its timings say (the cancelled job may have added some).
    timings = {k: v for k, v in result["metadata"]["timings"].items() if isinstance(v, dict)}
    assert "text_encoder" in timings and "muxer" in timings, timings
    for stage, timing in timings.items():
        grew = value(after, "wan_stage_busy_seconds_total", stage=stage) - value(
            before, "wan_stage_busy_seconds_total", stage=stage)
        assert grew >= timing["seconds"] - 1e-3, (stage, grew, timing)
    dits = [st for st in timings if s.config.stage(st).kind == "dit"]
    assert dits, timings
    for stage in dits:
        assert value(after, "wan_stage_step_seconds_count", stage=stage) > value(
            before, "wan_stage_step_seconds_count", stage=stage)
    assert any(name == "wan_device_memory_total_bytes" and v > 0 for (name, _), v in samples(after).items())
    assert value(after, "wan_queue_depth", status="queued") == 0
    assert ("wan_websocket_subscribers", frozenset()) in samples(after)
    check_labels(after, [prompt, "lighthouse", "a second job", job_id, other])


def test_websocket_subscribers_are_counted(api_system: System) -> None:
    from websockets.sync.client import connect

    s = api_system
    base = value(scrape(s), "wan_websocket_subscribers")
    with connect(f"ws://127.0.0.1:{s.port}/ws", open_timeout=10):
        wait_for(lambda: value(scrape(s), "wan_websocket_subscribers") == base + 1, 10, "the subscriber to count")
    wait_for(lambda: value(scrape(s), "wan_websocket_subscribers") == base, 10, "the subscriber to go")


def test_metrics_is_in_the_openapi_document(api_system: System) -> None:
    status, doc = api_system.json("GET", "/api/v1/openapi.json")
    assert status == 200 and "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]

