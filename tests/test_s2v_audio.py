"""S2V audio: recognising and refusing uploads (common/audio.py), decoding them as the official code's
`librosa.load(path, sr=16000)` does, and the per-frame wav2vec2 features (stages/s2v/audio_features.py)
against the official `AudioEncoder`.

The oracle is the official Wan2.2 code (`wan22` from PyPI, import name `wan`, installed --no-deps).
Its package `__init__`s import decord and torchvision, which do not import beside the CPU torch here,
so `reference_audio_encoder` loads it through tests/wan_reference.py, which registers empty package
modules for `wan` and its subpackages (with the real folders as their `__path__`), and imports only
`wan.modules.s2v.audio_encoder`, which needs librosa, numpy, torch and transformers. It reads the
files with librosa itself and loads the tiny folder with `Wav2Vec2Processor` / `Wav2Vec2ForCTC`.

The test audio is made here with PyAV: 3 s of tones plus noise, 44.1 kHz stereo and 22.05 kHz mono.
"""

from __future__ import annotations

import io
import types
import wave
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from common.audio import AudioLimits, load_16k_mono, probe, sniff
from common.config import Config
from common.errors import AudioTooLong, ModelLoadError, ServerError
from stages.s2v.audio_features import (
    Wav2Vec2Features,
    per_frame,
    to_feature_rate,
    with_motion_prefix,
    write_tiny_wav2vec2,
)
from tests import wan_reference
from tests.error_bodies import check_error_body
from tests.helpers import encode_audio

SECONDS = 3.0
MP3_SAMPLES_BOUND = 2e-6  # ffmpeg's mp3 decoder against libsndfile's mpg123 (measured 7.7e-7)
MP3_FEATURES_BOUND = 1e-4  # the same difference through normalisation and the tiny wav2vec2 (measured 4.4e-6)
ENCODERS = {  # name -> (PyAV muxer, codec)
    "wav": ("wav", "pcm_s16le"), "wav24": ("wav", "pcm_s24le"), "flac": ("flac", "flac"),
    "mp3": ("mp3", "libmp3lame"), "ogg": ("ogg", "libopus"), "m4a": ("ipod", "aac"),
}


def encode(kind: str, rate: int, channels: int, seconds: float = SECONDS) -> bytes:
    """Tones (one per channel) plus a little noise, encoded by PyAV."""
    muxer, codec = ENCODERS[kind]
    n = int(rate * seconds)
    t = np.arange(n) / rate
    noise = np.random.default_rng(channels).standard_normal((channels, n))
    x = np.stack([0.3 * np.sin(2 * np.pi * 220 * (c + 1) * t) for c in range(channels)]) + 0.05 * noise
    return encode_audio(x, rate, muxer, codec)


def wav_bytes(rate: int, channels: int, seconds: float) -> bytes:
    """A 16-bit WAV written by the standard library (any channel count or rate, for the bounds)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(int(rate * seconds) * channels, dtype=np.int16).tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("audio")
    out = {}
    for kind, rate, channels in [("wav", 44100, 2), ("wav", 22050, 1), ("wav24", 44100, 2), ("flac", 44100, 2),
                                 ("flac", 22050, 1), ("mp3", 44100, 2), ("mp3", 22050, 1), ("ogg", 48000, 2),
                                 ("m4a", 44100, 2)]:
        name = f"{kind}-{rate}-{channels}"
        path = folder / f"{name}.{kind.rstrip('24')}"
        path.write_bytes(encode(kind, rate, channels))
        out[name] = path
    return out


def refusal(data: bytes, declared: str | None = None, **limits: Any) -> ServerError:
    with pytest.raises(ServerError) as info:
        probe(data, declared, AudioLimits(**limits))
    err = info.value
    check_error_body("/api/v1/generate", err.http_status, err.to_dict())
    assert err.details["field"] == "audio"
    return err


# ---- recognising and refusing ----


def test_sniff_names_each_format(files: dict[str, Path]) -> None:
    want = {"wav": "wav", "wav24": "wav", "flac": "flac", "mp3": "mp3", "ogg": "ogg", "m4a": "m4a"}
    for name, path in files.items():
        assert sniff(path.read_bytes()) == want[name.split("-")[0]], name
    assert sniff(b"\x89PNG\r\n\x1a\n" + bytes(64)) is None
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") is None  # RIFF, but not WAVE
    assert sniff(b"\xff\xf1\x50\x80" + bytes(64)) is None  # an ADTS (AAC) header, not MPEG layer III
    assert sniff(b"\x00\x00\x00\x1cftypavif" + bytes(64)) is None  # an AVIF image is ISO BMFF too
    assert sniff(b"") is None


def test_probe_reads_every_format(files: dict[str, Path]) -> None:
    for name, path in files.items():
        kind, rate, channels = name.split("-")
        info = probe(path.read_bytes(), None, AudioLimits())
        assert (info.format, info.sample_rate, info.channels) == (kind.rstrip("24"), int(rate), int(channels)), name
        # M4A: PyAV's AAC encoder's priming frame is decoded too (no edit list); the others are exact
        assert abs(info.duration_s - SECONDS) <= (0.05 if kind == "m4a" else 1e-9), (name, info.duration_s)
    data = files["flac-44100-2"].read_bytes()
    for declared in ("audio/flac", "audio/x-flac", "AUDIO/FLAC; charset=x", "application/octet-stream", ""):
        assert probe(data, declared, AudioLimits()).format == "flac"


def test_what_is_not_audio_or_not_what_it_claims_is_refused(files: dict[str, Path]) -> None:
    err = refusal(b"\x89PNG\r\n\x1a\n" + bytes(200))
    assert (err.code, err.http_status) == ("UNSUPPORTED_MEDIA_TYPE", 415) and "audio/mpeg" in err.details["allowed"]
    err = refusal(files["flac-44100-2"].read_bytes(), "audio/mpeg")
    assert (err.code, err.http_status) == ("UNSUPPORTED_MEDIA_TYPE", 415)
    assert (err.details["declared"], err.details["detected"]) == ("audio/mpeg", "audio/flac")
    err = refusal(files["m4a-44100-2"].read_bytes(), "video/mp4")
    assert err.code == "UNSUPPORTED_MEDIA_TYPE" and err.details["detected"] == "audio/mp4"
    err = refusal(b"")
    assert (err.code, err.http_status) == ("INVALID_AUDIO", 422)
    err = refusal(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40))  # a WAV header and no audio in it
    assert err.code == "INVALID_AUDIO"


def test_the_bounds_are_refused_with_the_bound_named(files: dict[str, Path]) -> None:
    data = files["wav-44100-2"].read_bytes()
    err = refusal(data, max_seconds=2.5)
    assert (err.code, err.http_status) == ("AUDIO_TOO_LONG", 413) and err.details["max_seconds"] == 2.5
    err = refusal(data, max_bytes=len(data) - 1)
    assert (err.code, err.http_status) == ("PAYLOAD_TOO_LARGE", 413) and err.details["limit"] == len(data) - 1
    err = refusal(wav_bytes(16000, 9, 0.5))
    assert (err.code, err.http_status) == ("INVALID_AUDIO", 422)
    assert (err.details["channels"], err.details["max_channels"]) == (9, 8)
    assert probe(wav_bytes(16000, 8, 0.5), None, AudioLimits()).channels == 8
    for rate in (4000, 200000):
        err = refusal(wav_bytes(rate, 1, 0.5))
        assert err.code == "INVALID_AUDIO" and err.details["sample_rate"] == rate
        assert (err.details["min_rate"], err.details["max_rate"]) == (8000, 192000)
    err = refusal(wav_bytes(16000, 1, 0.05))
    assert err.code == "INVALID_AUDIO" and err.details["min_seconds"] == 0.1


def test_the_duration_bound_comes_from_the_profile(files: dict[str, Path]) -> None:
    assert AudioLimits.from_config(Config.load(environ={}).gateway) == AudioLimits()  # 60 s, 32 MiB
    cfg = Config.load(environ={"WAN_SERVER__GATEWAY__MAX_AUDIO_SECONDS": "2.5",
                               "WAN_SERVER__GATEWAY__MAX_AUDIO_BYTES": "4000000"})
    limits = AudioLimits.from_config(cfg.gateway)
    assert (limits.max_seconds, limits.max_bytes) == (2.5, 4000000)
    with pytest.raises(AudioTooLong):
        probe(files["flac-44100-2"].read_bytes(), None, limits)


@pytest.mark.parametrize("name", ["wav-44100-2", "flac-44100-2", "mp3-44100-2", "ogg-48000-2", "m4a-44100-2"])
def test_a_truncated_file_is_refused(files: dict[str, Path], name: str) -> None:
    data = files[name].read_bytes()
    assert probe(data, None, AudioLimits()).duration_s > 2.9
    err = refusal(data[: len(data) * 6 // 10])
    assert (err.code, err.http_status) == ("INVALID_AUDIO", 422), name
    assert "truncated" in err.message


def test_a_flac_cut_between_frames_is_refused(files: dict[str, Path]) -> None:
    """Whole frames decode without a complaint: STREAMINFO's sample count is what tells."""
    data = files["flac-44100-2"].read_bytes()
    with av.open(io.BytesIO(data), mode="r") as container:
        starts = [p.pos for p in container.demux(container.streams.audio[0]) if p.pos is not None and p.pos > 0]
    cut = data[:starts[len(starts) // 2]]
    with av.open(io.BytesIO(cut), mode="r") as container:
        decoded = sum(f.samples for f in container.decode(container.streams.audio[0]))  # no error: whole frames
    assert 0 < decoded < SECONDS * 44100
    err = refusal(cut)
    assert err.code == "INVALID_AUDIO" and "truncated" in err.message


def test_a_corrupt_stream_is_refused(files: dict[str, Path]) -> None:
    data = bytearray(files["flac-44100-2"].read_bytes())
    data[len(data) // 2:len(data) // 2 + 400] = bytes(range(200)) * 2
    assert refusal(bytes(data)).code == "INVALID_AUDIO"


# ---- samples as librosa.load(sr=16000) gives them ----


@pytest.mark.parametrize("name", ["wav-44100-2", "wav-22050-1", "wav24-44100-2", "flac-44100-2", "flac-22050-1"])
def test_16k_mono_is_librosa_bit_for_bit(files: dict[str, Path], name: str) -> None:
    import librosa

    want, rate = librosa.load(files[name], sr=16000)
    got = load_16k_mono(files[name].read_bytes())
    assert rate == 16000 and got.dtype == np.float32 and got.shape == want.shape == (48000,)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("name", ["mp3-44100-2", "mp3-22050-1"])
def test_16k_mono_of_mp3_is_within_bound_of_librosa(files: dict[str, Path], name: str) -> None:
    import librosa

    want, _ = librosa.load(files[name], sr=16000)
    got = load_16k_mono(files[name].read_bytes())
    assert got.shape == want.shape
    assert 0 < np.abs(got - want).max() <= MP3_SAMPLES_BOUND  # two decoders: not equal, but close


def test_16k_mono_of_ogg_and_m4a(files: dict[str, Path]) -> None:
    for name in ("ogg-48000-2", "m4a-44100-2"):
        got = load_16k_mono(files[name].read_bytes())
        assert got.dtype == np.float32 and abs(got.shape[0] - 48000) <= 800, name
        tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(48000) / 16000)  # channel 0's tone; the mean halves it
        lag = np.argmax(np.correlate(got[4000:12000], tone[4000:4400], "valid"))
        assert np.corrcoef(got[4000 + lag:4000 + lag + 400], tone[4000:4400])[0, 1] > 0.5, name


# ---- wav2vec2 features against the official AudioEncoder ----


def reference_audio_encoder() -> Any:
    """wan.modules.s2v.audio_encoder without running the `wan` package's __init__ (tests/wan_reference.py)."""
    return wan_reference.load("wan.modules.s2v.audio_encoder")


@pytest.fixture(scope="module")
def tiny_wav2vec2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_wav2vec2(tmp_path_factory.mktemp("w2v") / "wav2vec2-large-xlsr-53-english", seed=3)


@pytest.fixture(scope="module")
def encoders(tiny_wav2vec2: Path) -> tuple[Any, Wav2Vec2Features]:
    return reference_audio_encoder().AudioEncoder(model_id=str(tiny_wav2vec2)), Wav2Vec2Features(tiny_wav2vec2)


@pytest.mark.parametrize("name,frames_per_clip,bound", [
    ("wav-44100-2", 80, 0.0), ("wav-22050-1", 16, 0.0), ("flac-44100-2", 16, 0.0),
    ("mp3-44100-2", 16, MP3_FEATURES_BOUND),
])
def test_features_equal_the_reference_audio_encoder(
    files: dict[str, Path], encoders: tuple[Any, Wav2Vec2Features], name: str, frames_per_clip: int, bound: float,
) -> None:
    reference, ours = encoders
    # the reference's encode_audio: all layers at 30 Hz, then one vector per 16 fps frame
    z = reference.extract_audio_feat(str(files[name]), return_all_layers=True)
    bucket, clips = reference.get_audio_embed_bucket_fps(z, fps=16, batch_frames=frames_per_clip, m=0)
    audio_emb = bucket.unsqueeze(0).permute(0, 2, 3, 1)  # [1, layers, dim, frames]
    got = ours.features(load_16k_mono(files[name].read_bytes()), frames_per_clip=frames_per_clip, fps=16)
    # 48000 samples: 149 wav2vec2 frames, int(149 / 50 * 30) = 89 at 30 Hz; 16 frames span 30 of them
    assert got.audio_frames == z.shape[1] == 89
    assert got.num_clips == clips == (1 if frames_per_clip == 80 else 3)
    assert got.frames.shape == (clips * frames_per_clip, 25, 32)
    if frames_per_clip == 80:  # frame k takes round(k * 30 / 16): from k = 48 on that is past the audio
        assert got.frames[47].any() and not got.frames[48:].any()
    for r in range(clips):
        want = audio_emb[..., r * frames_per_clip:(r + 1) * frames_per_clip]
        have = got.clip(r)
        assert have.shape == want.shape == (1, 25, 32, frames_per_clip)
        if bound == 0.0:
            assert torch.equal(have, want), (name, r)
        else:
            assert (have - want).abs().max().item() <= bound, (name, r)
    if bound == 0.0:  # the reference casts to the DiT's dtype before it slices: the same numbers
        assert torch.equal(got.clip(0, torch.bfloat16), audio_emb[..., :frames_per_clip].to(torch.bfloat16))


def test_the_steps_after_wav2vec2_match_the_reference_on_odd_lengths() -> None:
    ae = reference_audio_encoder()
    for length, frames_per_clip in [(7, 4), (50, 16), (251, 80), (400, 12), (1, 80)]:
        states = torch.randn(25, length + 1, 8, generator=torch.Generator().manual_seed(length))
        z = ae.linear_interpolation(states, input_fps=50, output_fps=30)
        ours30 = to_feature_rate(states)
        assert torch.equal(ours30, z)
        bucket, clips = ae.AudioEncoder.get_audio_embed_bucket_fps(
            types.SimpleNamespace(video_rate=30), z, fps=16, batch_frames=frames_per_clip, m=0)
        got = per_frame(ours30, frames_per_clip, fps=16)
        assert got.num_clips == clips and torch.equal(got.frames, bucket), length


def test_motion_prefix_repeats_the_first_frame() -> None:
    audio = torch.randn(1, 25, 8, 80)
    out = with_motion_prefix(audio, 73)
    assert out.shape == (1, 25, 8, 153)
    assert torch.equal(out[..., 73:], audio) and torch.equal(out[..., :73], audio[..., :1].expand(1, 25, 8, 73))


def test_the_tiny_folder_is_deterministic_and_checked(tmp_path: Path, tiny_wav2vec2: Path) -> None:
    a = write_tiny_wav2vec2(tmp_path / "a", seed=5)
    b = write_tiny_wav2vec2(tmp_path / "b", seed=5)
    c = tiny_wav2vec2  # seed 3
    sa, sb, sc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["wav2vec2.encoder.layers.0.attention.q_proj.weight"],
                           sc["wav2vec2.encoder.layers.0.attention.q_proj.weight"])
    assert Wav2Vec2Features(a).num_states == 25
    del sa["wav2vec2.encoder.layers.3.feed_forward.output_dense.weight"]
    save_file(sa, a / "model.safetensors")
    with pytest.raises(ModelLoadError) as info:
        Wav2Vec2Features(a)
    assert info.value.code == "MODEL_LOAD_ERROR" and str(a) in info.value.message
    assert "encoder.layers.3.feed_forward.output_dense.weight" in info.value.details["missing"]
