"""The TypeScript client (clients/typescript) against the running tiny system.

`npm ci` (when node_modules is missing or older than the lockfile) and `npm run build` (tsc,
strict), then Node's test runner runs the package's tests with the server's URL in
WAN_SERVER_URL; the API-key tests run against a second gateway, started here on the same broker
with keys required (WAN_KEYED_URL, WAN_API_KEY). The reconnect test asks for a gateway restart
by writing a file in WAN_TS_RESTART_DIR; this side restarts the gateway through supervisorctl
while the client's WebSocket is open, and says so in another file. The committed src/openapi.ts
must be what openapi-typescript makes of the document the server serves (so the types cannot
drift from common/catalog.py).
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, System, free_port, stop_process, wait_for

PKG = ROOT / "clients" / "typescript"
NODE = shutil.which("node") or "/usr/bin/node"
NPM = shutil.which("npm") or "/usr/bin/npm"


def run(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=PKG, env=env, capture_output=True, text=True, timeout=timeout_s)


def shown(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-8000:]}\n--- stderr\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def built() -> Path:
    """The package installed from its lockfile and compiled into dist/."""
    installed = PKG / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < (PKG / "package-lock.json").stat().st_mtime:
        proc = run([NPM, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], 300)
        assert proc.returncode == 0, shown(proc)
    proc = run([NPM, "run", "build"], 180)
    assert proc.returncode == 0, shown(proc)
    return PKG / "dist"


@pytest.fixture(scope="module")
def keyed_gateway(api_system: System) -> Iterator[tuple[str, str]]:
    """(URL, token): another gateway process on the shared system's broker, with keys required."""
    port = free_port()
    env = {**api_system.env, "WAN_SERVER__GATEWAY__AUTH": "required", "WAN_SERVER__GATEWAY__PORT": str(port)}
    token = api_system.create_key("ts-client")
    with open(api_system.log_dir / "gateway-keyed.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.app"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, api_system.log("gateway-keyed")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 60, "the keyed gateway to answer", interval_s=0.1)
        yield url, token
    finally:
        stop_process(proc)


def node_test(system: System, files: list[str], **env: str) -> subprocess.Popen[str]:
    """`node --test` on compiled test files, TAP on stdout (the run's summary is checked)."""
    return subprocess.Popen(
        [NODE, "--test", "--test-reporter=tap", "--test-concurrency=1", *files],
        cwd=PKG, env={**os.environ, "WAN_SERVER_URL": system.url, **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def check_tap(out: str, rc: int, at_least: int) -> None:
    summary = {k: int(v) for k, v in (line[2:].split() for line in out.splitlines()
                                      if line.startswith("# ") and len(line.split()) == 3
                                      and line.split()[2].isdigit())}
    assert rc == 0 and summary.get("fail") == 0, out[-12000:]
    assert summary.get("skipped") == 0 and summary.get("todo") == 0 and summary.get("cancelled") == 0, out[-12000:]
    assert summary.get("pass", 0) >= at_least, out[-12000:]


def test_types_are_generated_from_the_served_document(api_system: System, built: Path, tmp_path: Path) -> None:
    status, doc = api_system.json("GET", "/api/v1/openapi.json")
    assert status == 200
    (tmp_path / "openapi.json").write_text(json.dumps(doc))
    out = tmp_path / "openapi.ts"
    proc = run([NODE, "scripts/generate-types.mjs", str(tmp_path / "openapi.json"), str(out)], 60)
    assert proc.returncode == 0, shown(proc)
    committed = (PKG / "src" / "openapi.ts").read_text()
    fresh = out.read_text()
    diff = "".join(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True),
                                        "src/openapi.ts (committed)", "from /api/v1/openapi.json"))
    assert not diff, ("the served OpenAPI document changed: in clients/typescript run `npm run generate -- "
                      f"URL/api/v1/openapi.json` and commit src/openapi.ts\n{diff[:6000]}")


def test_client_against_the_server(api_system: System, built: Path, keyed_gateway: tuple[str, str]) -> None:
    url, token = keyed_gateway
    proc = node_test(api_system, ["dist/test/service.test.js", "dist/test/auth.test.js"],
                     WAN_KEYED_URL=url, WAN_API_KEY=token)
    out, _ = proc.communicate(timeout=240)
    check_tap(out, proc.returncode, at_least=8)


def test_subscription_resumes_across_a_gateway_restart(api_system: System, built: Path, tmp_path: Path) -> None:
    proc = node_test(api_system, ["dist/test/reconnect.test.js"], WAN_TS_RESTART_DIR=str(tmp_path))
    try:
        wait_for(lambda: (tmp_path / "restart").exists() or proc.poll() is not None, 120,
                 "the TypeScript test to ask for a gateway restart", interval_s=0.05)
        if (tmp_path / "restart").exists():
            old = api_system.pid("gateway")
            api_system.supervisorctl("restart", "gateway")
            new = api_system.pid("gateway")
            (tmp_path / "restarted.tmp").write_text(json.dumps({"old": old, "new": new}))
            (tmp_path / "restarted.tmp").rename(tmp_path / "restarted")
            assert new and new != old, api_system.supervisorctl("status")
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    check_tap(out, proc.returncode, at_least=1)
    api_system.wait_ready(timeout_s=60)  # the next module finds the system as it was
