"""The denoising schedule shared by the DiT processes: which steps a process runs, and the
scheduler state that travels with the job at the hand-off between two of them.

Splitting UniPC's multistep loop across processes is exact only when the receiver continues with
the sender's whole solver state (its history of model outputs and timesteps, warm-up counters, last
sample, step index); restarting a fresh scheduler at the hand-off changes the result.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any

import torch

# Attributes of diffusers' multistep schedulers that change while stepping.
_STATE_ATTRS = ("model_outputs", "timestep_list", "lower_order_nums", "this_order", "last_sample")
PARTS = ("high", "low", "all")


def dmd_noise_seed(seed: int, step: int) -> int:
    """The seed of the fresh noise a DMD step adds after step `step` of a job seeded `seed`: a hash,
    so it is the same in whichever process runs the step, and unlike any job's own seed (n variants
    take seed, seed + 1, ...)."""
    digest = hashlib.sha256(f"wan-server dmd {seed} {step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class DmdSampler:
    """Few-step DMD sampling (a FastWan-style distilled checkpoint): at each sigma the model's flow
    prediction v gives the clean latents x0 = x - sigma * v; x0 is then noised again to the next
    sigma with fresh noise, x' = (1 - sigma') * x0 + sigma' * noise; the last step returns x0.
    The interface is the part of a diffusers scheduler the DiT stage uses (timesteps, sigmas,
    step, the step/begin index export_state carries)."""

    def __init__(self, sigmas: list[float], seed: int, num_train_timesteps: int, device: torch.device):
        self.sigmas = torch.tensor([*sigmas, 0.0], dtype=torch.float32, device=device)
        self.timesteps = self.sigmas[:-1] * num_train_timesteps
        self.seed = seed
        self.config = SimpleNamespace(num_train_timesteps=num_train_timesteps)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             return_dict: bool = False) -> tuple[torch.Tensor]:
        i = self._step_index if self._step_index is not None else (self._begin_index or 0)
        sigma, following = self.sigmas[i], self.sigmas[i + 1]
        x0 = sample.float() - sigma * model_output.float()
        if float(following) > 0:
            g = torch.Generator(device="cpu").manual_seed(dmd_noise_seed(self.seed, i))
            noise = torch.randn(x0.shape, generator=g, dtype=torch.float32).to(x0.device)
            x0 = (1 - following) * x0 + following * noise
        self._step_index = i + 1
        return (x0,)


def make_scheduler(config: dict[str, Any], steps: int, shift: float | None, sigmas: list[float] | None,
                   device: torch.device, sampler: str | None = None, seed: int = 0) -> Any:
    """The job's scheduler, its timesteps set: UniPC from the checkpoint's scheduler config (the job's
    shift replacing its flow_shift), or, given `sigmas` (a distilled sampler, broker/distill.py),
    an Euler flow-matching step at each of those noise levels after `shift`, or with `sampler`
    "dmd" a DmdSampler at them."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if sampler == "dmd":
        if not sigmas or len(sigmas) != steps:
            raise ValueError(f"a dmd job needs one sigma per step ({steps})")
        dmd = DmdSampler(list(sigmas), seed, int(config.get("num_train_timesteps", 1000)), device)
        dmd.set_begin_index(0)
        return dmd
    if sampler is not None:
        raise ValueError(f"unknown sampler {sampler[:16]!r}")
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
