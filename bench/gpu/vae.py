"""The VAE sections: `VaeStage.handle` against `AutoencoderKLWan.decode` called directly (then the
pipeline's `postprocess_video` + uint8), on the same random weights and latents: time, peak
memory, and max |diff| of the uint8 frames (the stage post-processes on the device)."""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.gpu.clock import Env, max_abs_diff, r4, say, sub
from bench.gpu.sizes import DTYPES, latent_shape
from bench.gpu.stages import job_params, vae_stage
from bench.gpu.weights import build_random, count_params
from common import messages as m


def vae_section(env: Env, P: dict[str, Any], key: str, dtype_name: str) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan

    from stages.vae import to_uint8

    sp = P[key]
    dtype = DTYPES[dtype_name]
    res: dict[str, Any] = {"model": sp["name"], "size": f"{sp['width']}x{sp['height']}x{sp['frames']}",
                           "dtype": dtype_name}
    t0 = time.perf_counter()
    vae = build_random(AutoencoderKLWan, sp["config"], env.device, dtype)
    env.sync()
    res["build_s"] = r4(time.perf_counter() - t0)
    res["params_m"] = round(count_params(vae) / 1e6, 1)
    res["weights_gib"] = env.alloc_gib()
    stage = vae_stage(env, dtype_name, sp, vae)

    z = vae.config.z_dim
    lat = latent_shape(sp, z)
    res["latents_shape"] = list(lat)
    latents = torch.randn(lat, generator=torch.Generator().manual_seed(2))
    params = job_params(sp, 1, 1.0)

    def job(lats: torch.Tensor) -> m.DecodeJob:
        frames = (lats.shape[2] - 1) * 4 + 1
        p = m.JobParams(**{**params.__dict__, "num_frames": frames})
        return m.DecodeJob(job_id=f"bench-vae-{key}", attempt=0, route=["vae_bench"], params=p, latents=lats)

    # Warm-up on 2 latent frames at the full spatial size (the same kernels, a fraction of the time).
    t0 = env.now()
    stage.handle(job(latents[:, :, :2].contiguous()))
    res["warmup_2_latent_frames_s"] = r4(env.now() - t0)
    outputs: dict[str, torch.Tensor] = {}

    def stage_handle() -> dict[str, Any]:
        env.reset_peak()
        t0 = env.now()
        outs = stage.handle(job(latents))
        dt = env.now() - t0
        frames = outs[0].frames
        outputs["stage"] = frames
        return {"handle_s": r4(dt), "peak_gib": env.peak_gib(), "frames_shape": list(frames.shape),
                "frames_dtype": str(frames.dtype).replace("torch.", "")}

    # The warm-up decoded 2 of the latent frames: a (generous) estimate of one full decode.
    est = (res["warmup_2_latent_frames_s"] or 0.0) * lat[2] / 2
    res["full_decode_estimate_s"] = r4(est)
    if env.left_s() < 15 + est:
        res["stage_handle"] = {"skipped": f"time budget ({env.left_s():.0f}s left, a decode ~{est:.0f}s)"}
    else:
        sub(res, "stage_handle", stage_handle)
    say(f"{key} {dtype_name}: VaeStage.handle: {res['stage_handle']}")

    @torch.no_grad()
    def direct() -> dict[str, Any]:
        # WanPipeline's un-normalisation, in its order of operations (in bf16 the order shows).
        zz = latents.to(env.device, dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(zz.device, zz.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(zz.device, zz.dtype)
        zz = zz / inv_std + mean
        env.reset_peak()
        t0 = env.now()
        video = vae.decode(zz, return_dict=False)[0]
        dt = env.now() - t0
        out: dict[str, Any] = {"decode_s": r4(dt), "peak_gib": env.peak_gib(), "video_shape": list(video.shape)}
        # What WanPipeline does after the decode (output_type "np"), then our uint8 conversion, on the CPU.
        processor = stage.vaes[sp["name"]][1]
        t1 = time.perf_counter()
        frames = processor.postprocess_video(video, output_type="np")
        t2 = time.perf_counter()
        uint8 = to_uint8(frames[0])
        t3 = time.perf_counter()
        out.update(postprocess_np_s=r4(t2 - t1), to_uint8_s=r4(t3 - t2))
        if "stage" in outputs:
            out["vs_stage_uint8"] = max_abs_diff(outputs["stage"].to(torch.int16),
                                                 torch.from_numpy(uint8).to(torch.int16))
        return out

    if env.left_s() < 30 + est:
        res["direct_decode"] = {"skipped": f"time budget ({env.left_s():.0f}s left, a decode ~{est:.0f}s)"}
    else:
        sub(res, "direct_decode", direct)
    say(f"{key} {dtype_name}: AutoencoderKLWan.decode directly: {res['direct_decode']}")
    return res
