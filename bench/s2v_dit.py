"""One S2V-14B DiT denoising pass at release size: our stage's model against the official class.

Builds `stages.s2v.transformer.WanS2VTransformer` at the release's config (dim 5120, 40 layers,
~16B parameters) with random bf16 weights straight on the GPU (bench/gpu/weights.py), then the
official `WanModel_S2V` (the `wan22` package, loaded by tests/wan_reference.py with its attention
on PyTorch SDPA) holding the same weights by name. Inputs of one clip at 1024x704 and 80 frames:
20 noisy latent frames (88x128), the reference frame, the 19-frame motion window, 25 wav2vec2
states x 1024 per audio frame, a pose latent; about 63k tokens per pass. For each: the median
seconds of a conditional pass and the peak memory; and the two outputs' difference (max |diff|,
relative RMS). The official code runs under bf16 autocast, as its generate() does; ours in bf16
with the float32 modules diffusers keeps in float32.

    python3 bench/s2v_dit.py            # on a GPU (H200: about 3-4 minutes)
    python3 bench/s2v_dit.py --small    # tiny sizes on the CPU in float32 (equal bit for bit)

Carry the wheels bench/gpu_stage_check.py lists plus `wan22` (py3-none-any, --no-deps) and einops.
Results to $OUT (or --out): s2v_dit.json and s2v_dit.md.
"""

from __future__ import annotations

import argparse
import contextlib
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
from bench.gpu.weights import build_random  # noqa: E402

# The release's config.json (Wan-AI/Wan2.2-S2V-14B), in the official constructor's names.
RELEASE: dict[str, Any] = {
    "cond_dim": 16, "audio_dim": 1024, "num_audio_token": 4, "enable_adain": True, "adain_mode": "attn_norm",
    "audio_inject_layers": [0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39], "zero_init": True,
    "zero_timestep": True, "enable_motioner": False, "add_last_motion": True, "enable_framepack": True,
    "framepack_drop_mode": "padd", "in_dim": 16, "out_dim": 16, "dim": 5120, "ffn_dim": 13824, "freq_dim": 256,
    "text_dim": 4096, "num_heads": 40, "num_layers": 40,
}
REAL: dict[str, Any] = {"device": "cuda", "dtype": torch.bfloat16, "config": RELEASE, "width": 1024, "height": 704,
        "latent_frames": 20, "motion": (73, 19), "text_len": 512}


def small() -> dict[str, Any]:
    from stages.tiny_models import TINY_S2V_CONFIG

    return {"device": "cpu", "dtype": torch.float32, "config": dict(TINY_S2V_CONFIG), "width": 64, "height": 64,
            "latent_frames": 2, "motion": (5, 2), "text_len": 7}


def inputs(P: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    cfg = P["config"]
    g = torch.Generator().manual_seed(0)
    f, h, w = P["latent_frames"], P["height"] // 8, P["width"] // 8

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    return {"x": rnd(cfg["in_dim"], f, h, w), "ref": rnd(cfg["in_dim"], 1, h, w),
            "motion": rnd(cfg["in_dim"], P["motion"][1], h, w), "audio": rnd(1, 25, cfg["audio_dim"], 4 * f),
            "context": rnd(P["text_len"], cfg["text_dim"]), "pose": rnd(cfg["in_dim"], f, h, w)}


def error(out: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    x, y = out.detach().float().cpu(), ref.detach().float().cpu()
    d = (x - y).abs()
    rms = float(y.pow(2).mean().sqrt()) or 1.0
    return {"identical": bool(torch.equal(x, y)), "max_abs_diff": float(d.max()),
            "relative_rms_error": round(math.sqrt(float(((x - y) ** 2).mean())) / rms, 6),
            "all_finite": bool(torch.isfinite(x).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes on the CPU in float32 (smoke test)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = parser.parse_args()
    P = small() if args.small else REAL
    if not args.small and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --small for the CPU smoke test")
    from stages.s2v.transformer import WanS2VTransformer
    from tests import wan_reference

    env = Env(P["device"], 1200.0)
    dtype = P["dtype"]
    ours = build_random(WanS2VTransformer, P["config"], env.device, dtype)
    inp = inputs(P, env.device, dtype)
    t = torch.tensor([937.0], device=env.device)
    tokens = P["latent_frames"] * (P["height"] // 16) * (P["width"] // 16)
    res: dict[str, Any] = {"mode": "small (CPU, tiny sizes)" if args.small else "release size",
                           "device": torch.cuda.get_device_name() if env.cuda else "cpu",
                           "size": f"{P['width']}x{P['height']}, {4 * P['latent_frames']} frames",
                           "noisy_tokens": tokens, "parameters": sum(p.numel() for p in ours.parameters())}

    def run_ours() -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = ours(inp["x"][None], t, inp["context"][None], inp["ref"][None], inp["motion"][None],
                                     inp["audio"], inp["pose"][None], motion_frames=P["motion"])[0]
            return out

    first = run_ours()
    res["ours"] = timed(env, run_ours, args.reps)
    say(f"ours: {res['ours']}")
    reference_cls = wan_reference.s2v_model_class()
    with torch.device(env.device):
        reference = reference_cls(**P["config"]).to(dtype).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)  # the same names and shapes
    autocast = torch.autocast("cuda", dtype=dtype) if env.cuda else contextlib.nullcontext()

    def run_reference() -> torch.Tensor:
        with torch.no_grad(), autocast:
            out: torch.Tensor = reference([inp["x"]], t=t, context=[inp["context"]], seq_len=None,
                                          ref_latents=[inp["ref"]], motion_latents=[inp["motion"]],
                                          cond_states=[inp["pose"]], audio_input=inp["audio"],
                                          motion_frames=list(P["motion"]), drop_motion_frames=False)[0]
            return out

    want = run_reference()
    res["reference"] = timed(env, run_reference, args.reps)
    res["ours_vs_reference"] = error(first, want)
    say(f"reference: {res['reference']}; difference {res['ours_vs_reference']}")
    md = "\n".join([
        "| model | size | noisy tokens | s / pass | peak GiB |", "| --- | --- | --- | --- | --- |",
        f"| ours (stages/s2v) | {res['size']} | {tokens} | {res['ours']['median_s']} | {res['ours']['peak_gib']} |",
        f"| official WanModel_S2V | {res['size']} | {tokens} | {res['reference']['median_s']} | "
        f"{res['reference']['peak_gib']} |",
        "", f"ours vs official: {res['ours_vs_reference']}"])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "s2v_dit.json").write_text(json.dumps(res, indent=1) + "\n")
        (args.out / "s2v_dit.md").write_text(md + "\n")
    print(md, flush=True)


if __name__ == "__main__":
    main()
