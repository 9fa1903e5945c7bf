"""Real-size GPU check of the DiT and VAE stages, with random weights, against diffusers called directly.

Builds the models at their real sizes straight on the GPU (parameters made on the meta device,
then materialised on the GPU in bf16 with the fp32 modules diffusers' `from_pretrained` keeps in
fp32; random values, no checkpoint), hands them to `stages.dit.DitStage` / `stages.vae.VaeStage`
(set up with no models of their own) through `add_model` / `add_vae`, and measures:

1. TI2V-5B, 1280x704, 121 frames, guidance 5 (cond + uncond): seconds per denoising step through
   `DitStage.handle` (part "all", 3 steps after a 1-step warm-up job); the same job through
   diffusers' `WanPipeline` on the same weights, embeddings and seed (its latents compared with the
   stage's: max |diff|); and the forward passes called directly on `WanTransformer3DModel`: (a) cond
   and uncond as two batch-1 calls, as the stage does, (b) one batch of 2. Median of 3 after a warm-up.
2. T2V-A14B high-noise expert, 832x480, 81 frames, guidance 4: `DitStage` with part "high" (two
   experts, boundary 0.875, only `transformer` loaded) and a 4-step job, of which the first 3 steps
   are high-noise steps (what `dit_high` runs), after a 1-step warm-up job; WanPipeline stopped
   after the same steps, and direct (a), as above.
3. VAE decode through `VaeStage.handle` (un-normalise, decode, postprocess, uint8) and
   `AutoencoderKLWan.decode` directly, then the pipeline's post-processing (the uint8 frames
   compared: max |diff|): the Wan2.2 VAE on 720p/121-frame latents (1,48,31,44,80) and
   the Wan2.1 VAE on 480p/81-frame latents (1,16,21,60,104), in float32 (what diffusers recommends);
   then in bf16 if the time budget allows.

Every measurement records the peak GPU memory. Each section is independent (an error is printed
and the run goes on). A markdown table is printed at the end; with `--out DIR` (default $OUT), the
full results go to DIR/gpu_stage_check.json and the table to DIR/gpu_stage_check.md. The parts
live in `bench/gpu/` (sizes, clock, weights, probe, stages, dit, vae, report).

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
import functools
import json
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# After the sys.path line above, so that `python bench/gpu_stage_check.py` finds the project's packages.
import torch  # noqa: E402

from bench.gpu.clock import (  # noqa: E402 - the time budget counts from this import
    START,
    Env,
    say,
    sub,
)
from bench.gpu.dit import dit_section  # noqa: E402
from bench.gpu.probe import env_info, sdpa_probe, version  # noqa: E402
from bench.gpu.report import table  # noqa: E402
from bench.gpu.sizes import DTYPES, REAL, SMALL  # noqa: E402
from bench.gpu.vae import vae_section  # noqa: E402


def comparisons(results: dict[str, Any]) -> dict[str, Any]:
    """Every stage-vs-diffusers output comparison of the run, by section: max |diff| (None: not compared)."""
    out: dict[str, Any] = {}
    for name, res in results.items():
        if not isinstance(res, dict):
            continue
        for part, key in (("diffusers_pipeline", "vs_stage"), ("direct_decode", "vs_stage_uint8")):
            d = (res.get(part) or {}).get(key) if isinstance(res.get(part), dict) else None
            if part in res:
                out[name] = d.get("max_abs_diff") if isinstance(d, dict) else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes on CPU in float32 (smoke test)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="DiT dtype (default: bfloat16, float32 with --small)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="optional measurements are skipped past this many seconds (default %(default)s)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs of each direct call (default 3)")
    parser.add_argument("--only", help="comma-separated sections to run (e.g. vae22_float32,vae22_bfloat16)")
    parser.add_argument("--attention", default="sdpa", choices=["auto", "sdpa", "flash"],
                        help="the DiT stages' attention setting, as in a profile (default sdpa)")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help="folder for gpu_stage_check.json and .md (default $OUT; none: print only)")
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

        import stages.dit
        import stages.vae  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure: say why and stop
        traceback.print_exc()
        sys.exit("could not import diffusers / the stage modules; see the traceback above")

    only = set(args.only.split(",")) if args.only else None

    def section(name: str, fn: Callable[[], dict[str, Any]], need_s: float = 0.0) -> None:
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

    def probes() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("ti2v", "a14b"):
            cfg = P[key]["config"]
            sp = P[key]
            latent_frames = (sp["frames"] - 1) // 4 + 1
            tokens = latent_frames * (sp["height"] // sp["spatial"] // 2) * (sp["width"] // sp["spatial"] // 2)
            sub(out, key, functools.partial(sdpa_probe, env, dtype, cfg["num_attention_heads"], tokens,
                                            cfg["attention_head_dim"]))
        return out

    section("sdpa_probe", probes)
    section("ti2v", lambda: dit_section(env, P, "ti2v", "all", False, 1, 3, True, args.reps, args.attention))
    section("vae22_float32", lambda: vae_section(env, P, "vae22", "float32"), need_s=30)
    section("vae21_float32", lambda: vae_section(env, P, "vae21", "float32"), need_s=20)
    section("a14b", lambda: dit_section(env, P, "a14b", "high", True, 1, 4, False, args.reps, args.attention),
            need_s=60)
    for dt in P["vae_dtypes"][1:]:
        for key in ("vae22", "vae21"):
            prev = results.get(f"{key}_float32", {}).get("section_s", 30.0)
            section(f"{key}_{dt}", functools.partial(vae_section, env, P, key, dt), need_s=15 + prev)

    results["comparisons_max_abs_diff"] = comparisons(results)
    results["total_s"] = round(time.perf_counter() - START, 1)
    md = table(results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_stage_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (args.out / "gpu_stage_check.md").write_text(md + "\n")
    print("\n" + md, flush=True)


if __name__ == "__main__":
    main()
