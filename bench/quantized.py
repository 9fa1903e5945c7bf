"""Quantized compute (`compute_dtype`, stages/quantize.py) against the exact path, on the same weights.

For each model (TI2V-5B at 1280x704x121, the T2V-A14B expert at 832x480x81; random weights built
at real size on the GPU, as bench/gpu_stage_check.py does), one conditional forward pass of
`WanTransformer3DModel` in the stage dtype (bf16), then the same weights quantized for each
compute type the card has (fp8 on capability 8.9+, int8 on 8.0+), through the stage's own
`stages.quantize.quantize`: the median seconds per pass, the speed-up, the peak memory, and how
far the output is from the exact one (relative RMS error and PSNR over the output's range). Random
weights give no picture to judge, so the output error is the figure; the suite checks the frames
(tests/test_compute.py).

    python3 bench/quantized.py               # on a GPU, about 2-3 minutes on an H200
    python3 bench/quantized.py --small       # tiny sizes on the CPU, int8 only (a smoke test)

Results go to $OUT (or --out) as quantized.json and quantized.md. On a lent machine, carry the
wheels the way bench/gpu_stage_check.py says, plus torchao (`pip download --no-deps torchao==0.16.0`).
"""

from __future__ import annotations

import argparse
import copy
import functools
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

from bench.gpu.clock import Env, say, timed  # noqa: E402
from bench.gpu.sizes import DTYPES, REAL, SMALL, latent_shape  # noqa: E402
from bench.gpu.weights import build_random  # noqa: E402


def kinds_here(device: torch.device) -> list[str]:
    if device.type == "cpu":
        return ["int8"]
    cap = torch.cuda.get_device_capability(device)
    return [k for k, need in (("fp8", (8, 9)), ("int8", (8, 0))) if cap >= need]


def error(out: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    x, y = out.detach().float().cpu(), ref.detach().float().cpu()
    mse = float(((x - y) ** 2).mean())
    span = float(y.max() - y.min()) or 1.0
    rel = math.sqrt(mse) / (float(y.pow(2).mean().sqrt()) or 1.0)
    return {"relative_rms_error": round(rel, 5),
            "psnr_db": None if mse == 0 else round(10 * math.log10(span ** 2 / mse), 2),
            "all_finite": bool(torch.isfinite(x).all())}


def measure(env: Env, P: dict[str, Any], key: str, reps: int) -> dict[str, Any]:
    from diffusers import WanTransformer3DModel

    from stages.quantize import quantize

    sp = P[key]
    dtype = DTYPES[P["dtype"]]
    cfg = sp["config"]
    model = build_random(WanTransformer3DModel, cfg, env.device, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(latent_shape(sp, cfg["in_channels"]), generator=g).to(env.device, dtype)
    text = torch.randn(1, P["text_len"], P["text_dim"], generator=g).to(env.device, dtype)
    t = torch.tensor([500.0], device=env.device)

    def forward(m: Any) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = m(hidden_states=latents, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            return out

    ref = forward(model)  # warm-up, and the exact output
    res: dict[str, Any] = {"model": sp["name"], "size": f"{sp['width']}x{sp['height']}x{sp['frames']}",
                           "dtype": P["dtype"], "exact": timed(env, functools.partial(forward, model), reps)}
    for kind in kinds_here(env.device):
        q = copy.deepcopy(model)
        layers = quantize(q, kind)
        out = forward(q)  # warm-up
        res[kind] = {"layers": layers, **timed(env, functools.partial(forward, q), reps), **error(out, ref)}
        res[kind]["speedup"] = round(res["exact"]["median_s"] / res[kind]["median_s"], 3)
        say(f"{key} {kind}: {res[kind]}")
        del q, out
        env.free()
    del model
    env.free()
    return res


def table(results: dict[str, Any]) -> str:
    rows = ["| model | size | compute | s / pass | speed-up | rel. RMS error | PSNR dB | peak GiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for res in results["models"]:
        if "error" in res:
            rows.append(f"| {res.get('model', '?')} | | error: {res['error'][:80]} | | | | | |")
            continue
        e = res["exact"]
        rows.append(f"| {res['model']} | {res['size']} | {res['dtype']} (exact) | {e['median_s']} | 1 | 0 | - | "
                    f"{e['peak_gib']} |")
        for kind in ("fp8", "int8"):
            if kind in res:
                r = res[kind]
                rows.append(f"| {res['model']} | {res['size']} | {kind} | {r['median_s']} | {r['speedup']} | "
                            f"{r['relative_rms_error']} | {r['psnr_db']} | {r['peak_gib']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes on the CPU in float32 (smoke test)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = parser.parse_args()
    P = dict(SMALL if args.small else REAL)
    if not args.small and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --small for the CPU smoke test")
    env = Env(P["device"], 900.0)
    results: dict[str, Any] = {"mode": "small (CPU, tiny sizes)" if args.small else "real sizes",
                               "device": torch.cuda.get_device_name() if env.cuda else "cpu", "models": []}
    for key in ("ti2v", "a14b"):
        try:
            results["models"].append(measure(env, P, key, args.reps))
        except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
            results["models"].append({"model": P[key]["name"], "error": f"{type(exc).__name__}: {exc}"[:300]})
    md = table(results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quantized.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "quantized.md").write_text(md + "\n")
    print(md, flush=True)


if __name__ == "__main__":
    main()
