"""The whole system for API tests: supervisord running the repo's supervisord.conf programs
(broker, gateway, stages) on a private state folder and a free port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.error_bodies import check_error_response, tokens_in
from tests.stack import ROOT, stack_env

PROGRAMS = ["text_encoder", "dit_high", "dit_low", "vae", "muxer", "broker", "gateway"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class System:
    def __init__(self, state_dir: Path, model_cache: Path, **extra_env: str):
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = stack_env(state_dir, model_cache, WAN_SERVER__GATEWAY__PORT=str(self.port), **extra_env)
        self.headers: dict[str, str] = {}  # sent with every request (e.g. an API key), under per-call headers
        self.key_tokens: list[str] = []  # every key token created: no error body may hold one
        self.conf = state_dir / "supervisord.conf"
        var = state_dir / "var"
        (var / "log").mkdir(parents=True, exist_ok=True)
        text = (ROOT / "supervisord.conf").read_text()
        text = text.replace("%(here)s/var", str(var)).replace("%(here)s/.venv/bin/python", sys.executable)
        self.conf.write_text(text.replace("%(here)s", str(ROOT)))
        self.ctl = [str(Path(sys.executable).with_name("supervisorctl")), "-c", str(self.conf)]
        self.log_dir = var / "log"

    def start(self) -> System:
        supervisord = str(Path(sys.executable).with_name("supervisord"))
        subprocess.run([supervisord, "-c", str(self.conf)], env=self.env, check=True, timeout=60)
        return self

    def stop(self) -> None:
        subprocess.run([*self.ctl, "shutdown"], capture_output=True, timeout=60)

    def supervisorctl(self, *args: str) -> str:
        return subprocess.run([*self.ctl, *args], capture_output=True, text=True, timeout=60).stdout

    def pid(self, program: str) -> int:
        return int(self.supervisorctl("pid", program).strip() or 0)

    def create_key(self, name: str, *flags: str) -> str:
        """A new API key through the keys CLI (`python -m gateway.keys create`); returns its token."""
        out = subprocess.run([sys.executable, "-m", "gateway.keys", "create", name, "--json", *flags], cwd=ROOT,
                             env=self.env, capture_output=True, text=True, timeout=60, check=True).stdout
        self.key_tokens.append(json.loads(out)["token"])
        return self.key_tokens[-1]

    def log(self, program: str) -> str:
        path = self.log_dir / f"{program}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- HTTP ----
    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {**self.headers, **(headers or {})}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        if data is not None and not req.has_header("Content-type"):  # urllib stores header names capitalize()d
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            content = exc.read()
            # Every error body the API tests receive is checked for its shape and for leaks.
            check_error_response(path, exc.code, dict(exc.headers), content,
                                 forbidden=[str(self.state_dir), *self.key_tokens, *tokens_in(headers)])
            return exc.code, dict(exc.headers), content

    def json(self, method: str, path: str, body: Any = None, **kw) -> tuple[int, Any]:
        status, _, content = self.request(method, path, body, **kw)
        return status, json.loads(content)

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                status, body = self.json("GET", "/ready")
                if status == 200 and body["ready"]:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"system not ready after {timeout_s} s:\n{self.supervisorctl('status')}")

    def submit(self, **request: Any) -> str:
        status, body = self.json("POST", "/api/v1/generate", {"model": "t2v", "quality_preset": "draft", **request})
        assert status == 202, body
        return body["job_id"]

    def wait_final(self, job_id: str, timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                status, body = self.json("GET", f"/api/v1/status/{job_id}")
            except OSError:
                body, status = {}, 0  # the gateway may be restarting
            if status == 200 and body["status"] in ("completed", "failed", "cancelled"):
                return body
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not final after {timeout_s} s: {body}")


def kill9(pid: int) -> None:
    os.kill(pid, 9)
