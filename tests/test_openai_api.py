"""The OpenAI-style /v1/videos API, driven by the official `openai` SDK against the running tiny
system, and Idempotency-Key on both create routes (through the running system, and across a broker
restart); the in-process tests check what DELETE leaves behind when the muxer finishes late."""

from __future__ import annotations

import base64
import io
import json
import uuid

import av
import openai
import pytest
from PIL import Image

from broker.broker import Broker
from common import messages as m
from tests.error_bodies import check_openai_error
from tests.helpers import System

TINY = {"quality_preset": "draft"}  # 2 steps, 5 frames at 16 fps
# The SDK marks its video methods deprecated (OpenAI's own service ends); the protocol stays.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


@pytest.fixture(scope="module")
def system(api_system: System) -> System:
    return api_system


@pytest.fixture(scope="module")
def client(system: System) -> openai.OpenAI:
    # No retries: a test sees each answer as the server gave it.
    return openai.OpenAI(base_url=f"{system.url}/v1", api_key="unused-with-auth-off", max_retries=0, timeout=30)


def png_bytes(width: int = 48, height: int = 32) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(out, "PNG")
    return out.getvalue()


def decode_mp4(data: bytes) -> tuple[int, int, int]:
    """(frames, width, height) of an MP4, decoded for real."""
    with av.open(io.BytesIO(data), "r") as container:
        frames = list(container.decode(video=0))
    return len(frames), frames[0].width, frames[0].height


def openai_error_of(exc: openai.APIStatusError, path: str = "/v1/videos") -> dict:
    body = exc.response.json()
    check_openai_error(f"{exc.status_code} from {path}", body)
    return body["error"]


def test_create_and_poll_then_every_variant_of_the_content(system, client):
    video = client.videos.create_and_poll(model="t2v", prompt="a red fox in the snow", size="32x48",
                                          extra_body={**TINY, "seed": 7}, poll_interval_ms=100)
    assert video.status == "completed" and video.progress == 100 and video.error is None
    assert video.object == "video" and video.model == "t2v-A14B" and video.size == "32x48"
    assert video.prompt == "a red fox in the snow" and float(video.seconds) == pytest.approx(5 / 16, abs=1e-3)
    assert video.completed_at is not None and video.completed_at >= video.created_at
    again = client.videos.retrieve(video.id)
    assert again.model_dump() == video.model_dump()
    stored = system.stored_job(video.id)
    assert stored is not None and stored["params"]["seed"] == 7 and stored["preset"] == "draft"

    mp4 = client.videos.download_content(video.id).content  # variant=video is the default
    assert decode_mp4(mp4) == (5, 32, 48)
    thumb = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="thumbnail").content))
    assert thumb.format == "JPEG" and thumb.size == (32, 48)
    thumb.load()
    sheet = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="spritesheet").content))
    assert sheet.format == "JPEG" and sheet.size == (3 * 32, 2 * 48)  # 5 frames: 3 columns, 2 rows
    sheet.load()
    # A frame of the video is what the thumbnail shows (JPEG is lossy: near, not equal).
    with av.open(io.BytesIO(mp4), "r") as container:
        frames = [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(video=0)]
    import numpy as np

    diff = np.abs(np.asarray(thumb.convert("RGB")).astype(int) - frames[len(frames) // 2]).mean()
    assert diff < 12, diff

    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (video.id, "video.deleted", True)
    assert not (system.config.results_dir / f"{video.id}.mp4").exists()
    assert system.stored_job(video.id) is None
    with pytest.raises(openai.NotFoundError) as info:
        client.videos.retrieve(video.id)
    assert openai_error_of(info.value)["code"] == "job_not_found"


def test_input_reference_upload_and_deleting_a_running_job(system, client):
    # ti2v takes an optional image; the SDK sends it as the multipart file part `input_reference`.
    video = client.videos.create(model="ti2v", prompt="the picture comes alive", extra_body=TINY,
                                 input_reference=("ref.png", png_bytes(), "image/png"))
    assert video.status in ("queued", "in_progress")
    stored = system.stored_job(video.id)
    assert stored is not None and len(stored["params"]["image_sha256"] or "") == 64
    # Deleting a job that has not finished cancels it and removes its files.
    assert client.videos.delete(video.id).deleted is True
    assert system.stored_job(video.id) is None
    assert not system.config.job_spool(video.id).exists()
    with pytest.raises(openai.NotFoundError):
        client.videos.delete(video.id)
    # Older SDKs send JSON: the image as a data: URL (or {"image_url": ...}); file ids and web URLs are refused.
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    status, made = system.json("POST", "/v1/videos", {"model": "ti2v", "prompt": "from JSON", **TINY,
                                                      "input_reference": {"image_url": data_url}})
    assert status == 200 and len(system.stored_job(made["id"])["params"]["image_sha256"] or "") == 64
    assert client.videos.delete(made["id"]).deleted is True
    for reference in ({"file_id": "file-123"}, "https://example.com/cat.png"):
        status, body = system.json("POST", "/v1/videos", {"model": "ti2v", "prompt": "x", **TINY,
                                                          "input_reference": reference})
        assert status == 422 and body["error"]["param"] == "input_reference"
    system.wait_idle(timeout_s=60)
    for job_id in (video.id, made["id"]):
        assert not (system.config.results_dir / f"{job_id}.mp4").exists()


def test_list_pages_with_a_cursor(system, client):
    # extra_body's nested custom_options reach the server as multipart parts custom_options[steps] ...
    ids = [client.videos.create(model="t2v", prompt=f"job {i}", extra_body={**TINY, "custom_options": {"steps": 1}}).id
           for i in range(3)]
    try:
        assert system.stored_job(ids[0])["params"]["steps"] == 1
        first = client.videos.list(limit=2)  # newest first
        assert [v.id for v in first.data] == ids[:0:-1] and first.has_more is True
        assert first.last_id == ids[1]
        second = first.get_next_page()  # the SDK follows last_id as `after`
        assert second.data[0].id == ids[0]
        asc = client.videos.list(after=ids[0], order="asc", limit=5)
        assert [v.id for v in asc.data] == ids[1:] and asc.has_more is False
        with pytest.raises(openai.UnprocessableEntityError) as info:
            client.videos.list(limit=0)
        assert openai_error_of(info.value)["param"] == "limit"
    finally:
        for job_id in ids:
            client.videos.delete(job_id)
    assert all(system.stored_job(job_id) is None for job_id in ids)


def test_errors_have_the_openai_shape(system, client):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.videos.create(model="sora-2", prompt="x")
    error = openai_error_of(info.value)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "validation_error", "model")
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.videos.create(model="t2v", prompt="x", size="999x999", extra_body=TINY)
    assert openai_error_of(info.value)["param"] == "size"
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.videos.create(model="t2v", prompt="x", extra_body={"sharpness": 3})
    assert openai_error_of(info.value)["param"] == "sharpness"
    with pytest.raises(openai.NotFoundError) as info:
        client.videos.retrieve("0" * 32)
    assert openai_error_of(info.value)["code"] == "job_not_found"
    with pytest.raises(openai.NotFoundError) as info:  # the route itself: still the OpenAI shape
        client.get("/videos/x/y/z", cast_to=object)
    assert openai_error_of(info.value)["code"] == "not_found"
    # /api/v1 keeps its own shape (System.request checks every error body it gets, by path).
    status, body = system.json("POST", "/api/v1/generate", {"model": "sora-2", "prompt": "x"})
    assert status == 422 and body["success"] is False and body["error"]["code"] == "VALIDATION_ERROR"


def test_idempotency_key_on_both_create_routes_survives_a_broker_restart(system):
    key_v1, key_api = f"k-{uuid.uuid4()}", f"k-{uuid.uuid4()}"
    body = {"model": "t2v", "prompt": "once only", "seconds": "0.3", **TINY}  # JSON: what older SDKs send

    def create(path, request, key):
        status, headers, content = system.request("POST", path, request, headers={"Idempotency-Key": key})
        return status, {k.lower(): v for k, v in headers.items()}, json.loads(content)

    status, headers, first = create("/v1/videos", body, key_v1)
    assert status == 200 and "idempotent-replayed" not in headers
    status, headers, again = create("/v1/videos", body, key_v1)
    assert status == 200 and again["id"] == first["id"] and headers["idempotent-replayed"] == "true"
    status, headers, conflict = create("/v1/videos", {**body, "prompt": "something else"}, key_v1)
    assert status == 409 and headers["x-should-retry"] == "false"
    assert conflict["error"]["code"] == "idempotency_key_reused"

    request = {"model": "t2v", "prompt": "once only", **TINY}
    status, _, made = create("/api/v1/generate", request, key_api)
    assert status == 202
    status, headers, replayed = create("/api/v1/generate", request, key_api)
    assert status == 202 and replayed["job_id"] == made["job_id"] and headers["idempotent-replayed"] == "true"
    status, _, refused = create("/api/v1/generate", {**request, "seed": 1}, key_api)
    assert status == 409 and refused["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    # Without a key every create is a new job.
    assert system.submit(prompt="once only") != system.submit(prompt="once only")

    # The keys are in the job store: a restarted broker gives the same answers.
    system.supervisorctl("restart", "broker")
    system.wait_ready()
    status, _, after_restart = create("/v1/videos", body, key_v1)
    assert status == 200 and after_restart["id"] == first["id"]
    status, _, after_restart = create("/api/v1/generate", request, key_api)
    assert status == 202 and after_restart["job_id"] == made["job_id"]
    status, _, _ = create("/api/v1/generate", {**request, "seed": 1}, key_api)
    assert status == 409
    system.wait_idle(timeout_s=120)


# ---- in-process: the broker's side of DELETE ----

def test_an_mp4_written_after_its_job_was_deleted_is_removed(broker: Broker):
    job_id = broker.api.submit({"request": {"prompt": "x", "model": "t2v", "quality": "draft"}})["job_id"]
    assert broker.api.delete({"job_id": job_id})["deleted"] is True
    assert broker.store.get(job_id) is None
    path = broker.config.results_dir / f"{job_id}.mp4"  # the muxer finishes it after all
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64)
    broker.progress.on_report(m.JobDone(job_id=job_id, attempt=1, path=str(path), num_frames=5, width=32, height=32,
                                        fps=16))
    assert not path.exists()


def test_idempotency_keys_are_per_owner_and_expire(broker: Broker):
    request = {"prompt": "x", "model": "t2v", "quality": "draft"}
    a = broker.api.submit({"request": request, "owner": "alice", "idempotency_key": "k", "api": "v1"})["job_id"]
    b = broker.api.submit({"request": request, "owner": "bob", "idempotency_key": "k", "api": "v1"})["job_id"]
    assert a != b
    again = broker.api.submit({"request": request, "owner": "alice", "idempotency_key": "k", "api": "v1"})
    assert again["job_id"] == a and again["idempotent_replay"] is True
    # The same request through the other API is another request.
    with pytest.raises(Exception, match="different request") as info:
        broker.api.submit({"request": request, "owner": "alice", "idempotency_key": "k", "api": "api/v1"})
    assert getattr(info.value, "http_status", None) == 409
    broker.store.db.execute("UPDATE idempotency_keys SET created_at = created_at - 86401")
    fresh = broker.api.submit({"request": request, "owner": "alice", "idempotency_key": "k", "api": "v1"})
    assert fresh["job_id"] != a and "idempotent_replay" not in fresh


# ---- in-process: the error shape of /v1 ----

def test_the_middleware_rewrites_only_v1_errors_and_catches_the_unexpected():
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from common.errors import QueueFull
    from gateway.openai_api import OpenAIErrors

    def refused(request):
        err = QueueFull("the queue is full", {"retry_after": 7})
        return JSONResponse(err.to_dict(), status_code=err.http_status, headers={"Retry-After": "7"})

    def broken(request):
        raise RuntimeError("/tmp/secret/path exploded")

    app = Starlette(routes=[Route("/v1/full", refused), Route("/api/v1/full", refused), Route("/v1/broken", broken)],
                    middleware=[Middleware(OpenAIErrors)])
    with TestClient(app, raise_server_exceptions=False) as http:
        full = http.get("/v1/full")
        assert full.status_code == 429 and full.headers["retry-after"] == "7"
        check_openai_error("429 from /v1/full", full.json())
        assert full.json()["error"] == {"message": "the queue is full", "type": "rate_limit_error",
                                        "code": "queue_full", "param": None}
        assert http.get("/api/v1/full").json()["error"]["code"] == "QUEUE_FULL"  # /api/v1 keeps its shape
        broken_response = http.get("/v1/broken")
        assert broken_response.status_code == 500
        check_openai_error("500 from /v1/broken", broken_response.json(), ["/tmp/", "exploded"])
        assert broken_response.json()["error"]["type"] == "server_error"
