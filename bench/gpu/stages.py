"""Our DiT and VAE stages holding models the benchmark built, set up through their public methods.

A stage is configured (an in-memory profile naming the device, dtype and part), `setup()` runs with
an empty model list (placement, attention backend, part: everything but loading from disk), and
the built models go in through `Placement.place` and `DitStage.add_model` / `VaeStage.add_vae`,
as `setup()` does with loaded ones. This module is the only one in bench/ that knows the stage
runtime: the context a stage is handed (`StepClock`) and `ready`: when the runtime changes, change it here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench.gpu.clock import Env
from common import messages as m
from common.config import Config, StageSpec
from stages.base import StageContext


def make_config(stage_name: str, kind: str, device: str, dtype: str, models: list[str],
                **options: Any) -> tuple[Config, StageSpec]:
    """A profile with one stage that loads none of `models` itself (`models = []`)."""
    data = {
        "models": {name: {"path": "in-memory", "split_fraction": 0.5} for name in models},
        "stages": {stage_name: {"kind": kind, "device": device, "dtype": dtype, "models": [], **options}},
    }
    config = Config(data)
    return config, config.stage(stage_name)


class StepClock(StageContext):
    """The stage's context here: takes its side reports, synchronises the device and stamps each
    step report."""

    def __init__(self, env: Env):
        self.env = env
        self.stamps: list[tuple[int, float]] = []

    def emit(self, report: m.Message) -> None:
        if isinstance(report, m.StageReport) and report.event == "step":
            self.stamps.append((report.step, self.env.now()))


def serve(stage: Any) -> None:
    """What the runtime does between setup() and the first message: mark the stage ready."""
    stage.ready = True


def dit_stage(env: Env, dtype_name: str, sp: dict[str, Any], model: Any, part: str,
              two_experts: bool, clock: StepClock, attention: str = "sdpa") -> Any:
    """A DitStage serving `sp["name"]` with `model` as its `transformer` (the high-noise expert
    when `two_experts`, with the model's boundary). `attention` as in a profile (placement sets
    the backend on the model, so direct calls on the same model use it too)."""
    from stages.dit import DitStage

    config, spec = make_config("dit_bench", "dit", str(env.device), dtype_name, [sp["name"]], part=part,
                               attention=attention)
    stage = DitStage(config, spec, clock)
    stage.setup()
    assert stage.placement is not None  # setup() places the stage on its device
    add_experts(stage, sp, {"transformer": model}, two_experts)
    serve(stage)
    return stage


def add_experts(stage: Any, sp: dict[str, Any], experts: dict[str, Any], two_experts: bool) -> None:
    """Serve `sp["name"]` in a set-up DitStage with these built experts (`transformer`, and
    `transformer_2` for both A14B experts in one process), placed on the stage's device, with the
    model's boundary when `two_experts`."""
    from stages.models import PipelineInfo

    first: Any = next(iter(experts.values()))
    info = PipelineInfo(
        folder=Path("in-memory"),
        boundary_ratio=sp.get("boundary"),
        expand_timesteps=bool(sp.get("expand_timesteps", False)),
        has_transformer_2=two_experts,
        vae_scale_temporal=4,
        vae_scale_spatial=sp["spatial"],
        z_dim=first.config.in_channels,
        patch_size=tuple(first.config.patch_size),
        in_channels=first.config.in_channels,
    )
    assert stage.placement is not None  # setup() places the stage on its device
    stage.add_model(sp["name"], info, {k: stage.placement.place(v, f"{sp['name']}/{k}") for k, v in experts.items()},
                    dict(scheduler_config(sp)), boundary_ratio=info.boundary_ratio,
                    split_fraction=stage.config.model(sp["name"]).split_fraction)


def vae_stage(env: Env, dtype_name: str, sp: dict[str, Any], vae: torch.nn.Module) -> Any:
    from stages.vae import VaeStage

    config, spec = make_config("vae_bench", "vae", str(env.device), dtype_name, [sp["name"]])
    stage = VaeStage(config, spec)
    stage.setup()
    assert stage.placement is not None  # setup() places the stage on its device
    stage.add_vae(sp["name"], stage.placement.place(vae, f"{sp['name']}/vae"))
    serve(stage)
    return stage


def scheduler_config(sp: dict[str, Any]) -> dict[str, Any]:
    """The released models' scheduler: UniPC, flow prediction, the model's shift."""
    from diffusers import UniPCMultistepScheduler

    return dict(UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=sp["shift"], num_train_timesteps=1000).config)


def job_params(sp: dict[str, Any], steps: int, guidance: float) -> m.JobParams:
    return m.JobParams(
        model=sp["name"], prompt="gpu stage check", negative_prompt="", seed=0, steps=steps,
        height=sp["height"], width=sp["width"], num_frames=sp["frames"], fps=sp["fps"], guidance_scale=guidance,
    )
