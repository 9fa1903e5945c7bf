"""Video-to-video and promoting a draft (README "Promote and video-to-video").

- Through the stage processes (`stack`): a tiny T2V-A14B job given a video and a strength gives the
  frames diffusers' `WanVideoToVideoPipeline` gives for the same frames, strength and seed, bit for
  bit. That pipeline has one transformer; T2V-A14B has two experts, switched (as `WanPipeline` does)
  at the first timestep below the boundary. The oracle is the pipeline itself, handed the expert of
  its first timestep and switched to the low-noise expert by its own `callback_on_step_end` before
  the first timestep below the boundary (its loop calls `self.transformer` at every step); the
  guidance is the same on both experts (the pipeline has one scale). One case starts after the
  hand-off (only the low-noise expert runs: the pipeline as it is), one before it.
- Through the real system (`api_system`): a finished draft promoted to a higher preset; the child's
  metadata names its parent and its source; the errors of promote and of an uploaded video.
- Ownership with API keys (`keyed_system`): another user's job is not found.
"""

from __future__ import annotations

import base64
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


def lossless_mkv(frames: list[np.ndarray], fps: int = 16) -> bytes:
    """Frames as FFV1 (RGB) in Matroska, as the muxer writes a lossless master."""
    import io

    out = io.BytesIO()
    with av.open(out, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "bgr0"
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def decoded(data: bytes) -> list[Image.Image]:
    import io

    with av.open(io.BytesIO(data)) as container:
        return [Image.fromarray(f.to_ndarray(format="rgb24")) for f in container.decode(container.streams.video[0])]


def cover_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """What the server promises to do with a frame of another size: scale to cover (Lanczos), crop the centre."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    sw, sh = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    left, top = (sw - width) // 2, (sh - height) // 2
    return image.resize((sw, sh), Image.Resampling.LANCZOS).crop((left, top, left + width, top + height))


def v2v_reference(folder: Path, p: m.JobParams, frames: list[Image.Image], boundary_ratio: float) -> np.ndarray:
    """WanVideoToVideoPipeline's frames for `p` from `frames`, its transformer switched to the
    low-noise expert before the first timestep below the boundary (the module's docstring)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanVideoToVideoPipeline

    from stages.vae import to_uint8

    base = WanPipeline.from_pretrained(folder)
    scheduler = UniPCMultistepScheduler.from_config(base.scheduler.config,
                                                    **({} if p.shift is None else {"flow_shift": p.shift}))
    boundary = boundary_ratio * scheduler.config.num_train_timesteps
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

    def switch(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if i + 1 < len(timesteps) and timesteps[i + 1] < boundary:
            pipe.transformer = low
        return {}

    out = pipe(video=frames, prompt=p.prompt, negative_prompt=p.negative_prompt, height=p.height, width=p.width,
               num_inference_steps=p.steps, guidance_scale=p.guidance_scale, strength=p.strength,
               generator=torch.Generator().manual_seed(p.seed), output_type="np", callback_on_step_end=switch).frames
    result: np.ndarray = to_uint8(out)[0]
    return result


def handoff(stack: Any, model: str, steps: int) -> tuple[int, float]:
    folder = model_dir(stack.config, model)
    info = PipelineInfo.read(folder)
    ratio = stack.config.model(model).boundary_ratio
    ratio = info.boundary_ratio if ratio is None else ratio
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    sched.set_timesteps(steps)
    return schedule.handoff_step(sched.timesteps, ratio * 1000, 0.5), ratio


# model, seed, steps, strength, job size (WxH), source size (WxH), frames
CASES = [
    ("t2v-A14B", 31, 6, 0.5, (48, 32), (64, 48), 9),
    ("t2v-A14B", 32, 5, 0.8, (32, 32), (32, 32), 5),
]


@pytest.fixture(scope="module")
def v2v_results(stack, tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    jobs = []
    for model, seed, steps, strength, (w, h), (sw, sh), n in CASES:
        path = folder / f"{seed}.mkv"
        data = lossless_mkv(moving_frames(n, sw, sh, seed))
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


def test_v2v_cases_cover_both_sides_of_the_handoff(stack):
    sides = set()
    for model, _, steps, strength, *_ in CASES:
        k, _ = handoff(stack, model, steps)
        sides.add(catalog.strength_start(steps, strength) < k)
    assert sides == {True, False}
