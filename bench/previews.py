"""What live previews cost: the tiny job's latency through the stage processes with previews on
(one every step, as the tiny profile sets) and off (four stack starts: on, off, off, on, each
timing `--runs / 2` jobs after a warm-up), and one preview (projection + encode + write)
in-process at the latent sizes of real jobs, on this machine's CPU.

    .venv/bin/python bench/previews.py [--runs 12] [--out bench/results/previews.json]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "previews.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
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
