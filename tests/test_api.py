"""The REST and WebSocket API against the running system (supervisord, broker, gateway, stages).

A stage killed while it holds a job is test_faults.py's: catching a fast tiny stage at work takes
its injected faults."""

from __future__ import annotations

import io
import json
import time

import av
import pytest
from websockets.sync.client import connect

from common.config import Config
from gateway.app import Gateway
from gateway.web import studio_routes
from tests.error_bodies import check_error_body
from tests.helpers import System, kill9, wait_for


@pytest.fixture(scope="module")
def system(api_system: System) -> System:
    return api_system


def ws_connect(system):
    return connect(f"ws://127.0.0.1:{system.port}/ws", open_timeout=10)


def follow(ws, until=("complete", "error"), timeout_s=120.0) -> list[dict]:
    events = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            event = json.loads(ws.recv(timeout=deadline - time.monotonic()))
        except TimeoutError:
            break
        events.append(event)
        if event["event"] in until or event.get("status") in ("completed", "cancelled", "failed"):
            return events
    raise AssertionError(f"no {until} event: {events[-3:]}")  # pragma: no cover


def test_submit_progress_complete_download(system):
    # Enough steps that the job is still running when the WebSocket subscribes.
    job_id = system.submit(prompt="a red car drives through the city", seed=7, quality_preset="standard",
                           custom_options={"steps": 40})
    with ws_connect(system) as ws:
        ws.send(json.dumps({"action": "subscribe", "job_id": job_id}))
        events = follow(ws)
    assert events[0]["event"] == "snapshot" and events[0]["job_id"] == job_id
    assert events[-1] == {"event": "complete", "job_id": job_id, "output_url": f"/api/v1/files/{job_id}.mp4"}
    progress = [e["progress"] for e in events if "progress" in e]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert len([e for e in events if e["event"] == "progress"]) >= 4  # every step reports

    status, body = system.json("GET", f"/api/v1/status/{job_id}")
    assert status == 200
    assert {"status": "completed", "progress": 1.0, "eta": 0.0}.items() <= body.items()
    status, result = system.json("GET", f"/api/v1/result/{job_id}")
    assert status == 200 and result["status"] == "completed"
    assert result["output_url"] == f"/api/v1/files/{job_id}.mp4" and "output_path" not in result
    meta = result["metadata"]
    assert meta["model"] == "t2v-A14B" and meta["quality_preset"] == "standard" and meta["seed"] == 7
    params = meta["params"]
    shape = (params["steps"], params["width"], params["height"], params["num_frames"], params["fps"])
    assert shape == (40, 48, 32, 9, 16)
    assert params["guidance_scale"] == 4.0 and params["guidance_scale_2"] == 3.0
    assert meta["code_version"].startswith("0.1.0") and meta["timings"]["dit_high"]["seconds"] > 0

    status, headers, video = system.request("GET", result["output_url"])
    assert status == 200 and headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(video)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (48, 32)
    status, headers, part = system.request("GET", result["output_url"], headers={"Range": "bytes=10-109"})
    assert status == 206 and part == video[10:110]
    assert headers["content-range"] == f"bytes 10-109/{len(video)}"

    # ETA is measured: a second job of the same shape gets one from the first job's stage timings.
    status, body = system.json("POST", "/api/v1/generate", {"model": "t2v-A14B", "prompt": "again",
                                                            "quality": "standard", "seed": 8,
                                                            "custom_options": {"steps": 40}})
    assert status == 202 and isinstance(body["eta_seconds"], float) and body["eta_seconds"] > 0
    system.wait_final(body["job_id"])


def test_cancel_while_denoising_then_next_job_runs(system):
    job_id = system.submit(prompt="a long one", custom_options={"steps": 100, "resolution": "64x64"})
    with ws_connect(system) as ws:
        ws.send(json.dumps({"action": "subscribe", "job_id": job_id}))
        while True:
            event = json.loads(ws.recv(timeout=60))
            if event["event"] == "progress" and event.get("stage", "").startswith("dit") and event["progress"] > 0.1:
                break
        t0 = time.time()
        status, body = system.json("POST", f"/api/v1/cancel/{job_id}")
        assert status == 200 and body["status"] == "cancelled"
        events = follow(ws, until=("status",), timeout_s=10)
    assert events[-1]["status"] == "cancelled"
    # The DiT holding the job stops at its next step.
    wait_for(lambda: "stopped: the job was cancelled" in system.log("dit_high") + system.log("dit_low"), 10,
             "the DiT to stop the cancelled job")
    stop_delay = time.time() - t0
    timings_step = 5.0  # generous bound for one tiny step plus log flush on a loaded 2-core machine
    assert stop_delay < timings_step
    assert system.json("POST", f"/api/v1/cancel/{job_id}")[0] == 409  # already final
    nxt = system.submit(prompt="after the cancel")
    assert system.wait_final(nxt)["status"] == "completed"


def test_websocket_reconnect_gets_snapshot_then_the_rest(system):
    job_id = system.submit(prompt="reconnect", custom_options={"steps": 30, "resolution": "64x64"})
    with ws_connect(system) as ws:
        ws.send(json.dumps({"action": "subscribe", "job_id": job_id}))
        seen = []
        while len([e for e in seen if e["event"] == "progress"]) < 3:
            seen.append(json.loads(ws.recv(timeout=60)))
    last = max(e.get("progress", 0) for e in seen)
    with ws_connect(system) as ws:
        ws.send(json.dumps({"action": "subscribe", "job_id": job_id}))
        events = follow(ws)
    assert events[0]["event"] == "snapshot" and events[0]["progress"] >= last
    assert events[-1]["event"] == "complete"


def test_subscribe_all_and_bad_ws_messages(system):
    with ws_connect(system) as ws:
        ws.send("not json")
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "INVALID_JSON"
        ws.send(json.dumps({"action": "dance"}))
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "VALIDATION_ERROR"
        ws.send(json.dumps({"action": "subscribe", "job_id": "0" * 32}))
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "JOB_NOT_FOUND"
        ws.send(json.dumps({"action": "subscribe", "all": True}))
        job_id = system.submit(prompt="seen by all")
        events = []
        while not any(e["event"] == "complete" and e["job_id"] == job_id for e in events):
            events.append(json.loads(ws.recv(timeout=60)))
    assert any(e["job_id"] == job_id and e["event"] == "status" for e in events)


def test_listing_models_presets_health_ready(system):
    status, body = system.json("GET", "/api/v1/jobs?limit=2&status=completed")
    assert status == 200 and len(body["jobs"]) <= 2 and body["total"] >= 1
    assert all(j["status"] == "completed" for j in body["jobs"])
    page2 = system.json("GET", "/api/v1/jobs?limit=2&offset=2&status=completed")[1]
    assert not {j["job_id"] for j in page2["jobs"]} & {j["job_id"] for j in body["jobs"]}
    models = {m["id"]: m for m in system.json("GET", "/api/v1/models")[1]["models"]}
    assert models["t2v-A14B"]["served"] and models["t2v-A14B"]["ready"] and models["s2v-14B"]["served"]
    presets = system.json("GET", "/api/v1/presets")[1]["presets"]
    assert set(presets["ti2v-5B"]) == {"draft", "standard", "pro", "cinema", "ultimate"}
    assert presets["t2v-A14B"]["draft"]["steps"] < presets["t2v-A14B"]["ultimate"]["steps"]
    status, health = system.json("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    assert {name: state["running"] for name, state in health["listeners"].items()} == {"replies": True, "events": True}
    status, ready = system.json("GET", "/ready")
    assert status == 200 and ready["ready"] and all(ready["stages"].values())


BAD_REQUESTS = [
    ("malformed JSON", {"raw": b"{not json"}, 400, "INVALID_JSON"),
    ("body not an object", {"body": ["a"]}, 422, "VALIDATION_ERROR"),
    ("prompt of wrong type", {"body": {"prompt": 5, "model": "t2v"}}, 422, "VALIDATION_ERROR"),
    ("unknown model", {"body": {"prompt": "x", "model": "sora"}}, 422, "VALIDATION_ERROR"),
    ("unknown preset", {"body": {"prompt": "x", "model": "t2v", "quality": "epic"}}, 422, "VALIDATION_ERROR"),
    ("empty prompt", {"body": {"prompt": "  ", "model": "t2v"}}, 422, "VALIDATION_ERROR"),
    ("10,000-character prompt", {"body": {"prompt": "a" * 10_000, "model": "t2v"}}, 422, "VALIDATION_ERROR"),
    ("steps 0", {"body": {"prompt": "x", "model": "t2v", "custom_options": {"steps": 0}}}, 422, "VALIDATION_ERROR"),
    ("steps 10^6", {"body": {"prompt": "x", "model": "t2v", "custom_options": {"steps": 10**6}}},
     422, "VALIDATION_ERROR"),
    ("unsupported resolution", {"body": {"prompt": "x", "model": "ti2v", "custom_options": {"resolution": "48x32"}}},
     422, "VALIDATION_ERROR"),
    ("frames not 4n+1", {"body": {"prompt": "x", "model": "t2v", "custom_options": {"num_frames": 10}}},
     422, "VALIDATION_ERROR"),
    ("negative seed", {"body": {"prompt": "x", "model": "t2v", "seed": -1}}, 422, "VALIDATION_ERROR"),
    ("unknown field", {"body": {"prompt": "x", "model": "t2v", "steps": 4}}, 422, "VALIDATION_ERROR"),
]


def raw_post(system, body: bytes, chunked: bool = False) -> tuple[int, bytes]:
    """POST over a plain socket and read the answer as soon as it comes, as a client that sends
    `Expect`-less uploads sees it when the server refuses before reading the whole body."""
    import socket

    head = b"POST /api/v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {len(body)}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", system.port), timeout=30) as sock:
        sock.sendall(head)
        try:
            step = 64 << 10
            for i in range(0, len(body), step):
                part = body[i:i + step]
                sock.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking it all: read that answer
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversize_body_refused(system, chunked):
    status, content = raw_post(system, b'{"prompt": "' + b"a" * (4 << 20) + b'"}', chunked=chunked)
    body = json.loads(content)
    check_error_body("/api/v1/generate", status, body, [str(system.state_dir)])
    assert status == 413 and body["error"]["code"] == "PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize("name,kw,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_generate_requests(system, name, kw, status, code):
    got, _, content = system.request("POST", "/api/v1/generate", kw.get("body"), raw=kw.get("raw"))
    body = json.loads(content)
    assert got == status, body
    assert body["success"] is False and body["error"]["code"] == code
    assert set(body["error"]) == {"code", "message", "details"} and "Traceback" not in content.decode()


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/api/v1/status/" + "0" * 32, 404),
    ("GET", "/api/v1/status/../../etc/passwd", 404),
    ("GET", "/api/v1/result/not-a-job", 404),
    ("POST", "/api/v1/cancel/" + "f" * 32, 404),
    ("GET", "/api/v1/files/%2e%2e%2fjobs.sqlite3.mp4", 404),
    ("GET", "/api/v1/jobs?limit=0", 422),
    ("GET", "/api/v1/jobs?status=bogus", 422),
    ("GET", "/api/v1/nope", 404),
    ("DELETE", "/api/v1/generate", 405),
])
def test_bad_paths_give_structured_errors(system, method, path, status):
    got, _, content = system.request(method, path)
    assert got == status
    assert json.loads(content)["success"] is False


def test_still_serving_after_bad_requests(system):
    assert system.wait_final(system.submit(prompt="fine"))["status"] == "completed"


def test_kill_broker_with_jobs_queued_and_running(system):
    system.wait_idle()  # the shared system: nothing of an earlier test may hold a slot
    # Long jobs (the most steps admission allows), so the last of six still waits behind the four
    # in flight when the first is under way, however loaded the box.
    options = {"steps": 100, "resolution": "64x64"}
    ids = [system.submit(prompt=f"survivor {i}", custom_options=options) for i in range(6)]
    wait_for(lambda: system.json("GET", f"/api/v1/status/{ids[0]}")[1]["progress"] >= 0.1, 60,
             "the first job to be under way", interval_s=0.05)  # running, the rest queued
    assert system.json("GET", f"/api/v1/status/{ids[-1]}")[1]["status"] == "queued"
    old = system.pid("broker")
    kill9(old)
    try:
        wait_for(lambda: system.pid("broker") not in (0, old), 60, "supervisord to start the broker again",
                 interval_s=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{system.supervisorctl('status')}") from None
    finals = [system.wait_final(job_id, timeout_s=240) for job_id in ids]
    assert [f["status"] for f in finals] == ["completed"] * 6
    log = system.log("broker")
    for job_id in ids:
        assert log.count(f"job={job_id} completed:") == 1
    # The job that was running is taken up again by the new broker. Not always as a new attempt:
    # its attempt-1 results, queued in the stages while the broker was down, may complete it
    # before the new dispatch goes out (seen: attempts 1). Either way it completes once.
    assert f"job={ids[0]} was processing at attempt 1 when the broker stopped" in log


def test_kill_gateway_clients_see_the_same_state(system):
    system.wait_idle()  # jobs still running would change state while the gateway is down
    _, before = system.json("GET", "/api/v1/jobs?limit=50")
    old = system.pid("gateway")
    kill9(old)

    def listing() -> dict | None:
        try:
            status, body = system.json("GET", "/api/v1/jobs?limit=50")
        except OSError:
            return None  # not listening again yet
        return body if status == 200 else None

    after = wait_for(listing, 60, "the gateway to answer again", interval_s=0.3)
    assert system.pid("gateway") != old
    assert [(j["job_id"], j["status"]) for j in after["jobs"]] == [(j["job_id"], j["status"]) for j in before["jobs"]]
    job_id = system.submit(prompt="after the gateway came back")
    with ws_connect(system) as ws:
        ws.send(json.dumps({"action": "subscribe", "job_id": job_id}))
        assert follow(ws)[-1]["event"] == "complete"


def test_openapi_document_matches_routes(system):
    status, doc = system.json("GET", "/api/v1/openapi.json")
    # Loopback: auth off, so no operation asks for credentials (the content is checked in
    # test_catalog.py; served equals generated in test_fuzz.py).
    assert status == 200 and "security" not in doc and doc["paths"]["/health"]["get"]["security"] == []
    assert not [op for ops in doc["paths"].values() for op in ops.values() if op.get("security")]
    page = {r.path for r in studio_routes()}  # the web studio's page and files: not API routes
    routes = {r.path for r in Gateway(Config.load(environ=system.env)).app().routes if r.path != "/ws"}
    assert routes - page == set(doc["paths"])


def test_client_cli_generates_and_downloads(system, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli.mp4"
    cmd = [sys.executable, "-m", "gateway.client", "--url", system.url, "generate", "--prompt", "a cli job",
           "--model", "ti2v", "--quality", "draft", "--seed", "3", "--wait", "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout.splitlines()[0])
    assert result.stdout.splitlines()[-1] == str(out) and out.stat().st_size > 0
    assert "100.0%" in result.stderr  # the progress bar reached the end
    status = subprocess.run([sys.executable, "-m", "gateway.client", "--url", system.url, "status", job["job_id"]],
                            capture_output=True, text=True, timeout=60)
    assert json.loads(status.stdout)["status"] == "completed"
    bad = subprocess.run([sys.executable, "-m", "gateway.client", "--url", system.url, "cancel", "0" * 32],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "JOB_NOT_FOUND" in bad.stderr

