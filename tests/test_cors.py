"""CORS for `[gateway] allowed_origins`, over real HTTP to the running system with auth on: a browser
app on an allowed origin can preflight without a key and read every answer (its errors too); any
other origin gets no CORS header and the structured 403."""

from __future__ import annotations

import json

import pytest

from gateway.keys import KeyStore
from tests.helpers import KEYED_ORIGINS, System, keyed_view

ORIGIN = KEYED_ORIGINS[1]  # allowed by the keyed system
REFUSED = "http://evil.example"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_keys(s: System) -> None:
    store = KeyStore(s.state_dir / "keys.sqlite3")
    try:
        s.tokens["slow"] = store.create(s.key_prefix + "slow", rate_per_minute=1)[1]
    finally:
        store.close()
    s.key_tokens.append(s.tokens["slow"])


@pytest.fixture(scope="module")
def system(keyed_system: System) -> System:
    """The session's keyed system (ORIGIN allowed), with this module's rate-limited key."""
    view = keyed_view(keyed_system, "cors-")
    make_keys(view)
    view.headers = {}  # every test says which key, if any, it sends
    return view


def call(system: System, method: str, path: str, origin: str, body: object = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    status, got, content = system.request(method, path, body, headers={"Origin": origin, **(headers or {})})
    return status, {k.lower(): v for k, v in got.items()}, content


def listed(headers: dict[str, str], name: str) -> set[str]:
    return {v.strip().lower() for v in headers.get(name, "").split(",") if v.strip()}


def preflight(system: System, origin: str, method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    # What a browser sends before a fetch with a key and a JSON body: no Authorization (it never has one).
    return call(system, "OPTIONS", "/api/v1/generate", origin, headers={
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
    })


def cors_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("access-control-")}


def test_preflight_from_allowed_origin_needs_no_key(system: System) -> None:
    status, headers, _ = preflight(system, ORIGIN)
    assert status in (200, 204), headers
    assert headers["access-control-allow-origin"] == ORIGIN
    assert {"get", "head", "post"} <= listed(headers, "access-control-allow-methods")
    assert {"authorization", "content-type", "idempotency-key"} <= listed(headers, "access-control-allow-headers")
    assert "origin" in listed(headers, "vary")


def test_request_from_allowed_origin_can_read_the_answer(system: System) -> None:
    key = bearer(system.tokens["admin"])
    status, headers, content = call(system, "POST", "/api/v1/generate", ORIGIN,
                                    {"model": "t2v", "quality_preset": "draft", "prompt": "from the studio"}, key)
    assert status == 202, content
    assert headers["access-control-allow-origin"] == ORIGIN
    assert {"retry-after", "content-range", "idempotent-replayed"} <= listed(headers, "access-control-expose-headers")
    job_id = json.loads(content)["job_id"]
    system.headers = key
    try:
        assert system.wait_final(job_id)["status"] == "completed"
    finally:
        system.headers = {}
    # A ranged download: the Content-Range the browser may read.
    status, headers, content = call(system, "GET", f"/api/v1/files/{job_id}.mp4", ORIGIN,
                                    headers={**key, "Range": "bytes=0-9"})
    assert status == 206 and len(content) == 10
    assert headers["content-range"].startswith("bytes 0-9/")
    assert headers["access-control-allow-origin"] == ORIGIN
    assert "content-range" in listed(headers, "access-control-expose-headers")


def test_auth_errors_from_allowed_origin_carry_cors_headers(system: System) -> None:
    for key in ({}, bearer("not-a-key-at-all")):
        status, headers, content = call(system, "GET", "/api/v1/jobs", ORIGIN, headers=key)
        assert status == 401 and json.loads(content)["error"]["code"] == "UNAUTHORIZED"
        assert headers["access-control-allow-origin"] == ORIGIN
    slow = bearer(system.tokens["slow"])
    assert call(system, "GET", "/api/v1/jobs", ORIGIN, headers=slow)[0] == 200
    status, headers, content = call(system, "GET", "/api/v1/jobs", ORIGIN, headers=slow)
    assert status == 429 and json.loads(content)["error"]["code"] == "RATE_LIMITED"
    assert headers["access-control-allow-origin"] == ORIGIN
    assert int(headers["retry-after"]) >= 1 and "retry-after" in listed(headers, "access-control-expose-headers")


def test_refused_origin_gets_no_cors_headers_and_the_403(system: System) -> None:
    status, headers, content = preflight(system, REFUSED)
    assert status == 403 and json.loads(content)["error"]["code"] == "ORIGIN_NOT_ALLOWED"
    assert cors_headers(headers) == {}
    for key in ({}, bearer(system.tokens["admin"])):  # the key does not help
        status, headers, content = call(system, "GET", "/api/v1/jobs", REFUSED, headers=key)
        assert status == 403 and json.loads(content)["error"]["code"] == "ORIGIN_NOT_ALLOWED"
        assert cors_headers(headers) == {}
