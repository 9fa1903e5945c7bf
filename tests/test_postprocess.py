"""Post-processing in the muxer: interpolation (minterpolate) and upscaling (Lanczos), streamed into
the encoder; what presets and custom_options ask for, what admission refuses, and what ran.

Sizes and rates are checked on the files (decoded with PyAV), on the muxer's code in-process and
on tiny jobs through the running system (`api_system`); bounded memory on the same streaming code
at a reduced size, in child processes whose peak RSS is compared for N and 3N frames.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from broker import admission
from common import catalog
from common import messages as m
from common.config import Config, profile_path
from common.errors import ValidationError
from stages import postprocess
from stages.encoders import Encoding, write_outputs
from tests.error_bodies import check_error_body
from tests.helpers import moving_square, probe

ROOT = Path(__file__).resolve().parent.parent


def decoded(data: bytes | Path) -> tuple[list[np.ndarray], Any]:
    with av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data), mode="r") as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], stream.average_rate


# ---- the muxer's code -------------------------------------------------------------------------------

@pytest.mark.parametrize("fps,target,expected", [(16, 60, 31), (16, 32, 17), (24, 48, 17), (16, 48, 25)])
def test_interpolation_gives_the_rate_and_covers_the_whole_clip(tmp_path, fps, target, expected):
    """n frames at f fps become (n - 1) x F / f + 1 at F: the last output frame is the last input
    frame (minterpolate stops one interval early unless the last frame is fed twice)."""
    frames = moving_square(9, 32, 48)
    plan = postprocess.Plan(48, 32, fps, 48, 32, target)
    assert plan.out_frames(9) == expected
    write_outputs(frames, fps, tmp_path / "i.mp4", Encoding("h264", 0), plan=plan)
    out, rate = decoded(tmp_path / "i.mp4")
    assert (len(out), rate) == (expected, target)
    last = np.abs(out[-1].astype(int) - frames[-1]).mean()
    assert last < np.abs(out[-1].astype(int) - frames[-2]).mean() and last < 4
    assert np.abs(out[0].astype(int) - frames[0]).mean() < 4


def test_upscale_keeps_the_picture_at_the_new_size(tmp_path):
    frames = moving_square(5, 32, 48)
    plan = postprocess.Plan(48, 32, 16, 96, 64, 16)
    write_outputs(frames, 16, tmp_path / "u.mp4", Encoding("h264", 0), plan=plan)
    out, rate = decoded(tmp_path / "u.mp4")
    assert (len(out), out[0].shape, rate) == (5, (64, 96, 3), 16)
    halved = out[2].reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))  # back to the source grid
    assert np.abs(halved - frames[2]).mean() < 6


@pytest.mark.parametrize("size,wanted,out", [
    ((1280, 720), {"upscale_to": "4k"}, (3840, 2160)),
    ((832, 480), {"upscale_to": "4k"}, (3744, 2160)),
    ((720, 1280), {"upscale_to": "1080p"}, (1080, 1920)),  # portrait: the short side is the width
    ((1280, 704), {"upscale": 1.5}, (1920, 1056)),
    ((1280, 720), {"upscale_to": "8k"}, (7680, 4320)),
    ((48, 32), {"upscale": 1.3}, (62, 42)),  # even sides
    ((64, 64), {}, (64, 64)),
])
def test_output_size_keeps_the_aspect_with_even_sides(size, wanted, out):
    assert catalog.output_size(*size, wanted) == out


def test_applied_says_what_ran():
    p = admission.resolve(single_gpu(), {"prompt": "x", "model": "t2v", "quality_preset": "ultimate"})[1]
    plan = postprocess.plan(p, p.width, p.height)
    assert plan.applied() == {
        "width": 3840, "height": 2160, "fps": 60,
        "interpolation": {"method": "minterpolate", "mode": "mci", "from_fps": 16, "fps": 60},
        "upscale": {"method": "lanczos", "from": "1280x720", "to": "3840x2160"},
    }
    assert postprocess.Plan(64, 64, 16, 64, 64, 16).applied() == {}


# ---- bounded memory as the clip grows ----------------------------------------------------------------

CHILD = """
import sys, tempfile
import numpy as np
from pathlib import Path
from stages import postprocess
from stages.encoders import Encoding, write_outputs
n = int(sys.argv[1])
frames = np.zeros((n, 48, 64, 3), np.uint8)
for i in range(n):
    frames[i, ..., 0] = np.arange(64, dtype=np.uint8) * 4
    frames[i, 8:24, (i % 48):(i % 48) + 16] = 250
with tempfile.TemporaryDirectory() as d:
    write_outputs(frames, 16, Path(d) / "a.mp4", Encoding("h264", 23, 8, "veryfast"),
                  plan=postprocess.Plan(64, 48, 16, 512, 384, 32))
# VmHWM: this process's peak RSS (ru_maxrss would keep the forking pytest's, torch and all, as a floor)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def peak_rss_kib(frames: int) -> int:
    run = subprocess.run([sys.executable, "-c", CHILD, str(frames)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert run.returncode == 0, run.stderr[-500:]
    return int(run.stdout.split()[-1])


def test_interpolate_and_upscale_stream_in_bounded_memory():
    """64x48 -> 512x384 (x8, the 720p -> 8K factor is x6) at twice the rate: 3N frames cost no more
    peak memory than N. Holding the output frames would add 96 x 576 KiB = 54 MiB between the two
    (measured here: +123 MiB when write() keeps a copy of each frame, +1.5 MiB as it is)."""
    small, large = peak_rss_kib(24), peak_rss_kib(72)
    assert large - small < 16 * 1024, (small, large)


# ---- admission ----------------------------------------------------------------------------------------

def single_gpu() -> Config:
    return Config.load(profile_path("single-gpu"), environ={})


def refused(config: Config, options: dict[str, Any], preset: str = "standard") -> ValidationError:
    with pytest.raises(ValidationError) as info:
        admission.resolve(config, {"prompt": "x", "model": "t2v", "quality_preset": preset,
                                   "custom_options": options})
    return info.value


def test_presets_and_options_resolve_to_what_the_muxer_applies():
    config = single_gpu()
    _, p, _ = admission.resolve(config, {"prompt": "x", "model": "t2v", "quality_preset": "ultimate"})
    assert p.postprocess == {"interpolate_fps": 60, "upscale": 3.0} and p.encoding["codec"] == "h264"  # 4K: h264 ok
    _, p, _ = admission.resolve(config, {"prompt": "x", "model": "t2v", "quality_preset": "ultimate",
                                         "custom_options": {"upscale_to": "8k", "codec": "h265"}})
    assert p.postprocess == {"interpolate_fps": 60, "upscale_to": "8k"}
    assert catalog.output_size(p.width, p.height, p.postprocess) == (7680, 4320)


def test_what_the_profile_cannot_do_is_refused_with_the_reason():
    config = single_gpu()
    err = refused(config, {"upscale_to": "8k"}, "ultimate")  # h264 by default
    assert err.details == {"field": "custom_options.codec", "codec": "h264", "width": 7680, "height": 4320,
                           "max_pixels": catalog.H264_MAX_PIXELS, "allowed": ["av1", "h265"]}
    err = refused(config, {"upscale": 8.0, "resolution": "1280x720", "codec": "h265"})
    assert err.details["field"] == "custom_options.upscale" and (err.details["width"], err.details["height"]) == \
        (10240, 5760)
    err = refused(config, {"interpolate_fps": 16})  # the video is 16 fps already
    assert err.details == {"field": "custom_options.interpolate_fps", "min": 17}


# ---- through the running system ------------------------------------------------------------------------

def test_cinema_preset_is_interpolated_and_upscaled(api_system):
    """tiny t2v cinema: 64x64 at 24 fps, interpolated to 48 and upscaled x1.5 -> 96x96."""
    job_id = api_system.submit(prompt="a kite over the dunes", quality_preset="cinema",
                               custom_options={"steps": 2, "num_frames": 5})
    assert api_system.wait_final(job_id)["status"] == "completed"
    _, result = api_system.json("GET", f"/api/v1/result/{job_id}")
    post = result["metadata"]["postprocess"]
    assert post["requested"] == {"interpolate_fps": 48, "upscale": 1.5}
    assert post["applied"] == {
        "width": 96, "height": 96, "fps": 48,
        "interpolation": {"method": "minterpolate", "mode": "mci", "from_fps": 24, "fps": 48},
        "upscale": {"method": "lanczos", "from": "64x64", "to": "96x96"},
    }
    (mp4,) = result["outputs"]
    assert (mp4["width"], mp4["height"], mp4["fps"]) == (96, 96, 48)
    _, _, video = api_system.request("GET", result["output_url"])
    frames, rate = decoded(video)
    assert (len(frames), frames[0].shape, rate) == (9, (96, 96, 3), 48)
    assert "post-processed" in (probe(video)["comment"] or "")


def test_custom_options_upscale_the_mp4_and_leave_the_master_as_decoded(api_system):
    job_id = api_system.submit(prompt="a tram at night", custom_options={
        "interpolate_fps": 32, "upscale": 2.0, "codec": "h265", "lossless_master": True})
    assert api_system.wait_final(job_id)["status"] == "completed"
    _, result = api_system.json("GET", f"/api/v1/result/{job_id}")
    mp4, mkv = result["outputs"]
    assert [(o["codec"], o["width"], o["height"], o["fps"]) for o in (mp4, mkv)] == \
        [("h265", 64, 64, 32), ("ffv1", 32, 32, 16)]
    _, _, video = api_system.request("GET", mp4["url"])
    frames, rate = decoded(video)
    assert (len(frames), frames[0].shape, rate) == (9, (64, 64, 3), 32)
    _, _, master = api_system.request("GET", mkv["url"])
    frames, rate = decoded(master)
    assert (len(frames), frames[0].shape, rate) == (5, (32, 32, 3), 16)


def test_an_8k_h264_request_is_refused_over_http(api_system):
    status, body = api_system.json("POST", "/api/v1/generate", {
        "prompt": "x", "model": "t2v", "quality_preset": "ultimate", "custom_options": {"upscale_to": "8k"}})
    assert status == 422 and body["error"]["details"]["field"] == "custom_options.codec", body
    check_error_body("/api/v1/generate", status, body)


def test_params_carry_the_job_s_post_processing_to_the_muxer():
    p = m.JobParams(model="t2v-A14B", prompt="x", negative_prompt="", seed=0, steps=1, height=32, width=48,
                    num_frames=9, fps=16, guidance_scale=4.0,
                    postprocess={"interpolate_fps": 48, "upscale_to": "1080p"})
    plan = postprocess.plan(p, 48, 32)
    assert (plan.out_width, plan.out_height, plan.out_fps, plan.out_frames(9)) == (1620, 1080, 48, 25)
