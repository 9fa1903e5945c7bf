"""The README's run command, on a fresh copy of the tree, brings the whole system up under
supervisord; the README's client command then produces an MP4; `supervisorctl restart <stage>`
brings one back. What gets installed supports what the code uses."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import av
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers import ROOT, free_port, short_tmpdir, wait_for

STAGES = ["text_encoder", "dit_high", "dit_low", "vae", "muxer", "broker", "gateway"]


def quick_start_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```(?:sh|bash)?\n(.*?)```", section, re.S)]


def steps(command: str) -> list[str]:
    return [step.strip() for step in command.split("&&")]


def test_ci_runs_the_readme_test_command():
    """CI runs the README's test command, step by step, with ruff and mypy before pytest."""
    ci = (ROOT / ".ci" / "run").read_text()
    (line,) = [ln for ln in ci.splitlines() if "pytest" in ln and not ln.startswith("#")]
    ci_steps, readme_steps = steps(line), steps(quick_start_blocks()[1])
    remaining = iter(ci_steps)
    assert all(step in remaining for step in readme_steps), (readme_steps, ci_steps)  # in order
    assert ci_steps[-1] == readme_steps[-1] == ".venv/bin/python -m pytest"
    assert {".venv/bin/ruff check .", ".venv/bin/mypy"} <= set(ci_steps[:-1])


def test_uvicorn_floor_has_the_websocket_implementation_the_gateway_runs():
    """The gateway runs uvicorn with ws="websockets-sansio", which uvicorn added in 0.35.0: the
    lowest uvicorn pyproject.toml allows must be that one or later."""
    assert 'ws="websockets-sansio"' in (ROOT / "gateway" / "app.py").read_text()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (uvicorn,) = [Requirement(d) for d in deps if Requirement(d).name == "uvicorn"]
    floors = [Version(s.version) for s in uvicorn.specifier if s.operator in (">=", "==", "~=")]
    assert floors and min(floors) >= Version("0.35"), str(uvicorn.specifier)


def fresh_copy(dest: Path) -> None:
    """What a fresh clone of this tree holds: tracked files plus new files git does not ignore."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.fixture(scope="module")
def deployed():
    clone = short_tmpdir("wsc-")
    fresh_copy(clone)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAN_SERVER") and k != "VIRTUAL_ENV"}
    env["WAN_SERVER__GATEWAY__PORT"] = str(free_port())  # not 8001: a server may be running here
    run_cmd = quick_start_blocks()[0]
    result = subprocess.run(["bash", "-c", run_cmd], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ctl = [str(clone / ".venv/bin/supervisorctl"), "-c", str(clone / "supervisord.conf")]
    try:
        yield clone, ctl, env
    finally:
        subprocess.run([*ctl, "shutdown"], capture_output=True, timeout=60)
        shutil.rmtree(clone, ignore_errors=True)


def status(ctl) -> dict[str, str]:
    out = subprocess.run([*ctl, "status"], capture_output=True, text=True, timeout=30).stdout
    return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/ready", timeout=10) as resp:
            return bool(json.loads(resp.read())["ready"])
    except (OSError, ValueError):  # refused while the gateway starts; 503 until the stages have loaded
        return False


def drive(clone: Path, env, prompt: str, out: Path) -> None:
    """The README's client command, with the prompt, output and port of this test."""
    readme_cmd = next(b for b in quick_start_blocks() if "gateway.client generate" in b).splitlines()[0]
    assert "--wait" in readme_cmd
    url = f"http://127.0.0.1:{env['WAN_SERVER__GATEWAY__PORT']}"
    wait_for(lambda: ready(url), 180, "the deployed system to be ready", interval_s=0.5)
    cmd = [str(clone / ".venv/bin/python"), "-m", "gateway.client", "--url", url,
           "generate", "--prompt", prompt, "--wait", "-o", str(out)]
    result = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=360)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(out)


def wait_running(ctl, timeout_s: float = 120) -> dict[str, str]:
    def running() -> dict[str, str] | None:
        st = status(ctl)
        return st if all(st.get(s) == "RUNNING" for s in STAGES) else None

    try:
        return wait_for(running, timeout_s, "every program RUNNING", interval_s=0.5)
    except AssertionError:
        return status(ctl)  # the caller's assert shows which is not


def test_readme_run_command_serves_jobs(deployed):
    clone, ctl, env = deployed
    assert wait_running(ctl) == {s: "RUNNING" for s in STAGES}
    out = clone / "first.mp4"
    drive(clone, env, "a boat floats on a calm river", out)
    with av.open(str(out)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (48, 32)  # the standard preset
    assert (clone / "var/models/tiny-t2v-A14B-seed0/model_index.json").is_file()  # built on first start


def test_supervisorctl_restart_brings_a_stage_back(deployed):
    clone, ctl, env = deployed
    before = subprocess.run([*ctl, "pid", "dit_low"], capture_output=True, text=True).stdout.strip()
    result = subprocess.run([*ctl, "restart", "dit_low"], capture_output=True, text=True, timeout=60)
    assert "started" in result.stdout, result.stdout
    after = subprocess.run([*ctl, "pid", "dit_low"], capture_output=True, text=True).stdout.strip()
    assert before != after
    assert wait_running(ctl)["dit_low"] == "RUNNING"
    drive(clone, env, "a dog runs through a forest", clone / "second.mp4")
    assert (clone / "second.mp4").stat().st_size > 0
