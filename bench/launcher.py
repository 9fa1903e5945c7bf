"""The whole system under supervisord on a private state folder and a free loopback port, for benchmarks.

Builds the supervisord conf from the repository's `supervisord.conf` (same programs, same options),
pointing every file, socket and log of the run at the state folder, so a benchmark never touches
`var/` of a checkout or another running system. Processes are asked about over supervisord's own
XML-RPC interface (its unix socket), which costs no process start per question.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ("text_encoder", "dit_high", "dit_low", "vae", "muxer", "broker", "gateway")
# What each program's command line holds: a pid is only signalled after /proc says it is ours.
COMMANDS = {
    "text_encoder": "stages.text_encoder",
    "dit_high": "stages.dit --name dit_high",
    "dit_low": "stages.dit --name dit_low",
    "vae": "stages.vae",
    "muxer": "stages.muxer",
    "broker": "broker.broker",
    "gateway": "gateway.app",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_tmpdir(prefix: str) -> Path:
    """ipc:// paths must stay under ~100 bytes, so a state folder lives directly under /tmp."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def rss_kib(pid: int) -> int | None:
    """Resident set size of `pid` from /proc/<pid>/status, in KiB; None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class ProcessInfo:
    name: str
    state: str  # supervisord's: RUNNING, STARTING, BACKOFF, EXITED, FATAL, STOPPED ...
    pid: int
    start: int  # when supervisord (re)started it, unix seconds


class Supervised:
    """One private system: `start()`, `wait_ready()`, `processes()`, `stop()`."""

    def __init__(self, state_dir: Path, model_cache: Path, **extra_env: str):
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        var = state_dir / "var"
        self.log_dir = var / "log"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.results_dir = state_dir / "results"
        self.store_path = state_dir / "jobs.sqlite3"
        self.socket_path = var / "supervisor.sock"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("WAN_SERVER")}
        self.env.update({
            "WAN_SERVER__RUNTIME__STATE_DIR": str(state_dir),
            "WAN_SERVER__RUNTIME__SOCKET_DIR": str(state_dir / "sock"),
            "WAN_SERVER__RUNTIME__MODEL_CACHE_DIR": str(model_cache),
            "WAN_SERVER__GATEWAY__HOST": "127.0.0.1",
            "WAN_SERVER__GATEWAY__PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
            **extra_env,
        })
        self.conf = state_dir / "supervisord.conf"
        text = (ROOT / "supervisord.conf").read_text()
        text = text.replace("%(here)s/var", str(var)).replace("%(here)s/.venv/bin/python", sys.executable)
        self.conf.write_text(text.replace("%(here)s", str(ROOT)))
        self.bin = Path(sys.executable).parent

    # ---- supervisord ----
    def start(self) -> Supervised:
        subprocess.run([str(self.bin / "supervisord"), "-c", str(self.conf)], env=self.env, check=True, timeout=60)
        return self

    def stop(self) -> None:
        subprocess.run([str(self.bin / "supervisorctl"), "-c", str(self.conf), "shutdown"],
                       check=False, capture_output=True, timeout=120)

    def rpc(self) -> Any:
        """A proxy to supervisord's XML-RPC interface; one per thread (it holds a connection)."""
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def processes(self, rpc: Any | None = None) -> dict[str, ProcessInfo]:
        infos = (rpc or self.rpc()).supervisor.getAllProcessInfo()
        return {i["name"]: ProcessInfo(i["name"], i["statename"], int(i["pid"]), int(i["start"])) for i in infos}

    def spawns(self) -> dict[str, int]:
        """How many times supervisord started each program, from its log (1 = never restarted)."""
        counts = {name: 0 for name in PROGRAMS}
        for path in sorted(self.log_dir.glob("supervisord.log*")):
            for line in path.read_text(errors="replace").splitlines():
                if "spawned: '" in line:
                    name = line.split("spawned: '", 1)[1].split("'", 1)[0]
                    counts[name] = counts.get(name, 0) + 1
        return counts

    def log_text(self, program: str) -> str:
        """A program's whole log, rotated parts included, oldest first."""
        parts = sorted(self.log_dir.glob(f"{program}.log.*"), key=lambda p: -int(p.suffix[1:] or 0))
        parts.append(self.log_dir / f"{program}.log")
        return "".join(p.read_text(errors="replace") for p in parts if p.exists())

    # ---- HTTP ----
    def get_json(self, path: str, timeout_s: float = 10.0) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout_s) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def wait_ready(self, timeout_s: float = 600.0) -> float:
        """Seconds until `/ready` says every stage is up with its models loaded."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            try:
                status, body = self.get_json("/ready", timeout_s=5)
                if status == 200 and body.get("ready"):
                    return time.monotonic() - t0
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        states = {n: p.state for n, p in self.processes().items()}
        raise TimeoutError(f"system not ready after {timeout_s:.0f} s: {states}")
