"""Start the real stage processes for a test, on a private state folder, and stop them after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.config import Config

ROOT = Path(__file__).resolve().parent.parent


def stack_env(state_dir: Path, model_cache: Path, **extra: str) -> dict[str, str]:
    """Environment overrides that put every file and socket of a stack under `state_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAN_SERVER")}
    env.update(
        {
            "WAN_SERVER__RUNTIME__STATE_DIR": str(state_dir),
            "WAN_SERVER__RUNTIME__SOCKET_DIR": str(state_dir / "sock"),
            "WAN_SERVER__RUNTIME__MODEL_CACHE_DIR": str(model_cache),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def short_tmpdir(prefix: str) -> Path:
    """ipc:// paths must stay under ~100 bytes, so stacks live directly under /tmp."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class StageStack:
    """The five stage processes of the tiny profile, each `python -m stages.<kind> --name <name>`."""

    def __init__(self, state_dir: Path, model_cache: Path, **extra_env: str):
        self.state_dir = state_dir
        self.env = stack_env(state_dir, model_cache, **extra_env)
        self.config = Config.load(environ=self.env)
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_dir = state_dir / "log"

    def start(self, name: str) -> subprocess.Popen:
        spec = self.config.stage(name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", f"stages.{spec.kind}", "--name", name],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def start_all(self) -> StageStack:
        for name in self.config.stage_names():
            self.start(name)
        return self

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
