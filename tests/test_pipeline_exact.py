"""The stage processes, over real sockets, produce frames bit-identical to diffusers' WanPipeline."""

from __future__ import annotations

import av
import msgpack
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline

from broker.driver import default_params
from common import messages as m
from stages import schedule
from stages.models import PipelineInfo, model_dir
from stages.vae import to_uint8

CASES = [
    # model, prompt, negative, seed, steps, height, width, guidance, guidance_2
    ("t2v-A14B", "a red car drives  through the city at night", "blurry", 3, 6, 32, 48, 4.0, 3.0),
    ("t2v-A14B", "an astronaut floats over a misty ocean", "", 11, 4, 64, 64, 5.0, None),
    ("t2v-A14B", "a cat dances on a neon stage", "low quality", 2026, 10, 48, 32, 3.5, 2.0),
    ("t2v-A14B", "waves turn golden at sunset", "", 5, 3, 32, 32, 1.0, None),  # guidance off
    ("ti2v-5B", "a dog runs across the snow", "blurry", 7, 5, 64, 32, 5.0, None),
    ("ti2v-5B", "a tiny robot plays in the kitchen", "", 1, 4, 32, 64, 4.0, None),
]


def vae_frames(stack, job_id: str) -> np.ndarray:
    """The uint8 frames the vae process sent to the muxer, read from its wire recording."""
    (path,) = (stack.state_dir / "record" / "vae").glob(f"*-{job_id}.msgpack")
    body = msgpack.unpackb(path.read_bytes(), raw=False)
    msg = m.decode(body["out"][0], stack.config.limits)
    assert isinstance(msg, m.MuxJob)
    return msg.frames.numpy()


def reference(folder, p: m.JobParams) -> np.ndarray:
    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if p.shift is not None:  # what a preset's shift means: the scheduler's flow_shift
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=p.shift)
    out = pipe(
        prompt=p.prompt,
        negative_prompt=p.negative_prompt,
        height=p.height,
        width=p.width,
        num_frames=p.num_frames,
        num_inference_steps=p.steps,
        guidance_scale=p.guidance_scale,
        guidance_scale_2=p.guidance_scale_2,
        generator=torch.Generator().manual_seed(p.seed),
        output_type="np",
    ).frames
    return to_uint8(out)[0]


def expected_handoff(stack, model: str, steps: int, shift: float | None = None) -> int:
    folder = model_dir(stack.config, model)
    info = PipelineInfo.read(folder)
    sched = UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler", **({} if shift is None else {"flow_shift": shift}))
    sched.set_timesteps(steps)
    boundary = schedule.boundary_timestep(info.boundary_ratio, 1000) if info.has_transformer_2 else None
    return schedule.handoff_step(sched.timesteps, boundary, stack.config.model(model).get("split_fraction", 0.5))


@pytest.fixture(scope="module")
def results(stack):
    """Submit every case at once (they pipeline through the processes), then collect."""
    driver = stack.driver
    jobs = []
    for model, prompt, negative, seed, steps, h, w, g, g2 in CASES:
        p = default_params(
            stack.config, model, prompt=prompt, negative_prompt=negative, seed=seed, steps=steps,
            height=h, width=w, num_frames=9, guidance_scale=g, guidance_scale_2=g2,
        )
        jobs.append((p, driver.submit(p)))
    return [(p, job_id, driver.wait(job_id, timeout_s=300)) for p, job_id in jobs]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_frames_bit_identical_to_wanpipeline(stack, results, case):
    p, job_id, outcome = results[case]
    ours = vae_frames(stack, job_id)
    ref = reference(model_dir(stack.config, p.model), p)
    assert ours.dtype == np.uint8 and ours.shape == (p.num_frames, p.height, p.width, 3)
    assert ref.shape == ours.shape
    assert ours.std() > 1.0, "frames are flat: the comparison would prove little"
    assert np.array_equal(ours, ref), f"max |diff| {np.abs(ours.astype(int) - ref).max()}"

    # The steps were split between the two DiT processes where the schedule says.
    steps = [r for r in outcome.reports if r.event == "step"]
    assert [r.step for r in steps] == list(range(1, p.steps + 1))
    k = expected_handoff(stack, p.model, p.steps)
    assert [r.stage for r in steps] == ["dit_high"] * k + ["dit_low"] * (p.steps - k)


def test_cases_cover_varied_handoffs_and_guidance(stack):
    handoffs = {expected_handoff(stack, c[0], c[4]) for c in CASES if c[0] == "t2v-A14B"}
    assert len(handoffs) >= 3, handoffs
    assert any(c[8] is not None and c[8] != c[7] for c in CASES)
    assert len({c[3] for c in CASES}) == len(CASES)


def test_different_seed_gives_different_frames(stack, results):
    a = vae_frames(stack, results[4][1])
    b = vae_frames(stack, results[5][1])
    assert a.shape != b.shape or not np.array_equal(a, b)
    p = results[0][0]
    other = reference(model_dir(stack.config, p.model), m.JobParams(**{**p.__dict__, "seed": p.seed + 1}))
    assert not np.array_equal(vae_frames(stack, results[0][1]), other)


@pytest.mark.parametrize("case", [0, 4])
def test_mp4_decodes_to_requested_frames(stack, results, case):
    p, job_id, outcome = results[case]
    done = outcome.done
    assert done.path.endswith(f"{job_id}.mp4")
    with av.open(done.path) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.average_rate == p.fps
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.pix_fmt == "yuv420p"
    assert len(frames) == p.num_frames == done.num_frames
    assert frames[0].shape == (p.height, p.width, 3)
    # Lossy (and yuv420p halves chroma resolution), but the luma is close to what the VAE produced.
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    src = vae_frames(stack, job_id).astype(np.float32) @ luma
    decoded = np.stack(frames).astype(np.float32) @ luma
    err = np.abs(decoded - src).mean()
    assert err < 6.0, err


def test_job_shift_replaces_the_scheduler_shift_exactly(stack):
    """A preset's shift reaches the DiT stages: frames equal WanPipeline with that flow_shift, differ
    from the checkpoint's shift, and the expert hand-off moves with the shifted timesteps."""
    p = default_params(stack.config, "t2v-A14B", prompt="a boat floats on a calm river", negative_prompt="",
                       seed=21, steps=8, height=32, width=32, num_frames=5, guidance_scale=4.0, guidance_scale_2=3.0,
                       shift=2.0)
    outcome = stack.driver.run(p, timeout_s=300)
    ours = vae_frames(stack, outcome.done.job_id)
    folder = model_dir(stack.config, p.model)
    assert np.array_equal(ours, reference(folder, p))
    assert not np.array_equal(ours, reference(folder, m.JobParams(**{**p.__dict__, "shift": None})))
    k = expected_handoff(stack, p.model, p.steps, shift=2.0)
    assert k != expected_handoff(stack, p.model, p.steps)
    steps = [r.stage for r in outcome.reports if r.event == "step"]
    assert steps == ["dit_high"] * k + ["dit_low"] * (p.steps - k)
