"""What the stage processes share about an S2V job going round its route, clip by clip.

The text_encoder stage computes a job's conditions once (`ClipConditions`: text embeddings, the
reference image's latent, the audio features of every clip, the pose latents); the DiT processes
denoise one clip with `stages/s2v/sampler.py` (`prepare_clip`, `denoise_step`); the VAE finishes it
(`finish_clip`), writes its frames into the job's spool folder and sends the next clip back to the
first DiT with the conditions of the clips still to come (`remaining`): the finished clip's audio
and pose are dropped, so the messages (and the checkpoints) shrink as the job goes on.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from common import messages as m
from common.errors import InvalidRequest
from stages.image_condition import fit_short_side_and_crop, read_input
from stages.s2v.sampler import S2VSettings
from stages.s2v.transformer import MOTION_FRAMES

log = logging.getLogger(__name__)

RELEASE_SHIFT = 3.0  # wan/configs/wan_s2v_14B.py sample_shift


def settings(p: m.JobParams, motion_frames: int = MOTION_FRAMES) -> S2VSettings:
    """The sampler's settings of an S2V job (the release's shift when the job names none), with
    the model's motion window (`[models.<id>] motion_frames`)."""
    if p.num_clips < 1 or p.frames_per_clip < 1:
        raise InvalidRequest(f"{p.model} job has no clips", {"num_clips": p.num_clips,
                                                             "frames_per_clip": p.frames_per_clip})
    if p.width % 64 or p.height % 64:
        raise InvalidRequest(f"{p.model} needs width and height that are multiples of 64, got {p.width}x{p.height}",
                             {"multiple": 64, "width": p.width, "height": p.height})
    try:
        return S2VSettings(seed=p.seed, steps=p.steps, shift=RELEASE_SHIFT if p.shift is None else p.shift,
                           guidance=p.guidance_scale, frames_per_clip=p.frames_per_clip,
                           motion_frames=motion_frames)
    except ValueError as exc:
        raise InvalidRequest(str(exc), {"frames_per_clip": p.frames_per_clip, "steps": p.steps}) from None


def carries_window(s: S2VSettings, clip: int) -> bool:
    """Whether clip `clip`'s messages carry the motion window: only when the clip gives fewer
    frames than the window holds (else the VAE takes the whole window from the clip)."""
    return s.frames_of_clip(clip) < s.motion_frames


def remaining(c: m.ClipConditions, s: S2VSettings) -> m.ClipConditions:
    """The conditions of the clips after the first one `c` covers."""
    pose = None if c.pose_latents is None else c.pose_latents[:, :, s.latent_frames:].contiguous()
    return m.ClipConditions(
        prompt_embeds=c.prompt_embeds,
        negative_prompt_embeds=c.negative_prompt_embeds,
        ref_latents=c.ref_latents,
        audio_features=c.audio_features[..., s.frames_per_clip:].contiguous(),
        pose_latents=pose,
    )


def clip_pose(c: m.ClipConditions, s: S2VSettings) -> torch.Tensor | None:
    """The pose latents of the clip `c` starts with, or None."""
    if c.pose_latents is None:
        return None
    if c.pose_latents.shape[2] < s.latent_frames:
        raise InvalidRequest("the job's pose latents end before its clips do",
                             {"latent_frames": int(c.pose_latents.shape[2]), "expected": s.latent_frames})
    return c.pose_latents[:, :, : s.latent_frames]


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(1, 3, T, H, W) float in [-1, 1] -> (T, H, W, 3) uint8 on the CPU, with the arithmetic of the
    other models' frames (diffusers' postprocess to [0, 1], then x 255, rounded)."""
    frames = (video[0].permute(1, 0, 2, 3) / 2 + 0.5).clamp(0, 1)  # (T, 3, H, W)
    frames = frames.permute(0, 2, 3, 1).float()
    return (frames * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().contiguous()


def pose_pixels(path: str | Path, sha256: str | None, s: S2VSettings, clips: int, width: int, height: int,
                fps: int) -> torch.Tensor:
    """The job's pose video as the release samples it for `clips` clips: from its first frame, every
    round(video fps / fps)-th frame, `clips x frames_per_clip` of them, the missing ones past its end
    black (-1); each frame fitted as the release fits it (`fit_short_side_and_crop`, as the
    reference image). Returns
    (1, 3, frames, H, W) float32 in [-1, 1]. The errors name the problem, never the path."""
    data = read_input(path, sha256, "pose_video", "pose video")
    wanted = clips * s.frames_per_clip
    frames: list[torch.Tensor] = []
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or fps)
            interval = max(1, round(rate / fps))
            for i, frame in enumerate(container.decode(stream)):
                if i % interval or len(frames) == wanted:
                    continue
                image = fit_short_side_and_crop(Image.fromarray(frame.to_ndarray(format="rgb24")), width, height)
                frames.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255) * 2 - 1)
    except (av.FFmpegError, IndexError, ValueError) as exc:
        log.error("the pose video %s does not decode: %s", path, exc)
        raise InvalidRequest("the job's pose video does not decode", {"field": "pose_video"}) from None
    video = torch.stack(frames, dim=1) if frames else torch.empty(3, 0, height, width)
    pad = -torch.ones(3, wanted - video.shape[1], height, width)
    return torch.cat([video, pad], dim=1).unsqueeze(0)
