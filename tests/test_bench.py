"""bench/gpu_stage_check.py in its `--small` CPU mode: the same code path as on a GPU (models built
with random weights, handed to our DitStage / VaeStage through add_model / add_vae, timed against
diffusers on the same weights), at tiny sizes. Run as its own process, as on the GPU machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["env", "sdpa_probe", "ti2v", "a14b", "vae22_float32", "vae21_float32", "vae22_bfloat16", "vae21_bfloat16"]


def finite_positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_gpu_stage_check_small(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, "bench/gpu_stage_check.py", "--small", "--budget-s", "600", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "gpu_stage_check.json").read_text())
    assert (tmp_path / "gpu_stage_check.md").read_text().count("\n| ") >= 10

    for name in SECTIONS:
        assert name in results, f"section {name} missing"
        assert "error" not in results[name] and "skipped" not in results[name], (name, results[name])

    for key, steps in (("ti2v", [1, 2, 3]), ("a14b", [1, 2, 3])):  # a14b: the high-noise steps of 4
        d = results[key]
        assert d["stage"]["steps_run"] == steps
        assert all(finite_positive(s) for s in d["stage"]["step_s"])
        assert d["stage"]["output_finite"]
        assert finite_positive(d["direct_2x_batch1"]["median_s"])
        pipe = d["diffusers_pipeline"]
        assert pipe["steps_run"] == len(steps) and finite_positive(pipe["median_step_s"])
        # float32 on the CPU: our stage is the pipeline's loop, so its latents are the pipeline's, bit for bit.
        diff = pipe["vs_stage"]
        assert diff["all_finite"] and diff["max_abs_ref"] > 0
        assert diff["max_abs_diff"] == 0.0, diff
    assert results["ti2v"]["stage"]["output"] == "DecodeJob"  # part "all": every step, then to the VAE
    assert results["a14b"]["stage"]["output"] == "DenoiseJob (next step 3)"  # the hand-off to the low expert
    assert "vs_2x_batch1" in results["ti2v"]["direct_batch2"]

    for key in SECTIONS[4:]:
        v = results[key]
        assert finite_positive(v["stage_handle"]["handle_s"]) and finite_positive(v["direct_decode"]["decode_s"])
        frames = v["stage_handle"]["frames_shape"]
        assert frames[0] == 9 and frames[-1] == 3 and v["stage_handle"]["frames_dtype"] == "uint8"
        diff = v["direct_decode"]["vs_stage_uint8"]
        assert diff["all_finite"] and diff["max_abs_ref"] > 0
        # The stage post-processes on the device; the frames must still be the pipeline's (uint8 levels).
        assert diff["max_abs_diff"] <= (0 if v["dtype"] == "float32" else 1), (key, diff)

    compared = results["comparisons_max_abs_diff"]
    assert set(compared) == {"ti2v", "a14b", *SECTIONS[4:]}
    assert all(isinstance(x, float) and math.isfinite(x) for x in compared.values()), compared


def test_transport_small(tmp_path: Path) -> None:
    """bench/transport.py --small: every hand-off, framed and through shared memory, between two
    processes; the shared path reused one segment per message size instead of making one per run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "transport.json"
    proc = subprocess.run(
        [sys.executable, "bench/transport.py", "--small", "--runs", "2", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    names = ["text_embeddings", "a14b_handoff", "ti2v_handoff", "a14b_latents", "ti2v_latents", "frames_480p",
             "frames_720p", "chunk_4k"]
    assert list(results["handoffs"]) == names
    for h in results["handoffs"].values():
        assert h["bytes"] > 0
        assert all(finite_positive(h[mode]["median_s"]) for mode in ("framed", "shared", "memcpy"))
    assert len(results["segments"]) <= len(names)  # reused: at most one per message size
    assert (tmp_path / "transport.md").read_text().count("\n| ") == len(names) + 2


def test_draft_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/draft.py --small, in this process (its imports are loaded already): the distilled draft
    through our DiT and VAE stages with the LoRA files, the undistilled draft, and WanPipeline with
    the same LoRA and sigmas, whose frames are ours bit for bit (float32 on the CPU)."""
    from bench import draft

    monkeypatch.setattr(sys, "argv", ["draft.py", "--small", "--out", str(tmp_path)])
    draft.main()
    results = json.loads((tmp_path / "draft_cpu_small.json").read_text())
    assert (results["distilled"]["steps"], results["distilled"]["passes_per_step"]) == (4, 1)
    assert (results["undistilled"]["steps"], results["undistilled"]["passes_per_step"]) == (20, 2)
    assert results["diffusers"]["frames_vs_ours"]["identical"] is True
    assert results["distilled"]["mp4_bytes"] > 1000 and results["text_encoder"]["forward_s"] > 0
    assert "| ours, distilled | 4 x 1 |" in (tmp_path / "draft_cpu_small.md").read_text()


def test_speed_small(tmp_path: Path) -> None:
    """bench/speed.py --small (the A14B expert's levers at tiny sizes on the CPU): every lever ran
    through our DitStage and reports per-pass and per-job times; the exact levers (diffusers'
    pipeline, the compiled blocks) give the eager job's latents bit for bit, the compiled job ran
    every block call compiled, int8 is near but not equal, and the step cache reports its passes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "bench/speed.py", "--small", "--models", "a14b", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "speed_small.json").read_text())
    (a14b,) = results["models"]
    assert results["not_measured"] and a14b["flop_per_pass"] > 0
    for lever in ("eager", "diffusers_direct", "step_cache", "int8", "compiled", "diffusers_direct_compiled"):
        r = a14b[lever]
        assert "error" not in r and "skipped" not in r, (lever, r)
        assert finite_positive(r["pass_s"]), (lever, r)
    for lever in ("diffusers_direct", "compiled", "diffusers_direct_compiled"):
        assert a14b[lever]["psnr_db_vs_eager"] is None, lever  # identical latents
    assert a14b["compiled"]["compile"]["max_abs_diff"] == 0.0
    assert a14b["compiled"]["compiled_block_calls"] == 2 * 2 * a14b["steps"]  # blocks x passes
    assert 20 < a14b["int8"]["psnr_db_vs_eager"] < 100
    assert a14b["step_cache"]["passes"] == 2 * a14b["step_cache"]["steps"]
    assert (tmp_path / "speed_small.md").read_text().count("\n| ") >= 7


def test_batching_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/batching.py --small, in this process: draft jobs through our DiT stage's high part alone
    and in batches of 2 and 4; the first job's hand-off latents alone are what batch 1 gives, and a
    batch's are within the bound tests/test_batching.py states (a batch changes the last bits)."""
    from bench import batching

    monkeypatch.setattr(sys, "argv", ["batching.py", "--small", "--steps", "4", "--batches", "1", "2", "4",
                                      "--out", str(tmp_path)])
    batching.main()
    results = json.loads((tmp_path / "batching_cpu_small.json").read_text())
    rows = {row["batch"]: row for row in results["batches"]}
    assert sorted(rows) == [1, 2, 4] and all(finite_positive(row["jobs_per_minute"]) for row in rows.values())
    assert rows[1]["vs_lone"]["identical"] is True
    assert all(row["vs_lone"]["max_abs_diff"] < 1e-5 for row in rows.values())
    assert len({row["handoff_step"] for row in rows.values()}) == 1 and 0 < rows[1]["handoff_step"] < 4
    assert (tmp_path / "batching_cpu_small.md").read_text().count("\n| ") == 2 + 3  # header, rule, a row each
