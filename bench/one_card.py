"""Two DiT processes on one card, or one process doing both experts: which gives more A14B jobs per minute?

Issue 14's lever 5. The dual-GPU profiles run the high-noise expert in `dit_high` and the low-noise
one in `dit_low`, so consecutive jobs pipeline: job k's low-noise steps run while job k+1's
high-noise steps do. On one card the two processes share the GPU (time-sliced, no MPS), so the
overlap may help (one process's host work hides behind the other's kernels) or hurt (context
switches, two CUDA contexts). This measures it, with random T2V-A14B experts at real size:

- **pipelined**: two OS processes on the same device, each a `DitStage` (part "high" / "low")
  holding its expert; job messages go high -> low through process queues (the ZeroMQ/shared
  memory hand-off itself costs ~10 ms at this size, bench/transport.py), N jobs submitted at once;
- **one process**: one `DitStage` (part "all") holding both experts, the same N jobs one by one.

Reported: wall seconds from the first submit to the last job's latents, jobs per minute, and the
peak device memory of each process. Guidance is on (two passes a step), as in the profiles.

    python3 bench/one_card.py                     # on a GPU with ~70 GB free (H100/H200): ~4 minutes
    python3 bench/one_card.py --small             # tiny experts on the CPU, one thread per process

Results go to $OUT (or --out) as one_card.json. The single-gpu profile keeps one process per expert
until this figure says which is better.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bench.gpu.sizes import DTYPES, REAL, SMALL  # noqa: E402


def build_stage(P: dict[str, Any], part: str, device: str, experts: tuple[str, ...]) -> Any:
    """A DitStage on `device` serving the A14B size with the named experts (random weights)."""
    from diffusers import WanTransformer3DModel

    from bench.gpu.clock import Env
    from bench.gpu.stages import StepClock, add_experts, make_config, serve
    from bench.gpu.weights import build_random
    from stages.dit import DitStage

    if device == "cpu":
        torch.set_num_threads(1)
    sp = P["a14b"]
    env = Env(device, 3600)
    config, spec = make_config("dit_bench", "dit", device, P["dtype"], [sp["name"]], part=part)
    stage = DitStage(config, spec, StepClock(env))
    stage.setup()
    assert stage.placement is not None
    dtype = DTYPES[P["dtype"]]
    models = {name: build_random(WanTransformer3DModel, sp["config"], env.device, dtype,
                                 seed=1 if name == "transformer" else 2) for name in experts}
    add_experts(stage, sp, models, two_experts=True)
    serve(stage)
    return stage


def jobs(P: dict[str, Any], n: int, steps: int) -> list[Any]:
    from common import messages as m

    sp = P["a14b"]
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, P["text_len"], P["text_dim"], generator=g).to(DTYPES[P["dtype"]])
    neg = torch.randn(1, P["text_len"], P["text_dim"], generator=g).to(DTYPES[P["dtype"]])
    out = []
    for i in range(n):
        p = m.JobParams(model=sp["name"], prompt="one card", negative_prompt="", seed=i, steps=steps,
                        height=sp["height"], width=sp["width"], num_frames=sp["frames"], fps=sp["fps"],
                        guidance_scale=sp["guidance"], guidance_scale_2=3.0)
        out.append(m.DenoiseJob(job_id=f"one-card-{i}", attempt=1, route=["dit_high", "dit_low", "vae"], params=p,
                                prompt_embeds=emb, negative_prompt_embeds=neg))
    return out


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def to_bytes(msg: Any) -> list[bytes]:
    from common import messages as m

    return [bytes(f) for f in m.encode(msg)]


def from_bytes(frames: list[bytes]) -> Any:
    from common import messages as m
    from common.wire import Limits

    return m.decode(frames, Limits())


def worker(P: dict[str, Any], part: str, device: str, inbox: Any, outbox: Any, ready: Any, peaks: Any) -> None:
    """One DiT process: its expert, then every job from `inbox` handled and passed on (the high
    part's hand-off to the low process; the low part's finish time to the main process)."""
    stage = build_stage(P, part, device, ("transformer",) if part == "high" else ("transformer_2",))
    ready.put(part)
    first = True
    while (msg := inbox.get()) is not None:
        (out,) = stage.handle(from_bytes(msg))
        sync(device)
        if first and device.startswith("cuda"):  # after the warm-up job: the peak of the timed ones
            torch.cuda.reset_peak_memory_stats()
        first = False
        outbox.put(to_bytes(out) if part == "high" else (out.job_id, time.perf_counter()))
    if part == "high":
        outbox.put(None)  # the low process stops after the last job
    peaks.put((part, peak_gib(device)))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pipelined(P: dict[str, Any], device: str, n: int, steps: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    to_high, to_low, done, ready, peaks = (ctx.Queue() for _ in range(5))
    procs = [ctx.Process(target=worker, args=(P, "high", device, to_high, to_low, ready, peaks)),
             ctx.Process(target=worker, args=(P, "low", device, to_low, done, ready, peaks))]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=1800)
        warm = jobs(P, 1, steps)[0]
        warm.job_id = "warm-up"
        to_high.put(to_bytes(warm))
        done.get(timeout=1800)
        t0 = time.perf_counter()
        for job in jobs(P, n, steps):
            to_high.put(to_bytes(job))
        ends = [done.get(timeout=3600)[1] for _ in range(n)]
        wall = max(ends) - t0
        to_high.put(None)
        peak = dict(peaks.get(timeout=600) for _ in procs)
        return {"jobs": n, "steps": steps, "wall_s": round(wall, 3), "jobs_per_min": round(60 * n / wall, 3),
                "peak_gib": peak}
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()


def one_process(P: dict[str, Any], device: str, n: int, steps: int) -> dict[str, Any]:
    stage = build_stage(P, "all", device, ("transformer", "transformer_2"))
    stage.handle(jobs(P, 1, 2)[0])
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for job in jobs(P, n, steps):
        stage.handle(job)
    sync(device)
    wall = time.perf_counter() - t0
    return {"jobs": n, "steps": steps, "wall_s": round(wall, 3), "jobs_per_min": round(60 * n / wall, 3),
            "peak_gib": peak_gib(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny experts on the CPU")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="steps per job (the high expert takes the first ones)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "results")))
    args = parser.parse_args()
    P = SMALL if args.small else REAL
    device = P["device"]
    sp = P["a14b"]
    results: dict[str, Any] = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"},
        "size": f"{sp['width']}x{sp['height']}x{sp['frames']}", "dtype": P["dtype"], "weights": "random",
    }
    print(f"pipelined: two DiT processes on {device}, {args.jobs} jobs of {args.steps} steps", flush=True)
    results["pipelined"] = pipelined(P, device, args.jobs, args.steps)
    print(results["pipelined"], flush=True)
    print(f"one process, both experts, the same {args.jobs} jobs", flush=True)
    results["one_process"] = one_process(P, device, args.jobs, args.steps)
    print(results["one_process"], flush=True)
    results["pipelined_over_one_process"] = round(
        results["pipelined"]["jobs_per_min"] / results["one_process"]["jobs_per_min"], 3)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "one_card_cpu_small.json" if args.small else "one_card.json"
    (args.out / name).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
