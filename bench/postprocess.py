"""Post-processing benchmark: time and peak host memory of the muxer's streaming path (interpolation
with minterpolate, Lanczos upscale, encode) for a clip of a given size, each case in a child
process so its peak RSS (VmHWM) is its own.

    .venv/bin/python bench/postprocess.py                                   # 1280x720, 81 frames: 4K and 8K at 60 fps
    .venv/bin/python bench/postprocess.py --frames 9 --preset ultrafast --out bench/results/postprocess_small.json

Results: one JSON object per case (source, target, codec, seconds, output frames, frames per second,
peak RSS in MiB, output bytes). The source frames are synthetic (a gradient and moving shapes).

RIFE (stages/rife.py): `--rife WEIGHTS` (a v4.25/v4.26 flownet.pkl; `random`: release-size random
weights, for timing only) makes every case interpolate with RIFE on `--rife-device` in
`--rife-dtype`, and `--rife-sizes` times the interpolation alone (no encode) at each size: seconds
per output frame (the first interval, warm-up, left out) and peak device memory.

    .venv/bin/python bench/postprocess.py --rife random --rife-sizes 832x480,1280x720 --frames 5 --cases ""
    .venv/bin/python bench/postprocess.py --rife random --rife-device cuda --rife-dtype float16 \
        --rife-sizes 1280x720 --frames 17 --cases 4k:h265 --out bench/results/postprocess_rife_gpu.json

Model upscaling (stages/upscale.py): `--upscale-model WEIGHTS` (a Real-ESRGAN .pth / .safetensors;
`random-srvgg`: release-size random SRVGGNetCompact x4, realesr-animevideov3's layout;
`random-rrdb`: RealESRGAN_x4plus's RRDBNet, 23 blocks) makes every case upscale with the model on
`--upscale-device` in `--upscale-dtype` (tiles of `--upscale-tile` + `--upscale-overlap`), then
Lanczos to the target; on CUDA the case also reports peak device memory.

    .venv/bin/python bench/postprocess.py --upscale-model random-srvgg --upscale-device cuda \
        --upscale-dtype float16 --frames 81 --cases 4k:h265,8k:h265 --out bench/results/postprocess_sr_gpu.json
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
if str(ROOT) not in sys.path:  # this checkout's stages/, not an installed copy's
    sys.path.insert(0, str(ROOT))

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
extra = json.loads(sys.argv[9]) if len(sys.argv) > 9 else {}
import torch
model = upscaler = None
if extra.get("rife"):  # weights, device, dtype: interpolate with RIFE
    from stages import rife
    weights, device, dtype = extra["rife"]
    model = rife.Interpolator(Path(weights), device, getattr(torch, dtype))
if extra.get("upscale"):  # weights, device, dtype, tile, overlap: upscale with the model
    from stages import upscale
    weights, device, dtype, tile, overlap = extra["upscale"]
    upscaler = upscale.Upscaler(Path(weights), device, getattr(torch, dtype), tile, overlap)
plan = postprocess.Plan(w, h, fps, out_w, out_h, out_fps, "rife" if model else "minterpolate", model,
                        "model" if upscaler else "lanczos", upscaler)
cuda = [x.device for x in (model, upscaler) if x is not None and x.device.type == "cuda"]
with tempfile.TemporaryDirectory() as d:
    started = time.perf_counter()
    (main,) = write_outputs(frames, fps, Path(d) / "a.mp4", Encoding(codec, 28 if codec != "h264" else 23, 8, preset),
                            plan=plan)
    seconds = time.perf_counter() - started
    size = main.path.stat().st_size
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"source": f"{w}x{h}", "frames": n, "fps": fps, "target": target, "out": f"{out_w}x{out_h}",
                  "interpolation": plan.method, "upscale": plan.applied().get("upscale", {}).get("method"),
                  **({"upscale_model": {k: v for k, v in upscaler.describe().items() if k != "sha256"}}
                     if upscaler else {}),
                  "peak_device_mib": round(torch.cuda.max_memory_allocated(cuda[0]) / 2**20, 1) if cuda else None,
                  "out_fps": out_fps, "out_frames": main.frames, "codec": codec, "preset": preset,
                  "seconds": round(seconds, 2), "out_frames_per_s": round(main.frames / seconds, 2),
                  "peak_rss_mib": round(hwm / 1024, 1), "source_mib": round(frames.nbytes / 2**20, 1),
                  "bytes": size}))
"""


RIFE_CHILD = r"""
import json, sys, time
import numpy as np
import torch
from pathlib import Path
from stages import rife
weights, device, dtype, w, h, n, fps, out_fps = sys.argv[1:9]
w, h, n, fps, out_fps = int(w), int(h), int(n), int(fps), int(out_fps)
started = time.perf_counter()
model = rife.Interpolator(Path(weights), device, getattr(torch, dtype))
load_s = time.perf_counter() - started
frames = [np.full((h, w, 3), 40, np.uint8) for _ in range(n)]
for i, f in enumerate(frames):
    f[h // 4:h // 2, (i * w // (2 * n)):(i * w // (2 * n)) + h // 4] = 230
sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
stream = rife.Stream(model, fps, out_fps)
marks = []
count = 0
for f in frames:
    count += len(list(stream.push(f)))
    sync()
    marks.append((time.perf_counter(), count))
count += len(list(stream.flush()))
(t0, c0), (t1, c1) = marks[1], marks[-1]  # from the end of the first interval (warm-up) to the last
peak = torch.cuda.max_memory_allocated(model.device) if model.device.type == "cuda" else None
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"rife": f"{w}x{h}", "frames": n, "fps": fps, "out_fps": out_fps, "out_frames": count,
                  "device": str(model.device), "dtype": dtype, "load_s": round(load_s, 2),
                  "s_per_out_frame": round((t1 - t0) / max(1, c1 - c0), 4), "timed_out_frames": c1 - c0,
                  "peak_device_mib": None if peak is None else round(peak / 2**20, 1),
                  "peak_rss_mib": round(hwm / 1024, 1), **model.layout.describe()}))
"""


def random_weights(folder: Path) -> Path:
    """Release-size v4.25/v4.26 weights, random (timing only)."""
    import torch

    from stages import rife

    path = folder / "flownet_random.pkl"
    if not path.exists():
        torch.manual_seed(0)
        layout = rife.Layout(16, 16, (192, 128, 96, 64, 32), 8, 8)
        torch.save({f"module.{k}": v for k, v in rife.IFNet(layout).state_dict().items()}, path)
    return path


def random_upscale_weights(folder: Path, kind: str) -> Path:
    """Release-size random upscale weights (timing only): realesr-animevideov3's SRVGGNetCompact
    (64 features, 16 convs, x4) or RealESRGAN_x4plus's RRDBNet (64 features, 23 blocks, growth 32)."""
    import torch

    from stages import upscale

    layouts = {"random-srvgg": upscale.Layout(upscale.SRVGG, 4, 64, num_conv=16),
               "random-rrdb": upscale.Layout(upscale.RRDB, 4, 64, num_block=23, num_grow_ch=32)}
    path = folder / f"{kind}.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save({"params": upscale.network(layouts[kind]).state_dict()}, path)
    return path


def child(cmd: list[str], what: str) -> dict[str, object]:
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"case {what} failed: {proc.stderr[-2000:]}")
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run_rife(args: argparse.Namespace, size: str) -> dict[str, object]:
    w, h = size.split("x")
    return child([sys.executable, "-c", RIFE_CHILD, str(args.rife_path), args.rife_device, args.rife_dtype, w, h,
                  str(args.frames), str(args.fps), str(args.out_fps)], f"rife {size}")


def run_case(args: argparse.Namespace, target: str, codec: str) -> dict[str, object]:
    cmd = [sys.executable, "-c", CHILD, str(args.width), str(args.height), str(args.frames), str(args.fps),
           str(args.out_fps), target, codec, args.preset]
    extra: dict[str, list[object]] = {}
    if args.rife_path is not None:
        extra["rife"] = [str(args.rife_path), args.rife_device, args.rife_dtype]
    if args.upscale_path is not None:
        extra["upscale"] = [str(args.upscale_path), args.upscale_device, args.upscale_dtype, args.upscale_tile,
                            args.upscale_overlap]
    return child(cmd + [json.dumps(extra)], f"{target}/{codec}")


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
    parser.add_argument("--rife", help="RIFE weights for every case (a flownet.pkl; 'random': release-size random)")
    parser.add_argument("--rife-device", default="cpu")
    parser.add_argument("--rife-dtype", default="float32", help="float32 | float16 | bfloat16 (CUDA)")
    parser.add_argument("--rife-sizes", default="", help="WxH,...: time RIFE alone at these sizes")
    parser.add_argument("--upscale-model", help="upscale weights for every case (a Real-ESRGAN .pth; "
                        "'random-srvgg' / 'random-rrdb': release-size random)")
    parser.add_argument("--upscale-device", default="cpu")
    parser.add_argument("--upscale-dtype", default="float32", help="float32 | float16 | bfloat16 (CUDA)")
    parser.add_argument("--upscale-tile", type=int, default=512)
    parser.add_argument("--upscale-overlap", type=int, default=32)
    args = parser.parse_args()
    args.upscale_path = None
    if args.upscale_model in ("random-srvgg", "random-rrdb"):
        import tempfile

        args.upscale_path = random_upscale_weights(Path(tempfile.gettempdir()), args.upscale_model)
    elif args.upscale_model:
        args.upscale_path = Path(args.upscale_model)
    args.rife_path = None
    if args.rife == "random":
        import tempfile

        args.rife_path = random_weights(Path(tempfile.gettempdir()))
    elif args.rife:
        args.rife_path = Path(args.rife)
    results = []
    for size in filter(None, args.rife_sizes.split(",")):
        if args.rife_path is None:
            raise SystemExit("--rife-sizes needs --rife")
        started = time.time()
        results.append(run_rife(args, size))
        print(json.dumps(results[-1]), f"({time.time() - started:.0f} s)", flush=True)
    for case in filter(None, args.cases.split(",")):
        target, codec = case.split(":")
        started = time.time()
        results.append(run_case(args, target, codec))
        print(json.dumps(results[-1]), f"({time.time() - started:.0f} s)", flush=True)
    body = {"host": {"cpus": os.cpu_count(), "machine": platform.machine()}, "results": results}
    if args.out is not None:
        args.out.write_text(json.dumps(body, indent=1) + "\n")


if __name__ == "__main__":
    main()
