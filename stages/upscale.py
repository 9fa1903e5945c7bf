"""Super-resolution models for the muxer's upscaling: Real-ESRGAN's SRVGGNetCompact and RRDBNet.

spandrel is the loader issue 11 names (it detects these and many more architectures from the
weights), but it imports torchvision, and no torchvision wheel imports beside this machine's CPU
torch; the two architectures video users actually run are therefore written here, from their
published descriptions. Replace this module with spandrel once torchvision imports here (its
detection covers these two and SwinIR, HAT, SPAN, ...).

- **SRVGGNetCompact** (Real-ESRGAN's compact model: realesr-animevideov3, realesr-general-x4v3, the
  video upscalers): `body` is a flat list: a 3x3 conv from RGB to `num_feat` channels, a PReLU
  (one slope per channel), then `num_conv` times a 3x3 conv and a PReLU, and a last 3x3 conv to
  3 x scale^2 channels; a pixel shuffle by `scale` turns that into RGB at `scale` times the size,
  to which the input, upsampled by nearest neighbour, is added (the body learns a residual). Keys
  `body.0.weight` .. `body.{2 num_conv + 2}.weight`; the PReLUs are `body.{odd}.weight`.
- **RRDBNet** (ESRGAN, RealESRGAN_x4plus; x2plus): `conv_first` (3x3), `num_block` RRDBs in `body`
  (each: three residual dense blocks `rdb1..3` of five 3x3 convs `conv1..5`, every conv seeing the
  block input and all earlier outputs, LeakyReLU 0.2 after the first four, the block's output
  x 0.2 added to its input; the RRDB adds its three blocks' output x 0.2 to its input),
  `conv_body` added to `conv_first`'s output, then two rounds of nearest x2 upsampling each
  followed by a conv and LeakyReLU (`conv_up1`, `conv_up2`), `conv_hr` + LeakyReLU, `conv_last`.
  Always x4 inside: the x2 model takes the input pixel-unshuffled by 2 (12 channels), an x1 model
  by 4 (48 channels).

Weights: `.pth` (torch's restricted unpickler, `weights_only=True`: a pickle that would run code
is refused) or `.safetensors`. Real-ESRGAN's releases wrap the state dict as `{"params_ema": ...}`
or `{"params": ...}` (the EMA weights are the ones to run, as its own inference does); a
DataParallel `module.` prefix is stripped. The architecture and its sizes (num_feat, num_conv or
num_block and num_grow_ch, scale) are read from the keys and shapes, never the file name, and the
file must then load STRICTLY: a missing, unexpected or mis-shaped tensor, a non-finite one, an
activation without weights (the ReLU / LeakyReLU variants of SRVGG cannot be told apart from the
file), or anything that is neither architecture is refused with MODEL_LOAD_ERROR naming the file.

Tiling (`Upscaler.upscale`): a frame is cut into `tile` x `tile` cores (input pixels); each is
run with `overlap` pixels of its neighbours around it (fewer at the frame's edge, where the
network pads with zeros as it would on the whole frame), and only the core's part of the output
is kept (crop-based stitching, no blending). A network's output pixel depends on input pixels
within its reach (`Layout.reach`: one pixel per 3x3 conv on the input grid); with `overlap` at
least that, the stitched frame is the untiled one up to float rounding (tests/test_upscale.py).
The release models reach further than the default overlap (RRDBNet x4plus: 351 pixels), but the
influence of pixels that far is negligible in practice (Real-ESRGAN's own tiling uses 10); each
tile's output goes to uint8 on the device and only the frame at the model's size is held.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ModelLoadError
from stages.weight_files import file_sha256, load_strictly, read_tensors

log = logging.getLogger(__name__)

SRVGG = "SRVGGNetCompact"
RRDB = "RRDBNet"
LRELU = 0.2  # RRDBNet's LeakyReLU slope
DENSE_SCALE = 0.2  # the residual scaling of a dense block and of an RRDB
WRAPPERS = ("params_ema", "params")  # Real-ESRGAN's release files: the EMA weights first


# ---- the networks --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """What a weights file holds, read from its keys and shapes."""

    arch: str  # SRVGG | RRDB
    scale: int  # output size / input size
    num_feat: int
    num_conv: int = 0  # SRVGG: body convs between the first and the last
    num_block: int = 0  # RRDB: RRDBs in the trunk
    num_grow_ch: int = 0  # RRDB: channels each dense conv adds

    @property
    def unshuffle(self) -> int:
        """RRDBNet below x4 takes its input pixel-unshuffled by this (x2: 2, x1: 4); else 1."""
        return 4 // self.scale if self.arch == RRDB else 1

    @property
    def reach(self) -> int:
        """How far (input pixels) an output pixel's inputs lie at most: one per 3x3 conv on the
        input grid; RRDBNet's trunk works on the unshuffled grid, and each of its four convs after
        the nearest upsampling reaches at most one more pixel of the grid before it."""
        if self.arch == SRVGG:
            return self.num_conv + 2
        return (2 + 15 * self.num_block + 4) * self.unshuffle

    def describe(self) -> dict[str, Any]:
        sizes = {"num_conv": self.num_conv} if self.arch == SRVGG else \
            {"num_block": self.num_block, "num_grow_ch": self.num_grow_ch}
        return {"architecture": self.arch, "scale": self.scale, "num_feat": self.num_feat, **sizes}


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1)


class Compact(nn.Module):
    """SRVGGNetCompact with PReLU activations."""

    def __init__(self, layout: Layout):
        super().__init__()
        self.layout = layout
        feat = layout.num_feat
        layers: list[nn.Module] = []
        for i in range(layout.num_conv + 1):
            layers += [_conv(3 if i == 0 else feat, feat), nn.PReLU(feat)]
        layers.append(_conv(feat, 3 * layout.scale ** 2))
        self.body = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.body:
            y = layer(y)
        return F.pixel_shuffle(y, self.layout.scale) + F.interpolate(x, scale_factor=self.layout.scale,
                                                                       mode="nearest")


class DenseBlock(nn.Module):
    def __init__(self, feat: int, grow: int):
        super().__init__()
        for i in range(1, 6):
            self.add_module(f"conv{i}", _conv(feat + (i - 1) * grow, feat if i == 5 else grow))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *dense, last = (getattr(self, f"conv{i}") for i in range(1, 6))
        seen = [x]
        for conv in dense:
            seen.append(F.leaky_relu(conv(torch.cat(seen, 1)), LRELU))
        out: torch.Tensor = last(torch.cat(seen, 1))
        return x + DENSE_SCALE * out


class ResidualInResidual(nn.Module):
    def __init__(self, feat: int, grow: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (DenseBlock(feat, grow) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + DENSE_SCALE * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    def __init__(self, layout: Layout):
        super().__init__()
        self.layout = layout
        feat = layout.num_feat
        self.conv_first = _conv(3 * layout.unshuffle ** 2, feat)
        self.body = nn.Sequential(*(ResidualInResidual(feat, layout.num_grow_ch) for _ in range(layout.num_block)))
        self.conv_body = _conv(feat, feat)
        self.conv_up1 = _conv(feat, feat)
        self.conv_up2 = _conv(feat, feat)
        self.conv_hr = _conv(feat, feat)
        self.conv_last = _conv(feat, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.layout.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in (self.conv_up1, self.conv_up2):
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), LRELU)
        out: torch.Tensor = self.conv_last(F.leaky_relu(self.conv_hr(feat), LRELU))
        return out


def network(layout: Layout) -> nn.Module:
    return Compact(layout) if layout.arch == SRVGG else RRDBNet(layout)


# ---- weights -------------------------------------------------------------------------------------

BODY_KEY = re.compile(r"^body\.(\d+)\.")


def refuse(path: Path, why: str, **details: Any) -> ModelLoadError:
    return ModelLoadError(f"upscale weights {path}: {why}", {"path": str(path), **details})


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors by name (unwrapped from `params_ema` / `params`, `module.` stripped)."""
    return read_tensors(path, "upscale weights", WRAPPERS)


def _shape(state: dict[str, torch.Tensor], key: str, path: Path, ndim: int) -> tuple[int, ...]:
    value = state.get(key)
    if value is None or value.ndim != ndim:
        raise refuse(path, f"{key} is missing or not {ndim}-dimensional", key=key)
    return tuple(int(d) for d in value.shape)


def detect(state: dict[str, torch.Tensor], path: Path) -> Layout:
    """The architecture and sizes of a state dict, from its keys and shapes."""
    if "conv_first.weight" in state and "body.0.rdb1.conv1.weight" in state:
        feat, cin = _shape(state, "conv_first.weight", path, 4)[:2]
        unshuffles = {3: 1, 12: 2, 48: 4}
        if cin not in unshuffles:
            raise refuse(path, f"RRDBNet with {cin} input channels (3, 12 or 48 for RGB at x4, x2, x1)",
                         in_channels=cin)
        blocks = sorted({int(m.group(1)) for k in state if (m := BODY_KEY.match(k))})
        if blocks != list(range(len(blocks))):
            raise refuse(path, f"its RRDBs are numbered {blocks[:10]}...", blocks=len(blocks))
        grow = _shape(state, "body.0.rdb1.conv1.weight", path, 4)[0]
        return Layout(RRDB, 4 // unshuffles[cin], feat, num_block=len(blocks), num_grow_ch=grow)
    if "body.0.weight" in state and "body.1.weight" in state:
        feat = _shape(state, "body.0.weight", path, 4)[0]
        if _shape(state, "body.1.weight", path, 1) != (feat,):
            raise refuse(path, f"body.1 is not a PReLU of {feat} channels")
        last = max(int(m.group(1)) for k in state if (m := BODY_KEY.match(k)))
        out = _shape(state, f"body.{last}.weight", path, 4)[0]
        scale = math.isqrt(out // 3)
        if last % 2 or last < 2 or out % 3 or 3 * scale * scale != out:
            raise refuse(path, f"an SRVGGNetCompact whose last conv (body.{last}) has {out} outputs "
                         "(3 x scale^2 at an even index expected)", last=last, outputs=out)
        return Layout(SRVGG, scale, feat, num_conv=(last - 2) // 2)
    if "body.0.weight" in state:
        raise refuse(path, "an SRVGGNetCompact without PReLU weights (body.1.weight): its activation "
                     "(ReLU or LeakyReLU) cannot be read from the file; only the PReLU models are run")
    raise refuse(path, f"neither {SRVGG} (body.N) nor {RRDB} (conv_first, body.N.rdbK) weights; "
                 "other architectures need spandrel, which does not import here", keys=sorted(state)[:8],
                 supported=[SRVGG, RRDB])


def build(state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """The network of `state`'s layout, loaded strictly: every tensor present, none extra, each shape right."""
    layout = detect(state, path)
    return load_strictly(network(layout), state, "upscale weights", path, f"{layout.arch} x{layout.scale}",
                         **layout.describe())


# ---- tiling --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tile:
    core: tuple[int, int, int, int]  # y0, y1, x0, x1: the input pixels whose output this tile gives
    region: tuple[int, int, int, int]  # the input pixels it is run on (the core with its overlap)


def tiles(height: int, width: int, tile: int, overlap: int) -> Iterator[Tile]:
    """Cores of `tile` x `tile` covering the frame, each with `overlap` pixels around it (within the frame)."""
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            y1, x1 = min(height, y0 + tile), min(width, x0 + tile)
            region = (max(0, y0 - overlap), min(height, y1 + overlap), max(0, x0 - overlap), min(width, x1 + overlap))
            yield Tile((y0, y1, x0, x1), region)


def run_tiled(model: nn.Module, x: torch.Tensor, tile: int, overlap: int, out: torch.Tensor,
              convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """`model` over (1, 3, H, W) `x` tile by tile into `out` ((1, 3, sH, sW), any dtype: each
    tile's kept output goes through `convert` first). H, W, `tile` and `overlap` must be multiples
    of the layout's unshuffle (so every tile's pixel-unshuffle grid is the whole frame's)."""
    layout: Layout = model.layout  # type: ignore[assignment]
    s = layout.scale
    _, _, height, width = x.shape
    for t in tiles(height, width, tile, overlap):
        y0, y1, x0, x1 = t.core
        ry0, ry1, rx0, rx1 = t.region
        y = model(x[:, :, ry0:ry1, rx0:rx1])
        kept = y[:, :, (y0 - ry0) * s:(y1 - ry0) * s, (x0 - rx0) * s:(x1 - rx0) * s]
        out[:, :, y0 * s:y1 * s, x0 * s:x1 * s] = convert(kept)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8)


# ---- running it ----------------------------------------------------------------------------------

class Upscaler:
    """A loaded super-resolution model on a device, with its tiling: what the muxer keeps between jobs."""

    def __init__(self, path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 tile: int = 512, overlap: int = 32):
        self.path = path
        self.device = torch.device(device)
        if self.device.type != "cuda" and dtype != torch.float32:
            log.info("the upscale model on %s runs in float32 (half precision is for CUDA)", self.device)
            dtype = torch.float32
        self.dtype = dtype
        self.model = build(read_state(path), path).to(self.device, dtype)
        self.sha256 = file_sha256(path)
        step = self.layout.unshuffle  # tiles on the unshuffle grid
        if tile < 16 or overlap < 0:
            raise ModelLoadError(f"upscale tiling needs a tile of at least 16 pixels and an overlap of 0 or more, "
                                 f"not {tile} and {overlap}", {"tile": tile, "overlap": overlap})
        self.tile, self.overlap = -(-tile // step) * step, -(-overlap // step) * step

    @property
    def layout(self) -> Layout:
        layout: Layout = self.model.layout  # type: ignore[assignment]
        return layout

    @property
    def scale(self) -> int:
        return self.layout.scale

    def describe(self) -> dict[str, Any]:
        """What `postprocess.applied.upscale` records of the model."""
        return {"model": self.path.name, "sha256": self.sha256, **self.layout.describe(),
                "tile": {"size": self.tile, "overlap": self.overlap}, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch.")}

    def upscale(self, frame: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (scale x H, scale x W, 3) uint8, tile by tile."""
        height, width = frame.shape[:2]
        step = self.layout.unshuffle
        x = torch.from_numpy(np.ascontiguousarray(frame)).to(self.device).permute(2, 0, 1)[None]
        x = x.to(self.dtype) / 255
        if height % step or width % step:  # the unshuffle needs whole cells: repeat the edge, crop after
            x = F.pad(x, (0, -width % step, 0, -height % step), mode="replicate")
        s = self.scale
        out = torch.empty((1, 3, x.shape[2] * s, x.shape[3] * s), dtype=torch.uint8, device=self.device)
        with torch.inference_mode():
            run_tiled(self.model, x, self.tile, self.overlap, out, to_uint8)
        return out[0, :, :height * s, :width * s].permute(1, 2, 0).cpu().numpy()
