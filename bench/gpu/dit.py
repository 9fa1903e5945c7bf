"""The DiT sections: our DitStage against diffusers on the same random weights and inputs.

1. `DitStage.handle` on a job (after a shorter warm-up job): seconds per denoising step, from the
   stage's own step reports, and the peak memory.
2. diffusers' `WanPipeline` with the same transformer, scheduler config, embeddings and seed
   (output_type "latent", stopped where the stage's part stops): seconds per step, and max |diff|
   between its latents and the stage's output latents (0 when the stage reproduces the pipeline).
3. The transformer's forward called directly: cond + uncond as two batch-1 calls (what the stage
   and the pipeline do per step), optionally as one batch of 2; median of `reps`.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch

from bench.gpu.clock import Env, max_abs_diff, med, r4, reps_that_fit, say, sub, timed
from bench.gpu.probe import top_kernels
from bench.gpu.sizes import DTYPES, latent_shape
from bench.gpu.stages import StepClock, dit_stage, job_params, scheduler_config
from bench.gpu.weights import approx_forward_flops, build_random, count_params
from common import messages as m


def run_dit_job(env: Env, stage: Any, clock: StepClock, sp: dict[str, Any], steps: int, emb: torch.Tensor,
                neg: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """One job through `stage.handle`: timings from its step reports, and its output latents."""
    msg = m.DenoiseJob(
        job_id=f"bench-{sp['name']}-{steps}", attempt=0, route=["dit_bench"],
        params=job_params(sp, steps, sp["guidance"]), prompt_embeds=emb, negative_prompt_embeds=neg,
    )
    clock.stamps.clear()
    env.reset_peak()
    t0 = env.now()
    outs = stage.handle(msg)
    t1 = env.now()
    marks = [t0] + [t for _, t in clock.stamps]
    step_s = [b - a for a, b in itertools.pairwise(marks)]
    out = outs[0]
    return {
        "job_steps": steps,
        "steps_run": [s for s, _ in clock.stamps],
        "handle_s": r4(t1 - t0),
        "step_s": [r4(s) for s in step_s],
        "median_step_s": r4(med(step_s)) if step_s else None,
        "mean_step_s": r4((t1 - t0) / len(step_s)) if step_s else None,
        "after_last_step_s": r4(t1 - marks[-1]),
        "peak_gib": env.peak_gib(),
        "output": out.type_name + (f" (next step {out.step})" if isinstance(out, m.DenoiseJob) else ""),
        "output_finite": bool(torch.isfinite(out.latents).all()),
    }, out.latents


def run_pipeline(env: Env, sp: dict[str, Any], model: torch.nn.Module, two_experts: bool, steps: int,
                 stop: int, emb: torch.Tensor, neg: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """diffusers' WanPipeline on the same model and inputs, stopped after step `stop` - 1; its latents."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None,
        scheduler=UniPCMultistepScheduler.from_config(scheduler_config(sp)),
        transformer=model,
        # The high-noise part never reaches the low expert's steps: the same module stands in for it.
        transformer_2=model if two_experts else None,
        boundary_ratio=sp.get("boundary") if two_experts else None,
        expand_timesteps=bool(sp.get("expand_timesteps", False)),
    )
    pipe.vae_scale_factor_spatial = sp["spatial"]  # what the model's VAE config would say
    pipe.set_progress_bar_config(disable=True)
    stamps: list[float] = []
    captured: dict[str, torch.Tensor] = {}

    def on_step(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        stamps.append(env.now())
        if i == stop - 1:
            captured["latents"] = kwargs["latents"].detach().float().cpu()
            p._interrupt = True  # the stage's part ends here; skip the remaining steps
        return {}

    env.reset_peak()
    t0 = env.now()
    pipe(
        prompt_embeds=emb.to(env.device), negative_prompt_embeds=neg.to(env.device),
        height=sp["height"], width=sp["width"], num_frames=sp["frames"], num_inference_steps=steps,
        guidance_scale=sp["guidance"], generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
        callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"],
    )
    t1 = env.now()
    marks = [t0, *stamps]
    step_s = [b - a for a, b in itertools.pairwise(marks)]
    return {"steps_run": len(stamps), "call_s": r4(t1 - t0), "step_s": [r4(s) for s in step_s],
            "median_step_s": r4(med(step_s)) if step_s else None, "peak_gib": env.peak_gib()}, captured["latents"]


def dit_section(env: Env, P: dict[str, Any], key: str, part: str, two_experts: bool, warm_steps: int, steps: int,
                batch2: bool, reps: int, attention: str = "sdpa") -> dict[str, Any]:
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

    sp = P[key]
    dtype = DTYPES[P["dtype"]]
    res: dict[str, Any] = {
        "model": sp["name"], "size": f"{sp['width']}x{sp['height']}x{sp['frames']}", "dtype": P["dtype"],
        "part": part, "guidance": sp["guidance"], "attention": attention,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in sp["config"].items()},
    }
    t0 = time.perf_counter()
    env.reset_peak()
    model = build_random(WanTransformer3DModel, sp["config"], env.device, dtype)
    env.sync()
    res["build_s"] = r4(time.perf_counter() - t0)
    res["params_b"] = round(count_params(model) / 1e9, 3)
    res["weights_gib"] = env.alloc_gib()
    fp32 = [n for n, p in model.named_parameters() if p.dtype == torch.float32] if dtype != torch.float32 else []
    res["fp32_params"] = {"count": len(fp32), "modules": sorted({k for n in fp32 for k in model._keep_in_fp32_modules
                                                                 if k in n.split(".")})}
    say(f"{key}: built {res['params_b']}B params in {res['build_s']}s, {res['weights_gib']} GiB")

    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(1, P["text_len"], P["text_dim"], generator=gen).to(dtype)
    neg = torch.randn(1, P["text_len"], P["text_dim"], generator=gen).to(dtype)
    clock = StepClock(env)
    stage = dit_stage(env, P["dtype"], sp, model, part, two_experts, clock, attention)

    res["stage_warmup"], _ = run_dit_job(env, stage, clock, sp, warm_steps, emb, neg)
    say(f"{key}: stage warm-up job ({warm_steps} step): {res['stage_warmup']['handle_s']}s")
    res["stage"], stage_latents = run_dit_job(env, stage, clock, sp, steps, emb, neg)
    st = res["stage"]
    say(f"{key}: stage {steps}-step job ran steps {st['steps_run']}: {st['step_s']} s/step, peak {st['peak_gib']} GiB")

    def pipeline() -> dict[str, Any]:
        need = 30 + len(st["steps_run"]) * (st.get("median_step_s") or 0.0)
        if env.left_s() < need:
            return {"skipped": f"time budget ({env.left_s():.0f}s left, needs ~{need:.0f}s)"}
        out, latents = run_pipeline(env, sp, model, two_experts, steps, max(st["steps_run"]), emb, neg)
        out["vs_stage"] = max_abs_diff(stage_latents, latents)
        return out

    sub(res, "diffusers_pipeline", pipeline)
    say(f"{key}: diffusers WanPipeline, same weights and inputs: {res['diffusers_pipeline']}")

    # The transformer's forward alone, on inputs of the stage's shapes.
    lat = latent_shape(sp, model.config.in_channels)
    res["latents_shape"] = list(lat)
    p_t, p_h, p_w = model.config.patch_size
    tokens = (lat[2] // p_t) * (lat[3] // p_h) * (lat[4] // p_w)
    res["tokens"] = tokens
    sched = UniPCMultistepScheduler.from_config(scheduler_config(sp))
    sched.set_timesteps(steps, device=env.device)
    t = sched.timesteps[0]
    x = torch.randn(lat, generator=gen).to(env.device, model.dtype)
    cond, uncond = emb.to(env.device), neg.to(env.device)
    if sp.get("expand_timesteps"):
        mask = torch.ones(lat, dtype=torch.float32, device=env.device)
        ts1 = (mask[0][0][:, ::p_h, ::p_w] * t).flatten().unsqueeze(0)
        ts_tokens = ts1.shape[1]
    else:
        ts1 = t.expand(1)
        ts_tokens = 1
    scale = sp["guidance"]
    flops = approx_forward_flops(model, tokens, P["text_len"], ts_tokens)
    res["approx_tflop_per_forward"] = round(flops / 1e12, 2)

    @torch.no_grad()
    def pair() -> torch.Tensor:
        c = model(hidden_states=x, timestep=ts1, encoder_hidden_states=cond, return_dict=False)[0]
        u = model(hidden_states=x, timestep=ts1, encoder_hidden_states=uncond, return_dict=False)[0]
        return u + scale * (c - u)

    @torch.no_grad()
    def one_forward() -> torch.Tensor:
        return model(hidden_states=x, timestep=ts1, encoder_hidden_states=cond, return_dict=False)[0]

    def measure_pair() -> dict[str, Any]:
        one_forward()  # warm-up (the stage jobs above already ran these shapes)
        n = reps_that_fit(env, st.get("median_step_s"), reps)
        r = timed(env, pair, n)
        r["approx_tflops_per_s"] = round(2 * flops / max(r["median_s"], 1e-9) / 1e12, 1)
        return r

    sub(res, "direct_2x_batch1", measure_pair)
    say(f"{key}: direct cond+uncond as 2 batch-1 calls: {res['direct_2x_batch1']}")

    if batch2:
        x2 = torch.cat([x, x])
        ts2 = ts1.expand(2, -1) if ts1.ndim == 2 else ts1.expand(2)
        ctx2 = torch.cat([cond, uncond])

        @torch.no_grad()
        def pair_b2() -> torch.Tensor:
            c, u = model(hidden_states=x2, timestep=ts2, encoder_hidden_states=ctx2, return_dict=False)[0].chunk(2)
            return u + scale * (c - u)

        def measure_b2() -> dict[str, Any]:
            one = res["direct_2x_batch1"].get("median_s") or 0.0
            if env.left_s() < 60 + (reps + 1) * one:
                return {"skipped": f"time budget ({env.left_s():.0f}s left)"}
            batched = pair_b2()
            r = timed(env, pair_b2, reps_that_fit(env, one, reps))
            r["approx_tflops_per_s"] = round(2 * flops / max(r["median_s"], 1e-9) / 1e12, 1)
            r["vs_2x_batch1"] = max_abs_diff(batched, pair())  # batching may change the kernels' sums
            return r

        sub(res, "direct_batch2", measure_b2)
        say(f"{key}: direct cond+uncond as one batch of 2: {res['direct_batch2']}")

    if key == "ti2v":  # where the time goes in one forward (kernel names show the attention kernel)
        def profile_one() -> list[dict[str, Any]]:
            with torch.no_grad():
                return top_kernels(env, lambda: model(hidden_states=x, timestep=ts1, encoder_hidden_states=cond,
                                                      return_dict=False), 8)

        sub(res, "forward_top_kernels", profile_one)

    d = res.get("direct_2x_batch1", {}).get("median_s")
    if d and st.get("median_step_s"):
        res["stage_over_direct"] = round(st["median_step_s"] / d, 3)
    pipe_step = res.get("diffusers_pipeline", {}).get("median_step_s")
    if pipe_step and st.get("median_step_s"):
        res["stage_over_pipeline"] = round(st["median_step_s"] / pipe_step, 3)
    return res
