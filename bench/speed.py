"""The DiT's speed levers on one GPU, each against the exact path on the same random weights.

For T2V-A14B (one expert at 832x480x81) and TI2V-5B (1280x704x121), with random weights built at
real size on the card (bench/gpu/weights.py; random weights give no picture, so quality is the
output's PSNR against the exact path's, over the latents' range), a short job of `--steps` steps
with guidance (two passes per step) through our DitStage (`handle`, as a stage process runs it):

- `eager`: bf16, the exact path; and diffusers' WanPipeline on the same model and inputs (direct);
- `step_cache`: First Block Cache at the catalog's default threshold (stages/caching.py): passes
  skipped, time saved;
- `fp8` (or `int8` where the card has no fp8): torchao quantized block matmuls (stages/quantize.py);
- `compiled`: torch.compile of the repeated block (stages/compilation.py), warmed up at the job's
  size first (compile time and the warm-up's eager/compiled max |difference| reported), and
  WanPipeline on the same compiled model; then `fp8_compiled`, the quantized copy compiled too.

Per lever: seconds per DiT pass (the job's median step / 2) and per job, peak memory, PSNR of the
job's output latents against the eager job's, and the pass's share of the bf16 matmul ceiling
(FLOPs counted from the model config: bench/gpu/weights.py approx_forward_flops; H200 dense bf16
about 989 TFLOP/s, /work/.library/device/H200.md). Not measured yet: batching several jobs into
one pass, and two DiT processes sharing one card.

    python3 bench/speed.py            # on an H200: about 6-8 minutes, well under 10
    python3 bench/speed.py --small    # tiny sizes on the CPU in seconds (int8, the `eager` backend,
                                      # no int8_compiled)

Results: speed.json (speed_small.json with --small) in --out, else $OUT, else bench/results/.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.gpu.clock import Env, r4, say, sub  # noqa: E402
from bench.gpu.dit import run_pipeline  # noqa: E402
from bench.gpu.sizes import DTYPES, REAL, SMALL, latent_shape  # noqa: E402
from bench.gpu.stages import StepClock, dit_stage, job_params, make_config  # noqa: E402
from bench.gpu.weights import approx_forward_flops, build_random  # noqa: E402
from common import catalog  # noqa: E402
from common import messages as m  # noqa: E402

BF16_PEAK_FLOPS = 989e12  # H200 (SXM) dense bf16, the datasheet's figure
NOT_MEASURED = ["batching (n jobs of one size in one DiT pass)", "two DiT processes sharing one card"]
DEFAULT_THRESHOLD = float(catalog.CACHE_FIELD_BY_NAME["threshold"].default)


class Clock(StepClock):
    """StepClock, keeping the stage's `cache` report too."""

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        self.cache: m.StageReport | None = None

    def emit(self, report: m.Message) -> None:
        super().emit(report)
        if isinstance(report, m.StageReport) and report.event == "cache":
            self.cache = report

    def cache_report(self) -> m.StageReport | None:
        return self.cache


def lever(env: Env, out: dict[str, Any], key: str, fn: Any, need_s: float) -> None:
    """`sub` when the run's budget has `need_s` left, else a `skipped` entry."""
    if env.left_s() < need_s:
        out[key] = {"skipped": f"time budget ({env.left_s():.0f} s left, needs ~{need_s:.0f} s)"}
    else:
        sub(out, key, fn)
    say(f"{out.get('model')} {key}: {out[key]}")


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float | None:
    """PSNR over the reference's range; None where the two are identical."""
    x, y = out.detach().double().cpu(), ref.detach().double().cpu()
    mse = float(((x - y) ** 2).mean())
    span = float(y.max() - y.min()) or 1.0
    return None if mse == 0 else round(10 * math.log10(span ** 2 / mse), 2)


def job(env: Env, stage: Any, clock: Clock, sp: dict[str, Any], steps: int, emb: torch.Tensor, neg: torch.Tensor,
        flops: float, cache: dict[str, Any] | None = None, counter: Any = None) -> tuple[dict[str, Any], torch.Tensor]:
    """One job through `stage.handle`: per-pass and per-job seconds, peak memory; its latents. With the
    compiled blocks' `counter` (stages/compilation.py CountingBackend): how many block calls ran compiled."""
    calls = counter.calls if counter is not None else 0
    params = job_params(sp, steps, sp["guidance"])
    params.cache = cache
    msg = m.DenoiseJob(job_id=f"speed-{sp['name']}", attempt=0, route=["dit_bench"], params=params,
                       prompt_embeds=emb, negative_prompt_embeds=neg)
    clock.stamps.clear()
    clock.cache = None
    env.reset_peak()
    t0 = env.now()
    out = stage.handle(msg)[0]
    t1 = env.now()
    marks = [t0] + [t for _, t in clock.stamps]
    step_s = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    per_pass = statistics.median(step_s) / 2  # guidance: a conditional and an unconditional pass per step
    res: dict[str, Any] = {"steps": steps, "job_s": r4(t1 - t0), "step_s": [r4(s) for s in step_s],
                           "pass_s": r4(per_pass), "peak_gib": env.peak_gib(),
                           "bf16_ceiling_pct": round(100 * flops / per_pass / BF16_PEAK_FLOPS, 1)}
    if counter is not None:
        res["compiled_block_calls"] = counter.calls - calls  # blocks x passes when the whole job ran compiled
    report = clock.cache_report()
    if report is not None:
        res["passes"], res["passes_skipped"] = report.total_steps, report.step
    return res, out.latents


def measure(env: Env, P: dict[str, Any], key: str, steps: int, backend: str, quantized: str,
            cache_steps: int = 8, small: bool = False) -> dict[str, Any]:
    from diffusers import WanTransformer3DModel

    from stages import compilation, quantize

    sp = P[key]
    dtype = DTYPES[P["dtype"]]
    model = build_random(WanTransformer3DModel, sp["config"], env.device, dtype)
    lat = latent_shape(sp, model.config.in_channels)
    p = model.config.patch_size
    tokens = (lat[2] // p[0]) * (lat[3] // p[1]) * (lat[4] // p[2])
    flops = approx_forward_flops(model, tokens, P["text_len"], tokens if sp.get("expand_timesteps") else 1)
    res: dict[str, Any] = {"model": sp["name"], "size": f"{sp['width']}x{sp['height']}x{sp['frames']}",
                           "dtype": P["dtype"], "tokens": tokens, "flop_per_pass": flops,
                           "tflop_per_pass": round(flops / 1e12, 3), "steps": steps, "guidance": sp["guidance"]}
    say(f"{key}: {res['size']}, {tokens} tokens, {flops / 1e12:.1f} TFLOP per pass (linear + attention)")
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(1, P["text_len"], P["text_dim"], generator=gen).to(dtype)
    neg = torch.randn(1, P["text_len"], P["text_dim"], generator=gen).to(dtype)
    clock = Clock(env)
    stage = dit_stage(env, P["dtype"], sp, model, "all", False, clock)
    job(env, stage, clock, sp, 1, emb, neg, flops)  # warm-up: kernels, allocator
    res["eager"], exact = job(env, stage, clock, sp, steps, emb, neg, flops)
    say(f"{key} eager: {res['eager']}")

    def direct() -> dict[str, Any]:
        out, latents = run_pipeline(env, sp, model, False, steps, steps, emb, neg)
        out["pass_s"] = r4(statistics.median(out["step_s"]) / 2)
        out["psnr_db_vs_eager"] = psnr(latents, exact.float())
        return out

    job_s = float(res["eager"]["job_s"] or 0.0)
    lever(env, res, "diffusers_direct", direct, 1.5 * job_s)

    step_s = 2 * float(res["eager"]["pass_s"] or 0.0)

    def cached() -> dict[str, Any]:
        # More steps than the other jobs where the budget allows (a cache skips where consecutive
        # steps are close), with an eager job of as many steps as its reference.
        n = cache_steps if 2 * cache_steps * step_s < 0.15 * env.left_s() else steps
        r, latents = job(env, stage, clock, sp, n, emb, neg, flops,
                         cache={"method": "first_block", "threshold": DEFAULT_THRESHOLD})
        ref, ref_latents = job(env, stage, clock, sp, n, emb, neg, flops) if n != steps else (res["eager"], exact)
        r["threshold"], r["psnr_db_vs_eager"] = DEFAULT_THRESHOLD, psnr(latents, ref_latents)
        r["eager_job_s"], r["saved_s"] = ref["job_s"], r4(ref["job_s"] - r["job_s"])
        return r

    lever(env, res, "step_cache", cached, 4 * job_s)
    job(env, stage, clock, sp, 1, emb, neg, flops)  # a job without a cache: the hooks come off the expert

    qmodel: Any = None

    def quantized_job(compiled: bool) -> dict[str, Any]:
        nonlocal qmodel
        if qmodel is None:
            qmodel = copy.deepcopy(model)
            quantize.quantize(qmodel, quantized)
        qclock = Clock(env)
        qstage = dit_stage(env, P["dtype"], sp, qmodel, "all", False, qclock)
        extra: dict[str, Any] = {}
        if compiled:
            extra = compile_for(qstage, qmodel)
        job(env, qstage, qclock, sp, 1, emb, neg, flops)
        r, latents = job(env, qstage, qclock, sp, steps, emb, neg, flops, counter=extra.pop("counter", None))
        return {**r, **extra, "psnr_db_vs_eager": psnr(latents, exact)}

    def compile_for(on: Any, expert: Any) -> dict[str, Any]:
        _, spec = make_config("dit_bench", "dit", str(env.device), P["dtype"], [sp["name"]], compile=True,
                              compile_backend=backend, compile_cache_dir=str(Path(os.environ.get(
                                  "WAN_BENCH_COMPILE_CACHE", "/tmp/wan-speed-compile-cache"))))
        compiler = compilation.StageCompile.for_spec(on.config, spec)
        compiler.compile(expert)
        info = on.models[sp["name"]]["info"]
        size = compilation.size_of(info, sp["frames"], sp["height"], sp["width"])
        compiler.warm_up({sp["name"]: on.models[sp["name"]]}, {sp["name"]: [size]}, P["text_len"])
        report = compiler.report()
        return {"compile": {k: report[k] for k in ("backend", "compile_s", "warmup_s", "max_abs_diff", "graphs")},
                "counter": compiler.counter}

    lever(env, res, quantized, lambda: quantized_job(False), 2 * job_s)

    def compiled() -> dict[str, Any]:
        extra = compile_for(stage, model)
        job(env, stage, clock, sp, 1, emb, neg, flops)
        r, latents = job(env, stage, clock, sp, steps, emb, neg, flops, counter=extra.pop("counter"))
        return {**r, **extra, "psnr_db_vs_eager": psnr(latents, exact),
                "speedup_vs_eager": round(res["eager"]["pass_s"] / r["pass_s"], 3)}

    lever(env, res, "compiled", compiled, 60 + 2 * job_s)
    if "error" not in res["compiled"] and "skipped" not in res["compiled"]:  # the model's blocks are compiled
        lever(env, res, "diffusers_direct_compiled", direct, 1.5 * job_s)
    if not small:  # the smoke test has compiled once already
        lever(env, res, f"{quantized}_compiled", lambda: quantized_job(True), 60 + 2 * job_s)
    torch.compiler.set_stance("default")
    return res


def psnr_cell(r: dict[str, Any]) -> str:
    if "psnr_db_vs_eager" not in r:
        return "-"
    return "identical" if r["psnr_db_vs_eager"] is None else str(r["psnr_db_vs_eager"])


def table(results: dict[str, Any]) -> str:
    rows = ["| model | lever | s / pass | % bf16 ceiling | s / job | peak GiB | PSNR dB vs eager | notes |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for res in results["models"]:
        if "error" in res:
            rows.append(f"| {res.get('model', '?')} | error: {res['error'][:80]} | | | | | | |")
            continue
        for lever in ("eager", "diffusers_direct", "step_cache", "fp8", "int8", "compiled",
                      "diffusers_direct_compiled", "fp8_compiled", "int8_compiled"):
            r = res.get(lever)
            if r is None:
                continue
            if "error" in r or "skipped" in r:
                rows.append(f"| {res['model']} | {lever} | {'error' if 'error' in r else 'skipped'}: "
                            f"{r.get('error', r.get('skipped'))[:60]} | | | | | |")
                continue
            pct = r.get("bf16_ceiling_pct")
            if pct is None and r.get("pass_s"):
                pct = round(100 * res["tflop_per_pass"] * 1e12 / r["pass_s"] / BF16_PEAK_FLOPS, 1)
            notes = []
            if "passes_skipped" in r:
                notes.append(f"{r['passes_skipped']}/{r['passes']} passes skipped, {r['saved_s']} s saved")
            if "compile" in r:
                notes.append(f"compile {r['compile']['compile_s']} s, max diff {r['compile']['max_abs_diff']:.3g}")
            rows.append(f"| {res['model']} {res['size']} | {lever} | {r.get('pass_s')} | {pct} | "
                        f"{r.get('job_s', r.get('call_s'))} | {r.get('peak_gib')} | {psnr_cell(r)} | "
                        f"{'; '.join(notes)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes on the CPU (a smoke test of every lever)")
    parser.add_argument("--steps", type=int, default=None, help="steps per job (default 4; 3 with --small)")
    parser.add_argument("--cache-steps", type=int, default=8, help="steps of the step-cache job (and its eager "
                        "reference) where the budget allows; else --steps")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default inductor; eager with --small)")
    parser.add_argument("--models", default="a14b,ti2v", help="which: a14b, ti2v (comma-separated)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    P = dict(SMALL if args.small else REAL)
    if not args.small and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --small for the CPU smoke test")
    env = Env(P["device"], 570.0)
    steps = args.steps or (3 if args.small else 4)
    backend = args.backend or ("eager" if args.small else "inductor")
    cap = torch.cuda.get_device_capability() if env.cuda else (0, 0)
    quantized = "fp8" if cap >= (8, 9) else "int8"
    results: dict[str, Any] = {
        "mode": "small (CPU, tiny sizes)" if args.small else "real sizes", "weights": "random (no picture: PSNR of "
        "the output latents against the exact path's on the same weights)",
        "device": torch.cuda.get_device_name() if env.cuda else "cpu", "torch": torch.__version__,
        "compile_backend": backend, "bf16_ceiling_tflops": BF16_PEAK_FLOPS / 1e12, "not_measured": NOT_MEASURED,
        "models": []}
    for key in [k for k in args.models.split(",") if k in ("a14b", "ti2v")]:
        if env.left_s() < 120 and not args.small:
            results["models"].append({"model": P[key]["name"], "error": "skipped: time budget"})
            continue
        try:
            results["models"].append(measure(env, P, key, steps, backend, quantized, args.cache_steps,
                                               args.small))
        except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
            results["models"].append({"model": P[key]["name"], "error": f"{type(exc).__name__}: {exc}"[:300]})
    md = table(results)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    name = "speed_small" if args.small else "speed"
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{name}.md").write_text(md + "\n\nNot measured yet: " + "; ".join(NOT_MEASURED) + ".\n")
    print(md, flush=True)


if __name__ == "__main__":
    main()
