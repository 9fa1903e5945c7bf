"""Typed config: every section a frozen dataclass, checked when the file is read."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from common.config import (
    AdmissionSection,
    Config,
    GatewaySection,
    RuntimeSection,
    WatchdogSection,
    profile_path,
)
from common.errors import ConfigError
from tests.helpers import ROOT


@pytest.mark.parametrize("name", ["tiny", "single-gpu", "dual-gpu", "dual-3090"])
def test_every_shipped_profile_loads(name):
    cfg = Config.load(profile_path(name), environ={})
    assert cfg.model_names() and cfg.stage_names()
    for stage in cfg.stage_names():
        cfg.route(cfg.model_names()[0])
        assert cfg.stage(stage).name == stage


def test_sections_are_frozen_and_typed() -> None:
    cfg = Config.load(environ={})
    assert isinstance(cfg.watchdog, WatchdogSection) and isinstance(cfg.gateway, GatewaySection)
    assert cfg.watchdog.heartbeat_timeout_s == 5.0  # the tiny profile's value, an int in the file, is a float
    assert isinstance(cfg.watchdog.heartbeat_timeout_s, float)
    assert cfg.gateway.allowed_origins == ()
    assert cfg.model("t2v-A14B").resolutions[0] == "32x32"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.watchdog.kill = False  # type: ignore[misc]


def test_defaults_come_from_the_dataclasses(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[stages.vae]\n[routes]\ndefault = ["vae"]\n')
    cfg = Config.load(path, environ={})
    assert cfg.runtime == RuntimeSection()
    assert cfg.admission == AdmissionSection()
    assert cfg.watchdog == WatchdogSection()
    assert cfg.stage("vae").device == "cpu" and cfg.stage("vae").vae_tiling is False


@pytest.mark.parametrize("env,section,key,words", [
    ({"WAN_SERVER__ADMISSION__MAX_QUEUD": "3"}, "admission", "max_queud", "unknown key"),
    ({"WAN_SERVER__WATCHDOG__HEARTBEAT_TIMEOUT": "3"}, "watchdog", "heartbeat_timeout", "unknown key"),
    ({"WAN_SERVER__ADMISSION__MAX_QUEUED": '"many"'}, "admission", "max_queued", "is not an integer"),
    ({"WAN_SERVER__WATCHDOG__KILL": "1"}, "watchdog", "kill", "is not true or false"),
    ({"WAN_SERVER__GATEWAY__ALLOWED_ORIGINS": "[1, 2]"}, "gateway", "allowed_origins", "is not a list of strings"),
    ({"WAN_SERVER__GATEWAY__AUTH": '"sometimes"'}, "gateway", "auth", "is not one of"),
    ({"WAN_SERVER__STAGES__VAE__PART": '"low"'}, "stages.vae", "part", "unknown key"),  # a DiT key on the VAE
    ({"WAN_SERVER__STAGES__DIT_HIGH__PART": '"middle"'}, "stages.dit_high", "part", "is not one of"),
    ({"WAN_SERVER__MODELS__T2V_A14B__RESOLUTION": '"32x32"'}, "models.t2v-A14B", "resolution", "unknown key"),
    ({"WAN_SERVER__MODELS__T2V_A14B__MAX_FRAMES": "1.5"}, "models.t2v-A14B", "max_frames", "is not an integer"),
    ({"WAN_SERVER__PRESETS__T2V_A14B__DRAFT__STEPZ": "3"}, "presets.t2v-A14B", "draft.stepz", "unknown key"),
    ({"WAN_SERVER__PRESETS__T2V_A14B__QUICK__STEPS": "3"}, "presets.t2v-A14B", "quick", "unknown preset"),
])
def test_a_bad_key_or_value_names_file_section_and_key(env, section, key, words):
    with pytest.raises(ConfigError) as info:
        Config.load(environ=env)
    err = info.value
    assert err.code == "CONFIG_ERROR"
    assert err.details["file"] == str(profile_path("tiny"))
    assert err.details["section"] == section and err.details["key"] == key
    assert words in err.message and f"[{section}]" in err.message


def test_an_unknown_section_is_refused(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[watchdgo]\nkill = false\n')
    with pytest.raises(ConfigError, match=r"unknown section \[watchdgo\]") as info:
        Config.load(path, environ={})
    assert info.value.details == {"file": str(path), "section": "watchdgo"}


def test_a_process_with_a_bad_profile_stops_with_one_config_error_line(tmp_path):
    """The broker's main() on a misspelt key: exit status 2 and a CONFIG_ERROR line, no traceback."""
    env = {"WAN_SERVER__RUNTIME__STATE_DIR": str(tmp_path), "WAN_SERVER__ADMISSION__MAX_QUEUD": "3",
           "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "broker.broker"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "CONFIG_ERROR" in proc.stderr and "[admission]" in proc.stderr and "max_queud" in proc.stderr
    assert "Traceback" not in proc.stderr
