"""Running stages sent malformed messages, or jobs that fail, log it, stay up and serve the next job."""

from __future__ import annotations

import pytest
import torch
import zmq

from broker.driver import default_params
from common import messages as m
from common.errors import JobFailedError
from common.sockets import SocketOptions, make_socket
from tests.helpers import bad_messages, wait_for


def test_stages_drop_malformed_messages_and_keep_serving(stack, driver):
    ctx = zmq.Context.instance()
    cases = bad_messages(stack.config.limits)
    before = {name: stack.log(name).count("dropped a bad message") for name in stack.config.stage_names()}
    for name in stack.config.stage_names():
        sock = make_socket(ctx, zmq.PUSH, stack.config.endpoint(name), bind=False,
                           options=SocketOptions(send_timeout_ms=5000))
        for parts in cases.values():
            sock.send_multipart(parts)
        sock.close(linger=5000)
    for name in stack.config.stage_names():
        wait_for(
            lambda name=name: stack.log(name).count("dropped a bad message") - before[name] >= len(cases),
            30,
            f"{name} to log {len(cases)} bad messages",
        )
        assert stack.alive(name)
    log = stack.log("dit_high")
    for code in ("WIRE_MALFORMED_HEADER", "WIRE_FRAME_MISMATCH", "WIRE_MESSAGE_TOO_LARGE", "WIRE_BAD_DTYPE",
                 "WIRE_BAD_SHAPE", "WIRE_UNKNOWN_TYPE", "WIRE_BAD_FIELD"):
        assert code in log
    # A frame over the socket's own size limit: ZeroMQ drops that connection; the stage stays up.
    sock = make_socket(ctx, zmq.PUSH, stack.config.endpoint("vae"), bind=False)
    sock.send_multipart([b"x", b"\0" * (stack.config.limits.max_message_bytes + 1)])
    sock.close(linger=2000)

    p = default_params(stack.config, "t2v-A14B", prompt="still serving", height=32, width=32, steps=2)
    outcome = driver.run(p, timeout_s=120)
    assert outcome.done.num_frames == p.num_frames
    assert all(stack.alive(n) for n in stack.config.stage_names())


def test_failing_job_reports_error_and_stage_keeps_serving(stack, driver):
    # 48 is not a multiple of the 32 pixels TI2V-5B's latent patches need: fails in the DiT stage.
    bad = default_params(stack.config, "ti2v-5B", prompt="bad size", height=48, width=64, steps=2)
    with pytest.raises(JobFailedError) as info:
        driver.run(bad, timeout_s=120)
    assert info.value.details["stage"] == "dit_high"
    assert info.value.details["error"]["code"] == "INVALID_REQUEST"
    assert "multiples of 32" in info.value.details["error"]["message"]

    # A model the stages do not serve: fails in the first stage, with the structured error.
    job = m.EncodeJob(job_id="unknownmodel", attempt=1, route=stack.config.route("t2v-A14B"),
                      params=m.JobParams("nope", "x", "", 0, 2, 32, 32, 9, 16, 4.0))
    sock = make_socket(zmq.Context.instance(), zmq.PUSH, stack.config.endpoint("text_encoder"), bind=False)
    sock.send_multipart(m.encode(job))
    sock.close(linger=2000)
    with pytest.raises(JobFailedError) as info:
        driver.wait("unknownmodel", timeout_s=60)
    assert info.value.details["stage"] == "text_encoder"

    good = default_params(stack.config, "ti2v-5B", prompt="after the failure", height=32, width=64, steps=2)
    assert driver.run(good, timeout_s=120).done.width == 64
    assert "Traceback" in stack.log("dit_high")  # the failure was logged with its stack


def test_library_exception_reaches_the_client_as_stage_error_and_its_text_stays_in_the_log(stack, driver):
    # Prompt embeddings 3 wide, where the tiny DiT's text projection takes more: torch raises a
    # RuntimeError naming the shapes inside diffusers.
    p = m.JobParams("t2v-A14B", "x", "", 0, 2, 32, 32, 9, 16, 1.0)
    job = m.DenoiseJob(job_id="libraryerror", attempt=1, route=stack.config.route("t2v-A14B"), params=p,
                       prompt_embeds=torch.zeros(1, 8, 3))
    sock = make_socket(zmq.Context.instance(), zmq.PUSH, stack.config.endpoint("dit_high"), bind=False)
    sock.send_multipart(m.encode(job))
    sock.close(linger=2000)
    with pytest.raises(JobFailedError) as info:
        driver.wait("libraryerror", timeout_s=60)
    assert info.value.details["stage"] == "dit_high"
    assert info.value.details["error"] == {
        "code": "STAGE_ERROR",
        "message": "stage dit_high failed while running this job",
        "details": {"stage": "dit_high", "exception": "RuntimeError"},
    }
    (line,) = [ln for ln in stack.log("dit_high").splitlines()
               if "job=libraryerror" in ln and "job failed in dit_high: RuntimeError: " in ln]
    assert "shapes" in line or "size" in line, line  # torch's own words, for the operator
