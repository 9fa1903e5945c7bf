"""Input audio (speech-to-video): recognising, checking and decoding an uploaded file.

A file is WAV, FLAC, MP3, OGG (Opus, Vorbis or FLAC inside) or M4A (AAC or ALAC) by its magic bytes;
a declared content type, when one is given, must name the same format. `probe` decodes the whole
file (the gateway calls it before a job is admitted) and checks the bounds: the size, the duration
(counted from the decoded samples, never trusted from a header), the channel count and the sample
rate; a file shorter than its own header says (truncated) or that a decoder refuses is invalid.

`load_16k_mono` gives what the official Wan2.2 S2V code gets from `librosa.load(path, sr=16000)`:
PyAV decodes to the file's native sample format, which is scaled to float32 the way libsndfile
does (exact powers of two), averaged over channels as `librosa.to_mono` does, and resampled by
soxr's HQ filter to 16 kHz then cut or zero-padded to ceil(n * 16000 / rate) samples, as
`librosa.resample` does. On WAV and FLAC the result is bit for bit librosa's; on MP3 the decoders
differ (ffmpeg's against mpg123) by about 1e-6. PyAV's `AudioResampler` is not used: its downmix
and its resampler give other numbers.

Every refusal is a structured error from common/errors.py whose details name the bound, never a
decoder's own text.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np
import soxr
from numpy.typing import NDArray

from common.config import GatewaySection
from common.errors import AudioTooLong, InvalidAudio, PayloadTooLarge, UnsupportedMediaType

TARGET_RATE = 16000  # what wav2vec2 takes

# format -> (canonical content type, PyAV demuxer, codecs taken inside it)
FORMATS: dict[str, tuple[str, str, frozenset[str]]] = {
    "wav": ("audio/wav", "wav", frozenset({
        "pcm_u8", "pcm_s16le", "pcm_s24le", "pcm_s32le", "pcm_f32le", "pcm_f64le", "pcm_alaw", "pcm_mulaw",
    })),
    "flac": ("audio/flac", "flac", frozenset({"flac"})),
    "mp3": ("audio/mpeg", "mp3", frozenset({"mp3", "mp3float"})),
    "ogg": ("audio/ogg", "ogg", frozenset({"opus", "vorbis", "flac"})),
    "m4a": ("audio/mp4", "mov", frozenset({"aac", "alac"})),
}
TYPE_ALIASES = {
    "audio/x-wav": "audio/wav", "audio/wave": "audio/wav", "audio/vnd.wave": "audio/wav", "audio/x-pn-wav": "audio/wav",
    "audio/x-flac": "audio/flac",
    "audio/mp3": "audio/mpeg", "audio/x-mp3": "audio/mpeg", "audio/mpeg3": "audio/mpeg", "audio/x-mpeg": "audio/mpeg",
    "audio/opus": "audio/ogg", "audio/vorbis": "audio/ogg", "application/ogg": "audio/ogg", "audio/x-ogg": "audio/ogg",
    "audio/m4a": "audio/mp4", "audio/x-m4a": "audio/mp4", "audio/aac": "audio/mp4", "audio/x-aac": "audio/mp4",
}
IMAGE_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1"}  # ISO BMFF, not audio
UNTYPED = {"", "application/octet-stream"}  # no useful declared type: the magic bytes decide
ALLOWED_TYPES = sorted(kind for kind, _, _ in FORMATS.values())
FIELD = "audio"


@dataclass(frozen=True)
class AudioLimits:
    max_seconds: float = 60.0
    max_channels: int = 8
    min_rate: int = 8000
    max_rate: int = 192000
    max_bytes: int = 32 << 20
    min_seconds: float = 0.1  # wav2vec2's convolutions need a few of its 20 ms frames

    @classmethod
    def from_config(cls, section: GatewaySection) -> AudioLimits:
        return cls(max_seconds=section.max_audio_seconds, max_bytes=section.max_audio_bytes)


@dataclass(frozen=True)
class AudioInfo:
    format: str  # a key of FORMATS
    sample_rate: int
    channels: int
    duration_s: float  # decoded samples / sample rate


# ---- recognising the file ----


def sniff(data: bytes) -> str | None:
    """The format named by the file's magic bytes: "wav", "flac", "mp3", "ogg", "m4a", or None."""
    if len(data) >= 12 and data[:4] in (b"RIFF", b"RF64", b"BW64") and data[8:12] == b"WAVE":
        return "wav"
    if data.startswith(b"fLaC"):
        return "flac"
    if data.startswith(b"OggS"):
        return "ogg"
    if len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] not in IMAGE_BRANDS:
        return "m4a"
    body = data[id3_end(data):]
    if body.startswith(b"fLaC") and body is not data:
        return "flac"
    if is_mp3_frame(body):
        return "mp3"
    return None


def id3_end(data: bytes) -> int:
    """Where the audio starts after an ID3v2 tag (and the zero padding after it); 0 without a tag."""
    if len(data) < 10 or not data.startswith(b"ID3") or any(b & 0x80 for b in data[6:10]):
        return 0
    size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
    end = 10 + size + (10 if data[5] & 0x10 else 0)  # a footer
    while end < len(data) and data[end] == 0 and end < 10 + size + 4096:
        end += 1
    return end


def is_mp3_frame(data: bytes) -> bool:
    """An MPEG audio layer III frame header: sync, a version, layer III, a bitrate, a sample rate."""
    if len(data) < 4 or data[0] != 0xFF or data[1] & 0xE0 != 0xE0:
        return False
    version, layer = (data[1] >> 3) & 3, (data[1] >> 1) & 3
    bitrate, rate = data[2] >> 4, (data[2] >> 2) & 3
    return version != 1 and layer == 1 and bitrate != 15 and rate != 3


def check_type(data: bytes, declared: str | None) -> str:
    """The sniffed format; UNSUPPORTED_MEDIA_TYPE when there is none or the declared type disagrees."""
    fmt = sniff(data)
    if fmt is None:
        raise UnsupportedMediaType(
            "the audio is not WAV, FLAC, MP3, OGG or M4A", {"field": FIELD, "allowed": ALLOWED_TYPES}
        )
    kind = FORMATS[fmt][0]
    want = (declared or "").split(";")[0].strip().lower()
    want = TYPE_ALIASES.get(want, want)
    if want not in UNTYPED and want != kind:
        raise UnsupportedMediaType(
            f"the audio was sent as {want[:64]} but its content is {kind}",
            {"field": FIELD, "declared": want[:64], "detected": kind, "allowed": ALLOWED_TYPES},
        )
    return fmt


# ---- decoding ----


@dataclass
class _Decoded:
    rate: int
    channels: int
    samples: int
    mono: list[NDArray[np.float32]]  # per frame, only when kept


def _frame_float32(frame: av.AudioFrame) -> NDArray[np.float32]:
    """[channels, samples] float32 from a frame in its native format, scaled as libsndfile scales."""
    raw = frame.to_ndarray()
    name = frame.format.name
    channels = frame.layout.nb_channels
    planes = raw if frame.format.is_planar else raw.reshape(-1, channels).T
    if name.startswith("u8"):
        return (planes.astype(np.float32) - np.float32(128)) * np.float32(1 / 128)
    if name.startswith("s16"):
        return planes.astype(np.float32) * np.float32(1 / 32768)
    if name.startswith("s32"):
        return planes.astype(np.float32) * np.float32(1 / 2147483648)
    if name.startswith(("flt", "dbl")):
        return planes.astype(np.float32)
    raise InvalidAudio("the audio decodes to a sample format that is not taken", {"field": FIELD})


def _decode(data: bytes, fmt: str, limits: AudioLimits | None, keep: bool) -> _Decoded:
    _, demuxer, codecs = FORMATS[fmt]
    corrupt = InvalidAudio(f"the {fmt.upper()} audio does not decode completely (truncated or corrupt)",
                           {"field": FIELD})
    try:
        container = av.open(io.BytesIO(data), mode="r", format=demuxer)
    except av.FFmpegError:
        raise corrupt from None
    with container:
        if not container.streams.audio:
            raise InvalidAudio(f"the {fmt.upper()} file has no audio stream", {"field": FIELD})
        stream = container.streams.audio[0]
        codec = stream.codec_context.name
        if codec not in codecs:
            raise UnsupportedMediaType(
                f"the {fmt.upper()} file holds {codec[:32]} audio, which is not taken",
                {"field": FIELD, "codec": codec[:32], "allowed_codecs": sorted(codecs)},
            )
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
        _check_shape(rate, channels, limits)
        out = _Decoded(rate=rate, channels=channels, samples=0, mono=[])
        try:
            for frame in _frames(container, stream):
                if frame.sample_rate != rate or frame.layout.nb_channels != channels:
                    raise InvalidAudio("the audio changes its sample rate or channel count part way",
                                       {"field": FIELD})
                out.samples += frame.samples
                if limits is not None and out.samples > limits.max_seconds * rate:
                    raise too_long(limits)
                if keep and frame.samples:
                    planes = _frame_float32(frame)
                    # librosa.to_mono: numpy's mean over the channel axis of float32 samples
                    out.mono.append(planes[0] if channels == 1 else np.mean(planes, axis=0))
        except av.FFmpegError:
            raise corrupt from None
        declared = _declared_samples(data, fmt, stream)
    if declared is not None and out.samples < declared:
        raise corrupt
    if fmt == "wav" and _wav_truncated(data):
        raise corrupt
    if fmt == "ogg" and not _ogg_complete(data):
        raise corrupt
    if out.samples == 0:
        raise InvalidAudio("the audio has no samples", {"field": FIELD})
    return out


def _frames(container: av.container.InputContainer, stream: av.AudioStream) -> Iterator[av.AudioFrame]:
    for packet in container.demux(stream):
        yield from stream.decode(packet)


def _declared_samples(data: bytes, fmt: str, stream: av.AudioStream) -> int | None:
    """The length the file states for itself, where it states one that can be trusted, less a
    margin for what decoders trim (an MP3 frame of encoder delay and padding)."""
    if fmt == "flac":  # STREAMINFO's total samples (36 bits; 0: not known), read here: ffmpeg guesses when 0
        start = id3_end(data)
        if data[start:start + 4] != b"fLaC" or len(data) < start + 26 or data[start + 4] & 0x7F != 0:
            return None  # the first metadata block is STREAMINFO in every valid file
        info = data[start + 8:start + 26]
        total = ((info[13] & 0x0F) << 32) | int.from_bytes(info[14:18], "big")
        return total or None
    if stream.duration is None or stream.time_base is None or stream.duration <= 0:
        return None
    samples = int(stream.duration * stream.time_base * stream.codec_context.sample_rate)
    if fmt == "mp3":  # only a Xing / Info / VBRI header counts the frames; otherwise ffmpeg guesses from the size
        head = data[id3_end(data):][:256]
        if any(tag in head for tag in (b"Xing", b"Info", b"VBRI")):
            return samples - 2 * 1152
    return None


def _wav_truncated(data: bytes) -> bool:
    """A RIFF file whose `data` chunk says more bytes than the file holds (ffmpeg decodes what is there)."""
    pos = 12
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], int(struct.unpack("<I", data[pos + 4:pos + 8])[0])
        if tag == b"data":
            if data[:4] != b"RIFF" or size in (0, 0xFFFFFFFF):  # RF64 sizes live in ds64; streamed files say 0/-1
                return False
            return pos + 8 + size > len(data)
        pos += 8 + size + (size & 1)
    return True  # no data chunk in the bytes given


def _ogg_complete(data: bytes) -> bool:
    """The Ogg pages run to the end of the file exactly and the last one ends its stream."""
    pos, last_flags = 0, 0
    while pos < len(data):
        if data[pos:pos + 4] != b"OggS" or pos + 27 > len(data):
            return False
        nsegs = data[pos + 26]
        if pos + 27 + nsegs > len(data):
            return False
        last_flags = int(data[pos + 5])
        pos += 27 + nsegs + sum(data[pos + 27:pos + 27 + nsegs])
    return pos == len(data) and last_flags & 0x04 != 0


def _check_shape(rate: int, channels: int, limits: AudioLimits | None) -> None:
    if limits is None:
        return
    if not 1 <= channels <= limits.max_channels:
        raise InvalidAudio(
            f"the audio has {channels} channels; at most {limits.max_channels} are taken",
            {"field": FIELD, "channels": channels, "max_channels": limits.max_channels},
        )
    if not limits.min_rate <= rate <= limits.max_rate:
        raise InvalidAudio(
            f"the audio's sample rate is {rate} Hz; {limits.min_rate}-{limits.max_rate} Hz are taken",
            {"field": FIELD, "sample_rate": rate, "min_rate": limits.min_rate, "max_rate": limits.max_rate},
        )


def too_long(limits: AudioLimits) -> AudioTooLong:
    return AudioTooLong(
        f"the audio is longer than {limits.max_seconds:g} seconds",
        {"field": FIELD, "max_seconds": limits.max_seconds},
    )


def too_big(limits: AudioLimits) -> PayloadTooLarge:
    return PayloadTooLarge(f"the audio is over {limits.max_bytes} bytes", {"limit": limits.max_bytes, "field": FIELD})


# ---- the API ----


def probe(data: bytes, declared_type: str | None, limits: AudioLimits) -> AudioInfo:
    """Check an uploaded audio file completely (it is decoded to the end); raise the 4xx error to send.

    Runs in a worker thread: decoding a minute of audio takes tens of milliseconds to a second.
    """
    if len(data) > limits.max_bytes:
        raise too_big(limits)
    if not data:
        raise InvalidAudio("the audio is empty", {"field": FIELD})
    fmt = check_type(data, declared_type)
    decoded = _decode(data, fmt, limits, keep=False)
    duration = decoded.samples / decoded.rate
    if duration < limits.min_seconds:
        raise InvalidAudio(
            f"the audio is shorter than {limits.min_seconds:g} seconds",
            {"field": FIELD, "min_seconds": limits.min_seconds},
        )
    return AudioInfo(format=fmt, sample_rate=decoded.rate, channels=decoded.channels, duration_s=duration)


def load_16k_mono(data: bytes, limits: AudioLimits | None = None) -> NDArray[np.float32]:
    """The file's samples as `librosa.load(path, sr=16000)` gives them: float32, mono, 16 kHz.

    Without limits the bounds are not checked again (the gateway's `probe` did, with the profile's).
    """
    fmt = sniff(data)
    if fmt is None:
        raise UnsupportedMediaType(
            "the audio is not WAV, FLAC, MP3, OGG or M4A", {"field": FIELD, "allowed": ALLOWED_TYPES}
        )
    decoded = _decode(data, fmt, limits, keep=True)
    mono = np.concatenate(decoded.mono).astype(np.float32, copy=False)
    return resample_to_16k(mono, decoded.rate)


def resample_to_16k(mono: NDArray[np.float32], rate: int) -> NDArray[np.float32]:
    """soxr HQ to 16 kHz, cut or zero-padded to ceil(n * ratio) samples (librosa.resample's `fix`)."""
    if rate == TARGET_RATE:
        return mono
    out = np.asarray(soxr.resample(mono, rate, TARGET_RATE, quality="HQ"), dtype=np.float32)
    want = int(math.ceil(mono.shape[-1] * (float(TARGET_RATE) / rate)))
    if out.shape[-1] >= want:
        return out[:want]
    return np.pad(out, (0, want - out.shape[-1]))
