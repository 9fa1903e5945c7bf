"""Batching in a DiT stage (`[stages.<dit>] max_batch`): compatible jobs denoised as one batch.

The runtime (stages/runtime.py) takes a DenoiseJob, and when the stage's `max_batch` is over 1 it
also takes the messages already queued, or arriving within `batch_wait_ms` of the first one's
arrival, until it has `max_batch` of the same `batch_key`; the others are handled after, in the
order they came. A job never waits longer than `batch_wait_ms` for company: the wait is counted
from its own arrival, so a job that was queued behind a batch for longer runs at once, with
whatever compatible jobs are already there.

What jobs must share to run as one batch (`batch_key`; anything else runs alone, as before):
- the model, height, width and num_frames (the latent shape), the step count, shift, sigmas and
  sampler (the same timesteps, so one timestep per pass serves every job), the step position the
  message arrives at (`msg.step`: the first part's start, or the same hand-off), and the prompt
  embeddings' shape;
- guidance on or off for all (each job keeps its own scale: the two passes are shared, the mix
  `uncond + scale x (cond - uncond)` is per job);
- the same LoRA set and scales (the adapters are set on the shared experts once);
- the image condition present or absent for all (its shapes follow from the model and size);
- no step cache (its skip decisions would be shared by the batch) and no S2V clip or
  video-to-video start (their own prologues), which run alone.

The seeds, prompts, guidance scales and previews differ freely. `handle_batch` prepares each job
as `DitStage.handle` does (its own noise from its seed, or its hand-off's latents and scheduler
state), then for each step runs one transformer call per guidance branch over the stacked latents,
embeddings and conditions (batch dimension 0), and steps each job's own scheduler on its slice
(UniPC keeps state per job). Each job gets its own step reports, previews, cancel checks (a
cancelled job leaves the batch between two steps and stops as a lone job does) and its own
hand-off or DecodeJob. A job whose inputs do not pass the checks runs alone through `handle` (and
fails there with the same error); a failure of the shared passes (out of memory) fails every job
of the batch. Each batched job gets a `batch` StageReport (step = the batch size, total_steps =
`max_batch`) that the broker records in the result's metadata (`batch`), since a batch may change
the last bits of a job's frames: a batch makes some kernels (on the CPU the patch embedding's Conv3d
and the time embedder's Linears) block their work otherwise, about 6e-7 apart in float32, which
the steps and the VAE leave at most one level of 255 off in a few values (tests/test_batching.py
states the bound). A batch of one is the lone path, bit for bit.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from common import messages as m
from common.errors import JobCancelled, ServerError, StageStopping
from stages import caching, schedule

log = logging.getLogger(__name__)


def batch_key(stage: Any, msg: m.Message) -> tuple[Any, ...] | None:
    """What `msg` must share with the others of its batch; None: it runs alone."""
    try:
        return _key(stage, msg)
    except Exception:  # noqa: BLE001 - a message the rule cannot read runs alone (and fails there if bad)
        return None


def _key(stage: Any, msg: m.Message) -> tuple[Any, ...] | None:
    if not isinstance(msg, m.DenoiseJob):  # an S2V ClipDenoiseJob: alone
        return None
    p = msg.params
    if p.model not in getattr(stage, "models", {}) or p.cache:
        return None
    # Video-to-video (a strength, the video's latents) starts from its own noised latents: alone.
    if getattr(p, "strength", None) is not None or getattr(msg, "video_latents", None) is not None:
        return None
    guided = p.guidance_scale > 1.0
    if guided and msg.negative_prompt_embeds is None:
        return None  # refused by handle, alone
    loras = json.dumps(p.loras, sort_keys=True, default=str) if p.loras else ""
    sigmas = tuple(p.sigmas) if p.sigmas else None
    return (p.model, p.height, p.width, p.num_frames, p.steps, p.shift, sigmas, p.sampler, msg.step, guided, loras,
            tuple(msg.prompt_embeds.shape), msg.condition is not None, msg.first_frame_mask is not None)


@dataclass
class Member:
    """One job of a batch: its own scheduler, latents and inputs on the device."""

    msg: m.DenoiseJob
    scheduler: Any
    latents: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor | None
    condition: torch.Tensor | None
    first_frame_mask: torch.Tensor | None
    mask: torch.Tensor
    guidance: float
    guidance_2: float
    result: list[m.Message] | Exception | None = None


def prepare(stage: Any, msg: m.DenoiseJob, entry: dict[str, Any]) -> Member | None:
    """The job ready to step, as `DitStage.handle` starts it; None when any of its checks fails
    (it then runs alone, and `handle` refuses it with its error)."""
    p, info, device = msg.params, entry["info"], stage.device
    multiple = info.vae_scale_spatial * info.patch_size[1]
    if p.height % multiple or p.width % multiple or p.height <= 0 or p.width <= 0:
        return None
    if p.num_frames < 1 or (p.num_frames - 1) % info.vae_scale_temporal:
        return None
    try:
        scheduler = schedule.make_scheduler(entry["scheduler_config"], p.steps, p.shift, p.sigmas, device,
                                            p.sampler, p.seed)
        condition, first_frame_mask = stage.check_condition(info, msg)
    except (ValueError, ServerError):
        return None
    if msg.latents is None:
        latents = stage.prepare_latents(info, p)
    else:
        latents = msg.latents.to(device, torch.float32)
        shape = (1, info.z_dim, (p.num_frames - 1) // info.vae_scale_temporal + 1, p.height // info.vae_scale_spatial,
                 p.width // info.vae_scale_spatial)
        if tuple(latents.shape) != shape:
            return None
        if msg.scheduler_state is not None:
            try:
                schedule.restore_state(scheduler, msg.scheduler_state, device)
            except (KeyError, TypeError, ValueError):
                return None
    boundary = (schedule.boundary_timestep(entry["boundary_ratio"], scheduler.config.num_train_timesteps)
                if entry["two_experts"] else None)
    if msg.step != schedule.step_range(stage.part, scheduler.timesteps, boundary, entry["split_fraction"]).start:
        return None
    mask = first_frame_mask if first_frame_mask is not None else torch.ones(latents.shape, device=device)
    uncond = None if msg.negative_prompt_embeds is None else msg.negative_prompt_embeds.to(device)
    return Member(msg, scheduler, latents, msg.prompt_embeds.to(device), uncond, condition, first_frame_mask, mask,
                  p.guidance_scale, p.guidance_scale if p.guidance_scale_2 is None else p.guidance_scale_2)


def model_input(member: Member, dtype: torch.dtype) -> torch.Tensor:
    """The job's transformer input, as `DitStage.handle` builds it."""
    if member.first_frame_mask is not None:
        assert member.condition is not None
        return ((1 - member.mask) * member.condition + member.mask * member.latents).to(dtype)
    if member.condition is not None:
        return torch.cat([member.latents, member.condition], dim=1).to(dtype)
    return member.latents.to(dtype)


def outputs(stage: Any, member: Member, stop: int, total: int) -> list[m.Message]:
    """The job's hand-off to the next DiT part, or its latents for the VAE (as `DitStage.handle`)."""
    msg, latents = member.msg, member.latents
    common: dict[str, Any] = dict(job_id=msg.job_id, attempt=msg.attempt, route=msg.route, params=msg.params)
    if stop < total:
        return [m.DenoiseJob(**common, prompt_embeds=msg.prompt_embeds,
                             negative_prompt_embeds=msg.negative_prompt_embeds, latents=latents.cpu(),
                             scheduler_state=schedule.export_state(member.scheduler), step=stop,
                             condition=msg.condition, first_frame_mask=msg.first_frame_mask)]
    if member.first_frame_mask is not None:
        assert member.condition is not None
        latents = (1 - member.first_frame_mask) * member.condition + member.first_frame_mask * latents
    return [m.DecodeJob(**common, latents=latents.cpu())]


@torch.no_grad()
def handle_batch(stage: Any, msgs: list[m.Message]) -> list[list[m.Message] | Exception]:
    """Denoise `msgs` (one batch key) together; per message its outputs or the exception that failed it."""
    first = msgs[0]
    assert isinstance(first, m.DenoiseJob)
    entry = stage.models[first.params.model]
    members: list[Member] = []
    alone: list[m.DenoiseJob] = []
    for msg in msgs:
        assert isinstance(msg, m.DenoiseJob)
        try:
            member = prepare(stage, msg, entry)
        except Exception:  # noqa: BLE001 - whatever its inputs do, the lone path says it
            member = None
        if member is not None and members and not torch.equal(member.scheduler.timesteps,
                                                              members[0].scheduler.timesteps):
            member = None
        if member is None:
            alone.append(msg)
        else:
            members.append(member)
    results: dict[int, list[m.Message] | Exception] = {}
    if len(members) > 1:
        try:
            run(stage, entry, members)
        except Exception as exc:  # noqa: BLE001 - the shared passes failed: every job of the batch
            for member in members:
                member.result = exc
        for member in members:
            assert member.result is not None
            results[id(member.msg)] = member.result
    else:  # one left: the lone path, exactly as without batching
        alone = [member.msg for member in members] + alone
    for msg in alone:
        try:
            results[id(msg)] = stage.handle(msg)
        except Exception as exc:  # noqa: BLE001 - that job's failure
            results[id(msg)] = exc
    return [results[id(msg)] for msg in msgs]


def run(stage: Any, entry: dict[str, Any], members: list[Member]) -> None:
    """The step loop of `DitStage.handle` over a batch: one transformer call per pass for all."""
    p0 = members[0].msg.params
    experts = entry["experts"]
    if stage.lora_cache is None:
        from stages.lora import LoraCache

        stage.lora_cache = LoraCache(stage.config.lora_dir, stage.config.loras.max_resident)
    stage.lora_cache.apply(experts, p0.loras)
    timesteps = members[0].scheduler.timesteps
    boundary = (schedule.boundary_timestep(entry["boundary_ratio"], members[0].scheduler.config.num_train_timesteps)
                if entry["two_experts"] else None)
    steps = schedule.step_range(stage.part, timesteps, boundary, entry["split_fraction"])
    total, size, expand = len(timesteps), len(members), entry["info"].expand_timesteps
    previewer = stage.previewer if stage.previewer is not None and stage.previewer.serves(p0.model) else None
    step_cache = caching.for_stage(stage)
    step_cache.start(experts.values(), None)  # no hooks: a cached job runs alone
    for member in members:
        stage.emit(m.StageReport(member.msg.job_id, member.msg.attempt, stage.name, "batch", size,
                                 int(stage.spec.max_batch), time.time()))
    active = list(members)
    log.info("denoising %d jobs as one batch, steps %d..%d", size, steps.start, steps.stop)
    for i in steps:
        for member in list(active):
            try:
                stage.check_cancelled(member.msg.job_id)
            except (JobCancelled, StageStopping) as exc:
                member.result = exc
                active.remove(member)
        if not active:
            return
        t = timesteps[i]
        if boundary is None or t >= boundary:
            model, high = experts["transformer"], True
        else:
            model, high = experts["transformer_2"], False
        hidden = torch.cat([model_input(x, model.dtype) for x in active])
        if expand:
            timestep = torch.cat([(x.mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0) for x in active])
        else:
            timestep = t.expand(len(active))
        cache_kwargs = {"step_index": i, "sigma": float(members[0].scheduler.sigmas[i]), "num_inference_steps": total}
        cond = torch.cat([x.cond for x in active]).to(model.dtype)
        with step_cache.context(model, "cond", **cache_kwargs):
            noise_pred = model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=cond,
                               return_dict=False)[0]
        noise_uncond = None
        if p0.guidance_scale > 1.0:
            uncond = torch.cat([x.uncond for x in active if x.uncond is not None]).to(model.dtype)
            with step_cache.context(model, "uncond", **cache_kwargs):
                noise_uncond = model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=uncond,
                                     return_dict=False)[0]
        for j, x in enumerate(active):
            pred = noise_pred[j:j + 1]
            if noise_uncond is not None:
                scale = x.guidance if high else x.guidance_2
                pred = noise_uncond[j:j + 1] + scale * (pred - noise_uncond[j:j + 1])
            else:
                pred = pred.clone()  # not a view of the batch's output: the scheduler keeps it
            t_j = x.scheduler.timesteps[i]
            preview = None
            if previewer is not None:
                switch = boundary is not None and i + 1 < steps.stop and t_j >= boundary > timesteps[i + 1]
                if previewer.due(x.msg.job_id, i + 1 == steps.stop or switch):
                    x0 = x.latents - float(x.scheduler.sigmas[i]) * pred.float()
                    if x.first_frame_mask is not None:
                        assert x.condition is not None
                        x0 = (1 - x.mask) * x.condition + x.mask * x0
                    preview = x0
            x.latents = x.scheduler.step(pred, t_j, x.latents, return_dict=False)[0]
            stage.emit(m.StageReport(x.msg.job_id, x.msg.attempt, stage.name, "step", i + 1, total, time.time()))
            if preview is not None:
                stage.send_preview(x.msg, preview, i + 1, total)
    step_cache.finish(experts.values(), members[0].msg.job_id, members[0].msg.attempt, stage.name)
    for x in active:
        x.result = outputs(stage, x, steps.stop, total)
