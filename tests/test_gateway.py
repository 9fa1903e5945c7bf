"""The gateway against a real broker process, without stages: what needs no model runs in seconds.

Jobs submitted here stay queued (no stage is up), so queued, cancelled and many jobs are cheap.
One gateway runs as its own process (as supervisord runs it); one runs in this process, where a
test can break its broker sockets under it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from common.config import Config
from gateway.app import TOO_SLOW, Gateway
from tests.error_bodies import check_error_body
from tests.helpers import ROOT, free_port, short_tmpdir, stack_env, stop_process, wait_for

QUEUE_SIZE = 8  # events a WebSocket client may have unsent before it is dropped
PAGE_SIZE = 2  # jobs per broker `list` call of the subscribe-all snapshot


class Http:
    def __init__(self, port: int, state_dir: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.state_dir = state_dir

    def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, json.loads(exc.read())
            check_error_body(path, status, payload, forbidden=[str(self.state_dir)])
            return status, payload

    def health(self) -> tuple[int, Any] | None:
        try:
            return self.json("GET", "/health")
        except OSError:
            return None

    def submit(self) -> str:
        status, body = self.json("POST", "/api/v1/generate",
                                 {"model": "t2v", "prompt": "a cat", "quality_preset": "draft"})
        assert status == 202, body
        return body["job_id"]

    def cancel(self, job_id: str) -> None:
        status, body = self.json("POST", f"/api/v1/cancel/{job_id}")
        assert status == 200 and body["status"] == "cancelled", body

    def ws(self, **kw: Any) -> ClientConnection:
        return connect(f"ws://127.0.0.1:{self.port}/ws", open_timeout=10, **kw)


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, str]]:
    state = short_tmpdir("wsg-")
    env = stack_env(state, state / "models", PYTHONPATH=str(ROOT),
                    WAN_SERVER__GATEWAY__WS_QUEUE_SIZE=str(QUEUE_SIZE),
                    WAN_SERVER__GATEWAY__SNAPSHOT_PAGE_SIZE=str(PAGE_SIZE),
                    WAN_SERVER__GATEWAY__WS_CLOSE_TIMEOUT_S="60",
                    # Long enough that a test sees a dead listener reported before it is back.
                    WAN_SERVER__GATEWAY__LISTENER_RESTART_S="2")
    yield env
    shutil.rmtree(state, ignore_errors=True)


def spawn(env: dict[str, str], module: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def broker(env) -> Iterator[subprocess.Popen[bytes]]:
    proc = spawn(env, "broker.broker", Path(env["WAN_SERVER__RUNTIME__STATE_DIR"]) / "log" / "broker.log")
    yield proc
    stop_process(proc)


@pytest.fixture(scope="module")
def gateway(env, broker) -> Iterator[tuple[Http, subprocess.Popen[bytes]]]:
    port = free_port()
    state = Path(env["WAN_SERVER__RUNTIME__STATE_DIR"])
    proc = spawn({**env, "WAN_SERVER__GATEWAY__PORT": str(port)}, "gateway.app", state / "log" / "gateway.log")
    http = Http(port, state)
    try:
        wait_for(lambda: (http.health() or (0,))[0] == 200, 60, "the gateway's /health", interval_s=0.05)
        # The broker is up once it answers a list.
        wait_for(lambda: http.json("GET", "/api/v1/jobs")[0] == 200, 60, "the broker", interval_s=0.2)
        yield http, proc
    finally:
        stop_process(proc)


def test_gateway_does_not_load_torch(gateway):
    out = subprocess.run([sys.executable, "-c", "import gateway.app, sys; print('torch' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "False"
    _, proc = gateway
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "site-packages/torch" not in maps


def test_a_key_offered_in_the_subprotocol_is_accepted_with_auth_off(gateway):
    """A client that always sends its key (as `wan.bearer` subprotocol) must still connect to a
    loopback gateway with auth off: strict clients such as Node's `ws` fail a handshake that accepts
    none of the subprotocols they offered."""
    http, _ = gateway
    with http.ws(subprotocols=["wan.bearer", "wk_any-token"]) as ws:
        assert ws.subprotocol == "wan.bearer"
        ws.send(json.dumps({"action": "subscribe", "all": True}))
    with http.ws() as ws:
        assert ws.subprotocol is None


def test_slow_websocket_client_is_dropped_with_a_reason(gateway):
    """A client that stops reading fills its event queue: it gets a close frame with the reason, the
    handler does not crash, and other clients and the gateway go on."""
    http, proc = gateway
    other = http.ws()
    # A client that truly stops reading: a small kernel receive buffer, and the client library
    # stops reading the socket once one message is buffered.
    sock = socket.create_connection(("127.0.0.1", http.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # Each unknown action is answered with an error event, which it does not read.
    limit, sent, closed = 40_000, 0, None
    with connect(f"ws://127.0.0.1:{http.port}/ws", sock=sock, open_timeout=10, max_queue=1) as slow:
        try:
            while sent < limit:
                slow.send('{"action": "nothing"}')
                sent += 1
            while True:  # read what it was sent, up to the close frame
                slow.recv(timeout=30)
        except ConnectionClosed as exc:
            closed = exc
    assert closed is not None and closed.rcvd is not None, f"no close frame after {sent} messages sent"
    assert (closed.rcvd.code, closed.rcvd.reason) == (1008, TOO_SLOW)
    # The other client is still served, and so is HTTP, by the same process.
    with other:
        other.send('{"action": "nothing"}')
        error = json.loads(other.recv(timeout=10))["error"]
        assert error["code"] == "VALIDATION_ERROR"
        check_error_body("/ws", 422, {"success": False, "error": error})
    assert proc.poll() is None and http.json("GET", "/health")[0] == 200


def test_subscribe_all_snapshots_every_active_job(gateway: tuple[Http, subprocess.Popen[bytes]]) -> None:
    """Active jobs older than 100 newer finished ones are in the snapshot (it used to list the
    newest 100 jobs of any status); with PAGE_SIZE 2 the snapshot also takes several pages."""
    http, _ = gateway
    active = {http.submit() for _ in range(3)}  # stay queued: no stage is up
    for _ in range(101):
        http.cancel(http.submit())
    with http.ws() as ws:
        ws.send(json.dumps({"action": "subscribe", "all": True}))
        snapshot: set[str] = set()
        try:
            while True:
                event = json.loads(ws.recv(timeout=5))
                if event["event"] == "snapshot":
                    snapshot.add(event["job_id"])
                    if active <= snapshot:
                        break
        except TimeoutError:
            pass
    assert active <= snapshot, f"missing from the snapshot: {sorted(active - snapshot)}"
    for job_id in active:
        http.cancel(job_id)


# ---- a gateway in this process: its broker listeners can be broken under it ----


class InProcessGateway:
    def __init__(self, env: dict[str, str]):
        self.port = free_port()
        self.gateway = Gateway(Config.load(environ={**env, "WAN_SERVER__GATEWAY__PORT": str(self.port)}))
        self.server = uvicorn.Server(uvicorn.Config(self.gateway.app(), host="127.0.0.1", port=self.port,
                                                    log_level="warning", ws="websockets-sansio"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True)

    def start(self) -> InProcessGateway:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def close_socket(self, name: str) -> None:
        """Close a listener's socket on the gateway's own loop, as a failing socket would end its task."""
        def close() -> None:
            broker = self.gateway.broker
            assert broker is not None
            (broker.send_to_broker if name == "replies" else broker.recv_events).close(0)
        self.loop.call_soon_threadsafe(close)


def test_dead_broker_listeners_are_reported_and_restarted(env, broker):
    inproc = InProcessGateway(env).start()
    http = Http(inproc.port, Path(env["WAN_SERVER__RUNTIME__STATE_DIR"]))
    try:
        status, body = wait_for(http.health, 30, "/health", interval_s=0.05)
        assert status == 200 and body["status"] == "ok"
        assert body["listeners"] == {"replies": {"running": True, "restarts": 0},
                                     "events": {"running": True, "restarts": 0}}
        inproc.close_socket("events")
        inproc.close_socket("replies")
        status, body = wait_for(lambda: (h := http.health()) and h[0] == 503 and h, 10, "/health degraded")
        assert body["status"] == "degraded"
        assert body["listeners"]["events"]["running"] is False and body["listeners"]["replies"]["running"] is False
        status, body = wait_for(lambda: (h := http.health()) and h[0] == 200 and h, 30, "/health ok again")
        assert body["listeners"]["events"]["restarts"] == 1 and body["listeners"]["replies"]["restarts"] == 1
        # Replies flow (the submit is answered) and events flow (its queued event reaches a subscriber).
        with http.ws() as ws:
            ws.send(json.dumps({"action": "subscribe", "all": True}))
            job_id = http.submit()
            deadline = time.monotonic() + 30
            while True:
                event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
                if event["event"] == "status" and event["job_id"] == job_id:
                    break
            http.cancel(job_id)
            while not (event["job_id"] == job_id and event.get("status") == "cancelled"):
                event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
    finally:
        inproc.stop()


def test_an_unexpected_500_is_structured_and_readable_by_an_allowed_origin(env):
    """An exception no handler takes (here a broken broker client under /health) gives the structured
    500 with no exception text, and it passes through the CORS layer like any answer."""
    origin = "http://studio.example"
    inproc = InProcessGateway({**env, "WAN_SERVER__GATEWAY__ALLOWED_ORIGINS": f'["{origin}"]'}).start()
    try:
        url = f"http://127.0.0.1:{inproc.port}/health"
        wait_for(lambda: inproc.gateway.broker is not None and inproc.server.started, 30, "gateway up", interval_s=0.05)

        def broken() -> dict[str, Any]:
            raise RuntimeError("secret internals /tmp/x")

        assert inproc.gateway.broker is not None
        inproc.gateway.broker.listener_state = broken
        request = urllib.request.Request(url, headers={"Origin": origin})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 500
        assert caught.value.headers["Access-Control-Allow-Origin"] == origin
        body = json.loads(caught.value.read())
        assert body["success"] is False and body["error"]["code"] == "INTERNAL_ERROR"
        assert set(body["error"]) == {"code", "message", "details"} and "secret" not in json.dumps(body)
    finally:
        inproc.stop()


# ---- error bodies: the check the suite applies, and what the gateway builds ----


@pytest.mark.parametrize("body", [
    {"error": {"code": "X", "message": "m", "details": {}}},  # no success
    {"success": False, "error": {"code": "X", "message": "m"}},  # no details
    {"success": False, "error": {"code": "X", "message": "cannot open /tmp/wsa-1/spool/j/image.png", "details": {}}},
    {"success": False, "error": {"code": "X", "message": "m", "details": {"why": "ValueError('bad')"}}},
    {"success": False, "error": {"code": "X", "message": "Traceback (most recent call last):", "details": {}}},
    {"success": False, "error": {"code": "X", "message": "m", "details": {"key": "wk_secret-token"}}},
])
def test_error_body_check_refuses_bad_shapes_and_leaks(body):
    with pytest.raises(AssertionError):
        check_error_body("/api/v1/generate", 400, body, forbidden=["wk_secret-token"])
    check_error_body("/ready", 503, body)  # status reports are not errors


def test_image_and_json_errors_hold_no_library_text():
    import io

    from PIL import Image

    from common.errors import InvalidImage, InvalidJson, ServerError
    from gateway.app import parse_json
    from gateway.uploads import UploadLimits, check_image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(out, "PNG")
    with pytest.raises(InvalidImage) as truncated:
        check_image(out.getvalue()[:-40], "image/png", UploadLimits())
    with pytest.raises(InvalidJson) as bad_json:
        parse_json(b'{"prompt": ')
    for err in (truncated.value, bad_json.value):
        assert isinstance(err, ServerError) and err.__cause__ is None
        check_error_body("/api/v1/generate", err.http_status, err.to_dict())
    assert truncated.value.message == "the image/png image does not decode completely (truncated or corrupt)"
    assert bad_json.value.message == "request body is not valid JSON" and bad_json.value.details["column"] == 12
