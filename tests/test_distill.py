"""Distilled drafts (broker/distill.py, stages/schedule.py): a profile that names a step-distillation
LoRA for T2V-A14B gets a draft preset of 4 Euler steps at the LoRA's sigmas, guidance 1 and shift 5.

- Through the real stage processes (the shared `stack`; a tiny two-part LoRA made here with peft
  plays the distillation LoRA): the job admission resolves for that draft gives the frames of
  diffusers' `WanPipeline` with `load_lora_weights` of the same file and diffusers'
  FlowMatchEulerDiscreteScheduler set to the same sigmas, bit for bit; each DiT process runs two
  of the four steps; no unconditional pass runs.
- In this process: the preset table says which sampler each preset gets, the draft without a
  distillation LoRA stays as configured, and custom_options that would undo the recipe are refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from broker import admission, distill
from common import messages as m
from common.config import Config
from common.errors import ValidationError
from stages.models import model_dir
from tests.helpers import System, make_lora, reference, vae_frames

DISTILL_ENV = {"WAN_SERVER__MODELS__T2V_A14B__DISTILL_LORA": '"lightning"'}


@pytest.fixture(scope="module")
def distilled(stack) -> Config:
    """The stack's config with the distillation LoRA named, and that LoRA (a high- and a low-noise
    file, as Wan2.2-Lightning ships them) in the stack's LoRA folder."""
    folder, t2v = stack.config.lora_dir, model_dir(stack.config, "t2v-A14B")
    folder.mkdir(parents=True, exist_ok=True)
    make_lora(t2v, "transformer", folder / "lightning.high.safetensors", seed=11)
    make_lora(t2v, "transformer_2", folder / "lightning.low.safetensors", seed=12)
    return Config.load(environ={**stack.env, **DISTILL_ENV})


def request(**options: Any) -> dict[str, Any]:
    return {"model": "t2v", "prompt": "a kite over a beach", "negative_prompt": "blurry", "seed": 9,
            "quality_preset": "draft", "custom_options": options}


class SigmaEuler(FlowMatchEulerDiscreteScheduler):  # type: ignore[misc]
    """diffusers' Euler flow-matching scheduler, given the distilled sigmas whatever the pipeline asks."""

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):  # noqa: D102 - diffusers' signature
        assert num_inference_steps == len(distill.SIGMAS)
        super().set_timesteps(sigmas=list(distill.SIGMAS), device=device)


def test_distilled_draft_equals_wanpipeline_with_the_lora_and_those_sigmas(stack, distilled):
    _, p, _ = admission.resolve(distilled, request(resolution="32x32", num_frames=5))
    assert (p.steps, p.guidance_scale, p.guidance_scale_2, p.shift) == (4, 1.0, 1.0, 5.0)
    assert p.sigmas == [1.0, 0.75, 0.5, 0.25] and [x["name"] for x in p.loras] == ["lightning"]
    outcome = stack.driver.run(p, timeout_s=300)
    steps = [r for r in outcome.reports if r.event == "step"]
    assert sorted((r.stage, r.step) for r in steps) == [("dit_high", 1), ("dit_high", 2), ("dit_low", 3),
                                                       ("dit_low", 4)]
    ours = vae_frames(stack, outcome.done.job_id)

    def prepare(pipe: Any) -> None:
        pipe.scheduler = SigmaEuler(shift=5.0)
        pipe.load_lora_weights(str(distilled.lora_dir / "lightning.high.safetensors"), adapter_name="lightning")
        pipe.load_lora_weights(str(distilled.lora_dir / "lightning.low.safetensors"), adapter_name="lightning",
                               load_into_transformer_2=True)
        pipe.set_adapters(["lightning"], [1.0])
        uncond = [0]
        for expert in (pipe.transformer, pipe.transformer_2):
            expert.register_forward_pre_hook(lambda *_: uncond.__setitem__(0, uncond[0] + 1))
        prepare.passes = uncond  # type: ignore[attr-defined]

    # shift=None: `reference` would swap in UniPC for a shift; SigmaEuler carries the shift itself.
    ref = reference(model_dir(stack.config, p.model), m.JobParams(**{**p.__dict__, "shift": None}), prepare=prepare)
    assert prepare.passes[0] == 4  # one pass per step: guidance 1, no uncond
    assert ours.shape == ref.shape and ours.std() > 1.0
    assert np.array_equal(ours, ref), f"max |diff| {np.abs(ours.astype(int) - ref).max()}"


def test_the_preset_table_says_which_sampler_each_preset_gets(stack, distilled):
    table = admission.preset_table(distilled, "t2v-A14B")
    assert table["draft"]["sampler"] == "distilled" and table["draft"]["distill_lora"] == "lightning"
    assert table["draft"]["resolution"] == stack.config.presets["t2v-A14B"]["draft"]["resolution"]
    assert {table[x]["sampler"] for x in admission.PRESETS if x != "draft"} == {"unipc"}
    plain = admission.preset_table(stack.config, "t2v-A14B")["draft"]
    assert plain["sampler"] == "unipc" and plain["steps"] == stack.config.presets["t2v-A14B"]["draft"]["steps"]
    _, p, _ = admission.resolve(stack.config, request())
    assert p.sigmas is None and p.loras == []


@pytest.mark.parametrize("options", [{"steps": 8}, {"cfg_scale": 3.0}, {"shift": 3.0}])
def test_options_that_would_undo_the_recipe_are_refused(distilled, options):
    with pytest.raises(ValidationError) as caught:
        admission.resolve(distilled, request(**options))
    assert caught.value.details["field"] == f"custom_options.{next(iter(options))}"


def test_presets_route_lists_the_sampler(api_system: System):
    status, body = api_system.json("GET", "/api/v1/presets")
    assert status == 200 and body["presets"]["t2v-A14B"]["draft"]["sampler"] == "unipc"


def test_sigmas_travel_in_the_job_params():
    p = m.JobParams(model="t2v-A14B", prompt="x", negative_prompt="", seed=1, steps=4, height=32, width=32,
                    num_frames=5, fps=16, guidance_scale=1.0, sigmas=list(distill.SIGMAS))
    assert m.JobParams(**p.__dict__).sigmas == [1.0, 0.75, 0.5, 0.25]
