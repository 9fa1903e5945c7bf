"""Live previews: the DiT stage's current x0 prediction as a small picture, written into the job's
spool folder while it denoises.

A preview is a linear projection of the normalised latent to RGB (per latent pixel: `rgb = z @ W + b`,
then [-1, 1] -> [0, 255]), at latent resolution, so it costs one small matmul and an image encode.
`W` and `b` come from the VAE family:

- the published Wan2.1 (z16) and Wan2.2 (z48) VAEs: the coefficients that have been fitted for them
  publicly (the same numbers ComfyUI previews with), recognised from the VAE's architecture and latent
  statistics (never from a file name);
- any other VAE (the tiny random ones of the tiny profile): a least-squares fit against that VAE's
  own decode of random latents, done once and cached beside the models
  (`<model_cache_dir>/preview-fits/<fingerprint>.json`; never inside a model's folder, which may be
  read-only and whose files a tiny build fixes).

What a preview of a video shows: `[previews] frames` latent frames, evenly spaced from the first to
the last, in a grid (left to right, top to bottom); 1 shows the middle frame. One still image that
every decoder reads (browsers, PyAV/ffmpeg, PIL): an animated WebP would show the motion too, but
FFmpeg's WebP decoder here does not read animated files, and it costs one encode per latent frame.
A grid of a few moments shows what the user decides on while it renders (layout, subject, how it
moves) at a size that fits a 512 px box.

With a TAEHV decoder configured for the model (`[models.<id>] preview_decoder`, stages/taehv.py)
the same grid is made of decoded frames at pixel resolution instead: `frames` of the clip's frames,
evenly spaced from the first to the last, scaled into the same 512 px box. Same layout, same still
image for every client; only sharper (a latent pixel is 8x8 or 16x16 pixels).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from common import spool
from common.config import Config, PreviewsSection

log = logging.getLogger(__name__)

MAX_SIDE = 512  # a preview's long side, at most
FIT_DIR = "preview-fits"
FIT_VERSION = 1
EXTENSIONS = {"jpeg": "jpg", "webp": "webp"}

# Published latent -> RGB coefficients (one row per latent channel: R, G, B) of the released VAEs,
# for the normalised latent the DiT works in ((z - mean) / std). Facts read from public sources.
WAN21_RGB = [
    [-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747], [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665], [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364], [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950], [0.1984, 0.0913, 0.1861],
]
WAN21_BIAS = [-0.1835, -0.0868, -0.3360]
WAN22_RGB = [
    [0.0119, 0.0103, 0.0046], [-0.1062, -0.0504, 0.0165], [0.0140, 0.0409, 0.0491], [-0.0813, -0.0677, 0.0607],
    [0.0656, 0.0851, 0.0808], [0.0264, 0.0463, 0.0912], [0.0295, 0.0326, 0.0590], [-0.0244, -0.0270, 0.0025],
    [0.0443, -0.0102, 0.0288], [-0.0465, -0.0090, -0.0205], [0.0359, 0.0236, 0.0082], [-0.0776, 0.0854, 0.1048],
    [0.0564, 0.0264, 0.0561], [0.0006, 0.0594, 0.0418], [-0.0319, -0.0542, -0.0637], [-0.0268, 0.0024, 0.0260],
    [0.0539, 0.0265, 0.0358], [-0.0359, -0.0312, -0.0287], [-0.0285, -0.1032, -0.1237], [0.1041, 0.0537, 0.0622],
    [-0.0086, -0.0374, -0.0051], [0.0390, 0.0670, 0.2863], [0.0069, 0.0144, 0.0082], [0.0006, -0.0167, 0.0079],
    [0.0313, -0.0574, -0.0232], [-0.1454, -0.0902, -0.0481], [0.0714, 0.0827, 0.0447], [-0.0304, -0.0574, -0.0196],
    [0.0401, 0.0384, 0.0204], [-0.0758, -0.0297, -0.0014], [0.0568, 0.1307, 0.1372], [-0.0055, -0.0310, -0.0380],
    [0.0239, -0.0305, 0.0325], [-0.0663, -0.0673, -0.0140], [-0.0416, -0.0047, -0.0023], [0.0166, 0.0112, -0.0093],
    [-0.0211, 0.0011, 0.0331], [0.1833, 0.1466, 0.2250], [-0.0368, 0.0370, 0.0295], [-0.3441, -0.3543, -0.2008],
    [-0.0479, -0.0489, -0.0420], [-0.0660, -0.0153, 0.0800], [-0.0101, 0.0068, 0.0156], [-0.0690, -0.0452, -0.0927],
    [-0.0145, 0.0041, 0.0015], [0.0421, 0.0451, 0.0373], [0.0504, -0.0483, -0.0356], [-0.0837, 0.0168, 0.0055],
]
WAN22_BIAS = [0.0317, -0.0878, -0.1388]


@dataclass(frozen=True)
class Projection:
    """latent (normalised, z channels) -> RGB in [-1, 1]: `rgb = z @ weight + bias`."""

    weight: torch.Tensor  # (z, 3)
    bias: torch.Tensor  # (3,)
    source: str  # "wan2.1" | "wan2.2" | "fit"

    def to(self, device: torch.device) -> Projection:
        return Projection(self.weight.to(device, torch.float32), self.bias.to(device, torch.float32), self.source)

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, z, F, H, W) latents -> (F, H, W, 3) uint8, on the latents' device."""
        rgb = torch.einsum("cfhw,cr->fhwr", latents[0].float(), self.weight) + self.bias
        return ((rgb + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def frames(self, latents: torch.Tensor, count: int) -> np.ndarray:
        """`count` latent frames, evenly spaced from first to last (1: the middle one), projected:
        (count, H, W, 3) uint8."""
        return self.rgb(latents[:, :, picks(latents.shape[2], count)]).cpu().numpy()


class Renderer(Protocol):
    """What makes a preview's frames: a Projection, or a TAEHV decoder (stages/taehv.py)."""

    @property
    def source(self) -> str: ...  # "wan2.1" | "wan2.2" | "fit" | "taehv"

    def frames(self, latents: torch.Tensor, count: int) -> np.ndarray: ...


def published(name: str) -> Projection:
    table = {"wan2.1": (WAN21_RGB, WAN21_BIAS), "wan2.2": (WAN22_RGB, WAN22_BIAS)}[name]
    return Projection(torch.tensor(table[0]), torch.tensor(table[1]), name)


def vae_family(vae: dict[str, Any]) -> str | None:
    """"wan2.1" or "wan2.2" for the released VAEs' architecture and latent statistics, else None
    (a VAE of another size, e.g. the tiny models, decodes differently: its projection is fitted)."""
    from stages.official_keys import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, latents_stats

    z, base, residual = vae.get("z_dim"), vae.get("base_dim"), bool(vae.get("is_residual", False))
    if (z, base, residual) == (16, 96, False):
        name, (mean, std) = "wan2.1", latents_stats(False)
    elif (z, base, residual) == (48, 160, True):
        name, mean, std = "wan2.2", WAN22_LATENTS_MEAN, WAN22_LATENTS_STD
    else:
        return None
    same = lambda a, b: len(a) == len(b) and all(abs(x - y) < 1e-4 for x, y in zip(a, b, strict=True))  # noqa: E731
    return name if same(vae.get("latents_mean", []), mean) and same(vae.get("latents_std", []), std) else None


# ---- the least-squares fit, for a VAE with no published projection ----

def fit_projection(decode: Callable[[torch.Tensor], torch.Tensor], z_dim: int, scale_spatial: int,
                   scale_temporal: int, *, samples: int = 4, frames: int = 3, size: int = 8,
                   seed: int = 0) -> Projection:
    """Fit `rgb = z @ W + b` to what `decode` makes of random normalised latents.

    `decode` takes normalised latents (1, z, F, H, W) and returns the video (1, 3, T, H*s, W*s) in
    [-1, 1], T = (F - 1) * scale_temporal + 1 (the Wan VAEs: the first latent frame is one frame,
    each later one `scale_temporal` frames). Each latent pixel is paired with the mean colour of the
    pixels it decodes to."""
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = [], []
    for _ in range(samples):
        z = torch.randn((1, z_dim, frames, size, size), generator=generator)
        video = decode(z).float().clamp(-1, 1)[0]  # (3, T, H*s, W*s)
        first, rest = video[:, :1], video[:, 1:]
        if rest.shape[1]:
            rest = rest.reshape(3, frames - 1, scale_temporal, *rest.shape[2:]).mean(2)
        per_frame = torch.cat([first, rest], dim=1)  # (3, F, H*s, W*s)
        pooled = torch.nn.functional.avg_pool2d(per_frame, scale_spatial)  # (3, F, H, W)
        inputs.append(z[0].reshape(z_dim, -1).T)
        targets.append(pooled.reshape(3, -1).T)
    x = torch.cat(inputs).double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    y = torch.cat(targets).double()
    solution = torch.linalg.lstsq(x, y).solution  # (z + 1, 3)
    return Projection(solution[:-1].float(), solution[-1].float(), "fit")


def vae_fingerprint(folder: Path, vae: dict[str, Any]) -> str:
    """Changes when the VAE's config or weights file changes (a rebuilt model gets a new fit)."""
    h = hashlib.sha256(json.dumps(vae, sort_keys=True, default=str).encode())
    for path in sorted([*folder.glob("vae/*.safetensors"), *folder.glob("vae/*.bin"), *folder.glob("Wan2.*_VAE.pth")]):
        stat = path.stat()
        h.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()


def vae_config(folder: Path) -> dict[str, Any]:
    from stages import official
    from stages.models import layout_of, read_json

    if layout_of(folder) == "official":
        return official.vae_config(folder)[0]
    return read_json(folder / "vae" / "config.json")


def fitted(folder: Path, vae: dict[str, Any], cache_dir: Path) -> Projection:
    """The cached fit of the model's VAE, or a new one (decoding with the VAE on the CPU), cached."""
    fingerprint = vae_fingerprint(folder, vae)
    cache = cache_dir / FIT_DIR / f"{fingerprint[:32]}.json"
    try:
        body = json.loads(cache.read_text())
        if body.get("version") == FIT_VERSION and body.get("fingerprint") == fingerprint:
            return Projection(torch.tensor(body["weight"]), torch.tensor(body["bias"]), "fit")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from diffusers import AutoencoderKLWan

    from stages.models import load_component

    started = time.monotonic()
    model = load_component(AutoencoderKLWan, folder, "vae", torch_dtype=torch.float32)
    z = int(model.config.z_dim)
    mean = torch.tensor(model.config.latents_mean).view(1, z, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(1, z, 1, 1, 1)
    with torch.no_grad():
        projection = fit_projection(lambda latents: model.decode(latents * std + mean, return_dict=False)[0], z,
                                    int(model.config.scale_factor_spatial), int(model.config.scale_factor_temporal))
    body = {"version": FIT_VERSION, "fingerprint": fingerprint, "weight": projection.weight.tolist(),
            "bias": projection.bias.tolist()}
    try:
        spool.write_atomic(cache, json.dumps(body).encode())
    except OSError as exc:  # a read-only model folder: fit again at the next start
        log.warning("could not cache the preview projection: %s", exc.strerror)
    log.info("fitted the preview projection of %s's VAE in %.2f s", folder.name, time.monotonic() - started)
    return projection


def projection_for(folder: Path, cache_dir: Path) -> Projection:
    """The projection for the VAE of the model in `folder`: published for its family, or fitted
    (cached under `cache_dir`)."""
    vae = vae_config(folder)
    family = vae_family(vae)
    return published(family) if family else fitted(folder, vae, cache_dir)


# ---- rendering and throttling ----

def picks(total: int, count: int) -> list[int]:
    """The indices of `count` of `total` frames, evenly spaced from first to last (1: the middle one)."""
    count = max(1, min(count, total))
    if count == 1:
        return [total // 2]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def tile(frames: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) -> one image: the frames in a grid, left to right, top to bottom."""
    count = frames.shape[0]
    if count == 1:
        return frames[0]
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    h, w = frames.shape[1:3]
    out = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for n, frame in enumerate(frames):
        r, c = divmod(n, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = frame
    return out


def grid(frames: np.ndarray, count: int) -> np.ndarray:
    """(F, H, W, 3) -> one image: `count` frames evenly spaced from first to last, in a grid
    (1: the middle frame)."""
    return tile(frames[picks(frames.shape[0], count)])


def encode(image: np.ndarray, fmt: str, quality: int) -> bytes:
    picture = Image.fromarray(image)
    long_side = max(picture.size)
    if long_side > MAX_SIDE:
        scale = MAX_SIDE / long_side
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    if fmt == "webp":
        picture.save(buffer, "WEBP", quality=quality, method=0)
    else:
        picture.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


class Previewer:
    """Makes a job's previews in a DiT stage: when one is due, and the image file."""

    def __init__(self, config: Config, section: PreviewsSection, projections: Mapping[str, Renderer]):
        self.config = config
        self.section = section
        self.projections = dict(projections)  # model -> projection or TAEHV decoder, on the stage's device
        self.extension = EXTENSIONS[section.format]
        self.last: dict[str, float] = {}  # job id -> when its last preview was made (monotonic)

    def serves(self, model: str) -> bool:
        """Whether the model has a projection (a model handed to the stage by a benchmark has none)."""
        return model in self.projections

    def due(self, job_id: str, always: bool) -> bool:
        """A preview after this step? `always` at the last step of this stage's part (the expert
        hand-off, or the job's last step) and where the expert changes; else once per `interval_s`."""
        if always:
            return True
        last = self.last.get(job_id)
        return last is None or time.monotonic() - last >= self.section.interval_s

    def write(self, model: str, job_id: str, done: int, x0: torch.Tensor) -> str | None:
        """Render (project, or decode with TAEHV), encode and write the preview of `x0` (normalised
        latents); its file name, or None when the model has neither or the file could not be written."""
        projection = self.projections.get(model)
        if projection is None:
            return None
        self.last[job_id] = time.monotonic()
        if len(self.last) > 1000:  # forget jobs long gone
            for old in sorted(self.last, key=self.last.__getitem__)[:500]:
                del self.last[old]
        try:
            frames = projection.frames(x0, self.section.frames)
        except (RuntimeError, ValueError) as exc:  # e.g. a TAEHV decode out of GPU memory: no preview this time
            log.warning("could not render a preview with %s: %s", projection.source, type(exc).__name__)
            return None
        data = encode(tile(frames), self.section.format, self.section.quality)
        name = spool.preview_name(done, self.extension)
        try:
            spool.write_preview(self.config, job_id, name, data)
        except OSError as exc:  # a preview is never worth failing the job for
            log.warning("could not write a preview: %s", os.strerror(exc.errno) if exc.errno else type(exc).__name__)
            return None
        return name
