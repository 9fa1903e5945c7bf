"""What live previews cost: the tiny job's latency through the stage processes with previews on
(one every step, as the tiny profile sets) and off (four stack starts: on, off, off, on, each
timing `--runs / 2` jobs after a warm-up), and one preview (projection + encode + write)
in-process at the latent sizes of real jobs, on this machine's CPU.

With `--taehv`, only the TAEHV path instead (stages/taehv.py: a decoder of the released size,
widths 256/128/64/64, random weights; speed does not depend on them): one preview (decode up to the
last picked frame, JPEG, write) for a 4-frame grid and for the middle frame, at small latent sizes
on a CPU, at the real jobs' sizes on a GPU (`--device cuda`), with the GPU's peak memory.

    .venv/bin/python bench/previews.py [--runs 12] [--out bench/results/previews.json]
    .venv/bin/python bench/previews.py --taehv [--device cuda] [--out bench/results/previews_taehv.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from broker.driver import Driver, default_params  # noqa: E402
from common.config import Config, PreviewsSection  # noqa: E402
from stages import previews  # noqa: E402
from tests.helpers import StageStack, short_tmpdir  # noqa: E402

# (name, latent shape (1, z, F, H, W), projection): 832x480x81 and 1280x720x81 with the Wan2.1 VAE,
# 1280x704x121 with the Wan2.2 VAE.
REAL_SIZES = [
    ("A14B 832x480x81", (1, 16, 21, 60, 104), "wan2.1"),
    ("A14B 1280x720x81", (1, 16, 21, 90, 160), "wan2.1"),
    ("TI2V-5B 1280x704x121", (1, 48, 31, 44, 80), "wan2.2"),
]


def job_latencies(model_cache: Path, runs: int, enabled: bool) -> list[float]:
    state = short_tmpdir("wsv-")
    stack = StageStack(state, model_cache, WAN_SERVER__PREVIEWS__ENABLED=str(enabled).lower()).start_all()
    try:
        with Driver(stack.config) as driver:
            driver.wait_ready(timeout_s=300)
            params = default_params(stack.config, "t2v-A14B", prompt="a cat walks on the beach at sunset")
            driver.run(params)  # warm-up
            return [driver.run(params).latency_s for _ in range(runs)]
    finally:
        stack.stop()
        shutil.rmtree(state, ignore_errors=True)


def preview_costs(repeats: int = 20) -> dict[str, dict[str, float]]:
    state = short_tmpdir("wsv-")
    config = Config.load(environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(state)})
    out: dict[str, dict[str, float]] = {}
    try:
        for fmt in ("jpeg", "webp"):
            section = PreviewsSection(format=fmt)
            for name, shape, family in REAL_SIZES:
                writer = previews.Previewer(config, section, {"m": previews.published(family)})
                x0 = torch.randn(shape)
                writer.write("m", "bench", 1, x0)  # warm-up
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    writer.write("m", "bench", 1, x0)
                    times.append(time.perf_counter() - start)
                size = (config.job_spool("bench") / "previews" / f"step-0001.{previews.EXTENSIONS[fmt]}").stat().st_size
                out[f"{name} {fmt}"] = {"median_ms": round(statistics.median(times) * 1000, 2), "bytes": size}
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return out


# (name, latent shape, latent channels and patch size): the CPU sizes are small (a full 720p decode
# is about 13 T multiply-adds: minutes on two cores).
TAEHV_CPU_SIZES = [
    ("A14B 128x128x17", (1, 16, 5, 16, 16), 1),
    ("A14B 256x256x17", (1, 16, 5, 32, 32), 1),
    ("TI2V-5B 256x256x17", (1, 48, 5, 16, 16), 2),
]
TAEHV_GPU_SIZES = [(name, shape, 1 if shape[1] == 16 else 2) for name, shape, _ in REAL_SIZES]


def taehv_costs(device: torch.device, repeats: int) -> dict[str, dict[str, float]]:
    from stages import taehv

    state = short_tmpdir("wsv-")
    config = Config.load(environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(state)})
    sizes = TAEHV_GPU_SIZES if device.type == "cuda" else TAEHV_CPU_SIZES
    out: dict[str, dict[str, float]] = {}
    try:
        for name, shape, patch in sizes:
            layout = taehv.Layout(shape[1], patch, (256, 128, 64, 64), 1, False)
            renderer = taehv.TaehvPreview(taehv.TaehvDecoder(layout).eval().requires_grad_(False), device,
                                          Path("random"))
            x0 = torch.randn(shape, device=device)
            for count in (4, 1):
                writer = previews.Previewer(config, PreviewsSection(frames=count), {"m": renderer})
                writer.write("m", "bench", 1, x0)  # warm-up
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    writer.write("m", "bench", 1, x0)  # ends with a copy to the host: synchronised
                    times.append(time.perf_counter() - start)
                row = {"median_ms": round(statistics.median(times) * 1000, 1), "frames": count,
                       "chunk_latent_frames": renderer.model.chunk_frames(shape[3], shape[4], False)}
                if device.type == "cuda":
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                out[name + (" grid" if count > 1 else " middle")] = row
                print(name, row, flush=True)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--taehv", action="store_true", help="time the TAEHV decoder's previews only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.taehv:
        device = torch.device(args.device)
        taehv_result = {"one_preview": taehv_costs(device, args.repeats), "device": str(device),
                        "dtype": "float16" if device.type == "cuda" else "float32",
                        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
        out = args.out or Path(__file__).parent / "results" / "previews_taehv.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(taehv_result, indent=1) + "\n")
        return
    args.out = args.out or Path(__file__).parent / "results" / "previews.json"
    model_cache = short_tmpdir("wsm-")
    on: list[float] = []
    off: list[float] = []
    try:
        # on, off, off, on: a load that drifts while the bench runs weighs on both alike.
        for enabled in (True, False, False, True):
            (on if enabled else off).extend(job_latencies(model_cache, args.runs // 2, enabled))
    finally:
        shutil.rmtree(model_cache, ignore_errors=True)
    on_s, off_s = statistics.median(on), statistics.median(off)
    result = {
        "tiny_job": {"steps": 4, "previews_per_job": 4, "runs": args.runs, "on_median_s": round(on_s, 4),
                     "off_median_s": round(off_s, 4), "on_over_off": round(on_s / off_s, 3),
                     "on_s": [round(x, 4) for x in on], "off_s": [round(x, 4) for x in off]},
        "one_preview_cpu_1_thread": preview_costs(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": "2-core CPU box, shared with other work",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
