"""Text encoder stage: prompt -> UMT5 embeddings (the `encode_prompt` step of diffusers' WanPipeline).

Replicates the pipeline exactly: prompt cleaning (ftfy + whitespace), padding to
`max_sequence_length`, then trimming each sequence to its real length and zero-padding it back.
The negative prompt (default empty) is encoded only when guidance is on.

For image-to-video models (I2V-A14B; TI2V-5B given an image) it also loads the model's VAE and
encodes the job's conditioning image into the condition latents and frame mask the DiT stages use
(`stages.image_condition`), so the DiT processes never hold a VAE. The models that take a video
(video-to-video: catalog `video` input, T2V-A14B and TI2V-5B) have their VAE here too: a job's
input video is decoded, fitted to the job's size and encoded into the latents the first DiT
noises (`DenoiseJob.video_latents`).

For S2V-14B it computes everything that conditions the job's clips, once (`ClipConditions`): the
prompt embeddings, the wav2vec2 features of the job's audio per video frame
(`stages/s2v/audio_features.py`, the release's `wav2vec2-large-xlsr-53-english/` folder), the
reference image's VAE latent, and clip 0's motion latents (the VAE encoding of the black frames
the release starts from); the job then enters the DiT as clip 0 (`ClipDenoiseJob`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5EncoderModel

from common import catalog
from common import messages as m
from common.errors import InvalidRequest
from stages.base import Stage
from stages.image_condition import (
    encode_condition,
    encode_video,
    fit_short_side_and_crop,
    load_image,
    load_video,
    read_input,
)
from stages.models import PipelineInfo, load_component, model_dir, torch_dtype
from stages.placement import Placement
from stages.runtime import stage_main

log = logging.getLogger(__name__)

S2V_MODELS = ("s2v-14B",)  # their conditions: stages/s2v (audio features, reference and motion latents)


class TextEncoderStage(Stage):
    kind = "text_encoder"

    def setup(self) -> None:
        placement = self.placement = Placement.from_spec(self.spec)
        self.device = placement.device
        self.dtype = dtype = placement.dtype
        self.encoders: dict[str, tuple[PreTrainedTokenizerBase, UMT5EncoderModel]] = {}
        self.image_models: dict[str, tuple[PipelineInfo, AutoencoderKLWan]] = {}
        self.s2v_models: dict[str, tuple[Any, AutoencoderKLWan]] = {}  # (wav2vec2 features, VAE)
        self.video_models: dict[str, tuple[PipelineInfo, AutoencoderKLWan]] = {}  # video-to-video's VAE
        for model in self.config.stage_models(self.spec):
            folder = model_dir(self.config, model)
            tokenizer = load_component(AutoTokenizer, folder, "tokenizer")
            encoder = load_component(UMT5EncoderModel, folder, "text_encoder", dtype=dtype)
            self.encoders[model] = (tokenizer, placement.place(encoder, f"{model}/text_encoder"))
            log.info("loaded text encoder of %s on %s (%s)", model, self.device, dtype)
            if model in S2V_MODELS:
                self.setup_s2v(model, folder)
                continue
            info = PipelineInfo.read(folder)
            if info.image_conditioning:
                # The VAE may sit on a GPU while the text encoder runs on the CPU (`vae_device`):
                # encoding the I2V condition video (num_frames frames) is heavy.
                vae_dtype = torch_dtype(self.spec.vae_dtype)
                self.vae_device = torch.device(self.spec.vae_device or self.spec.device)
                vae = load_component(AutoencoderKLWan, folder, "vae", torch_dtype=vae_dtype)
                self.image_models[model] = (info, vae.to(self.vae_device).eval())
                log.info("loaded VAE of %s for image conditioning (%s)", model, info.image_conditioning)
            if catalog.BY_ID[model].takes("video") != "none":
                self.setup_video(model, folder, info)

    def setup_video(self, model: str, folder: Path, info: PipelineInfo) -> None:
        """The VAE that encodes `model`'s input videos (the image conditioning's, if it has one)."""
        if model in self.image_models:
            self.video_models[model] = self.image_models[model]
            return
        self.vae_device = torch.device(self.spec.vae_device or self.spec.device)
        vae = load_component(AutoencoderKLWan, folder, "vae", torch_dtype=torch_dtype(self.spec.vae_dtype))
        self.video_models[model] = (info, vae.to(self.vae_device).eval())
        log.info("loaded VAE of %s for video-to-video on %s", model, self.vae_device)

    def setup_s2v(self, model: str, folder: Path) -> None:
        """wav2vec2 (float32, as the release runs it) and the VAE, on the stage's `vae_device`."""
        from stages.s2v.audio_features import FOLDER, Wav2Vec2Features

        self.vae_device = torch.device(self.spec.vae_device or self.spec.device)
        vae = load_component(AutoencoderKLWan, folder, "vae", torch_dtype=torch_dtype(self.spec.vae_dtype))
        self.s2v_models[model] = (Wav2Vec2Features(folder / FOLDER, self.vae_device), vae.to(self.vae_device).eval())
        log.info("loaded wav2vec2 and the VAE of %s on %s", model, self.vae_device)

    def encode_s2v(self, msg: m.EncodeJob, prompt_embeds: torch.Tensor,
                   negative: torch.Tensor | None) -> m.ClipDenoiseJob:
        from common.audio import load_16k_mono
        from stages.s2v import route, sampler

        p = msg.params
        s = route.settings(p, self.config.model(p.model).motion_frames)
        features, vae = self.s2v_models[p.model]
        if msg.image_path is None or msg.audio_path is None:
            raise InvalidRequest(f"{p.model} needs a reference image and an audio", {"model": p.model})
        # fitted as the release fits it (resize the short side, crop the centre), not as I2V's are
        image = load_image(msg.image_path, p.width, p.height, p.image_sha256, fit=fit_short_side_and_crop)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)  # as ToTensor
        ref_latents = sampler.vae_encode(vae, (pixels * 2 - 1).unsqueeze(0).unsqueeze(2))
        audio = read_input(msg.audio_path, (p.audio or {}).get("sha256"), "audio", "audio")
        per_frame = features.features(load_16k_mono(audio), s.frames_per_clip, p.fps)
        frames = per_frame.frames[: p.num_clips * s.frames_per_clip]  # the clips the job asked for
        window = sampler.initial_motion_window(s, p.height, p.width, self.vae_device)
        pose = None
        if msg.pose_path is not None:  # encoded clip by clip, as the release does
            pixels_all = route.pose_pixels(msg.pose_path, (p.pose_video or {}).get("sha256"), s, p.num_clips,
                                           p.width, p.height, p.fps)
            n = s.frames_per_clip
            pose = torch.cat([sampler.pose_latents_of_clip(lambda v: sampler.vae_encode(vae, v),
                                                           pixels_all[:, :, r * n:(r + 1) * n]).cpu()
                              for r in range(p.num_clips)], dim=2)
        conditions = m.ClipConditions(
            prompt_embeds=prompt_embeds.cpu(),
            negative_prompt_embeds=None if negative is None else negative.cpu(),
            ref_latents=ref_latents.cpu(),
            audio_features=frames.permute(1, 2, 0).unsqueeze(0).contiguous(),
            pose_latents=pose,
        )
        return m.ClipDenoiseJob(
            job_id=msg.job_id, attempt=msg.attempt, route=msg.route, params=p, clip=0, conditions=conditions,
            motion_latents=sampler.vae_encode(vae, window).cpu(),
            motion_window=window.cpu() if route.carries_window(s, 0) else None,
        )

    def encode(self, model: str, prompt: str, max_sequence_length: int) -> torch.Tensor:
        tokenizer, encoder = self.encoders[model]
        inputs = tokenizer(
            [prompt_clean(prompt)],
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = inputs.input_ids, inputs.attention_mask
        seq_lens = mask.gt(0).sum(dim=1).long()
        embeds = encoder(ids.to(self.device), mask.to(self.device)).last_hidden_state
        embeds = embeds.to(dtype=self.dtype)  # not encoder.dtype: fp8 storage would show
        embeds = [u[:v] for u, v in zip(embeds, seq_lens, strict=True)]
        return torch.stack(
            [torch.cat([u, u.new_zeros(max_sequence_length - u.size(0), u.size(1))]) for u in embeds], dim=0
        )

    @torch.no_grad()
    def handle(self, msg: m.Message) -> list[m.Message]:
        if not isinstance(msg, m.EncodeJob):
            raise InvalidRequest(f"text_encoder does not take {msg.type_name}")
        p = msg.params
        if p.model not in self.encoders:
            raise InvalidRequest(f"model {p.model!r} is not loaded here", {"model": p.model})
        if msg.video_path is not None and (p.model not in self.video_models or p.strength is None):
            raise InvalidRequest(f"{p.model} takes no input video here", {"model": p.model, "field": "video"})
        if p.model in self.s2v_models:
            prompt_embeds = self.encode(p.model, p.prompt, p.max_sequence_length)
            negative = None
            if p.guidance_scale > 1.0:
                negative = self.encode(p.model, p.negative_prompt or "", p.max_sequence_length)
            return [self.encode_s2v(msg, prompt_embeds, negative)]
        condition = first_frame_mask = None
        image_model = self.image_models.get(p.model)
        if msg.image_path is not None:
            if image_model is None:
                raise InvalidRequest(f"{p.model} takes no input image", {"model": p.model})
            info, vae = image_model
            image = load_image(msg.image_path, p.width, p.height, p.image_sha256)
            condition, first_frame_mask = encode_condition(vae, info, image, p, self.vae_device)
        elif image_model is not None and image_model[0].image_conditioning == "concat":
            raise InvalidRequest(f"{p.model} needs an input image", {"model": p.model})
        video_latents = None
        if msg.video_path is not None:
            if condition is not None:
                raise InvalidRequest("a job takes an input image or an input video, not both", {"field": "video"})
            info, vae = self.video_models[p.model]
            video_latents = encode_video(vae, info, load_video(msg.video_path, p), self.vae_device).cpu()
        prompt_embeds = self.encode(p.model, p.prompt, p.max_sequence_length)
        negative = None
        if p.guidance_scale > 1.0:
            negative = self.encode(p.model, p.negative_prompt or "", p.max_sequence_length)
        return [
            m.DenoiseJob(
                job_id=msg.job_id,
                attempt=msg.attempt,
                route=msg.route,
                params=p,
                prompt_embeds=prompt_embeds.cpu(),
                negative_prompt_embeds=None if negative is None else negative.cpu(),
                condition=None if condition is None else condition.cpu(),
                first_frame_mask=None if first_frame_mask is None else first_frame_mask.cpu(),
                video_latents=video_latents,
            )
        ]


def main() -> None:
    stage_main(TextEncoderStage)


if __name__ == "__main__":
    main()
