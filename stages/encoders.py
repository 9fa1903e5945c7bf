"""The muxer's video files: H.264 / HEVC / AV1 in MP4, and the lossless FFV1 master in Matroska.

`write_outputs` streams a job's frames, one at a time, through its post-processing
(stages/postprocess.py) into the MP4's encoder, and untouched into the master's.

Every output is written to a temporary file in the results folder (`.<name>.<pid>.tmp`), frame by
frame, and only `commit()` renames it into place (fsync, rename, fsync of the folder: see
`common.spool.replace_durably`), so a reader never sees a partial file. Every stream is tagged with
its colour: BT.709 primaries and transfer, and the BT.709 matrix with limited range for YUV (the
RGB -> YUV conversion uses that matrix too), or the RGB/GBR matrix with full range for the FFV1
master, whose `bgr0` frames decode to the input's RGB bit for bit.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from av.video.stream import VideoStream

from common import catalog
from common.config import StageSpec
from common.errors import InvalidRequest, OutputError
from common.spool import replace_durably
from stages import postprocess
from stages.soundtrack import AudioStream, Samples, window

# FFmpeg's enum values (libavutil/pixfmt.h): AVCOL_PRI_BT709, AVCOL_TRC_BT709, AVCOL_SPC_RGB,
# AVCOL_SPC_BT709, AVCOL_RANGE_MPEG (limited), AVCOL_RANGE_JPEG (full).
BT709 = 1
SPC_RGB = 0
RANGE_LIMITED = 1
RANGE_FULL = 2

CONTAINERS = {"mp4": "mp4", "mkv": "matroska"}
MACROBLOCK = 16
X265_CUTREE_MIN_SIDE = 64
# Above 4K, x265 holds each picture of its lookahead and B-frame queue at 8K (about 100 MB each):
# 301 frames of 8K took 4.3 GB of host memory at ultrafast (medium: 4.5 GB for x265 alone). With the
# lookahead at 4 frames and no B-frames x265 alone stays under 2.9 GB at medium (bench/results/
# x265_8k_memory.json), so an 8K job stays under the 4 GB the issue asks; the cost is bitrate.
X265_BIG_PIXELS = 3840 * 2160
X265_BIG_PARAMS = ":rc-lookahead=4:bframes=0"


@dataclass(frozen=True)
class Encoding:
    """How one output is encoded: `codec` is a catalog codec (h264, h265, av1) or `ffv1`."""

    codec: str
    crf: int | None = None
    bit_depth: int = 8
    preset: str = "medium"  # x264 / x265
    av1_preset: int = 8

    @property
    def encoder(self) -> str:
        return "ffv1" if self.codec == "ffv1" else catalog.CODECS[self.codec].encoder

    @property
    def pix_fmt(self) -> str:
        if self.codec == "ffv1":
            return "bgr0"  # 8-bit RGB FFV1 takes bgr0 (its gbrp is refused); decodes to rgb24 exactly
        return "yuv420p10le" if self.bit_depth == 10 else "yuv420p"

    def options(self, width: int, height: int) -> dict[str, str]:
        if self.codec == "h264":
            opts = {"crf": str(self.crf), "preset": self.preset}
            if odd_macroblock_width(width):
                # x264 0.165's MB-tree reads uninitialised stack memory when the picture is an odd
                # number of macroblocks wide (valgrind: 48, 80, 176, 720 wide; none at 64, 832,
                # 1080, 1280): the same frames then encode differently from run to run. Such
                # widths (720, 2160 portrait) lose MB-tree's bitrate saving to stay reproducible.
                opts["x264-params"] = "mbtree=0"
            return opts
        if self.codec == "h265":
            # x265 4.x's CU-tree corrupts the heap on frames a few CTUs small (48x32 aborts the
            # process); no real video is that small, so only there is it turned off.
            tiny = ":cutree=0" if min(width, height) < X265_CUTREE_MIN_SIDE else ""
            big = X265_BIG_PARAMS if width * height > X265_BIG_PIXELS else ""
            return {"crf": str(self.crf), "preset": self.preset, "x265-params": f"log-level=error{tiny}{big}"}
        if self.codec == "av1":
            return {"crf": str(self.crf), "preset": str(self.av1_preset)}
        return {"level": "3", "slicecrc": "1"}


def odd_macroblock_width(width: int) -> bool:
    return -(-width // MACROBLOCK) % 2 == 1


def job_encoding(wanted: dict[str, Any], spec: StageSpec) -> Encoding:
    """A job's `JobParams.encoding`, with the muxer's configured defaults for what it leaves out."""
    codec = wanted.get("codec", catalog.DEFAULT_CODEC)
    if codec not in catalog.CODECS:
        raise InvalidRequest(f"unknown codec {str(codec)[:16]!r}", {"allowed": list(catalog.CODECS)})
    default_crf = {"h264": spec.crf, "h265": spec.crf_h265, "av1": spec.crf_av1}[codec]
    crf = wanted.get("crf")
    return Encoding(codec, default_crf if crf is None else int(crf), int(wanted.get("bit_depth", 8)), spec.preset,
                    spec.av1_preset)


class VideoOutput:
    """One video file being written frame by frame to its temporary name; `commit()` puts it in place."""

    def __init__(self, path: Path, encoding: Encoding, width: int, height: int, fps: int,
                 metadata: dict[str, str] | None = None, audio: Track | None = None):
        if encoding.codec != "ffv1" and (width % 2 or height % 2):
            raise InvalidRequest(f"yuv420p needs even width and height, got {width}x{height}")
        self.path, self.encoding = path, encoding
        self.width, self.height, self.fps = width, height, fps
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.frames = 0
        self.committed = False
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container: Any = None
        self.container = av.open(str(self.tmp), mode="w", format=CONTAINERS[path.suffix[1:]])
        try:
            self.container.metadata.update(metadata or {})
            stream = self.container.add_stream(encoding.encoder, rate=Fraction(fps, 1))
            assert isinstance(stream, VideoStream)
            stream.width, stream.height, stream.pix_fmt = width, height, encoding.pix_fmt
            if encoding.codec == "h265":
                stream.codec_tag = "hvc1"  # Apple's players open HEVC in MP4 only under this tag
            cc = stream.codec_context
            cc.color_primaries, cc.color_trc = BT709, BT709
            if encoding.codec == "ffv1":
                cc.colorspace, cc.color_range = SPC_RGB, RANGE_FULL
            else:
                cc.colorspace, cc.color_range = BT709, RANGE_LIMITED
            stream.options = dict[str, object](encoding.options(width, height))
            self.stream = stream
            # The audio (s2v): AAC in the MP4, float PCM in the master; written once the frames are.
            self.audio = audio
            self.audio_stream = (None if audio is None else
                                 AudioStream(self.container, encoding.codec == "ffv1", audio.samples, audio.bitrate))
            self.audio_track: dict[str, Any] = {}
        except BaseException:
            self.discard()
            raise

    def write(self, frame: av.VideoFrame) -> None:
        """Encode one frame (any format and size PyAV can convert; RGB is turned to YUV with BT.709)."""
        if self.encoding.codec == "ffv1":
            out = frame.reformat(format="bgr0")
        else:
            out = frame.reformat(width=self.width, height=self.height, format=self.encoding.pix_fmt,
                                 dst_colorspace="ITU709", dst_color_range="MPEG")
        out.pts, out.time_base = self.frames, Fraction(1, self.fps)
        for packet in self.stream.encode(out):
            self.container.mux(packet)
        self.frames += 1

    def finish(self) -> None:
        """Flush the encoder and write the index (moov / cues); the file is complete but not in place."""
        for packet in self.stream.encode():
            self.container.mux(packet)
        if self.audio is not None and self.audio_stream is not None:
            # Exactly the video's duration of audio, from the audio time of frame 0 (README "Speech to video").
            piece, padded = window(self.audio.samples, self.audio.start_s, self.frames / self.fps)
            written = self.audio_stream.write(piece)
            self.audio_track = {**self.audio_stream.describe(piece, written), "start_s": self.audio.start_s,
                                "padded_s": round(padded / piece.rate, 6)}
        self.container.close()
        self.container = None

    def commit(self) -> None:
        replace_durably(self.tmp, self.path)
        self.committed = True

    def discard(self) -> None:
        """Close and remove the temporary file, and the file itself if it was committed (a later
        output of the same job failed: the job serves none of them)."""
        if self.container is not None:
            try:
                self.container.close()
            except Exception:  # noqa: BLE001 - closing a failed container; the first error is what counts
                pass
            self.container = None
        for p in (self.tmp, self.path) if self.committed else (self.tmp,):
            try:
                p.unlink()
            except OSError:
                pass
        self.committed = False

    def describe(self) -> dict[str, Any]:
        """What the result lists for this output (the broker turns `file` into a URL)."""
        return {"file": self.path.name, "codec": self.encoding.codec, "container": CONTAINERS[self.path.suffix[1:]],
                "width": self.width, "height": self.height, "fps": self.fps, "frames": self.frames,
                "pix_fmt": self.encoding.pix_fmt, "bytes": self.path.stat().st_size,
                **({"audio": self.audio_track} if self.audio_track else {})}


@dataclass(frozen=True)
class Track:
    """The audio an output carries: the job's decoded audio, the audio time of the video's frame 0,
    and the AAC bit rate."""

    samples: Samples
    start_s: float
    bitrate: int = 192_000


MASTER = Encoding("ffv1")


def write_error(exc: OSError) -> OutputError:
    """The structured error for a failed write: the errno and its text, never a path."""
    code = exc.errno or 0
    name = errno.errorcode.get(code, "UNKNOWN")
    return OutputError(f"could not write the video: {os.strerror(code) if code else 'I/O error'}",
                       {"errno": code, "reason": name})


def check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InvalidRequest(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")


def write_outputs(frames: np.ndarray, fps: int, path: Path, encoding: Encoding, *,
                  plan: postprocess.Plan | None = None, master: Path | None = None,
                  before_trailer: Callable[[], None] | None = None, between_frames: Callable[[], None] | None = None,
                  metadata: dict[str, str] | None = None, audio: Track | None = None) -> list[VideoOutput]:
    """Encode (F, H, W, 3) uint8 `frames` through `plan` into `path` (an MP4), and untouched into
    `master` (an FFV1 .mkv) if given; every file is put in place only once all are complete.
    `before_trailer` is called once every frame is in the temporary files, before the index that
    makes them playable; `between_frames` after each frame written (a cancelled job stops there: an
    8K frame takes seconds to encode on a CPU). `audio`: every output also carries that audio, cut
    to its own duration (stages/soundtrack.py)."""
    check_frames(frames)
    height, width = frames.shape[1:3]
    plan = plan or postprocess.Plan(width, height, fps, width, height, fps)
    outputs: list[VideoOutput] = []
    try:
        main = VideoOutput(path, encoding, plan.out_width, plan.out_height, plan.out_fps, metadata, audio)
        outputs.append(main)
        lossless = VideoOutput(master, MASTER, width, height, fps, metadata, audio) if master is not None else None
        if lossless is not None:
            outputs.append(lossless)
        pipeline = postprocess.Pipeline(plan)
        check = between_frames or (lambda: None)
        for frame in frames:
            source = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if lossless is not None:
                lossless.write(source)
            for out in pipeline.push(source):
                main.write(out)
                check()
            check()
        for out in pipeline.flush():
            main.write(out)
            check()
        for output in outputs:
            output.finish()
        if before_trailer is not None:
            before_trailer()
        # The job is recorded completed once the JobDone report leaves: the files must be on disk
        # by then, as checkpoints are. The MP4 (what output_url names) goes in place last.
        for output in reversed(outputs):
            output.commit()
        return outputs
    except OSError as exc:
        for output in outputs:
            output.discard()
        raise write_error(exc) from None
    except BaseException:
        for output in outputs:
            output.discard()
        raise
