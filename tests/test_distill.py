"""Distilled sampling (broker/distill.py, stages/schedule.py): a profile that names a step-distillation
LoRA for T2V-A14B gets a draft preset of 4 Euler steps at the LoRA's sigmas, guidance 1 and shift 5;
a TI2V-5B marked as a DMD checkpoint samples every preset in 3 DMD steps.

- DMD through the stage processes: the frames equal WanPipeline driven by a DMD scheduler written
  out step by step here (predict x0, re-noise it with fresh noise of the README's seed rule).

- Through the real stage processes (the shared `stack`; a tiny two-part LoRA made here with peft
  plays the distillation LoRA): the job admission resolves for that draft gives the frames of
  diffusers' `WanPipeline` with `load_lora_weights` of the same file and diffusers'
  FlowMatchEulerDiscreteScheduler set to the same sigmas, bit for bit; each DiT process runs two
  of the four steps; no unconditional pass runs.
- In this process: the preset table says which sampler each preset gets, the draft without a
  distillation LoRA stays as configured, and custom_options that would undo the recipe are refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from broker import admission, distill
from common import messages as m
from common.config import Config
from common.errors import ValidationError
from stages.models import model_dir
from tests.helpers import System, make_lora, reference, vae_frames

DISTILL_ENV = {"WAN_SERVER__MODELS__T2V_A14B__DISTILL_LORA": '"lightning"'}


@pytest.fixture(scope="module")
def distilled(stack) -> Iterator[Config]:
    """The stack's config with the distillation LoRA named, and that LoRA (a high- and a low-noise
    file, as Wan2.2-Lightning ships them) in the stack's LoRA folder."""
    folder, t2v = stack.config.lora_dir, model_dir(stack.config, "t2v-A14B")
    folder.mkdir(parents=True, exist_ok=True)
    make_lora(t2v, "transformer", folder / "lightning.high.safetensors", seed=11)
    make_lora(t2v, "transformer_2", folder / "lightning.low.safetensors", seed=12)
    yield Config.load(environ={**stack.env, **DISTILL_ENV})
    for part in ("high", "low"):  # the stack's LoRA folder is shared: test_lora lists it
        (folder / f"lightning.{part}.safetensors").unlink()


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


DMD_ENV = {"WAN_SERVER__MODELS__TI2V_5B__SAMPLER": '"dmd"'}


class StepByStepDmd:
    """The DMD sampler as the README states it, for WanPipeline's loop: sigma_i = t_i / 1000; after
    each step x0 = x - sigma_i * v, then x = (1 - sigma_next) * x0 + sigma_next * noise_i, with
    noise_i drawn on the CPU from a generator seeded by the first 8 bytes (little-endian, >> 1) of
    sha256("wan-server dmd <seed> <i>"); the last step leaves x0."""

    order = 1

    def __init__(self, timesteps: list[int], seed: int):
        self.sigmas = [t / 1000 for t in timesteps] + [0.0]
        self.seed = seed
        self.config = SimpleNamespace(num_train_timesteps=1000)
        self.i = 0

    def set_timesteps(self, num_inference_steps, device=None, **kwargs):
        assert num_inference_steps == len(self.sigmas) - 1
        self.timesteps = torch.tensor([s * 1000 for s in self.sigmas[:-1]], dtype=torch.float32)

    def set_begin_index(self, begin_index=0):
        self.i = begin_index

    def step(self, v, t, x, return_dict=False):
        sigma, following = self.sigmas[self.i], self.sigmas[self.i + 1]
        x0 = x.float() - torch.tensor(sigma, dtype=torch.float32) * v.float()
        if following > 0:
            digest = hashlib.sha256(f"wan-server dmd {self.seed} {self.i}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            f = torch.tensor(following, dtype=torch.float32)
            x0 = (1 - f) * x0 + f * torch.randn(x0.shape, generator=g, dtype=torch.float32)
        self.i += 1
        return (x0,)


def test_dmd_checkpoint_frames_equal_the_step_by_step_sampler(stack):
    config = Config.load(environ={**stack.env, **DMD_ENV})
    table = admission.preset_table(config, "ti2v-5B")
    assert {row["sampler"] for row in table.values()} == {"dmd"} and table["pro"]["steps"] == 3
    _, p, _ = admission.resolve(config, {"model": "ti2v-5B", "prompt": "a lighthouse in fog", "seed": 4,
                                         "quality_preset": "standard",
                                         "custom_options": {"resolution": "32x32", "num_frames": 5}})
    assert (p.sampler, p.steps, p.guidance_scale, p.sigmas) == ("dmd", 3, 1.0, [1.0, 0.757, 0.522])
    outcome = stack.driver.run(p, timeout_s=300)
    assert sorted(r.step for r in outcome.reports if r.event == "step") == [1, 2, 3]
    ours = vae_frames(stack, outcome.done.job_id)

    def prepare(pipe: Any) -> None:
        pipe.scheduler = StepByStepDmd([1000, 757, 522], p.seed)

    ref = reference(model_dir(stack.config, p.model), p, prepare=prepare)
    assert ours.shape == ref.shape and ours.std() > 1.0
    assert np.array_equal(ours, ref), f"max |diff| {np.abs(ours.astype(int) - ref).max()}"
    plain = reference(model_dir(stack.config, p.model), m.JobParams(**{**p.__dict__, "sampler": None,
                                                                      "sigmas": None}))
    assert not np.array_equal(ours, plain)  # the sampler really changed the frames


@pytest.mark.parametrize(("env", "words"), [
    ({"WAN_SERVER__MODELS__TI2V_5B__SAMPLER": '"lcm"'}, "is not one of"),
    ({**DMD_ENV, "WAN_SERVER__MODELS__TI2V_5B__DMD_TIMESTEPS": "[500, 900]"}, "decreasing"),
    ({**DMD_ENV, "WAN_SERVER__MODELS__TI2V_5B__DISTILL_LORA": '"x"'}, "both sampler and distill_lora"),
])
def test_bad_sampler_settings_are_config_errors(env, words):
    from common.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        Config.load(environ=env)
    assert words in caught.value.message
