"""Schema-driven fuzzing of every HTTP route of the running system (schemathesis + hypothesis).

schemathesis reads our OpenAPI document (the one the live gateway serves; its request schemas are
generated from common/catalog.py, so they carry admission's real bounds) and sends generated
requests, valid and invalid by the schema, to every operation; each response must not be a 5xx, must have a status
code and content type the document declares, and a body that matches the declared schema. Invalid
requests must be refused (4xx). The number of examples is bounded so the suite stays fast; the
queue is kept small so valid submissions do not pile work onto the CPU stages.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from websockets.sync.client import connect

from gateway.openapi import openapi_document
from tests.helpers import running_system

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def system(model_cache):
    with running_system("wsz-", model_cache, WAN_SERVER__ADMISSION__MAX_QUEUED="3") as s:
        status, served = s.json("GET", "/api/v1/openapi.json")
        # The fuzzer is built from the document at import; it must be the one this gateway serves.
        assert status == 200 and served == json.loads(json.dumps(DOCUMENT))
        yield s


# The document the gateway serves on loopback with auth off, as here (the fixture checks it is).
DOCUMENT = openapi_document(auth=False)
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)


def operations() -> dict[str, Any]:
    ops = {}
    for result in SCHEMA.get_all_operations():
        assert isinstance(result, Ok), result  # an operation schemathesis cannot read: fix the document
        ops[result.ok().label] = result.ok()
    return ops


OPERATIONS = operations()
# Invalid cases exist only where the schema constrains something: a body, or query parameters
# (a string path parameter admits every string, so there is nothing to make invalid).
CONSTRAINED = [label for label, op in OPERATIONS.items()
               if op.definition.raw.get("requestBody")
               or any(p["in"] == "query" for p in op.definition.raw.get("parameters", []))]
CASES = [(label, GenerationMode.POSITIVE) for label in sorted(OPERATIONS)] + \
        [(label, GenerationMode.NEGATIVE) for label in sorted(CONSTRAINED)]


@pytest.mark.parametrize("label,mode", CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_every_route_answers_by_its_schema(system, label, mode):
    strategy = OPERATIONS[label].as_strategy(generation_mode=mode)

    @given(case=strategy)
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def run(case):
        case.call_and_validate(base_url=system.url, checks=CHECKS, timeout=30)

    run()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
WS_MESSAGE = (
    st.fixed_dictionaries({"action": st.sampled_from(["subscribe", "unsubscribe", "ping", ""]) | st.text(max_size=10)},
                          optional={"job_id": JSON | st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
                                    "all": JSON})
    | JSON
)
FRAME = WS_MESSAGE.map(lambda v: ("json", v)) | st.text(max_size=50).map(lambda t: ("text", t)) \
    | st.binary(max_size=50).map(lambda b: ("bytes", b))


def test_websocket_survives_arbitrary_messages(system):
    """Whatever a client sends, the socket stays open and keeps answering in order."""
    probe_id = "0" * 32  # a well-formed id no job has: the answer is a JOB_NOT_FOUND error event

    @given(frames=st.lists(FRAME, min_size=1, max_size=6))
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def run(frames):
        with connect(f"ws://127.0.0.1:{system.port}/ws", open_timeout=10) as ws:
            for kind, value in frames:
                ws.send(json.dumps(value) if kind == "json" else value)
            ws.send(json.dumps({"action": "subscribe", "job_id": probe_id}))
            deadline = time.monotonic() + 20
            while True:
                event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
                if event.get("job_id") == probe_id and event["event"] == "error":
                    assert event["error"]["code"] == "JOB_NOT_FOUND"
                    break
                assert event["event"] in ("error", "snapshot", "status", "progress", "complete"), event

    run()


def test_system_still_serves_after_fuzzing(system):
    for status in ("queued", "processing"):  # make room: what the fuzzer queued is not the point here
        for job in system.json("GET", f"/api/v1/jobs?status={status}&limit=100")[1]["jobs"]:
            system.request("POST", f"/api/v1/cancel/{job['job_id']}")
    job_id = system.submit(prompt="after the fuzz")
    assert system.wait_final(job_id, timeout_s=180)["status"] in ("completed",)
