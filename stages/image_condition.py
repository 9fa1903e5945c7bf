"""The conditioning image of an image-to-video job: from the uploaded file to the condition latents;
and the input video of a video-to-video job, to its latents (`load_video`, `encode_video`).

This is the image half of diffusers' `WanImageToVideoPipeline` (its `preprocess` and
`prepare_latents` apart from the noise), run in the text_encoder process:

- `fit_image`: scale the image to cover the job's size and crop the centre, keeping the aspect
  (as the official Wan2.2 TI2V code does before encoding; `WanImageToVideoPipeline` itself would
  stretch an image of another aspect, so the stage hands it an image of the exact size);
- `encode_condition`: normalise to [-1, 1], VAE-encode (the latent distribution's mode, as the
  pipeline's `sample_mode="argmax"`), normalise the latents with the VAE's mean/std, and build the
  frame mask: I2V-A14B encodes the image followed by `num_frames - 1` black frames and prepends a
  4-channel mask; TI2V-5B encodes the image alone and masks the first latent frame.

Video-to-video follows diffusers' `WanVideoToVideoPipeline`: the frames (each fitted like an
image) go through its `VideoProcessor.preprocess_video`, the VAE's latent mode, and the VAE's
mean/std normalisation; the DiT stage adds the noise (it owns the schedule).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from pathlib import Path

import av
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor
from PIL import Image

from common import catalog
from common import messages as m
from common.errors import InvalidRequest
from stages.models import PipelineInfo

log = logging.getLogger(__name__)


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale `image` (RGB) to cover `width` x `height` (Lanczos), then crop the centre to exactly that."""
    iw, ih = image.size
    if (iw, ih) == (width, height):
        return image
    scale = max(width / iw, height / ih)
    sw, sh = max(width, round(iw * scale)), max(height, round(ih * scale))
    image = image.resize((sw, sh), Image.Resampling.LANCZOS)
    x, y = (sw - width) // 2, (sh - height) // 2
    return image.crop((x, y, x + width, y + height))


def read_input(path: str | Path, sha256: str | None, field: str, what: str) -> bytes:
    """A job's input file (image, audio, pose video) from its spool folder; with `sha256`, it must be
    the one the broker admitted. The errors reach the client: they name the problem (`what`,
    `field`), never the spool path or the OS's text, which go to the stage's log."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        log.error("the %s %s is missing", what, path)
        raise InvalidRequest(f"the job's {what} is missing", {"field": field}) from None
    except OSError as exc:
        log.error("the %s %s could not be read: %s", what, path, exc)
        raise InvalidRequest(f"the job's {what} could not be read",
                             {"field": field, "reason": type(exc).__name__}) from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        log.error("the %s %s is not the one admitted (SHA-256 differs)", what, path)
        raise InvalidRequest(f"the job's {what} is not the one admitted (SHA-256 differs)", {"field": field})
    return data


def fit_short_side_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """What the S2V release does to its reference image and pose frames (torchvision's
    `CenterCrop((height, width))(Resize(min(height, width))(image))` on a PIL image), written out:
    the short side scaled to min(width, height) with PIL's bilinear filter (the long side
    int(short * long / short_side), untouched when the short side is already that), then the
    centre cut out at offsets round((size - target) / 2), black padding where the image is smaller."""
    iw, ih = image.size
    target = min(width, height)
    short, long = min(iw, ih), max(iw, ih)
    if short != target:
        new_short, new_long = target, int(target * long / short)
        size = (new_short, new_long) if iw <= ih else (new_long, new_short)
        image = image.resize(size, Image.Resampling.BILINEAR)
    iw, ih = image.size
    if iw < width or ih < height:
        padded = Image.new("RGB", (max(iw, width), max(ih, height)))
        padded.paste(image, ((width - iw) // 2 if width > iw else 0, (height - ih) // 2 if height > ih else 0))
        image = padded
        iw, ih = image.size
    top, left = int(round((ih - height) / 2.0)), int(round((iw - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def load_image(path: str | Path, width: int, height: int, sha256: str | None = None,
               fit: Callable[[Image.Image, int, int], Image.Image] = fit_image) -> Image.Image:
    """The job's image from its spool file, as RGB of the job's size (fitted by `fit`); with
    `sha256`, the file must be the one the broker admitted."""
    # The errors reach the client: they name the problem, never the spool path or the decoder's
    # text, which go to the stage's log.
    data = read_input(path, sha256, "image", "input image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            image = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        log.error("the input image %s does not decode: %s: %s", path, type(exc).__name__, exc)
        raise InvalidRequest("the job's input image does not decode", {"field": "image",
                                                                       "reason": type(exc).__name__}) from None
    return fit(image, width, height)


@torch.no_grad()
def encode_condition(
    vae: AutoencoderKLWan, info: PipelineInfo, image: Image.Image, p: m.JobParams, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(condition, first_frame_mask) as `WanImageToVideoPipeline.prepare_latents` builds them (float32)."""
    processor = VideoProcessor(vae_scale_factor=info.vae_scale_spatial)
    pixels = processor.preprocess(image, height=p.height, width=p.width).to(device, dtype=torch.float32)
    pixels = pixels.unsqueeze(2)  # (1, 3, 1, H, W)
    num_latent_frames = (p.num_frames - 1) // info.vae_scale_temporal + 1
    latent_h, latent_w = p.height // info.vae_scale_spatial, p.width // info.vae_scale_spatial

    if info.image_conditioning == "first_frame":
        video = pixels
    else:
        video = torch.cat([pixels, pixels.new_zeros(1, 3, p.num_frames - 1, p.height, p.width)], dim=2)
    video = video.to(device=device, dtype=vae.dtype)
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(device, torch.float32)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(device, torch.float32)
    latent = vae.encode(video).latent_dist.mode()
    latent = (latent.to(device=device, dtype=torch.float32) - mean) * inv_std

    if info.image_conditioning == "first_frame":
        mask = torch.ones(1, 1, num_latent_frames, latent_h, latent_w, dtype=torch.float32, device=device)
        mask[:, :, 0] = 0
        return latent, mask

    t = info.vae_scale_temporal
    mask = torch.ones(1, 1, p.num_frames, latent_h, latent_w)
    mask[:, :, list(range(1, p.num_frames))] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=t)
    mask = torch.concat([first, mask[:, :, 1:, :]], dim=2)
    mask = mask.view(1, -1, t, latent_h, latent_w).transpose(1, 2).to(latent.device)
    return torch.concat([mask, latent], dim=1), None


def load_video(path: str | Path, p: m.JobParams) -> list[Image.Image]:
    """The job's input video as `p.num_frames` RGB frames of the job's size: from its first frame
    every catalog.video_interval-th (the job's fps on the video's timeline), each fitted as an
    image is (`fit_image`). The errors name the problem, never the path or the decoder's text."""
    video = p.video or {}
    data = read_input(path, video.get("sha256"), "video", "input video")
    interval = catalog.video_interval(video.get("fps"), p.fps)
    frames: list[Image.Image] = []
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            for i, frame in enumerate(container.decode(stream)):
                if i % interval:
                    continue
                frames.append(fit_image(Image.fromarray(frame.to_ndarray(format="rgb24")), p.width, p.height))
                if len(frames) == p.num_frames:
                    break
    except (av.FFmpegError, IndexError, ValueError) as exc:
        log.error("the input video %s does not decode: %s", path, exc)
        raise InvalidRequest("the job's input video does not decode", {"field": "video"}) from None
    if len(frames) < p.num_frames:
        raise InvalidRequest(f"the job's input video gives {len(frames)} frames at {p.fps} fps, not {p.num_frames}",
                             {"field": "video", "frames": len(frames), "num_frames": p.num_frames})
    return frames


@torch.no_grad()
def encode_video(vae: AutoencoderKLWan, info: PipelineInfo, frames: list[Image.Image],
                 device: torch.device) -> torch.Tensor:
    """The normalised latents of `frames` (float32, `(1, z, f, h, w)`), as
    `WanVideoToVideoPipeline.prepare_latents` computes them before it adds the noise."""
    height, width = frames[0].height, frames[0].width
    processor = VideoProcessor(vae_scale_factor=info.vae_scale_spatial)
    video = processor.preprocess_video(frames, height=height, width=width).to(device, dtype=torch.float32)
    video = video.to(device=device, dtype=vae.dtype)
    z = vae.config.z_dim
    latent = vae.encode(video).latent_dist.mode().to(torch.float32)
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(device, torch.float32)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(device, torch.float32)
    return (latent - mean) * inv_std
