"""A distilled T2V-A14B draft end to end, against the same size undistilled and against diffusers direct.

Issue 12's measurement, on one GPU with random weights at real size (no checkpoint, no picture to
judge; the suite checks the frames, tests/test_distill.py):

1. **distilled**: what the draft preset runs when the profile names a step-distillation LoRA
   (broker/distill.py: 4 Euler steps at sigmas 1, .75, .5, .25 after shift 5, guidance 1 so no
   unconditional pass, the LoRA's high part on the high-noise expert and its low part on the
   low-noise one) at 832x480x81, through our stages' own code in one process: `DitStage.handle`
   (part "all", both experts, the LoRA loaded from files by the stage's LoraCache) ->
   `VaeStage.handle` (the Wan2.1 VAE, float32) -> the muxer's `write_mp4` (H.264). The text
   encoder's forward (a random umt5-xxl) is timed beside it and counted in the total.
2. **undistilled**: the same size with the profile's draft recipe without the LoRA
   (common/profiles/single-gpu.toml: 20 UniPC steps, shift 12, guidance 4 / 3: two passes a step).
3. **diffusers**: `WanPipeline` on the same two experts, VAE, embeddings and seed, with the LoRA
   files loaded by `load_lora_weights` and the distilled sigmas, then the same MP4 writer; its
   frames compared with ours (max |diff| of the uint8 frames).

What the stage processes add on top (the hand-offs over ZeroMQ and shared memory) is measured by
bench/transport.py at these sizes (under 0.1 s per job). The target of the seed is 8 s for a draft;
issue 12's goal on an H200 is under 15 s end to end (aim 10 s).

    python3 bench/draft.py               # on a GPU with ~80 GB free (H100/H200), about 5 minutes
    python3 bench/draft.py --small       # tiny sizes on the CPU, float32 (a smoke test, in the suite)

Results go to $OUT (or --out) as draft.json and draft.md. On a lent machine, carry the wheels as
bench/gpu_stage_check.py says, plus peft (`pip download --no-deps peft==0.21.2`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.gpu.clock import Env, max_abs_diff, r4, say, sub  # noqa: E402
from bench.gpu.sizes import DTYPES, REAL, SMALL  # noqa: E402
from bench.gpu.stages import StepClock, add_experts, serve  # noqa: E402
from bench.gpu.weights import build_random  # noqa: E402
from broker import distill  # noqa: E402
from common import messages as m  # noqa: E402
from common.config import Config  # noqa: E402

LORA = "lightning"


def draft_row() -> dict[str, Any]:
    """The single-gpu profile's draft preset for t2v-A14B (what runs without the LoRA)."""
    presets = tomllib.loads((ROOT / "common" / "profiles" / "single-gpu.toml").read_text())["presets"]
    row: dict[str, Any] = presets["t2v-A14B"]["draft"]
    return row


def write_lora(folder: Path, name: str, experts: dict[str, nn.Module], rank: int) -> dict[str, Any]:
    """A random rank-`rank` LoRA on every attention and FFN linear layer of each expert's blocks, in
    diffusers' format (`NAME.high` / `NAME.low`, as the Lightning LoRAs are published), and the
    JobParams.loras entry broker/loras.py would resolve it to."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    parts = {}
    for expert, model in experts.items():
        state = {}
        for mod_name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and mod_name.startswith("blocks.") and any(
                    s in mod_name for s in (".attn1.", ".attn2.", ".ffn.")):
                a = torch.randn(rank, mod.in_features, generator=g) / math.sqrt(mod.in_features)
                b = torch.randn(mod.out_features, rank, generator=g) * (0.1 / math.sqrt(rank))
                state[f"transformer.{mod_name}.lora_A.weight"] = a.to(mod.weight.dtype)
                state[f"transformer.{mod_name}.lora_B.weight"] = b.to(mod.weight.dtype)
        file = f"{name}.{'high' if expert == 'transformer' else 'low'}.safetensors"
        save_file(state, folder / file)
        sha = hashlib.sha256((folder / file).read_bytes()).hexdigest()
        parts[expert] = {"file": file, "prefix": "transformer.", "sha256": sha}
    return {"name": name, "scale": 1.0, "parts": parts}


def params(sp: dict[str, Any], distilled: bool, lora: dict[str, Any] | None) -> m.JobParams:
    if distilled:
        r = distill.RECIPE
        return m.JobParams(model=sp["name"], prompt="draft bench", negative_prompt="", seed=0, steps=r["steps"],
                           height=sp["height"], width=sp["width"], num_frames=sp["frames"], fps=sp["fps"],
                           guidance_scale=r["guidance_scale"], guidance_scale_2=r["guidance_scale_2"],
                           shift=r["shift"], sigmas=list(r["sigmas"]), loras=[lora] if lora else [])
    row = draft_row()
    return m.JobParams(model=sp["name"], prompt="draft bench", negative_prompt="", seed=0, steps=row["steps"],
                       height=sp["height"], width=sp["width"], num_frames=sp["frames"], fps=sp["fps"],
                       guidance_scale=row["guidance_scale"], guidance_scale_2=row["guidance_scale_2"],
                       shift=row["shift"])


def stages(env: Env, P: dict[str, Any], sp: dict[str, Any], experts: dict[str, nn.Module], vae: nn.Module,
           lora_dir: Path) -> tuple[Any, Any, StepClock]:
    """Our DiT stage (part "all", both experts, LoRAs from `lora_dir`) and VAE stage (float32)."""
    from stages.dit import DitStage
    from stages.vae import VaeStage

    device = str(env.device)
    data = {
        "models": {sp["name"]: {"path": "in-memory", "split_fraction": 0.5}},
        "stages": {"dit_bench": {"kind": "dit", "device": device, "dtype": P["dtype"], "models": [], "part": "all"},
                   "vae_bench": {"kind": "vae", "device": device, "dtype": "float32", "models": []}},
        "loras": {"dir": str(lora_dir)},
    }
    config = Config(data)
    clock = StepClock(env)
    dit = DitStage(config, config.stage("dit_bench"), clock)
    dit.setup()
    add_experts(dit, sp, experts, two_experts=True)
    serve(dit)
    vae_stage = VaeStage(config, config.stage("vae_bench"))
    vae_stage.setup()
    assert vae_stage.placement is not None
    vae_stage.add_vae(sp["name"], vae_stage.placement.place(vae, f"{sp['name']}/vae"))
    serve(vae_stage)
    return dit, vae_stage, clock


def ours(env: Env, dit: Any, vae_stage: Any, clock: StepClock, p: m.JobParams, emb: torch.Tensor,
         neg: torch.Tensor | None, out: Path) -> tuple[dict[str, Any], np.ndarray]:
    """One job through DitStage.handle -> VaeStage.handle -> write_mp4, each part timed."""
    from stages.muxer import write_mp4

    clock.stamps.clear()
    env.reset_peak()
    t0 = env.now()
    (decode,) = dit.handle(m.DenoiseJob(job_id="bench-draft", attempt=1, route=["dit_bench", "vae_bench"],
                                        params=p, prompt_embeds=emb, negative_prompt_embeds=neg))
    t1 = env.now()
    (mux,) = vae_stage.handle(decode)
    t2 = env.now()
    frames = mux.frames.numpy()
    write_mp4(frames, p.fps, out)
    t3 = env.now()
    return {"steps": p.steps, "passes_per_step": 2 if p.guidance_scale > 1 else 1, "dit_s": r4(t1 - t0),
            "step_s": r4((t1 - t0) / max(1, p.steps)), "vae_s": r4(t2 - t1), "mp4_s": r4(t3 - t2),
            "total_s": r4(t3 - t0), "mp4_bytes": out.stat().st_size, "peak_gib": env.peak_gib()}, frames


def diffusers_direct(env: Env, sp: dict[str, Any], experts: dict[str, nn.Module], vae: nn.Module, lora_dir: Path,
                     p: m.JobParams, emb: torch.Tensor, out: Path) -> tuple[dict[str, Any], np.ndarray]:
    """WanPipeline on the same experts and VAE: the LoRA by load_lora_weights, the distilled sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from stages.muxer import write_mp4
    from stages.vae import to_uint8

    class SigmaEuler(FlowMatchEulerDiscreteScheduler):  # type: ignore[misc]
        def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, **kwargs: Any) -> None:
            super().set_timesteps(sigmas=list(distill.SIGMAS), device=device)

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=SigmaEuler(shift=distill.RECIPE["shift"]),
                       transformer=experts["transformer"], transformer_2=experts["transformer_2"],
                       boundary_ratio=sp["boundary"])
    pipe.set_progress_bar_config(disable=True)
    for x in p.loras:
        for expert, part in x["parts"].items():
            pipe.load_lora_weights(str(lora_dir / part["file"]), adapter_name=f"direct_{x['name']}",
                                   load_into_transformer_2=expert == "transformer_2")
    pipe.enable_lora()  # the stage's LoRA cache may have left the adapter layers disabled
    pipe.set_adapters([f"direct_{x['name']}" for x in p.loras], [x["scale"] for x in p.loras])
    env.reset_peak()
    t0 = env.now()
    video = pipe(prompt_embeds=emb, height=p.height, width=p.width, num_frames=p.num_frames,
                 num_inference_steps=p.steps, guidance_scale=p.guidance_scale, guidance_scale_2=p.guidance_scale_2,
                 generator=torch.Generator().manual_seed(p.seed), output_type="np").frames[0]
    t1 = env.now()
    frames = to_uint8(video)
    write_mp4(frames, p.fps, out)
    t2 = env.now()
    pipe.delete_adapters([f"direct_{x['name']}" for x in p.loras])
    return {"pipeline_s": r4(t1 - t0), "mp4_s": r4(t2 - t1), "total_s": r4(t2 - t0), "peak_gib": env.peak_gib()}, frames


def text_encoder(env: Env, P: dict[str, Any], small: bool) -> dict[str, Any]:
    """The umt5-xxl encoder's forward on 512 random token ids (random weights, the stage's dtype)."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = (UMT5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4) if small else
           UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32))
    model = build_random(UMT5EncoderModel, {"config": cfg}, env.device, DTYPES[P["dtype"]])
    ids = torch.randint(0, cfg.vocab_size, (1, P["text_len"]), generator=torch.Generator().manual_seed(0))
    ids = ids.to(env.device)
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        env.reset_peak()
        t0 = env.now()
        model(input_ids=ids)
        t1 = env.now()
    del model
    env.free()
    return {"forward_s": r4(t1 - t0), "tokens": P["text_len"], "peak_gib": env.peak_gib()}


def table(results: dict[str, Any]) -> str:
    rows = ["| run | steps x passes | DiT s | VAE s | MP4 s | text s | end to end s | peak GiB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    text = results.get("text_encoder", {}).get("forward_s")
    for key in ("distilled", "undistilled"):
        r = results.get(key, {})
        if "total_s" in r:
            total = r["total_s"] + (text or 0)
            rows.append(f"| ours, {key} | {r['steps']} x {r['passes_per_step']} | {r['dit_s']} | {r['vae_s']} | "
                        f"{r['mp4_s']} | {text} | {r4(total)} | {r['peak_gib']} |")
    d = results.get("diffusers", {})
    if "total_s" in d:
        rows.append(f"| diffusers WanPipeline, distilled | 4 x 1 | {d['pipeline_s']} (with VAE) | | {d['mp4_s']} | "
                    f"{text} | {r4(d['total_s'] + (text or 0))} | {d['peak_gib']} |")
    return "\n".join(rows)


def run_jobs(env: Env, P: dict[str, Any], small: bool, rank: int, results: dict[str, Any]) -> None:
    """The three runs on one set of models (freed on return)."""
    sp, vsp = P["a14b"], P["vae21"]
    dtype = DTYPES[P["dtype"]]
    from diffusers import AutoencoderKLWan

    say("building two A14B experts and the Wan2.1 VAE", "(small)" if small else "at real size")
    experts = {"transformer": build_random(_transformer(), sp["config"], env.device, dtype, seed=1),
               "transformer_2": build_random(_transformer(), sp["config"], env.device, dtype, seed=2)}
    vae = build_random(AutoencoderKLWan, vsp["config"], env.device, torch.float32, seed=3)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, P["text_len"], P["text_dim"], generator=g).to(env.device, dtype)
    neg = torch.randn(1, P["text_len"], P["text_dim"], generator=g).to(env.device, dtype)
    with tempfile.TemporaryDirectory(prefix="draft-bench-") as tmp:
        folder = Path(tmp)
        lora = write_lora(folder, LORA, experts, 2 if small else rank)
        dit, vae_stage, clock = stages(env, P, sp, experts, vae, folder)
        distilled = params(sp, True, lora)
        frames: dict[str, np.ndarray] = {}

        def run_ours(key: str, p: m.JobParams, negative: torch.Tensor | None) -> dict[str, Any]:
            say(f"ours, {key}: warm-up job, then the timed one")
            ours(env, dit, vae_stage, clock, p, emb, negative, folder / "warm.mp4")
            res, frames[key] = ours(env, dit, vae_stage, clock, p, emb, negative, folder / f"{key}.mp4")
            say(f"  {res}")
            return res

        sub(results, "distilled", lambda: run_ours("distilled", distilled, None))

        def direct() -> dict[str, Any]:
            say("diffusers WanPipeline, distilled: warm-up, then the timed one")
            diffusers_direct(env, sp, experts, vae, folder, distilled, emb, folder / "warm.mp4")
            res, frames["diffusers"] = diffusers_direct(env, sp, experts, vae, folder, distilled, emb,
                                                        folder / "diffusers.mp4")
            if "distilled" in frames:
                res["frames_vs_ours"] = max_abs_diff(torch.from_numpy(frames["diffusers"]).int(),
                                                     torch.from_numpy(frames["distilled"]).int())
            say(f"  {res}")
            return res

        sub(results, "diffusers", direct)
        sub(results, "undistilled", lambda: run_ours("undistilled", params(sp, False, None), neg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes on the CPU (a smoke test)")
    parser.add_argument("--rank", type=int, default=64, help="the LoRA's rank (Wan2.2-Lightning's is 64)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "results")))
    parser.add_argument("--budget-s", type=float, default=540.0)
    args = parser.parse_args()
    P = SMALL if args.small else REAL
    env = Env(P["device"], args.budget_s)
    sp = P["a14b"]
    results: dict[str, Any] = {"host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                                        "device": torch.cuda.get_device_name(env.device) if env.cuda else "cpu"},
                               "size": f"{sp['width']}x{sp['height']}x{sp['frames']}", "dtype": P["dtype"],
                               "weights": "random (no checkpoint)", "lora_rank": args.rank if not args.small else 2}
    run_jobs(env, P, args.small, args.rank, results)
    env.free()
    sub(results, "text_encoder", lambda: text_encoder(env, P, args.small))
    md = table(results)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "draft_cpu_small" if args.small else "draft"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(
        f"# Distilled T2V-A14B draft, {results['size']}, {results['host']['device']}, random weights\n\n{md}\n")
    say(f"wrote {args.out / name}.json and .md")


def _transformer() -> type:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


if __name__ == "__main__":
    main()
