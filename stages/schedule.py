"""The denoising schedule shared by the DiT processes: which steps a process runs, and the
scheduler state that travels with the job at the hand-off between two of them.

Splitting UniPC's multistep loop across processes is exact only when the receiver continues with
the sender's whole solver state (its history of model outputs and timesteps, warm-up counters, last
sample, step index); restarting a fresh scheduler at the hand-off changes the result.
"""

from __future__ import annotations

from typing import Any

import torch

# Attributes of diffusers' multistep schedulers that change while stepping.
_STATE_ATTRS = ("model_outputs", "timestep_list", "lower_order_nums", "this_order", "last_sample")
PARTS = ("high", "low", "all")


def make_scheduler(config: dict[str, Any], steps: int, shift: float | None, sigmas: list[float] | None,
                   device: torch.device) -> Any:
    """The job's scheduler, its timesteps set: UniPC from the checkpoint's scheduler config (the job's
    shift replacing its flow_shift), or, given `sigmas` (a distilled sampler, broker/distill.py),
    an Euler flow-matching step at each of those noise levels after `shift`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if sigmas is None:
        scheduler = UniPCMultistepScheduler.from_config(config, **({} if shift is None else {"flow_shift": shift}))
        scheduler.set_timesteps(steps, device=device)
    else:
        if len(sigmas) != steps:
            raise ValueError(f"{len(sigmas)} sigmas for {steps} steps")
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)), shift=1.0 if shift is None else shift)
        scheduler.set_timesteps(sigmas=list(sigmas), device=device)
    scheduler.set_begin_index(0)
    return scheduler


def export_state(scheduler: Any) -> dict[str, Any]:
    state: dict[str, Any] = {"step_index": scheduler.step_index, "begin_index": scheduler.begin_index}
    for attr in _STATE_ATTRS:
        if hasattr(scheduler, attr):
            value = getattr(scheduler, attr)
            if isinstance(value, torch.Tensor):
                value = value.cpu()
            elif isinstance(value, list):
                value = [v.cpu() if isinstance(v, torch.Tensor) else v for v in value]
            state[attr] = value
    return state


def restore_state(scheduler: Any, state: dict[str, Any], device: torch.device) -> None:
    """Continue `scheduler` (already `set_timesteps`) from a state `export_state` produced."""

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, list):
            return [move(x) for x in v]
        return v

    for attr in _STATE_ATTRS:
        if attr in state:
            setattr(scheduler, attr, move(state[attr]))
    scheduler._step_index = state["step_index"]
    scheduler._begin_index = state["begin_index"]


def boundary_timestep(boundary_ratio: float | None, num_train_timesteps: int) -> float | None:
    return None if boundary_ratio is None else boundary_ratio * num_train_timesteps


def handoff_step(timesteps: torch.Tensor, boundary: float | None, split_fraction: float) -> int:
    """Index of the first step the low part runs.

    Two experts: the first step whose timestep is below the boundary (as WanPipeline switches
    experts). One expert: the steps are split by `split_fraction` so two processes share the work.
    """
    n = len(timesteps)
    if boundary is not None:
        for i, t in enumerate(timesteps.tolist()):
            if t < boundary:
                return i
        return n
    return min(n, max(0, round(n * split_fraction)))


def step_range(part: str, timesteps: torch.Tensor, boundary: float | None, split_fraction: float) -> range:
    n = len(timesteps)
    if part == "all":
        return range(0, n)
    k = handoff_step(timesteps, boundary, split_fraction)
    return range(0, k) if part == "high" else range(k, n)
