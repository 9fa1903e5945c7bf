"""Live previews: the DiT stages write the x0 prediction as a small image while they denoise, the
broker announces it, the gateway forwards the event and serves the image to the job's owner only.

Through the running system (the tiny profile has previews on, one every step): events in order
with the right step numbers, decodable images, `preview_url` in the status, a cancelled job's
previews gone. The owner check (another user's preview is 404) is in tests/test_auth.py, on its
system with API keys. The fit of a projection for a VAE without a published one is a unit test.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

from broker.broker import Broker
from common import messages as m
from common import spool
from common.config import Config, PreviewsSection
from stages import previews
from tests.helpers import System, wait_for


def decode_image(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data), mode="r") as container:
        frame = next(container.decode(video=0))
        return frame.to_ndarray(format="rgb24")


def follow(system: System, job_id: str) -> list[dict[str, Any]]:
    """Every event of the job over the WebSocket, snapshot to complete/error."""
    from websockets.sync.client import connect

    events: list[dict[str, Any]] = []
    with connect(f"ws://127.0.0.1:{system.port}/ws", open_timeout=30) as ws:
        ws.send(json.dumps({"action": "subscribe", "job_id": job_id}))
        while True:
            event = json.loads(ws.recv(timeout=120))
            events.append(event)
            if event["event"] in ("complete", "error") or event.get("status") in ("failed", "cancelled"):
                return events


# ---- unit: the least-squares fit ----

def test_the_fit_recovers_a_known_linear_projection() -> None:
    """A 'VAE' whose decode is exactly a linear map per latent pixel (then upsampled 8x in space and
    4x in time, as the Wan VAEs lay frames out) gives back that map."""
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(16, 3, generator=g) * 0.05, torch.randn(3, generator=g) * 0.1  # within [-1, 1]

    def decode(z: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("bcfhw,cr->brfhw", z, weight) + bias.view(1, 3, 1, 1, 1)
        rgb = rgb.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)
        return torch.cat([rgb[:, :, :1], rgb[:, :, 1:].repeat_interleave(4, dim=2)], dim=2) * 0.5

    fit = previews.fit_projection(decode, 16, 8, 4)
    assert fit.source == "fit"
    assert torch.allclose(fit.weight, weight * 0.5, atol=1e-5) and torch.allclose(fit.bias, bias * 0.5, atol=1e-5)


def test_published_projections_are_recognised_by_architecture_not_name() -> None:
    from stages.official_keys import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, latents_stats

    mean, std = latents_stats(False)
    assert previews.vae_family({"z_dim": 16, "base_dim": 96, "latents_mean": mean, "latents_std": std}) == "wan2.1"
    wan22 = {"z_dim": 48, "base_dim": 160, "is_residual": True, "latents_mean": WAN22_LATENTS_MEAN,
             "latents_std": WAN22_LATENTS_STD}
    assert previews.vae_family(wan22) == "wan2.2"
    # The tiny models: the same latent statistics, another size: fitted, not published.
    assert previews.vae_family({**wan22, "base_dim": 8}) is None
    assert previews.published("wan2.2").weight.shape == (48, 3)
    assert previews.published("wan2.1").weight.shape == (16, 3)


def test_grid_and_size_bound() -> None:
    frames = np.arange(21, dtype=np.uint8).reshape(21, 1, 1, 1).repeat(3, 3).repeat(90, 1).repeat(160, 2)
    image = previews.grid(frames, 4)
    assert image.shape == (180, 320, 3)
    assert [image[0, 0, 0], image[0, 160, 0], image[90, 0, 0], image[90, 160, 0]] == [0, 7, 13, 20]
    assert previews.grid(frames, 1)[0, 0, 0] == 10
    big = np.zeros((1200, 700, 3), dtype=np.uint8)
    assert decode_image(previews.encode(big, "jpeg", 80)).shape == (512, 299, 3)
    assert decode_image(previews.encode(big, "webp", 80)).shape == (512, 299, 3)


def test_previews_are_throttled_but_always_at_the_hand_off_and_the_last_step(tmp_path: Path) -> None:
    config = Config.load(environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(tmp_path)})
    writer = previews.Previewer(config, PreviewsSection(interval_s=3600.0), {"m": previews.published("wan2.1")})
    assert writer.due("job", False)  # the first one
    assert writer.write("m", "job", 1, torch.zeros(1, 16, 2, 4, 4)) == "step-0001.jpg"
    assert not writer.due("job", False)  # within interval_s of it
    assert writer.due("job", True)  # a hand-off or the last step
    assert writer.due("other", False)  # per job
    assert writer.write("nope", "job", 2, torch.zeros(1, 16, 2, 4, 4)) is None  # no projection for that model
    data = (config.job_spool("job") / "previews" / "step-0001.jpg").read_bytes()
    # All-zero latents project to the bias: the published Wan2.1 one, mapped from [-1, 1] to 0..255.
    expected = np.round((np.array(previews.WAN21_BIAS) + 1) * 127.5)
    assert np.abs(decode_image(data).astype(float) - expected).max() <= 3


# ---- through the running system ----

def test_preview_events_in_order_and_images_served(api_system: System) -> None:
    steps = 4
    job_id = api_system.submit(prompt="a fox", seed=5, custom_options={"steps": steps})
    events = follow(api_system, job_id)
    assert events[-1]["event"] == "complete", events[-3:]
    shown = [e for e in events if e["event"] == "preview"]
    # Every step previews in the tiny profile (interval_s = 0): dit_high runs the steps before the
    # boundary, dit_low the rest; steps count the job's whole schedule.
    assert [e["step"] for e in shown] == list(range(1, steps + 1)), shown
    assert all(e["steps"] == steps and e["job_id"] == job_id for e in shown)
    assert {e["stage"] for e in shown} == {"dit_high", "dit_low"}
    assert [e["frame_url"] for e in shown] == [f"/api/v1/previews/{job_id}/step-{n:04d}.jpg" for n in range(1, 5)]
    # Each preview comes after its step's progress event, and all of them before the complete event.
    kinds = [e["event"] for e in events]
    assert max(i for i, k in enumerate(kinds) if k == "preview") < kinds.index("complete")
    assert kinds.index("preview") > kinds.index("progress")

    # The completed job keeps its latest preview beside the MP4; the ones before went with the spool.
    status, body = api_system.json("GET", f"/api/v1/status/{job_id}")
    assert status == 200 and body["preview_url"] == shown[-1]["frame_url"]
    code, headers, data = api_system.request("GET", body["preview_url"])
    assert code == 200 and headers["content-type"] == "image/jpeg"
    image = decode_image(data)
    assert image.shape == (4, 8, 3)  # draft: 32x32, 5 frames -> 4x4 latents x 2 latent frames, side by side
    code, _, _ = api_system.request("GET", shown[0]["frame_url"])
    assert code == 404
    assert not spool.job_dir(api_system.config, job_id).exists()


def test_a_running_jobs_preview_is_served_and_a_cancelled_jobs_previews_go(api_system: System) -> None:
    # Long enough that it still runs when the first preview shows (as test_api's cancel test).
    job_id = api_system.submit(prompt="a fox", seed=6, custom_options={"steps": 100, "resolution": "64x64"})

    def previewed() -> dict[str, Any] | None:
        status, body = api_system.json("GET", f"/api/v1/status/{job_id}")
        return body if status == 200 and body.get("preview_url") else None

    body = wait_for(previewed, 120, "a preview of the running job")
    code, headers, data = api_system.request("GET", body["preview_url"])
    assert code == 200 and decode_image(data).shape == (8, 16, 3), body  # 8x8 latents x 2 frames
    folder = spool.job_dir(api_system.config, job_id) / "previews"
    assert any(folder.iterdir())
    status, _ = api_system.json("POST", f"/api/v1/cancel/{job_id}")
    assert status == 200
    # Gone with the spool folder, also one a DiT wrote just after the cancel.
    wait_for(lambda: not folder.exists(), 30, "the cancelled job's previews to be removed")
    code, _, _ = api_system.request("GET", body["preview_url"])
    assert code == 404
    status, final = api_system.json("GET", f"/api/v1/status/{job_id}")
    assert final["status"] == "cancelled" and final["preview_url"] is None


def test_preview_names_never_become_paths(api_system: System) -> None:
    job_id = api_system.submit(prompt="a fox", seed=7)
    api_system.wait_final(job_id)
    for name in ("..%2F..%2Fjobs.sqlite3", "step-0001.png", "step-1.jpg", f"{job_id}.mp4"):
        code, _, _ = api_system.request("GET", f"/api/v1/previews/{job_id}/{name}")
        assert code == 404, name


def test_projection_fit_is_cached_beside_the_models(api_system: System) -> None:
    fits = api_system.config.model_cache_dir / previews.FIT_DIR
    assert sorted(fits.glob("*.json"))  # the DiT stages fitted the tiny VAEs at startup
    body = json.loads(next(fits.glob("*.json")).read_text())
    assert body["version"] == previews.FIT_VERSION and len(body["bias"]) == 3


# ---- the broker's side, in-process (its real store and files; no stage runs) ----

def preview_report(job_id: str, attempt: int, step: int) -> m.StageReport:
    return m.StageReport(job_id, attempt, "dit_high", "preview", step, 4, time.time(),
                         preview=spool.preview_name(step, "jpg"))


def test_a_completed_job_keeps_its_latest_preview_until_its_mp4_goes(broker: Broker) -> None:
    job_id = str(broker.api.submit({"request": {"prompt": "x", "model": "t2v", "quality": "draft"}})["job_id"])
    attempt = broker.store.start(job_id)
    assert attempt == 1
    for step in (1, 2):
        spool.write_preview(broker.config, job_id, spool.preview_name(step, "jpg"), b"\xff\xd8 step %d" % step)
        broker.on_report(preview_report(job_id, attempt, step))
    assert broker.api.status({"job_id": job_id})["preview_url"] == f"/api/v1/previews/{job_id}/step-0002.jpg"
    broker.on_report(m.StageReport(job_id, attempt, "dit_high", "preview", 3, 4, preview="../../jobs.sqlite3"))
    assert broker.api.status({"job_id": job_id})["preview_url"].endswith("step-0002.jpg")  # a bad name is ignored
    mp4 = broker.config.results_dir / f"{job_id}.mp4"
    mp4.parent.mkdir(parents=True, exist_ok=True)
    mp4.write_bytes(b"mp4")
    broker.on_report(m.JobDone(job_id=job_id, attempt=attempt, path=str(mp4), num_frames=5, width=32, height=32,
                               fps=16))
    kept = spool.kept_preview_path(broker.config, job_id, "step-0002.jpg")
    assert kept.read_bytes() == b"\xff\xd8 step 2" and not spool.job_dir(broker.config, job_id).exists()
    assert broker.api.status({"job_id": job_id})["preview_url"].endswith("step-0002.jpg")
    assert spool.remove_result(broker.config, job_id)
    assert not kept.exists()


def test_a_preview_written_after_the_cancel_is_removed_when_its_report_comes(broker: Broker) -> None:
    job_id = str(broker.api.submit({"request": {"prompt": "x", "model": "t2v", "quality": "draft"}})["job_id"])
    attempt = broker.store.start(job_id)
    assert attempt == 1
    broker.api.cancel({"job_id": job_id})
    path = spool.write_preview(broker.config, job_id, "step-0001.jpg", b"\xff\xd8")  # the DiT was mid-step
    broker.on_report(preview_report(job_id, attempt, 1))
    assert not path.exists() and not spool.job_dir(broker.config, job_id).exists()
    assert broker.api.status({"job_id": job_id})["preview_url"] is None


def test_a_preview_written_after_the_job_was_deleted_is_removed(broker: Broker) -> None:
    job_id = str(broker.api.submit({"request": {"prompt": "x", "model": "t2v", "quality": "draft"}})["job_id"])
    attempt = broker.store.start(job_id)
    assert attempt == 1
    broker.api.cancel({"job_id": job_id})
    assert broker.api.delete({"job_id": job_id})["deleted"] is True
    path = spool.write_preview(broker.config, job_id, "step-0001.jpg", b"\xff\xd8")  # the DiT was mid-step
    broker.on_report(preview_report(job_id, attempt, 1))
    assert not path.exists() and not spool.job_dir(broker.config, job_id).exists()
