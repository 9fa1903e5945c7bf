"""One tiny job end to end through the stage processes, against WanPipeline in-process.

Starts the five stage processes of the tiny profile (one torch thread each, as the profile sets),
warms up, then times N jobs one at a time (submit -> JobDone with the MP4 written) and the same
`WanPipeline.__call__` in-process (one thread, no MP4). Also times N jobs submitted at once, which
the processes pipeline. Prints medians and writes JSON.

    .venv/bin/python bench/end_to_end.py [--model t2v-A14B] [--runs 5]
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
from diffusers import WanPipeline  # noqa: E402

from broker.driver import Driver, default_params  # noqa: E402
from stages.models import model_dir  # noqa: E402
from tests.helpers import StageStack, short_tmpdir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="t2v-A14B")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "end_to_end.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = short_tmpdir("wse-")
    stack = StageStack(state, state / "models").start_all()
    try:
        with Driver(stack.config) as driver:
            driver.wait_ready(timeout_s=300)
            params = default_params(stack.config, args.model, prompt="a cat walks on the beach at sunset")
            driver.run(params)  # warm-up
            seq = [driver.run(params).latency_s for _ in range(args.runs)]
            start = time.perf_counter()
            ids = [driver.submit(params) for _ in range(args.runs)]
            for job_id in ids:
                driver.wait(job_id)
            batch_s = time.perf_counter() - start

        pipe = WanPipeline.from_pretrained(model_dir(stack.config, args.model))
        pipe.set_progress_bar_config(disable=True)

        def call() -> float:
            start = time.perf_counter()
            pipe(
                prompt=params.prompt, negative_prompt=params.negative_prompt, height=params.height,
                width=params.width, num_frames=params.num_frames, num_inference_steps=params.steps,
                guidance_scale=params.guidance_scale, generator=torch.Generator().manual_seed(params.seed),
                output_type="np",
            )
            return time.perf_counter() - start

        call()  # warm-up
        inproc = [call() for _ in range(args.runs)]
    finally:
        stack.stop()
        shutil.rmtree(state, ignore_errors=True)

    result = {
        "model": args.model,
        "params": {k: getattr(params, k) for k in ("steps", "height", "width", "num_frames", "guidance_scale")},
        "runs": args.runs,
        "processes_median_s": statistics.median(seq),
        "inprocess_median_s": statistics.median(inproc),
        "ratio_processes_over_inprocess": statistics.median(seq) / statistics.median(inproc),
        "processes_concurrent_jobs_per_s": args.runs / batch_s,
        "inprocess_jobs_per_s": 1 / statistics.median(inproc),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
