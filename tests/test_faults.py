"""Faults of the running system (supervisord, broker, gateway, stages): processes killed, stopped
or wedged while they hold jobs, messages delivered twice, a results folder that cannot be written,
and the whole system stopped and started with jobs in flight. Every job completes exactly once.

Faults are real (kill -9, SIGSTOP, RLIMIT_FSIZE, a file where the results folder should be); the
one injected thing is *when*: `runtime.fault_dir` lets a test make a stage sleep or hang once at
a point (after accepting a job, or when the muxer has written the frames but not the index), so a fast tiny stage can
be caught holding a job.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from websockets.sync.client import connect

from common.sockets import make_socket
from tests.helpers import System, kill9, running_system, wait_for

PROGRESS_TIMEOUT_S = 15  # long enough that a test on a loaded box kills a stage before the watchdog does


@pytest.fixture(scope="module")
def system(model_cache) -> Iterator[System]:
    """Its own system: fault injection on, wire recording on, a short watchdog deadline; and these
    tests kill, stop and wedge its processes."""
    with running_system(
        "wsf-",
        model_cache,
        setup=lambda s: (s.state_dir / "faults").mkdir(),
        WAN_SERVER__RUNTIME__FAULT_DIR="{state}/faults",
        WAN_SERVER__RUNTIME__RECORD_DIR="{state}/record",
        WAN_SERVER__WATCHDOG__PROGRESS_TIMEOUT_S=str(PROGRESS_TIMEOUT_S),
    ) as s:
        yield s


@pytest.fixture(autouse=True)
def no_faults_left(system):
    """A fault a test injected but did not trigger must not hit the next test."""
    yield
    for trigger in (system.state_dir / "faults").iterdir():
        trigger.unlink()


def inject(system, stage: str, point: str, kind: str, value: str = "") -> Path:
    """Arm a one-shot fault for the next job that reaches `stage`; returns its trigger file, which
    the stage removes when the fault fires. Waits until no job is queued or running first, so the
    fault cannot go to a job an earlier test left in flight, and clears triggers an earlier failed
    test left unused."""
    system.wait_idle()
    for stale in (system.state_dir / "faults").iterdir():
        stale.unlink()
    trigger = system.state_dir / "faults" / f"{stage}.{point}.{kind}"
    trigger.write_text(value)
    return trigger


def wait_fired(trigger: Path, timeout_s: float = 60) -> None:
    """Until the stage has taken the fault: it is holding its job at the fault point now."""
    wait_for(lambda: not trigger.exists(), timeout_s, f"the fault {trigger.name} to fire", interval_s=0.05)


@contextlib.contextmanager
def subscribe(system, job_id: str):
    with connect(f"ws://127.0.0.1:{system.port}/ws", open_timeout=10) as ws:
        ws.send(json.dumps({"action": "subscribe", "job_id": job_id}))
        yield ws


def wait_at(system, job_id: str, stage: str, attempt: int, timeout_s: float = 120) -> None:
    """Until the broker shows the job in `stage` at `attempt` (its status says where it is)."""
    def there() -> bool:
        body = result(system, job_id)
        history = [ln for ln in system.log("broker").splitlines() if job_id in ln]
        assert body["status"] in ("queued", "processing"), (body, history)
        where = system.json("GET", f"/api/v1/status/{job_id}")[1]["stage"]
        return (where, body["metadata"]["attempts"]) == (stage, attempt)

    wait_for(there, timeout_s, f"job {job_id} in {stage} at attempt {attempt}", interval_s=0.05)


def wait_event(ws, stage: str, attempt: int, timeout_s: float = 120) -> dict:
    """The first progress event (or the snapshot) that shows the job in `stage` at `attempt`."""
    deadline = time.monotonic() + timeout_s
    while True:
        event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        assert event["event"] not in ("complete", "error"), event
        if event["event"] == "progress" and (event.get("stage"), event.get("attempt")) == (stage, attempt):
            return event


def rest(ws, timeout_s: float = 180) -> list[dict]:
    events: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while not events or events[-1]["event"] not in ("complete", "error"):
        events.append(json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic()))))
    return events


def wait_restarted(system, program: str, old_pid: int, timeout_s: float = 60) -> int:
    try:
        return wait_for(lambda: (pid := system.pid(program)) not in (0, old_pid) and pid, timeout_s,
                        f"supervisord to start {program} again", interval_s=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{system.supervisorctl('status')}") from None


def result(system, job_id: str) -> dict:
    return system.json("GET", f"/api/v1/result/{job_id}")[1]


def assert_clean(system, job_id: str) -> None:
    """Completed exactly once, its MP4 served, no temporary files, no spool folder left."""
    job = system.stored_job(job_id)
    assert job["status"] == "completed" and job["error"] is None, job
    assert job["output_path"] == str(system.state_dir / "results" / f"{job_id}.mp4")
    assert system.log("broker").count(f"job={job_id} completed:") == 1  # the store cannot count completions
    status, _, video = system.request("GET", f"/api/v1/files/{job_id}.mp4")
    assert status == 200 and video[4:8] == b"ftyp"
    results = system.state_dir / "results"
    assert not [p.name for p in results.iterdir() if p.name.endswith(".tmp")]
    assert not (system.state_dir / "spool" / job_id).exists()


def stage_events(events: list[dict], attempt: int) -> set[str]:
    return {e["stage"] for e in events if e["event"] == "progress" and e.get("attempt") == attempt}


def test_dit_low_killed_resumes_from_the_handoff_checkpoint_bit_identical(system):
    params = dict(prompt="resume me", seed=11, quality_preset="standard",
                  custom_options={"steps": 40, "resolution": "64x64"})
    reference = system.submit(**params)
    assert system.wait_final(reference, timeout_s=180)["status"] == "completed"
    expected = system.request("GET", f"/api/v1/files/{reference}.mp4")[2]

    trigger = inject(system, "dit_low", "handle", "delay", "60")  # holds the job there until it is killed
    job_id = system.submit(**params)
    with subscribe(system, job_id) as ws:
        wait_at(system, job_id, "dit_low", attempt=1)
        wait_fired(trigger)
        spool = system.state_dir / "spool" / job_id
        assert (spool / "dit_low.ckpt").is_file()  # the hand-off was checkpointed before it was sent
        assert not list(spool.glob(".*.tmp"))
        old = system.pid("dit_low")
        kill9(old)
        killed_at = time.monotonic()
        resumed = wait_event(ws, "dit_low", attempt=2)
        detected_s = time.monotonic() - killed_at
        events = [resumed, *rest(ws)]
    assert events[-1]["event"] == "complete"
    # Attempt 2 started at dit_low: no text encoding and no high-noise step was run again.
    assert stage_events(events, 2) == {"dit_low", "vae", "muxer"}
    steps = [e for e in events if e.get("attempt") == 2 and e.get("stage") == "dit_high"]
    assert not steps
    assert f"job={job_id} lost in dit_low at attempt 1; dispatching again" in system.log("broker")
    assert result(system, job_id)["metadata"]["attempts"] == 2
    assert system.request("GET", f"/api/v1/files/{job_id}.mp4")[2] == expected  # bit-identical
    assert_clean(system, job_id)
    assert detected_s < 60
    print(f"dit_low kill -9 -> attempt 2 running in dit_low: {detected_s:.1f} s")


ROUTE = ["text_encoder", "dit_high", "dit_low", "vae", "muxer"]
# (stage killed, fault point that holds the job there, stage the job resumes at: its last checkpoint)
KILLS = [
    ("text_encoder", "handle", "text_encoder"),
    ("dit_high", "handle", "dit_high"),  # the text embeddings were checkpointed
    ("vae", "handle", "vae"),  # the denoised latents were checkpointed
    ("muxer", "write", "vae"),  # the frames are not (large, and cheap to decode again)
]


@pytest.mark.parametrize("stage,point,resume_at", KILLS, ids=[k[0] for k in KILLS])
def test_stage_killed_while_holding_a_job(system, stage, point, resume_at):
    trigger = inject(system, stage, point, "delay", "60")
    job_id = system.submit(prompt=f"kill {stage}", seed=5)
    with subscribe(system, job_id) as ws:
        wait_at(system, job_id, stage, attempt=1)
        wait_fired(trigger)
        if stage == "muxer":  # caught in the middle of writing its temporary MP4
            wait_for(lambda: list((system.state_dir / "results").glob(f".{job_id}.mp4.*.tmp")), 30,
                     "the muxer's temporary MP4", interval_s=0.05)
        old = system.pid(stage)
        kill9(old)
        killed_at = time.monotonic()
        events = rest(ws)
    finished_s = time.monotonic() - killed_at
    assert events[-1]["event"] == "complete", events[-3:]
    wait_restarted(system, stage, old)
    # Attempt 2 ran from `resume_at` on, no stage before it (a draft job's two steps are all
    # high-noise: no dit_low).
    ran = stage_events(events, 2)
    assert {resume_at, "muxer"} <= ran <= set(ROUTE[ROUTE.index(resume_at):]), ran
    assert f"job={job_id} lost in {stage} at attempt 1; dispatching again" in system.log("broker")
    assert result(system, job_id)["metadata"]["attempts"] == 2
    assert_clean(system, job_id)
    if stage == "muxer":
        assert "left by a muxer that was killed while writing" in system.log("muxer")
    print(f"{stage} kill -9 -> job complete: {finished_s:.1f} s")


def test_job_that_keeps_killing_its_stage_fails_after_bounded_attempts(system):
    trigger = inject(system, "dit_low", "handle", "delay", "60")  # holds each attempt there until it is killed
    job_id = system.submit(prompt="poison", seed=6, custom_options={"steps": 10, "resolution": "64x64"})
    for attempt in (1, 2, 3):
        wait_at(system, job_id, "dit_low", attempt)
        wait_fired(trigger)
        old = system.pid("dit_low")
        kill9(old)
        if attempt < 3:
            trigger.write_text("60")  # for the next attempt, in the process supervisord starts next
        wait_restarted(system, "dit_low", old)
    final = system.wait_final(job_id, timeout_s=120)
    assert final["status"] == "failed" and final["error"]["code"] == "STAGE_CRASHED", final
    assert final["error"]["details"] == {"stage": "dit_low", "attempts": 3}
    assert not (system.state_dir / "spool" / job_id).exists()
    # The stage and the other jobs are unaffected.
    nxt = system.submit(prompt="next one", seed=6)
    assert system.wait_final(nxt, timeout_s=180)["status"] == "completed"
    assert_clean(system, nxt)


def test_four_jobs_complete_with_both_dits_busy_at_once(system):
    # dit_low holds the first job a while: the broker must not wait for it to hand the next job to
    # dit_high. (Without the hold, whether two tiny jobs meet in the DiTs would depend on the box.)
    trigger = inject(system, "dit_low", "handle", "delay", "10")
    ids = [system.submit(prompt=f"job {i}", seed=i, custom_options={"steps": 12, "resolution": "64x64"})
           for i in range(4)]
    wait_fired(trigger)
    for job_id in ids:
        assert system.wait_final(job_id)["status"] == "completed"
    spans = {}
    for job_id in ids:
        timings = result(system, job_id)["metadata"]["timings"]
        spans[job_id] = {s: (timings[s]["start"], timings[s]["end"]) for s in ("dit_high", "dit_low")}
    overlaps = [
        (a, b) for a in ids for b in ids if a != b
        and spans[a]["dit_high"][0] < spans[b]["dit_low"][1] and spans[b]["dit_low"][0] < spans[a]["dit_high"][1]
    ]
    assert overlaps, spans


def test_stopped_stage_is_killed_and_restarted(system):
    """SIGSTOP: no heartbeats. The watchdog kills that very process; supervisord starts a new one."""
    trigger = inject(system, "dit_high", "handle", "delay", "60")  # holds the job there while it is stopped
    job_id = system.submit(prompt="sigstop", seed=3)
    with subscribe(system, job_id) as ws:
        wait_at(system, job_id, "dit_high", attempt=1)
        wait_fired(trigger)
        old = system.pid("dit_high")
        os.kill(old, signal.SIGSTOP)
        stopped_at = time.monotonic()
        new = wait_restarted(system, "dit_high", old)
        restarted_s = time.monotonic() - stopped_at
        events = rest(ws, timeout_s=240)
    assert events[-1]["event"] == "complete"
    assert new != old
    log = system.log("broker")
    assert f"watchdog killed stage dit_high (pid {old}): it sent no heartbeat" in log
    assert f"job={job_id} lost in dit_high at attempt 1; dispatching again" in log
    assert result(system, job_id)["metadata"]["attempts"] == 2
    assert_clean(system, job_id)
    assert restarted_s < 60
    print(f"SIGSTOP dit_high -> killed and restarted: {restarted_s:.1f} s")


def test_wedged_stage_that_still_heartbeats_is_killed(system):
    """A job that never returns in dit_low: heartbeats go on, progress does not."""
    trigger = inject(system, "dit_low", "handle", "hang")
    job_id = system.submit(prompt="wedged", seed=4, custom_options={"steps": 10})
    with subscribe(system, job_id) as ws:
        wait_at(system, job_id, "dit_low", attempt=1)
        hung_at = time.monotonic()
        wait_fired(trigger)  # hanging now
        old = system.pid("dit_low")
        wait_restarted(system, "dit_low", old)
        killed_s = time.monotonic() - hung_at
        events = rest(ws)
    assert events[-1]["event"] == "complete"
    assert stage_events(events, 2) == {"dit_low", "vae", "muxer"}  # resumed from the hand-off
    log = system.log("broker")
    assert f"job={job_id} no progress in dit_low" in log
    assert f"watchdog killed stage dit_low (pid {old}): it made no progress on job {job_id}" in log
    assert result(system, job_id)["metadata"]["attempts"] == 2
    assert_clean(system, job_id)
    # Not before the deadline, give or take how late this test saw the job reach dit_low (the
    # broker's clock starts when it reads dit_low's `accepted`; ours when the API shows it).
    assert PROGRESS_TIMEOUT_S - 1 <= killed_s < PROGRESS_TIMEOUT_S + 30
    print(f"hung dit_low -> killed and restarted: {killed_s:.1f} s (deadline {PROGRESS_TIMEOUT_S} s)")


def records(system, stage: str, job_id: str) -> list[Path]:
    return sorted((system.state_dir / "record" / stage).glob(f"*-{job_id}.msgpack"))


def push(system, endpoint: str, *messages: list[bytes]) -> None:
    """Send `messages` in order over one connection (so they are read in that order)."""
    address = system.config.endpoint(endpoint)
    sock: zmq.Socket[bytes] = make_socket(zmq.Context.instance(), zmq.PUSH, address, bind=False)
    for frames in messages:
        sock.send_multipart(frames)
    sock.close(linger=5000)


def test_duplicate_delivery_gives_one_output(system):
    # dit_low holds the job a few seconds, so the copy arrives while it still works on it.
    trigger = inject(system, "dit_low", "handle", "delay", "5")
    job_id = system.submit(prompt="twice", seed=8, custom_options={"steps": 30, "resolution": "64x64"})
    with subscribe(system, job_id) as ws:
        wait_at(system, job_id, "dit_low", attempt=1)
        wait_fired(trigger)
        # dit_low recorded the hand-off it is working on: deliver those very bytes again.
        handoff = msgpack.unpackb(records(system, "dit_low", job_id)[0].read_bytes(), raw=False)
        push(system, "dit_low", handoff["in"])
        assert rest(ws)[-1]["event"] == "complete"
    path = system.state_dir / "results" / f"{job_id}.mp4"
    before, stored = path.stat(), system.stored_job(job_id)
    assert stored["status"] == "completed"
    # The muxer's input and its JobDone report, again, after the job completed. Behind the report,
    # on the same connection, a malformed one: once the broker has dropped that, it has handled
    # the duplicate.
    mux = msgpack.unpackb(records(system, "muxer", job_id)[0].read_bytes(), raw=False)
    push(system, "muxer", mux["in"])
    dropped = system.log("broker").count("dropped a bad report")
    push(system, "reports", mux["out"][0], [b"\xc1 not a report"])
    wait_for(lambda: system.log("broker").count("dropped a bad report") > dropped, 30,
             "the broker to read the reports sent after the job completed")
    for stage in ("dit_low", "muxer"):
        wait_for(lambda stage=stage: f"job={job_id} dropped a second delivery" in system.log(stage), 30,
                 f"{stage} to drop the second delivery")
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not written again
    assert len(records(system, "vae", job_id)) == 1 and len(records(system, "muxer", job_id)) == 1
    assert system.stored_job(job_id) == stored  # the duplicate report changed nothing the broker keeps
    assert system.log("broker").count(f"job={job_id} completed:") == 1  # nor announced a second completion
    assert system.json("GET", f"/api/v1/status/{job_id}")[1]["status"] == "completed"


def assert_write_error(system, job_id: str, reason: str) -> None:
    final = system.wait_final(job_id, timeout_s=120)
    assert final["status"] == "failed", final
    error = final["error"]
    assert error["code"] == "RESULT_WRITE_ERROR" and error["details"]["reason"] == reason, error
    assert str(system.state_dir) not in json.dumps(result(system, job_id))  # no path leaks
    assert system.request("GET", f"/api/v1/files/{job_id}.mp4")[0] == 404
    results = system.state_dir / "results"
    assert not results.is_dir() or not [p for p in results.iterdir() if job_id in p.name]
    assert not (system.state_dir / "spool" / job_id).exists()


def test_results_full_fails_the_job_then_recovers(system):
    """A file size limit on the muxer (RLIMIT_FSIZE, as a full disk): EFBIG, no partial MP4."""
    pid = system.pid("muxer")
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (200, hard))
    try:
        job_id = system.submit(prompt="no room", seed=9)
        assert_write_error(system, job_id, "EFBIG")
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
    assert system.pid("muxer") == pid  # a job's failure, not the process's
    nxt = system.submit(prompt="room again", seed=9)
    assert system.wait_final(nxt)["status"] == "completed"
    assert_clean(system, nxt)


def test_results_unwritable_fails_the_job_then_recovers(system):
    """The results folder is not a folder (works as root, where chmod would not stop a write)."""
    results = system.state_dir / "results"
    aside = system.state_dir / "results.aside"
    results.rename(aside)
    results.write_text("not a folder")
    try:
        job_id = system.submit(prompt="nowhere to write", seed=10)
        assert_write_error(system, job_id, "EEXIST")
    finally:
        results.unlink()
        aside.rename(results)
    nxt = system.submit(prompt="somewhere again", seed=10)
    assert system.wait_final(nxt)["status"] == "completed"
    assert_clean(system, nxt)


def status_of(system, job_id: str) -> str:
    return system.json("GET", f"/api/v1/status/{job_id}")[1]["status"]


def test_stop_all_start_all_with_jobs_in_flight(system):
    # dit_high holds the first job; three more are in the pipeline behind it (max_inflight_per_route
    # is 4), two wait in the broker's queue. (Tiny jobs are fast: without the hold, how many are
    # still in flight when everything stops would depend on the box.)
    trigger = inject(system, "dit_high", "handle", "delay", "120")
    ids = [system.submit(prompt=f"stop all {i}", seed=i, custom_options={"steps": 16, "resolution": "64x64"})
           for i in range(6)]
    wait_fired(trigger)
    wait_for(lambda: [status_of(system, job_id) for job_id in ids] == ["processing"] * 4 + ["queued"] * 2, 60,
             "four jobs processing and two queued")
    stopping, seen = time.monotonic(), len(system.log("supervisord"))
    system.supervisorctl("stop", "all")
    stop_s = time.monotonic() - stopping
    assert "RUNNING" not in system.supervisorctl("status")
    system.supervisorctl("start", "all")
    system.wait_ready(timeout_s=600)  # every process loads again at once: slow on a shared 2-core box
    finals = [system.wait_final(job_id, timeout_s=300) for job_id in ids]
    assert [f["status"] for f in finals] == ["completed"] * len(ids)
    for job_id in ids:
        assert_clean(system, job_id)
    # The jobs that were in the pipeline are taken up again with a new attempt; the queued ones
    # are dispatched for the first time.
    attempts = [result(system, job_id)["metadata"]["attempts"] for job_id in ids]
    assert min(attempts[:4]) >= 2 and attempts[4:] == [1, 1], attempts
    assert "with SIGKILL" not in system.log("supervisord")[seen:]  # every process stopped on SIGTERM
    print(f"supervisorctl stop all with jobs in flight: {stop_s:.1f} s")
