"""An S2V job through the stage processes: clips round the route's DiT..VAE cycle.

The route of s2v-14B is the usual one (text_encoder, dit_high, dit_low, vae, muxer); the job goes
round its DiT..VAE part once per clip: the VAE sends the next clip back to the first DiT
(`ClipDenoiseJob.starts_cycle`). These tests check what the processes must agree on for that: the
clip messages on the wire, where each goes next, and the broker's idea of the job (progress over
all clips that never goes backwards; the checkpoint it resumes from, with its clip; the stages a
job still needs).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from PIL import Image
from websockets.sync.client import connect

from broker import admission, memory
from broker.broker import Broker
from broker.dispatch import stages_ahead
from broker.progress import timing_key
from common import messages as m
from common import wire
from common.config import Config, profile_path
from common.errors import FieldError, InsufficientMemory
from stages.runtime import next_stage
from tests.helpers import System, encode_video, kill9, post_multipart, running_system, wait_for

ROUTE = ["text_encoder", "dit_high", "dit_low", "vae", "muxer"]
GIB = 1 << 30
LIMITS = wire.Limits(max_message_bytes=64 << 20, max_header_bytes=64 << 10, max_frames=64)


def s2v_params(clips: int = 3, frames_per_clip: int = 8) -> m.JobParams:
    return m.JobParams(
        model="s2v-14B", prompt="a woman sings", negative_prompt="", seed=5, steps=4, height=64, width=64,
        num_frames=frames_per_clip * clips - 3, fps=16, guidance_scale=4.5, shift=3.0, image_sha256="ab" * 32,
        audio={"file": "audio.wav", "sha256": "cd" * 32, "format": "wav", "sample_rate": 16000, "channels": 1,
               "samples": 16000, "duration_s": 1.0, "start_s": 3 / 16},
        frames_per_clip=frames_per_clip, num_clips=clips,
    )


def conditions(pose: bool) -> m.ClipConditions:
    g = torch.Generator().manual_seed(0)
    return m.ClipConditions(
        prompt_embeds=torch.randn(1, 512, 32, generator=g),
        negative_prompt_embeds=torch.randn(1, 512, 32, generator=g),
        ref_latents=torch.randn(1, 16, 1, 8, 8, generator=g),
        audio_features=torch.randn(1, 25, 32, 16, generator=g),
        pose_latents=torch.randn(1, 16, 4, 8, 8, generator=g) if pose else None,
    )


def roundtrip(msg: m.Message) -> m.Message:
    return m.decode([bytes(p) if not isinstance(p, bytes) else p for p in m.encode(msg)], LIMITS)


def same_tensors(a: object, b: object) -> None:
    for name in vars(a):
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), name
        elif isinstance(x, m.ClipConditions):
            same_tensors(x, y)
        else:
            assert x == y, name


@pytest.mark.parametrize("pose", [False, True], ids=["no-pose", "pose"])
def test_clip_messages_round_trip_on_the_wire(pose: bool) -> None:
    """Both clip messages, with the nested conditions, come back equal, tensors bit for bit; the
    hand-off within a clip keeps the scheduler state."""
    p = s2v_params()
    g = torch.Generator().manual_seed(1)
    denoise = m.ClipDenoiseJob(
        job_id="j1", attempt=2, route=ROUTE, params=p, clip=1, conditions=conditions(pose),
        motion_latents=torch.randn(1, 16, 19, 8, 8, generator=g), latents=torch.randn(1, 16, 2, 8, 8, generator=g),
        scheduler_state={"step_index": 2, "begin_index": 0, "model_outputs": [None, torch.ones(2)],
                         "lower_order_nums": 2},
        step=2,
    )
    back = roundtrip(denoise)
    assert isinstance(back, m.ClipDenoiseJob) and back.clip == 1 and back.step == 2
    assert back.params == p and (back.conditions.pose_latents is None) == (not pose)
    same_tensors(denoise.conditions, back.conditions)
    assert torch.equal(back.motion_latents, denoise.motion_latents) and back.latents is not None
    assert torch.equal(back.latents, denoise.latents)  # type: ignore[arg-type]
    assert back.scheduler_state is not None and torch.equal(back.scheduler_state["model_outputs"][1], torch.ones(2))

    decode = m.ClipDecodeJob(job_id="j1", attempt=2, route=ROUTE, params=p, clip=2, conditions=conditions(pose),
                             motion_latents=torch.zeros(1, 16, 19, 8, 8), latents=torch.ones(1, 16, 2, 8, 8))
    back2 = roundtrip(decode)
    assert isinstance(back2, m.ClipDecodeJob) and back2.clip == 2
    same_tensors(decode.conditions, back2.conditions)


def test_clip_messages_refuse_what_they_do_not_know() -> None:
    """The decoder checks the nested conditions like any field: a missing tensor, a wrong type, an
    unknown key are refused with a typed error."""
    msg = m.ClipDecodeJob(job_id="j1", attempt=1, route=ROUTE, params=s2v_params(), clip=0,
                          conditions=conditions(False), motion_latents=torch.zeros(1), latents=torch.zeros(1))
    header, *frames = m.encode(msg)
    fields = wire.unpack([bytes(header), *map(bytes, frames)], LIMITS)
    fields.pop("v"), fields.pop("type")
    for broken in ({"audio_features": None}, {"ref_latents": "x"}, {"extra": 1}):
        cond = {**fields["conditions"], **broken}
        if broken == {"audio_features": None}:
            del cond["audio_features"]
        with pytest.raises(FieldError):
            m._build(m.ClipDecodeJob, {**fields, "conditions": cond}, "ClipDecodeJob")
    with pytest.raises(FieldError):
        m._build(m.ClipDecodeJob, {**fields, "clip": "1"}, "ClipDecodeJob")


def test_the_next_clip_goes_back_to_the_first_dit() -> None:
    """A ClipDenoiseJob sent by the VAE goes round to the route's first DiT; the hand-off within a
    clip to the next DiT; a plain DenoiseJob never goes back."""
    config = Config.load(environ={})
    assert next_stage(config, ROUTE, "vae", "dit", m.ClipDenoiseJob.starts_cycle) == "dit_high"
    assert next_stage(config, ROUTE, "dit_high", "dit", m.ClipDenoiseJob.starts_cycle) == "dit_low"
    assert next_stage(config, ROUTE, "text_encoder", "dit", True) == "dit_high"
    assert next_stage(config, ROUTE, "vae", "dit", m.DenoiseJob.starts_cycle) is None
    assert next_stage(config, ROUTE, "dit_low", "vae", m.ClipDecodeJob.starts_cycle) == "vae"


# ---- the broker's idea of an S2V job -------------------------------------------------------------


def started(broker: Broker, clips: int, job_id: str = "s2vjob") -> str:
    """An S2V job in the store, dispatched (attempt 1): the reports below are what its stages send."""
    p = s2v_params(clips)
    broker.store.add(job_id, "", p.model, "standard", vars(p), ROUTE, 0)
    attempt = broker.store.start(job_id)
    assert attempt == 1
    broker.inflight.dispatched(job_id, 1, ROUTE, "text_encoder")
    return job_id


def clip_reports(job_id: str, clips: int, steps: int, attempt: int = 1, first_clip: int = 0) -> list[m.StageReport]:
    """The reports of an uninterrupted S2V job from clip `first_clip` on, in the order the stages
    send them (steps split between dit_high and dit_low)."""
    def r(stage: str, event: str, clip: int, **kw: object) -> m.StageReport:
        return m.StageReport(job_id=job_id, attempt=attempt, stage=stage, event=event, clip=clip,
                             total_steps=steps, **kw)  # type: ignore[arg-type]

    out: list[m.StageReport] = []
    if first_clip == 0:
        out += [r("text_encoder", "accepted", 0), r("text_encoder", "checkpoint", 0, to="dit_high"),
                r("text_encoder", "forwarded", 0, to="dit_high")]
    half = steps // 2
    for clip in range(first_clip, clips):
        out.append(r("dit_high", "accepted", clip))
        out += [r("dit_high", "step", clip, step=i + 1) for i in range(half)]
        out += [r("dit_high", "checkpoint", clip, to="dit_low"), r("dit_high", "forwarded", clip, to="dit_low")]
        out.append(r("dit_low", "accepted", clip))
        out += [r("dit_low", "step", clip, step=i + 1) for i in range(half, steps)]
        out += [r("dit_low", "checkpoint", clip, to="vae"), r("dit_low", "forwarded", clip, to="vae")]
        out.append(r("vae", "accepted", clip))
        if clip + 1 < clips:  # the next clip goes back to the first DiT; the report names that clip
            out += [r("vae", "checkpoint", clip + 1, to="dit_high"), r("vae", "forwarded", clip + 1, to="dit_high")]
        else:
            out += [r("vae", "forwarded", clip, to="muxer")]
    out.append(r("muxer", "accepted", clips - 1))
    return out


def test_progress_runs_over_all_clips_and_never_back(broker: Broker) -> None:
    """Progress rises with every step of every clip, from the text encoder to the muxer, reaching
    past 0.9 only after the last clip's VAE; each clip takes an equal share."""
    clips, steps = 3, 4
    job_id = started(broker, clips)
    seen: list[tuple[float, m.StageReport]] = []
    for report in clip_reports(job_id, clips, steps):
        broker.on_report(report)
        job = broker.store.get(job_id)
        assert job is not None
        seen.append((job.progress, report))
    values = [v for v, _ in seen]
    assert values == sorted(values), values
    steps_seen = [v for v, r in seen if r.event == "step"]
    assert len(set(steps_seen)) == len(steps_seen) == clips * steps  # every step moves it on
    # Each clip's last step lands at the same share: 0.05 + 0.8 * (c+1)/3 + 0.1 * c/3.
    last_steps = [v for v, r in seen if r.event == "step" and r.step == steps]
    expected = [0.05 + 0.8 * (c + 1) / clips + 0.1 * c / clips for c in range(clips)]
    assert last_steps == pytest.approx(expected)
    assert values[-1] == pytest.approx(0.95)
    job = broker.store.get(job_id)
    assert job is not None and job.checkpoint == "vae" and job.checkpoint_clip == clips - 1


def test_the_eta_counts_every_clip(broker: Broker) -> None:
    """The stage timings are per pass (a DiT or the VAE records one per clip): the ETA of a job of
    three clips counts its DiT and VAE passes three times."""
    job_id = started(broker, 3)
    job = broker.store.get(job_id)
    assert job is not None
    for stage, seconds in {"text_encoder": 1.0, "dit_high": 2.0, "dit_low": 2.0, "vae": 1.0, "muxer": 1.0}.items():
        broker.store.record_timing(timing_key(job.params), stage, seconds)
    assert broker.progress.eta(job) == 1.0 + 3 * (2.0 + 2.0 + 1.0) + 1.0


def test_late_reports_of_an_earlier_clip_move_nothing_back(broker: Broker) -> None:
    """Reports of two processes arrive out of order: dit_high's report of clip 1 after dit_low's of
    clip 1, or the VAE's of clip 0 after clip 1 started, leave the job, its progress and its
    checkpoint where the newest put them."""
    job_id = started(broker, 3)
    reports = clip_reports(job_id, 3, 4)
    for report in reports:
        if report.stage == "dit_low" and report.clip == 1 and report.event == "checkpoint":
            break
        broker.on_report(report)
    job = broker.store.get(job_id)
    assert job is not None and (job.checkpoint, job.checkpoint_clip) == ("dit_low", 1)
    progress = job.progress
    late = [
        m.StageReport(job_id=job_id, attempt=1, stage="vae", event="checkpoint", clip=1, to="dit_high"),
        m.StageReport(job_id=job_id, attempt=1, stage="dit_low", event="checkpoint", clip=0, to="vae"),
        m.StageReport(job_id=job_id, attempt=1, stage="vae", event="accepted", clip=0),
        m.StageReport(job_id=job_id, attempt=1, stage="dit_high", event="step", clip=0, step=2, total_steps=4),
    ]
    for report in late:
        broker.on_report(report)
    job = broker.store.get(job_id)
    assert job is not None and (job.checkpoint, job.checkpoint_clip) == ("dit_low", 1)
    assert job.progress == progress and job.stage == "dit_low"
    record = broker.inflight.jobs[job_id]
    assert (record.stage, record.clip) == ("dit_low", 1)


def test_a_resumed_s2v_job_needs_the_whole_cycle(broker: Broker) -> None:
    """A job resuming at its VAE with clips to go still needs the DiTs (its next clips pass them); a
    one-shot job resuming at the VAE needs only what follows."""
    job_id = started(broker, 3)
    job = broker.store.get(job_id)
    assert job is not None
    assert stages_ahead(broker.config, job, "vae") == ["dit_high", "dit_low", "vae", "muxer"]
    assert stages_ahead(broker.config, job, "dit_high") == ["dit_high", "dit_low", "vae", "muxer"]
    one = started(broker, 1, "oneclip")
    job = broker.store.get(one)
    assert job is not None and stages_ahead(broker.config, job, "vae") == ["vae", "muxer"]


# ---- memory admission ------------------------------------------------------------------------------


def test_s2v_tokens_count_the_clip_the_reference_and_the_motion_frames() -> None:
    """At the reference's 1024x704 with 80 frames per clip: 20 latent frames of 44 x 64 tokens, one
    for the reference image and FramePack's 1.5 frames' worth of motion: 63,360 (the ~63k of
    issue 10); fewer frames per clip or a smaller area give fewer."""
    assert memory.dit_tokens("s2v-14B", 1024, 704, 80) == 20 * 2816 + 2816 + 4224 == 63360
    assert memory.dit_tokens("s2v-14B", 832, 448, 80) == 52 * 28 * 22.5 == 32760
    assert memory.dit_tokens("s2v-14B", 1024, 704, 40) < 63360


def s2v_job(width: int, height: int, frames_per_clip: int = 80, clips: int = 12) -> m.JobParams:
    p = s2v_params(clips, frames_per_clip)
    p.width, p.height = width, height
    return p


def served_alone(name: str) -> Config:
    return Config.load(profile_path(name), environ={"WAN_SERVER__SERVING__MODELS": '["s2v-14B"]'})


@pytest.mark.parametrize("name", ["single-gpu", "dual-gpu", "dual-3090"])
def test_s2v_presets_fit_the_cards_their_profile_was_sized_for(name: str) -> None:
    """Served alone (as each profile's comment says), every s2v-14B preset's peak per card, from the
    nominal weights, fits the cards the profile describes, whatever the clip count: each clip's
    peak is the same."""
    cfg = served_alone(name)
    cards = {d: g * GIB for d, g in (cfg.hardware.device_memory_gib or {}).items()}
    weights = {s: memory.nominal_weight_bytes(cfg, s) for s in cfg.stage_names()}
    for preset, row in admission.preset_table(cfg, "s2v-14B").items():
        w, h = (int(x) for x in row["resolution"].split("x"))
        for clips in (1, 12):
            p = s2v_job(w, h, row["frames_per_clip"], clips)
            for device, need in memory.estimate(cfg, p, weights, cfg.route("s2v-14B")).items():
                if device.startswith("cuda"):
                    assert need.total <= cards[device], (preset, device, need.total / GIB)


def test_a_24gb_card_refuses_s2v_at_the_reference_area_with_a_suggestion() -> None:
    """dual-3090 with the fp8 DiT (15.2 GiB per card): 832x448 fits each card, 1024x704 does not fit
    cuda:1 (the DiT beside the VAE), refused with the S2V suggestion (max_area, frames_per_clip)."""
    cfg = served_alone("dual-3090")
    weights = {s: memory.nominal_weight_bytes(cfg, s) for s in ("dit_high", "dit_low")}
    assert all(15.0 * GIB < b < 15.3 * GIB for b in weights.values()), weights
    beats = {}
    for stage in ("text_encoder", "dit_high", "dit_low", "vae"):
        spec = cfg.stage(stage)
        beats[stage] = m.Heartbeat(stage=stage, pid=1, ready=True, device=spec.device,
                                   device_total_bytes=0 if spec.device == "cpu" else int(23.56 * GIB),
                                   weight_bytes=memory.nominal_weight_bytes(cfg, stage))
    route = cfg.route("s2v-14B")
    report = memory.check(cfg, s2v_job(832, 448), route, beats)
    assert report["cuda:1"]["needed_bytes"] > report["cuda:0"]["needed_bytes"] > 19 * GIB
    with pytest.raises(InsufficientMemory) as info:
        memory.check(cfg, s2v_job(1024, 704), route, beats)
    d = info.value.to_dict()["error"]["details"]
    assert d["device"] == "cuda:1" and d["tokens"] == 63360 and d["frames_per_clip"] == 80
    assert "max_area" in d["suggestion"] and "80 frames per clip" in info.value.message


# ---- a whole S2V job through the real processes ----------------------------------------------------
#
# The system of this module runs the tiny profile (which serves s2v-14B) with fault injection on:
# a fault point makes a stage sleep once when it takes its next message, so a test can hold a job
# in a chosen stage at a chosen clip and kill -9 that stage there. The reference is the model
# helper's in-process clip loop (`stages.s2v.sampler.run_job`) on the same inputs, computed with
# the pieces each have their own exactness tests: the prompt embeddings from the text encoder
# stage's `encode` (WanPipeline's, tests/test_pipeline_exact.py), the audio features from
# `stages.s2v.audio_features` (the release's AudioEncoder, tests/test_s2v_audio.py), the reference
# image fitted as the stage fits it (scale to cover, centre crop: `stages.image_condition`), the DiT
# and VAE loaded from the system's tiny model folder.

CLIPS, PER_CLIP, STEPS, SEED = 3, 8, 4, 7
PROMPT = "a woman sings on a stage"
S2V_REQUEST: dict[str, Any] = {"prompt": PROMPT, "model": "s2v", "quality_preset": "standard", "seed": SEED,
               "custom_options": {"steps": STEPS, "frames_per_clip": PER_CLIP, "num_clips": CLIPS,
                                  "lossless_master": True}}


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) * 32767).astype(np.int16)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.tobytes())
    return out.getvalue()


def png_bytes(width: int = 80, height: int = 64) -> bytes:
    g = np.random.default_rng(3)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 3 % 256, y * 4 % 256, (x + y) * 2 % 256], axis=-1) + g.integers(0, 40, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def pose_mp4(frames: int = 20, size: int = 64) -> bytes:
    """A moving bar, 16 fps MPEG-4: both sides decode the same file, so they see the same pixels."""
    images = []
    for i in range(frames):
        img = np.zeros((size, size, 3), np.uint8)
        img[:, (3 * i) % size : (3 * i) % size + 8] = (40 + 10 * i, 200, 255 - 9 * i)
        images.append(img)
    return encode_video(images, "mp4", "mpeg4")


AUDIO, IMAGE, POSE = wav_bytes(1.5), png_bytes(), pose_mp4()


@pytest.fixture(scope="module")
def system(model_cache: Path) -> Iterator[System]:
    with running_system(
        "wsv-",
        model_cache,
        setup=lambda s: (s.state_dir / "faults").mkdir(),
        WAN_SERVER__RUNTIME__FAULT_DIR="{state}/faults",
        WAN_SERVER__SERVING__MODELS='["s2v-14B"]',  # what these tests need: stages start and restart faster
    ) as s:
        yield s


@pytest.fixture(scope="module")
def loop(system: System) -> Any:
    """The reference's clip loop for S2V_REQUEST with `clips` clips (and a pose video), as uint8
    frames (frames, H, W, 3); the models are loaded once for the module."""
    from diffusers import AutoencoderKLWan

    from common.audio import load_16k_mono
    from stages import official
    from stages.image_condition import fit_short_side_and_crop, load_image
    from stages.models import load_component, model_dir
    from stages.s2v import route, sampler
    from stages.s2v.audio_features import FOLDER, Wav2Vec2Features
    from stages.text_encoder import TextEncoderStage

    config = system.config
    folder = model_dir(config, "s2v-14B")
    text = TextEncoderStage(config, config.stage("text_encoder"))
    text.setup()
    with torch.no_grad():
        context, context_null = (text.encode("s2v-14B", x, 512) for x in (PROMPT, ""))
    wav2vec2 = Wav2Vec2Features(folder / FOLDER)
    dit = official.load_s2v_transformer(folder, torch.float32)
    vae = load_component(AutoencoderKLWan, folder, "vae", torch_dtype=torch.float32).eval()
    spool = system.state_dir / "ref.png"
    spool.write_bytes(IMAGE)
    image = np.array(load_image(spool, 64, 64, fit=fit_short_side_and_crop))
    pixels = (torch.from_numpy(image).permute(2, 0, 1).float().div(255) * 2 - 1)[None, :, None]

    def frames(clips: int, pose: bytes | None = None) -> np.ndarray:
        p = s2v_params(clips, PER_CLIP)
        p.seed, p.steps, p.negative_prompt = SEED, STEPS, ""
        s = route.settings(p, config.model("s2v-14B").motion_frames)
        features = wav2vec2.features(load_16k_mono(AUDIO), PER_CLIP, 16)
        audio = features.frames[: clips * PER_CLIP].permute(1, 2, 0).unsqueeze(0)
        pose_pixels = None
        if pose is not None:
            (system.state_dir / "pose.mp4").write_bytes(pose)
            pose_pixels = route.pose_pixels(system.state_dir / "pose.mp4", None, s, clips, 64, 64, 16)
        job = sampler.run_job(dit, vae, s, context, context_null, pixels, audio, clips, pose_pixels)
        out: np.ndarray = route.to_uint8(job.video).numpy()
        return out

    return frames


@pytest.fixture(scope="module")
def expected(loop: Any) -> np.ndarray:
    """The frames of the reference's clip loop for S2V_REQUEST."""
    frames: np.ndarray = loop(CLIPS)
    return frames


def submit_s2v(system: System, request: dict[str, Any] = S2V_REQUEST, pose: bytes | None = None) -> str:
    status, _, body = post_multipart(system, [
        ("request", None, "application/json", json.dumps(request).encode()),
        ("image", "ref.png", "image/png", IMAGE), ("audio", "speech.wav", "audio/wav", AUDIO),
        *([("pose_video", "pose.mp4", "video/mp4", pose)] if pose is not None else [])])
    assert status == 202, body
    job_id: str = json.loads(body)["job_id"]
    return job_id


def master_frames(system: System, job_id: str) -> np.ndarray:
    status, _, data = system.request("GET", f"/api/v1/files/{job_id}.mkv")
    assert status == 200
    with av.open(io.BytesIO(data), mode="r") as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def events_until_final(ws: Any, timeout_s: float = 180) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while not events or events[-1]["event"] not in ("complete", "error"):
        events.append(json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic()))))
    return events


@contextlib.contextmanager
def subscribed(system: System, job_id: str) -> Iterator[Any]:
    with connect(f"ws://127.0.0.1:{system.port}/ws", open_timeout=10) as ws:
        ws.send(json.dumps({"action": "subscribe", "job_id": job_id}))
        yield ws


def arm(system: System, stage: str, seconds: float) -> Path:
    """Make `stage` sleep `seconds` once, when it takes its next message."""
    trigger = system.state_dir / "faults" / f"{stage}.handle.delay"
    trigger.write_text(str(seconds))
    return trigger


def fired(trigger: Path, timeout_s: float = 120) -> None:
    wait_for(lambda: not trigger.exists(), timeout_s, f"the fault {trigger.name} to fire", interval_s=0.02)


def progress_of(events: list[dict[str, Any]]) -> list[float]:
    return [e["data"]["progress"] if "data" in e else e["progress"] for e in events if e["event"] == "progress"]


def test_a_tiny_s2v_job_through_the_processes_is_the_reference_clip_loop(system: System,
                                                                         expected: np.ndarray) -> None:
    """Three clips, each round dit_high -> dit_low -> vae and back: the lossless master holds the
    reference loop's frames bit for bit (clip 0's 5 and 8 for each later one), the MP4 carries an
    audio stream, and the progress events run over the clips, each clip reported, never backwards."""
    job_id = submit_s2v(system)
    with subscribed(system, job_id) as ws:
        events = events_until_final(ws)
    assert events[-1]["event"] == "complete", events[-1]
    frames = master_frames(system, job_id)
    assert frames.shape == expected.shape == (CLIPS * PER_CLIP - 3, 64, 64, 3)
    assert np.array_equal(frames, expected)
    progress = progress_of(events)
    assert progress == sorted(progress) and progress[-1] == 1.0, progress
    clips = [e.get("data", e).get("clip") for e in events if e["event"] == "progress"]
    assert {0, 1, 2} <= set(clips), clips
    result = system.json("GET", f"/api/v1/result/{job_id}")[1]
    assert result["metadata"]["params"]["num_clips"] == CLIPS
    status, _, mp4 = system.request("GET", f"/api/v1/files/{job_id}.mp4")
    with av.open(io.BytesIO(mp4), mode="r") as container:
        assert container.streams.audio and container.streams.video[0].frames == CLIPS * PER_CLIP - 3


@pytest.mark.parametrize("stage", ["dit_low", "vae"])
def test_kill9_mid_job_resumes_at_the_clip_it_reached(system: System, expected: np.ndarray, stage: str) -> None:
    """The VAE holds clip 0 a second (a fault point); meanwhile `stage` is armed to hold its next
    message, clip 1's, and is killed -9 there. The broker sends attempt 2 to that stage's
    checkpoint, which is in clip 1: the stage's log says it resumed at clip 1, attempt 2 reports no
    clip 0, and the frames are the uninterrupted run's, bit for bit."""
    system.wait_idle()
    hold = arm(system, "vae", 1.0)
    job_id = submit_s2v(system)
    with subscribed(system, job_id) as ws:
        fired(hold)  # the VAE holds clip 0: the next message `stage` takes is clip 1's
        trigger = arm(system, stage, 60.0)
        fired(trigger)
        pid = system.pid(stage)
        job = system.stored_job(job_id)
        assert job is not None and job["checkpoint"] == stage and job["checkpoint_clip"] == 1, job
        kill9(pid)
        events = events_until_final(ws)
    assert events[-1]["event"] == "complete", events[-1]
    job = system.stored_job(job_id)
    assert job is not None and job["attempt"] == 2, job
    assert f"attempt 2: resumed from the checkpoint for {stage} at clip 1" in system.log(stage)
    again = [e.get("data", e) for e in events if e["event"] == "progress" and e.get("data", e).get("attempt") == 2]
    assert again and all(e["clip"] >= 1 for e in again), again
    progress = progress_of(events)
    assert progress == sorted(progress), progress
    assert np.array_equal(master_frames(system, job_id), expected)


def test_cancel_stops_an_s2v_job_between_clips_and_writes_no_video(system: System) -> None:
    """Cancelled while the VAE holds clip 0, the job stops there (the VAE checks before it decodes,
    as a DiT does between two steps): no clip 1 is sent, the job ends cancelled, with no MP4 and no
    spool folder left."""
    system.wait_idle()
    hold = arm(system, "vae", 1.5)
    job_id = submit_s2v(system)
    fired(hold)
    status, body = system.json("POST", f"/api/v1/cancel/{job_id}")
    assert status == 200, body
    assert system.wait_final(job_id)["status"] == "cancelled"
    def lines(stage: str) -> list[str]:
        return [line for line in system.log(stage).splitlines() if f"job={job_id}" in line]

    wait_for(lambda: any("stopped: the job was cancelled" in line for line in lines("vae")), 30,
             "the VAE to stop the cancelled job")
    assert not [line for line in lines("vae") + lines("dit_high") if "(clip 1)" in line]
    assert not (system.state_dir / "results" / f"{job_id}.mp4").exists()
    wait_for(lambda: not (system.config.spool_dir / job_id).exists(), 30, "the spool folder to go")


def test_a_pose_video_drives_each_clip_through_the_processes(system: System, loop: Any) -> None:
    """With a pose video (shorter than the clips: the rest is black, as the release pads it), the
    text encoder VAE-encodes it clip by clip and each clip's DiT takes its part: the frames are the
    reference loop's given the same pose pixels, and not those of the job without it."""
    request = {**S2V_REQUEST, "custom_options": {**S2V_REQUEST["custom_options"], "num_clips": 2}}
    job_id = submit_s2v(system, request, POSE)
    assert system.wait_final(job_id)["status"] == "completed"
    frames = master_frames(system, job_id)
    want = loop(2, POSE)
    assert frames.shape == want.shape == (2 * PER_CLIP - 3, 64, 64, 3)
    assert np.array_equal(frames, want)
    assert not np.array_equal(frames, loop(2))


def test_reference_images_and_pose_frames_are_fitted_as_the_release_fits_them() -> None:
    """The release's CenterCrop((h, w))(Resize(min(h, w))(image)) on PIL images (torchvision does
    not import here), with the sizes and offsets torchvision's documented rules give spelled out."""
    from stages.image_condition import fit_short_side_and_crop

    rng = np.random.default_rng(5)

    def image(w: int, h: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    wide = image(100, 70)  # short side 70 -> 48, long int(48 * 100 / 70) = 68; left round(4 / 2) = 2
    want = wide.resize((68, 48), Image.Resampling.BILINEAR).crop((2, 0, 66, 48))
    assert np.array_equal(np.array(fit_short_side_and_crop(wide, 64, 48)), np.array(want))
    tall = image(50, 90)  # short 50 -> 64, long int(64 * 90 / 50) = 115; top round(51 / 2) = 26
    want = tall.resize((64, 115), Image.Resampling.BILINEAR).crop((0, 26, 64, 90))
    assert np.array_equal(np.array(fit_short_side_and_crop(tall, 64, 64)), np.array(want))
    square = image(60, 60)  # -> 48 x 48, narrower than 64: black bars of 8 on each side
    got = np.array(fit_short_side_and_crop(square, 64, 48))
    inner = np.array(square.resize((48, 48), Image.Resampling.BILINEAR))
    assert got.shape == (48, 64, 3) and np.array_equal(got[:, 8:56], inner)
    assert not got[:, :8].any() and not got[:, 56:].any()
    same = image(80, 64)  # the short side is already 64: no resampling, only the crop
    assert np.array_equal(np.array(fit_short_side_and_crop(same, 64, 64)), np.array(same)[:, 8:72])
