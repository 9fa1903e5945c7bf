"""The TAEHV preview decoder (stages/taehv.py) on tiny random weights in the released files' layout.

The weights are built here key by key from the published layout (`decoder.N...`, small widths),
saved as .pth and .safetensors. Detection reads the family, latent channels and patch size from
them; wrong files are refused with MODEL_LOAD_ERROR naming the file; the decoder's frames equal a
frame-by-frame reference written here from the maths (the memory-block recurrence over frames, the
time grow's channels-to-frames split, nearest upsampling, the pixel shuffle); a preview through the
Previewer is a decodable image of the decoded frames' size; a DiT stage set up with the decoder
writes such previews for a job and refuses a mismatched file at startup.
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from common import messages as m
from common.config import Config, PreviewsSection
from common.errors import ModelLoadError
from stages import previews, taehv
from tests.helpers import TAEHV_WIDTHS, tiny_taehv_state

WIDTHS = TAEHV_WIDTHS
tiny_state = tiny_taehv_state


def reference_decode(state: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
    """(z, T, h, w) -> (frames, 3, H, W), one frame at a time, from the layout's maths."""
    def conv(x: torch.Tensor, index: str, bias: bool = True) -> torch.Tensor:
        w = state[f"decoder.{index}.weight"]
        return F.conv2d(x, w, state[f"decoder.{index}.bias"] if bias else None, padding=w.shape[-1] // 2)

    frames = [latents[:, t][None] for t in range(latents.shape[1])]  # each (1, z, h, w)
    frames = [torch.relu(conv(torch.tanh(x / 3) * 3, "1")) for x in frames]
    for first, nxt in ((3, "8"), (9, "14"), (15, "20")):
        for block in range(first, first + 3):
            out, past = [], torch.zeros_like(frames[0])
            for x in frames:  # memory: this block's input at the previous frame
                y = torch.relu(conv(torch.cat([x, past], 1), f"{block}.conv.0"))
                y = torch.relu(conv(y, f"{block}.conv.2"))
                out.append(torch.relu(conv(y, f"{block}.conv.4") + x))
                past = x
            frames = out
        frames = [x.repeat_interleave(2, 2).repeat_interleave(2, 3) for x in frames]  # nearest, x2
        grow = state[f"decoder.{first + 4}.conv.weight"]
        width = frames[0].shape[1]
        grow = grow[-width:] if first == 3 else grow  # the first grow: its later frame's rows
        grown = []
        for x in frames:  # channels [j*c, (j+1)*c) are the j-th new frame
            y = F.conv2d(x, grow)
            grown += [y[:, j * width:(j + 1) * width] for j in range(y.shape[1] // width)]
        frames = [conv(x, nxt, bias=False) for x in grown]
    patch = math.isqrt(state["decoder.22.bias"].shape[0] // 3)
    frames = [F.pixel_shuffle(conv(torch.relu(x), "22"), patch).clamp(0, 1) for x in frames]
    return torch.cat(frames[3:])


def rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).astype(float)


def save_pth(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save(state, path)
    return path


def load_checked(path: Path, z: int = 16, spatial: int = 8) -> taehv.TaehvDecoder:
    return taehv.load(path, latent_channels=z, spatial_scale=spatial, temporal_scale=4)


# ---- detection ----

def test_detected_from_keys_and_shapes_in_both_formats(tmp_path: Path) -> None:
    wan21 = save_pth(tmp_path / "weights.bin", tiny_state(16, 1, encoder=True))
    wan22 = tmp_path / "taew2_1.pth"  # the name says 2.1; the weights say 2.2
    save_file(tiny_state(48, 2, first_stride=2), str(wan22))
    a = taehv.build(taehv.read_state(wan21), wan21).layout
    assert (a.latent_channels, a.patch_size, a.widths, a.family, a.has_encoder) == (16, 1, WIDTHS, "wan2.1", True)
    b = taehv.build(taehv.read_state(wan22), wan22).layout
    assert (b.latent_channels, b.patch_size, b.first_grow_stride, b.family, b.spatial_scale) == (48, 2, 2, "wan2.2", 16)
    assert load_checked(wan22, z=48, spatial=16).layout == b


class Runs:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this pickle runs code",))


@pytest.mark.parametrize("case", ["missing key", "wrong shape", "bad patch", "extra key", "not a state dict",
                                  "code in the pickle", "garbage", "int weights", "latent channels", "scale"])
def test_a_wrong_file_is_refused_naming_it(tmp_path: Path, case: str, capfd: pytest.CaptureFixture[str]) -> None:
    state = tiny_state()
    path = tmp_path / "taew2_1.pth"
    z, spatial = 16, 8
    if case == "missing key":
        del state["decoder.10.conv.2.weight"]
    elif case == "wrong shape":
        state["decoder.16.conv.4.weight"] = torch.zeros(4, 4, 1, 1)
    elif case == "bad patch":
        state["decoder.22.bias"] = torch.zeros(6)
    elif case == "extra key":
        state["vae.decoder.22.bias"] = torch.zeros(3)
    elif case == "int weights":
        state["decoder.4.conv.0.bias"] = torch.zeros(WIDTHS[0], dtype=torch.int64)
    elif case == "latent channels":
        z = 48
    elif case == "scale":
        spatial = 16
    if case == "not a state dict":
        torch.save([torch.zeros(3)], path)
    elif case == "code in the pickle":
        path.write_bytes(pickle.dumps({"decoder.22.bias": Runs()}, protocol=2))
    elif case == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    else:
        save_pth(path, state)
    with pytest.raises(ModelLoadError) as caught:
        load_checked(path, z, spatial)
    assert caught.value.code == "MODEL_LOAD_ERROR"
    assert str(path) in caught.value.message and caught.value.details["path"] == str(path)
    assert "runs code" not in capfd.readouterr().out  # the pickle's code never ran


# ---- decoding ----

@pytest.mark.parametrize("z, patch, first_stride", [(16, 1, 1), (48, 2, 2)])
def test_decode_equals_the_frame_by_frame_reference_for_any_chunking(tmp_path: Path, z: int, patch: int,
                                                                     first_stride: int) -> None:
    state = tiny_state(z, patch, first_stride=first_stride, seed=z)
    model = taehv.build(state, tmp_path / "x.pth")
    latents = torch.randn(z, 3, 3, 5, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        expected = reference_decode(state, latents)
        assert expected.shape == (4 * 3 - 3, 3, 3 * 8 * patch, 5 * 8 * patch)
        assert expected.std() > 0.01  # not a flat image: the weights reach the output
        for chunk in (1, 2, 3):
            assert torch.allclose(model.decode(latents, chunk), expected, atol=1e-5), chunk
            # Only some frames through the last layers: the same frames.
            parts = list(model.chunks(latents, chunk, keep={0, 5, 8}))
            assert [i for indices, _ in parts for i in indices] == [0, 5, 8]
            assert torch.allclose(torch.cat([f for _, f in parts]), expected[[0, 5, 8]], atol=1e-5), chunk


def test_t_latent_frames_decode_to_4t_minus_3(tmp_path: Path) -> None:
    model = taehv.build(tiny_state(), tmp_path / "x.pth")
    with torch.no_grad():
        counts = [model.decode(torch.randn(16, t, 2, 3)).shape for t in (1, 2, 5)]
    assert counts == [(1, 3, 16, 24), (5, 3, 16, 24), (17, 3, 16, 24)]


# ---- previews ----

def test_a_taehv_preview_is_the_decoded_frames_in_the_grid(tmp_path: Path) -> None:
    path = save_pth(tmp_path / "d.pth", tiny_state(seed=4))
    renderer = taehv.preview_for(path, latent_channels=16, spatial_scale=8, temporal_scale=4,
                                 device=torch.device("cpu"))
    config = Config.load(environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(tmp_path)})
    latents = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        decoded = reference_decode(tiny_state(seed=4), latents[0])  # 9 frames of 32x48
    for count, fmt, shape in ((4, "webp", (64, 96)), (1, "jpeg", (32, 48))):
        writer = previews.Previewer(config, PreviewsSection(frames=count, format=fmt, quality=100), {"m": renderer})
        name = writer.write("m", f"job-{count}", 2, latents)
        assert name == f"step-0002.{previews.EXTENSIONS[fmt]}"
        image = rgb((config.job_spool(f"job-{count}") / "previews" / name).read_bytes())
        assert image.shape == (*shape, 3)
        # The reference's frames at the picked indices, laid out and encoded the same way.
        picked = (decoded[previews.picks(9, count)].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        expected = rgb(previews.encode(previews.tile(picked), fmt, 100))
        assert np.abs(image - expected).mean() < 0.5
    # A decode that fails (here: latents of another VAE) costs the preview, never the job.
    assert writer.write("m", "job-x", 3, torch.randn(1, 48, 2, 4, 6)) is None
    # Pixel resolution past the 512 px box: contained in it, the aspect kept.
    wide = renderer.frames(torch.randn(1, 16, 2, 4, 80), 4)
    assert wide.shape == (4, 32, 640, 3) and wide.dtype == np.uint8
    assert Image.open(io.BytesIO(previews.encode(previews.tile(wide), "jpeg", 80))).size == (512, 26)  # 2x2 of 640x32


def test_a_dit_stage_previews_with_taehv_and_refuses_a_mismatched_file(model_cache: Path, tmp_path: Path) -> None:
    from stages.base import StageContext
    from stages.dit import DitStage

    class Reports(StageContext):
        def __init__(self) -> None:
            self.reports: list[m.Message] = []

        def emit(self, report: m.Message) -> None:
            self.reports.append(report)

    def stage_with(decoder: Path) -> DitStage:
        config = Config.load(environ={"WAN_SERVER__RUNTIME__MODEL_CACHE_DIR": str(model_cache),
                                      "WAN_SERVER__RUNTIME__SPOOL_DIR": str(tmp_path / "spool"),
                                      "WAN_SERVER__STAGES__DIT_HIGH__MODELS": '["t2v-A14B"]',
                                      "WAN_SERVER__MODELS__T2V_A14B__PREVIEW_DECODER": str(decoder)})
        return DitStage(config, config.stage("dit_high"), Reports())

    wrong = save_pth(tmp_path / "taew2_2.pth", tiny_state(48, 2))  # Wan2.2's channels for a Wan2.1-VAE model
    with pytest.raises(ModelLoadError, match="taew2_2.pth"):
        stage_with(wrong).setup()

    stage = stage_with(save_pth(tmp_path / "taew2_1.pth", tiny_state(seed=7)))
    stage.setup()
    text_dim = stage.models["t2v-A14B"]["experts"]["transformer"].config.text_dim
    p = m.JobParams("t2v-A14B", "x", "", 0, 4, 32, 48, 9, 16, 1.0)  # 9 frames of 48x32: 3 latent frames of 6x4
    job = m.DenoiseJob(job_id="tae1", attempt=1, route=["dit_high", "dit_low"], params=p,
                       prompt_embeds=torch.randn(1, 8, text_dim, generator=torch.Generator().manual_seed(0)))
    stage.handle(job)
    assert isinstance(stage.context, Reports)
    shown = [r.preview for r in stage.context.reports if isinstance(r, m.StageReport) and r.event == "preview"]
    assert shown and all(shown)
    for name in shown:
        with Image.open(stage.config.job_spool("tae1") / "previews" / name) as image:
            assert image.size == (96, 64)  # 2x2 decoded frames of 48x32 (the projection: 12x8)


def test_previews_through_the_running_system_are_taehv_decoded(keyed_system) -> None:
    """The keyed system's DiT processes load a tiny TAEHV decoder for t2v-A14B (conftest): a t2v
    draft's preview, served by the gateway, is the decoded frames at pixel resolution (the 32x32
    video's frames in the grid), not the projection's latent-resolution picture (4x4 per frame)."""
    from tests.helpers import keyed_view

    system = keyed_view(keyed_system, "taehv-")
    job_id = system.submit(prompt="a lighthouse at dusk", seed=6)
    final = system.wait_final(job_id)
    assert final["status"] == "completed" and final["preview_url"], final
    status, _, data = system.request("GET", final["preview_url"])
    assert status == 200
    image = rgb(data)
    assert min(image.shape[:2]) >= 32, image.shape  # a 2x2 grid of 32x32 frames, or one 32x32 frame
    assert "with the TAEHV decoder" in system.log("dit_high")
