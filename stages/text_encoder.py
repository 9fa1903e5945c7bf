"""Text encoder stage: prompt -> UMT5 embeddings (the `encode_prompt` step of diffusers' WanPipeline).

Replicates the pipeline exactly: prompt cleaning (ftfy + whitespace), padding to
`max_sequence_length`, then trimming each sequence to its real length and zero-padding it back.
The negative prompt (default empty) is encoded only when guidance is on.

For image-to-video models (I2V-A14B; TI2V-5B given an image) it also loads the model's VAE and
encodes the job's conditioning image into the condition latents and frame mask the DiT stages use
(`stages.image_condition`), so the DiT processes never hold a VAE.
"""

from __future__ import annotations

import logging

import torch
from diffusers import AutoencoderKLWan
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5EncoderModel

from common import messages as m
from common.errors import InvalidRequest
from stages.base import Stage
from stages.image_condition import encode_condition, load_image
from stages.models import PipelineInfo, load_component, model_dir, torch_dtype
from stages.placement import Placement
from stages.runtime import stage_main

log = logging.getLogger(__name__)


class TextEncoderStage(Stage):
    kind = "text_encoder"

    def setup(self) -> None:
        placement = self.placement = Placement.from_spec(self.spec)
        self.device = placement.device
        self.dtype = dtype = placement.dtype
        self.encoders: dict[str, tuple[PreTrainedTokenizerBase, UMT5EncoderModel]] = {}
        self.image_models: dict[str, tuple[PipelineInfo, AutoencoderKLWan]] = {}
        for model in self.config.stage_models(self.spec):
            folder = model_dir(self.config, model)
            tokenizer = load_component(AutoTokenizer, folder, "tokenizer")
            encoder = load_component(UMT5EncoderModel, folder, "text_encoder", dtype=dtype)
            self.encoders[model] = (tokenizer, placement.place(encoder, f"{model}/text_encoder"))
            log.info("loaded text encoder of %s on %s (%s)", model, self.device, dtype)
            info = PipelineInfo.read(folder)
            if info.image_conditioning:
                # The VAE may sit on a GPU while the text encoder runs on the CPU (`vae_device`):
                # encoding the I2V condition video (num_frames frames) is heavy.
                vae_dtype = torch_dtype(self.spec.vae_dtype)
                self.vae_device = torch.device(self.spec.vae_device or self.spec.device)
                vae = load_component(AutoencoderKLWan, folder, "vae", torch_dtype=vae_dtype)
                self.image_models[model] = (info, vae.to(self.vae_device).eval())
                log.info("loaded VAE of %s for image conditioning (%s)", model, info.image_conditioning)

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
            )
        ]


def main() -> None:
    stage_main(TextEncoderStage)


if __name__ == "__main__":
    main()
