"""Tiny models: real architectures in the diffusers layout, built deterministically from a seed."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from diffusers import WanPipeline

from stages import tiny_models
from stages.models import PipelineInfo


def digest(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built(model_cache):
    return tiny_models.ensure("ti2v-5B", 0, model_cache)


def test_same_seed_same_files(built, tmp_path):
    again = tiny_models.build("ti2v-5B", 0, tmp_path / "again")
    assert digest(again) == digest(built)


def test_other_seed_other_weights(built, tmp_path):
    other = tiny_models.build("ti2v-5B", 1, tmp_path / "other")
    a, b = digest(built), digest(other)
    assert a.keys() == b.keys()
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        assert a[part] != b[part]


def test_diffusers_layout_and_shapes(model_cache):
    t2v = tiny_models.ensure("t2v-A14B", 0, model_cache)
    ti2v = tiny_models.ensure("ti2v-5B", 0, model_cache)
    for folder in (t2v, ti2v):
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "WanPipeline"
        for sub in ("tokenizer", "text_encoder", "vae", "scheduler", "transformer"):
            assert (folder / sub).is_dir()
    a, b = PipelineInfo.read(t2v), PipelineInfo.read(ti2v)
    def facts(info: PipelineInfo) -> tuple:
        return info.has_transformer_2, info.boundary_ratio, info.z_dim, info.vae_scale_spatial, info.expand_timesteps

    assert facts(a) == (True, 0.875, 16, 8, False)
    assert facts(b) == (False, None, 48, 16, True)
    sched = json.loads((t2v / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "UniPCMultistepScheduler" and sched["prediction_type"] == "flow_prediction"
    pipe = WanPipeline.from_pretrained(t2v)
    assert type(pipe.text_encoder).__name__ == "UMT5EncoderModel"
    assert pipe.tokenizer("a cat walks").input_ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.transformer.config.text_dim == pipe.text_encoder.config.d_model
    assert not torch.equal(pipe.transformer.blocks[0].attn1.to_q.weight, pipe.transformer_2.blocks[0].attn1.to_q.weight)


def test_i2v_shape_as_wan22_i2v_a14b(model_cache):
    from diffusers import WanImageToVideoPipeline

    folder = tiny_models.ensure("i2v-A14B", 0, model_cache)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["image_encoder"] == [None, None] and index["boundary_ratio"] == 0.9
    info = PipelineInfo.read(folder)
    assert (info.has_transformer_2, info.z_dim, info.in_channels, info.image_conditioning) == (True, 16, 36, "concat")
    assert PipelineInfo.read(tiny_models.ensure("ti2v-5B", 0, model_cache)).image_conditioning == "first_frame"
    assert PipelineInfo.read(tiny_models.ensure("t2v-A14B", 0, model_cache)).image_conditioning is None
    pipe = WanImageToVideoPipeline.from_pretrained(folder)
    assert pipe.transformer.config.out_channels == 16 and pipe.transformer_2.config.in_channels == 36
    assert pipe.scheduler.config.flow_shift == 5.0
