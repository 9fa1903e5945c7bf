"""Batching in the DiT stage (`max_batch`, stages/batching.py): jobs per minute at batch 1, 2, 4, 8.

Issue 14's batching figure, on one GPU with random weights at real size (no checkpoint; the suite
checks the frames, tests/test_batching.py): T2V-A14B drafts at 832x480x17 through the high-noise
expert's part of our DiT stage (`DitStage`, part "high", in process, the expert built by
bench/gpu/weights.build_random at the released config), with the single-gpu profile's draft
recipe (20 UniPC steps, shift 12, guidance 4: two passes a step). Batch 1 is `DitStage.handle`,
one job after another (today's path); batch N is `DitStage.handle_batch` of N jobs with other
seeds and prompts (what the runtime hands it when N compatible jobs are queued). For each: seconds
per batch (median of `--reps`), jobs per minute, the peak memory, and how far the first job's
latents at the hand-off are from the same job run alone (max |diff|, PSNR over their range: a
batch picks other kernels, so the last bits may differ).

    python3 bench/batching.py                 # on a GPU with ~40 GB free, about 3-5 minutes on an H200
    python3 bench/batching.py --small         # tiny sizes on the CPU, float32 (a smoke test)

Results go to $OUT (or --out) as batching.json and batching.md (batching_cpu_small.* with --small).
On a lent machine, carry the wheels as bench/gpu_stage_check.py says. No GPU was lent to the
session that wrote it: the GPU figures are still to be measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.gpu.clock import Env, max_abs_diff, med, r4, say  # noqa: E402
from bench.gpu.sizes import DTYPES, REAL, SMALL  # noqa: E402
from bench.gpu.stages import StepClock, dit_stage, job_params  # noqa: E402
from bench.gpu.weights import build_random  # noqa: E402
from common import messages as m  # noqa: E402

BATCHES = (1, 2, 4, 8)
FRAMES = 17
STEPS = 20  # the single-gpu profile's t2v-A14B draft: 20 steps, shift 12, guidance 4 / 3
GUIDANCE = 4.0


def jobs(P: dict[str, Any], sp: dict[str, Any], count: int, steps: int, device: torch.device,
         dtype: torch.dtype) -> list[m.DenoiseJob]:
    """`count` compatible draft jobs: seeds 0.., each its own random prompt embeddings."""
    out = []
    for i in range(count):
        p = job_params(sp, steps, GUIDANCE)
        p.seed, p.shift, p.guidance_scale_2 = i, sp["shift"], 3.0
        g = torch.Generator().manual_seed(1000 + i)
        embeds = [torch.randn(1, P["text_len"], P["text_dim"], generator=g).to(device, dtype) for _ in range(2)]
        out.append(m.DenoiseJob(job_id=f"bench{i}", attempt=1, route=["dit_bench"], params=p,
                                prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1]))
    return out


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float | None:
    x, y = a.detach().double().cpu(), ref.detach().double().cpu()
    mse = float(((x - y) ** 2).mean())
    span = float(y.max() - y.min()) or 1.0
    return None if mse == 0 else round(10 * math.log10(span**2 / mse), 2)


def run(stage: Any, msgs: list[m.DenoiseJob]) -> list[m.Message]:
    """One batch (or, for one job, the lone path); the first job's hand-off."""
    if len(msgs) == 1:
        return stage.handle(msgs[0])
    results = stage.handle_batch(msgs)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results[0]


def measure(env: Env, P: dict[str, Any], steps: int, reps: int, batches: tuple[int, ...]) -> dict[str, Any]:
    from diffusers import WanTransformer3DModel

    sp = dict(P["a14b"], frames=FRAMES) if P["device"] == "cuda" else dict(P["a14b"])
    dtype = DTYPES[P["dtype"]]
    model = build_random(WanTransformer3DModel, sp["config"], env.device, dtype)
    stage = dit_stage(env, P["dtype"], sp, model, part="high", two_experts=True, clock=StepClock(env))
    per_frame = (sp["height"] // sp["spatial"] // 2) * (sp["width"] // sp["spatial"] // 2)
    res: dict[str, Any] = {"model": sp["name"], "expert": "transformer (high-noise, part high)",
                           "size": f"{sp['width']}x{sp['height']}x{sp['frames']}", "dtype": P["dtype"],
                           "steps": steps, "guidance": GUIDANCE,
                           "tokens_per_job": ((sp["frames"] - 1) // 4 + 1) * per_frame, "batches": []}
    pool = jobs(P, sp, max(batches), steps, env.device, dtype)
    run(stage, pool[:1])  # warm-up (kernels, allocator)
    lone = None
    for size in batches:
        if env.left_s() < 60:
            res["batches"].append({"batch": size, "skipped": "out of time"})
            continue
        times = []
        env.reset_peak()
        out: list[m.Message] = []
        for _ in range(reps):
            t0 = env.now()
            out = run(stage, pool[:size])
            times.append(env.now() - t0)
        first = out[0]
        assert isinstance(first, m.DenoiseJob) and first.latents is not None
        if lone is None:
            lone = first.latents
        seconds = med(times)
        row = {"batch": size, "seconds": r4(seconds), "all_s": [r4(t) for t in times],
               "jobs_per_minute": round(60 * size / seconds, 2), "peak_gib": env.peak_gib(),
               "handoff_step": first.step,
               "vs_lone": {**max_abs_diff(first.latents, lone), "psnr_db": psnr(first.latents, lone)}}
        res["batches"].append(row)
        say(f"batch {size}: {row['seconds']} s, {row['jobs_per_minute']} jobs/min, peak {row['peak_gib']} GiB")
        env.free()
    base = next((b for b in res["batches"] if b.get("batch") == 1 and "jobs_per_minute" in b), None)
    for row in res["batches"]:
        if base is not None and "jobs_per_minute" in row:
            row["speedup"] = round(row["jobs_per_minute"] / base["jobs_per_minute"], 3)
    return res


def table(res: dict[str, Any]) -> str:
    handoff = next((row["handoff_step"] for row in res["batches"] if "handoff_step" in row), "?")
    rows = [f"{res['model']} {res['expert']}, {res['size']} ({res['tokens_per_job']} tokens a job), {res['dtype']}, "
            f"{res['steps']} steps of which this part runs {handoff}, guidance {res['guidance']}",
            "", "| batch | s / batch | jobs / min | speed-up | peak GiB | first job vs alone: max abs diff | PSNR dB |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in res["batches"]:
        if "seconds" not in row:
            rows.append(f"| {row['batch']} | {row.get('skipped', row.get('error', ''))} | | | | | |")
            continue
        v = row["vs_lone"]
        rows.append(f"| {row['batch']} | {row['seconds']} | {row['jobs_per_minute']} | {row.get('speedup')} | "
                    f"{row['peak_gib']} | {v.get('max_abs_diff')} | {v.get('psnr_db') or 'identical'} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes on the CPU in float32 (smoke test)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = parser.parse_args()
    P = SMALL if args.small else REAL
    if not args.small and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --small for the CPU smoke test")
    env = Env(P["device"], args.budget_s)
    try:
        res = measure(env, P, args.steps, args.reps, tuple(args.batches))
    except Exception as exc:  # noqa: BLE001 - a benchmark reports what failed
        res = {"model": P["a14b"]["name"], "error": f"{type(exc).__name__}: {exc}"[:500], "batches": []}
        raise
    finally:
        res["device"] = torch.cuda.get_device_name() if env.cuda else "cpu"
        res["mode"] = "small (CPU, tiny sizes)" if args.small else "real sizes, random weights"
        if args.out:
            stem = "batching_cpu_small" if args.small else "batching"
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
            if "error" not in res:
                (args.out / f"{stem}.md").write_text(table(res) + "\n")
    print(table(res), flush=True)


if __name__ == "__main__":
    main()
