"""Model upscaling (stages/upscale.py) in the muxer's post-processing: the two architectures'
layouts and their detection, strict loading (mismatched files refused with MODEL_LOAD_ERROR), the
networks against step-by-step references written here from the maths, tiling against the untiled
network, the pipeline (model, then Lanczos to the exact size), a job through the real MuxerStage
in-process and through the running system, and admission's choice and refusals.

Weights are tiny random ones in the releases' key layouts (tests/helpers.py lists the keys from
the architectures, independently of the module), saved plain, `params_ema`- or `params`-wrapped,
with DataParallel's `module.` prefix, and as safetensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import subprocess
import sys
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
from stages import postprocess, rife, upscale
from stages.encoders import Encoding, write_outputs
from stages.muxer import MuxerStage
from tests.error_bodies import check_error_body
from tests.helpers import keyed_view, moving_square, tiny_rife_state, tiny_rrdb_state, tiny_srvgg_state

ROOT = Path(__file__).resolve().parent.parent


def save(state: dict[str, torch.Tensor], path: Path, wrap: str | None = None, prefix: str = "") -> Path:
    state = {prefix + k: v for k, v in state.items()}
    torch.save(state if wrap is None else {wrap: state}, path)
    return path


@pytest.fixture(scope="module")
def srvgg_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(tiny_srvgg_state(), tmp_path_factory.mktemp("sr") / "realesr-tiny-x2.pth", "params")


# ---- layouts, detection, strict loading -----------------------------------------------------------

def test_release_layouts_have_the_published_keys_and_are_detected():
    """realesr-animevideov3 (64 features, 16 convs, x4), realesr-general-x4v3 (32 convs),
    RealESRGAN_x4plus (23 RRDBs, 32 growth) and x2plus (12 input channels) as the networks here
    build them: the key names and shapes of the release files, and detection reads them back."""
    compact = upscale.Layout(upscale.SRVGG, 4, 64, num_conv=16)
    keys = {k: tuple(v.shape) for k, v in upscale.network(compact).state_dict().items()}
    assert keys == {k: tuple(v.shape) for k, v in tiny_srvgg_state(64, 16, 4).items()}
    assert len(keys) == 3 * 17 + 2 and keys["body.34.weight"] == (48, 64, 3, 3) and keys["body.33.weight"] == (64,)
    for layout in (compact, upscale.Layout(upscale.SRVGG, 4, 64, num_conv=32),
                   upscale.Layout(upscale.RRDB, 4, 64, num_block=23, num_grow_ch=32),
                   upscale.Layout(upscale.RRDB, 2, 64, num_block=23, num_grow_ch=32)):
        with torch.device("meta"):  # shapes only
            state = upscale.network(layout).state_dict()
        assert upscale.detect(dict(state), Path("x.pth")) == layout
    with torch.device("meta"):
        x2plus = upscale.network(upscale.Layout(upscale.RRDB, 2, 64, num_block=23, num_grow_ch=32)).state_dict()
    assert tuple(x2plus["conv_first.weight"].shape) == (64, 12, 3, 3)
    assert tuple(x2plus["body.22.rdb3.conv5.weight"].shape) == (64, 64 + 4 * 32, 3, 3)
    assert {k: tuple(v.shape) for k, v in x2plus.items()} == \
        {k: tuple(v.shape) for k, v in tiny_rrdb_state(64, 23, 32, scale=2).items()}


@pytest.mark.parametrize("kind,wrap,prefix,layout", [
    ("srvgg", "params", "", upscale.Layout(upscale.SRVGG, 2, 4, num_conv=2)),
    ("srvgg", None, "module.", upscale.Layout(upscale.SRVGG, 2, 4, num_conv=2)),
    ("srvgg-safetensors", None, "", upscale.Layout(upscale.SRVGG, 2, 4, num_conv=2)),
    ("rrdb", "params_ema", "", upscale.Layout(upscale.RRDB, 4, 4, num_block=1, num_grow_ch=2)),
    ("rrdb-x2", "params_ema", "", upscale.Layout(upscale.RRDB, 2, 4, num_block=1, num_grow_ch=2)),
])
def test_detected_from_keys_and_loaded_with_every_tensor(tmp_path, kind, wrap, prefix, layout):
    state = tiny_srvgg_state() if kind.startswith("srvgg") else tiny_rrdb_state(scale=layout.scale)
    if kind.endswith("safetensors"):
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = save(state, tmp_path / "w.pth", wrap, prefix)
    loaded = upscale.Upscaler(path)
    assert loaded.layout == layout and loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for k, v in loaded.model.state_dict().items():  # every tensor is the file's: nothing left random
        assert torch.equal(v, state[k]), k


def test_params_ema_is_preferred_to_params(tmp_path):
    ema, plain = tiny_srvgg_state(seed=1), tiny_srvgg_state(seed=2)
    torch.save({"params": plain, "params_ema": ema}, tmp_path / "both.pth")
    loaded = upscale.Upscaler(tmp_path / "both.pth")
    assert torch.equal(loaded.model.state_dict()["body.0.weight"], ema["body.0.weight"])


class RunsCode:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("true",))  # never run: the restricted unpickler refuses the global


def broken(kind: str) -> Any:
    srvgg: Any = tiny_srvgg_state()
    rrdb: Any = tiny_rrdb_state()
    if kind == "srvgg missing key":
        del srvgg["body.3.weight"]
        return srvgg
    if kind == "srvgg wrong shape":
        srvgg["body.2.weight"] = torch.zeros(4, 5, 3, 3)
        return srvgg
    if kind == "srvgg unexpected key":
        srvgg["upsampler.weight"] = torch.zeros(3)
        return srvgg
    if kind == "srvgg last conv not 3 x scale^2":
        srvgg["body.6.weight"], srvgg["body.6.bias"] = torch.zeros(10, 4, 3, 3), torch.zeros(10)
        return srvgg
    if kind == "srvgg without prelu (relu)":
        return {k: v for k, v in srvgg.items() if v.ndim != 1 or k.endswith("bias")}
    if kind == "rrdb missing key":
        del rrdb["body.0.rdb2.conv4.bias"]
        return rrdb
    if kind == "rrdb wrong growth":
        rrdb["body.0.rdb3.conv2.weight"] = torch.zeros(2, 7, 3, 3)
        return rrdb
    if kind == "rrdb 6 input channels":
        rrdb["conv_first.weight"] = torch.zeros(4, 6, 3, 3)
        return rrdb
    if kind == "rrdb with conv_up3 (x8)":
        rrdb["conv_up3.weight"], rrdb["conv_up3.bias"] = torch.zeros(4, 4, 3, 3), torch.zeros(4)
        return rrdb
    if kind == "not finite":
        srvgg["body.0.bias"][1] = float("inf")
        return srvgg
    if kind == "old esrgan keys":
        return {"model.0.weight": torch.zeros(4, 3, 3, 3), "model.0.bias": torch.zeros(4)}
    if kind == "a tensor":
        return torch.zeros(3)
    if kind == "a list":
        return [torch.zeros(3)]
    raise AssertionError(kind)


KINDS = ["srvgg missing key", "srvgg wrong shape", "srvgg unexpected key", "srvgg last conv not 3 x scale^2",
         "srvgg without prelu (relu)", "rrdb missing key", "rrdb wrong growth", "rrdb 6 input channels",
         "rrdb with conv_up3 (x8)", "not finite", "old esrgan keys", "a tensor", "a list"]


@pytest.mark.parametrize("kind", [*KINDS, "a pickle that runs code", "not a pickle", "missing file"])
def test_a_file_that_does_not_match_is_refused(tmp_path, kind):
    path = tmp_path / "model.pth"
    if kind == "a pickle that runs code":
        path.write_bytes(pickle.dumps({"params": RunsCode()}, protocol=2))
    elif kind == "not a pickle":
        path.write_bytes(b"\x00garbage" * 10)
    elif kind != "missing file":
        torch.save(broken(kind), path)
    with pytest.raises(ModelLoadError) as info:
        upscale.Upscaler(path)
    assert info.value.code == "MODEL_LOAD_ERROR" and str(path) in info.value.message, info.value.message
    assert info.value.details["path"] == str(path)


# ---- the networks against references --------------------------------------------------------------

def ref_pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """out[c, h r + i, w r + j] = in[c r^2 + i r + j, h, w]."""
    b, c, h, w = x.shape
    return x.view(b, c // (r * r), r, r, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (r * r), h * r, w * r)


def ref_pixel_unshuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """The inverse: out[c r^2 + i r + j, h, w] = in[c, h r + i, w r + j]."""
    b, c, h, w = x.shape
    return x.view(b, c, h // r, r, w // r, r).permute(0, 1, 3, 5, 2, 4).reshape(b, c * r * r, h // r, w // r)


def ref_nearest(x: torch.Tensor, r: int) -> torch.Tensor:
    return x.repeat_interleave(r, 2).repeat_interleave(r, 3)


def conv(s: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, s[f"{name}.weight"], s[f"{name}.bias"], padding=1)


def ref_srvgg(s: dict[str, torch.Tensor], x: torch.Tensor, num_conv: int, scale: int) -> torch.Tensor:
    y = x
    for i in range(num_conv + 1):
        y = conv(s, f"body.{2 * i}", y)
        a = s[f"body.{2 * i + 1}.weight"].view(1, -1, 1, 1)
        y = torch.clamp(y, min=0) + a * torch.clamp(y, max=0)  # PReLU
    y = conv(s, f"body.{2 * num_conv + 2}", y)
    return ref_pixel_shuffle(y, scale) + ref_nearest(x, scale)


def ref_rrdb(s: dict[str, torch.Tensor], x: torch.Tensor, num_block: int, scale: int) -> torch.Tensor:
    lrelu = lambda y: torch.where(y >= 0, y, 0.2 * y)  # noqa: E731
    if scale < 4:
        x = ref_pixel_unshuffle(x, 4 // scale)
    first = conv(s, "conv_first", x)
    y = first
    for b in range(num_block):
        block_in = y
        for r in (1, 2, 3):
            feats = [y]
            for k in range(1, 5):
                feats.append(lrelu(conv(s, f"body.{b}.rdb{r}.conv{k}", torch.cat(feats, 1))))
            y = y + 0.2 * conv(s, f"body.{b}.rdb{r}.conv5", torch.cat(feats, 1))
        y = block_in + 0.2 * y
    y = first + conv(s, "conv_body", y)
    y = lrelu(conv(s, "conv_up1", ref_nearest(y, 2)))
    y = lrelu(conv(s, "conv_up2", ref_nearest(y, 2)))
    return conv(s, "conv_last", lrelu(conv(s, "conv_hr", y)))


@pytest.mark.parametrize("arch,scale", [("srvgg", 2), ("srvgg", 3), ("rrdb", 4), ("rrdb", 2)])
def test_the_networks_equal_the_references(arch, scale):
    torch.manual_seed(3)
    x = torch.rand(1, 3, 12, 20)
    if arch == "srvgg":
        state, layout = tiny_srvgg_state(scale=scale), upscale.Layout(upscale.SRVGG, scale, 4, num_conv=2)
        ref = ref_srvgg(state, x, 2, scale)
    else:
        state = tiny_rrdb_state(num_block=2, scale=scale)
        layout = upscale.Layout(upscale.RRDB, scale, 4, num_block=2, num_grow_ch=2)
        ref = ref_rrdb(state, x, 2, scale)
    net = upscale.build(state, Path("w.pth"))
    assert net.layout == layout
    with torch.inference_mode():
        ours = net(x)
    assert ours.shape == (1, 3, 12 * scale, 20 * scale) and torch.allclose(ours, ref, atol=1e-5), \
        (ours - ref).abs().max()
    assert (ours - ref_nearest(x, scale)).abs().mean() > 1e-3  # the network adds something of its own


# ---- tiling ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["srvgg", "rrdb-x2"])
def test_tiled_equals_untiled_with_the_overlap_of_the_reach(arch):
    """Crop-based stitching with an overlap of at least the network's reach gives the untiled
    output up to float rounding (bound: 1e-5; convs over different extents may sum in another
    order); with no overlap the seams show."""
    torch.manual_seed(4)
    x = torch.rand(1, 3, 40, 56)
    if arch == "srvgg":
        net = upscale.build(tiny_srvgg_state(), Path("w.pth"))
    else:
        net = upscale.build(tiny_rrdb_state(scale=2), Path("w.pth"))
    layout: upscale.Layout = net.layout
    assert layout.reach == (4 if arch == "srvgg" else 42)
    s = layout.scale
    with torch.inference_mode():
        whole = net(x)
        for overlap, close in ((layout.reach, True), (0, False)):
            out = torch.full((1, 3, 40 * s, 56 * s), float("nan"))
            upscale.run_tiled(net, x, 16, overlap, out, lambda t: t)
            assert not out.isnan().any()
            assert torch.allclose(out, whole, atol=1e-5) is close, (overlap, (out - whole).abs().max())


def test_the_uint8_upscale_is_tiled_and_the_whole_frame_the_same(tmp_path, srvgg_weights):
    frame = moving_square(1, 40, 56)[0]
    tiled = upscale.Upscaler(srvgg_weights, tile=16, overlap=8)
    whole = upscale.Upscaler(srvgg_weights, tile=64, overlap=0)
    assert len(list(upscale.tiles(40, 56, 16, 8))) == 12 and len(list(upscale.tiles(40, 56, 64, 0))) == 1
    a, b = tiled.upscale(frame), whole.upscale(frame)
    assert a.shape == (80, 112, 3) and a.dtype == np.uint8
    # rounding to uint8 can turn a 1e-6 difference into 1 at an exact .5: at most 1, almost never
    assert np.abs(a.astype(int) - b).max() <= 1 and (a != b).mean() < 0.001


def test_x2plus_takes_odd_sizes_and_tiles_on_its_unshuffle_grid(tmp_path):
    """RRDBNet x2 works on the input pixel-unshuffled by 2: an odd side is padded (edge repeated)
    and cropped back; tile and overlap are rounded up to even sizes so every tile's grid is the frame's."""
    model = upscale.Upscaler(save(tiny_rrdb_state(scale=2), tmp_path / "x2plus.pth", "params_ema"), tile=17, overlap=5)
    assert (model.tile, model.overlap, model.scale) == (18, 6, 2)
    frame = moving_square(1, 21, 30)[0]
    out = model.upscale(frame)
    assert out.shape == (42, 60, 3) and out.dtype == np.uint8


def test_a_job_asking_for_the_model_of_a_muxer_without_one_fails_cleanly():
    p = m.JobParams(model="t2v-A14B", prompt="x", negative_prompt="", seed=1, steps=1, height=32, width=48,
                    num_frames=5, fps=16, guidance_scale=1.0, postprocess={"upscale": 2.0, "upscale_method": "model"})
    with pytest.raises(ModelLoadError) as info:
        postprocess.plan(p, 48, 32)
    assert info.value.details == {"field": "custom_options.upscale_method", "method": "model"}
    lanczos = dataclasses.replace(p, postprocess={"upscale": 2.0})
    assert postprocess.plan(lanczos, 48, 32).applied()["upscale"]["method"] == "lanczos"


# ---- the pipeline: model, then Lanczos ----------------------------------------------------------------

def decoded(path: Path | bytes) -> tuple[list[np.ndarray], Any]:
    with av.open(io.BytesIO(path) if isinstance(path, bytes) else str(path), mode="r") as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], stream.average_rate


def pipeline_frames(plan: postprocess.Plan, frames: np.ndarray) -> list[np.ndarray]:
    pipe = postprocess.Pipeline(plan)
    out = [f for frame in frames for f in pipe.push(av.VideoFrame.from_ndarray(frame, format="rgb24"))]
    return [f.to_ndarray(format="rgb24") for f in [*out, *pipe.flush()]]


def test_model_then_lanczos_to_the_exact_size_after_minterpolate(tmp_path, srvgg_weights):
    """x2 model, x3 asked: Lanczos from 2x to 3x; frames interpolated (minterpolate, 16 -> 32)
    before the model; into the MP4 at the rate and size asked."""
    model = upscale.Upscaler(srvgg_weights, tile=16, overlap=8)
    frames = moving_square(5, 32, 48)
    plan = postprocess.Plan(48, 32, 16, 144, 96, 32, upscale_method="model", upscaler=model)
    write_outputs(frames, 16, tmp_path / "m.mp4", Encoding("h264", 0), plan=plan)
    out, rate = decoded(tmp_path / "m.mp4")
    assert (len(out), out[0].shape, rate) == (9, (96, 144, 3), 32)
    applied = plan.applied()["upscale"]
    assert applied == {"method": "model", **model.describe(), "from": "48x32", "model_output": "96x64",
                       "resize": "lanczos", "to": "144x96"}
    assert (applied["scale"], applied["tile"]) == (2, {"size": 16, "overlap": 8})


def test_the_pipeline_gives_the_models_frames_then_lanczos_of_them(srvgg_weights):
    model = upscale.Upscaler(srvgg_weights, tile=16, overlap=8)
    frames = moving_square(2, 32, 48)
    exact = postprocess.Plan(48, 32, 16, 96, 64, 16, upscale_method="model", upscaler=model)
    assert exact.applied()["upscale"]["resize"] is None
    got = pipeline_frames(exact, frames)
    assert len(got) == 2 and all(np.array_equal(g, model.upscale(f)) for g, f in zip(got, frames, strict=True))
    # x3 asked: the model's x2 frames, then Lanczos to 144x96 (the same as Lanczos on the model's frames)
    resized = pipeline_frames(postprocess.Plan(48, 32, 16, 144, 96, 16, upscale_method="model", upscaler=model),
                              frames)
    lanczos_of_model = pipeline_frames(postprocess.Plan(96, 64, 16, 144, 96, 16), np.stack(got))
    lanczos_only = pipeline_frames(postprocess.Plan(48, 32, 16, 144, 96, 16), frames)
    assert resized[0].shape == (96, 144, 3) and np.array_equal(resized[0], lanczos_of_model[0])
    assert np.abs(resized[0].astype(int) - lanczos_only[0]).mean() > 1  # the model's picture, not Lanczos alone


def test_rife_then_the_model(tmp_path, srvgg_weights):
    """RIFE interpolates at the source size, the model upscales each of its frames: 5 frames at
    16 fps -> 9 at 32, at the model's x2 (no Lanczos step)."""
    rife_path = tmp_path / "flownet.pkl"
    torch.save(tiny_rife_state(), rife_path)
    interpolator, model = rife.Interpolator(rife_path), upscale.Upscaler(srvgg_weights, tile=32, overlap=8)
    plan = postprocess.Plan(48, 32, 16, 96, 64, 32, "rife", interpolator, "model", model)
    frames = moving_square(5, 32, 48)
    out = pipeline_frames(plan, frames)
    assert len(out) == 9 and out[0].shape == (64, 96, 3)
    assert np.array_equal(out[0], model.upscale(frames[0])) and np.array_equal(out[8], model.upscale(frames[4]))
    assert set(plan.applied()) == {"width", "height", "fps", "interpolation", "upscale"}


MEMORY_CHILD = """
import sys, tempfile
import numpy as np
import torch
from pathlib import Path
from stages import postprocess, upscale
from stages.encoders import Encoding, write_outputs
from tests.helpers import moving_square, tiny_srvgg_state
torch.set_num_threads(1)
hwm = lambda: int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
with tempfile.TemporaryDirectory() as d:
    torch.save(tiny_srvgg_state(scale=4), Path(d) / "x4.pth")
    model = upscale.Upscaler(Path(d) / "x4.pth", tile=32, overlap=8)
    plan = postprocess.Plan(64, 48, 16, 512, 384, 32, upscale_method="model", upscaler=model)
    peaks = []
    for n in (12, 12, 36):  # the first run warms up (allocator pools, first inference): ~4 MiB
        write_outputs(moving_square(n, 48, 64), 16, Path(d) / "a.mp4", Encoding("h264", 23, 8, "veryfast"),
                      plan=plan)
        peaks.append(hwm())
print(*peaks[1:])
"""


def test_the_model_path_streams_in_bounded_memory():
    """64x48 -> x4 model -> Lanczos x2 to 512x384 (the 720p -> 8K path's steps at a reduced size),
    interpolated to 32 fps: 36 frames (71 out) raise the peak RSS of a process that already ran 12
    (23 out, twice) by less than the 48 extra frames would take if anything held them (27 MiB at
    the output size, 7 MiB at the model's; measured: +2 to +4 MiB as it is, +15 MiB when the model's
    frames are kept)."""
    run = subprocess.run([sys.executable, "-c", MEMORY_CHILD], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert run.returncode == 0, run.stderr[-800:]
    small, large = (int(x) for x in run.stdout.split()[-2:])
    assert large - small < 10 * 1024, (small, large)


# ---- the muxer stage: startup and one job -------------------------------------------------------------

def muxer_config(tmp_path: Path, weights: Path | None) -> Config:
    env = {"WAN_SERVER__RUNTIME__STATE_DIR": str(tmp_path)}
    if weights is not None:
        env["WAN_SERVER__STAGES__MUXER__UPSCALE_WEIGHTS"] = f'"{weights}"'
        env["WAN_SERVER__STAGES__MUXER__UPSCALE_TILE"] = "32"
    return Config.load(environ=env)


def test_a_job_through_the_muxer_with_the_model(tmp_path, srvgg_weights):
    config = muxer_config(tmp_path, srvgg_weights)
    _, p, _ = admission.resolve(config, {"prompt": "x", "model": "t2v", "quality_preset": "standard",
                                         "custom_options": {"upscale": 2, "num_frames": 5}})
    assert p.postprocess == {"upscale": 2.0, "upscale_method": "model"}  # configured: the default
    stage = MuxerStage(config, config.stage("muxer"))
    stage.setup()
    (done,) = stage.handle(m.MuxJob(job_id="sr1", attempt=1, route=["muxer"], params=p,
                                    frames=torch.from_numpy(moving_square(5, p.height, p.width))))
    assert isinstance(done, m.JobDone)
    applied = done.postprocess["upscale"]
    assert (applied["method"], applied["model"], applied["sha256"], applied["scale"], applied["tile"]) == \
        ("model", srvgg_weights.name, hashlib.sha256(srvgg_weights.read_bytes()).hexdigest(), 2,
         {"size": 32, "overlap": 32})
    assert (done.width, done.height, done.num_frames) == (2 * p.width, 2 * p.height, 5)
    out, _ = decoded(Path(done.path))
    assert (len(out), out[0].shape[:2]) == (5, (2 * p.height, 2 * p.width))


def test_a_muxer_with_mismatched_upscale_weights_does_not_start(tmp_path):
    bad = tmp_path / "model.pth"
    torch.save(broken("rrdb wrong growth"), bad)
    config = muxer_config(tmp_path, bad)
    with pytest.raises(ModelLoadError) as info:
        MuxerStage(config, config.stage("muxer")).setup()
    assert str(bad) in info.value.message and "shape" in info.value.message


# ---- admission ----------------------------------------------------------------------------------------

def resolve(config: Config, **options: Any) -> dict[str, Any]:
    _, p, _ = admission.resolve(config, {"prompt": "x", "model": "t2v", "quality_preset": "standard",
                                         "custom_options": options})
    return p.postprocess


def test_admission_chooses_and_refuses_the_method(tmp_path, srvgg_weights):
    plain = Config.load(profile_path("single-gpu"), environ={})
    assert resolve(plain, upscale=2) == {"upscale": 2.0}  # Lanczos, as before
    with pytest.raises(ValidationError) as info:
        resolve(plain, upscale=2, upscale_method="model")
    assert info.value.details == {"field": "custom_options.upscale_method", "method": "model",
                                  "allowed": ["lanczos"]}
    with pytest.raises(ValidationError) as info:
        resolve(plain, upscale_method="lanczos")  # nothing to upscale
    assert info.value.details["field"] == "custom_options.upscale_method"
    configured = muxer_config(tmp_path, srvgg_weights)
    assert resolve(configured, upscale_to="1080p", upscale_method="lanczos") == \
        {"upscale_to": "1080p", "upscale_method": "lanczos"}
    assert resolve(configured, upscale_to="1080p") == {"upscale_to": "1080p", "upscale_method": "model"}
    assert resolve(configured) == {}


def test_a_model_upscale_without_weights_is_a_422_over_http(api_system):
    status, body = api_system.json("POST", "/api/v1/generate", {
        "prompt": "x", "model": "t2v", "custom_options": {"upscale": 2, "upscale_method": "model"}})
    assert status == 422 and body["error"]["details"]["field"] == "custom_options.upscale_method", body
    check_error_body("/api/v1/generate", status, body)


def test_a_job_through_the_running_system_is_upscaled_by_the_model(keyed_system):
    """The keyed system's muxer loads tiny SRVGG x2 weights at startup (conftest): a t2v draft asked
    for x2 gets the model by default, through the broker's admission and the muxer process."""
    system = keyed_view(keyed_system, "sr-")
    job_id = system.submit(prompt="a lighthouse at dusk", seed=5, custom_options={"upscale": 2})
    final = system.wait_final(job_id)
    assert final["status"] == "completed", final
    status, body = system.json("GET", f"/api/v1/result/{job_id}")
    assert status == 200, body
    applied = body["metadata"]["postprocess"]["applied"]
    weights = keyed_system.state_dir / "realesr-tiny-x2.pth"
    assert (applied["upscale"]["method"], applied["upscale"]["model"]) == ("model", weights.name), applied
    assert applied["upscale"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    status, _, mp4 = system.request("GET", f"/api/v1/files/{job_id}.mp4")
    assert status == 200
    frames, _ = decoded(mp4)
    assert frames[0].shape[:2] == (applied["height"], applied["width"]) and applied["upscale"]["resize"] is None
