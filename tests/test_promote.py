"""Video-to-video and promoting a draft (README "Promote and video-to-video").

- Through the stage processes (`stack`): a tiny T2V-A14B job given a video and a strength gives the
  frames diffusers' `WanVideoToVideoPipeline` gives for the same frames, strength and seed, bit for
  bit. That pipeline has one transformer; T2V-A14B has two experts, switched (as `WanPipeline` does)
  at the first timestep below the boundary. The oracle is the pipeline itself, handed the expert of
  its first timestep and switched to the low-noise expert by its own `callback_on_step_end` before
  the first timestep below the boundary (its loop calls `self.transformer` at every step); the
  guidance is the same on both experts (the pipeline has one scale). One case starts after the
  hand-off (only the low-noise expert runs: the pipeline as it is), one before it. TI2V-5B (one
  expert, its steps split between the two DiT processes) too, with two corrections to the pipeline,
  each stated where it is made: its VAE's spatial factor (the pipeline assumes 8; the Wan2.2 VAE's
  is 16) and a timestep per token, as WanPipeline gives TI2V-5B (`expand_timesteps`).
- Through the real system (`api_system`): a finished draft promoted to a higher preset; the child's
  metadata names its parent and its source; the errors of promote and of an uploaded video.
- Ownership with API keys (`keyed_system`): another user's job is not found.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from PIL import Image

from broker.driver import default_params
from common import catalog
from common import messages as m
from stages import schedule
from stages.models import PipelineInfo, model_dir
from tests.helpers import encode_video, vae_frames


def moving_frames(n: int, width: int, height: int, seed: int) -> list[np.ndarray]:
    """`n` frames of a block moving over a gradient, with noise: structure the VAE latents keep."""
    g = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    frames = []
    for i in range(n):
        rgb = np.stack([x, y, (x + y) / 2], axis=-1) * 180
        left = (i * 3) % max(1, width // 2)
        rgb[height // 4: height // 2, left: left + width // 4] = (240, 40, 60)
        frames.append(np.clip(rgb + g.uniform(0, 60, rgb.shape), 0, 255).astype(np.uint8))
    return frames


# The muxer's lossless master: FFV1 (RGB) in Matroska.
LOSSLESS: dict[str, str] = {"fmt": "matroska", "codec": "ffv1", "pix_fmt": "bgr0"}


def decoded(data: bytes) -> list[Image.Image]:
    import io

    with av.open(io.BytesIO(data), mode="r") as container:
        return [Image.fromarray(f.to_ndarray(format="rgb24")) for f in container.decode(container.streams.video[0])]


def cover_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """What the server promises to do with a frame of another size: scale to cover (Lanczos), crop the centre."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    sw, sh = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    left, top = (sw - width) // 2, (sh - height) // 2
    return image.resize((sw, sh), Image.Resampling.LANCZOS).crop((left, top, left + width, top + height))


def v2v_reference(folder: Path, p: m.JobParams, frames: list[Image.Image], boundary_ratio: float | None) -> np.ndarray:
    """WanVideoToVideoPipeline's frames for `p` from `frames`, its transformer switched to the
    low-noise expert before the first timestep below the boundary (the module's docstring); for a
    one-expert model (no boundary) the pipeline as it is, told the VAE's real spatial factor."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanVideoToVideoPipeline
    from diffusers.video_processor import VideoProcessor

    from stages.vae import to_uint8

    base = WanPipeline.from_pretrained(folder)
    scheduler = UniPCMultistepScheduler.from_config(base.scheduler.config,
                                                    **({} if p.shift is None else {"flow_shift": p.shift}))
    boundary = (boundary_ratio if boundary_ratio is not None else 0.0) * scheduler.config.num_train_timesteps
    probe = UniPCMultistepScheduler.from_config(scheduler.config)
    probe.set_timesteps(p.steps)
    assert p.strength is not None
    start = catalog.strength_start(p.steps, p.strength)
    timesteps = probe.timesteps[start:]
    high, low = base.transformer, base.transformer_2
    pipe = WanVideoToVideoPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder,
                                   transformer=high if timesteps[0] >= boundary else low, vae=base.vae,
                                   scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    # The pipeline takes the spatial factor as 2 ** len(temperal_downsample), 8, which the Wan2.2 VAE
    # of TI2V-5B is not (16: its config says so, as WanPipeline reads it).
    factor = base.vae.config.get("scale_factor_spatial", pipe.vae_scale_factor_spatial)
    pipe.vae_scale_factor_spatial, pipe.video_processor = factor, VideoProcessor(vae_scale_factor=factor)
    if base.config.get("expand_timesteps"):
        # TI2V-5B is run with a timestep per token (WanPipeline's expand_timesteps; all equal without
        # an image): the pipeline passes one per batch, which is the same value through other float
        # paths (off by one in a few of the 0..255 values). Give the transformer what WanPipeline gives.
        def per_token(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            x, t = kwargs["hidden_states"], kwargs["timestep"]
            _, _, f, h, w = x.shape
            pt, ph, pw = module.config.patch_size
            tokens = (f // pt) * (h // ph) * (w // pw)
            return args, {**kwargs, "timestep": (torch.ones(tokens, device=x.device) * t[0]).unsqueeze(0)}

        pipe.transformer.register_forward_pre_hook(per_token, with_kwargs=True)

    def switch(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if low is not None and i + 1 < len(timesteps) and timesteps[i + 1] < boundary:
            pipe.transformer = low
        return {}

    out = pipe(video=frames, prompt=p.prompt, negative_prompt=p.negative_prompt, height=p.height, width=p.width,
               num_inference_steps=p.steps, guidance_scale=p.guidance_scale, strength=p.strength,
               generator=torch.Generator().manual_seed(p.seed), output_type="np", callback_on_step_end=switch).frames
    result: np.ndarray = to_uint8(out)[0]
    return result


def handoff(stack: Any, model: str, steps: int) -> tuple[int, float | None]:
    """(the first step dit_low runs, the expert boundary ratio or None for a one-expert model)."""
    from diffusers import UniPCMultistepScheduler

    folder = model_dir(stack.config, model)
    info = PipelineInfo.read(folder)
    ratio = stack.config.model(model).boundary_ratio
    ratio = (info.boundary_ratio if ratio is None else ratio) if info.has_transformer_2 else None
    sched = UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    sched.set_timesteps(steps)
    boundary = None if ratio is None else ratio * 1000
    return schedule.handoff_step(sched.timesteps, boundary, stack.config.model(model).split_fraction), ratio


# model, seed, steps, strength, job size (WxH), source size (WxH), frames
CASES = [
    ("t2v-A14B", 31, 6, 0.5, (48, 32), (64, 48), 9),
    ("t2v-A14B", 32, 6, 0.3, (32, 32), (32, 32), 5),  # starts after the hand-off: dit_high runs none
    ("ti2v-5B", 33, 6, 0.7, (64, 32), (48, 40), 9),  # one expert, its steps split at split_fraction
]


@pytest.fixture(scope="module")
def v2v_results(stack, tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    jobs = []
    for model, seed, steps, strength, (w, h), (sw, sh), n in CASES:
        path = folder / f"{seed}.mkv"
        data = encode_video(moving_frames(n, sw, sh, seed), **LOSSLESS)
        path.write_bytes(data)
        p = default_params(stack.config, model, prompt="a red block slides over a gradient", negative_prompt="dull",
                           seed=seed, steps=steps, height=h, width=w, num_frames=n, guidance_scale=3.5)
        p.strength = strength
        p.video = {"file": path.name, "format": "mkv", "width": sw, "height": sh, "frames": n, "fps": p.fps}
        jobs.append((p, stack.driver.submit(p, video_path=path), data))
    return [(p, job_id, stack.driver.wait(job_id, timeout_s=300), data) for p, job_id, data in jobs]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_v2v_frames_bit_identical_to_wanvideotovideopipeline(stack, v2v_results, case):
    p, job_id, outcome, data = v2v_results[case]
    k, ratio = handoff(stack, p.model, p.steps)
    assert p.strength is not None
    start = catalog.strength_start(p.steps, p.strength)
    ours = vae_frames(stack, job_id)
    frames = [cover_crop(f, p.width, p.height) for f in decoded(data)][: p.num_frames]
    ref = v2v_reference(model_dir(stack.config, p.model), p, frames, ratio)
    assert ours.shape == ref.shape == (p.num_frames, p.height, p.width, 3)
    assert ours.std() > 1.0
    assert np.array_equal(ours, ref), f"max |diff| {np.abs(ours.astype(int) - ref).max()}"
    # Only the steps from the strength's start ran, each expert its own.
    steps = [r for r in outcome.reports if r.event == "step"]
    assert [r.step for r in steps] == list(range(start + 1, p.steps + 1))
    assert [r.stage for r in steps] == ["dit_high"] * max(0, k - start) + ["dit_low"] * (p.steps - max(k, start))
    # The hand-off (what a checkpoint at it holds, and what a resume replays): noised latents and the
    # scheduler state begun at the start step; the video latents went only to the first DiT.
    first, handoff_msg = recorded_input(stack, "dit_high", job_id), recorded_input(stack, "dit_low", job_id)
    assert isinstance(first, m.DenoiseJob) and isinstance(handoff_msg, m.DenoiseJob)
    assert first.video_latents is not None and first.latents is None and first.step == 0
    assert handoff_msg.video_latents is None and handoff_msg.latents is not None
    assert handoff_msg.step == max(k, start) and handoff_msg.scheduler_state is not None
    assert handoff_msg.scheduler_state["begin_index"] == start


def recorded_input(stack: Any, stage: str, job_id: str) -> m.Message:
    """The message `stage` received for the job, from its wire recording."""
    import msgpack

    (path,) = (stack.state_dir / "record" / stage).glob(f"*-{job_id}.msgpack")
    return m.decode(msgpack.unpackb(path.read_bytes(), raw=False)["in"], stack.config.limits)


def test_v2v_cases_cover_both_sides_of_the_handoff(stack):
    sides = set()
    for model, _, steps, strength, *_ in CASES:
        if model != "t2v-A14B":
            continue
        k, _ = handoff(stack, model, steps)
        sides.add(catalog.strength_start(steps, strength) < k)
    assert sides == {True, False}


# ---- through the real system ----

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def result_of(system: Any, job_id: str) -> dict[str, Any]:
    final = system.wait_final(job_id)
    assert final["status"] == "completed", final
    status, body = system.json("GET", f"/api/v1/result/{job_id}")
    assert status == 200
    result: dict[str, Any] = body
    return result


def error_of(system: Any, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, dict[str, Any]]:
    status, content = system.json(method, path, body, **kw)
    assert status >= 400, content
    error: dict[str, Any] = content["error"]
    return status, error


@pytest.fixture(scope="module")
def draft(api_system):
    """A finished t2v draft with a lossless master, and the plain video-to-video job made from an
    uploaded MP4 (no master), both submitted at once."""
    parent = api_system.submit(prompt="a lantern drifts over a dark lake", seed=77,
                               custom_options={"lossless_master": True})
    video = encode_video(moving_frames(9, 48, 32, 5), "mp4", fps=16)
    status, body = api_system.json("POST", "/api/v1/generate", {
        "model": "t2v", "quality_preset": "draft", "prompt": "a block slides", "seed": 3, "strength": 0.5,
        "video": b64(video)})
    assert status == 202, body
    return result_of(api_system, parent), result_of(api_system, body["job_id"]), video


def test_promote_a_draft_from_its_lossless_master(api_system, draft, tmp_path):
    """Through the command line client (`gateway.client promote ... --wait -o`): the child follows
    to completion and its MP4 is downloaded."""
    parent, _, _ = draft
    pid = parent["job_id"]
    out = tmp_path / "promoted.mp4"
    run = subprocess.run([sys.executable, "-m", "gateway.client", "--url", api_system.url, "promote", pid,
                          "--quality", "standard", "--strength", "0.5", "--wait", "-o", str(out)],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    body = json.loads(run.stdout.splitlines()[0])
    assert run.stdout.splitlines()[-1] == str(out) and out.stat().st_size > 0
    child = result_of(api_system, body["job_id"])
    meta, p = child["metadata"], child["metadata"]["params"]
    assert meta["parent_job_id"] == pid and meta["quality_preset"] == "standard"
    assert meta["video"]["source"] == "lossless_master" and meta["video"]["format"] == "mkv"
    assert meta["video"]["strength"] == 0.5 == p["strength"]
    parent_p = parent["metadata"]["params"]
    # The parent's prompt, seed, frames and fps; the new preset's size and steps (tiny profile: 48x32, 4).
    assert (p["prompt"], p["seed"], p["num_frames"], p["fps"]) == (
        parent_p["prompt"], parent_p["seed"], parent_p["num_frames"], parent_p["fps"])
    assert (p["width"], p["height"], p["steps"]) == (48, 32, 4) != (parent_p["width"], parent_p["height"],
                                                                   parent_p["steps"])
    assert p["encoding"]["lossless_master"] is True  # the parent's encoding goes on
    # Only the steps from the strength's start ran: int(4 x 0.5) = 2 of 4.
    assert child["outputs"][0]["frames"] == p["num_frames"]


def test_plain_video_to_video_and_promoting_it_from_its_mp4(api_system, draft):
    _, v2v, video = draft
    meta = v2v["metadata"]
    assert meta["parent_job_id"] is None and meta["video"]["format"] == "mp4"
    assert meta["video"]["frames"] == 9 and meta["params"]["num_frames"] == 5  # the draft's 5 of the video's 9
    status, body = api_system.json("POST", f"/api/v1/promote/{v2v['job_id']}",
                                   {"quality_preset": "pro", "prompt": "a block glides"})
    assert status == 202, body
    child = result_of(api_system, body["job_id"])["metadata"]
    assert child["parent_job_id"] == v2v["job_id"] and child["video"]["source"] == "mp4"
    assert child["params"]["prompt"] == "a block glides" and child["params"]["strength"] == catalog.PROMOTE_STRENGTH
    # Its MP4 swept (as the results sweep removes old ones): nothing to start from.
    (api_system.state_dir / "results" / f"{v2v['job_id']}.mp4").unlink()
    status, error = error_of(api_system, "POST", f"/api/v1/promote/{v2v['job_id']}", {"quality_preset": "pro"})
    assert (status, error["code"], error["details"]) == (410, "RESULT_EXPIRED",
                                                         {"job_id": v2v["job_id"], "source": "mp4"})


def test_a_video_uploaded_as_multipart_by_the_cli(api_system, draft, tmp_path):
    """`gateway.client generate --video FILE --strength` sends the video as a multipart part: the
    job is admitted with the same video (its sha256, frames) and parameters as the base64 upload of
    the same bytes, and completes with an MP4."""
    _, v2v, video = draft
    (tmp_path / "block.mp4").write_bytes(video)
    run = subprocess.run([sys.executable, "-m", "gateway.client", "--url", api_system.url, "generate", "--model", "t2v",
                          "--quality", "draft", "--prompt", "a block slides", "--seed", "3", "--strength", "0.5",
                          "--video", str(tmp_path / "block.mp4")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    job = result_of(api_system, json.loads(run.stdout.splitlines()[0])["job_id"])
    assert job["metadata"]["video"]["sha256"] == v2v["metadata"]["video"]["sha256"]
    assert job["metadata"]["video"] == v2v["metadata"]["video"]
    assert {k: v for k, v in job["metadata"]["params"].items() if k != "prompt"} == \
        {k: v for k, v in v2v["metadata"]["params"].items() if k != "prompt"}
    status, headers, data = api_system.request("GET", job["output_url"])
    assert status == 200 and headers["content-type"] == "video/mp4" and len(data) > 0


def test_promote_errors(api_system, draft):
    parent, _, _ = draft
    pid = parent["job_id"]
    status, error = error_of(api_system, "POST", f"/api/v1/promote/{'0' * 32}", {"quality_preset": "pro"})
    assert (status, error["code"]) == (404, "JOB_NOT_FOUND")
    for preset in ("draft",):
        status, error = error_of(api_system, "POST", f"/api/v1/promote/{pid}", {"quality_preset": preset})
        assert (status, error["code"], error["details"]["reason"]) == (422, "VALIDATION_ERROR", "not_higher")
        assert error["details"]["allowed"] == ["standard", "pro", "cinema", "ultimate"]
    for body, field in [({"quality_preset": "pro", "strength": 0}, "strength"),
                        ({"quality_preset": "pro", "strength": 1.5}, "strength"),
                        ({"quality_preset": "pro", "custom_options": {"fps": 8}}, "custom_options.fps"),
                        ({"strength": 0.5}, "quality_preset"),
                        ({"quality_preset": "pro", "seed": 1}, None)]:
        status, error = error_of(api_system, "POST", f"/api/v1/promote/{pid}", body)
        assert (status, error["code"]) == (422, "VALIDATION_ERROR"), (body, error)
        assert error["details"].get("field") == field, (body, error)
    # A job that did not complete: cancelled while it runs (100 steps take far longer than the cancel).
    job = api_system.submit(prompt="cancelled at once", custom_options={"steps": 100})
    assert api_system.json("POST", f"/api/v1/cancel/{job}")[0] == 200
    status, error = error_of(api_system, "POST", f"/api/v1/promote/{job}", {"quality_preset": "pro"})
    assert (status, error["code"], error["details"]["status"]) == (409, "JOB_NOT_COMPLETED", "cancelled")


def test_video_upload_errors(api_system):
    good = encode_video(moving_frames(5, 32, 32, 1), "mp4", fps=16)
    base = {"model": "t2v", "quality_preset": "draft", "prompt": "refused"}
    cases = [
        ({"video": b64(b"not a video at all, just bytes")}, 415, "UNSUPPORTED_MEDIA_TYPE", "video"),
        ({"video": b64(good[: len(good) // 2])}, 422, "INVALID_VIDEO", "video"),
        ({"video": b64(good), "strength": 1.5}, 422, "VALIDATION_ERROR", "strength"),
        ({"strength": 0.5}, 422, "VALIDATION_ERROR", "strength"),  # no video
        ({"video": b64(good), "custom_options": {"num_frames": 9}}, 422, "VALIDATION_ERROR",
         "custom_options.num_frames"),  # the video has 5 frames
        ({"video": b64(good), "model": "i2v"}, 422, "VALIDATION_ERROR", "video"),
    ]
    for extra, status, code, field in cases:
        got, error = error_of(api_system, "POST", "/api/v1/generate", {**base, **extra})
        assert (got, error["code"], error["details"].get("field")) == (status, code, field), (extra, error)


def test_too_many_frames(tmp_path):
    """The frame bound is checked while decoding (gateway/uploads.py check_video), here with a small one."""
    from common.errors import InvalidVideo
    from gateway.uploads import UploadLimits, check_video

    data = encode_video(moving_frames(9, 16, 16, 2), "mp4", fps=16)
    assert check_video(data, "video/mp4", UploadLimits(max_video_frames=9), "video")["frames"] == 9
    with pytest.raises(InvalidVideo) as info:
        check_video(data, "video/mp4", UploadLimits(max_video_frames=8), "video")
    assert info.value.details == {"field": "video", "max_frames": 8}
    mkv = encode_video(moving_frames(5, 16, 16, 2), **LOSSLESS)
    assert check_video(mkv, "", UploadLimits(), "video")["format"] == "mkv"
    with pytest.raises(Exception) as refused:  # a pose video stays MP4 / WebM
        check_video(mkv, "", UploadLimits(), "pose_video")
    assert getattr(refused.value, "code", None) == "UNSUPPORTED_MEDIA_TYPE"


# ---- ownership, with API keys ----

def test_another_users_job_is_not_found(keyed_system):
    from gateway.keys import KeyStore
    from tests.helpers import keyed_view

    s = keyed_view(keyed_system, "promote-")
    store = KeyStore(s.state_dir / "keys.sqlite3")
    try:
        for name in ("alice", "bob"):
            s.tokens[name] = store.create(s.key_prefix + name)[1]
    finally:
        store.close()
    s.key_tokens.extend([s.tokens["alice"], s.tokens["bob"]])

    def as_user(name: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return s.json(method, path, body, headers={"Authorization": f"Bearer {s.tokens[name]}"})

    status, body = as_user("alice", "POST", "/api/v1/generate",
                           {"model": "t2v", "quality_preset": "draft", "prompt": "alice's draft", "seed": 8})
    assert status == 202, body
    job = body["job_id"]
    s.wait_final(job)
    status, theirs = as_user("bob", "POST", f"/api/v1/promote/{job}", {"quality_preset": "standard"})
    _, unknown = as_user("bob", "POST", f"/api/v1/promote/{'0' * 32}", {"quality_preset": "standard"})
    assert status == 404 and theirs["error"]["code"] == unknown["error"]["code"] == "JOB_NOT_FOUND"
    status, mine = as_user("alice", "POST", f"/api/v1/promote/{job}", {"quality_preset": "standard"})
    assert status == 202, mine
    assert s.wait_final(mine["job_id"])["status"] == "completed"
    status, result = as_user("alice", "GET", f"/api/v1/result/{mine['job_id']}")
    assert result["metadata"]["parent_job_id"] == job


def test_bad_input_videos_fail_in_the_text_encoder(stack, tmp_path):
    """What reaches the stages despite admission (a file changed or cut in the spool folder, a
    model here without a VAE for video) fails the job with a structured error; the stages go on."""
    from common.errors import JobFailedError

    data = encode_video(moving_frames(5, 32, 32, 9), **LOSSLESS)
    (tmp_path / "junk.mkv").write_bytes(data[:4] + bytes(range(256)) * 4)  # an EBML magic, then nothing
    (tmp_path / "short.mkv").write_bytes(encode_video(moving_frames(3, 32, 32, 9), **LOSSLESS))
    cases = [("t2v-A14B", "junk.mkv", "does not decode"), ("t2v-A14B", "short.mkv", "gives 3 frames"),
             ("t2v-A14B", "missing.mkv", "missing"), ("i2v-A14B", "short.mkv", "takes no input video")]
    for model, name, words in cases:
        p = default_params(stack.config, model, prompt="refused", height=32, width=32, steps=2, num_frames=5)
        p.strength, p.video = 0.5, {"file": name, "format": "mkv", "width": 32, "height": 32, "frames": 5,
                                    "fps": p.fps}
        with pytest.raises(JobFailedError) as info:
            stack.driver.run(p, timeout_s=120, video_path=tmp_path / name)
        assert info.value.details["stage"] == "text_encoder"
        assert info.value.details["error"]["code"] == "INVALID_REQUEST"
        assert words in info.value.details["error"]["message"], info.value.details
        assert str(tmp_path) not in str(info.value.details)


def test_the_child_request_keeps_the_parents_own_loras_not_the_distillation_one():
    """broker/promote.py in-process: a distilled draft's child carries the request's LoRAs (not the
    step-distillation LoRA the draft preset put first), the parent's encoding, frames, fps and seed;
    the promote's options win."""
    from broker.promote import child_request
    from broker.store import Job
    from common.config import Config

    config = Config.load(environ={"WAN_SERVER__MODELS__T2V_A14B__DISTILL_LORA": '"lightning"'})
    part = {"transformer": {"file": "x.safetensors", "sha256": "0" * 64}}
    params = {"prompt": "a kite", "negative_prompt": "dull", "seed": 5, "num_frames": 9, "fps": 12,
              "width": 32, "height": 32,
              "loras": [{"name": "lightning", "scale": 1.0, "parts": part},
                        {"name": "style", "scale": 0.5, "parts": part}],
              "encoding": {"codec": "h265", "bit_depth": 8, "lossless_master": True}}
    parent = Job(seq=1, id="a" * 32, owner="", model="t2v-A14B", preset="draft", params=params, route=[], priority=0,
                 status="completed", stage=None, progress=1.0, attempt=1, created_at=0.0, started_at=0.0,
                 finished_at=1.0, error=None, output_path=None, timings={},
                 outputs={"files": [{"file": f"{'a' * 32}.mp4"}, {"file": f"{'a' * 32}.mkv"}]})
    request, source = child_request(config, parent, {"quality_preset": "cinema", "custom_options": {"crf": 20}})
    assert source == "lossless_master"
    assert request == {"model": "t2v-A14B", "prompt": "a kite", "negative_prompt": "dull", "quality_preset": "cinema",
                       "seed": 5, "strength": catalog.PROMOTE_STRENGTH,
                       "custom_options": {"num_frames": 9, "fps": 12, "loras": [{"name": "style", "scale": 0.5}],
                                          "codec": "h265", "bit_depth": 8, "lossless_master": True, "crf": 20}}
    parent.outputs = {"files": [{"file": f"{'a' * 32}.mp4"}]}
    request, source = child_request(config, parent, {"quality_preset": "pro", "strength": 0.9, "prompt": "a bird",
                                                     "custom_options": {"loras": []}})
    assert source == "mp4" and request["prompt"] == "a bird" and request["strength"] == 0.9
    assert request["custom_options"]["loras"] == []
