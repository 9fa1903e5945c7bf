"""Real-size GPU check of the DiT and VAE stages, with random weights, against diffusers called directly.

Builds the models at their real sizes straight on the GPU (parameters made on the meta device,
then materialised on the GPU in bf16 with the fp32 modules diffusers' `from_pretrained` keeps in
fp32; random values, no checkpoint), wraps them in `stages.dit.DitStage` / `stages.vae.VaeStage`
without calling `setup()` (which would load from disk), and measures:

1. TI2V-5B, 1280x704, 121 frames, guidance 5 (cond + uncond): seconds per denoising step through
   `DitStage.handle` (part "all", 3 steps after a 1-step warm-up job), and the same forward passes
   called directly on diffusers' `WanTransformer3DModel`: (a) cond and uncond as two batch-1 calls,
   as the stage does, (b) one batch of 2. Median of 3 after a warm-up call.
2. T2V-A14B high-noise expert, 832x480, 81 frames, guidance 4: `DitStage` with part "high" (two
   experts, boundary 0.875, only `transformer` loaded) and a 4-step job, of which the first 3 steps
   are high-noise steps (what `dit_high` runs), after a 1-step warm-up job; direct (a) as above.
3. VAE decode through `VaeStage.handle` (un-normalise, decode, postprocess, uint8) and
   `AutoencoderKLWan.decode` directly: the Wan2.2 VAE on 720p/121-frame latents (1,48,31,44,80) and
   the Wan2.1 VAE on 480p/81-frame latents (1,16,21,60,104), in float32 (what diffusers recommends);
   then in bf16 if the time budget allows.

Every measurement records the peak GPU memory. Each section is independent (an error is printed
and the run goes on). A markdown table is printed at the end; with $OUT set, the full results go to
$OUT/gpu_stage_check.json and the table to $OUT/gpu_stage_check.md.

    python3 bench/gpu_stage_check.py            # on a GPU (H100/H200), ~3-4 minutes
    python3 bench/gpu_stage_check.py --small    # same code path, tiny sizes, CPU float32 (a smoke test)
    python3 bench/gpu_stage_check.py --only vae22_bfloat16,vae21_bfloat16   # some sections

The lent GPU machines have torch and transformers but not diffusers, pyzmq, msgpack or ftfy. Carry
them as cp312 wheels in `.whl/` (keep it out of git with .git/info/exclude; about 8 MiB):

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl diffusers==0.42.1 pyzmq msgpack ftfy wcwidth importlib_metadata zipp lazy-importer

and run there (carry [".whl"]):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
        PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_stage_check.py

Results of earlier runs: bench/results/gpu_stage_check_h200.* and gpu_vae_after_device_uint8_h200.*.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

START = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

# --- real model configs ---------------------------------------------------------------------------

TI2V_5B = dict(
    patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
    text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
A14B = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
# Wan2.2 VAE latents_mean / latents_std (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json).
WAN22_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]
WAN22_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]
VAE22 = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
    dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True],
    scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=WAN22_MEAN, latents_std=WAN22_STD,
)
VAE21 = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])

REAL = {
    "device": "cuda",
    "dtype": "bfloat16",
    "text_len": 512,
    "text_dim": 4096,
    "ti2v": dict(name="ti2v-5B", config=TI2V_5B, width=1280, height=704, frames=121, fps=24, shift=5.0,
                 guidance=5.0, spatial=16, expand_timesteps=True),
    "a14b": dict(name="t2v-A14B", config=A14B, width=832, height=480, frames=81, fps=16, shift=12.0,
                 guidance=4.0, spatial=8, boundary=0.875),
    "vae22": dict(name="ti2v-5B", config=VAE22, width=1280, height=704, frames=121, fps=24, spatial=16),
    "vae21": dict(name="t2v-A14B", config=VAE21, width=832, height=480, frames=81, fps=16, spatial=8),
    "vae_dtypes": ["float32", "bfloat16"],  # the second only if the budget allows
}


def _tiny_dit(channels: int) -> dict:
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=channels,
        out_channels=channels, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
    )


SMALL = {
    "device": "cpu",
    "dtype": "float32",
    "text_len": 16,
    "text_dim": 32,
    "ti2v": dict(REAL["ti2v"], config=_tiny_dit(48), width=64, height=32, frames=9),
    "a14b": dict(REAL["a14b"], config=_tiny_dit(16), width=64, height=48, frames=9),
    "vae22": dict(REAL["vae22"], config=dict(VAE22, base_dim=8, decoder_base_dim=8, dim_mult=[1, 1, 1, 1],
                                             num_res_blocks=1), width=64, height=32, frames=9),
    "vae21": dict(REAL["vae21"], config=dict(VAE21, base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
                  width=64, height=48, frames=9),
    "vae_dtypes": ["float32", "bfloat16"],
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# --- clocks, memory, budget -------------------------------------------------------------------------


class Env:
    def __init__(self, device: str, budget_s: float):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.deadline = START + budget_s

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2) if self.cuda else None

    def alloc_gib(self) -> float | None:
        return round(torch.cuda.memory_allocated(self.device) / 2**30, 2) if self.cuda else None

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def elapsed() -> str:
    return f"[{time.perf_counter() - START:6.1f}s]"


def say(*args: Any) -> None:
    print(elapsed(), *args, flush=True)


def r4(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(env: Env, fn: Callable[[], Any], reps: int) -> dict[str, Any]:
    """Median wall time of `fn` over `reps` calls (device synchronised), and the peak memory."""
    times = []
    env.reset_peak()
    for _ in range(reps):
        t0 = env.now()
        out = fn()
        times.append(env.now() - t0)
        del out
    return {"median_s": r4(med(times)), "all_s": [r4(t) for t in times], "peak_gib": env.peak_gib()}


def reps_that_fit(env: Env, one_s: float | None, reps: int, reserve_s: float = 40.0) -> int:
    """`reps`, or fewer (at least 1) when `reps` + a warm-up of a call taking `one_s` would run past
    the budget less `reserve_s` (so a pathologically slow card still finishes)."""
    if not one_s:
        return reps
    return max(1, min(reps, int((env.left_s() - reserve_s) / one_s) - 1))


def sub(out: dict, key: str, fn: Callable[[], Any]) -> None:
    """One measurement inside a section: an error is recorded and the section goes on."""
    try:
        out[key] = fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports and carries on
        traceback.print_exc()
        traceback.clear_frames(exc.__traceback__)
        out[key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}


# --- building models with random weights, straight on the device -----------------------------------


@contextlib.contextmanager
def params_on_meta():
    """Parameters are created on the meta device (no memory, no init); buffers stay real, as under
    accelerate's `init_empty_weights()` that `from_pretrained` uses."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_random(cls: type, config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """`cls(**config)` with random weights on `device`: parameters in `dtype`, except those
    `from_pretrained(torch_dtype=dtype)` keeps in float32 (`_keep_in_fp32_modules`); buffers
    (the RoPE tables) as the constructor made them."""
    with params_on_meta():
        model = cls(**config)
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    torch.manual_seed(seed)
    for mod_name, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            pdtype = torch.float32 if any(k in full.split(".") for k in keep) else dtype
            t = torch.empty(p.shape, device=device, dtype=pdtype)
            if pname == "bias":
                t.zero_()
            elif pname == "gamma" or t.ndim == 1:
                t.fill_(1.0)
            elif pname == "scale_shift_table":
                t.normal_(0.0, 1.0 / math.sqrt(t.shape[-1]))
            else:  # unit-variance-preserving init, so random activations stay finite
                fan_in = max(1, t.numel() // t.shape[0])
                t.normal_(0.0, 1.0 / math.sqrt(fan_in))
            module._parameters[pname] = nn.Parameter(t, requires_grad=False)
    return model.to(device).eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def approx_forward_flops(model: nn.Module, tokens: int, text_len: int, ts_tokens: int) -> float:
    """Matmul FLOPs of one batch-1 WanTransformer3DModel forward (linear layers + attention)."""
    cfg = model.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    flops = 0.0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        n = 2.0 * mod.in_features * mod.out_features
        if ".attn2.to_k" in name or ".attn2.to_v" in name or "text_embedder" in name:
            flops += n * text_len
        elif "time_embedder" in name or "time_proj" in name:
            flops += n * ts_tokens
        else:
            flops += n * tokens
    flops += cfg.num_layers * (4.0 * tokens * tokens * inner + 4.0 * tokens * text_len * inner)
    return flops


# --- environment -------------------------------------------------------------------------------------


def version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def env_info(env: Env) -> dict[str, Any]:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    backend, fn = _AttentionBackendRegistry.get_active_backend()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "accelerate": version("accelerate"),
        "pyzmq": version("pyzmq"),
        "msgpack": version("msgpack"),
        "numpy": version("numpy"),
        "huggingface_hub": version("huggingface-hub"),
        "device": str(env.device),
        "diffusers_attention_backend": str(getattr(backend, "value", backend)),
        "diffusers_attention_fn": getattr(fn, "__name__", str(fn)),
        "DIFFUSERS_ATTN_BACKEND": os.environ.get("DIFFUSERS_ATTN_BACKEND"),
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if env.cuda:
        props = torch.cuda.get_device_properties(env.device)
        info.update(
            gpu=torch.cuda.get_device_name(env.device),
            capability=".".join(map(str, torch.cuda.get_device_capability(env.device))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            sdp_flash=torch.backends.cuda.flash_sdp_enabled(),
            sdp_mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
            sdp_cudnn=getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
            sdp_math=torch.backends.cuda.math_sdp_enabled(),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
                info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
            except Exception as exc:  # noqa: BLE001 - flags only
                info["tf32_flags"] = repr(exc)
    else:
        info["gpu"] = f"CPU only ({platform.processor() or platform.machine()})"
    return info


def sdpa_probe(env: Env, dtype: torch.dtype, heads: int, tokens: int, head_dim: int, reps: int = 3) -> dict:
    """One self-attention call as diffusers' native backend makes it ((B, L, H, D) permuted to
    (B, H, L, D), then F.scaled_dot_product_attention): time, TFLOP/s and the kernels it ran."""
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=env.device, dtype=dtype) for _ in range(3))

    def call():
        return torch.nn.functional.scaled_dot_product_attention(*(x.permute(0, 2, 1, 3) for x in (q, k, v)))

    call()
    res = timed(env, call, reps)
    res["tflops_per_s"] = r4(4.0 * tokens * tokens * head_dim * heads / max(res["median_s"], 1e-9) / 1e12)
    res["shape_BLHD"] = [1, tokens, heads, head_dim]
    res["kernels"] = top_kernels(env, call, 5)
    return res


def top_kernels(env: Env, fn: Callable[[], Any], n: int) -> list[dict[str, Any]]:
    """The `n` kernels (on CPU: ops) with the most self time while `fn` runs once, under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.cuda else [])
    with profile(activities=activities) as prof:
        fn()
        env.sync()
    rows = []
    for e in prof.key_averages():
        if env.cuda:
            if str(getattr(e, "device_type", "")).split(".")[-1] != "CUDA":
                continue
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0)
        else:
            t = e.self_cpu_time_total
        rows.append({"name": e.key[:120], "self_ms": round(t / 1000.0, 2), "calls": e.count})
    rows.sort(key=lambda r: -r["self_ms"])
    return rows[:n]


# --- stages built without setup() ------------------------------------------------------------------


def make_config(stage_name: str, kind: str, device: str, dtype: str, models: list[str], **options: Any):
    from common.config import Config

    data = {
        "models": {m_: {"path": "in-memory", "split_fraction": 0.5} for m_ in models},
        "stages": {stage_name: {"kind": kind, "device": device, "dtype": dtype, **options}},
    }
    config = Config(data)
    return config, config.stage(stage_name)


class StepClock:
    """Replaces Stage.emit: synchronises the device and stamps each step report as it is sent."""

    def __init__(self, env: Env):
        self.env = env
        self.stamps: list[tuple[int, float]] = []

    def __call__(self, msg: Any) -> None:
        if getattr(msg, "event", None) == "step":
            self.stamps.append((msg.step, self.env.now()))


def dit_stage(env: Env, dtype_name: str, sp: dict, model: nn.Module, part: str, two_experts: bool):
    """A DitStage holding `model` as its `transformer`, with the attributes setup() would set."""
    from diffusers import UniPCMultistepScheduler

    from stages.dit import DitStage
    from stages.models import PipelineInfo, torch_dtype

    config, spec = make_config("dit_bench", "dit", str(env.device), dtype_name, [sp["name"]], part=part)
    stage = DitStage(config, spec)
    stage.device = torch.device(spec.device)
    stage.dtype = torch_dtype(spec.dtype)
    stage.part = spec.options["part"]
    info = PipelineInfo(
        folder=Path("in-memory"),
        boundary_ratio=sp.get("boundary"),
        expand_timesteps=bool(sp.get("expand_timesteps", False)),
        has_transformer_2=two_experts,
        vae_scale_temporal=4,
        vae_scale_spatial=sp["spatial"],
        z_dim=model.config.in_channels,
        patch_size=tuple(model.config.patch_size),
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=sp["shift"], num_train_timesteps=1000
    )
    stage.models = {}
    stage.add_model(sp["name"], info, {"transformer": model}, dict(scheduler.config), boundary_ratio=info.boundary_ratio,
                    split_fraction=config.model(sp["name"]).get("split_fraction", 0.5))
    stage.emit = StepClock(env)  # type: ignore[method-assign]
    stage.ready = True
    return stage


def job_params(sp: dict, steps: int, guidance: float):
    from common import messages as m

    return m.JobParams(
        model=sp["name"], prompt="gpu stage check", negative_prompt="", seed=0, steps=steps,
        height=sp["height"], width=sp["width"], num_frames=sp["frames"], fps=sp["fps"], guidance_scale=guidance,
    )


def run_dit_job(env: Env, stage: Any, sp: dict, steps: int, emb: torch.Tensor, neg: torch.Tensor) -> dict:
    from common import messages as m

    msg = m.DenoiseJob(
        job_id=f"bench-{sp['name']}-{steps}", attempt=0, route=["dit_bench"],
        params=job_params(sp, steps, sp["guidance"]), prompt_embeds=emb, negative_prompt_embeds=neg,
    )
    clock: StepClock = stage.emit
    clock.stamps.clear()
    env.reset_peak()
    t0 = env.now()
    outs = stage.handle(msg)
    t1 = env.now()
    marks = [t0] + [t for _, t in clock.stamps]
    step_s = [b - a for a, b in zip(marks, marks[1:])]
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
        "output": out.type_name + (f" (next step {out.step})" if hasattr(out, "step") else ""),
        "output_finite": bool(torch.isfinite(out.latents).all()),
    }


def dit_section(env: Env, P: dict, key: str, part: str, two_experts: bool, warm_steps: int, steps: int,
                batch2: bool, reps: int) -> dict:
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

    sp = P[key]
    dtype = DTYPES[P["dtype"]]
    res: dict[str, Any] = {
        "model": sp["name"], "size": f"{sp['width']}x{sp['height']}x{sp['frames']}", "dtype": P["dtype"],
        "part": part, "guidance": sp["guidance"], "config": {k: list(v) if isinstance(v, tuple) else v
                                                              for k, v in sp["config"].items()},
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
    stage = dit_stage(env, P["dtype"], sp, model, part, two_experts)

    res["stage_warmup"] = run_dit_job(env, stage, sp, warm_steps, emb, neg)
    say(f"{key}: stage warm-up job ({warm_steps} step): {res['stage_warmup']['handle_s']}s")
    res["stage"] = run_dit_job(env, stage, sp, steps, emb, neg)
    st = res["stage"]
    say(f"{key}: stage {steps}-step job ran steps {st['steps_run']}: {st['step_s']} s/step, peak {st['peak_gib']} GiB")

    # Direct diffusers calls on the same inputs the stage gives the model at its first step.
    ch = model.config.in_channels
    lat = (1, ch, (sp["frames"] - 1) // 4 + 1, sp["height"] // sp["spatial"], sp["width"] // sp["spatial"])
    res["latents_shape"] = list(lat)
    p_t, p_h, p_w = model.config.patch_size
    tokens = (lat[2] // p_t) * (lat[3] // p_h) * (lat[4] // p_w)
    res["tokens"] = tokens
    sched = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=sp["shift"], num_train_timesteps=1000
    )
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
    def pair():
        c = model(hidden_states=x, timestep=ts1, encoder_hidden_states=cond, return_dict=False)[0]
        u = model(hidden_states=x, timestep=ts1, encoder_hidden_states=uncond, return_dict=False)[0]
        return u + scale * (c - u)

    @torch.no_grad()
    def one_forward():
        return model(hidden_states=x, timestep=ts1, encoder_hidden_states=cond, return_dict=False)[0]

    def measure_pair():
        one_forward()  # warm-up (the stage jobs above already ran these shapes)
        n = reps_that_fit(env, st.get("median_step_s"), reps)
        r = timed(env, pair, n)
        r["approx_tflops_per_s"] = round(2 * flops / r["median_s"] / 1e12, 1)
        return r

    sub(res, "direct_2x_batch1", measure_pair)
    say(f"{key}: direct cond+uncond as 2 batch-1 calls: {res['direct_2x_batch1']}")

    if batch2:
        x2 = torch.cat([x, x])
        ts2 = ts1.expand(2, -1) if ts1.ndim == 2 else ts1.expand(2)
        ctx2 = torch.cat([cond, uncond])

        @torch.no_grad()
        def pair_b2():
            c, u = model(hidden_states=x2, timestep=ts2, encoder_hidden_states=ctx2, return_dict=False)[0].chunk(2)
            return u + scale * (c - u)

        def measure_b2():
            one = res["direct_2x_batch1"].get("median_s") or 0.0
            if env.left_s() < 60 + (reps + 1) * one:
                return {"skipped": f"time budget ({env.left_s():.0f}s left)"}
            pair_b2()
            r = timed(env, pair_b2, reps_that_fit(env, one, reps))
            r["approx_tflops_per_s"] = round(2 * flops / r["median_s"] / 1e12, 1)
            return r

        sub(res, "direct_batch2", measure_b2)
        say(f"{key}: direct cond+uncond as one batch of 2: {res['direct_batch2']}")

    if key == "ti2v":  # where the time goes in one forward (kernel names show the attention kernel)
        def profile_one():
            with torch.no_grad():
                return top_kernels(env, lambda: model(hidden_states=x, timestep=ts1, encoder_hidden_states=cond,
                                                      return_dict=False), 8)

        sub(res, "forward_top_kernels", profile_one)

    d = res.get("direct_2x_batch1", {}).get("median_s")
    if d and st.get("median_step_s"):
        res["stage_over_direct"] = round(st["median_step_s"] / d, 3)
    return res


# --- VAE --------------------------------------------------------------------------------------------


def vae_section(env: Env, P: dict, key: str, dtype_name: str) -> dict:
    from diffusers import AutoencoderKLWan

    from common import messages as m
    from stages.vae import VaeStage, to_uint8

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

    config, spec = make_config("vae_bench", "vae", str(env.device), dtype_name, [sp["name"]])
    stage = VaeStage(config, spec)
    stage.device = torch.device(spec.device)
    stage.vaes = {}
    stage.add_vae(sp["name"], vae)
    stage.ready = True

    z = vae.config.z_dim
    lat = (1, z, (sp["frames"] - 1) // 4 + 1, sp["height"] // sp["spatial"], sp["width"] // sp["spatial"])
    res["latents_shape"] = list(lat)
    latents = torch.randn(lat, generator=torch.Generator().manual_seed(2))
    params = job_params(sp, 1, 1.0)

    def job(lats: torch.Tensor) -> Any:
        frames = (lats.shape[2] - 1) * 4 + 1
        p = m.JobParams(**{**params.__dict__, "num_frames": frames})
        return m.DecodeJob(job_id=f"bench-vae-{key}", attempt=0, route=["vae_bench"], params=p, latents=lats)

    # Warm-up on 2 latent frames at the full spatial size (the same kernels, a fraction of the time).
    t0 = env.now()
    stage.handle(job(latents[:, :, :2].contiguous()))
    res["warmup_2_latent_frames_s"] = r4(env.now() - t0)

    def stage_handle():
        env.reset_peak()
        t0 = env.now()
        outs = stage.handle(job(latents))
        dt = env.now() - t0
        frames = outs[0].frames
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
    def direct():
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(env.device, dtype)
        std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(env.device, dtype)
        zz = latents.to(env.device, dtype) * std + mean
        env.reset_peak()
        t0 = env.now()
        video = vae.decode(zz, return_dict=False)[0]
        dt = env.now() - t0
        out = {"decode_s": r4(dt), "peak_gib": env.peak_gib(), "video_shape": list(video.shape)}
        # What the stage adds after the decode: postprocess to float numpy on the CPU, then uint8.
        processor = stage.vaes[sp["name"]][1]
        t1 = time.perf_counter()
        frames = processor.postprocess_video(video, output_type="np")
        t2 = time.perf_counter()
        to_uint8(frames)
        t3 = time.perf_counter()
        out.update(postprocess_np_s=r4(t2 - t1), to_uint8_s=r4(t3 - t2))
        return out

    if env.left_s() < 30 + est:
        res["direct_decode"] = {"skipped": f"time budget ({env.left_s():.0f}s left, a decode ~{est:.0f}s)"}
    else:
        sub(res, "direct_decode", direct)
    say(f"{key} {dtype_name}: AutoencoderKLWan.decode directly: {res['direct_decode']}")
    return res


# --- report -------------------------------------------------------------------------------------------


def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def table(results: dict) -> str:
    env = results.get("env", {})
    lines = [
        f"**{env.get('gpu', '?')}** — torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), diffusers "
        f"{env.get('diffusers')}, transformers {env.get('transformers')}, attention backend "
        f"`{env.get('diffusers_attention_backend')}` ({env.get('diffusers_attention_fn')}); "
        f"mode {results.get('mode')}, total {results.get('total_s')} s",
        "",
        "| measurement | seconds | peak GiB | notes |",
        "| --- | --- | --- | --- |",
    ]

    def row(name: str, s: Any, peak: Any, note: str = "") -> None:
        lines.append(f"| {name} | {fmt(s, 3)} | {fmt(peak)} | {note} |")

    def err(d: Any) -> str:
        if not isinstance(d, dict):
            return "missing"
        return d.get("error") or d.get("skipped") or ""

    probe = results.get("sdpa_probe", {})
    for k, v in probe.items() if isinstance(probe, dict) else []:
        if isinstance(v, dict) and "median_s" in v:
            kern = v.get("kernels", [{}])[0].get("name", "?") if v.get("kernels") else "?"
            row(f"SDPA alone {k} {v.get('shape_BLHD')}", v["median_s"], v.get("peak_gib"),
                f"{v.get('tflops_per_s')} TFLOP/s; kernel `{kern[:60]}`")
    for key, label in (("ti2v", "TI2V-5B"), ("a14b", "A14B high expert")):
        d = results.get(key)
        if not isinstance(d, dict) or "stage" not in d:
            row(f"{label} DiT", None, None, err(d) or "not run")
            continue
        st = d["stage"]
        row(f"{label} {d['size']} {d['dtype']}: DitStage.handle, s/step (cond+uncond)", st.get("median_step_s"),
            st.get("peak_gib"),
            f"steps {st.get('steps_run')}: {st.get('step_s')}; weights {d.get('weights_gib')} GiB, "
            f"{d.get('params_b')}B params, {d.get('tokens')} tokens")
        a = d.get("direct_2x_batch1", {})
        row(f"{label}: diffusers direct, 2 x batch-1 forward (per step)", a.get("median_s"), a.get("peak_gib"),
            err(a) or f"runs {a.get('all_s')}; ~{a.get('approx_tflops_per_s')} TFLOP/s; "
                      f"stage/direct {d.get('stage_over_direct')}")
        if "direct_batch2" in d:
            b = d["direct_batch2"]
            row(f"{label}: diffusers direct, 1 x batch-2 forward (per step)", b.get("median_s"), b.get("peak_gib"),
                err(b) or f"runs {b.get('all_s')}; ~{b.get('approx_tflops_per_s')} TFLOP/s")
        kern = d.get("forward_top_kernels")
        if isinstance(kern, list) and kern:
            total_ms = sum(k["self_ms"] for k in kern)
            row(f"{label}: one forward under the profiler, top kernels", total_ms / 1000, None,
                "; ".join(f"`{k['name'][:50]}` {k['self_ms']} ms x{k['calls']}" for k in kern[:3]))
    for key, v in results.items():
        if not key.startswith("vae"):
            continue
        if not isinstance(v, dict) or "stage_handle" not in v:
            row(key, None, None, err(v) or "not run")
            continue
        h, dd = v["stage_handle"], v.get("direct_decode", {})
        row(f"{key} {v['size']} {v['dtype']}: VaeStage.handle", h.get("handle_s"), h.get("peak_gib"),
            err(h) or f"frames {h.get('frames_shape')} {h.get('frames_dtype')}")
        row(f"{key}: diffusers vae.decode direct", dd.get("decode_s"), dd.get("peak_gib"),
            err(dd) or f"then postprocess {dd.get('postprocess_np_s')} s + uint8 {dd.get('to_uint8_s')} s (CPU)")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes on CPU in float32 (smoke test)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="DiT dtype (default: bfloat16, float32 with --small)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="optional measurements are skipped past this many seconds (default %(default)s)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs of each direct call (default 3)")
    parser.add_argument("--only", help="comma-separated sections to run (e.g. vae22_float32,vae22_bfloat16)")
    args = parser.parse_args()

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # NaN/inf casts from random weights
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    P = dict(SMALL if args.small else REAL)
    if args.dtype:
        P["dtype"] = args.dtype
    versions = {k: version(k) for k in ("torch", "diffusers", "transformers", "huggingface-hub", "accelerate",
                                        "pyzmq", "msgpack", "numpy", "safetensors")}
    say(f"python {platform.python_version()}, packages {versions}")
    if not args.small and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --small for the CPU smoke test")
    env = Env(P["device"], args.budget_s)
    results: dict[str, Any] = {"mode": "small (CPU, tiny sizes)" if args.small else "real sizes",
                               "budget_s": args.budget_s, "versions": versions}
    try:  # fail fast (and say why) if the carried wheels do not import here
        import diffusers  # noqa: F401
        import stages.dit  # noqa: F401
        import stages.vae  # noqa: F401
    except Exception:
        traceback.print_exc()
        sys.exit("could not import diffusers / the stage modules; see the traceback above")

    only = set(args.only.split(",")) if args.only else None

    def section(name: str, fn: Callable[[], dict], need_s: float = 0.0) -> None:
        if only is not None and name not in only and name != "env":
            return
        say(f"== {name}")
        if env.left_s() < need_s:
            results[name] = {"skipped": f"time budget ({env.left_s():.0f}s left, needs ~{need_s:.0f}s)"}
            say(f"{name}: skipped, {env.left_s():.0f}s left")
            return
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            traceback.clear_frames(exc.__traceback__)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        results[name]["section_s"] = round(time.perf_counter() - t0, 1)
        env.free()
        say(f"{name}: done in {results[name]['section_s']}s; allocated now {env.alloc_gib()} GiB")

    section("env", lambda: env_info(env))
    say(json.dumps(results["env"]))

    dtype = DTYPES[P["dtype"]]

    def probes() -> dict:
        out: dict[str, Any] = {}
        for key in ("ti2v", "a14b"):
            cfg = P[key]["config"]
            sp = P[key]
            tokens = ((sp["frames"] - 1) // 4 + 1) * (sp["height"] // sp["spatial"] // 2) * (sp["width"] // sp["spatial"] // 2)
            sub(out, key, lambda: sdpa_probe(env, dtype, cfg["num_attention_heads"], tokens, cfg["attention_head_dim"]))
        return out

    section("sdpa_probe", probes)
    section("ti2v", lambda: dit_section(env, P, "ti2v", "all", False, 1, 3, True, args.reps))
    section("vae22_float32", lambda: vae_section(env, P, "vae22", "float32"), need_s=30)
    section("vae21_float32", lambda: vae_section(env, P, "vae21", "float32"), need_s=20)
    section("a14b", lambda: dit_section(env, P, "a14b", "high", True, 1, 4, False, args.reps), need_s=60)
    for dt in P["vae_dtypes"][1:]:
        for key in ("vae22", "vae21"):
            prev = results.get(f"{key}_float32", {}).get("section_s", 30.0)
            section(f"{key}_{dt}", lambda key=key, dt=dt: vae_section(env, P, key, dt), need_s=15 + prev)

    results["total_s"] = round(time.perf_counter() - START, 1)
    md = table(results)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "gpu_stage_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (Path(out_dir) / "gpu_stage_check.md").write_text(md + "\n")
    print("\n" + md, flush=True)


if __name__ == "__main__":
    main()
