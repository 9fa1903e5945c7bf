"""What a run ran on (package versions, attention backend, GPU flags), an SDPA probe, top kernels."""

from __future__ import annotations

import os
import platform
import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch

from bench.gpu.clock import Env, r4, timed


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


def sdpa_probe(env: Env, dtype: torch.dtype, heads: int, tokens: int, head_dim: int, reps: int = 3) -> dict[str, Any]:
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
            device_t = getattr(e, "self_device_time_total", None)  # older torch: self_cuda_time_total
            t = getattr(e, "self_cuda_time_total", 0) if device_t is None else device_t
        else:
            t = e.self_cpu_time_total
        rows.append({"name": e.key[:120], "self_ms": round(t / 1000.0, 2), "calls": e.count})
    rows.sort(key=lambda r: -r["self_ms"])
    return rows[:n]
