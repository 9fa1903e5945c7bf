"""API keys, per-user isolation, per-key limits, fair turns and result serving, through the running system."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from common.config import Config
from common.errors import ConfigError
from gateway.auth import auth_required
from gateway.keys import KeyStore
from tests.helpers import (
    KEYED_ORIGINS,
    ROOT,
    System,
    free_port,
    keyed_view,
    short_tmpdir,
    stack_env,
    wait_for,
)

ORIGIN = KEYED_ORIGINS[0]  # allowed by the keyed system


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_keys(s: System) -> None:
    # The admin key came through the CLI (tests/conftest.py); these go straight in the store.
    store = KeyStore(s.state_dir / "keys.sqlite3")
    try:
        # name, rate_per_minute, max_active_jobs
        for name, rate, active in [("alice", None, None), ("bob", None, None), ("slow", 3, None),
                                   ("busy", None, 2), ("revoked", None, None)]:
            s.tokens[name] = store.create(s.key_prefix + name, rate_per_minute=rate, max_active_jobs=active)[1]
    finally:
        store.close()
    s.key_tokens.extend(v for k, v in s.tokens.items() if k != "admin")  # no error body may hold any of them


@pytest.fixture(scope="module")
def system(keyed_system):
    """The session's keyed system: ORIGIN allowed, one job in the pipeline at a time (so the order
    jobs are dispatched in shows); the admin key in `headers` (wait_ready / wait_final see every job)."""
    view = keyed_view(keyed_system, "auth-")
    make_keys(view)
    return view


def as_user(system, name, method, path, body=None, headers=None, **kw):
    return system.request(method, path, body, headers={**bearer(system.tokens[name]), **(headers or {})}, **kw)


def ws_as(system, token=None, **kw):
    headers = bearer(token) if token else {}
    return connect(f"ws://127.0.0.1:{system.port}/ws", open_timeout=10, additional_headers=headers, **kw)


def submit_as(system, name, **request) -> str:
    status, _, content = as_user(system, name, "POST", "/api/v1/generate",
                                 {"model": "t2v", "quality_preset": "draft", "prompt": f"{name}'s job", **request})
    assert status == 202, content
    return json.loads(content)["job_id"]


def test_auth_modes():
    env = {"WAN_SERVER__RUNTIME__STATE_DIR": "/tmp/unused"}
    config = Config.load(environ=env)
    assert not auth_required(config, "127.0.0.1") and not auth_required(config, "::1")
    assert auth_required(config, "0.0.0.0") and auth_required(config, "192.168.1.20")
    assert auth_required(Config.load(environ={**env, "WAN_SERVER__GATEWAY__AUTH": "required"}), "127.0.0.1")
    assert not auth_required(Config.load(environ={**env, "WAN_SERVER__GATEWAY__AUTH": "off"}), "localhost")
    with pytest.raises(ConfigError, match="refusing"):
        auth_required(Config.load(environ={**env, "WAN_SERVER__GATEWAY__AUTH": "off"}), "0.0.0.0")
    with pytest.raises(ConfigError):
        auth_required(Config.load(environ={**env, "WAN_SERVER__GATEWAY__AUTH": "maybe"}), "127.0.0.1")


def test_gateway_on_all_interfaces_requires_keys_and_refuses_auth_off(tmp_path):
    state = short_tmpdir("wsg-")
    try:
        port = free_port()
        env = stack_env(state, tmp_path, WAN_SERVER__GATEWAY__HOST="0.0.0.0", WAN_SERVER__GATEWAY__PORT=str(port))
        off = subprocess.run([sys.executable, "-m", "gateway.app"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, env={**env, "WAN_SERVER__GATEWAY__AUTH": "off"})
        assert off.returncode == 2 and "refusing to serve 0.0.0.0" in off.stderr
        proc = subprocess.Popen([sys.executable, "-m", "gateway.app"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            probe = System.__new__(System)
            probe.url, probe.headers, probe.state_dir, probe.key_tokens = f"http://127.0.0.1:{port}", {}, state, []

            def health() -> dict | None:
                try:
                    return probe.json("GET", "/health")[1]
                except OSError:
                    return None  # not listening yet

            assert wait_for(health, 60, "the gateway to listen", interval_s=0.2)["status"] == "ok"
            status, headers, content = probe.request("GET", "/api/v1/models")
            assert status == 401 and json.loads(content)["error"]["code"] == "UNAUTHORIZED"
            assert headers["www-authenticate"].startswith("Bearer")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_keys_are_stored_hashed_listed_without_tokens_and_revocable(system):
    token = system.tokens["revoked"]
    secret = token.split("_", 2)[2]
    assert len(secret) == 43  # 32 random bytes
    store_bytes = b"".join(p.read_bytes() for p in system.state_dir.glob("keys.sqlite3*"))
    assert secret.encode() not in store_bytes and token.encode() not in store_bytes
    listed = subprocess.run([sys.executable, "-m", "gateway.keys", "list"], cwd=ROOT, env=system.env,
                            capture_output=True, text=True, timeout=60, check=True).stdout
    keys = {k["name"]: k for k in json.loads(listed)}
    p = system.key_prefix
    assert keys["admin"]["admin"] and not keys[p + "alice"]["admin"] and keys[p + "slow"]["rate_per_minute"] == 3
    assert all(t not in listed for t in system.tokens.values()) and "salt" not in listed and "digest" not in listed
    assert as_user(system, "revoked", "GET", "/api/v1/jobs")[0] == 200
    subprocess.run([sys.executable, "-m", "gateway.keys", "revoke", p + "revoked"], cwd=ROOT, env=system.env,
                   capture_output=True, timeout=60, check=True)
    status, _, content = as_user(system, "revoked", "GET", "/api/v1/jobs")  # at once, no restart
    assert status == 401 and json.loads(content)["error"]["code"] == "UNAUTHORIZED"


ROUTES = [
    ("POST", "/api/v1/generate"), ("GET", "/api/v1/status/" + "a" * 32), ("GET", "/api/v1/result/" + "a" * 32),
    ("POST", "/api/v1/cancel/" + "a" * 32), ("GET", "/api/v1/files/" + "a" * 32 + ".mp4"), ("GET", "/api/v1/jobs"),
    ("GET", "/api/v1/models"), ("GET", "/api/v1/presets"), ("GET", "/api/v1/openapi.json"), ("GET", "/ready"),
    ("GET", "/api/v1/files/../../etc/passwd"), ("GET", "/metrics"),
]


def test_every_route_but_health_needs_a_valid_key(system):
    token = system.tokens["alice"]
    wrong = [{}, {"Authorization": "Bearer"}, {"Authorization": "Basic YWxpY2U6eA=="},
             {"Authorization": f"Bearer {token[:-1]}x"}, {"Authorization": "Bearer wan_00000000_" + "A" * 43},
             {"Authorization": f"Bearer {token} extra"}]
    for method, path in ROUTES:
        for headers in wrong:
            status, got_headers, content = system.request(method, path, {"prompt": "x", "model": "t2v"},
                                                          headers={"Authorization": "", **headers})
            body = json.loads(content)
            assert status == 401, (method, path, headers, body)
            assert body["success"] is False and body["error"]["code"] == "UNAUTHORIZED"
            assert got_headers["www-authenticate"] == 'Bearer realm="wan-server"'
            assert token not in content.decode() and "Traceback" not in content.decode()
    assert system.request("GET", "/health", headers={"Authorization": ""})[0] == 200
    assert as_user(system, "alice", "GET", "/api/v1/models")[0] == 200

    # WebSocket: refused at the handshake, before it is accepted.
    for headers in ({}, {"Authorization": "Bearer wan_00000000_" + "A" * 43}):
        with pytest.raises(InvalidStatus) as info:
            connect(f"ws://127.0.0.1:{system.port}/ws", open_timeout=10, additional_headers=headers)
        assert info.value.response.status_code == 401
        assert json.loads(info.value.response.body)["error"]["code"] == "UNAUTHORIZED"
    with pytest.raises(InvalidStatus) as info:
        ws_as(system, token, origin="https://evil.example")
    assert info.value.response.status_code == 403
    assert json.loads(info.value.response.body)["error"]["code"] == "ORIGIN_NOT_ALLOWED"
    # A browser cannot set headers: the token as the subprotocol pair, from an allowed origin.
    with connect(f"ws://127.0.0.1:{system.port}/ws", open_timeout=10, origin=ORIGIN,
                 subprotocols=["wan.bearer", token]) as ws:
        assert ws.subprotocol == "wan.bearer"
        ws.send(json.dumps({"action": "subscribe", "job_id": "0" * 32}))
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "JOB_NOT_FOUND"
    # Plain HTTP from a foreign page is refused too (with auth off this is what stops it).
    status, _, content = as_user(system, "alice", "GET", "/api/v1/jobs", headers={"Origin": "https://evil.example"})
    assert status == 403 and json.loads(content)["error"]["code"] == "ORIGIN_NOT_ALLOWED"


def test_metrics_need_an_admin_key(system):
    """The numbers cover every user's jobs: a user's key is refused with the structured 403, an
    admin's gets the Prometheus text (without a key it is the 401 of every route, tested above)."""
    status, _, content = as_user(system, "alice", "GET", "/metrics")
    body = json.loads(content)
    assert status == 403 and body["success"] is False and body["error"]["code"] == "FORBIDDEN", body
    status, headers, content = as_user(system, "admin", "GET", "/metrics")
    assert status == 200 and headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    names = {f.name for f in text_string_to_metric_families(content.decode())}
    assert {"wan_jobs", "wan_stage_up", "wan_queue_depth", "wan_websocket_subscribers"} <= names
    assert not any(t in content.decode() for t in system.tokens.values())
    status, _, content = system.request("GET", "/metrics", headers={"Authorization": ""})
    assert status == 401 and json.loads(content)["error"]["code"] == "UNAUTHORIZED"


def without_id(content: bytes, job_id: str, other: str) -> dict:
    return json.loads(content.decode().replace(job_id, other))


def subscribe_all(ws) -> None:
    """Subscribe `ws` to every job its key may see, and return once the gateway has taken that in:
    it handles a connection's messages in order, so its answer to a probe sent next (an unknown job)
    comes after. Snapshots of jobs already active, sent before that answer, are dropped."""
    probe = "d" * 32
    ws.send(json.dumps({"action": "subscribe", "all": True}))
    ws.send(json.dumps({"action": "subscribe", "job_id": probe}))
    while True:
        event = json.loads(ws.recv(timeout=30))
        if event.get("event") == "error" and event.get("job_id") == probe:
            assert event["error"]["code"] == "JOB_NOT_FOUND", event
            return


def test_users_see_only_their_own_jobs_on_every_route(system):
    with ws_as(system, system.tokens["bob"]) as bob_ws, ws_as(system, system.tokens["admin"]) as admin_ws:
        subscribe_all(bob_ws)  # both subscriptions are in place before the jobs are submitted
        subscribe_all(admin_ws)
        job = submit_as(system, "alice", seed=1)
        bobs = submit_as(system, "bob", seed=2)
        assert system.wait_final(job)["status"] == "completed"
        assert system.wait_final(bobs)["status"] == "completed"
        bob_events = []
        while not any(e.get("event") == "complete" and e.get("job_id") == bobs for e in bob_events):
            bob_events.append(json.loads(bob_ws.recv(timeout=30)))
        admin_events = []
        while {job, bobs} - {e.get("job_id") for e in admin_events if e.get("event") == "complete"}:
            admin_events.append(json.loads(admin_ws.recv(timeout=30)))
    assert all(e.get("job_id") == bobs for e in bob_events), bob_events
    assert job not in {e.get("job_id") for e in bob_events}

    missing = "e" * 32
    for method, path in [("GET", "/api/v1/status/{}"), ("GET", "/api/v1/result/{}"), ("POST", "/api/v1/cancel/{}"),
                         ("GET", "/api/v1/files/{}.mp4"), ("HEAD", "/api/v1/files/{}.mp4")]:
        status, _, content = as_user(system, "bob", method, path.format(job))
        status_missing, _, content_missing = as_user(system, "bob", method, path.format(missing))
        assert status == status_missing == 404, (method, path, content)
        if method != "HEAD":
            assert json.loads(content)["error"]["code"] == "JOB_NOT_FOUND"
            assert without_id(content, job, missing) == json.loads(content_missing)  # the same body
        assert as_user(system, "alice", method if method != "POST" else "GET",
                       path.format(job).replace("cancel", "status"))[0] == 200
    listed = json.loads(as_user(system, "bob", "GET", "/api/v1/jobs?limit=100")[2])
    assert job not in {j["job_id"] for j in listed["jobs"]} and bobs in {j["job_id"] for j in listed["jobs"]}
    assert {j["job_id"] for j in json.loads(as_user(system, "alice", "GET", "/api/v1/jobs?limit=100")[2])["jobs"]} \
        == {job}
    with ws_as(system, system.tokens["bob"]) as ws:
        ws.send(json.dumps({"action": "subscribe", "job_id": job}))
        error = json.loads(ws.recv(timeout=10))
    assert error["error"]["code"] == "JOB_NOT_FOUND" and error["job_id"] == job
    # The admin sees, downloads and lists everyone's jobs.
    status, headers, video = as_user(system, "admin", "GET", f"/api/v1/files/{job}.mp4")
    assert status == 200 and headers["content-type"] == "video/mp4" and len(video) > 0
    assert as_user(system, "alice", "GET", f"/api/v1/files/{job}.mp4")[2] == video
    admin_page = json.loads(as_user(system, "admin", "GET", "/api/v1/jobs?limit=100")[2])
    admin_listed = {j["job_id"] for j in admin_page["jobs"]}
    assert {job, bobs} <= admin_listed
    # A user cannot cancel another's job; the owner can (it is already final: 409, not 404).
    assert as_user(system, "alice", "POST", f"/api/v1/cancel/{job}")[0] == 409


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
def test_openai_api_uses_the_same_keys_and_isolation(system):
    import openai

    from tests.error_bodies import check_openai_error

    def sdk(token):
        return openai.OpenAI(base_url=f"{system.url}/v1", api_key=token, max_retries=0, timeout=30)

    alice, bob = sdk(system.tokens["alice"]), sdk(system.tokens["bob"])
    video = alice.videos.create(model="t2v", prompt="alice's video", extra_body={"quality_preset": "draft"})
    key = {"Idempotency-Key": "shared-key"}  # keys are per user: the same key is bob's own
    bobs = bob.videos.create(model="t2v", prompt="alice's video", extra_body={"quality_preset": "draft"},
                             extra_headers=key)
    assert bobs.id != video.id
    assert alice.videos.create(model="t2v", prompt="alice's video", extra_body={"quality_preset": "draft"},
                               extra_headers=key).id not in (video.id, bobs.id)
    for call in (lambda: bob.videos.retrieve(video.id), lambda: bob.videos.delete(video.id),
                 lambda: bob.videos.download_content(video.id)):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.response.json()["error"]["code"] == "job_not_found"
    assert video.id not in {v.id for v in bob.videos.list(limit=100).data}
    assert video.id in {v.id for v in alice.videos.list(limit=100).data}
    assert bobs.id not in {v.id for v in alice.videos.list(limit=100).data}
    with pytest.raises(openai.AuthenticationError) as info:
        sdk("wan_nobody_0123456789").videos.list()
    check_openai_error("401 from /v1/videos", info.value.response.json(), system.key_tokens)
    assert info.value.response.headers["www-authenticate"].startswith("Bearer")
    status, _, content = system.request("GET", "/v1/videos", headers={"Authorization": ""})  # no key: shape checked
    assert status == 401 and json.loads(content)["error"]["type"] == "authentication_error"
    for client in (alice, bob):
        for v in client.videos.list(limit=100).data:
            if v.prompt == "alice's video":
                assert client.videos.delete(v.id).deleted is True


def test_rate_limit_per_key(system):
    codes = [as_user(system, "slow", "GET", "/api/v1/jobs") for _ in range(4)]
    assert [c[0] for c in codes[:3]] == [200, 200, 200]
    status, headers, content = codes[3]
    body = json.loads(content)
    assert status == 429 and body["error"]["code"] == "RATE_LIMITED"
    assert 1 <= int(headers["retry-after"]) <= 20  # 3 a minute: one more in 20 s
    assert as_user(system, "alice", "GET", "/api/v1/jobs")[0] == 200  # other keys are not affected
    with pytest.raises(InvalidStatus) as info:
        ws_as(system, system.tokens["slow"])
    assert info.value.response.status_code == 429


def test_active_jobs_per_key(system):
    long = {"custom_options": {"steps": 100, "resolution": "64x64"}}
    first, second = submit_as(system, "busy", **long), submit_as(system, "busy", **long)
    status, headers, content = as_user(system, "busy", "POST", "/api/v1/generate",
                                       {"model": "t2v", "prompt": "one too many", "quality": "draft"})
    body = json.loads(content)
    assert status == 429 and body["error"]["code"] == "TOO_MANY_ACTIVE_JOBS" and "retry-after" in headers
    assert body["error"]["details"]["max_active_jobs"] == 2
    assert as_user(system, "busy", "POST", f"/api/v1/cancel/{first}")[0] == 200
    third = submit_as(system, "busy", **long)  # a cancelled job frees its place
    for job_id in (second, third):
        assert as_user(system, "busy", "POST", f"/api/v1/cancel/{job_id}")[0] == 200


def test_one_users_batch_does_not_starve_another_users_job(system):
    batch = [submit_as(system, "alice", seed=i) for i in range(5)]
    single = submit_as(system, "bob", seed=9)
    position = json.loads(as_user(system, "bob", "GET", f"/api/v1/status/{single}")[2])["queue_position"]
    assert position == 1  # alice's first job is in the pipeline; bob's goes next
    started = {}
    for job_id in [*batch, single]:
        assert system.wait_final(job_id, timeout_s=240)["status"] == "completed"
        started[job_id] = system.json("GET", f"/api/v1/result/{job_id}")[1]["metadata"]["started_at"]
    order = sorted(started, key=started.get)
    assert order.index(single) <= 1, [("bob" if j == single else "alice") for j in order]


def test_results_are_served_by_job_id_only(system):
    job = submit_as(system, "alice", seed=3)
    assert system.wait_final(job)["status"] == "completed"
    results = system.state_dir / "results"
    secret = system.state_dir / "secret.txt"
    secret.write_text("top secret, outside the results folder")
    probes = [
        "/api/v1/files/../../etc/passwd", "/api/v1/files/..%2f..%2fetc%2fpasswd.mp4",
        "/api/v1/files/%2e%2e%2f%2e%2e%2fsecret.txt", "/api/v1/files/%2e%2e/keys.sqlite3.mp4",
        "/api/v1/files//etc/passwd.mp4", f"/api/v1/files/{secret}", "/api/v1/files/%2Fetc%2Fpasswd.mp4",
        f"/api/v1/files/{job}.mp4/../../secret.txt", f"/api/v1/files/{job}%2f..%2f..%2fsecret.txt.mp4",
        "/api/v1/files/..%5c..%5csecret.txt.mp4",
    ]
    for path in probes:
        status, _, content = as_user(system, "alice", "GET", path)
        assert status == 404, (path, status)
        body = json.loads(content)
        assert body["success"] is False and str(system.state_dir) not in content.decode(), (path, body)
        assert b"top secret" not in content and b"root:" not in content
    # A symlink (or anything but a regular file) planted under a job's name is not served.
    video = results / f"{job}.mp4"
    assert as_user(system, "alice", "GET", f"/api/v1/files/{job}.mp4")[0] == 200
    video.unlink()
    os.symlink(secret, video)
    status, _, content = as_user(system, "alice", "GET", f"/api/v1/files/{job}.mp4")
    assert status == 404 and json.loads(content)["error"]["code"] == "RESULT_NOT_AVAILABLE"
    assert b"top secret" not in content and str(results) not in content.decode()
    video.unlink()
    os.mkfifo(video)
    status, _, content = as_user(system, "alice", "GET", f"/api/v1/files/{job}.mp4")
    assert status == 404 and json.loads(content)["error"]["code"] == "RESULT_NOT_AVAILABLE"
    video.unlink()


def test_client_sends_the_key(system, tmp_path):
    from gateway.client import ApiError, Client

    client = Client(system.url, api_key=system.tokens["bob"])
    job = client.generate("through the client", model="t2v", quality_preset="draft")
    assert client.wait(job["job_id"], timeout_s=120)["status"] == "completed"  # WebSocket with the key
    assert client.download(job["job_id"], tmp_path / "bob.mp4").stat().st_size > 0
    with pytest.raises(ApiError) as info:
        Client(system.url).jobs()
    assert info.value.status == 401 and info.value.code == "UNAUTHORIZED"
    env = {**os.environ, "WAN_SERVER_API_KEY": system.tokens["bob"]}
    cli = subprocess.run([sys.executable, "-m", "gateway.client", "--url", system.url, "status", job["job_id"]],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and json.loads(cli.stdout)["status"] == "completed", cli.stderr


def test_another_users_preview_is_404(system):
    """Live previews have the video's owner check (the previews themselves: tests/test_previews.py)."""
    job_id = submit_as(system, "alice")
    assert system.wait_final(job_id)["status"] == "completed"
    status, _, content = as_user(system, "alice", "GET", f"/api/v1/status/{job_id}")
    url = json.loads(content)["preview_url"]
    assert status == 200 and url.startswith(f"/api/v1/previews/{job_id}/")
    status, headers, content = as_user(system, "alice", "GET", url)
    assert status == 200 and headers["content-type"] == "image/jpeg" and content[:2] == b"\xff\xd8"
    assert as_user(system, "admin", "GET", url)[0] == 200
    status, _, content = as_user(system, "bob", "GET", url)
    assert status == 404 and json.loads(content)["error"]["code"] == "JOB_NOT_FOUND"


def test_logs_never_print_keys(system):
    """Runs last in this module: after every request above, no log holds a token or its secret."""
    logs = {p.name: p.read_text(errors="replace") for p in system.log_dir.glob("*.log*")}
    assert "gateway.log" in logs and "broker.log" in logs
    for name, text in logs.items():
        for token in system.tokens.values():
            assert token not in text and token.split("_", 2)[2] not in text, name
    assert "unknown or revoked API key" in logs["gateway.log"]  # refusals are logged, without the key
    store = KeyStore(system.state_dir / "keys.sqlite3")
    try:
        alice = next(k for k in store.list() if k.name == system.key_prefix + "alice")
    finally:
        store.close()
    assert f"for key {alice.id}" in logs["broker.log"]  # jobs are logged with their owner's key id
