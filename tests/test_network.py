"""The broker process's own sockets under hostile input, and CURVE for cross-host deployments.

Real processes and real sockets: the broker runs as `python -m broker.broker` (no stages needed);
malformed, oversize and wrongly-typed messages go straight to its ROUTER (the gateway's side) and
its reports PULL (the stages' side); it logs and drops each and keeps answering. CURVE: a keys
folder made by the CLI, endpoints on tcp://127.0.0.1; a peer without the keys, or with keys that
are not authorized, never gets a message through.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid

import pytest
import zmq

from common import messages as m
from common.config import Config
from common.curve import CurveKeys
from common.errors import ConfigError
from common.sockets import SocketOptions, check_endpoint, make_socket, stop_authenticators
from common.wire import Limits
from tests.helpers import ROOT, bad_messages, free_port, short_tmpdir, stack_env, wait_for

LIMITS = Limits()
SMALL_LIMITS = {
    "WAN_SERVER__LIMITS__MAX_MESSAGE_BYTES": str(1 << 20),
    "WAN_SERVER__LIMITS__MAX_HEADER_BYTES": str(64 << 10),
    "WAN_SERVER__LIMITS__MAX_FRAMES": "16",
}


class BrokerProcess:
    def __init__(self, **extra_env: str):
        self.state = short_tmpdir("wsn-")
        self.env = stack_env(self.state, self.state / "models", **SMALL_LIMITS, **extra_env)
        self.config = Config.load(environ=self.env)
        self.log_path = self.state / "broker.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "broker.broker"], cwd=ROOT, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.state, ignore_errors=True)


def call(sock: zmq.Socket, op: str, timeout_ms: int = 10_000, **args) -> m.ApiReply | None:
    """One request over a DEALER; the reply, or None if none came in time."""
    request_id = uuid.uuid4().hex
    sock.send_multipart(m.encode(m.ApiRequest(request_id=request_id, op=op, args=args)))
    deadline = time.monotonic() + timeout_ms / 1000
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000)):
            return None
        reply = m.decode(sock.recv_multipart(), LIMITS)
        if isinstance(reply, m.ApiReply) and reply.request_id == request_id:
            return reply
    return None


@pytest.fixture(scope="module")
def broker():
    proc = BrokerProcess()
    try:
        dealer = make_socket(zmq.Context.instance(), zmq.DEALER, proc.config.endpoint("broker"), bind=False)
        wait_for(lambda: "broker up" in proc.log(), 60, "the broker to start")
        proc.dealer = dealer
        yield proc
        dealer.close(0)
    finally:
        proc.stop()


def test_broker_drops_malformed_requests_and_keeps_answering(broker):
    limits = broker.config.limits
    cases = bad_messages(limits)
    cases["empty message"] = [b""]
    cases["a report sent as a request"] = m.encode(m.Heartbeat(stage="x", pid=1, ready=True))
    cases["request with an unknown op"] = m.encode(m.ApiRequest(request_id="r", op="rm -rf", args={}))
    sock = make_socket(zmq.Context.instance(), zmq.DEALER, broker.config.endpoint("broker"), bind=False,
                       options=SocketOptions(send_timeout_ms=5000))
    replies = []
    for name, parts in cases.items():
        sock.send_multipart(parts)
        if sock.poll(5000):
            reply = m.decode(sock.recv_multipart(), LIMITS)
            replies.append((name, reply))
    # Each malformed request is answered with a structured 4xx (or dropped), never a 5xx.
    for name, reply in replies:
        assert not reply.ok and 400 <= reply.http_status < 500, (name, reply)
        assert set(reply.error) == {"code", "message", "details"}
    assert len(replies) >= len(cases) - 1, [n for n, _ in replies]
    # A message over the socket's size limit: ZeroMQ drops that connection; the broker stays up.
    big = make_socket(zmq.Context.instance(), zmq.DEALER, broker.config.endpoint("broker"), bind=False)
    big.send_multipart([b"\0" * (limits.max_message_bytes + 1)])
    big.close(linger=2000)
    sock.close(0)
    reply = call(broker.dealer, "models")
    assert reply is not None and reply.ok and "t2v-A14B" in str(reply.result)
    assert broker.proc.poll() is None
    assert "dropped a bad request" in broker.log()
    assert "Traceback" not in broker.log()


def test_broker_drops_malformed_reports_and_keeps_answering(broker):
    limits = broker.config.limits
    cases = bad_messages(limits)
    # Well-formed messages of the wrong kind for this socket, and reports for jobs that do not exist.
    cases["a request sent as a report"] = m.encode(m.ApiRequest(request_id="r", op="submit", args={}))
    cases["report for an unknown job"] = m.encode(m.StageReport(job_id="f" * 32, attempt=1, stage="vae",
                                                                event="accepted"))
    cases["done for an unknown job"] = m.encode(m.JobDone(job_id="e" * 32, attempt=1, path="/etc/passwd",
                                                          num_frames=1, width=16, height=16, fps=16))
    before = broker.log().count("dropped a bad report")
    push = make_socket(zmq.Context.instance(), zmq.PUSH, broker.config.endpoint("reports"), bind=False,
                       options=SocketOptions(send_timeout_ms=5000))
    for parts in cases.values():
        push.send_multipart(parts)
    push.close(linger=5000)
    wait_for(lambda: broker.log().count("dropped a bad report") - before >= len(bad_messages(limits)), 30,
             "the broker to drop every malformed report")
    reply = call(broker.dealer, "list", status=None, limit=10, offset=0)
    assert reply is not None and reply.ok and reply.result["total"] == 0  # nothing was made up from reports
    assert broker.proc.poll() is None and "Traceback" not in broker.log()


# ---- CURVE ----

def make_keys(tmp_path):
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "common.curve", "init", str(keys)], cwd=ROOT, check=True,
                   capture_output=True, timeout=60)
    return keys


def delivered(pull: zmq.Socket, push: zmq.Socket, payload: bytes, timeout_ms: int = 1500) -> bool:
    push.send(payload)
    if not pull.poll(timeout_ms):
        return False
    return pull.recv() == payload


def test_curve_admits_only_authorized_peers(tmp_path):
    keys_dir = make_keys(tmp_path)
    subprocess.run([sys.executable, "-m", "common.curve", "add-client", str(keys_dir), "worker2"], cwd=ROOT,
                   check=True, capture_output=True, timeout=60)
    keys = CurveKeys.load(keys_dir)
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pull = make_socket(ctx, zmq.PULL, endpoint, bind=True, curve=keys)
    plain_ctx = zmq.Context()  # a peer with no keys at all
    try:
        good = make_socket(ctx, zmq.PUSH, endpoint, bind=False, curve=keys,
                           options=SocketOptions(immediate=False, linger_ms=0))
        assert delivered(pull, good, b"hello over curve", timeout_ms=5000)

        plain = make_socket(plain_ctx, zmq.PUSH, endpoint, bind=False,
                            options=SocketOptions(immediate=False, linger_ms=0))
        assert not delivered(pull, plain, b"plaintext")

        # A peer that knows the server's public key but holds a keypair nobody authorized.
        make_mallory = "import zmq.auth, sys; zmq.auth.create_certificates(sys.argv[1], 'mallory')"
        subprocess.run([sys.executable, "-c", make_mallory, str(tmp_path)], check=True, timeout=30)
        public, secret = zmq.auth.load_certificate(tmp_path / "mallory.key_secret")
        stranger = CurveKeys(keys.server_public, None, public, secret, keys.authorized_dir)
        rogue = make_socket(plain_ctx, zmq.PUSH, endpoint, bind=False, curve=stranger,
                            options=SocketOptions(immediate=False, linger_ms=0))
        assert not delivered(pull, rogue, b"unauthorized keys")

        # A second client authorized with the CLI (before the server started) gets through too.
        public2, secret2 = zmq.auth.load_certificate(keys_dir / "worker2.key_secret")
        second = CurveKeys(keys.server_public, None, public2, secret2, keys.authorized_dir)
        other = make_socket(plain_ctx, zmq.PUSH, endpoint, bind=False, curve=second,
                            options=SocketOptions(immediate=False, linger_ms=0))
        assert delivered(pull, other, b"second client", timeout_ms=5000)
        assert delivered(pull, good, b"still fine", timeout_ms=5000)
    finally:
        stop_authenticators()
        plain_ctx.destroy(0)
        ctx.destroy(0)


def test_non_loopback_endpoints_need_curve_keys(tmp_path):
    with pytest.raises(ConfigError, match="CURVE"):
        check_endpoint("tcp://10.1.2.3:5555")
    keys = CurveKeys.load(make_keys(tmp_path))
    assert check_endpoint("tcp://10.1.2.3:5555", keys) == "tcp://10.1.2.3:5555"
    (tmp_path / "keys" / "client.key_secret").unlink()
    with pytest.raises(ConfigError) as info:
        Config.load(environ={"WAN_SERVER__NETWORK__CURVE_KEYS_DIR": str(tmp_path / "keys")}).curve_keys()
    assert "client.key_secret" in info.value.message


def test_broker_process_over_curve_refuses_a_peer_without_keys(tmp_path):
    keys_dir = make_keys(tmp_path)
    port = free_port()
    proc = BrokerProcess(WAN_SERVER__NETWORK__CURVE_KEYS_DIR=str(keys_dir),
                         WAN_SERVER__ENDPOINTS__BROKER=f"tcp://127.0.0.1:{port}")
    ctx = zmq.Context()
    try:
        wait_for(lambda: "broker up" in proc.log(), 60, "the broker to start")
        endpoint = proc.config.endpoint("broker")
        assert endpoint.startswith("tcp://")
        plain = make_socket(ctx, zmq.DEALER, endpoint, bind=False, options=SocketOptions(immediate=False, linger_ms=0))
        assert call(plain, "models", timeout_ms=1500) is None
        keyed = make_socket(ctx, zmq.DEALER, endpoint, bind=False, curve=CurveKeys.load(keys_dir),
                            options=SocketOptions(immediate=False, linger_ms=0))
        reply = call(keyed, "models")
        assert reply is not None and reply.ok
        # It shuts down cleanly with its ZAP handler running.
        proc.proc.terminate()
        assert proc.proc.wait(timeout=20) == 0
    finally:
        ctx.destroy(0)
        proc.stop()

