"""The audio track of a speech-to-video MP4: the job's own audio, cut to the video and encoded as AAC.

A job with audio (`JobParams.audio`, s2v-14B) has its original upload in its spool folder; the
muxer decodes it whole (PyAV, native sample format turned to float, no resampling), takes the
stretch that the video shows, from `start_s` (the audio time of the video's frame 0: see
README "Speech to video") for exactly the video's duration, and pads it with silence where the
audio ends first. The MP4 gets it as AAC (FFmpeg's `aac` encoder) at the audio's own sample rate
when AAC has that rate, else at the next AAC rate above it (resampled by FFmpeg's swresample);
mono and stereo stay as they are, more channels are mixed down to stereo. The lossless master
(Matroska) gets the same stretch as 32-bit float PCM at the source's rate and channels: the decoded
samples themselves.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from common.errors import InvalidRequest

AUDIO_FILE = re.compile(r"^audio\.[a-z0-9]{1,5}$")  # the name the broker stores a job's audio under
AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
AAC_LAYOUTS = {1: "mono", 2: "stereo"}
CHUNK = 1024  # samples per frame handed to an encoder (AAC's frame size)
# Integer sample formats and the scale FFmpeg's swresample uses to turn them to float.
INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


@dataclass(frozen=True)
class Soundtrack:
    """A job's audio file and where in it the video starts (`start_s`: the audio time of frame 0)."""

    path: Path
    sha256: str
    start_s: float
    bitrate: int = 192_000

    @classmethod
    def of_job(cls, spool: Path, audio: dict[str, Any], bitrate: int) -> Soundtrack:
        """The job's audio in its spool folder, as `JobParams.audio` names it; its bytes must be the
        ones admitted (their sha256), or the job fails."""
        name = str(audio.get("file", ""))
        if not AUDIO_FILE.match(name):
            raise InvalidRequest("the job's audio has no valid file name", {"field": "audio"})
        try:
            data = (spool / name).read_bytes()
        except OSError:
            raise InvalidRequest("the job's audio is missing from its spool folder", {"field": "audio"}) from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != audio.get("sha256"):
            raise InvalidRequest("the job's audio is not the one admitted (its sha256 differs)", {"field": "audio"})
        return cls(spool / name, digest, float(audio.get("start_s", 0.0)), bitrate)


@dataclass(frozen=True)
class Samples:
    """Decoded audio: float32 (channels, n) at `rate`, in the channel layout named `layout`."""

    data: np.ndarray
    rate: int
    layout: str

    @property
    def channels(self) -> int:
        return int(self.data.shape[0])

    @property
    def duration_s(self) -> float:
        return self.data.shape[1] / self.rate


def to_float(frame: av.AudioFrame) -> np.ndarray:
    """One decoded frame as float32 (channels, n), converted as swresample converts (ints scaled by 2^-(bits-1))."""
    fmt = frame.format
    channels = len(frame.layout.channels)
    raw = frame.to_ndarray()
    data = raw if fmt.is_planar else raw.reshape(-1, channels).T
    name = fmt.name.rstrip("p")
    if name == "u8":
        return ((data.astype(np.float32) - 128.0) / INT_SCALE["u8"]).astype(np.float32)
    if name in INT_SCALE:
        return (data.astype(np.float64) / INT_SCALE[name]).astype(np.float32)
    return data.astype(np.float32)


def decode(path: Path) -> Samples:
    """The whole first audio stream of `path`, at its own rate and channels."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            parts, layout = [], ""
            for frame in container.decode(stream):
                parts.append(to_float(frame))
                layout = frame.layout.name
            rate = int(stream.codec_context.sample_rate)
    except (av.FFmpegError, IndexError, ValueError):
        raise InvalidRequest("the job's audio does not decode", {"field": "audio"}) from None
    if not parts or rate <= 0:
        raise InvalidRequest("the job's audio holds no samples", {"field": "audio"})
    return Samples(np.concatenate(parts, axis=1), rate, layout)


def window(samples: Samples, start_s: float, duration_s: float) -> tuple[Samples, int]:
    """The `duration_s` from `start_s`, padded at the end with silence; (the stretch, samples padded)."""
    start, length = round(start_s * samples.rate), round(duration_s * samples.rate)
    piece = samples.data[:, start:start + length]
    padded = length - piece.shape[1]
    if padded:
        piece = np.concatenate([piece, np.zeros((samples.channels, padded), np.float32)], axis=1)
    return Samples(np.ascontiguousarray(piece), samples.rate, samples.layout), padded


def aac_rate(rate: int) -> int:
    """The sample rate the AAC track has: the source's if AAC has it, else the next one above (or 96 kHz)."""
    return next((r for r in AAC_RATES if r >= rate), AAC_RATES[-1])


def frames_of(samples: Samples, layout: str, fmt: str) -> list[av.AudioFrame]:
    """`samples` as frames of CHUNK samples (the last may be shorter), pts counted in samples."""
    frames = []
    for at in range(0, samples.data.shape[1], CHUNK):
        part = samples.data[:, at:at + CHUNK]
        array = np.ascontiguousarray(part if fmt == "fltp" else part.T.reshape(1, -1))
        frame = av.AudioFrame.from_ndarray(array, format=fmt, layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = samples.rate, at, Fraction(1, samples.rate)
        frames.append(frame)
    return frames


class AudioStream:
    """One audio stream of an output being written: AAC in the MP4, float PCM in the master."""

    def __init__(self, container: Any, lossless: bool, source: Samples, bitrate: int):
        self.lossless = lossless
        if lossless:
            self.rate, self.channels, self.layout = source.rate, source.channels, source.layout
            self.stream = container.add_stream("pcm_f32le", rate=self.rate, layout=self.layout)
        else:
            self.rate, self.channels = aac_rate(source.rate), min(source.channels, 2)
            self.layout = AAC_LAYOUTS[self.channels]
            self.stream = container.add_stream("aac", rate=self.rate, layout=self.layout)
            self.stream.bit_rate = bitrate
        self.container = container

    def write(self, samples: Samples) -> int:
        """Encode the whole track; returns the samples written (at the stream's rate)."""
        if self.lossless:
            frames = frames_of(samples, self.layout, "flt")
            written = samples.data.shape[1]
        elif samples.rate == self.rate and samples.channels == self.channels:
            frames = frames_of(samples, self.layout, "fltp")
            written = samples.data.shape[1]
        else:  # a rate AAC lacks, or more than two channels: swresample to what it takes
            source_layout = samples.layout
            resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
            frames, written = [], 0
            for frame in [*frames_of(samples, source_layout, "fltp"), None]:
                for out in resampler.resample(frame):
                    out.pts, out.time_base = written, Fraction(1, self.rate)
                    written += out.samples
                    frames.append(out)
        for frame in [*frames, None]:
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
        return written

    def describe(self, source: Samples, written: int) -> dict[str, Any]:
        return {"codec": "pcm_f32le" if self.lossless else "aac", "sample_rate": self.rate,
                "channels": self.channels, "source_sample_rate": source.rate, "source_channels": source.channels,
                "track_duration_s": round(written / self.rate, 6)}
