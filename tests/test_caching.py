"""Step caching (stages/caching.py) through the real stage processes: a cached job's frames equal
diffusers' `WanPipeline` with the same cache hook applied to both experts of the same tiny model,
the passes skipped are reported (and equal the passes the reference skipped), consecutive jobs in
the same processes do not share cache state, and bad cache options are refused at submit."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

from broker import admission
from broker.driver import default_params
from common import messages as m
from common.config import PROFILES_DIR, Config
from common.errors import ConfigError
from stages.models import model_dir
from stages.vae import to_uint8
from tests.helpers import System, vae_frames

FIRST_BLOCK = {"method": "first_block", "threshold": 0.3}
TAYLORSEER = {"method": "taylorseer", "interval": 2, "warmup": 2}

# (cache, seed): submitted together, so each DiT process runs them one after another. The third is
# the first's settings with another seed after a taylorseer job, the fourth has no cache at all: a
# cache left over from an earlier job would change their frames.
JOBS = [(FIRST_BLOCK, 31), (TAYLORSEER, 32), (FIRST_BLOCK, 33), (None, 34)]
STEPS = 6


def hook(cache: dict[str, Any]) -> FirstBlockCacheConfig | TaylorSeerCacheConfig:
    """The diffusers config the README promises for each method (written out here, not imported)."""
    if cache["method"] == "first_block":
        return FirstBlockCacheConfig(threshold=cache["threshold"])
    return TaylorSeerCacheConfig(cache_interval=cache["interval"], disable_cache_before_step=cache["warmup"],
                                 taylor_factors_dtype=torch.float32, use_lite_mode=True)


def cached_reference(folder, p: m.JobParams) -> tuple[np.ndarray, int, int]:
    """WanPipeline's frames for `p` with `p.cache`'s hook on both experts, and (passes, passes
    whose last block really ran) counted by a forward hook on that block's self-attention."""
    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ran = [0]
    for expert in (pipe.transformer, pipe.transformer_2):
        if p.cache is not None:
            expert.enable_cache(hook(p.cache))
        expert.blocks[-1].attn1.register_forward_hook(lambda *_: ran.__setitem__(0, ran[0] + 1))
    out = pipe(prompt=p.prompt, negative_prompt=p.negative_prompt, height=p.height, width=p.width,
               num_frames=p.num_frames, num_inference_steps=p.steps, guidance_scale=p.guidance_scale,
               guidance_scale_2=p.guidance_scale_2, generator=torch.Generator().manual_seed(p.seed),
               output_type="np").frames
    passes = p.steps * (2 if p.guidance_scale > 1.0 else 1)
    return to_uint8(out)[0], passes, ran[0]


@pytest.fixture(scope="module")
def cached_jobs(stack):
    jobs = []
    for cache, seed in JOBS:
        p = default_params(stack.config, "t2v-A14B", prompt="a lantern drifts over a dark lake", negative_prompt="",
                           seed=seed, steps=STEPS, height=32, width=32, num_frames=5, guidance_scale=4.0,
                           guidance_scale_2=3.0)
        p = m.JobParams(**{**p.__dict__, "cache": cache})
        jobs.append((p, stack.driver.submit(p)))
    return [(p, job_id, stack.driver.wait(job_id, timeout_s=300)) for p, job_id in jobs]


@pytest.mark.parametrize("case", range(len(JOBS)))
def test_cached_frames_equal_wanpipeline_with_the_same_hook(stack, cached_jobs, case):
    p, job_id, outcome = cached_jobs[case]
    ours = vae_frames(stack, job_id)
    ref, passes, ran = cached_reference(model_dir(stack.config, p.model), p)
    assert ours.shape == ref.shape == (p.num_frames, p.height, p.width, 3) and ours.std() > 1.0
    assert np.array_equal(ours, ref), f"max |diff| {np.abs(ours.astype(int) - ref).max()}"
    reports = [r for r in outcome.reports if r.event == "cache"]
    if p.cache is None:
        assert reports == [] and ran == passes  # no hook: every pass ran
        return
    # Each DiT process reports its expert's passes; together they are the reference's.
    assert sorted(r.stage for r in reports) == ["dit_high", "dit_low"]
    assert {r.to for r in reports} == {p.cache["method"]}
    assert sum(r.total_steps for r in reports) == passes
    skipped = sum(r.step for r in reports)
    assert skipped == passes - ran
    assert 0 < skipped < passes, "the case should skip some passes and run others"


def test_cache_changes_the_frames(stack, cached_jobs):
    """The hook really acts: the first job's frames differ from the same job computed in full."""
    p, job_id, _ = cached_jobs[0]
    ref, _, _ = cached_reference(model_dir(stack.config, p.model), m.JobParams(**{**p.__dict__, "cache": None}))
    assert not np.array_equal(vae_frames(stack, job_id), ref)


@pytest.mark.parametrize(("cache", "field", "words"), [
    ({"method": "teacache"}, "custom_options.cache.method", "unknown"),
    ({"threshold": 0.1}, "custom_options.cache.method", "required"),
    ({"method": "first_block", "threshold": 1.5}, "custom_options.cache.threshold", "between"),
    ({"method": "first_block", "interval": 2}, "custom_options.cache", "takes no interval"),
    ({"method": "taylorseer", "interval": 0}, "custom_options.cache.interval", "between"),
    ({"method": "mag"}, "custom_options.cache.method", "calibrated"),
    ("first_block", "custom_options.cache", "object"),
])
def test_bad_cache_options_are_refused_at_submit(api_system: System, cache, field, words):
    status, body = api_system.json("POST", "/api/v1/generate", {"model": "t2v", "prompt": "a fox",
                                                                "custom_options": {"cache": cache}})
    assert status == 422, body
    assert body["error"]["code"] == "VALIDATION_ERROR" and body["error"]["details"]["field"] == field, body
    assert words in body["error"]["message"]


def test_cached_job_records_the_cache_in_its_metadata(api_system: System):
    job_id = api_system.submit(prompt="a kite over the dunes", seed=5, custom_options={"steps": 6, "cache": TAYLORSEER})
    assert api_system.wait_final(job_id)["status"] == "completed"
    status, body = api_system.json("GET", f"/api/v1/result/{job_id}")
    assert status == 200
    cache = body["metadata"]["cache"]
    steps = body["metadata"]["params"]["steps"]
    assert {k: cache[k] for k in TAYLORSEER} == TAYLORSEER
    assert cache["passes"] == 2 * steps and 0 < cache["skipped"] < cache["passes"]
    assert set(cache["stages"]) == {"dit_high", "dit_low"}
    assert sum(s["skipped"] for s in cache["stages"].values()) == cache["skipped"]
    # A job without a cache says so.
    plain = api_system.submit(prompt="a kite over the dunes", seed=5)
    assert api_system.wait_final(plain)["status"] == "completed"
    assert api_system.json("GET", f"/api/v1/result/{plain}")[1]["metadata"]["cache"] is None


def test_a_preset_may_name_a_cache_and_a_request_replaces_it(tmp_path):
    """A profile's preset row with `cache` resolves to jobs with that cache; custom_options.cache
    replaces it ({"method": "none"} turns it off); a bad cache in a preset fails at startup."""
    text = (PROFILES_DIR / "tiny.toml").read_text()
    row = 'draft = { steps = 2, resolution = "32x32", num_frames = 5, fps = 16, guidance_scale = 3.0, '
    assert text.count(row) == 1
    path = tmp_path / "cached.toml"
    path.write_text(text.replace(row, row + 'cache = { method = "first_block", threshold = 0.2 }, '))
    config = Config.load(path, environ={})
    admission.check_presets(config)
    base = {"model": "t2v", "prompt": "a heron", "quality_preset": "draft"}
    assert admission.resolve(config, base)[1].cache == {"method": "first_block", "threshold": 0.2}
    replaced = {**base, "custom_options": {"cache": {"method": "taylorseer"}}}
    assert admission.resolve(config, replaced)[1].cache == {"method": "taylorseer", "interval": 5, "warmup": 3}
    assert admission.resolve(config, {**base, "custom_options": {"cache": {"method": "none"}}})[1].cache is None
    assert admission.resolve(config, {**base, "quality_preset": "standard"})[1].cache is None
    path.write_text(text.replace(row, row + 'cache = { method = "mag" }, '))
    with pytest.raises(ConfigError, match="calibrated"):
        admission.check_presets(Config.load(path, environ={}))
