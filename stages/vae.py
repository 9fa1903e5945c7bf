"""VAE stage: latents -> uint8 RGB frames (the decode step of diffusers' WanPipeline).

Un-normalises the latents with the VAE's `latents_mean`/`latents_std`, decodes, post-processes as
the pipeline's `output_type="np"` does, and converts to uint8 with `to_uint8`.

S2V-14B clips (`ClipDecodeJob`): decode the clip after its motion latents (clip 0: after the
reference latent, dropping 3 frames), keep its uint8 frames in the job's spool folder
(`common/spool.clip_frames_path`, written durably before the next clip leaves), VAE-encode the last
73 frames (float, as the release) as the next clip's motion latents and send that clip back to the
first DiT (`ClipDenoiseJob`); after the last clip, every clip's frames go to the muxer.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor

from common import messages as m
from common import spool
from common.errors import CheckpointError, InvalidRequest
from stages.base import Stage
from stages.models import load_component, model_dir
from stages.placement import Placement
from stages.runtime import stage_main

log = logging.getLogger(__name__)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (as WanPipeline returns with output_type="np") to uint8."""
    return np.clip(np.round(frames * 255.0), 0, 255).astype(np.uint8)


class VaeStage(Stage):
    kind = "vae"

    def setup(self) -> None:
        placement = self.placement = Placement.from_spec(self.spec)
        self.device = placement.device
        dtype = placement.dtype
        tiling = self.spec.vae_tiling
        self.vaes: dict[str, tuple[AutoencoderKLWan, VideoProcessor]] = {}
        for model in self.config.stage_models(self.spec):
            vae = load_component(AutoencoderKLWan, model_dir(self.config, model), "vae", torch_dtype=dtype)
            self.add_vae(model, placement.place(vae, f"{model}/vae"), tiling)
            log.info("loaded VAE of %s on %s (%s, z%d, tiling %s)", model, self.device, dtype, vae.config.z_dim, tiling)

    def add_vae(self, model: str, vae: AutoencoderKLWan, tiling: bool = False) -> None:
        """Decode `model`'s latents with this loaded VAE. setup() calls it for each model of the
        profile; a benchmark can hand over a VAE it built itself."""
        if tiling:  # decode in overlapping spatial tiles: less memory at 720p, slightly slower
            vae.enable_tiling()
        self.vaes[model] = (vae, VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial))

    def decode(self, model: str, latents: torch.Tensor) -> torch.Tensor:
        """Latents (1, z, f, h, w) -> uint8 frames (F, H, W, 3) on the CPU.

        The same arithmetic as WanPipeline's decode + `postprocess_video(output_type="np")` + `to_uint8`,
        but done on the stage's device, so only uint8 crosses to the host (on an H200 the float
        post-processing on the CPU cost 2-3 s of a 720p/121-frame decode).
        """
        vae, processor = self.vaes[model]
        z = vae.config.z_dim
        latents = latents.to(self.device, vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
        frames = processor._denormalize_conditionally(video[0].permute(1, 0, 2, 3))  # (F, C, H, W) in [0, 1]
        frames = frames.permute(0, 2, 3, 1).float()
        return (frames * 255.0).round().clamp(0, 255).to(torch.uint8).cpu()

    @torch.no_grad()
    def handle(self, msg: m.Message) -> list[m.Message]:
        if isinstance(msg, m.ClipDecodeJob):
            return self.handle_clip(msg)
        if not isinstance(msg, m.DecodeJob):
            raise InvalidRequest(f"vae does not take {msg.type_name}")
        if msg.params.model not in self.vaes:
            raise InvalidRequest(f"model {msg.params.model!r} is not loaded here", {"model": msg.params.model})
        frames = self.decode(msg.params.model, msg.latents)
        return [
            m.MuxJob(
                job_id=msg.job_id,
                attempt=msg.attempt,
                route=msg.route,
                params=msg.params,
                frames=frames.contiguous(),
            )
        ]

    def handle_clip(self, msg: m.ClipDecodeJob) -> list[m.Message]:
        from stages.s2v import route, sampler

        p = msg.params
        if p.model not in self.vaes:
            raise InvalidRequest(f"model {p.model!r} is not loaded here", {"model": p.model})
        s = route.settings(p, self.config.model(p.model).motion_frames)
        if not 0 <= msg.clip < p.num_clips:
            raise InvalidRequest(f"clip {msg.clip} is not one of the job's {p.num_clips}", {"clip": msg.clip})
        vae = self.vaes[p.model][0]
        last = msg.clip + 1 == p.num_clips

        def encode(video: torch.Tensor) -> torch.Tensor:
            # After the last clip there is no next one to give motion latents to.
            return video.new_zeros(0) if last else sampler.vae_encode(vae, video)

        def decode(latents: torch.Tensor) -> torch.Tensor:
            return sampler.vae_decode(vae, latents)

        window = msg.motion_window
        if window is None:  # the clip gives the whole window: the one before is not needed
            window = sampler.initial_motion_window(s, p.height, p.width)
        done = sampler.finish_clip(s, msg.clip, msg.latents.to(self.device, torch.float32),
                                   msg.conditions.ref_latents.to(self.device, torch.float32),
                                   msg.motion_latents.to(self.device, torch.float32), window.to(self.device),
                                   decode, encode)
        frames = route.to_uint8(done.frames)
        self.write_clip(msg.job_id, msg.clip, frames)
        common: dict[str, Any] = dict(job_id=msg.job_id, attempt=msg.attempt, route=msg.route, params=p)
        if not last:
            nxt = msg.clip + 1
            return [m.ClipDenoiseJob(
                **common, clip=nxt, conditions=route.remaining(msg.conditions, s),
                motion_latents=done.motion_latents.cpu(),
                motion_window=done.motion_window.cpu() if route.carries_window(s, nxt) else None,
            )]
        clips = [self.read_clip(msg.job_id, c) for c in range(msg.clip)] + [frames]
        return [m.MuxJob(**common, frames=torch.cat(clips).contiguous())]

    def write_clip(self, job_id: str, clip: int, frames: torch.Tensor) -> None:
        """Keep a decoded clip in the job's spool folder, durably, before the next clip leaves: a
        job resumed at a later clip reads it back from there."""
        buffer = io.BytesIO()
        np.save(buffer, frames.numpy(), allow_pickle=False)
        spool.write_atomic(spool.clip_frames_path(self.config, job_id, clip), buffer.getvalue())

    def read_clip(self, job_id: str, clip: int) -> torch.Tensor:
        path = spool.clip_frames_path(self.config, job_id, clip)
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            log.error("clip %d's frames could not be read from %s: %s", clip, path, exc)
            raise CheckpointError(f"the frames of clip {clip} could not be read",
                                  {"clip": clip, "reason": type(exc).__name__}) from None
        return torch.from_numpy(data)


def main() -> None:
    stage_main(VaeStage)


if __name__ == "__main__":
    main()
