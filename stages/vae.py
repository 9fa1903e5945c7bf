"""VAE stage: latents -> uint8 RGB frames (the decode step of diffusers' WanPipeline).

Un-normalises the latents with the VAE's `latents_mean`/`latents_std`, decodes, post-processes as
the pipeline's `output_type="np"` does, and converts to uint8 with `to_uint8`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor

from common import messages as m
from common.errors import InvalidRequest
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


def main() -> None:
    stage_main(VaeStage)


if __name__ == "__main__":
    main()
