"""Speech-to-video inputs: the audio (and the optional pose video) of POST /api/v1/generate.

Two layers, both real:
- HTTP against the shared tiny system (`api_system`): the gateway checks every input file (decoded
  to the end) before the broker sees the request, and so before the broker decides whether the
  profile serves s2v-14B (`MODEL_NOT_SERVED` is the broker's, from `[serving]` / `[models]`). So a
  bad file gets its own structured 4xx whatever the profile serves, and leaves nothing in the spool;
  a good one passes the gateway and reaches the broker (which answers 202 once the tiny profile
  serves s2v-14B, MODEL_NOT_SERVED until then: both are checked, by what GET /api/v1/models says).
- The broker's submit, in this process on a profile that serves s2v-14B (the tiny profile plus
  an s2v section when it has none; no stage runs), given what the gateway sends: the job is queued,
  the audio lies in its spool folder byte for byte, its JobParams say where and what, and a refused
  request writes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import wave
from collections.abc import Iterator
from fractions import Fraction
from types import SimpleNamespace
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from broker.broker import Broker
from common import audio, catalog
from common.config import PROFILES_DIR, Config
from common.errors import ServerError
from gateway.client import ApiError, Client
from gateway.uploads import UploadLimits, check_video
from tests.helpers import System, encode_video, multipart, post_multipart, short_tmpdir

S2V = {"prompt": "a woman speaks", "model": "s2v", "quality_preset": "draft"}


def wav(seconds: float, rate: int = 16000, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(x[:, None], channels, axis=1).tobytes())
    return out.getvalue()


def flac(seconds: float, rate: int = 44100) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="stereo")
        x = (0.3 * np.sin(2 * np.pi * 330 * np.arange(int(seconds * rate)) / rate) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.repeat(x[:, None], 2, axis=1).reshape(1, -1), format="s16",
                                           layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return out.getvalue()


def flat_frames(frames: int = 8, size: int = 64) -> list[np.ndarray]:
    return [np.full((size, size, 3), 20 * i % 255, np.uint8) for i in range(frames)]


def mp4(frames: int = 8, size: int = 64) -> bytes:
    return encode_video(flat_frames(frames, size), "mp4", "mpeg4")


def webm(frames: int = 8, size: int = 64) -> bytes:
    return encode_video(flat_frames(frames, size), "webm", "libvpx-vp9")


def png(w: int = 80, h: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (200, 120, 40)).save(out, "PNG")
    return out.getvalue()


GOOD_WAV, GOOD_FLAC, IMAGE, POSE, POSE_WEBM = wav(1.0), flac(0.5), png(), mp4(), webm()
REQUEST = json.dumps(S2V).encode()


def spool_entries(system: System) -> list[str]:
    spool = system.config.spool_dir
    assert spool.is_relative_to(system.state_dir)
    return sorted(str(p.relative_to(spool)) for p in spool.rglob("*")) if spool.exists() else []


@pytest.fixture(scope="module")
def system(api_system: System) -> System:
    return api_system


def s2v_served(system: System) -> bool:
    models = {x["id"]: x for x in system.json("GET", "/api/v1/models")[1]["models"]}
    return bool(models["s2v-14B"]["served"])


def b64(data: bytes, kind: str = "") -> str:
    text = base64.b64encode(data).decode()
    return f"data:{kind};base64,{text}" if kind else text


GOOD = [
    ("multipart wav", "multipart", [("request", None, "application/json", REQUEST),
                                    ("image", "ref.png", "image/png", IMAGE),
                                    ("audio", "speech.wav", "audio/wav", GOOD_WAV)]),
    ("multipart flac + pose mp4", "multipart", [("request", None, None, REQUEST), ("image", "ref.png", None, IMAGE),
                                                ("audio", "speech.flac", "audio/flac", GOOD_FLAC),
                                                ("pose_video", "pose.mp4", "video/mp4", POSE)]),
    ("base64 wav data URL", "json", {"image": b64(IMAGE), "audio": b64(GOOD_WAV, "audio/x-wav")}),
    ("base64 flac + pose", "json", {"image": b64(IMAGE), "audio": b64(GOOD_FLAC), "pose_video": b64(POSE)}),
    ("multipart wav + pose webm", "multipart", [("request", None, None, REQUEST), ("image", "ref.png", None, IMAGE),
                                                ("audio", "speech.wav", None, GOOD_WAV),
                                                ("pose_video", "pose.webm", "video/webm", POSE_WEBM)]),
]


def send(system: System, how: str, what: Any) -> tuple[int, dict[str, Any]]:
    if how == "multipart":
        status, _, content = post_multipart(system, what)
    else:
        body = {**S2V, **what}
        if body.pop("model_override", None):
            body["model"] = what["model_override"]
        status, _, content = system.request("POST", "/api/v1/generate", body)
    return status, json.loads(content)


@pytest.mark.parametrize("name,how,what", GOOD, ids=[g[0] for g in GOOD])
def test_good_audio_passes_the_gateway_by_multipart_and_base64(system, name, how, what):
    served = s2v_served(system)
    status, body = send(system, how, what)
    if not served:  # the gateway took every file; the broker then says what the profile serves
        assert (status, body["error"]["code"], body["error"]["details"]["model"]) == \
            (422, "MODEL_NOT_SERVED", "s2v-14B"), body
        assert spool_entries(system) == []
        return
    assert status == 202, body
    job = body["job_id"]
    stored = system.stored_job(job)
    assert stored is not None
    params = stored["params"]
    kind = "wav" if "wav" in name else "flac"
    data = GOOD_WAV if kind == "wav" else GOOD_FLAC
    assert params["audio"]["sha256"] == hashlib.sha256(data).hexdigest() and params["audio"]["format"] == kind
    assert (system.config.job_spool(job) / f"audio.{kind}").read_bytes() == data
    system.request("POST", f"/api/v1/cancel/{job}")
    assert system.wait_final(job)["status"] == "cancelled"


TEXT = b"hello, this is not audio at all" * 4
TRUNCATED_WAV = GOOD_WAV[: len(GOOD_WAV) // 2]
NINE_CHANNELS = wav(0.3, 8000, 9)
LONG = wav(61.0, 8000)  # 61 s: over the tiny profile's max_audio_seconds (60)
BAD = [
    # name, how, what, status, code, details.field
    ("text named .wav", "multipart", [("request", None, None, REQUEST), ("image", "r.png", None, IMAGE),
                                      ("audio", "a.wav", "audio/wav", TEXT)], 415, "UNSUPPORTED_MEDIA_TYPE", "audio"),
    ("WAV sent as MP3", "multipart", [("request", None, None, REQUEST), ("image", "r.png", None, IMAGE),
                                      ("audio", "a.mp3", "audio/mpeg", GOOD_WAV)], 415, "UNSUPPORTED_MEDIA_TYPE",
     "audio"),
    ("truncated WAV", "json", {"image": b64(IMAGE), "audio": b64(TRUNCATED_WAV)}, 422, "INVALID_AUDIO", "audio"),
    ("9 channels", "json", {"image": b64(IMAGE), "audio": b64(NINE_CHANNELS)}, 422, "INVALID_AUDIO", "audio"),
    ("61 s of audio", "multipart", [("request", None, None, REQUEST), ("image", "r.png", None, IMAGE),
                                    ("audio", "long.wav", None, LONG)], 413, "AUDIO_TOO_LONG", "audio"),
    ("bad base64", "json", {"image": b64(IMAGE), "audio": "UklGRi*&^%"}, 422, "INVALID_AUDIO", "audio"),
    ("audio not a string", "json", {"image": b64(IMAGE), "audio": 12}, 422, "INVALID_AUDIO", "audio"),
    ("empty audio file", "multipart", [("request", None, None, REQUEST), ("image", "r.png", None, IMAGE),
                                       ("audio", "e.wav", "audio/wav", b"")], 422, "INVALID_AUDIO", "audio"),
    ("two audio parts", "multipart", [("request", None, None, REQUEST), ("audio", "a.wav", None, GOOD_WAV),
                                      ("audio", "b.wav", None, GOOD_WAV)], 400, "INVALID_MULTIPART", None),
    ("audio as a plain field", "multipart", [("request", None, None, REQUEST), ("audio", None, None, b"abc")],
     400, "INVALID_MULTIPART", None),
    ("pose not a video", "json", {"image": b64(IMAGE), "audio": b64(GOOD_WAV), "pose_video": b64(TEXT)},
     415, "UNSUPPORTED_MEDIA_TYPE", "pose_video"),
    ("truncated pose MP4", "multipart", [("request", None, None, REQUEST), ("image", "r.png", None, IMAGE),
                                         ("audio", "a.wav", None, GOOD_WAV),
                                         ("pose_video", "p.mp4", "video/mp4", POSE[: len(POSE) // 2])],
     422, "INVALID_VIDEO", "pose_video"),
    ("truncated pose WebM", "json", {"image": b64(IMAGE), "audio": b64(GOOD_WAV),
                                     "pose_video": b64(POSE_WEBM[: len(POSE_WEBM) * 9 // 10])},
     422, "INVALID_VIDEO", "pose_video"),
    ("pose MP4 sent as WebM", "json", {"image": b64(IMAGE), "audio": b64(GOOD_WAV),
                                       "pose_video": b64(POSE, "video/webm")}, 415, "UNSUPPORTED_MEDIA_TYPE",
     "pose_video"),
    ("t2v given audio", "json", {"model_override": "t2v", "audio": b64(GOOD_WAV)}, 422, "VALIDATION_ERROR", "audio"),
]


@pytest.mark.parametrize("name,how,what,status,code,field", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_refused_with_structured_errors_and_write_nothing(system, name, how, what, status, code,
                                                                         field):
    before = spool_entries(system)
    got, body = send(system, how, what)
    assert (got, body["error"]["code"]) == (status, code), body
    assert body["success"] is False and set(body["error"]) == {"code", "message", "details"}
    if field is not None:
        assert body["error"]["details"]["field"] == field, body
    assert spool_entries(system) == before


def test_an_audio_file_over_its_byte_bound_is_refused(system):
    limit = system.config.gateway.max_audio_bytes
    big = GOOD_WAV[:44] + b"\0" * (limit + 1 - 44)
    body, ctype = multipart([("request", None, None, REQUEST), ("image", "r.png", None, IMAGE),
                             ("audio", "big.wav", "audio/wav", big)])
    status, _, content = system.request("POST", "/api/v1/generate", raw=body, headers={"Content-Type": ctype})
    answer = json.loads(content)
    assert (status, answer["error"]["code"], answer["error"]["details"]["field"]) == \
        (413, "PAYLOAD_TOO_LARGE", "audio"), answer
    assert spool_entries(system) == []


# ---- the broker's side, on a profile that serves s2v-14B ----

S2V_PROFILE = """
[models.s2v-14B]
tiny = true
seed = 0
resolutions = ["64x64", "128x64", "64x128", "128x128"]
max_frames = 241

[presets.s2v-14B]
draft = { steps = 2, resolution = "64x64", num_frames = 77, fps = 16, guidance_scale = 4.5, frames_per_clip = 8 }
standard = { steps = 4, resolution = "128x64", num_frames = 77, fps = 16, guidance_scale = 4.5, shift = 3.0 }
pro = { steps = 4, resolution = "128x64", num_frames = 77, fps = 16, guidance_scale = 4.5 }
cinema = { steps = 4, resolution = "128x128", num_frames = 77, fps = 16, guidance_scale = 4.5 }
ultimate = { steps = 4, resolution = "128x128", num_frames = 77, fps = 16, guidance_scale = 4.5 }
"""


@pytest.fixture
def s2v_broker() -> Iterator[Broker]:
    """A Broker in this process (no stage runs) on the tiny profile serving s2v-14B."""
    state = short_tmpdir("wsv-")
    text = (PROFILES_DIR / "tiny.toml").read_text()
    if not re.search(r"^\[models\.s2v-14B\]", text, flags=re.MULTILINE):  # until the tiny profile serves it
        text += S2V_PROFILE
    profile = state / "s2v.toml"
    profile.write_text(text)
    b = Broker(Config.load(profile, environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(state)}))
    try:
        yield b
    finally:
        b.close()
        shutil.rmtree(state, ignore_errors=True)


def gateway_args(request: dict[str, Any], data: bytes, pose: bytes | None = None) -> dict[str, Any]:
    """What the gateway sends the broker's submit for a request with an image, `data` as audio and `pose`."""
    info = audio.probe(data, "", audio.AudioLimits())
    args: dict[str, Any] = {"request": request, "image": IMAGE, "image_size": [80, 48], "audio": data,
                            "audio_info": {"format": info.format, "sample_rate": info.sample_rate,
                                           "channels": info.channels, "duration_s": info.duration_s,
                                           "samples": round(info.duration_s * info.sample_rate)}}
    if pose is not None:
        args.update(pose_video=pose, pose_video_info=check_video(pose, "", UploadLimits()))
    return args


def test_the_broker_stores_the_audio_and_resolves_clips_and_size(s2v_broker):
    data = flac(12.0)  # 12 s at 44.1 kHz: the official count gives int(12 / 5) + 1 = 3 clips of 80 frames
    # every option given, so the profile's presets do not matter
    options = {"max_area": 128 * 64, "frames_per_clip": 80, "steps": 4, "cfg_scale": 4.5, "shift": 3.0}
    request = {**S2V, "quality_preset": "standard", "seed": 3, "custom_options": options}
    job_id = s2v_broker.api.submit(gateway_args(request, data, POSE))["job_id"]
    job = s2v_broker.store.get(job_id)
    assert job is not None and job.status in ("queued", "processing")
    p = job.params
    folder = s2v_broker.config.job_spool(job_id)
    assert (folder / "audio.flac").read_bytes() == data and (folder / "pose.mp4").read_bytes() == POSE
    assert p["audio"] == {"file": "audio.flac", "sha256": hashlib.sha256(data).hexdigest(), "format": "flac",
                          "sample_rate": 44100, "channels": 2, "samples": 12 * 44100, "duration_s": 12.0,
                          "start_s": 3 / 16}
    assert p["pose_video"]["file"] == "pose.mp4" and p["pose_video"]["frames"] == 8
    assert (p["frames_per_clip"], p["num_clips"], p["num_frames"]) == (80, 3, 3 * 80 - 3)
    # an 80x48 reference within 128*64 pixels: the aspect kept, sides multiples of 64
    assert (p["width"], p["height"]) == catalog.s2v_size(80, 48, 128 * 64) == (128, 64)
    assert (p["steps"], p["guidance_scale"], p["shift"], p["seed"]) == (4, 4.5, 3.0, 3)


def test_the_broker_refuses_what_the_audio_cannot_give_and_writes_nothing(s2v_broker):
    spool = s2v_broker.config.spool_dir
    cases = [
        ({**S2V, "custom_options": {"num_clips": 2, "frames_per_clip": 80}}, GOOD_WAV,
         "custom_options.num_clips"),  # 1 s gives 1 clip of 80 frames
        ({**S2V, "custom_options": {"num_frames": 33}}, GOOD_WAV, "custom_options.num_frames"),
        ({**S2V, "custom_options": {"frames_per_clip": 10}}, GOOD_WAV, "custom_options.frames_per_clip"),
    ]
    for request, data, field in cases:
        with pytest.raises(ServerError) as info:
            s2v_broker.api.submit(gateway_args(request, data))
        assert (info.value.code, info.value.details.get("field")) == ("VALIDATION_ERROR", field)
    for missing in (("audio", "audio_info"), ("image", "image_size")):  # both are required
        without = gateway_args(S2V, GOOD_WAV)
        for key in missing:
            del without[key]
        with pytest.raises(ServerError) as info:
            s2v_broker.api.submit(without)
        assert (info.value.code, info.value.details.get("field")) == ("VALIDATION_ERROR", missing[0])
    assert not (spool.exists() and any(spool.iterdir()))


def test_the_python_client_uploads_image_audio_and_pose_as_multipart(system, tmp_path):
    files = {"image": tmp_path / "face.png", "audio": tmp_path / "speech.m4a", "pose_video": tmp_path / "pose.mp4"}
    files["image"].write_bytes(IMAGE)
    files["pose_video"].write_bytes(POSE)
    client = Client(system.url)
    # A part the gateway refuses comes back as the client's ApiError with the structured code.
    files["audio"].write_bytes(TEXT)
    with pytest.raises(ApiError) as info:
        client.generate("a woman speaks", "s2v", "draft", **files)
    assert (info.value.status, info.value.code) == (415, "UNSUPPORTED_MEDIA_TYPE")
    files["audio"].write_bytes(GOOD_WAV)  # a WAV under an .m4a name: the client lets the bytes decide
    served = s2v_served(system)
    try:
        job = client.generate("a woman speaks", "s2v", "draft", **files)
    except ApiError as exc:
        assert not served and (exc.status, exc.code) == (422, "MODEL_NOT_SERVED"), exc.body
        assert spool_entries(system) == []
        return
    assert served
    client.cancel(job["job_id"])
    assert system.wait_final(job["job_id"])["status"] == "cancelled"


@pytest.mark.parametrize("rate,seconds,per_clip", [(16000, 5.0, 80), (44100, 9.99, 80), (48000, 12.3, 8),
                                                    (22050, 0.37, 12), (8000, 20.0, 80)])
def test_the_clip_count_admission_predicts_is_the_one_the_audio_features_give(rate, seconds, per_clip):
    """Admission counts clips from the sample count (catalog.s2v_clips); the text encoder's features
    count them from the decoded 16 kHz audio's wav2vec2 frames (stages/s2v/audio_features.py): the
    two must agree, or a job would be admitted for clips it does not get."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from stages.s2v.audio_features import clip_count

    data = wav(seconds, rate)
    info = audio.probe(data, "", audio.AudioLimits())
    samples = round(info.duration_s * info.sample_rate)
    mono = audio.load_16k_mono(data)
    assert len(mono) == catalog.s2v_audio_samples(samples, rate)
    # transformers' own length rule for wav2vec2's feature encoder (the release's config: the defaults)
    lengths = Wav2Vec2Model._get_feat_extract_output_lengths
    frames50 = int(lengths(SimpleNamespace(config=Wav2Vec2Config()), torch.tensor(len(mono))))
    frames30 = int(frames50 / 50.0 * 30)
    assert catalog.s2v_clips(samples, rate, per_clip, 16) == clip_count(frames30, per_clip, 16)


def test_the_muxer_reads_the_stored_audio_and_the_result_describes_it(s2v_broker):
    """The broker's stored audio and JobParams are what the muxer needs: the real MuxerStage (in this
    process, on the broker's folders) puts the audio in the MP4, and the result's metadata.audio
    holds its sha256, duration, the clip count and the track the muxer wrote."""
    import torch

    from common import messages as m
    from stages.muxer import MuxerStage

    data = flac(1.0)
    options = {"frames_per_clip": 8, "max_area": 64 * 64}
    job_id = s2v_broker.api.submit(gateway_args({**S2V, "custom_options": options}, data))["job_id"]
    job = s2v_broker.store.get(job_id)
    assert job is not None
    params = m.JobParams(**job.params)
    attempt = s2v_broker.store.start(job_id)
    frames = np.zeros((params.num_frames, params.height, params.width, 3), np.uint8)
    config = s2v_broker.config
    stage = MuxerStage(config, config.stage("muxer"))
    stage.setup()
    (done,) = stage.handle(m.MuxJob(job_id=job_id, attempt=attempt, route=["muxer"], params=params,
                                    frames=torch.from_numpy(frames)))
    assert isinstance(done, m.JobDone)
    s2v_broker.progress.on_report(done)
    result = s2v_broker.api.result({"job_id": job_id})
    assert result["status"] == "completed", result
    meta = result["metadata"]["audio"]
    assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["duration_s"] == pytest.approx(1.0)
    assert (meta["clips"], meta["start_s"], meta["format"]) == (params.num_clips, 3 / 16, "flac")
    assert meta["track"]["codec"] == "aac" and meta["track"]["sample_rate"] == 44100
    assert meta["track"]["track_duration_s"] == pytest.approx(params.num_frames / params.fps, abs=1e-4)
    with av.open(done.path) as container:
        assert container.streams.audio[0].codec_context.name == "aac"
    assert not config.job_spool(job_id).exists()  # the job is final: its spool folder (the audio) is gone
