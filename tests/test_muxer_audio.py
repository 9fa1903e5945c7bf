"""The muxer's audio track (s2v): the job's audio from its spool folder, cut to the video, as AAC.

The real MuxerStage runs in this process on a private state folder (as tests/test_encoders.py
runs it), on frames and an audio file made here; what it wrote is read back with PyAV as a player
would: the MP4's AAC stream, its duration from the container, the decoded samples, and where a
tone burst of the source lands in it (the sync: the video's frame 0 is the audio's `start_s`).
"""

from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from broker.driver import default_params
from common import messages as m
from common.config import Config
from common.errors import InvalidRequest
from stages.muxer import MuxerStage
from tests.helpers import moving_square

FPS = 16
FRAMES = 13  # 0.8125 s of video
START_S = 3 / FPS  # what admission sets for s2v: clip 0's 3 dropped frames (catalog.S2V_DROPPED_FRAMES)
BURST_S = 0.5  # the source's tone burst starts here: in the MP4 at BURST_S - START_S


def tone_burst(rate: int, channels: int, seconds: float) -> np.ndarray:
    """int16 (n, channels): silence with a 1 kHz tone from BURST_S on (a clear onset to find)."""
    t = np.arange(int(rate * seconds)) / rate
    x = np.where(t >= BURST_S, 0.5 * np.sin(2 * np.pi * 1000 * t), 0.0)
    return np.tile((x * 32767).astype(np.int16)[:, None], (1, channels))


def write_audio(path: Path, samples: np.ndarray, rate: int, codec: str, fmt: str) -> None:
    channels = samples.shape[1]
    with av.open(str(path), "w") as container:
        layout = "mono" if channels == 1 else "stereo"
        stream = container.add_stream(codec, rate=rate, layout=layout)
        assert isinstance(stream, av.AudioStream)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.reshape(1, -1)), format=fmt, layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config.load(environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(tmp_path)})


def mux(config: Config, job_id: str, audio_file: Path, master: bool = False, **audio: Any) -> m.JobDone:
    """The muxer's answer to a job whose audio is `audio_file`, stored as the broker stores it."""
    spool = config.job_spool(job_id)
    spool.mkdir(parents=True, exist_ok=True)
    name = f"audio{audio_file.suffix}"
    (spool / name).write_bytes(audio_file.read_bytes())
    p = default_params(config, "t2v-A14B", prompt="x", height=32, width=48, num_frames=FRAMES, fps=FPS)
    p.audio = {"file": name, "sha256": hashlib.sha256(audio_file.read_bytes()).hexdigest(), "start_s": START_S,
               **audio}
    p.encoding = {"lossless_master": master}
    stage = MuxerStage(config, config.stage("muxer"))
    stage.setup()
    (done,) = stage.handle(m.MuxJob(job_id=job_id, attempt=1, route=["muxer"], params=p,
                                    frames=torch.from_numpy(moving_square(FRAMES))))
    assert isinstance(done, m.JobDone)
    return done


def read_audio(path: Path) -> tuple[dict[str, Any], np.ndarray]:
    with av.open(str(path)) as container:
        video, stream = container.streams.video[0], container.streams.audio[0]
        info = {"codec": stream.codec_context.name, "rate": stream.rate, "channels": stream.channels,
                "frames": video.frames}
        if path.suffix == ".mp4":  # Matroska keeps no per-stream duration
            assert stream.duration is not None and video.duration is not None
            assert stream.time_base is not None and video.time_base is not None
            info.update(duration=float(stream.duration * stream.time_base),
                        video_duration=float(video.duration * video.time_base))
        pcm = np.concatenate([f.to_ndarray().reshape(stream.channels, -1) if f.format.is_planar
                              else f.to_ndarray().reshape(-1, stream.channels).T
                              for f in container.decode(stream)], axis=1)
    return info, pcm


def onset_s(pcm: np.ndarray, rate: int) -> float:
    """When the signal first rises above a quarter of its peak."""
    level = np.abs(pcm).max(axis=0)
    return float(np.argmax(level > 0.25 * level.max()) / rate)


CASES = [  # rate, channels, source seconds, container: longer and shorter than the video's 0.8125 s
    (44100, 2, 2.0, "wav"), (16000, 1, 0.6, "flac"), (44100, 2, 0.6, "flac"), (16000, 1, 3.0, "wav")]


@pytest.mark.parametrize("rate,channels,seconds,kind", CASES,
                         ids=[f"{r // 1000}k-{c}ch-{s}s-{k}" for r, c, s, k in CASES])
def test_the_mp4_carries_the_jobs_audio_as_aac_cut_to_the_video_and_in_sync(config, tmp_path, rate, channels,
                                                                             seconds, kind):
    source = tmp_path / f"speech.{kind}"
    write_audio(source, tone_burst(rate, channels, seconds), rate, "pcm_s16le" if kind == "wav" else "flac", "s16")
    done = mux(config, "job1", source)
    info, pcm = read_audio(Path(done.path))
    video_s = FRAMES / FPS
    assert info["frames"] == FRAMES and abs(info["video_duration"] - video_s) < 1e-6
    assert (info["codec"], info["rate"], info["channels"]) == ("aac", rate, channels)
    # The track lasts the video's duration: within one frame, as a player reads it from the container.
    assert abs(info["duration"] - video_s) < 1 / FPS, info
    # Decodable to the end: at least the video's duration, at most one AAC frame (1024 samples) more.
    assert video_s - 1 / FPS < pcm.shape[1] / rate <= video_s + 1024 / rate
    # In sync: the source's burst at 0.5 s plays at 0.5 - 3/16 s, since frame 0 shows audio time 3/16 s.
    if seconds > BURST_S:
        assert abs(onset_s(pcm, rate) - (BURST_S - START_S)) < 0.005
        assert np.abs(pcm[:, : int((BURST_S - START_S - 0.01) * rate)]).max() < 0.01  # silence before it
    padded = max(0.0, START_S + video_s - seconds)
    if padded:  # the audio ends first: silence after its end
        assert np.abs(pcm[:, int((seconds - START_S + 0.01) * rate):]).max() < 0.01
    # The result's metadata (JobDone.audio): the job's audio, and the track made of it.
    assert done.audio["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert done.audio["duration_s"] == pytest.approx(seconds, abs=1e-6)
    assert done.audio["track_duration_s"] == pytest.approx(video_s, abs=1 / rate)
    assert done.audio["padded_s"] == pytest.approx(padded, abs=1 / rate)
    assert (done.audio["codec"], done.audio["sample_rate"], done.audio["start_s"]) == ("aac", rate, START_S)
    assert done.outputs[0]["audio"]["codec"] == "aac"


def test_a_rate_aac_lacks_is_resampled_and_the_master_holds_the_exact_samples(config, tmp_path):
    source = tmp_path / "speech.wav"
    samples = tone_burst(192000, 1, 1.5)
    write_audio(source, samples, 192000, "pcm_s16le", "s16")
    done = mux(config, "job2", source, master=True)
    info, pcm = read_audio(Path(done.path))
    assert (info["codec"], info["rate"]) == ("aac", 96000)  # the highest AAC rate
    assert abs(info["duration"] - FRAMES / FPS) < 1 / FPS
    assert abs(onset_s(pcm, 96000) - (BURST_S - START_S)) < 0.005
    master, exact = read_audio(Path(done.path).with_suffix(".mkv"))
    assert (master["codec"], master["rate"]) == ("pcm_f32le", 192000)
    start, length = round(START_S * 192000), round(FRAMES / FPS * 192000)
    assert np.array_equal(exact[0], samples[start:start + length, 0] / np.float32(32768))


def test_audio_that_is_not_the_admitted_one_fails_the_job(config, tmp_path):
    source = tmp_path / "speech.wav"
    write_audio(source, tone_burst(16000, 1, 1.0), 16000, "pcm_s16le", "s16")
    with pytest.raises(InvalidRequest) as info:
        mux(config, "job3", source, sha256="0" * 64)
    assert info.value.details == {"field": "audio"}
    assert not list(config.results_dir.glob("job3*"))


def test_an_interpolated_video_gets_audio_for_its_own_duration(config, tmp_path):
    """Post-processing changes the MP4's frame count and rate: its audio follows the MP4's duration."""
    source = tmp_path / "speech.wav"
    write_audio(source, tone_burst(16000, 1, 2.0), 16000, "pcm_s16le", "s16")
    spool = config.job_spool("job4")
    spool.mkdir(parents=True)
    (spool / "audio.wav").write_bytes(source.read_bytes())
    p = default_params(config, "t2v-A14B", prompt="x", height=32, width=48, num_frames=FRAMES, fps=FPS)
    p.audio = {"file": "audio.wav", "sha256": hashlib.sha256(source.read_bytes()).hexdigest(), "start_s": START_S}
    p.postprocess = {"interpolate_fps": 32}
    stage = MuxerStage(config, config.stage("muxer"))
    stage.setup()
    (done,) = stage.handle(m.MuxJob(job_id="job4", attempt=1, route=["muxer"], params=p,
                                    frames=torch.from_numpy(moving_square(FRAMES))))
    assert isinstance(done, m.JobDone)
    info, pcm = read_audio(Path(done.path))
    assert (done.num_frames, done.fps) == ((FRAMES - 1) * 2 + 1, 32)
    assert abs(info["duration"] - done.num_frames / 32) < 1 / 32
    assert abs(onset_s(pcm, 16000) - (BURST_S - START_S)) < 0.005
