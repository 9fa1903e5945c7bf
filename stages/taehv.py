"""A TAEHV-layout tiny video decoder, for live previews only.

TAEHV (madebyollin/taehv, MIT) is a small convolutional decoder (about 11 M parameters) trained to
turn the Wan VAEs' normalised latents (the space the DiT denoises in: no mean/std to undo) into
frames: `taew2_1` for the 16-channel Wan2.1 VAE (the A14B models), `taew2_2` for the 48-channel
Wan2.2 VAE (TI2V-5B). No package ships it; this module is written from the published layout, so the
released `.pth` / `.safetensors` files load into it with strict key and shape checks and no renaming.

The `decoder.N` stack (N is the index in the file's keys):

    0 clamp (tanh(x / 3) * 3)   1 conv 3x3 z -> c0 (+bias)   2 relu
    3-5 memory blocks (c0)      6 upsample x2 (nearest)      7 time grow (c0, stride 1)   8 conv c0 -> c1
    9-11 memory blocks (c1)     12 upsample x2               13 time grow (c1, stride 2)  14 conv c1 -> c2
    15-17 memory blocks (c2)    18 upsample x2               19 time grow (c2, stride 2)  20 conv c2 -> c3
    21 relu                     22 conv 3x3 c3 -> 3 * p * p (+bias), then a pixel shuffle by p

- A memory block sees its input frame and its input of the previous frame (zeros at the first):
  `relu(convs(concat(x_t, x_{t-1})) + x_t)`, the convs being 3x3 (+bias) `2c -> c`, relu, `c -> c`,
  relu, `c -> c` (keys `conv.0`, `conv.2`, `conv.4`).
- A time grow is a 1x1 conv (no bias) `c -> s * c`; output channels `[j * c, (j + 1) * c)` are the
  j-th of the `s` frames made from one input frame. A file may store the first one with stride 2
  (`2 * c0` rows): as the reference code does, its last `c0` rows (the later frame) are used, so
  time grows 4x in all, as the Wan VAEs' temporal factor.
- Output is RGB in [0, 1]. T latent frames make 4T frames; the first 3 are dropped (the VAEs'
  first latent frame is one frame): 4T - 3 frames, 8p times the latent's height and width.

Detection is from the weights alone (never the file name), as ComfyUI detects it: `decoder.22.bias`
present, the latent channels from `decoder.1.weight`'s input channels, `p` from `decoder.22.bias`'s
length (`3 * p * p`), the widths from the convs. A file that does not fit the layout, or whose latent
channels or scale do not match the model's VAE, is refused with MODEL_LOAD_ERROR naming the file.

Decoding runs over chunks of latent frames: the frames of a chunk go through every layer together
(frame-parallel), and each memory block carries its last input frame to the next chunk, so any
chunking gives the same frames as a frame-by-frame decode while the activations stay bounded. Layers
18-22 carry nothing across frames: a preview runs them on the frames it shows only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ModelLoadError

log = logging.getLogger(__name__)

MEMORY_BLOCKS = (3, 4, 5, 9, 10, 11, 15, 16, 17)
TIME_GROWS = (7, 13, 19)
TIME_SCALE = 4  # both time grows after the first double the frames
TRIM = TIME_SCALE - 1  # frames dropped at the start
BODY = 18  # layers 0-17 carry memory across frames; 18-22 work on each frame alone
CHUNK_ELEMENTS = 1 << 26  # per-tensor activation bound that sets how many latent frames decode at once


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def conv3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class MemoryBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Sequential(conv3(2 * width, width), nn.ReLU(), conv3(width, width), nn.ReLU(),
                                  conv3(width, width))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TimeGrow(nn.Module):
    def __init__(self, width: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(width, width * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, width, h, w = x.shape
        # (frames, s * c, h, w) -> (frames * s, c, h, w): each input frame becomes s frames in order.
        return self.conv(x).reshape(frames * self.stride, width, h, w)


@dataclass(frozen=True)
class Layout:
    """What a file's decoder weights say about it."""

    latent_channels: int
    patch_size: int
    widths: tuple[int, int, int, int]
    first_grow_stride: int  # as stored at decoder.7 (1 or 2; only its last c0 rows are used)
    has_encoder: bool

    @property
    def spatial_scale(self) -> int:
        return 8 * self.patch_size

    @property
    def family(self) -> str:
        """The Wan VAE it decodes for, by its latent channels and scale."""
        return {(16, 1): "wan2.1", (48, 2): "wan2.2"}.get((self.latent_channels, self.patch_size), "other")


class TaehvDecoder(nn.Module):
    """The decoder stack, its parameters named as in the released files (`decoder.N...`)."""

    def __init__(self, layout: Layout):
        super().__init__()
        self.layout = layout
        c0, c1, c2, c3 = layout.widths
        p = layout.patch_size
        stages: list[nn.Module] = [Clamp(), conv3(layout.latent_channels, c0), nn.ReLU()]
        for width, wider, stride in ((c0, c1, 1), (c1, c2, 2), (c2, c3, 2)):
            stages += [MemoryBlock(width), MemoryBlock(width), MemoryBlock(width), nn.Upsample(scale_factor=2),
                       TimeGrow(width, stride), conv3(width, wider, bias=False)]
        stages += [nn.ReLU(), conv3(c3, 3 * p * p)]
        self.decoder = nn.Sequential(*stages)

    def chunk_frames(self, height: int, width: int, every_frame: bool = True) -> int:
        """Latent frames decoded at once, so that no activation exceeds CHUNK_ELEMENTS (at least 1).
        `every_frame`: the last stage (the largest tensors) runs on every frame, not a few."""
        c0, c1, c2, c3 = self.layout.widths
        pixels = height * width
        # per latent frame: frames x channels x pixels at each stage's widest tensor (a memory block's concat)
        sizes = [2 * c0 * pixels, 2 * c1 * 4 * pixels, 2 * 2 * c2 * 16 * pixels]
        per_frame = max(sizes + ([4 * c3 * 64 * pixels] if every_frame else []))
        return max(1, CHUNK_ELEMENTS // per_frame)

    def chunks(self, latents: torch.Tensor, chunk: int | None = None,
               keep: Collection[int] | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Decode (z, T, h, w) normalised latents chunk by chunk, in order: yields (indices, frames),
        frames (n, 3, 8ph, 8pw) in [0, 1] of the 4T - 3 in all. `chunk`: latent frames per pass.
        `keep`: the indices of the frames wanted (None: all); layers 18-22 (nothing carried across
        frames) run on those only, the layers before on every frame (their memory needs them)."""
        z, total, h, w = latents.shape
        if z != self.layout.latent_channels:
            raise ValueError(f"latents have {z} channels, the decoder takes {self.layout.latent_channels}")
        step = chunk or self.chunk_frames(h, w, keep is None)
        memory: dict[int, torch.Tensor] = {}  # memory block index -> its input at the last frame so far
        body_frames = 0  # frames out of layer 17 so far (2 per latent frame)
        param = next(self.parameters())
        layers: list[nn.Module] = list(self.decoder)
        for start in range(0, total, step):
            x = latents[:, start:start + step].to(param.device, param.dtype).permute(1, 0, 2, 3)
            for index, layer in enumerate(layers[:BODY]):
                if isinstance(layer, MemoryBlock):
                    before = memory.get(index)
                    if before is None:
                        before = torch.zeros_like(x[:1])
                    past = torch.cat([before, x[:-1]], dim=0)
                    memory[index] = x[-1:]
                    x = layer(x, past)
                else:
                    x = layer(x)
            # Layer 19 makes frames 2b and 2b + 1 of body frame b; the first TRIM are dropped.
            first = 2 * body_frames - TRIM
            body_frames += x.shape[0]
            wanted = [i for i in range(2 * x.shape[0]) if first + i >= 0 and (keep is None or first + i in keep)]
            if not wanted:
                continue
            sources = sorted({i // 2 for i in wanted})
            grown = layers[BODY + 1](layers[BODY](x[sources]))  # 2 frames per source, in order
            at = {b: n for n, b in enumerate(sources)}
            y = grown[[2 * at[i // 2] + i % 2 for i in wanted]]
            for layer in layers[BODY + 2:]:
                y = layer(y)
            if self.layout.patch_size > 1:
                y = F.pixel_shuffle(y, self.layout.patch_size)
            yield [first + i for i in wanted], y.clamp(0, 1)

    def decode(self, latents: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(z, T, h, w) -> (4T - 3, 3, 8ph, 8pw) in [0, 1]."""
        return torch.cat([frames for _, frames in self.chunks(latents, chunk)])


# ---- reading and checking a weights file ----

def _refuse(path: Path, why: str, **details: object) -> ModelLoadError:
    return ModelLoadError(f"{path} is not a usable TAEHV preview decoder: {why}",
                          {"path": str(path), "reason": why, **details})


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors: safetensors (by its header, whatever the name) or a `.pth` loaded with
    weights_only=True (a pickle that wants to run code is refused)."""
    from stages.official import load_pth

    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise ModelLoadError(f"{path} (preview decoder) could not be read: {exc.strerror}",
                             {"path": str(path)}) from None
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 << 20:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the file's
            raise ModelLoadError(f"{path} is not a readable safetensors file: {type(exc).__name__}",
                                 {"path": str(path)}) from None
    return load_pth(path)


def _shape(state: Mapping[str, torch.Tensor], path: Path, key: str, dims: int) -> tuple[int, ...]:
    tensor = state.get(key)
    if tensor is None:
        raise _refuse(path, f"no {key}", missing=[key])
    if tensor.dim() != dims:
        raise _refuse(path, f"{key} has shape {list(tensor.shape)}", key=key, shape=list(tensor.shape))
    return tuple(tensor.shape)


def detect(state: Mapping[str, torch.Tensor], path: Path) -> Layout:
    """The layout of a TAEHV decoder's weights, from their keys and shapes."""
    out = _shape(state, path, "decoder.22.bias", 1)[0]
    patch = math.isqrt(out // 3)
    if out % 3 or patch * patch * 3 != out or patch < 1:
        raise _refuse(path, f"decoder.22.bias has {out} values, not 3 * p * p", key="decoder.22.bias")
    c0, z = _shape(state, path, "decoder.1.weight", 4)[:2]
    c1 = _shape(state, path, "decoder.8.weight", 4)[0]
    c2 = _shape(state, path, "decoder.14.weight", 4)[0]
    c3 = _shape(state, path, "decoder.20.weight", 4)[0]
    grow = _shape(state, path, "decoder.7.conv.weight", 4)[0]
    if grow not in (c0, 2 * c0):
        raise _refuse(path, f"decoder.7.conv.weight has {grow} rows for width {c0}", key="decoder.7.conv.weight")
    others = sorted(k for k in state if not k.startswith(("decoder.", "encoder.")))
    if others:
        raise _refuse(path, f"unexpected keys {others[:5]}", unexpected=others[:20])
    return Layout(z, patch, (c0, c1, c2, c3), grow // c0, any(k.startswith("encoder.") for k in state))


def build(state: Mapping[str, torch.Tensor], path: Path) -> TaehvDecoder:
    """A decoder holding exactly the file's decoder weights (every key, every shape checked)."""
    layout = detect(state, path)
    model = TaehvDecoder(layout)
    weights = {k: v for k, v in state.items() if k.startswith("decoder.")}
    if layout.first_grow_stride == 2:  # the later frame's rows, as the reference does
        weights["decoder.7.conv.weight"] = weights["decoder.7.conv.weight"][layout.widths[0]:]
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(weights))
    unexpected = sorted(set(weights) - set(wanted))
    if missing or unexpected:
        raise _refuse(path, f"missing {missing[:5]}, unexpected {unexpected[:5]}", missing=missing[:20],
                      unexpected=unexpected[:20])
    for key, tensor in wanted.items():
        if weights[key].shape != tensor.shape:
            raise _refuse(path, f"{key} has shape {list(weights[key].shape)}, the layout needs {list(tensor.shape)}",
                          key=key, shape=list(weights[key].shape), expected=list(tensor.shape))
        if not weights[key].is_floating_point():
            raise _refuse(path, f"{key} is not a float tensor", key=key)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return model.eval().requires_grad_(False)


def load(path: Path, *, latent_channels: int, spatial_scale: int, temporal_scale: int) -> TaehvDecoder:
    """The decoder in `path`, checked against the model's VAE (its latent channels and scales)."""
    model = build(read_state(path), path)
    layout = model.layout
    if layout.latent_channels != latent_channels:
        raise _refuse(path, f"it decodes {layout.latent_channels}-channel latents, the model's VAE has "
                      f"{latent_channels}", latent_channels=layout.latent_channels, expected=latent_channels)
    if layout.spatial_scale != spatial_scale or temporal_scale != TIME_SCALE:
        raise _refuse(path, f"it upscales {layout.spatial_scale}x in space and {TIME_SCALE}x in time, the model's "
                      f"VAE {spatial_scale}x and {temporal_scale}x", spatial_scale=layout.spatial_scale)
    return model


# ---- previews ----

class TaehvPreview:
    """Previews through a TAEHV decoder: the picked frames at pixel resolution (stages/previews.py
    lays them out and fits the 512 px bound)."""

    source = "taehv"

    def __init__(self, model: TaehvDecoder, device: torch.device, path: Path):
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.model = model.to(device, dtype)
        self.path = path

    def frames(self, latents: torch.Tensor, count: int) -> np.ndarray:
        """`count` of the decoded frames, evenly spaced from first to last (1: the middle one), as
        (count, H, W, 3) uint8. The decoder is causal: decoding stops at the last picked frame, and
        the last layers (the largest tensors, 8x8p the latent's pixels) run on the picked frames only."""
        from stages.previews import picks

        total = latents.shape[2]
        wanted = picks(TIME_SCALE * total - TRIM, count)
        kept: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            for indices, frames in self.model.chunks(latents[0], keep=set(wanted)):
                kept.update(zip(indices, frames, strict=True))
                if indices[-1] >= wanted[-1]:
                    break
            rgb = torch.stack([kept[i] for i in wanted]).permute(0, 2, 3, 1).float().mul(255).round().to(torch.uint8)
        return rgb.cpu().numpy()


def preview_for(path: Path, *, latent_channels: int, spatial_scale: int, temporal_scale: int,
                device: torch.device) -> TaehvPreview:
    model = load(path, latent_channels=latent_channels, spatial_scale=spatial_scale, temporal_scale=temporal_scale)
    layout = model.layout
    log.info("previews decode with the TAEHV decoder %s (%s: %d latent channels, patch %d, widths %s, %.1f M "
             "parameters)", path.name, layout.family, layout.latent_channels, layout.patch_size, list(layout.widths),
             sum(t.numel() for t in model.parameters()) / 1e6)
    return TaehvPreview(model, device, path)
