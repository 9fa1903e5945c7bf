"""`n` variants in one request: n jobs with seeds seed..seed+n-1 under one group_id, created all or
none, each job's frames those of a single job submitted with its seed."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from broker.broker import Broker
from common.config import Config
from common.errors import QueueFull, TooManyActiveJobs
from tests.helpers import System

REQUEST = {"model": "t2v", "quality_preset": "draft", "prompt": "paper boats race down a gutter"}


def decoded(system: System, job_id: str) -> np.ndarray:
    status, _, mp4 = system.request("GET", f"/api/v1/files/{job_id}.mp4")
    assert status == 200
    with av.open(io.BytesIO(mp4), mode="r") as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def test_n_variants_have_consecutive_seeds_one_group_and_the_frames_of_single_jobs(api_system: System):
    status, body = api_system.json("POST", "/api/v1/generate", {**REQUEST, "seed": 4000, "n": 3})
    assert status == 202, body
    ids, group = body["job_ids"], body["group_id"]
    assert len(set(ids)) == 3 and body["job_id"] == ids[0] and group
    assert body["seeds"] == [4000, 4001, 4002] and [j["job_id"] for j in body["jobs"]] == ids

    status, listed = api_system.json("GET", f"/api/v1/jobs?group_id={group}")
    assert status == 200 and listed["total"] == 3
    assert [j["job_id"] for j in listed["jobs"]] == ids  # in seed order
    assert all(j["group_id"] == group for j in listed["jobs"])
    single = api_system.submit(**{**REQUEST, "seed": 4001})  # the second variant, on its own
    finals = [api_system.wait_final(j) for j in [*ids, single]]
    assert all(f["status"] == "completed" for f in finals), finals

    params = [api_system.json("GET", f"/api/v1/result/{j}")[1]["metadata"]["params"] for j in [*ids, single]]
    assert [p["seed"] for p in params] == [4000, 4001, 4002, 4001]
    assert all({**p, "seed": 0} == {**params[0], "seed": 0} for p in params)  # only the seed differs
    frames = [decoded(api_system, j) for j in [*ids, single]]
    assert np.array_equal(frames[1], frames[3]), "variant 2 is not the single job with its seed"
    assert not np.array_equal(frames[0], frames[1]) and not np.array_equal(frames[1], frames[2])
    assert api_system.json("GET", f"/api/v1/status/{single}")[1]["group_id"] is None


def test_n_without_a_seed_takes_a_random_one_then_consecutive(api_system: System):
    status, body = api_system.json("POST", "/api/v1/generate", {**REQUEST, "n": 2, "priority": -10})
    assert status == 202, body
    first, second = body["seeds"]
    assert second == (first + 1) % 2**32
    for job_id in body["job_ids"]:
        api_system.json("POST", f"/api/v1/cancel/{job_id}")


@pytest.mark.parametrize("n", [0, 9, 2.0, "3", True])
def test_n_out_of_range_or_not_an_integer_is_refused_and_nothing_created(api_system: System, n):
    before = api_system.json("GET", "/api/v1/jobs?limit=1")[1]["total"]
    status, body = api_system.json("POST", "/api/v1/generate", {**REQUEST, "n": n})
    assert status == 422 and body["error"]["code"] == "VALIDATION_ERROR", body
    assert body["error"]["details"]["field"] == "n"
    if n == 9:  # the tiny profile's [admission] max_variants
        assert body["error"]["details"]["max"] == 8
    assert api_system.json("GET", "/api/v1/jobs?limit=1")[1]["total"] == before


def test_queue_and_key_limits_count_all_n(tmp_path):
    """n jobs that do not all fit the queue (or the key's active limit) are refused, none created."""
    broker = Broker(Config.load(environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(tmp_path),
                                         "WAN_SERVER__ADMISSION__MAX_QUEUED": "4"}))
    try:
        request = {"request": {**REQUEST, "n": 3}}
        assert len(broker.api.submit(request)["job_ids"]) == 3  # no stage is up: they stay queued
        with pytest.raises(QueueFull) as info:
            broker.api.submit(request)
        assert info.value.details["requested"] == 3 and broker.store.count("queued") == 3
        with pytest.raises(TooManyActiveJobs):
            broker.api.submit({**request, "request": {**REQUEST, "n": 1}, "max_active": 3})
        assert broker.store.count("queued") == 3
        assert len(broker.api.submit({"request": {**REQUEST, "n": 1}})["job_ids"]) == 1  # one still fits
    finally:
        broker.close()


def test_an_idempotent_replay_returns_the_whole_group(tmp_path):
    broker = Broker(Config.load(environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(tmp_path)}))
    try:
        args = {"request": {**REQUEST, "seed": 9, "n": 2}, "idempotency_key": "k-1", "api": "api/v1"}
        first = broker.api.submit(args)
        again = broker.api.submit(args)
        assert again["idempotent_replay"] is True and first["seeds"] == [9, 10]
        assert (again["job_ids"], again["group_id"], again["seeds"]) == (first["job_ids"], first["group_id"], [9, 10])
        assert broker.store.count("queued") == 2
    finally:
        broker.close()
