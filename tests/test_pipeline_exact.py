"""The stage processes, over real sockets, produce frames bit-identical to diffusers' pipelines:
`WanPipeline` for text-to-video, `WanImageToVideoPipeline` for I2V-A14B and for TI2V-5B given an
image (the pipeline diffusers documents for Wan2.2 TI2V-5B image-to-video; with the model's
`expand_timesteps` it does first-frame conditioning with per-token timesteps)."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from PIL import Image

from broker.driver import default_params
from common import messages as m
from common.errors import JobFailedError
from stages import schedule
from stages.models import PipelineInfo, model_dir
from tests.helpers import reference, vae_frames

CASES = [
    # model, prompt, negative, seed, steps, height, width, guidance, guidance_2
    ("t2v-A14B", "a red car drives  through the city at night", "blurry", 3, 6, 32, 48, 4.0, 3.0),
    ("t2v-A14B", "an astronaut floats over a misty ocean", "", 11, 4, 64, 64, 5.0, None),
    ("t2v-A14B", "a cat dances on a neon stage", "low quality", 2026, 10, 48, 32, 3.5, 2.0),
    ("t2v-A14B", "waves turn golden at sunset", "", 5, 3, 32, 32, 1.0, None),  # guidance off
    ("ti2v-5B", "a dog runs across the snow", "blurry", 7, 5, 64, 32, 5.0, None),
    ("ti2v-5B", "a tiny robot plays in the kitchen", "", 1, 4, 32, 64, 4.0, None),
]

# Image-conditioned cases: the same, plus the source image's size (WxH; another aspect than the
# video's is scaled to cover and centre-cropped by the stage). I2V-A14B step counts put the
# expert hand-off after 1, 2, 3 and 4 steps.
IMAGE_CASES = [
    ("i2v-A14B", "a cat walks on the beach", "blurry", 21, 2, 32, 48, 3.5, 3.5, (48, 32)),
    ("i2v-A14B", "a red boat floats on a calm river", "", 22, 4, 48, 32, 3.5, 2.0, (90, 140)),
    ("i2v-A14B", "the camera pans across a neon city", "low quality", 23, 6, 64, 64, 5.0, None, (64, 64)),
    ("i2v-A14B", "a bird flies over a misty forest", "", 24, 9, 32, 32, 1.0, None, (41, 73)),  # guidance off
    ("ti2v-5B", "a dog runs across the snow", "blurry", 25, 4, 64, 32, 5.0, None, (100, 60)),
    ("ti2v-5B", "a robot dances in the garden", "", 26, 3, 32, 64, 4.0, None, (32, 64)),
]


def source_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A test picture with structure (gradients, a block) and noise, so the condition latents vary."""
    w, h = size
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    rgb = torch.stack([x, y, (x + y) / 2]) * 200
    rgb[:, h // 4 : h // 2, w // 3 : w // 2] = torch.tensor([250.0, 30.0, 60.0]).view(3, 1, 1)
    rgb = (rgb + torch.rand(3, h, w, generator=g) * 55).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def cover_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """What the server promises to do with an image of another size: scale to cover, crop the centre."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    sw, sh = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    left, top = (sw - width) // 2, (sh - height) // 2
    return image.resize((sw, sh), Image.Resampling.LANCZOS).crop((left, top, left + width, top + height))


def expected_handoff(stack, model: str, steps: int, shift: float | None = None) -> int:
    folder = model_dir(stack.config, model)
    info = PipelineInfo.read(folder)
    shifted = {} if shift is None else {"flow_shift": shift}
    sched = UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler", **shifted)
    sched.set_timesteps(steps)
    boundary = schedule.boundary_timestep(info.boundary_ratio, 1000) if info.has_transformer_2 else None
    return schedule.handoff_step(sched.timesteps, boundary, stack.config.model(model).split_fraction)


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


@pytest.fixture(scope="module")
def image_results(stack, tmp_path_factory):
    """Every image case at once, each with its own PNG; returns (params, job_id, outcome, png path)."""
    folder = tmp_path_factory.mktemp("images")
    jobs = []
    for model, prompt, negative, seed, steps, h, w, g, g2, size in IMAGE_CASES:
        png = folder / f"{seed}.png"
        source_image(size, seed).save(png)
        p = default_params(
            stack.config, model, prompt=prompt, negative_prompt=negative, seed=seed, steps=steps,
            height=h, width=w, num_frames=9, guidance_scale=g, guidance_scale_2=g2,
        )
        jobs.append((p, stack.driver.submit(p, image_path=png), png))
    return [(p, job_id, stack.driver.wait(job_id, timeout_s=300), png) for p, job_id, png in jobs]


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
    """The seed reaches the stages: the same job with the next seed gives other frames, and those
    are the frames WanPipeline gives for that seed."""
    p, job_id, _ = results[0]
    other = m.JobParams(**{**p.__dict__, "seed": p.seed + 1})
    ours = vae_frames(stack, stack.driver.run(other, timeout_s=300).done.job_id)
    first = vae_frames(stack, job_id)
    assert ours.shape == first.shape and ours.std() > 1.0
    assert not np.array_equal(ours, first)
    assert np.array_equal(ours, reference(model_dir(stack.config, p.model), other))


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


@pytest.mark.parametrize("case", range(len(IMAGE_CASES)))
def test_image_frames_bit_identical_to_wanimagetovideopipeline(stack, image_results, case):
    p, job_id, outcome, png = image_results[case]
    ours = vae_frames(stack, job_id)
    with Image.open(png) as img:
        image = cover_crop(img.convert("RGB"), p.width, p.height)
    ref = reference(model_dir(stack.config, p.model), p, image)
    assert ours.dtype == np.uint8 and ours.shape == (p.num_frames, p.height, p.width, 3)
    assert ref.shape == ours.shape
    assert ours.std() > 1.0, "frames are flat: the comparison would prove little"
    assert np.array_equal(ours, ref), f"max |diff| {np.abs(ours.astype(int) - ref).max()}"

    steps = [r for r in outcome.reports if r.event == "step"]
    assert [r.step for r in steps] == list(range(1, p.steps + 1))
    k = expected_handoff(stack, p.model, p.steps)
    assert [r.stage for r in steps] == ["dit_high"] * k + ["dit_low"] * (p.steps - k)


def test_image_cases_cover_every_i2v_handoff(stack):
    handoffs = {expected_handoff(stack, c[0], c[4]) for c in IMAGE_CASES if c[0] == "i2v-A14B"}
    assert handoffs == {1, 2, 3, 4}, handoffs
    assert any(c[9] != (c[6], c[5]) for c in IMAGE_CASES if c[0] == "ti2v-5B")  # a crop in image mode


def test_the_image_decides_the_frames(stack, image_results):
    """Another image, same everything else: other frames (so the condition really reaches the DiT),
    and TI2V-5B with an image differs from TI2V-5B without one."""
    p, job_id, _, png = image_results[0]
    with Image.open(png) as img:
        flipped = cover_crop(img.convert("RGB"), p.width, p.height).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert not np.array_equal(vae_frames(stack, job_id), reference(model_dir(stack.config, p.model), p, flipped))
    p, job_id, _, _ = image_results[4]
    assert not np.array_equal(vae_frames(stack, job_id), reference(model_dir(stack.config, p.model), p))


def test_image_mismatches_fail_in_the_text_encoder(stack, image_results, tmp_path):
    """The stages refuse what the API also refuses: I2V-A14B with no image, a text-only model given
    one, an image file that does not decode. Each is a structured failure; the stages go on."""
    png = image_results[0][3]
    (tmp_path / "broken.png").write_bytes(png.read_bytes()[:60])
    cases = [
        ("i2v-A14B", None, "needs an input image"),
        ("t2v-A14B", png, "takes no input image"),
        ("i2v-A14B", tmp_path / "broken.png", "does not decode"),
        ("i2v-A14B", tmp_path / "missing.png", "missing"),
    ]
    for model, image, words in cases:
        p = default_params(stack.config, model, prompt="refused", height=32, width=32, steps=2)
        with pytest.raises(JobFailedError) as info:
            stack.driver.run(p, timeout_s=120, image_path=image)
        assert info.value.details["stage"] == "text_encoder"
        assert info.value.details["error"]["code"] == "INVALID_REQUEST"
        assert words in info.value.details["error"]["message"]
    p = default_params(stack.config, "i2v-A14B", prompt="after the refusals", height=32, width=32, steps=2)
    assert stack.driver.run(p, timeout_s=120, image_path=png).done.num_frames == p.num_frames
