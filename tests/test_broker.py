"""The broker in-process (no stages running): admission, queue bound, priority order, cancel, persistence."""

from __future__ import annotations

import shutil

import pytest

from broker.broker import Broker
from common.config import Config
from common.errors import JobNotFound, ModelNotServed, NotCancellable, QueueFull, ValidationError
from tests.helpers import short_tmpdir


@pytest.fixture
def config():
    state = short_tmpdir("wsb-")
    yield Config.load(environ={
        "WAN_SERVER__RUNTIME__STATE_DIR": str(state),
        "WAN_SERVER__ADMISSION__MAX_QUEUED": "3",
        "WAN_SERVER__SERVING__MODELS": '["t2v-A14B", "i2v-A14B", "ti2v-5B"]',  # s2v-14B described, not served
    })
    shutil.rmtree(state, ignore_errors=True)


def submit(broker, **request):
    return broker.api.submit({"request": {"prompt": "x", "model": "t2v", "quality": "draft", **request}})


def test_queue_bound_priority_order_and_cancel(config):
    broker = Broker(config)
    try:
        low = submit(broker, priority=0)
        high = submit(broker, priority=5)
        mid = submit(broker, priority=1)
        assert low["status"] == "queued"  # no stage is up: nothing is dispatched
        positions = {j["job_id"]: broker.api.status({"job_id": j["job_id"]})["queue_position"]
                     for j in (low, high, mid)}
        assert [positions[high["job_id"]], positions[mid["job_id"]], positions[low["job_id"]]] == [1, 2, 3]
        with pytest.raises(QueueFull) as info:
            submit(broker)
        assert info.value.http_status == 429 and info.value.details["max_queued"] == 3
        cancelled = broker.api.cancel({"job_id": high["job_id"]})
        assert cancelled["status"] == "cancelled" and cancelled["queue_position"] is None
        assert broker.api.status({"job_id": mid["job_id"]})["queue_position"] == 1
        with pytest.raises(NotCancellable):
            broker.api.cancel({"job_id": high["job_id"]})
        submit(broker)  # the cancelled job freed its place in the queue
        with pytest.raises(JobNotFound):
            broker.api.status({"job_id": "f" * 32})
        listed = broker.api.list({"status": "queued", "limit": 10, "offset": 0})
        assert listed["total"] == 3
    finally:
        broker.close()
    # Every job survives a broker restart.
    again = Broker(config)
    try:
        assert again.api.status({"job_id": low["job_id"]})["status"] == "queued"
        assert again.api.status({"job_id": high["job_id"]})["status"] == "cancelled"
    finally:
        again.close()


def test_admission_errors(config):
    broker = Broker(config)
    try:
        with pytest.raises(ModelNotServed):
            submit(broker, model="s2v")
        with pytest.raises(ValidationError, match="4n\\+1"):
            submit(broker, custom_options={"num_frames": 8})
        result = submit(broker, custom_options={"duration": 0.5, "fps": 16})
        params = broker.api.result({"job_id": result["job_id"]})["metadata"]["params"]
        assert params["num_frames"] == 9 and params["fps"] == 16  # 0.5 s x 16 fps -> nearest 4n+1
    finally:
        broker.close()


def test_eta_comes_from_measured_timings(config):
    broker = Broker(config)
    try:
        job = submit(broker)
        assert job["eta_seconds"] is None  # nothing measured yet for this shape
        stored = broker.store.get(job["job_id"])
        from broker.progress import timing_key
        for stage, seconds in zip(stored.route, (0.5, 2.0, 1.0, 0.7, 0.3), strict=True):
            broker.store.record_timing(timing_key(stored.params), stage, seconds)
        eta = broker.api.status({"job_id": job["job_id"]})["eta"]
        assert eta == pytest.approx(4.5, abs=0.01)  # its own stages; nothing ahead of it
    finally:
        broker.close()


def test_users_take_turns_and_active_jobs_per_key_are_bounded(config):
    from broker.fairness import fair_order
    from common.errors import TooManyActiveJobs

    broker = Broker(Config.load(environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(config.state_dir)}))
    try:
        def submit_as(owner, **request):
            return broker.api.submit({"owner": owner, "max_active": 6,
                                     "request": {"prompt": "x", "model": "t2v", "quality": "draft", **request}})

        batch = [submit_as("aaaa0001")["job_id"] for _ in range(5)]
        single = submit_as("bbbb0002")["job_id"]
        assert broker.api.status({"job_id": single})["queue_position"] == 2  # after A's first, before the rest
        assert [broker.api.status({"job_id": j})["queue_position"] for j in batch] == [1, 3, 4, 5, 6]
        # Fewest in flight first: with two of A's jobs running, B's next jobs go ahead of A's.
        queued = broker.store.by_status("queued")
        order = fair_order(queued, {"aaaa0001": 2}, {})
        assert [j.id for j in order][:2] == [single, batch[0]]
        # Within one user, priority then arrival: A's urgent job goes ahead of A's others (not of B's).
        urgent = submit_as("aaaa0001", priority=5)["job_id"]
        assert broker.api.status({"job_id": urgent})["queue_position"] == 2
        assert broker.api.status({"job_id": batch[0]})["queue_position"] == 3
        with pytest.raises(TooManyActiveJobs) as info:
            submit_as("aaaa0001")
        assert info.value.http_status == 429 and info.value.details["max_active_jobs"] == 6
        broker.api.cancel({"job_id": batch[0]})
        submit_as("aaaa0001")  # a finished job frees its place
        # Another user's job is not found, the same as a job that does not exist.
        with pytest.raises(JobNotFound):
            broker.api.status({"job_id": single, "owner": "aaaa0001"})
        assert broker.api.list({"limit": 50, "offset": 0, "owner": "bbbb0002"})["total"] == 1
    finally:
        broker.close()


def test_image_is_spooled_before_admission_returns_and_removed_when_final(config):
    import hashlib
    import os
    import time

    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # the gateway validated it; it arrives as msgpack binary
    image = png
    broker = Broker(config)
    try:
        with pytest.raises(ValidationError, match="needs an input image"):
            submit(broker, model="i2v")
        with pytest.raises(ValidationError, match="takes no input image"):
            broker.api.submit({"request": {"prompt": "x", "model": "t2v"}, "image": image})
        with pytest.raises(ValidationError, match="PNG"):
            broker.api.submit({"request": {"prompt": "x", "model": "i2v"}, "image": bytes(4)})
        with pytest.raises(ValidationError, match="PNG"):  # not binary
            broker.api.submit({"request": {"prompt": "x", "model": "i2v"}, "image": png.decode("latin-1")})
        limit = 4096 * 4096 * 4 + (1 << 20)
        with pytest.raises(ValidationError, match="PNG"):  # larger than any image the gateway passes
            broker.api.submit({"request": {"prompt": "x", "model": "i2v"}, "image": png + bytes(limit)})
        assert not config.spool_dir.exists() or not any(config.spool_dir.iterdir())  # refused: nothing written

        job = broker.api.submit({"request": {"prompt": "x", "model": "i2v", "quality": "draft"}, "image": image})
        path = config.job_spool(job["job_id"]) / "image.png"
        assert path.read_bytes() == png
        params = broker.api.result({"job_id": job["job_id"]})["metadata"]["params"]
        assert params["image_sha256"] == hashlib.sha256(png).hexdigest()
        stale = config.job_spool("0" * 32)  # a folder of a job the store does not know, long untouched
        stale.mkdir(parents=True)
        os.utime(stale, (time.time() - 7200, time.time() - 7200))
        broker.api.cancel({"job_id": job["job_id"]})
        assert not config.job_spool(job["job_id"]).exists()
        broker.dispatcher.recover()  # at start: leftovers of unknown or final jobs are swept
        assert not stale.exists()
    finally:
        broker.close()


def test_preset_resolution_follows_the_image_orientation():
    from broker.admission import oriented

    allowed = ["64x32", "32x64", "32x32"]
    assert oriented("64x32", (30, 60), allowed) == "32x64"  # portrait image: portrait video
    assert oriented("64x32", (60, 30), allowed) == "64x32"
    assert oriented("64x32", (40, 40), allowed) == "64x32"  # square image: the preset's own
    assert oriented("32x32", (30, 60), allowed) == "32x32"
    assert oriented("64x32", (30, 60), ["64x32"]) == "64x32"  # the turned size is not supported
    assert oriented("64x32", None, allowed) == "64x32"
