"""Config: one TOML profile plus environment overrides; endpoints stay on this host."""

from __future__ import annotations

import pytest
import zmq

from common.config import Config, profile_path
from common.errors import ConfigError
from common.sockets import check_endpoint, make_socket


def test_tiny_profile_loads_with_defaults():
    cfg = Config.load(environ={})
    assert cfg.source == profile_path("tiny")
    assert cfg.stage_names() == ["text_encoder", "dit_high", "dit_low", "vae", "muxer"]
    assert cfg.stage("dit_low").kind == "dit" and cfg.stage("dit_low").part == "low"
    assert cfg.route("t2v-A14B")[0] == "text_encoder"
    assert cfg.endpoint("vae").startswith("ipc://") and cfg.endpoint("vae").endswith("/vae.sock")


def test_environment_overrides_nested_keys(tmp_path):
    cfg = Config.load(environ={
        "WAN_SERVER__RUNTIME__STATE_DIR": str(tmp_path),
        "WAN_SERVER__LIMITS__MAX_FRAMES": "12",
        "WAN_SERVER__STAGES__DIT_HIGH__DEVICE": "cuda:1",
        "WAN_SERVER__MODELS__TI2V_5B__SPLIT_FRACTION": "0.25",
        "WAN_SERVER__ENDPOINTS__VAE": "tcp://127.0.0.1:5999",
    })
    assert cfg.state_dir == tmp_path and cfg.results_dir == tmp_path / "results"
    assert cfg.limits.max_frames == 12
    assert cfg.stage("dit_high").device == "cuda:1"
    assert cfg.model("ti2v-5B").split_fraction == 0.25
    assert cfg.endpoint("vae") == "tcp://127.0.0.1:5999"


def test_config_file_from_environment(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[stages.vae]\ndevice = "cpu"\n[routes]\ndefault = ["vae"]\n')
    cfg = Config.load(environ={"WAN_SERVER_CONFIG": str(path)})
    assert cfg.stage_names() == ["vae"] and cfg.route("anything") == ["vae"]


@pytest.mark.parametrize("text,why", [
    ("[stages.x]\nkind = 'gpu'\n", r"kind = 'gpu' is not one of"),
    ("[stages.vae]\n[routes]\ndefault = ['vae', 'nope']\n", "unknown stage"),
    ("not toml [", "not valid TOML"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, why):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=why):
        Config.load(path, environ={})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "nope.toml", environ={})


def test_unknown_model_and_stage():
    cfg = Config.load(environ={})
    with pytest.raises(ConfigError, match="not served"):
        cfg.model("t2v-5B")
    with pytest.raises(ConfigError, match="no stage"):
        cfg.stage("dit_middle")


def test_long_ipc_path_is_refused(tmp_path):
    cfg = Config.load(environ={"WAN_SERVER__RUNTIME__SOCKET_DIR": "/tmp/" + "x" * 120})
    with pytest.raises(ConfigError, match="longer than"):
        cfg.endpoint("vae")


@pytest.mark.parametrize("endpoint", ["ipc:///tmp/a.sock", "tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:5"])
def test_local_endpoints_allowed(endpoint):
    assert check_endpoint(endpoint) == endpoint


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5555", "tcp://10.0.0.2:5555", "tcp://*:5555", "udp://127.0.0.1:1"])
def test_remote_endpoints_refused(endpoint):
    with pytest.raises(ConfigError):
        check_endpoint(endpoint)


def test_socket_factory_sets_bounds(tmp_path):
    ctx = zmq.Context.instance()
    sock = make_socket(ctx, zmq.PUSH, f"ipc://{tmp_path}/s.sock", bind=True)
    try:
        assert sock.getsockopt(zmq.SNDHWM) == 16 and sock.getsockopt(zmq.LINGER) == 1000
        assert sock.getsockopt(zmq.IMMEDIATE) == 1 and sock.getsockopt(zmq.MAXMSGSIZE) == 2 << 30
    finally:
        sock.close(0)
