"""Post-processing in the muxer: frame interpolation and upscaling, streamed into the encoder.

The muxer process does it, between the VAE's frames and the encoder, for one reason: frames at the
output size (an 8K frame is 100 MB as RGB) then exist only here, one filter-graph's worth at a
time, on their way into the encoder; a stage of its own would have to send them over the wire (or
the whole clip at once). minterpolate and Lanczos run on the CPU through FFmpeg (PyAV's filter
graph); RIFE runs on the muxer stage's `device` (a GPU when it has one).

- Interpolation to `interpolate_fps`: FFmpeg's motion-compensated `minterpolate` (mci, bidirectional
  motion estimation, overlapped-block compensation). It runs at the source size, before any upscale
  (cheaper), on YUV 4:4:4 converted with the BT.709 matrix. It stops one input interval early, so
  the last frame is fed twice: n frames at f fps give (n - 1) x F / f + 1 frames at F fps (rounded
  down), covering the same span.
- Or, when the job asks for `interpolate_method = "rife"` (admission's default where the muxer has
  RIFE weights, `rife_weights`): RIFE v4.25/v4.26 (stages/rife.py) on the muxer's device, a pair of
  neighbouring frames at a time, at the same output times: output frame k shows source time
  k x f / F, so the frame count is the same as minterpolate's. Its frames then go through the same
  upscale (the graph below, without minterpolate).
- Upscaling by `upscale` (a factor) or to `upscale_to` (1080p, 4k, 8k: the short side; the aspect
  kept, even sides; `catalog.output_size`): Lanczos (FFmpeg's `scale`, `flags=lanczos`).
- Or, when the job asks for `upscale_method = "model"` (admission's default where the muxer has
  `upscale_weights`): the super-resolution model (stages/upscale.py: SRVGGNetCompact or RRDBNet,
  tiled with overlap) on the muxer's device, at its own scale, then Lanczos from its size to the
  exact output size when they differ (an x4 model for x3 is scaled down; for x6 up). It runs for
  any factor asked: its cost depends on the source size, not the factor, and what it adds
  (restored detail, less noise) shows at x1.5 as at x4, as Real-ESRGAN's own `outscale` does it.
  Frames reach it after interpolation (RIFE's, or a minterpolate-only graph), one at a time.

`Pipeline.push(frame)` returns the output frames that frame completes, `flush()` the rest: nothing
holds more than the filter graph's few frames at the output size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av

from common import catalog
from common import messages as m
from common.errors import ModelLoadError
from stages import rife as rife_model
from stages import upscale as upscale_model

INTERPOLATION = "minterpolate"
LANCZOS = "lanczos"
MINTERPOLATE_ARGS = "mi_mode=mci:mc_mode=aobmc:me_mode=bidir:vsbmc=1"


@dataclass(frozen=True)
class Plan:
    """What post-processing a job gets: source size and rate, and the output's."""

    width: int
    height: int
    fps: int
    out_width: int
    out_height: int
    out_fps: int
    method: str = INTERPOLATION  # "minterpolate" | "rife"
    rife: rife_model.Interpolator | None = field(default=None, compare=False)
    upscale_method: str = LANCZOS  # "lanczos" | "model"
    upscaler: upscale_model.Upscaler | None = field(default=None, compare=False)

    @property
    def interpolate(self) -> bool:
        return self.out_fps != self.fps

    @property
    def upscale(self) -> bool:
        return (self.out_width, self.out_height) != (self.width, self.height)

    @property
    def model_upscale(self) -> bool:
        """Whether the upscale model runs (then Lanczos from its size to the output's, if they differ)."""
        return self.upscale and self.upscale_method == "model" and self.upscaler is not None

    @property
    def model_size(self) -> tuple[int, int]:
        """The frame size the upscale model gives (the source's times its scale)."""
        scale = self.upscaler.scale if self.upscaler is not None else 1
        return self.width * scale, self.height * scale

    @property
    def active(self) -> bool:
        return self.interpolate or self.upscale

    def out_frames(self, frames: int) -> int:
        """How many frames `frames` source frames become."""
        if not self.interpolate or frames < 2:
            return frames
        return (frames - 1) * self.out_fps // self.fps + 1

    def applied(self) -> dict[str, Any]:
        """What ran, for the result's metadata (`postprocess.applied`); empty when nothing did."""
        if not self.active:
            return {}
        out: dict[str, Any] = {"width": self.out_width, "height": self.out_height, "fps": self.out_fps}
        if self.interpolate and self.method == "rife" and self.rife is not None:
            out["interpolation"] = {"method": "rife", "from_fps": self.fps, "fps": self.out_fps, **self.rife.describe()}
        elif self.interpolate:
            out["interpolation"] = {"method": INTERPOLATION, "mode": "mci", "from_fps": self.fps, "fps": self.out_fps}
        if self.model_upscale and self.upscaler is not None:
            mw, mh = self.model_size
            out["upscale"] = {"method": "model", **self.upscaler.describe(), "from": f"{self.width}x{self.height}",
                              "model_output": f"{mw}x{mh}",
                              "resize": LANCZOS if (mw, mh) != (self.out_width, self.out_height) else None,
                              "to": f"{self.out_width}x{self.out_height}"}
        elif self.upscale:
            out["upscale"] = {"method": LANCZOS, "from": f"{self.width}x{self.height}",
                              "to": f"{self.out_width}x{self.out_height}"}
        return out


def plan(p: m.JobParams, width: int, height: int, rife: rife_model.Interpolator | None = None,
         upscaler: upscale_model.Upscaler | None = None) -> Plan:
    """The plan for frames of `width` x `height` of a job with parameters `p`; `rife`, `upscaler`:
    the muxer's RIFE and upscale models, if it has them (a job that asks for one needs it)."""
    out_w, out_h = catalog.output_size(width, height, p.postprocess)
    fps = int(p.postprocess.get("interpolate_fps") or p.fps)
    method = str(p.postprocess.get("interpolate_method") or INTERPOLATION)
    if method == "rife" and fps > p.fps and rife is None:  # admission refuses it; a muxer configured since may not
        raise ModelLoadError("the job asks for RIFE interpolation but this muxer has no RIFE weights (rife_weights)",
                             {"field": "custom_options.interpolate_method", "method": method})
    scaling = str(p.postprocess.get("upscale_method") or LANCZOS)
    if scaling == "model" and (out_w, out_h) != (width, height) and upscaler is None:
        raise ModelLoadError("the job asks for a model upscale but this muxer has no upscale weights "
                             "(upscale_weights)", {"field": "custom_options.upscale_method", "method": scaling})
    return Plan(width, height, p.fps, out_w, out_h, max(fps, p.fps), method, rife if method == "rife" else None,
                scaling, upscaler if scaling == "model" else None)


class Graph:
    """One PyAV filter graph: rgb24 frames in at `width` x `height` and `rate`, rgb24 frames out;
    `interpolate_fps`: through minterpolate to that rate; `size`: Lanczos-scaled to that (w, h)."""

    def __init__(self, width: int, height: int, rate: int, interpolate_fps: int | None,
                 size: tuple[int, int] | None):
        self.rate, self.interpolating = rate, interpolate_fps is not None
        self.count = 0
        self.last: av.VideoFrame | None = None
        graph = av.filter.Graph()
        chain = [graph.add_buffer(width=width, height=height, format=av.VideoFormat("rgb24"),
                                  time_base=Fraction(1, rate))]
        if interpolate_fps is not None:
            # minterpolate takes YUV: convert with BT.709 ourselves (FFmpeg would pick BT.601).
            chain.append(graph.add("scale", "out_color_matrix=bt709:out_range=tv"))
            chain.append(graph.add("format", "pix_fmts=yuv444p"))
            chain.append(graph.add("minterpolate", f"fps={interpolate_fps}:{MINTERPOLATE_ARGS}"))
        resize = f"w={size[0]}:h={size[1]}:flags=lanczos:" if size is not None else ""
        chain.append(graph.add("scale", f"{resize}in_color_matrix=bt709:in_range=tv"))
        chain.append(graph.add("format", "pix_fmts=rgb24"))
        chain.append(graph.add("buffersink"))
        for a, b in zip(chain, chain[1:], strict=False):
            a.link_to(b)
        graph.configure()
        self.graph: Any = graph

    def push(self, frame: av.VideoFrame) -> Iterator[av.VideoFrame]:
        yield from self._push(frame)
        self.last = frame

    def flush(self) -> Iterator[av.VideoFrame]:
        if self.interpolating and self.last is not None:
            yield from self._push(self.last)  # minterpolate ends one input interval early
        self.graph.push(None)
        yield from self._drain()

    def _push(self, frame: av.VideoFrame) -> Iterator[av.VideoFrame]:
        frame.pts, frame.time_base = self.count, Fraction(1, self.rate)
        self.count += 1
        self.graph.push(frame)
        yield from self._drain()

    def _drain(self) -> Iterator[av.VideoFrame]:
        while True:
            try:
                yield self.graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                return


class Pipeline:
    """A plan's steps; frames go in at the source size, come out at the output's.

    Interpolation (RIFE, or minterpolate in the graph before the model), then the upscale model,
    then Lanczos to the exact size (the graph after it). Without a model, minterpolate and Lanczos
    share one graph (as they always did); RIFE's frames go through the Lanczos graph."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.rife = rife_model.Stream(plan.rife, plan.fps, plan.out_fps) \
            if plan.interpolate and plan.method == "rife" and plan.rife is not None else None
        self.model = plan.upscaler if plan.model_upscale else None
        minterpolate = plan.out_fps if plan.interpolate and self.rife is None else None
        out = (plan.out_width, plan.out_height)
        self.pre: Graph | None = None
        self.post: Graph | None = None
        if self.rife is None and self.model is None:
            if plan.active:
                self.pre = Graph(plan.width, plan.height, plan.fps, minterpolate, out)
            return
        if minterpolate is not None:
            self.pre = Graph(plan.width, plan.height, plan.fps, minterpolate, None)
        source = plan.model_size if self.model is not None else (plan.width, plan.height)
        if source != out:
            self.post = Graph(*source, plan.out_fps, None, out)

    def push(self, frame: av.VideoFrame) -> Iterator[av.VideoFrame]:
        if self.rife is not None:
            for out in self.rife.push(frame.to_ndarray(format="rgb24")):
                yield from self._finish(av.VideoFrame.from_ndarray(out, format="rgb24"))
        elif self.pre is not None:
            for interpolated in self.pre.push(frame):
                yield from self._finish(interpolated)
        else:
            yield from self._finish(frame)

    def flush(self) -> Iterator[av.VideoFrame]:
        if self.rife is not None:
            for out in self.rife.flush():
                yield from self._finish(av.VideoFrame.from_ndarray(out, format="rgb24"))
        elif self.pre is not None:
            for frame in self.pre.flush():
                yield from self._finish(frame)
        if self.post is not None:
            yield from self.post.flush()

    def _finish(self, frame: av.VideoFrame) -> Iterator[av.VideoFrame]:
        """A frame at the output rate: through the model and the Lanczos graph after it, if any."""
        if self.model is not None:
            frame = av.VideoFrame.from_ndarray(self.model.upscale(frame.to_ndarray(format="rgb24")), format="rgb24")
        if self.post is not None:
            yield from self.post.push(frame)
        else:
            yield frame
