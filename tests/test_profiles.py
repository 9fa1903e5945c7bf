"""Deployment profiles: every profile loads and validates; the GPU profiles place stages as
designed, their presets are complete, fit the cards they were sized for, and match the README;
the memory formula reproduces the H200 measurements; the broker refuses at submit what cannot fit."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from broker import admission, memory
from broker.broker import Broker
from common import messages as m
from common.config import PROFILES_DIR, PROJECT_ROOT, Config, profile_path
from common.errors import ConfigError, InsufficientMemory
from stages.models import torch_dtype
from stages.placement import STORAGE_DTYPES
from tests.helpers import short_tmpdir

PROFILES = sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))
GPU_PROFILES = ["single-gpu", "dual-gpu", "dual-3090"]
GIB = 1 << 30


def load(name: str, **env: str) -> Config:
    return Config.load(profile_path(name), environ=env)


def params(model: str, resolution: str, frames: int, steps: int = 40) -> m.JobParams:
    width, height = (int(x) for x in resolution.split("x"))
    return m.JobParams(model=model, prompt="x", negative_prompt="", seed=0, steps=steps, height=height, width=width,
                       num_frames=frames, fps=16, guidance_scale=4.0)


def test_all_profiles_are_here():
    assert set(GPU_PROFILES) | {"tiny"} <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_loads_and_validates(name):
    cfg = load(name)
    admission.check_presets(cfg)
    assert cfg.model_names(), "serves nothing"
    for model in cfg.model_names():
        kinds = [cfg.stage(s).kind for s in cfg.route(model)]
        assert kinds[0] == "text_encoder" and kinds[-1] == "muxer" and "dit" in kinds and "vae" in kinds, kinds
    for stage in cfg.stage_names():
        spec = cfg.stage(stage)
        assert torch.device(spec.device).type in ("cpu", "cuda")
        torch_dtype(spec.dtype)
        assert spec.storage_dtype is None or spec.storage_dtype in STORAGE_DTYPES
    for model in cfg.defined_model_names():
        assert model in admission.MODELS
        side = 32 if model == "ti2v-5B" else 16
        for res in admission.supported_resolutions(cfg, model):
            w, h = (int(x) for x in res.split("x"))
            assert w % side == 0 and h % side == 0, (model, res)
        assert (admission.max_frames(cfg, model) - 1) % 4 == 0


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_profiles_describe_the_real_models(name):
    cfg = load(name)
    assert cfg.defined_model_names() == ["t2v-A14B", "i2v-A14B", "ti2v-5B", "s2v-14B"]
    for model in cfg.defined_model_names():
        assert cfg.model(model).path.startswith("/") and not cfg.model(model).tiny
    assert admission.supported_resolutions(cfg, "t2v-A14B") == ["832x480", "480x832", "1280x720", "720x1280"]
    assert admission.supported_resolutions(cfg, "ti2v-5B") == ["1280x704", "704x1280"]
    assert cfg.model("t2v-A14B").boundary_ratio == 0.875 and cfg.model("i2v-A14B").boundary_ratio == 0.9
    assert cfg.model("ti2v-5B").split_fraction == 0.5
    # The models' own defaults (DESIGN.md) are the standard preset.
    t2v, i2v, ti2v = (admission.preset_table(cfg, x)["standard"] for x in ("t2v-A14B", "i2v-A14B", "ti2v-5B"))
    assert (t2v["steps"], t2v["shift"], t2v["guidance_scale"], t2v["guidance_scale_2"], t2v["num_frames"], t2v["fps"]) \
        == (40, 12.0, 4.0, 3.0, 81, 16)
    assert (i2v["steps"], i2v["shift"], i2v["guidance_scale"], i2v["guidance_scale_2"]) == (40, 5.0, 3.5, 3.5)
    assert (ti2v["steps"], ti2v["shift"], ti2v["guidance_scale"], ti2v["num_frames"], ti2v["fps"], ti2v["resolution"]) \
        == (50, 5.0, 5.0, 121, 24, "1280x704")
    s2v = admission.preset_table(cfg, "s2v-14B")["standard"]  # the reference's (wan/configs/wan_s2v_14B.py)
    assert (s2v["steps"], s2v["shift"], s2v["guidance_scale"], s2v["frames_per_clip"], s2v["fps"]) \
        == (40, 3.0, 4.5, 80, 16)
    for model in cfg.defined_model_names():
        table = admission.preset_table(cfg, model)
        assert table["draft"]["steps"] < table["standard"]["steps"] <= table["ultimate"]["steps"]
        assert "interpolate_fps" in table["ultimate"] and "upscale" in table["ultimate"]
        assert "interpolate_fps" not in table["standard"]


def test_gpu_profiles_place_stages_as_designed():
    def devices(cfg):
        return {s: cfg.stage(s).device for s in cfg.stage_names() if cfg.stage(s).kind != "muxer"}

    single, dual, rtx = load("single-gpu"), load("dual-gpu"), load("dual-3090")
    assert set(devices(single).values()) == {"cuda:0"}
    assert devices(dual) == {"text_encoder": "cuda:0", "dit_high": "cuda:0", "dit_low": "cuda:1", "vae": "cuda:1"}
    assert devices(rtx) == {"text_encoder": "cpu", "dit_high": "cuda:0", "dit_low": "cuda:1", "vae": "cuda:1"}
    for stage in ("dit_high", "dit_low"):
        spec = rtx.stage(stage)
        assert (spec.dtype, spec.storage_dtype, spec.attention) == ("bfloat16", "float8_e4m3fn", "auto")
        assert single.stage(stage).dtype == dual.stage(stage).dtype == "bfloat16"
    assert rtx.stage("vae").vae_tiling is True
    assert rtx.model_names() == ["t2v-A14B"]  # one A14B model fits 2 x 24 GB, not two


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_presets_fit_the_cards_they_were_sized_for(name):
    cfg = load(name)
    cards = {d: g * GIB for d, g in cfg.hardware.device_memory_gib.items()}
    weights = {s: memory.nominal_weight_bytes(cfg, s) for s in cfg.stage_names()}
    for model in cfg.model_names():
        for preset, row in admission.preset_table(cfg, model).items():
            p = params(model, row["resolution"], row["num_frames"])
            for device, need in memory.estimate(cfg, p, weights, cfg.route(model)).items():
                if device.startswith("cuda"):
                    assert need.total <= cards[device], (model, preset, device, need.total / GIB)


def test_readme_preset_table_matches_single_gpu_profile():
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert admission.preset_markdown(load("single-gpu")) in readme, \
        "README preset table is stale: regenerate it with `python -m broker.admission single-gpu`"


def test_memory_formula_reproduces_h200_measurements():
    """Peak GiB measured on an H200 (bench/results/gpu_stage_check_h200.*, gpu_vae_after_device_uint8_h200.*)."""
    cases = [
        # kind, model, resolution, frames, weights GiB, measured peak GiB
        ("dit", "t2v-A14B", "832x480", 81, 26.78, 30.31),
        ("dit", "ti2v-5B", "1280x704", 121, 9.33, 14.58),
        ("vae", "t2v-A14B", "832x480", 81, 0.236, 4.63),
        ("vae", "ti2v-5B", "1280x704", 121, 1.31, 11.88),
    ]
    for kind, model, res, frames, weights, measured in cases:
        est = weights + memory.activation_bytes(kind, "bfloat16", params(model, res, frames)) / GIB
        assert measured <= est <= measured * 1.06, (kind, model, est, measured)
    # float32 doubles the activations, as measured (vae21 float32: 9.27 GiB peak, 0.47 GiB weights).
    est = 0.47 + memory.activation_bytes("vae", "float32", params("t2v-A14B", "832x480", 81)) / GIB
    assert 9.27 <= est <= 9.27 * 1.06


@pytest.mark.parametrize("key,value,why", [
    ("attention", "'fast'", "attention"),
    ("storage_dtype", "'int4'", "storage_dtype"),
    ("device", "'gpu0'", "device"),
    ("dtype", "'fp8'", "dtype"),
    ("vae_tiling", "true", "unknown key 'vae_tiling'"),  # a VAE setting on a DiT stage
    ("part", "'middle'", "part"),
])
def test_bad_stage_settings_are_config_errors(tmp_path, key, value, why):
    path = tmp_path / "p.toml"
    path.write_text(f"[stages.dit_high]\nkind = 'dit'\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=why) as info:
        Config.load(path, environ={})
    assert info.value.details["section"] == "stages.dit_high" and info.value.details["key"] == key


def test_serving_must_name_defined_models(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[models.t2v-A14B]\npath = '/x'\n[serving]\nmodels = ['ti2v-5B']\n")
    with pytest.raises(ConfigError, match="serving"):
        Config.load(path, environ={})


def test_preset_resolves_shift_and_records_postprocess():
    cfg = load("single-gpu")
    _, p, _ = admission.resolve(cfg, {"prompt": "x", "model": "t2v", "quality_preset": "cinema"})
    assert (p.shift, p.steps, p.width, p.height, p.num_frames) == (12.0, 50, 1280, 720, 81)
    assert p.postprocess == {"interpolate_fps": 32, "upscale": 1.5}
    _, p, _ = admission.resolve(cfg, {"prompt": "x", "model": "ti2v", "custom_options": {"shift": 3.0}})
    assert p.shift == 3.0 and p.postprocess == {}


@pytest.fixture
def rtx_broker():
    state = short_tmpdir("wsp-")
    broker = Broker(load("dual-3090", WAN_SERVER__RUNTIME__STATE_DIR=str(state)))
    yield broker
    broker.close()
    shutil.rmtree(state, ignore_errors=True)


def test_broker_refuses_what_does_not_fit_the_reported_cards(rtx_broker):
    """dual-3090 with the weights and card sizes its stages would report: 720p is refused at submit
    with the structured error, 480p is admitted; before the stages report, nothing is refused."""
    request = {"prompt": "x", "model": "t2v", "custom_options": {"resolution": "1280x720"}}
    assert rtx_broker.api.submit({"request": request})["status"] == "queued"  # no heartbeat yet: admitted
    cfg = rtx_broker.config
    for stage in ("text_encoder", "dit_high", "dit_low", "vae"):
        spec = cfg.stage(stage)
        total = 0 if spec.device == "cpu" else int(23.56 * GIB)
        rtx_broker.on_report(m.Heartbeat(stage=stage, pid=1, ready=True, device=spec.device, device_total_bytes=total,
                                         weight_bytes=memory.nominal_weight_bytes(cfg, stage)))
    with pytest.raises(InsufficientMemory) as info:
        rtx_broker.api.submit({"request": request})
    err = info.value.to_dict()["error"]
    assert err["code"] == "INSUFFICIENT_GPU_MEMORY" and info.value.http_status == 422
    d = err["details"]
    assert d["device"] == "cuda:1" and d["needed_gib"] > d["available_gib"] == 23.56
    assert set(d["stages"]) == {"dit_low", "vae"} and d["suggestion"]
    assert re.search(r"needs about [0-9.]+ GiB on cuda:1", err["message"])
    assert rtx_broker.api.submit({"request": {"prompt": "x", "model": "t2v"}})["status"] == "queued"  # 480p fits
    assert rtx_broker.store.count("queued") == 2  # the refused job was never stored
