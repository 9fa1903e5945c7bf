"""The README's run command, on a fresh copy of the tree, brings the whole system up under
supervisord; the README's client command then produces an MP4; `supervisorctl restart <stage>`
brings one back."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import av
import pytest

from tests.stack import ROOT, short_tmpdir

from tests.system import free_port

STAGES = ["text_encoder", "dit_high", "dit_low", "vae", "muxer", "broker", "gateway"]


def quick_start_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```(?:sh|bash)?\n(.*?)```", section, re.S)]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert quick_start_blocks()[1] in ci


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


def drive(clone: Path, env, prompt: str, out: Path) -> None:
    """The README's client command, with the prompt, output and port of this test."""
    readme_cmd = next(b for b in quick_start_blocks() if "gateway.client generate" in b).splitlines()[0]
    assert "--wait" in readme_cmd
    cmd = [str(clone / ".venv/bin/python"), "-m", "gateway.client", "--url",
           f"http://127.0.0.1:{env['WAN_SERVER__GATEWAY__PORT']}", "generate", "--prompt", prompt, "--wait", "-o", str(out)]
    deadline = time.monotonic() + 180
    while True:  # the gateway answers 503 until the stages have loaded their models
        result = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=360)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(out)


def wait_running(ctl, timeout_s: float = 120) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        st = status(ctl)
        if all(st.get(s) == "RUNNING" for s in STAGES) or time.monotonic() > deadline:
            return st
        time.sleep(1)


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
