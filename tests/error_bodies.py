"""What every error body a client receives must look like; the suite's HTTP helpers call
`check_error_body` on each >= 400 JSON response they get.

The shape is `{"success": false, "error": {"code", "message", "details"}}` (on /v1, OpenAI's
`{"error": {"message", "type", "code", "param"}}`), and nothing in it may
hold what a client has no business seeing: a path under the system's state folder (the spool,
results and key files live there), anything under /tmp/, a traceback, an exception's repr, or an
API key's token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

# Bodies of these paths are status reports, not errors: /ready says which stages are down with
# 503, /health which broker listeners are.
STATUS_PATHS = ("/ready", "/health")
LEAKS = ("/tmp/", "Traceback", 'File "')
EXCEPTION_REPR = re.compile(r"\b[A-Z]\w*(Error|Exception)\(")


def strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def check_error_body(path: str, status: int, body: Any, forbidden: Iterable[str] = ()) -> None:
    """Assert that `body`, received with `status` from `path`, is a well-formed error that leaks
    nothing; `forbidden` adds the strings of this system that must not appear (its state folder,
    its API key tokens)."""
    if status < 400 or path.split("?")[0] in STATUS_PATHS:
        return
    where = f"{status} from {path[:120]}"
    if path == "/v1" or path.startswith("/v1/"):
        check_openai_error(where, body, forbidden)
        return
    assert isinstance(body, dict) and set(body) == {"success", "error"}, f"{where}: not an error body: {body!r:.300}"
    assert body["success"] is False, f"{where}: success is not false"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"code", "message", "details"}, f"{where}: {error!r:.300}"
    assert isinstance(error["code"], str) and re.fullmatch(r"[A-Z][A-Z0-9_]*", error["code"]), f"{where}: {error}"
    assert isinstance(error["message"], str) and isinstance(error["details"], dict), f"{where}: {error!r:.300}"
    check_leaks(where, error, forbidden)


def check_openai_error(where: str, body: Any, forbidden: Iterable[str] = ()) -> None:
    """The /v1 routes' errors: the OpenAI shape `{"error": {"message", "type", "code", "param"}}`,
    leaking nothing either."""
    assert isinstance(body, dict) and set(body) == {"error"}, f"{where}: not an OpenAI error body: {body!r:.300}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "code", "param"}, f"{where}: {error!r:.300}"
    assert isinstance(error["message"], str) and isinstance(error["type"], str), f"{where}: {error!r:.300}"
    assert isinstance(error["code"], str) and re.fullmatch(r"[a-z][a-z0-9_]*", error["code"]), f"{where}: {error}"
    assert error["param"] is None or isinstance(error["param"], str), f"{where}: {error!r:.300}"
    check_leaks(where, error, forbidden)


def check_leaks(where: str, error: Any, forbidden: Iterable[str] = ()) -> None:
    secrets = [s for s in forbidden if s]
    for text in strings(error):
        for leak in (*LEAKS, *secrets):
            assert leak not in text, f"{where}: the error holds {leak!r}: {text!r:.300}"
        assert not EXCEPTION_REPR.search(text), f"{where}: the error holds an exception repr: {text!r:.300}"


def check_error_response(path: str, status: int, headers: dict[str, str], content: bytes,
                         forbidden: Iterable[str] = ()) -> None:
    """`check_error_body` for a raw HTTP response; bodies that are not JSON (uvicorn's own 400 for a
    request it cannot parse) are not ours to check."""
    ctype = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
    if status < 400 or not ctype.startswith("application/json") or not content:  # HEAD has no body
        return
    check_error_body(path, status, json.loads(content), forbidden)


def tokens_in(headers: dict[str, str]) -> list[str]:
    """The bearer token a request carried, if any (a key's token must never come back)."""
    value = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return [token.strip()] if scheme.lower() == "bearer" and len(token.strip()) >= 8 else []
