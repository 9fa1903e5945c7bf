"""Webhooks (broker/webhooks.py): signatures as the Standard Webhooks spec defines them, checked with
an implementation written here from the spec and against the spec's published example; the URL guard
(hosts, private / loopback / link-local addresses, no redirects, HTTPS to the checked address); the
outbox the store fills; and, with a real HTTP receiver on loopback and the whole system under
supervisord (keys required), deliveries of real tiny jobs: completed, signed with a key's own
secret, retried after 500s, cancelled, and delivered after the broker is killed with SIGKILL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import shutil
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from broker import webhooks
from broker.store import JobStore, Outbox
from common.config import WebhooksSection
from common.errors import ConfigError, ValidationError, WebhookNotAllowed
from tests.helpers import ROOT, WEBHOOK_SECRET, System, keyed_view, kill9, wait_for

SECRET = WEBHOOK_SECRET  # the keyed system signs with it (tests/conftest.py)
LOOPBACK = WebhooksSection(secret=SECRET, allowed_hosts=("127.0.0.1",), timeout_s=5.0, retry_window_s=60.0,
                           backoff_initial_s=0.2, backoff_max_s=1.0)


# ---- an independent verifier, written from the spec ----

def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: float = 300) -> Any:
    """The spec's check: HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}` with the base64
    key after `whsec_`; one of the space-separated `v1,<base64>` signatures must match; the timestamp
    is integer seconds near now. Returns the parsed body."""
    assert secret.startswith("whsec_")
    key = base64.b64decode(secret[len("whsec_"):])
    msg_id, stamp, signatures = headers["webhook-id"], headers["webhook-timestamp"], headers["webhook-signature"]
    assert re.fullmatch(r"[0-9]+", stamp) and abs(time.time() - int(stamp)) <= tolerance_s, stamp
    assert "." not in msg_id
    mac = hmac.new(key, msg_id.encode() + b"." + stamp.encode() + b"." + body, hashlib.sha256).digest()
    expected = base64.b64encode(mac)
    found = False
    for entry in signatures.split(" "):
        version, _, value = entry.partition(",")
        found |= version == "v1" and hmac.compare_digest(base64.b64decode(value), base64.b64decode(expected))
    assert found, f"no v1 signature matches: {signatures}"
    return json.loads(body)


# ---- signing ----

def test_the_specs_published_example_signs_to_its_published_signature():
    # The example of the Standard Webhooks reference libraries' test suite (a secret, id, time, body -> signature).
    key = webhooks.decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = webhooks.sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_headers_verify_with_an_independent_implementation():
    key = webhooks.decode_secret(SECRET)
    body = b'{"type":"video.completed","data":{"job_id":"x"}}'
    now = int(time.time())
    sent = webhooks.headers(key, "msg_abc", now, body)
    assert sent["webhook-id"] == "msg_abc" and sent["webhook-timestamp"] == str(now)
    assert sent["content-type"] == "application/json"
    assert verify(SECRET, sent, body)["data"]["job_id"] == "x"
    with pytest.raises(AssertionError):
        verify(SECRET, sent, body + b" ")  # one byte more and it no longer verifies
    with pytest.raises(AssertionError):
        verify(SECRET, {**sent, "webhook-id": "msg_abd"}, body)
    other = "whsec_" + base64.b64encode(b"another secret of twenty-four+").decode()
    with pytest.raises(AssertionError):
        verify(other, sent, body)


@pytest.mark.parametrize("secret", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!",
                                    "whsec_" + base64.b64encode(b"too short").decode(),
                                    "whsec_" + base64.b64encode(b"x" * 65).decode()])
def test_a_secret_not_in_the_specs_form_stops_the_broker(secret):
    with pytest.raises(ConfigError) as info:
        webhooks.Guard(replace(LOOPBACK, secret=secret))
    assert info.value.details["key"] == "secret" and secret not in info.value.message


# ---- the URL guard ----

def guard(*allowed: str, secret: str | None = SECRET) -> webhooks.Guard:
    return webhooks.Guard(replace(LOOPBACK, secret=secret, allowed_hosts=allowed))


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://127.8.0.1:8080/hook", "http://10.0.0.5/h", "http://172.16.3.4/h",
    "http://192.168.1.1/h", "http://169.254.169.254/latest/meta-data", "http://100.64.0.1/h", "http://0.0.0.0/h",
    "http://[::1]/h", "http://[fe80::1]/h", "http://[fc00::1]/h", "http://[::ffff:127.0.0.1]/h",
    "http://224.0.0.1/h",
])
def test_private_loopback_and_link_local_addresses_are_refused_even_with_any_host_allowed(url):
    with pytest.raises(WebhookNotAllowed) as info:
        guard("*").check_url(url)
    body = info.value.to_dict()
    assert info.value.http_status == 422 and body["error"]["code"] == "WEBHOOK_NOT_ALLOWED"
    assert body["error"]["details"]["field"] == "webhook_url"


@pytest.mark.parametrize("allowed,url,ok", [
    (("*",), "https://93.184.216.34/h", True),
    (("*",), "https://hooks.example.com/h?token=1", True),
    (("*.example.com",), "https://hooks.example.com/h", True),
    (("*.example.com",), "https://example.com/h", False),
    (("*.example.com",), "https://evil-example.com/h", False),
    (("hooks.example.com",), "https://HOOKS.example.com:8443/h", True),
    (("hooks.example.com",), "https://other.example.com/h", False),
    (("hooks.example.com",), "https://93.184.216.34/h", False),  # an address needs an address entry (or "*")
    (("127.0.0.1",), "http://127.0.0.1:9/h", True),
    (("127.0.0.1",), "http://127.0.0.2/h", False),
    (("10.0.0.0/8",), "http://10.2.3.4/h", True),
    (("::1",), "http://[::1]:8/h", True),
])
def test_only_hosts_the_config_lists_are_allowed(allowed, url, ok):
    g = guard(*allowed)
    if ok:
        assert g.check_url(url) == url
    else:
        with pytest.raises(WebhookNotAllowed):
            g.check_url(url)


def test_without_a_secret_or_an_allowed_host_every_webhook_is_refused():
    for g in (guard("*", secret=None), guard()):
        assert g.check_url(None) is None
        with pytest.raises(WebhookNotAllowed, match="not enabled"):
            g.check_url("https://hooks.example.com/h")


@pytest.mark.parametrize("value", [123, "ftp://127.0.0.1/h", "http://user:pw@127.0.0.1/h", "http:///h", "http://",
                                   "127.0.0.1/h", "http://127.0.0.1/a b", "http://127.0.0.1:99999/h",
                                   "http://127.0.0.1/" + "x" * 2100])
def test_a_malformed_webhook_url_is_a_validation_error(value):
    with pytest.raises(ValidationError) as info:
        guard("*", "127.0.0.1").check_url(value)
    assert info.value.details["field"] == "webhook_url" and info.value.http_status == 422


def test_a_bad_allowed_hosts_entry_stops_the_broker():
    with pytest.raises(ConfigError) as info:
        guard("hooks example.com")
    assert info.value.details["key"] == "allowed_hosts"


def test_every_address_a_name_resolves_to_is_checked():
    """`localhost` is a name the config may list; the addresses it resolves to (loopback) still need
    their own entries, so a listed name that resolves into the private network is not called."""
    target = webhooks.parse_url("http://localhost:9/h")
    with pytest.raises(WebhookNotAllowed, match="resolves to"):
        guard("localhost").resolve(target)
    addresses = guard("localhost", "127.0.0.0/8", "::1").resolve(target)
    assert addresses and all(a.is_loopback for a in addresses)


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "127.1"])
def test_a_loopback_address_in_another_spelling_is_caught_when_resolved(host):
    """Not an address to the URL parser (so a name, admitted by "*" at submit), but the resolver
    reads it as 127.0.0.1: the check of the resolved addresses refuses it."""
    g = guard("*")
    target = webhooks.parse_url(f"http://{host}:9/h")
    assert target.literal() is None and g.check_url(f"http://{host}:9/h")
    with pytest.raises(WebhookNotAllowed, match="resolves to"):
        g.resolve(target)


# ---- a real HTTP receiver on loopback ----

@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered
    at: float


class Receiver:
    """An HTTP server on 127.0.0.1 that records every request; each path answers the statuses of its
    script in turn (the last one repeats), or 200."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.scripts: dict[str, list[int]] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = receiver.answer(self.path, self.headers, body)
                self.send_response(status)
                if status in (301, 302, 307, 308):
                    self.send_header("Location", f"http://127.0.0.1:{receiver.port}/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, path: str, headers: Any, body: bytes) -> int:
        with self.lock:
            script = self.scripts.get(path, [200])
            status = script.pop(0) if len(script) > 1 else script[0]
            self.received.append(Received(path, {k.lower(): v for k, v in headers.items()}, body, status,
                                          time.time()))
            return status

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_the_connection_goes_to_the_checked_address_and_no_redirect_is_followed(receiver):
    """post() connects to the address it is given (the URL's name is never looked up again, so DNS
    cannot switch it), sends the name as Host, and hands back a 3xx without following it."""
    receiver.scripts["/redirect"] = [302]
    target = replace(webhooks.parse_url(receiver.url("/redirect")), host="receiver.invalid")
    address = webhooks.ipaddress.ip_address("127.0.0.1")
    status = webhooks.post(target, address, {"webhook-id": "msg_r"}, b"{}", timeout_s=5)
    assert status == 302
    (got,) = receiver.at("/redirect")
    assert got.headers["host"] == f"receiver.invalid:{receiver.port}" and got.body == b"{}"
    assert receiver.at("/elsewhere") == []  # post() has returned: it made no other request


@pytest.fixture(scope="module")
def tls_receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Receiver, Path]]:
    """A Receiver behind TLS with a self-signed certificate for the name receiver.test (and its file)."""
    # Debian's openssl makes the certificate; without it this test fails rather than skips.
    assert shutil.which("openssl") is not None, "the openssl command is needed to make a certificate"
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=receiver.test",
                    "-addext", "subjectAltName=DNS:receiver.test"], check=True, capture_output=True, timeout=60)
    r = Receiver()
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    r.server.socket = server_side.wrap_socket(r.server.socket, server_side=True)
    yield r, cert
    r.close()


def test_https_goes_to_the_checked_address_and_checks_the_certificate_for_the_urls_host(tls_receiver):
    receiver, cert = tls_receiver
    trusting = ssl.create_default_context(cafile=str(cert))
    address = webhooks.ipaddress.ip_address("127.0.0.1")
    target = webhooks.Target("https", "receiver.test", receiver.port, "/tls")
    assert webhooks.post(target, address, {}, b"{}", timeout_s=5, context=trusting) == 200
    (got,) = receiver.at("/tls")
    assert got.headers["host"] == f"receiver.test:{receiver.port}"
    with pytest.raises(ssl.SSLCertVerificationError):  # the certificate is for receiver.test, not this name
        webhooks.post(replace(target, host="other.test"), address, {}, b"{}", timeout_s=5, context=trusting)
    with pytest.raises(ssl.SSLCertVerificationError):  # and the system's CAs do not know it
        webhooks.post(target, address, {}, b"{}", timeout_s=5)
    assert len(receiver.at("/tls")) == 1


# ---- the outbox and one attempt at a time, in this process ----

@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    s = JobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def final_job(store: JobStore, job_id: str, url: str | None, status: str, **kw: Any) -> None:
    store.add(job_id, "", "t2v-A14B", "draft", {}, ["text_encoder"], 0, webhook_url=url)
    assert store.finish(job_id, status, **kw)


def test_the_final_transition_writes_the_outbox_row_once(store):
    error = {"code": "GPU_OUT_OF_MEMORY", "message": "out of memory", "details": {}}
    final_job(store, "j1", "http://127.0.0.1:9/h", "failed", error=error)
    final_job(store, "j2", None, "completed")
    assert not store.finish("j1", "cancelled")  # final already: no second row, no change
    outbox = Outbox(store.path)
    try:
        d = outbox.get("j1")
        assert d is not None and outbox.get("j2") is None
        assert (d.id, d.status, d.state, d.attempts, d.error) == ("msg_j1", "failed", "pending", 0, error)
        body = json.loads(webhooks.payload(d))
        assert body["type"] == "video.failed" and body["timestamp"].endswith("Z")
        assert body["data"] == {"job_id": "j1", "status": "failed", "model": "t2v-A14B", "error": error}
        assert webhooks.payload(d) == webhooks.payload(outbox.get("j1"))  # the same bytes on every attempt
    finally:
        outbox.close()


def test_an_attempt_is_retried_with_backoff_then_given_up_after_the_window(store, receiver):
    outcomes: list[str] = []
    section = replace(LOOPBACK, retry_window_s=1.5, backoff_initial_s=1.0, backoff_max_s=10.0)
    deliveries = webhooks.Deliveries(section, store.path, on_outcome=outcomes.append)
    receiver.scripts["/down"] = [500]
    final_job(store, "j3", receiver.url("/down"), "completed")
    outbox = Outbox(store.path)
    try:
        first = outbox.get("j3")
        assert first is not None
        deliveries.attempt(outbox, first)
        second = outbox.get("j3")
        assert second is not None and (second.state, second.attempts, second.last_status) == ("pending", 1, 500)
        assert 0.7 <= second.next_at - time.time() <= 1.2  # backoff_initial_s, +-20 % jitter
        deliveries.attempt(outbox, second)  # its next wait (2 s, doubled) would end past the 1.5 s window
        last = outbox.get("j3")
        assert last is not None and (last.state, last.attempts) == ("expired", 2)
        assert outcomes == ["failed", "expired"]
        assert len(receiver.at("/down")) == 2
    finally:
        outbox.close()


def test_a_redirect_is_a_failed_attempt_and_410_stops_the_deliveries(store, receiver):
    deliveries = webhooks.Deliveries(LOOPBACK, store.path)
    receiver.scripts["/moved"] = [302]
    receiver.scripts["/gone"] = [410]
    final_job(store, "j4", receiver.url("/moved"), "completed")
    final_job(store, "j5", receiver.url("/gone"), "completed")
    outbox = Outbox(store.path)
    try:
        for job_id in ("j4", "j5"):
            d = outbox.get(job_id)
            assert d is not None
            deliveries.attempt(outbox, d)
        moved, gone = outbox.get("j4"), outbox.get("j5")
        assert moved is not None and (moved.state, moved.last_status) == ("pending", 302)
        assert gone is not None and (gone.state, gone.last_status) == ("refused", 410)
        assert receiver.at("/elsewhere") == []
    finally:
        outbox.close()


# ---- the whole system: real tiny jobs, a real receiver ----

def make_keys(system: System) -> None:
    """A user key with its own webhook secret."""
    out = subprocess.run([sys.executable, "-m", "gateway.keys", "create", "hooks-own", "--webhook-secret", "--json"],
                         cwd=ROOT, env=system.env, capture_output=True, text=True, timeout=60, check=True).stdout
    created = json.loads(out)
    system.tokens["own"], system.tokens["own-secret"] = created["token"], created["webhook_secret"]
    system.key_tokens += [created["token"], created["webhook_secret"]]


@pytest.fixture(scope="module")
def system(keyed_system: System) -> System:
    """The session's keyed system (webhooks on: WEBHOOK_SECRET, loopback allowed, short backoff),
    with this module's admin and user keys."""
    view = keyed_view(keyed_system, "hooks-")
    make_keys(view)
    return view


def outbox_row(system: System, job_id: str) -> dict[str, Any] | None:
    db = sqlite3.connect(f"file:{system.state_dir / 'jobs.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM webhook_outbox WHERE job_id = ?", (job_id,)).fetchone()
        return dict(row) if row else None
    finally:
        db.close()


def delivered(receiver: Receiver, path: str, timeout_s: float = 60) -> list[Received]:
    """Every request to `path`, once one of them was answered 2xx."""
    def answered() -> list[Received] | None:
        got = receiver.at(path)
        return got if got and got[-1].status == 200 else None

    return wait_for(answered, timeout_s, f"a webhook answered 200 at {path}")


def test_a_completed_job_posts_a_signed_video_completed(system, receiver):
    job_id = system.submit(prompt="a webhook cat", webhook_url=receiver.url("/done"))
    assert system.wait_final(job_id)["status"] == "completed"
    (got,) = delivered(receiver, "/done")
    body = verify(SECRET, got.headers, got.body)
    assert got.headers["webhook-id"] == f"msg_{job_id}" and got.headers["content-type"] == "application/json"
    assert body["type"] == "video.completed"
    assert body["data"] == {"job_id": job_id, "status": "completed", "model": "t2v-A14B",
                            "output_url": f"/api/v1/files/{job_id}.mp4", "result_url": f"/api/v1/result/{job_id}"}
    status, _, video = system.request("GET", body["data"]["output_url"])
    assert status == 200 and video[4:8] == b"ftyp"
    assert SECRET not in got.body.decode() and SECRET[6:] not in got.body.decode()
    row = wait_for(lambda: (r := outbox_row(system, job_id)) and r["state"] == "delivered" and r, 10,
                   "the delivery marked done")
    assert (row["attempts"], row["last_status"]) == (1, 200)
    metrics = system.request("GET", "/metrics")[2].decode()
    assert re.search(r'^wan_webhook_deliveries_total\{outcome="delivered"\} [1-9]', metrics, re.MULTILINE), metrics
    assert "127.0.0.1" not in metrics and job_id not in metrics


def test_a_key_with_its_own_webhook_secret_gets_its_jobs_signed_with_it(system, receiver):
    own = {"Authorization": f"Bearer {system.tokens['own']}"}
    status, body = system.json("POST", "/api/v1/generate", {"prompt": "my own secret", "model": "t2v",
                               "quality_preset": "draft", "webhook_url": receiver.url("/own")}, headers=own)
    assert status == 202, body
    (got,) = delivered(receiver, "/own")
    payload = verify(system.tokens["own-secret"], got.headers, got.body)
    assert payload["data"]["job_id"] == body["job_id"] and payload["type"] == "video.completed"
    with pytest.raises(AssertionError, match="no v1 signature"):
        verify(SECRET, got.headers, got.body)  # not the server's secret
    assert system.tokens["own-secret"] not in got.body.decode()
    listed = subprocess.run([sys.executable, "-m", "gateway.keys", "list"], cwd=ROOT, env=system.env,
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert "hooks-own" in listed and system.tokens["own-secret"] not in listed  # shown once, at create


def test_a_bad_webhook_url_is_refused_at_submit_and_nothing_is_stored(system, receiver):
    before = system.json("GET", "/api/v1/jobs?limit=1")[1]["total"]
    cases = {"http://10.1.2.3/h": "WEBHOOK_NOT_ALLOWED", "http://169.254.169.254/latest": "WEBHOOK_NOT_ALLOWED",
             "https://hooks.example.com/h": "WEBHOOK_NOT_ALLOWED", "ftp://127.0.0.1/h": "VALIDATION_ERROR",
             "http://user:pw@127.0.0.1/h": "VALIDATION_ERROR"}
    for url, code in cases.items():
        status, body = system.json("POST", "/api/v1/generate",
                                   {"prompt": "x", "model": "t2v", "quality_preset": "draft", "webhook_url": url})
        assert status == 422 and body["error"]["code"] == code, (url, body)
        assert body["error"]["details"]["field"] == "webhook_url"
        assert "pw" not in json.dumps(body)
    assert system.json("GET", "/api/v1/jobs?limit=1")[1]["total"] == before


def test_a_receiver_answering_500_gets_the_same_webhook_again_until_it_answers_200(system, receiver):
    receiver.scripts["/flaky"] = [500, 500, 200]
    job_id = system.submit(prompt="a flaky receiver", webhook_url=receiver.url("/flaky"))
    assert system.wait_final(job_id)["status"] == "completed"
    got = delivered(receiver, "/flaky")
    assert [r.status for r in got] == [500, 500, 200]
    assert {r.headers["webhook-id"] for r in got} == {f"msg_{job_id}"} and len({r.body for r in got}) == 1
    for r in got:
        verify(SECRET, r.headers, r.body)  # each attempt signed with its own timestamp
    gaps = [b.at - a.at for a, b in zip(got, got[1:], strict=False)]
    assert gaps[0] >= 0.2 and gaps[1] >= gaps[0] * 1.2, gaps  # 0.3 s, then 0.6 s (+-20 %): it backs off
    row = wait_for(lambda: (r := outbox_row(system, job_id)) and r["state"] == "delivered" and r, 10,
                   "the delivery marked done")
    assert (row["attempts"], row["last_status"]) == (3, 200)
    result = system.json("GET", f"/api/v1/result/{job_id}")[1]
    assert result["metadata"]["webhook"] == {"state": "delivered", "attempts": 3, "last_status": 200}
    assert receiver.url("/flaky") not in json.dumps(result)  # the URL (it may hold a token) is not shown


def test_a_cancelled_job_posts_video_cancelled(system, receiver):
    job_id = system.submit(prompt="cancelled at once", webhook_url=receiver.url("/cancelled"),
                           custom_options={"steps": 100, "resolution": "64x64"})
    status, body = system.json("POST", f"/api/v1/cancel/{job_id}")
    assert status == 200 and body["status"] == "cancelled"
    (got,) = delivered(receiver, "/cancelled")
    payload = verify(SECRET, got.headers, got.body)
    assert payload["type"] == "video.cancelled"
    assert payload["data"]["status"] == "cancelled" and payload["data"]["error"]["code"] == "JOB_CANCELLED"
    assert "output_url" not in payload["data"]


def test_a_delivery_pending_when_the_broker_is_killed_is_sent_by_the_next_broker(system, receiver):
    receiver.scripts["/after-kill"] = [500]  # until the broker has been killed and started again
    job_id = system.submit(prompt="survives a kill", webhook_url=receiver.url("/after-kill"))
    assert system.wait_final(job_id)["status"] == "completed"
    wait_for(lambda: receiver.at("/after-kill"), 30, "a first (failed) attempt")
    old = system.pid("broker")
    kill9(old)
    wait_for(lambda: system.pid("broker") not in (0, old), 60, "supervisord to start the broker again", interval_s=0.2)
    restarted_at = time.time()
    receiver.scripts["/after-kill"] = [200]
    got = delivered(receiver, "/after-kill")
    assert got[-1].at >= restarted_at and all(r.status == 500 for r in got[:-1])
    assert {r.headers["webhook-id"] for r in got} == {f"msg_{job_id}"}
    verify(SECRET, got[-1].headers, got[-1].body)
    row = wait_for(lambda: (r := outbox_row(system, job_id)) and r["state"] == "delivered" and r, 10,
                   "the delivery marked done")
    assert row["attempts"] >= 2 and row["last_status"] == 200


def test_the_readmes_verification_example_accepts_our_signature_and_refuses_a_forgery():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Webhooks"):readme.index("### API keys and users")]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # the example exactly as a reader copies it
    body = b'{"type":"video.completed"}'
    sent = webhooks.headers(webhooks.decode_secret(SECRET), "msg_readme", int(time.time()), body)
    assert namespace["verify"](SECRET, sent, body) == {"type": "video.completed"}
    with pytest.raises(ValueError):
        namespace["verify"](SECRET, sent, body.replace(b"completed", b"failed"))
