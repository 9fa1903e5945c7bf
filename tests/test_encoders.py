"""Encoders and containers: H.264 / HEVC / AV1 MP4s with their colour tags, the lossless FFV1
master, atomic outputs and their cleanup.

The codec matrix runs on the muxer's code in-process (cheap); the lossless master is compared with
the frames the real VAE process sent (its wire recording, `stack`); the API test runs tiny jobs
through the whole system (`api_system`) and reads the files back over HTTP.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from broker.broker import Broker
from broker.driver import default_params
from common import messages as m
from common import spool
from common.config import Config
from common.errors import JobCancelled, OutputError
from stages import encoders
from stages.base import StageContext
from stages.encoders import Encoding, write_outputs
from stages.muxer import MuxerStage
from tests.error_bodies import check_error_body
from tests.helpers import moving_square, probe, short_tmpdir, vae_frames

ROOT = Path(__file__).resolve().parent.parent


# BT.709 primaries and transfer (1, 1); YUV: BT.709 matrix (1), limited range (1); RGB: GBR (0), full (2).
YUV_709 = (1, 1, 1, 1)
RGB_709 = (1, 1, 0, 2)
CODEC_CASES = [("h264", 8, "h264", "avc1", "yuv420p"), ("h265", 8, "hevc", "hvc1", "yuv420p"),
               ("h265", 10, "hevc", "hvc1", "yuv420p10le"), ("av1", 10, "av1", "av01", "yuv420p10le")]


@pytest.mark.parametrize("codec,bits,decoded_as,tag,pix_fmt", CODEC_CASES,
                         ids=[f"{c[0]}-{c[1]}bit" for c in CODEC_CASES])
def test_codec_tag_bit_depth_and_colour_are_what_players_read(tmp_path, codec, bits, decoded_as, tag, pix_fmt):
    frames = moving_square()
    crf = 20
    outputs = write_outputs(frames, 16, tmp_path / "j.mp4", Encoding(codec, crf, bits), master=tmp_path / "j.mkv")
    got = probe(tmp_path / "j.mp4")
    assert got["codec"].startswith(decoded_as) or (decoded_as == "av1" and got["codec"] == "libdav1d")
    assert (got["tag"], got["pix_fmt"], got["colour"], got["fps"]) == (tag, pix_fmt, YUV_709, 16)
    assert got["frames"].shape == frames.shape
    # Lossy, but the picture is the picture: converted with BT.709 both ways, it stays close.
    assert np.abs(got["frames"].astype(int) - frames).mean() < 6
    master = probe(tmp_path / "j.mkv")
    assert (master["codec"], master["pix_fmt"], master["colour"], master["format"]) == \
        ("ffv1", "bgr0", RGB_709, "matroska,webm")
    assert np.array_equal(master["frames"], frames)
    assert [o.describe()["bytes"] for o in outputs] == [(tmp_path / n).stat().st_size for n in ("j.mp4", "j.mkv")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.mkv", "j.mp4"]  # no temporary file left


def test_the_yuv_conversion_uses_the_matrix_the_tags_name(tmp_path):
    """The MP4 is tagged BT.709 and converted with BT.709: decoded by its tags, a saturated colour
    comes back (PyAV's default BT.601 conversion, tagged 709, comes back up to 18 levels off)."""
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    frames[..., 0] = 200  # saturated red, where the two matrices differ most
    write_outputs(frames, 16, tmp_path / "r.mp4", Encoding("h264", 0))
    assert np.abs(probe(tmp_path / "r.mp4")["frames"].astype(int) - frames).max() <= 3


def x264_settings(path: Path) -> dict[str, str]:
    """The options x264 wrote into the stream's SEI (what it actually ran with)."""
    data = path.read_bytes()
    start = data.index(b"options: ") + len(b"options: ")
    text = data[start:data.index(b"\0", start)].decode()
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


@pytest.mark.parametrize("width,odd", [(48, True), (720, True), (64, False), (832, False)])
def test_x264_runs_without_mb_tree_only_on_an_odd_number_of_macroblocks(tmp_path, width, odd):
    # Under valgrind, x264's MB-tree reads uninitialised stack memory at odd macroblock widths:
    # the same frames gave MP4s of other sizes from one process to the next (test_replay[muxer]).
    path = tmp_path / "a.mp4"
    write_outputs(moving_square(3, 32, width), 16, path, Encoding("h264", 23))
    assert x264_settings(path)["mbtree"] == ("0" if odd else "1")
    assert x264_settings(path)["crf"] == "23.0"


def test_hevc_on_frames_a_few_ctus_small_does_not_abort_the_process():
    """x265's CU-tree corrupts the heap on 48x32 frames (the tiny profile's 48x32 preset): glibc
    aborts the muxer within a few jobs unless it is off there. In a child process, as it aborts."""
    code = ("import av\nfrom pathlib import Path\nfrom stages.encoders import Encoding, VideoOutput\n"
            "from tests.helpers import moving_square\nimport sys\nd = Path(sys.argv[1])\n"
            "for _ in range(8):\n    o = VideoOutput(d / 'a.mp4', Encoding('h265', 20, 8), 48, 32, 16)\n"
            "    for f in moving_square(9, 32, 48):\n        o.write(av.VideoFrame.from_ndarray(f, format='rgb24'))\n"
            "    o.finish()\n")
    with tempfile.TemporaryDirectory() as folder:
        run = subprocess.run([sys.executable, "-c", code, folder], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-500:]


# ---- the lossless master, against the frames the VAE process sent ----------------------------------

def test_lossless_master_equals_the_vae_frames_bit_for_bit(stack):
    p = default_params(stack.config, "t2v-A14B", prompt="a lighthouse at dusk", seed=5, steps=2, height=32,
                       width=48, num_frames=5)
    p.encoding = {"codec": "h265", "lossless_master": True}
    done = stack.driver.run(p, timeout_s=180).done
    sent = vae_frames(stack, done.job_id)
    master = stack.config.results_dir / f"{done.job_id}.mkv"
    decoded = probe(master)
    assert decoded["frames"].shape == sent.shape == (5, 32, 48, 3)
    assert np.array_equal(decoded["frames"], sent)
    assert [(o["file"], o["codec"], o["container"]) for o in done.outputs] == \
        [(f"{done.job_id}.mp4", "h265", "mp4"), (f"{done.job_id}.mkv", "ffv1", "matroska")]
    assert done.outputs[1]["bytes"] == master.stat().st_size


# ---- through the running system ---------------------------------------------------------------------

def test_hevc_10bit_job_with_master_is_listed_and_served_with_range(api_system):
    job_id = api_system.submit(prompt="a heron lands", seed=3,
                               custom_options={"codec": "h265", "bit_depth": 10, "crf": 30, "lossless_master": True})
    assert api_system.wait_final(job_id)["status"] == "completed"
    status, result = api_system.json("GET", f"/api/v1/result/{job_id}")
    assert status == 200
    mp4, mkv = result["outputs"]
    assert mp4["url"] == result["output_url"] == f"/api/v1/files/{job_id}.mp4"
    assert mkv["url"] == f"/api/v1/files/{job_id}.mkv"
    assert {k: mp4[k] for k in ("codec", "container", "width", "height", "fps")} == \
        {"codec": "h265", "container": "mp4", "width": 32, "height": 32, "fps": 16}
    assert {k: mkv[k] for k in ("codec", "container", "width", "height", "fps")} == \
        {"codec": "ffv1", "container": "matroska", "width": 32, "height": 32, "fps": 16}
    assert result["metadata"]["params"]["encoding"] == {"codec": "h265", "bit_depth": 10, "crf": 30,
                                                        "lossless_master": True}

    status, headers, video = api_system.request("GET", mp4["url"])
    assert status == 200 and len(video) == mp4["bytes"]
    got = probe(video)
    assert (got["tag"], got["pix_fmt"], got["colour"], len(got["frames"])) == ("hvc1", "yuv420p10le", YUV_709, 5)
    status, headers, master = api_system.request("GET", mkv["url"])
    assert status == 200 and headers["content-type"] == "video/x-matroska" and len(master) == mkv["bytes"]
    assert probe(master)["pix_fmt"] == "bgr0"
    status, headers, part = api_system.request("GET", mkv["url"], headers={"Range": "bytes=4-99"})
    assert status == 206 and part == master[4:100] and headers["content-range"] == f"bytes 4-99/{len(master)}"


def test_av1_job_without_a_master_has_no_mkv(api_system):
    job_id = api_system.submit(prompt="rain on a window", custom_options={"codec": "av1"})
    assert api_system.wait_final(job_id)["status"] == "completed"
    status, result = api_system.json("GET", f"/api/v1/result/{job_id}")
    assert [o["codec"] for o in result["outputs"]] == ["av1"]
    status, _, video = api_system.request("GET", result["output_url"])
    got = probe(video)
    assert (got["tag"], got["pix_fmt"], got["colour"], len(got["frames"])) == ("av01", "yuv420p", YUV_709, 5)
    status, body = api_system.json("GET", f"/api/v1/files/{job_id}.mkv")
    assert status == 404 and body["error"]["code"] == "RESULT_NOT_AVAILABLE"
    check_error_body(f"/api/v1/files/{job_id}.mkv", status, body, [str(api_system.state_dir)])
    status, body = api_system.json("GET", f"/api/v1/files/{'0' * 32}.mkv")
    assert status == 404 and body["error"]["code"] == "JOB_NOT_FOUND"


@pytest.mark.parametrize("options,field", [
    ({"codec": "h264", "upscale_to": "8k"}, "custom_options.codec"),  # 4320x4320: H.264 stops at 4K
    ({"codec": "vp9"}, "custom_options.codec"),
    ({"crf": 52}, "custom_options.crf"),
    ({"bit_depth": 9}, "custom_options.bit_depth"),
    ({"lossless_master": "yes"}, "custom_options.lossless_master"),
])
def test_what_the_encoders_cannot_do_is_refused_at_submit(api_system, options, field):
    status, body = api_system.json("POST", "/api/v1/generate", {"prompt": "x", "model": "t2v",
                                                                "quality_preset": "draft", "custom_options": options})
    assert status == 422 and body["error"]["code"] == "VALIDATION_ERROR", body
    assert body["error"]["details"]["field"] == field
    check_error_body("/api/v1/generate", status, body)
    if options.get("upscale_to") == "8k":
        assert body["error"]["details"]["allowed"] == ["av1", "h265"]
        assert "4K" in body["error"]["message"]


# ---- a failure part way leaves nothing; a job that did not complete loses every file ---------------

class FailAt(StageContext):
    def __init__(self, point: str):
        self.point = point

    def fault_point(self, name: str) -> None:
        if name == self.point:
            raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def muxer_config(tmp_path) -> Config:
    return Config.load(environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(tmp_path)})


def mux_job(config: Config, job_id: str, **encoding: Any) -> m.MuxJob:
    p = default_params(config, "t2v-A14B", prompt="x", height=32, width=48, num_frames=9)
    p.encoding = {"lossless_master": True, **encoding}
    return m.MuxJob(job_id=job_id, attempt=1, route=["muxer"], params=p, frames=torch.from_numpy(moving_square()))


def test_a_write_failure_with_every_frame_encoded_leaves_no_file(muxer_config):
    stage = MuxerStage(muxer_config, muxer_config.stage("muxer"), FailAt("write"))
    stage.setup()
    with pytest.raises(OutputError) as info:
        stage.handle(mux_job(muxer_config, "full"))
    assert info.value.details == {"errno": errno.ENOSPC, "reason": "ENOSPC"}
    assert list(muxer_config.results_dir.iterdir()) == []


class CancelAfter(StageContext):
    """Cancels the job once the muxer has asked `n` times (it asks after every frame it writes)."""

    def __init__(self, n: int):
        self.n = n

    def cancelled(self, job_id: str) -> bool:
        self.n -= 1
        return self.n < 0


def test_a_job_cancelled_while_it_is_encoded_stops_there_and_leaves_no_file(muxer_config):
    stage = MuxerStage(muxer_config, muxer_config.stage("muxer"), CancelAfter(3))
    stage.setup()
    job = mux_job(muxer_config, "cancelled")
    job.params.postprocess = {"interpolate_fps": 48, "upscale": 2.0}
    with pytest.raises(JobCancelled):
        stage.handle(job)
    assert list(muxer_config.results_dir.iterdir()) == []


def test_a_failure_after_the_master_is_in_place_removes_it_too(muxer_config, monkeypatch):
    """The master is renamed first; if the MP4's rename then fails, the job has no files at all."""
    real = encoders.replace_durably

    def replace(tmp: Path, path: Path) -> None:
        if path.suffix == ".mp4":
            raise OSError(errno.EIO, "Input/output error")
        real(tmp, path)

    monkeypatch.setattr(encoders, "replace_durably", replace)
    stage = MuxerStage(muxer_config, muxer_config.stage("muxer"))
    stage.setup()
    with pytest.raises(OutputError):
        stage.handle(mux_job(muxer_config, "halfway", codec="h265"))
    assert list(muxer_config.results_dir.iterdir()) == []


def test_files_of_a_job_that_did_not_complete_go_mp4_and_mkv(tmp_path):
    state = short_tmpdir("wse-")
    broker = Broker(Config.load(environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(state)}))
    try:
        results = broker.config.results_dir
        results.mkdir(parents=True, exist_ok=True)

        def submit_with_files() -> tuple[str, list[Path]]:
            job_id = str(broker.api.submit({"request": {"prompt": "x", "model": "t2v", "quality": "draft"}})["job_id"])
            files = [results / f"{job_id}{suffix}" for suffix in spool.RESULT_SUFFIXES]
            for f in files:
                f.write_bytes(b"\0" * 64)
            return job_id, files

        cancelled, files = submit_with_files()
        broker.api.cancel({"job_id": cancelled})  # finalize removes what an earlier attempt left
        assert not any(f.exists() for f in files)

        swept, files = submit_with_files()
        broker.store.finish(swept, "cancelled")  # its JobDone never reached the broker
        queued, pending = submit_with_files()
        broker.dispatcher.sweep_spool()
        assert not any(f.exists() for f in files) and all(f.exists() for f in pending)
    finally:
        broker.close()


@pytest.mark.parametrize("width, height, capped", [(7680, 4320, True), (4320, 7680, True), (3840, 2160, False),
                                                   (1280, 720, False)])
def test_x265_keeps_a_short_queue_above_4k_only(width, height, capped):
    """Above 4K x265 runs with a 4-frame lookahead and no B-frames, which keeps an 8K job's host
    memory under 4 GB (bench/results/x265_8k_memory.json); up to 4K it keeps its preset's queue."""
    params = Encoding("h265", 24).options(width, height)["x265-params"]
    assert ("rc-lookahead=4" in params and "bframes=0" in params) == capped, params
    assert params.startswith("log-level=error")
