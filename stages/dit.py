"""DiT stage: the denoising loop of diffusers' WanPipeline, or a part of it.

One module serves every DiT process. An instance is configured (in the profile) with its `part`
of the schedule and its device:

- `part = "high"`: the steps before the hand-off, with the high-noise expert (`transformer`);
  it draws the initial noise from the job's seed, as the pipeline does.
- `part = "low"`: the steps from the hand-off on, with the low-noise expert (`transformer_2`),
  continuing the scheduler state the high part sent; it sends the latents on to the VAE.
- `part = "all"`: the whole loop in one process (single-GPU profiles).

For a one-expert model (TI2V-5B) both parts use `transformer` and split the steps at
`split_fraction`, so two DiT processes pipeline consecutive jobs the same way.
A step-progress report is sent after every step, and a preview (`stages/previews.py`: the x0
prediction projected to RGB, written into the job's spool folder) when one is due.

Image-conditioned jobs (the text_encoder stage VAE-encoded the image) build the model input as
diffusers' `WanImageToVideoPipeline` does: I2V-A14B joins the noise latents and the job's
`condition` (mask + condition latents) on the channel axis; TI2V-5B replaces the first latent frame
by the image's latent (`first_frame_mask`), gives those tokens timestep 0, and the last DiT part
puts the image's latent back into the first frame before the VAE decodes.

S2V-14B (one DiT, `stages/s2v/transformer.py`) comes as `ClipDenoiseJob`s, one clip at a time:
the first DiT part builds the clip's conditioning and draws its noise (`stages/s2v/sampler.py`),
the steps are split at `split_fraction` as TI2V-5B's (the hand-off carries the UniPC state), and
the last part sends the clip's latents to the VAE (`ClipDecodeJob`), which sends the next clip
back here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.utils.torch_utils import randn_tensor

from common import catalog
from common import messages as m
from common.errors import InvalidRequest
from stages import caching, schedule
from stages.base import Stage
from stages.compilation import StageCompile, compile_stage
from stages.lora import LoraCache
from stages.models import PipelineInfo, load_component, model_dir, scheduler_config
from stages.placement import Placement
from stages.previews import Previewer, Renderer, projection_for
from stages.runtime import stage_main

log = logging.getLogger(__name__)

S2V_MODELS = ("s2v-14B",)  # served by the S2V DiT (stages/s2v), clip by clip


def load_s2v_transformer(folder: Any, dtype: torch.dtype) -> torch.nn.Module:
    from stages.official import load_s2v_transformer as load

    model: torch.nn.Module = load(folder, dtype)
    return model


class DitStage(Stage):
    kind = "dit"
    previewer: Previewer | None = None  # set up in setup() when [previews] enabled
    lora_cache: LoraCache | None = None  # the LoRA adapters of this process's experts (stages/lora.py)
    compiled: StageCompile | None = None  # `compile = true`: the compiled experts, warmed up (stages/compilation.py)

    def setup(self) -> None:
        placement = self.placement = Placement.from_spec(self.spec, attention=True)
        self.device = placement.device
        self.dtype = placement.dtype
        self.part = self.spec.part
        if self.part not in schedule.PARTS:
            raise InvalidRequest(f"dit part must be one of {schedule.PARTS}, got {self.part!r}")
        self.models: dict[str, dict] = {}
        projections: dict[str, Renderer] = {}
        self.s2v_models: dict[str, dict[str, Any]] = {}
        for model in self.config.stage_models(self.spec):
            folder = model_dir(self.config, model)
            if model in S2V_MODELS:
                self.add_s2v_model(model, placement.place(load_s2v_transformer(folder, self.dtype), f"{model}/dit"),
                                   self.config.model(model).split_fraction)
                log.info("loaded the S2V DiT of %s on %s (%s), part %s", model, self.device, self.dtype, self.part)
                continue
            info = PipelineInfo.read(folder)
            model_spec = self.config.model(model)
            two_experts = info.has_transformer_2 and info.boundary_ratio is not None
            wanted = {"high": ["transformer"], "low": ["transformer_2"], "all": ["transformer", "transformer_2"]}
            names = wanted[self.part] if two_experts else ["transformer"]
            experts = {
                name: placement.place(
                    load_component(WanTransformer3DModel, folder, name, torch_dtype=self.dtype), f"{model}/{name}"
                )
                for name in names
            }
            # The profile may set the expert boundary; else the checkpoint decides.
            boundary = model_spec.boundary_ratio if model_spec.boundary_ratio is not None else info.boundary_ratio
            self.add_model(model, info, experts, scheduler_config(folder, model_spec.flow_shift),
                           boundary_ratio=boundary, split_fraction=model_spec.split_fraction)
            log.info("loaded %s of %s on %s (%s), part %s", "+".join(names), model, self.device, self.dtype, self.part)
            if self.config.previews.enabled and model_spec.preview_decoder:  # a TAEHV decoder; a bad file stops
                from stages.taehv import preview_for  # the stage with MODEL_LOAD_ERROR

                projections[model] = preview_for(
                    self.config.path(model_spec.preview_decoder), latent_channels=info.z_dim,
                    spatial_scale=info.vae_scale_spatial, temporal_scale=info.vae_scale_temporal, device=self.device)
            elif self.config.previews.enabled:
                try:
                    projections[model] = projection_for(folder, self.config.model_cache_dir).to(self.device)
                except Exception:  # previews are a side product: without a projection the model just has none
                    log.exception("no previews for %s: its latent-to-RGB projection could not be made", model)
        if self.spec.compile:  # before `ready`: no job pays the compile
            self.compiled = compile_stage(self.config, self.spec, self.models)
        if self.config.previews.enabled:
            self.previewer = Previewer(self.config, self.config.previews, projections)

    def memory(self) -> dict[str, Any]:
        """The heartbeat's memory fields, and what the compile warm-up measured (`compile`)."""
        beat = super().memory()
        if beat and self.compiled is not None:
            beat["compile"] = self.compiled.report()
        return beat

    def add_model(self, model: str, info: PipelineInfo, experts: dict[str, torch.nn.Module],
                  scheduler_config: dict, *, boundary_ratio: float | None, split_fraction: float = 0.5) -> None:
        """Serve `model` with these loaded experts (`transformer` and/or `transformer_2`). setup()
        calls it for each model of the profile; a benchmark can hand over models it built itself."""
        self.models[model] = {
            "info": info,
            "experts": experts,
            "two_experts": info.has_transformer_2 and info.boundary_ratio is not None,
            "scheduler_config": dict(scheduler_config),
            "boundary_ratio": float(boundary_ratio or 0.0),
            "split_fraction": float(split_fraction),
        }

    def add_s2v_model(self, model: str, dit: torch.nn.Module, split_fraction: float = 0.5) -> None:
        """Serve the S2V `model` with this loaded DiT (setup(), or a benchmark with its own)."""
        self.s2v_models[model] = {"dit": dit, "split_fraction": float(split_fraction)}

    def prepare_latents(self, info: PipelineInfo, p: m.JobParams) -> torch.Tensor:
        shape = (
            1,
            info.z_dim,
            (p.num_frames - 1) // info.vae_scale_temporal + 1,
            p.height // info.vae_scale_spatial,
            p.width // info.vae_scale_spatial,
        )
        generator = torch.Generator(device="cpu").manual_seed(p.seed)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def handle(self, msg: m.Message) -> list[m.Message]:
        if isinstance(msg, m.ClipDenoiseJob):
            return self.handle_clip(msg)
        if not isinstance(msg, m.DenoiseJob):
            raise InvalidRequest(f"dit does not take {msg.type_name}")
        p = msg.params
        entry = self.models.get(p.model)
        if entry is None:
            raise InvalidRequest(f"model {p.model!r} is not loaded here", {"model": p.model})
        info: PipelineInfo = entry["info"]
        multiple = info.vae_scale_spatial * info.patch_size[1]
        if p.height % multiple or p.width % multiple or p.height <= 0 or p.width <= 0:
            raise InvalidRequest(
                f"{p.model} needs width and height that are multiples of {multiple}, got {p.width}x{p.height}",
                {"multiple": multiple, "width": p.width, "height": p.height},
            )
        if p.num_frames < 1 or (p.num_frames - 1) % info.vae_scale_temporal:
            raise InvalidRequest(f"num_frames must be {info.vae_scale_temporal}n+1, got {p.num_frames}")
        experts = entry["experts"]
        if self.lora_cache is None:
            self.lora_cache = LoraCache(self.config.lora_dir, self.config.loras.max_resident)
        self.lora_cache.apply(experts, p.loras)

        # The job's shift (its preset's) replaces the checkpoint's flow_shift; None keeps it. A
        # distilled draft gives its sigmas: Euler steps at those noise levels instead of UniPC.
        try:
            scheduler = schedule.make_scheduler(entry["scheduler_config"], p.steps, p.shift, p.sigmas, self.device,
                                                p.sampler, p.seed)
        except ValueError as exc:
            raise InvalidRequest(str(exc), {"steps": p.steps}) from None
        timesteps = scheduler.timesteps
        condition, first_frame_mask = self.check_condition(info, msg)
        if msg.latents is None:
            latents = self.prepare_latents(info, p)
            if msg.video_latents is not None or p.strength is not None:  # video-to-video: from the video, noised
                if msg.video_latents is None:
                    raise InvalidRequest("a job with a strength needs its video's latents", {"field": "video"})
                latents = self.noise_video(scheduler, p, msg.video_latents, latents)
        else:
            latents = msg.latents.to(self.device, torch.float32)
            if msg.scheduler_state is not None:
                schedule.restore_state(scheduler, msg.scheduler_state, self.device)

        boundary = (
            schedule.boundary_timestep(entry["boundary_ratio"], scheduler.config.num_train_timesteps)
            if entry["two_experts"]
            else None
        )
        steps = schedule.step_range(self.part, timesteps, boundary, entry["split_fraction"])
        expected = steps.start
        if p.strength is not None:  # video-to-video skips the steps before the strength's start
            start = catalog.strength_start(p.steps, p.strength)
            steps = range(max(steps.start, start), max(steps.stop, start))
            expected = expected if msg.latents is None else steps.start  # the first hop comes at 0
        if msg.step != expected:
            raise InvalidRequest(
                f"job arrived at step {msg.step} but this {self.part} part starts at {expected}",
                {"step": msg.step, "expected": expected},
            )
        guidance_2 = p.guidance_scale if p.guidance_scale_2 is None else p.guidance_scale_2
        do_cfg = p.guidance_scale > 1.0
        if do_cfg and msg.negative_prompt_embeds is None:
            raise InvalidRequest("guidance is on but the job has no negative prompt embeddings")
        if first_frame_mask is not None:
            mask = first_frame_mask
        else:
            mask = torch.ones(latents.shape, dtype=torch.float32, device=self.device)
        preview: torch.Tensor | None = None
        previewer = self.previewer if self.previewer is not None and self.previewer.serves(p.model) else None
        step_cache = caching.for_stage(self)  # the job's cache hooks, with fresh state (stages/caching.py)
        step_cache.start(experts.values(), p.cache)
        for i in steps:
            self.check_cancelled(msg.job_id)
            t = timesteps[i]
            if boundary is None or t >= boundary:
                model, scale = experts["transformer"], p.guidance_scale
            else:
                model, scale = experts["transformer_2"], guidance_2
            cond = msg.prompt_embeds.to(self.device, model.dtype)
            if first_frame_mask is not None:
                assert condition is not None  # check_condition gives a first-frame mask only with its condition
                model_input = ((1 - mask) * condition + mask * latents).to(model.dtype)
            elif condition is not None:
                model_input = torch.cat([latents, condition], dim=1).to(model.dtype)
            else:
                model_input = latents.to(model.dtype)
            if info.expand_timesteps:
                timestep = (mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0).expand(latents.shape[0], -1)
            else:
                timestep = t.expand(latents.shape[0])
            cache_kwargs = {"step_index": i, "sigma": float(scheduler.sigmas[i]), "num_inference_steps": len(timesteps)}
            with step_cache.context(model, "cond", **cache_kwargs):
                noise_pred = model(
                    hidden_states=model_input, timestep=timestep, encoder_hidden_states=cond, return_dict=False
                )[0]
            if do_cfg:
                assert msg.negative_prompt_embeds is not None  # refused before the loop otherwise
                uncond = msg.negative_prompt_embeds.to(self.device, model.dtype)
                with step_cache.context(model, "uncond", **cache_kwargs):
                    noise_uncond = model(
                        hidden_states=model_input, timestep=timestep, encoder_hidden_states=uncond, return_dict=False
                    )[0]
                noise_pred = noise_uncond + scale * (noise_pred - noise_uncond)
            if previewer is not None:
                # The last step of this part (hand-off or end), or the last before the expert changes.
                switch = boundary is not None and i + 1 < steps.stop and t >= boundary > timesteps[i + 1]
                if previewer.due(msg.job_id, i + 1 == steps.stop or switch):
                    # The scheduler's x0 for a flow-prediction model: sample - sigma * velocity.
                    x0 = latents - float(scheduler.sigmas[i]) * noise_pred.float()
                    if first_frame_mask is not None:
                        assert condition is not None  # as above
                        x0 = (1 - mask) * condition + mask * x0
                    preview = x0
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            self.emit(m.StageReport(msg.job_id, msg.attempt, self.name, "step", i + 1, len(timesteps), time.time()))
            if preview is not None:
                self.send_preview(msg, preview, i + 1, len(timesteps))
                preview = None
        cache_report = step_cache.finish(experts.values(), msg.job_id, msg.attempt, self.name)
        if cache_report is not None:
            self.emit(cache_report)

        common: dict[str, Any] = dict(job_id=msg.job_id, attempt=msg.attempt, route=msg.route, params=p)
        if steps.stop < len(timesteps):
            return [
                m.DenoiseJob(
                    **common,
                    prompt_embeds=msg.prompt_embeds,
                    negative_prompt_embeds=msg.negative_prompt_embeds,
                    latents=latents.cpu(),
                    scheduler_state=schedule.export_state(scheduler),
                    step=steps.stop,
                    condition=msg.condition,
                    first_frame_mask=msg.first_frame_mask,
                )
            ]
        if first_frame_mask is not None:
            assert condition is not None  # as above
            latents = (1 - first_frame_mask) * condition + first_frame_mask * latents
        return [m.DecodeJob(**common, latents=latents.cpu())]

    def noise_video(self, scheduler: Any, p: m.JobParams, video_latents: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
        """The video's latents noised to the strength's start step, which the scheduler then begins
        at: as `WanVideoToVideoPipeline.prepare_latents` does (the scheduler's add_noise, or a flow
        matching scheduler's scale_noise; for the DMD sampler the same flow interpolation)."""
        if p.strength is None:
            raise InvalidRequest("the job has video latents but no strength", {"field": "strength"})
        if tuple(video_latents.shape) != tuple(noise.shape):
            raise InvalidRequest(f"video_latents have shape {tuple(video_latents.shape)}, expected "
                                 f"{tuple(noise.shape)}", {"field": "video_latents", "expected": list(noise.shape)})
        start = catalog.strength_start(p.steps, p.strength)
        if start >= len(scheduler.timesteps):
            raise InvalidRequest(f"strength {p.strength} leaves none of the {p.steps} steps to run",
                                 {"field": "strength"})
        scheduler.set_begin_index(start)
        x0 = video_latents.to(self.device, torch.float32)
        t = scheduler.timesteps[start:start + 1]
        if hasattr(scheduler, "add_noise"):
            noised: torch.Tensor = scheduler.add_noise(x0, noise, t)
        elif hasattr(scheduler, "scale_noise"):
            noised = scheduler.scale_noise(x0, t, noise)
        else:
            sigma = scheduler.sigmas[start]
            noised = (1 - sigma) * x0 + sigma * noise
        return noised

    def handle_clip(self, msg: m.ClipDenoiseJob) -> list[m.Message]:
        """This process's steps of one S2V clip: from the start (the first part builds the clip's
        conditioning and draws its noise from `seed + clip`), or from the hand-off's latents and
        UniPC state; then the hand-off to the next DiT part, or the clip's latents to the VAE."""
        from stages.s2v import route, sampler

        p = msg.params
        entry = self.s2v_models.get(p.model)
        if entry is None:
            raise InvalidRequest(f"model {p.model!r} is not loaded here", {"model": p.model})
        if p.loras or p.cache:
            raise InvalidRequest(f"{p.model} takes no LoRAs or step cache here", {"model": p.model})
        s = route.settings(p, self.config.model(p.model).motion_frames)
        if not 0 <= msg.clip < p.num_clips:
            raise InvalidRequest(f"clip {msg.clip} is not one of the job's {p.num_clips}", {"clip": msg.clip})
        dit, c, dev = entry["dit"], msg.conditions, self.device
        to = lambda t: t.to(dev, torch.float32)  # noqa: E731
        negative = c.negative_prompt_embeds if c.negative_prompt_embeds is not None else c.prompt_embeds
        if s.guidance > 1 and c.negative_prompt_embeds is None:
            raise InvalidRequest("guidance is on but the job has no negative prompt embeddings")
        pose = route.clip_pose(c, s)
        resume = None  # the hand-off within the clip: its latents and the whole UniPC state
        if msg.latents is not None:
            if msg.scheduler_state is None:
                raise InvalidRequest("the clip's hand-off has latents but no scheduler state", {"clip": msg.clip})
            resume = {"clip": msg.clip, "step": msg.step, "latents": msg.latents, "scheduler": msg.scheduler_state}
        try:
            state = sampler.prepare_clip(dit, s, msg.clip, to(c.prompt_embeds), to(negative), to(c.ref_latents),
                                         to(msg.motion_latents), to(sampler.audio_of_clip(c.audio_features, s, 0)),
                                         None if pose is None else to(pose), resume=resume)
        except ValueError as exc:  # shapes that do not fit the model (audio frames, latents)
            raise InvalidRequest(f"the clip's inputs do not fit {p.model}: {exc}", {"clip": msg.clip}) from None
        total = len(state.timesteps)
        steps = schedule.step_range(self.part, state.timesteps, None, entry["split_fraction"])
        if msg.step != steps.start:
            raise InvalidRequest(
                f"clip {msg.clip} arrived at step {msg.step} but this {self.part} part starts at {steps.start}",
                {"step": msg.step, "expected": steps.start, "clip": msg.clip},
            )
        for i in steps:
            self.check_cancelled(msg.job_id)
            sampler.denoise_step(dit, state)
            self.emit(m.StageReport(msg.job_id, msg.attempt, self.name, "step", i + 1, total, time.time(),
                                    clip=msg.clip))
        common: dict[str, Any] = dict(job_id=msg.job_id, attempt=msg.attempt, route=msg.route, params=p,
                                      clip=msg.clip, conditions=c, motion_latents=msg.motion_latents,
                                      motion_window=msg.motion_window)
        if steps.stop < total:
            handoff = sampler.export_clip(state)
            return [m.ClipDenoiseJob(**common, latents=handoff["latents"], scheduler_state=handoff["scheduler"],
                                     step=handoff["step"])]
        return [m.ClipDecodeJob(**common, latents=state.latents.cpu())]

    def batch_key(self, msg: m.Message) -> Any:
        """`max_batch` > 1: the jobs this one may be denoised with in one batch (stages/batching.py)."""
        from stages import batching

        return batching.batch_key(self, msg)

    def handle_batch(self, msgs: list[m.Message]) -> list[list[m.Message] | Exception]:
        """Compatible jobs (one `batch_key`) denoised as one batch (stages/batching.py)."""
        from stages import batching

        return batching.handle_batch(self, msgs)

    def send_preview(self, msg: m.DenoiseJob, x0: torch.Tensor, done: int, total: int) -> None:
        """Write the preview of `x0` after `done` steps and announce it (not for a cancelled job)."""
        assert self.previewer is not None
        if self.context.cancelled(msg.job_id):
            return
        name = self.previewer.write(msg.params.model, msg.job_id, done, x0)
        if name is not None:
            self.emit(m.StageReport(msg.job_id, msg.attempt, self.name, "preview", done, total, time.time(),
                                    preview=name))

    def check_condition(self, info: PipelineInfo, msg: m.DenoiseJob) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The job's image conditioning on this device, checked against the model: (condition, first_frame_mask)."""
        p = msg.params
        f = (p.num_frames - 1) // info.vae_scale_temporal + 1
        h, w = p.height // info.vae_scale_spatial, p.width // info.vae_scale_spatial
        mode = info.image_conditioning
        if mode == "concat":
            expected = {"condition": (1, info.in_channels - info.z_dim, f, h, w)}
        elif mode == "first_frame" and msg.condition is not None:
            expected = {"condition": (1, info.z_dim, 1, h, w), "first_frame_mask": (1, 1, f, h, w)}
        else:
            expected = {}
        for name in ("condition", "first_frame_mask"):
            value = getattr(msg, name)
            if name not in expected:
                if value is not None:
                    raise InvalidRequest(f"{p.model} takes no {name}", {"model": p.model, "field": name})
                continue
            if value is None:
                raise InvalidRequest(f"{p.model} needs an input image: the job has no {name}", {"field": name})
            if tuple(value.shape) != expected[name]:
                raise InvalidRequest(
                    f"{name} has shape {tuple(value.shape)}, expected {expected[name]}",
                    {"field": name, "shape": list(value.shape), "expected": list(expected[name])},
                )
        to = lambda t: None if t is None else t.to(self.device, torch.float32)  # noqa: E731
        return to(msg.condition), to(msg.first_frame_mask)


def main() -> None:
    stage_main(DitStage)


if __name__ == "__main__":
    main()
