"""RIFE interpolation (stages/rife.py) in the muxer's post-processing: the weights' layout and its
detection, strict loading (mismatched files refused with MODEL_LOAD_ERROR), the network against a
step-by-step reference written here from the maths, the stream's frame count and timesteps, a job
through the real MuxerStage in-process, and admission's choice and refusals.

Weights are tiny random ones in the release's key layout (reduced channel counts: the layout is
read from the shapes), saved with and without DataParallel's `module.` prefix.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from broker import admission
from common import messages as m
from common.config import Config, profile_path
from common.errors import ModelLoadError, ValidationError
from stages import postprocess, rife
from stages.encoders import Encoding, write_outputs
from stages.muxer import MuxerStage
from tests.error_bodies import check_error_body
from tests.helpers import keyed_view, moving_square, tiny_rife_layout, tiny_rife_state

TINY = tiny_rife_layout()
RELEASE = rife.Layout(head_channels=16, features=16, block_channels=(192, 128, 96, 64, 32), resconvs=8, carried=8)
tiny_state = tiny_rife_state


def save(state: dict[str, torch.Tensor], path: Path, prefix: str = "") -> Path:
    torch.save({prefix + k: v for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(tiny_state(), tmp_path_factory.mktemp("rife") / "flownet.pkl", "module.")


@pytest.fixture(scope="module")
def model(weights: Path) -> rife.Interpolator:
    return rife.Interpolator(weights)


# ---- layout, detection, strict loading --------------------------------------------------------------

def release_keys() -> dict[str, tuple[int, ...]]:
    """The v4.25/v4.26 flownet keys and shapes, listed from the architecture's description."""
    keys: dict[str, tuple[int, ...]] = {
        "encode.cnn0.weight": (16, 3, 3, 3), "encode.cnn0.bias": (16,),
        "encode.cnn1.weight": (16, 16, 3, 3), "encode.cnn1.bias": (16,),
        "encode.cnn2.weight": (16, 16, 3, 3), "encode.cnn2.bias": (16,),
        "encode.cnn3.weight": (16, 16, 4, 4), "encode.cnn3.bias": (16,),  # transposed: (in, out, k, k)
    }
    for i, (c, cin) in enumerate(zip((192, 128, 96, 64, 32), (7 + 32, 8 + 4 + 8 + 32, 52, 52, 52), strict=True)):
        keys |= {f"block{i}.conv0.0.0.weight": (c // 2, cin, 3, 3), f"block{i}.conv0.0.0.bias": (c // 2,),
                 f"block{i}.conv0.1.0.weight": (c, c // 2, 3, 3), f"block{i}.conv0.1.0.bias": (c,),
                 f"block{i}.lastconv.0.weight": (c, 4 * 13, 4, 4), f"block{i}.lastconv.0.bias": (4 * 13,)}
        for j in range(8):
            keys |= {f"block{i}.convblock.{j}.conv.weight": (c, c, 3, 3), f"block{i}.convblock.{j}.conv.bias": (c,),
                     f"block{i}.convblock.{j}.beta": (1, c, 1, 1)}
    return keys


def test_the_release_layout_has_the_published_keys_and_shapes():
    state = rife.IFNet(RELEASE).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == release_keys()
    assert rife.detect(dict(state), Path("flownet.pkl")) == RELEASE


@pytest.mark.parametrize("prefix,name", [("module.", "flownet.pkl"), ("", "rife.pth"), ("", "rife.safetensors"),
                                         ("module.", "training.pkl")])
def test_detected_from_keys_with_or_without_the_module_prefix(tmp_path, model, prefix, name):
    path = tmp_path / name
    if name == "training.pkl":  # a training checkpoint's teacher block: dropped, the rest loads strictly
        save({**tiny_state(), "teacher.conv0.0.0.weight": torch.zeros(2, 3, 3, 3)}, path, prefix)
    elif name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({prefix + k: v.contiguous() for k, v in tiny_state().items()}, str(path))
    else:
        save(tiny_state(), path, prefix)
    loaded = rife.Interpolator(path)
    assert loaded.layout == TINY and loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    state = tiny_state()
    for k, v in loaded.model.state_dict().items():  # every tensor is the file's: nothing left random
        assert torch.equal(v, state[k]), k


def broken(kind: str) -> Any:
    state: Any = tiny_state()
    if kind == "missing key":
        del state["block2.convblock.1.beta"]
    elif kind == "unexpected key":
        state["block1.extra.weight"] = torch.zeros(3)
    elif kind == "wrong shape":
        state["block1.conv0.0.0.weight"] = torch.zeros(6, TINY.later_inputs + 1, 3, 3)
    elif kind == "four blocks (an older 4.x)":
        state = {k: v for k, v in state.items() if not k.startswith("block4.")}
    elif kind == "no features between blocks":
        for i in range(5):
            state[f"block{i}.lastconv.0.weight"] = state[f"block{i}.lastconv.0.weight"][:, :24]
            state[f"block{i}.lastconv.0.bias"] = state[f"block{i}.lastconv.0.bias"][:24]
    elif kind == "not rife":
        state = {"conv.weight": torch.zeros(3, 3, 3, 3)}
    elif kind == "not finite":
        state["block0.lastconv.0.bias"][0] = float("nan")
    elif kind == "a tensor":
        state = torch.zeros(3)
    return state


@pytest.mark.parametrize("kind", ["missing key", "unexpected key", "wrong shape", "four blocks (an older 4.x)",
                                  "no features between blocks", "not rife", "not finite", "a tensor",
                                  "a pickled object", "not a pickle", "missing file"])
def test_a_file_that_does_not_match_is_refused(tmp_path, kind):
    path = tmp_path / "flownet.pkl"
    if kind == "a pickled object":
        path.write_bytes(pickle.dumps({"model": io.BytesIO(b"x")}, protocol=2))  # the restricted unpickler refuses it
    elif kind == "not a pickle":
        path.write_bytes(b"\x00garbage" * 10)
    elif kind != "missing file":
        torch.save(broken(kind), path)
    with pytest.raises(ModelLoadError) as info:
        rife.Interpolator(path)
    assert info.value.code == "MODEL_LOAD_ERROR" and str(path) in info.value.message, info.value.message
    assert info.value.details["path"] == str(path)


# ---- the network against a reference ----------------------------------------------------------------

def ref_warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp as the maths says: sample image at (x + u, y + v); grid_sample's align_corners
    grid maps -1..1 onto pixel 0..side-1."""
    _, _, h, w = image.shape
    gx = torch.linspace(-1, 1, w).view(1, 1, w).expand(image.shape[0], h, w) + flow[:, 0] / ((w - 1) / 2)
    gy = torch.linspace(-1, 1, h).view(1, h, 1).expand(image.shape[0], h, w) + flow[:, 1] / ((h - 1) / 2)
    return F.grid_sample(image, torch.stack((gx, gy), -1), mode="bilinear", padding_mode="border",
                         align_corners=True)


def ref_block(s: dict[str, torch.Tensor], i: int, x: torch.Tensor, flow: torch.Tensor | None, scale: int):
    lrelu = lambda y: F.leaky_relu(y, 0.2)  # noqa: E731
    down = lambda y, f: F.interpolate(y, scale_factor=f, mode="bilinear", align_corners=False)  # noqa: E731
    x = down(x, 1 / scale)
    if flow is not None:
        x = torch.cat((x, down(flow, 1 / scale) / scale), 1)
    p = f"block{i}."
    x = lrelu(F.conv2d(x, s[p + "conv0.0.0.weight"], s[p + "conv0.0.0.bias"], stride=2, padding=1))
    x = lrelu(F.conv2d(x, s[p + "conv0.1.0.weight"], s[p + "conv0.1.0.bias"], stride=2, padding=1))
    for j in range(TINY.resconvs):
        q = f"{p}convblock.{j}."
        x = lrelu(F.conv2d(x, s[q + "conv.weight"], s[q + "conv.bias"], padding=1) * s[q + "beta"] + x)
    x = F.conv_transpose2d(x, s[p + "lastconv.0.weight"], s[p + "lastconv.0.bias"], stride=2, padding=1)
    x = down(F.pixel_shuffle(x, 2), scale)
    return x[:, :4] * scale, x[:, 4:5], x[:, 5:]


def ref_ifnet(s: dict[str, torch.Tensor], img0: torch.Tensor, img1: torch.Tensor, t: float) -> torch.Tensor:
    def encode(x: torch.Tensor) -> torch.Tensor:
        for k in range(3):
            x = F.leaky_relu(F.conv2d(x, s[f"encode.cnn{k}.weight"], s[f"encode.cnn{k}.bias"], stride=2 if k == 0
                                      else 1, padding=1), 0.2)
        return F.conv_transpose2d(x, s["encode.cnn3.weight"], s["encode.cnn3.bias"], stride=2, padding=1)

    f0, f1 = encode(img0), encode(img1)
    tmap = torch.full_like(img0[:, :1], t)
    flow, mask, feat = ref_block(s, 0, torch.cat((img0, img1, f0, f1, tmap), 1), None, 16)
    for i, scale in zip(range(1, 5), (8, 4, 2, 1), strict=True):
        w0, w1 = ref_warp(img0, flow[:, :2]), ref_warp(img1, flow[:, 2:4])
        x = torch.cat((w0, w1, ref_warp(f0, flow[:, :2]), ref_warp(f1, flow[:, 2:4]), tmap, mask, feat), 1)
        delta, mask, feat = ref_block(s, i, x, flow, scale)
        flow = flow + delta
    m = torch.sigmoid(mask)
    return ref_warp(img0, flow[:, :2]) * m + ref_warp(img1, flow[:, 2:4]) * (1 - m)


def test_the_network_equals_the_reference_at_any_timestep(model):
    torch.manual_seed(1)
    img0, img1 = torch.rand(1, 3, 64, 128), torch.rand(1, 3, 64, 128)
    state = tiny_state()
    with torch.inference_mode():
        ours = model.model(img0, img1, torch.tensor([0.25, 0.5, 0.8]))
        for b, t in enumerate((0.25, 0.5, 0.8)):
            ref = ref_ifnet(state, img0, img1, t)
            assert torch.allclose(ours[b:b + 1], ref, atol=1e-5), (t, (ours[b:b + 1] - ref).abs().max())
        # the flow is not nothing: the result is no plain blend of the two frames
        assert (ours[1] - (img0[0] + img1[0]) / 2).abs().mean() > 1e-3


def test_half_precision_stays_close_to_float32():
    """What a CUDA muxer with dtype = float16 / bfloat16 runs (here bfloat16, which the CPU has):
    the warps sample in float32, so only the convs' rounding shows."""
    torch.manual_seed(2)
    img0, img1 = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    net = rife.IFNet(TINY)
    net.load_state_dict(tiny_state())
    with torch.inference_mode():
        full = net(img0, img1, torch.tensor([0.3]))
        half = net.to(torch.bfloat16)(img0.bfloat16(), img1.bfloat16(), torch.tensor([0.3]))
    assert half.dtype == torch.bfloat16 and (half.float() - full).abs().mean() < 0.01  # measured: 0.0014


# ---- the stream: frame count, timesteps, rate -----------------------------------------------------------

@pytest.mark.parametrize("fps,target", [(16, 60), (16, 32), (24, 48), (16, 48), (16, 24)])
def test_output_times_are_k_times_fps_over_target(fps, target):
    n = 9
    times = [(i, t) for i in range(n - 1) for t in rife.output_times(fps, target, i)]
    every = [Fraction(k * fps, target) for k in range(postprocess.Plan(8, 8, fps, 8, 8, target).out_frames(n))]
    ends_on_last = every[-1] == n - 1
    assert [i + t for i, t in times] + ([Fraction(n - 1)] if ends_on_last else []) == every
    assert all(0 <= t < 1 for _, t in times)


def test_the_stream_yields_the_minterpolate_count_with_source_frames_on_whole_times(model):
    frames = moving_square(5, 40, 72)  # padded to 64 x 128 inside, cropped back
    out = list(rife.interpolate(model, frames, 16, 60))
    assert len(out) == postprocess.Plan(72, 40, 16, 72, 40, 60).out_frames(5) == 16
    assert all(o.shape == (40, 72, 3) and o.dtype == np.uint8 for o in out)
    # output k shows source time k * 16 / 60: whole at k = 0, 15 (frames 0 and 4), in between elsewhere
    assert np.array_equal(out[0], frames[0]) and np.array_equal(out[15], frames[4])
    a, b = model.prepare(frames[1]), model.prepare(frames[2])
    # k = 4..7 fall in [1, 2), at 1 + 1/15, 5/15, 9/15, 13/15 (k x 16 / 60)
    expected = model.between(a, b, [1 / 15, 5 / 15, 9 / 15, 13 / 15], 40, 72)
    for got, want in zip(out[4:8], expected, strict=True):
        assert np.array_equal(got, want)
    assert not np.array_equal(out[4], frames[1])


def decoded(path: Path) -> tuple[list[np.ndarray], Any]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], stream.average_rate


def test_rife_then_upscale_streams_into_the_mp4(tmp_path, model):
    frames = moving_square(5, 32, 48)
    plan = postprocess.Plan(48, 32, 16, 96, 64, 60, "rife", model)
    write_outputs(frames, 16, tmp_path / "r.mp4", Encoding("h264", 0), plan=plan)
    out, rate = decoded(tmp_path / "r.mp4")
    assert (len(out), out[0].shape, rate) == (16, (64, 96, 3), 60)
    assert plan.applied()["interpolation"] == {"method": "rife", "from_fps": 16, "fps": 60, **model.describe()}


# ---- the muxer stage: startup and one job -------------------------------------------------------------

def muxer_config(tmp_path: Path, weights: Path | None) -> Config:
    env = {"WAN_SERVER__RUNTIME__STATE_DIR": str(tmp_path)}
    if weights is not None:
        env["WAN_SERVER__STAGES__MUXER__RIFE_WEIGHTS"] = f'"{weights}"'
    return Config.load(environ=env)


def test_a_job_through_the_muxer_with_rife(tmp_path, weights):
    config = muxer_config(tmp_path, weights)
    _, p, _ = admission.resolve(config, {"prompt": "x", "model": "t2v", "quality_preset": "standard",
                                         "custom_options": {"interpolate_fps": 60, "num_frames": 5}})
    assert p.postprocess == {"interpolate_fps": 60, "interpolate_method": "rife"}  # configured: the default
    stage = MuxerStage(config, config.stage("muxer"))
    stage.setup()
    (done,) = stage.handle(m.MuxJob(job_id="rife1", attempt=1, route=["muxer"], params=p,
                                    frames=torch.from_numpy(moving_square(5, p.height, p.width))))
    assert isinstance(done, m.JobDone)
    applied = done.postprocess["interpolation"]
    assert (applied["method"], applied["sha256"], applied["model"]) == \
        ("rife", hashlib.sha256(weights.read_bytes()).hexdigest(), "flownet.pkl")
    assert (done.postprocess["fps"], done.postprocess["width"], done.fps, done.num_frames) == (60, p.width, 60, 16)
    out, rate = decoded(Path(done.path))
    assert (len(out), rate, out[0].shape[:2]) == (16, 60, (p.height, p.width))


def test_a_muxer_with_mismatched_weights_does_not_start(tmp_path):
    bad = tmp_path / "flownet.pkl"
    torch.save(broken("wrong shape"), bad)
    config = muxer_config(tmp_path, bad)
    with pytest.raises(ModelLoadError) as info:
        MuxerStage(config, config.stage("muxer")).setup()
    assert str(bad) in info.value.message and "shape" in info.value.message
    # (stage_main turns it into one structured line and exit status 3: tests/test_official_layout.py)


# ---- admission ----------------------------------------------------------------------------------------

def resolve(config: Config, **options: Any) -> dict[str, Any]:
    _, p, _ = admission.resolve(config, {"prompt": "x", "model": "t2v", "quality_preset": "standard",
                                         "custom_options": options})
    return p.postprocess


def test_admission_chooses_and_refuses_the_method(tmp_path, weights):
    plain = Config.load(profile_path("single-gpu"), environ={})
    assert resolve(plain, interpolate_fps=60) == {"interpolate_fps": 60}  # minterpolate, as before
    with pytest.raises(ValidationError) as info:
        resolve(plain, interpolate_fps=60, interpolate_method="rife")
    assert info.value.details == {"field": "custom_options.interpolate_method", "method": "rife",
                                  "allowed": ["minterpolate"]}
    with pytest.raises(ValidationError) as info:
        resolve(plain, interpolate_method="minterpolate")  # nothing to interpolate
    assert info.value.details["field"] == "custom_options.interpolate_method"
    configured = muxer_config(tmp_path, weights)
    assert resolve(configured, interpolate_fps=32, interpolate_method="minterpolate") == \
        {"interpolate_fps": 32, "interpolate_method": "minterpolate"}
    assert resolve(configured) == {}


def test_rife_without_weights_is_a_422_over_http(api_system):
    status, body = api_system.json("POST", "/api/v1/generate", {
        "prompt": "x", "model": "t2v", "custom_options": {"interpolate_fps": 32, "interpolate_method": "rife"}})
    assert status == 422 and body["error"]["details"]["field"] == "custom_options.interpolate_method", body
    check_error_body("/api/v1/generate", status, body)


def test_a_job_through_the_running_system_is_interpolated_by_rife(keyed_system):
    """The keyed system's muxer loads tiny RIFE weights at startup (conftest): a t2v draft (5 frames
    at 16 fps) asked for 32 fps gets RIFE by default, through the broker's admission and the muxer
    process; the MP4 has 9 frames at 32 fps and the result names rife and the file's sha256."""
    system = keyed_view(keyed_system, "rife-")
    job_id = system.submit(prompt="a paper boat on a stream", seed=4, custom_options={"interpolate_fps": 32})
    assert system.wait_final(job_id)["status"] == "completed"
    status, body = system.json("GET", f"/api/v1/result/{job_id}")
    assert status == 200, body
    applied = body["metadata"]["postprocess"]["applied"]
    weights = keyed_system.state_dir / "flownet.pkl"
    assert applied["interpolation"]["method"] == "rife", applied
    assert applied["interpolation"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    status, _, mp4 = system.request("GET", f"/api/v1/files/{job_id}.mp4")
    assert status == 200
    frames, rate = decoded_bytes(mp4)
    assert (len(frames), rate) == (9, 32)


def decoded_bytes(data: bytes) -> tuple[list[np.ndarray], Any]:
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], stream.average_rate
