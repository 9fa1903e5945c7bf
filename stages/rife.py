"""RIFE frame interpolation (the IFNet of RIFE v4.25 / v4.26), for the muxer's post-processing.

The network (Huang et al., "Real-Time Intermediate Flow Estimation", ECCV 2022; the 4.x models of
hzwer's Practical-RIFE), written here from its published layout:

- `encode`: a small CNN (stride-2 conv, two convs, a stride-2 transposed conv) turning each frame
  into feature maps at full resolution (16 channels in the release).
- `block0` .. `block4`: IFBlocks working at 1/16, 1/8, 1/4, 1/2 and 1/1 of the (padded) frame.
  Each resizes its input to its scale, runs two stride-2 convs, a stack of residual convs (a
  learned per-channel `beta` on the residual) and a stride-2 transposed conv followed by a x2
  pixel shuffle, and resizes the result back: 4 flow channels (t->0 and t->1, in pixels), 1 mask
  channel (a logit) and 8 feature channels handed to the next block. The first block sees the two
  frames, their features and the timestep (a constant channel: any t in (0, 1) works, so 16 ->
  60 fps needs no recursion); each later block sees the frames and features backward-warped by
  the flow so far (bilinear `grid_sample`, border padding), the timestep, the mask and features of
  the block before, and the flow itself, and adds a flow residual and replaces the mask.
- The frame at t: sigmoid(mask) x frame0 warped + (1 - sigmoid(mask)) x frame1 warped.

Frames are padded (zeros, right and bottom, as the release does) to a multiple of 64, which the
1/16 block with its two stride-2 convs needs, and cropped back.

Weights: a `flownet.pkl` / `.pth` state dict (read with torch's restricted unpickler,
`weights_only=True`) or a `.safetensors` file. A `module.` prefix (saved from DataParallel) is
stripped. The layout is detected from the keys and shapes, never from the file name: channel
counts are read from the shapes (so tests can build a reduced model with the release's keys), and
the file must then load STRICTLY: a missing, unexpected or mis-shaped tensor, an older 4.x layout
(four blocks, no features between blocks) or a file that is not a state dict is refused with
MODEL_LOAD_ERROR naming the file. Keys of the training-only `teacher` / `caltime` modules, if a
checkpoint carries them, are dropped (logged).

`Interpolator` runs the model on the muxer's device (fp32 on the CPU; the stage's `dtype`, e.g.
float16, on CUDA); `Stream` turns a sequence of frames at `fps` into frames at `out_fps`, a pair
of neighbouring frames at a time, with the output times the minterpolate path uses (output frame
k shows source time k x fps / out_fps; n frames give (n - 1) x out_fps // fps + 1).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ModelLoadError
from stages.weight_files import file_sha256, load_strictly, read_tensors

log = logging.getLogger(__name__)

VERSION = "4.25/4.26"  # the layouts are the same: one implementation serves both
BLOCKS = 5
SCALES = (16, 8, 4, 2, 1)  # each block's downscale (the release's scale_list at scale 1.0)
PAD = 64  # 1/16 for the first block, then two stride-2 convs
# Output frames of one interval computed together (16 -> 60 fps: 3 or 4 per interval), at most
# this many (padded) pixels in all: 4 at 480p, 1 at 720p (about 1 GB of float32 maps per 720p frame).
MAX_BATCH = 4
MAX_BATCH_PIXELS = 4 * 832 * 512
TRAINING_ONLY = ("teacher.", "caltime.")  # modules the training script has, unused at inference
SLOPE = 0.2  # LeakyReLU's negative slope, everywhere in the network


# ---- the network ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """What a weights file holds, read from its shapes."""

    head_channels: int  # encode.cnn0's output channels (16 in the release)
    features: int  # encode's output channels (16)
    block_channels: tuple[int, ...]  # each block's width (192, 128, 96, 64, 32)
    resconvs: int  # residual convs per block (8)
    carried: int  # feature channels a block hands to the next (8)

    @property
    def first_inputs(self) -> int:
        return 3 + 3 + 2 * self.features + 1  # frames, their features, the timestep

    @property
    def later_inputs(self) -> int:
        return self.first_inputs + 1 + self.carried + 4  # + mask, carried features, flow

    def describe(self) -> dict[str, Any]:
        return {"version": VERSION, "features": self.features, "block_channels": list(self.block_channels),
                "resconvs": self.resconvs}


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(SLOPE))


class Encoder(nn.Module):
    """`encode`: a frame -> feature maps at its resolution."""

    def __init__(self, hidden: int, features: int):
        super().__init__()
        self.cnn0 = nn.Conv2d(3, hidden, 3, 2, 1)
        self.cnn1 = nn.Conv2d(hidden, hidden, 3, 1, 1)
        self.cnn2 = nn.Conv2d(hidden, hidden, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(hidden, features, 4, 2, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.cnn0(image), SLOPE)
        x = F.leaky_relu(self.cnn1(x), SLOPE)
        x = F.leaky_relu(self.cnn2(x), SLOPE)
        return self.cnn3(x)


class ResConv(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.beta * self.conv(x), SLOPE)


class IFBlock(nn.Module):
    """One scale of the cascade: (inputs, flow so far) -> (flow, mask logit, carried features)."""

    def __init__(self, inputs: int, channels: int, resconvs: int, carried: int):
        super().__init__()
        self.conv0 = nn.Sequential(_conv(inputs, channels // 2, 2), _conv(channels // 2, channels, 2))
        self.convblock = nn.Sequential(*(ResConv(channels) for _ in range(resconvs)))
        # x2 up by the transposed conv, x2 by the pixel shuffle (4 x outputs channels -> outputs).
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(channels, 4 * (5 + carried), 4, 2, 1), nn.PixelShuffle(2))

    def forward(self, inputs: Sequence[torch.Tensor], flow: torch.Tensor | None,
                scale: int) -> tuple[torch.Tensor, ...]:
        """`inputs`: full-size maps, taken as one tensor of their channels in order (each is resized
        before they are joined: the same numbers as resizing the joined tensor, without building it
        at full size)."""
        parts = [resize(x, 1 / scale) for x in inputs]
        if flow is not None:  # flow is in pixels: it shrinks with the picture
            parts.append(resize(flow, 1 / scale) / scale)
        out = resize(self.lastconv(self.convblock(self.conv0(torch.cat(parts, 1)))), scale)
        return out[:, :4] * scale, out[:, 4:5], out[:, 5:]


class IFNet(nn.Module):
    """The flow network; `forward` gives the frames at `timesteps` between `frame0` and `frame1`."""

    def __init__(self, layout: Layout):
        super().__init__()
        self.layout = layout
        self.encode = Encoder(layout.head_channels, layout.features)
        for i, channels in enumerate(layout.block_channels):
            inputs = layout.first_inputs if i == 0 else layout.later_inputs
            self.add_module(f"block{i}", IFBlock(inputs, channels, layout.resconvs, layout.carried))

    def blocks(self) -> list[IFBlock]:
        return [getattr(self, f"block{i}") for i in range(len(self.layout.block_channels))]

    def forward(self, frame0: torch.Tensor, frame1: torch.Tensor, timesteps: torch.Tensor,
                features0: torch.Tensor | None = None, features1: torch.Tensor | None = None) -> torch.Tensor:
        """(1 or B, 3, H, W) frames in 0..1 (H and W multiples of 64), (B,) timesteps in (0, 1) ->
        (B, 3, H, W). `features0/1`: the frames' `encode` output, when already computed."""
        batch, _, height, width = frame0.shape
        if height % PAD or width % PAD:
            raise ValueError(f"RIFE needs sides that are multiples of {PAD}, got {width}x{height}")
        f0 = self.encode(frame0) if features0 is None else features0
        f1 = self.encode(frame1) if features1 is None else features1
        n = timesteps.shape[0]
        if batch != n:
            frame0, frame1, f0, f1 = (x.expand(n, *x.shape[1:]) for x in (frame0, frame1, f0, f1))
        t = timesteps.to(frame0.dtype).view(n, 1, 1, 1).expand(n, 1, height, width)
        flow = mask = carried = None
        warped0, warped1 = frame0, frame1
        for block, scale in zip(self.blocks(), SCALES, strict=True):
            if flow is None:
                flow, mask, carried = block((frame0, frame1, f0, f1, t), None, scale)
            else:
                assert mask is not None and carried is not None
                inputs = (warped0, warped1, warp(f0, flow[:, :2]), warp(f1, flow[:, 2:]), t, mask, carried)
                delta, mask, carried = block(inputs, flow, scale)
                flow = flow + delta
            warped0, warped1 = warp(frame0, flow[:, :2]), warp(frame1, flow[:, 2:])
        assert mask is not None
        weight = torch.sigmoid(mask)
        return weight * warped0 + (1 - weight) * warped1


def resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1:  # bilinear at scale 1 samples every pixel at its own place: the same numbers, no copy
        return x
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: out[y, x] = image[y + flow_y, x + flow_x] (bilinear, border pixels beyond the edge)."""
    _, _, height, width = image.shape
    ys = torch.arange(height, device=image.device, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, device=image.device, dtype=torch.float32).view(1, 1, width)
    # grid_sample's coordinates with align_corners=True: -1 is pixel 0, +1 is pixel side - 1.
    gx = (xs + flow[:, 0].float()) * (2 / (width - 1)) - 1
    gy = (ys + flow[:, 1].float()) * (2 / (height - 1)) - 1
    grid = torch.stack((gx, gy), dim=-1)
    if image.dtype == torch.float32:
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)
    # In half precision the grid would place samples to within a third of a pixel at 1280 wide (a
    # few pixels in bfloat16): sample in float32, keep the result in the model's dtype.
    out = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(image.dtype)


# ---- weights -------------------------------------------------------------------------------------

BLOCK_KEY = re.compile(r"^block(\d+)\.")
RESCONV_KEY = re.compile(r"^block0\.convblock\.(\d+)\.conv\.weight$")


def refuse(path: Path, why: str, **details: Any) -> ModelLoadError:
    return ModelLoadError(f"RIFE weights {path}: {why}", {"path": str(path), **details})


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors by name, `module.` stripped; a file that is not a state dict is refused."""
    out = read_tensors(path, "RIFE weights")
    dropped = [k for k in out if k.startswith(TRAINING_ONLY)]
    if dropped:
        log.info("RIFE weights %s: ignoring %d tensors of training-only modules (%s)", path, len(dropped),
                 ", ".join(sorted({k.split(".")[0] for k in dropped})))
    return {k: v for k, v in out.items() if not k.startswith(TRAINING_ONLY)}


def detect(state: dict[str, torch.Tensor], path: Path) -> Layout:
    """The layout of a state dict, from its keys and shapes; anything but v4.25/v4.26 is refused."""
    blocks = sorted({int(m.group(1)) for k in state if (m := BLOCK_KEY.match(k))})
    heads = [f"encode.cnn{i}.weight" for i in range(4)]
    if not blocks or not all(k in state for k in heads + ["block0.conv0.0.0.weight"]):
        raise refuse(path, "not a RIFE 4.x IFNet state dict (no encode.cnn0..3 / block0 tensors)",
                     keys=sorted(state)[:8])
    if blocks != list(range(len(blocks))):
        raise refuse(path, f"its blocks are numbered {blocks}", blocks=blocks)
    out_channels = state.get("block0.lastconv.0.weight")
    if out_channels is None or out_channels.ndim != 4:
        raise refuse(path, "block0.lastconv.0.weight is missing")
    outputs = int(out_channels.shape[1])
    if len(blocks) != BLOCKS or outputs % 4 or outputs // 4 <= 5:
        raise refuse(path, f"a RIFE layout this server does not run ({len(blocks)} blocks, {outputs // 4} outputs "
                     f"per block); only v{VERSION} (5 blocks handing features on) is supported",
                     blocks=len(blocks), outputs=outputs // 4, supported=VERSION)
    resconvs = sorted(int(m.group(1)) for k in state if (m := RESCONV_KEY.match(k)))
    try:
        channels = tuple(int(state[f"block{i}.conv0.1.0.weight"].shape[0]) for i in blocks)
        layout = Layout(head_channels=int(state["encode.cnn0.weight"].shape[0]),
                        features=int(state["encode.cnn3.weight"].shape[1]),
                        block_channels=channels, resconvs=len(resconvs), carried=outputs // 4 - 5)
    except (KeyError, IndexError) as exc:
        raise refuse(path, f"tensor {exc} is missing or has no such dimension") from None
    if resconvs != list(range(len(resconvs))) or not resconvs:
        raise refuse(path, f"block0's residual convs are numbered {resconvs}")
    return layout


def build(state: dict[str, torch.Tensor], path: Path) -> IFNet:
    """The network of `state`'s layout, loaded strictly: every tensor present, none extra, each shape right."""
    layout = detect(state, path)
    return load_strictly(IFNet(layout), state, "RIFE weights", path, f"the v{VERSION} layout")


# ---- running it ----------------------------------------------------------------------------------

class Interpolator:
    """A loaded RIFE model on a device: what the muxer keeps between jobs."""

    def __init__(self, path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.path = path
        self.device = torch.device(device)
        if self.device.type != "cuda" and dtype != torch.float32:
            log.info("RIFE on %s runs in float32 (half precision is for CUDA)", self.device)
            dtype = torch.float32
        self.dtype = dtype
        self.model = build(read_state(path), path).to(self.device, dtype)
        self.sha256 = file_sha256(path)

    @property
    def layout(self) -> Layout:
        return self.model.layout

    def describe(self) -> dict[str, Any]:
        """What `postprocess.applied` records of the model."""
        return {"model": self.path.name, "sha256": self.sha256, "version": VERSION,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}

    def prepare(self, frame: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8 -> (padded 0..1 tensor, its features)."""
        height, width = frame.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(frame)).to(self.device).permute(2, 0, 1)[None]
        x = x.to(self.dtype) / 255
        x = F.pad(x, (0, -width % PAD, 0, -height % PAD))
        with torch.inference_mode():
            return x, self.model.encode(x)

    def between(self, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                timesteps: list[float], height: int, width: int) -> list[np.ndarray]:
        """The frames at `timesteps` between two prepared frames, as (H, W, 3) uint8."""
        out: list[np.ndarray] = []
        batch = max(1, min(MAX_BATCH, MAX_BATCH_PIXELS // (a[0].shape[2] * a[0].shape[3])))
        with torch.inference_mode():
            for i in range(0, len(timesteps), batch):
                t = torch.tensor(timesteps[i:i + batch], device=self.device, dtype=self.dtype)
                frames = self.model(a[0], b[0], t, a[1], b[1])[:, :, :height, :width]
                pixels = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
                out.extend(pixels.cpu().numpy())
        return out


def output_times(fps: int, out_fps: int, interval: int) -> list[Fraction]:
    """Where the output frames in [interval, interval + 1) of the source fall, as fractions of it
    (output frame k shows source time k x fps / out_fps)."""
    first = -(-interval * out_fps // fps)  # the first k with k x fps >= interval x out_fps
    times = []
    k = first
    while k * fps < (interval + 1) * out_fps:
        times.append(Fraction(k * fps, out_fps) - interval)
        k += 1
    return times


class Stream:
    """Source frames in, frames at `out_fps` out, one pair of neighbours at a time: a frame's
    output frames leave as soon as the next frame arrives; `flush` gives the last one. Only two
    source frames (and their features) are held."""

    def __init__(self, model: Interpolator, fps: int, out_fps: int):
        self.model, self.fps, self.out_fps = model, fps, out_fps
        self.count = 0
        self.last: np.ndarray | None = None
        self.prepared: tuple[torch.Tensor, torch.Tensor] | None = None

    def push(self, frame: np.ndarray) -> Iterator[np.ndarray]:
        prepared = self.model.prepare(frame)
        if self.last is not None and self.prepared is not None:
            times = output_times(self.fps, self.out_fps, self.count - 1)
            if times and times[0] == 0:
                yield self.last
            between = [float(t) for t in times if t != 0]
            if between:
                height, width = frame.shape[:2]
                yield from self.model.between(self.prepared, prepared, between, height, width)
        self.last, self.prepared = frame, prepared
        self.count += 1

    def flush(self) -> Iterator[np.ndarray]:
        """The last source frame, when an output frame falls on it (always, unless nothing was pushed
        or the rates make the span end between two output frames)."""
        if self.last is not None and ((self.count - 1) * self.out_fps) % self.fps == 0:
            yield self.last
        self.last = self.prepared = None


def interpolate(model: Interpolator, frames: Iterable[np.ndarray], fps: int, out_fps: int) -> Iterator[np.ndarray]:
    """All of a clip's frames through a `Stream` (for tests and the benchmark)."""
    stream = Stream(model, fps, out_fps)
    for frame in frames:
        yield from stream.push(frame)
    yield from stream.flush()
