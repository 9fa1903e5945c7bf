"""Post-processing benchmark: time and peak host memory of the muxer's streaming path (interpolation
with minterpolate, Lanczos upscale, encode) for a clip of a given size, each case in a child
process so its peak RSS (VmHWM) is its own.

    .venv/bin/python bench/postprocess.py                                   # 1280x720, 81 frames: 4K and 8K at 60 fps
    .venv/bin/python bench/postprocess.py --frames 9 --preset ultrafast --out bench/results/postprocess_small.json

Results: one JSON object per case (source, target, codec, seconds, output frames, frames per second,
peak RSS in MiB, output bytes). The source frames are synthetic (a gradient and moving shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, tempfile, time
import numpy as np
from pathlib import Path
from common import catalog
from stages import postprocess
from stages.encoders import Encoding, write_outputs
w, h, n, fps, out_fps, target, codec, preset = sys.argv[1:9]
w, h, n, fps, out_fps = int(w), int(h), int(n), int(fps), int(out_fps)
frames = np.empty((n, h, w, 3), np.uint8)
x = np.linspace(0, 255, w, dtype=np.float32)
for i in range(n):
    frames[i, ..., 0] = x.astype(np.uint8)
    frames[i, ..., 1] = (np.linspace(0, 255, h, dtype=np.float32)[:, None] + 0 * x).astype(np.uint8)
    frames[i, ..., 2] = 80
    s = h // 6
    frames[i, s:2 * s, (i * w // (2 * n)):(i * w // (2 * n)) + s] = 240
out_w, out_h = catalog.output_size(w, h, {"upscale_to": target})
plan = postprocess.Plan(w, h, fps, out_w, out_h, out_fps)
with tempfile.TemporaryDirectory() as d:
    started = time.perf_counter()
    (main,) = write_outputs(frames, fps, Path(d) / "a.mp4", Encoding(codec, 28 if codec != "h264" else 23, 8, preset),
                            plan=plan)
    seconds = time.perf_counter() - started
    size = main.path.stat().st_size
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"source": f"{w}x{h}", "frames": n, "fps": fps, "target": target, "out": f"{out_w}x{out_h}",
                  "out_fps": out_fps, "out_frames": main.frames, "codec": codec, "preset": preset,
                  "seconds": round(seconds, 2), "out_frames_per_s": round(main.frames / seconds, 2),
                  "peak_rss_mib": round(hwm / 1024, 1), "source_mib": round(frames.nbytes / 2**20, 1),
                  "bytes": size}))
"""


def run_case(args: argparse.Namespace, target: str, codec: str) -> dict[str, object]:
    cmd = [sys.executable, "-c", CHILD, str(args.width), str(args.height), str(args.frames), str(args.fps),
           str(args.out_fps), target, codec, args.preset]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"case {target}/{codec} failed: {proc.stderr[-2000:]}")
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--out-fps", type=int, default=60)
    parser.add_argument("--preset", default="medium", help="x264/x265 preset")
    parser.add_argument("--cases", default="4k:h264,4k:h265,8k:h265", help="target:codec, comma-separated")
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    args = parser.parse_args()
    results = []
    for case in args.cases.split(","):
        target, codec = case.split(":")
        started = time.time()
        results.append(run_case(args, target, codec))
        print(json.dumps(results[-1]), f"({time.time() - started:.0f} s)", flush=True)
    body = {"host": {"cpus": os.cpu_count(), "machine": platform.machine()}, "results": results}
    if args.out is not None:
        args.out.write_text(json.dumps(body, indent=1) + "\n")


if __name__ == "__main__":
    main()
