"""What the test modules share: the processes they start (the stage stack, the whole system under
supervisord, each on a private state folder), waiting on conditions, facts from the job store,
the malformed wire messages, and the frames a stack produced. Test modules import from here, never
from one another."""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack
import numpy as np
import torch

from common import messages as m
from common.config import Config
from common.errors import (
    BadDtype,
    BadShape,
    FieldError,
    FrameMismatch,
    MalformedHeader,
    MessageTooLarge,
    UnknownMessageType,
    WireError,
)
from common.wire import TENSOR_EXT, Limits
from tests.error_bodies import check_error_response, tokens_in

if TYPE_CHECKING:
    from PIL import Image

    from broker.driver import Driver

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ["text_encoder", "dit_high", "dit_low", "vae", "muxer", "broker", "gateway"]
FINAL = ("completed", "failed", "cancelled")

T = TypeVar("T")


# ---- waiting ----

def wait_for(predicate: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


# ---- private state folders and ports ----

def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def short_tmpdir(prefix: str) -> Path:
    """ipc:// paths must stay under ~100 bytes, so stacks live directly under /tmp."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


# The quantized and compiled stack (conftest `int8_stack`, shared by test_compute and test_compile):
# int8 block matmuls on both DiTs (stages/quantize.py), and dit_high compiling its t2v-A14B expert's
# blocks with the aot_eager backend (stages/compilation.py; only that model, so the warm-up is short).
INT8_DITS = {"WAN_SERVER__STAGES__DIT_HIGH__COMPUTE_DTYPE": '"int8"',
             "WAN_SERVER__STAGES__DIT_LOW__COMPUTE_DTYPE": '"int8"'}
COMPILED_DIT_HIGH = {"WAN_SERVER__STAGES__DIT_HIGH__COMPILE": "true",
                     "WAN_SERVER__STAGES__DIT_HIGH__COMPILE_BACKEND": '"aot_eager"',
                     "WAN_SERVER__STAGES__DIT_HIGH__MODELS": '["t2v-A14B"]'}


# ---- the five stage processes, without broker or gateway ----

class StageStack:
    """The five stage processes of the tiny profile, each `python -m stages.<kind> --name <name>`."""

    driver: Driver  # set by `running_stack`: it owns the reports endpoint while the stack runs

    def __init__(self, state_dir: Path, model_cache: Path, **extra_env: str):
        self.state_dir = state_dir
        self.env = stack_env(state_dir, model_cache, **extra_env)
        self.config = Config.load(environ=self.env)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.log_dir = state_dir / "log"

    def start(self, name: str) -> subprocess.Popen[bytes]:
        spec = self.config.stage(name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"stages.{spec.kind}", "--name", name],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
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


@contextlib.contextmanager
def running_stack(prefix: str, model_cache: Path, **extra_env: str) -> Iterator[StageStack]:
    """A started StageStack with a Driver on its reports endpoint, every stage ready; removed after.
    `{state}` in an environment value stands for the stack's state folder."""
    from broker.driver import Driver

    state = short_tmpdir(prefix)
    stack = StageStack(state, model_cache, **in_state(state, extra_env)).start_all()
    try:
        with Driver(stack.config) as driver:
            driver.wait_ready(timeout_s=180)
            stack.driver = driver
            yield stack
    finally:
        stack.stop()
        _rmtree(state)


# ---- the whole system under supervisord ----

class System:
    """supervisord running the repo's supervisord.conf programs (broker, gateway, stages) on a
    private state folder and a free port, and an HTTP client for its API."""

    def __init__(self, state_dir: Path, model_cache: Path, **extra_env: str):
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = stack_env(state_dir, model_cache, WAN_SERVER__GATEWAY__PORT=str(self.port), **extra_env)
        self.config = Config.load(environ=self.env)
        self.headers: dict[str, str] = {}  # sent with every request (e.g. an API key), under per-call headers
        self.tokens: dict[str, str] = {}  # API keys a test made, by name
        self.key_tokens: list[str] = []  # every key token created: no error body may hold one
        self.key_prefix = ""  # keyed_view: the prefix of the key names this module made
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
        token: str = json.loads(out)["token"]
        self.key_tokens.append(token)
        return token

    def log(self, program: str) -> str:
        path = self.log_dir / f"{program}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stored_job(self, job_id: str) -> dict[str, Any] | None:
        return stored_job(self.state_dir, job_id)

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

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, _, content = self.request(method, path, body, **kw)
        return status, json.loads(content)

    def wait_ready(self, timeout_s: float = 300) -> None:
        def ready() -> bool:
            try:
                status, body = self.json("GET", "/ready")
                return status == 200 and bool(body["ready"])
            except (OSError, ValueError):
                return False

        try:
            wait_for(ready, timeout_s, "the system to be ready", interval_s=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.supervisorctl('status')}") from None

    def wait_idle(self, timeout_s: float = 300) -> None:
        """Until no job is queued or running."""
        def idle() -> bool:
            jobs = [self.json("GET", f"/api/v1/jobs?status={s}&limit=1")[1] for s in ("queued", "processing")]
            return sum(j["total"] for j in jobs) == 0

        wait_for(idle, timeout_s, "no job queued or running", interval_s=0.5)

    def submit(self, **request: Any) -> str:
        status, body = self.json("POST", "/api/v1/generate", {"model": "t2v", "quality_preset": "draft", **request})
        assert status == 202, body
        job_id: str = body["job_id"]
        return job_id

    def wait_final(self, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def final() -> dict[str, Any] | None:
            nonlocal last
            try:
                status, body = self.json("GET", f"/api/v1/status/{job_id}")
            except OSError:
                return None  # the gateway may be restarting
            last = body
            return body if status == 200 and body["status"] in FINAL else None

        try:
            return wait_for(final, timeout_s, f"job {job_id} to be final", interval_s=0.2)
        except AssertionError:
            raise AssertionError(f"job {job_id} not final after {timeout_s} s: {last}") from None


@contextlib.contextmanager
def running_system(prefix: str, model_cache: Path, setup: Callable[[System], None] | None = None,
                   **extra_env: str) -> Iterator[System]:
    """A System started under supervisord and ready; shut down and removed after. `setup` runs
    before the start (to write keys, folders); `{state}` in an environment value stands for the
    system's state folder."""
    state = short_tmpdir(prefix)
    system = System(state, model_cache, **in_state(state, extra_env))
    try:
        if setup is not None:
            setup(system)
        system.start()
        system.wait_ready()
        yield system
    finally:
        system.stop()
        _rmtree(state)


def in_state(state: Path, env: dict[str, str]) -> dict[str, str]:
    return {k: v.replace("{state}", str(state)) for k, v in env.items()}


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---- the job store: what the broker recorded ----

def stored_job(state_dir: Path, job_id: str) -> dict[str, Any] | None:
    """The job's row in the broker's store (`<state_dir>/jobs.sqlite3`), read-only, JSON columns decoded."""
    db = sqlite3.connect(f"file:{state_dir / 'jobs.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        db.close()
    if row is None:
        return None
    job = dict(row)
    for key in ("params", "route", "timings", "error"):
        if job.get(key):
            job[key] = json.loads(job[key])
    return job


# ---- malformed wire messages ----

def good_parts() -> list[bytes]:
    msg = m.DecodeJob(
        job_id="j", attempt=1, route=["vae"], params=m.JobParams("m", "p", "", 0, 1, 16, 16, 1, 8, 1.0),
        latents=torch.zeros(2, 3),
    )
    return [bytes(p) for p in m.encode(msg)]


def header_of(parts: list[bytes]) -> dict[str, Any]:
    header: dict[str, Any] = msgpack.unpackb(parts[0], raw=False, ext_hook=lambda c, d: msgpack.ExtType(c, d))
    return header


def with_header(parts: list[bytes], header: dict[str, Any]) -> list[bytes]:
    return [msgpack.packb(header, use_bin_type=True), *parts[1:]]


def tensor_ext(dtype: str, shape: list[Any], frame: int) -> msgpack.ExtType:
    return msgpack.ExtType(TENSOR_EXT, msgpack.packb([dtype, shape, frame]))


def _bad() -> dict[str, tuple[Any, type[WireError]]]:
    h = header_of
    return {
        "empty message": ([], MalformedHeader),
        "non-msgpack header": ([b"\xc1\xc1\xc1garbage"], MalformedHeader),
        "truncated header": (lambda p: [p[0][: len(p[0]) // 2], *p[1:]], MalformedHeader),
        "header not a map": ([msgpack.packb([1, 2, 3])], MalformedHeader),
        "missing frame": (lambda p: p[:1], FrameMismatch),
        "extra frame": (lambda p: [*p, b"\x00" * 8], FrameMismatch),
        "frame length mismatch": (lambda p: [p[0], p[1][:-4]], FrameMismatch),
        "oversize message": (lambda p: [p[0], b"\x00" * (2 << 20)], MessageTooLarge),
        "too many frames": (lambda p: [p[0]] + [b""] * 9, MessageTooLarge),
        "oversize header": ([msgpack.packb({"x": "y" * 5000})], MessageTooLarge),
        "unknown type": (lambda p: with_header(p, {**h(p), "type": "Pickle"}), UnknownMessageType),
        "missing type": (lambda p: with_header(p, {k: v for k, v in h(p).items() if k != "type"}), MalformedHeader),
        "wrong version": (lambda p: with_header(p, {**h(p), "v": 99}), MalformedHeader),
        "bad dtype string": (lambda p: with_header(p, {**h(p), "latents": tensor_ext("object", [2, 3], 0)}), BadDtype),
        "negative shape": (lambda p: with_header(p, {**h(p), "latents": tensor_ext("float32", [-2, 3], 0)}), BadShape),
        "float shape": (lambda p: with_header(p, {**h(p), "latents": tensor_ext("float32", [2.0, 3], 0)}), BadShape),
        "frame index out of range": (
            lambda p: with_header(p, {**h(p), "latents": tensor_ext("float32", [2, 3], 5)}), FrameMismatch),
        "unknown ext type": (lambda p: with_header(p, {**h(p), "latents": msgpack.ExtType(9, b"x")}), MalformedHeader),
        "field of wrong type": (lambda p: with_header(p, {**h(p), "attempt": "one"}), FieldError),
        "missing field": (lambda p: with_header(p, {k: v for k, v in h(p).items() if k != "job_id"}), FieldError),
        "unknown field": (lambda p: with_header(p, {**h(p), "extra": 1}), FieldError),
        "tensor where a string belongs": (
            lambda p: with_header(p, {**h(p), "job_id": tensor_ext("float32", [2, 3], 0), "latents": "x"}),
            FieldError,
        ),
        "frame referenced twice": (
            lambda p: with_header(p, {**h(p), "job_id": tensor_ext("float32", [2, 3], 0)}),
            FrameMismatch,
        ),
    }


# Malformed messages by name, each with the error decoding it must raise under the wire tests'
# limits (1 MiB messages, 4 KiB headers, 8 frames; `bad_messages` scales the size cases).
BAD: dict[str, tuple[Any, type[WireError]]] = _bad()
SIZE_CASES = {"oversize message", "too many frames", "oversize header"}


def make_bad(name: str) -> list[bytes]:
    spec, _ = BAD[name]
    parts: list[bytes] = spec(good_parts()) if callable(spec) else spec
    return parts


def bad_messages(limits: Limits) -> dict[str, list[bytes]]:
    """Every malformed message of BAD, with the size cases scaled to `limits`."""
    out = {name: make_bad(name) for name in BAD if name not in SIZE_CASES and name != "empty message"}
    third = limits.max_message_bytes // 3 + 1024
    out["oversize message (in frames under the frame limit)"] = [make_bad("missing frame")[0], *[b"\0" * third] * 3]
    out["too many frames"] = [make_bad("missing frame")[0], *[b""] * (limits.max_frames + 1)]
    out["oversize header"] = [msgpack.packb({"x": "y" * (limits.max_header_bytes + 1)})]
    return out


# ---- frames ----

def vae_frames(stack: StageStack, job_id: str) -> np.ndarray:
    """The uint8 frames the vae process sent to the muxer, read from its wire recording."""
    (path,) = (stack.state_dir / "record" / "vae").glob(f"*-{job_id}.msgpack")
    body = msgpack.unpackb(path.read_bytes(), raw=False)
    msg = m.decode(body["out"][0], stack.config.limits)
    assert isinstance(msg, m.MuxJob)
    frames: np.ndarray = msg.frames.numpy()
    return frames


def reference(folder: Path, p: m.JobParams, image: Image.Image | None = None,
              prepare: Callable[[Any], None] | None = None) -> np.ndarray:
    """The frames diffusers' own pipeline makes for `p` (WanPipeline, or WanImageToVideoPipeline
    given an image), as uint8 like the vae stage's. `prepare` gets the pipeline first (to load LoRAs)."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    from stages.vae import to_uint8

    pipe: Any
    if image is None:
        pipe, extra = WanPipeline.from_pretrained(folder), {}
    else:
        pipe, extra = WanImageToVideoPipeline.from_pretrained(folder), {"image": image}
    pipe.set_progress_bar_config(disable=True)
    if prepare is not None:
        prepare(pipe)
    if p.shift is not None:  # what a preset's shift means: the scheduler's flow_shift
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=p.shift)
    out = pipe(
        **extra,
        prompt=p.prompt,
        negative_prompt=p.negative_prompt,
        height=p.height,
        width=p.width,
        num_frames=p.num_frames,
        num_inference_steps=p.steps,
        guidance_scale=p.guidance_scale,
        guidance_scale_2=p.guidance_scale_2,
        generator=torch.Generator().manual_seed(p.seed),
        output_type="np",
    ).frames
    frames: np.ndarray = to_uint8(out)[0]
    return frames


# ---- the keyed system: API keys required, shared by the auth, CORS, studio and webhook modules ----

KEYED_ORIGINS = ("https://studio.example", "http://studio.example")  # test_auth's, test_cors's
# The server-wide webhook secret the keyed system signs with (test_webhooks checks the signatures).
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"wan-server webhook test secret 32").decode()


# A page of another web app: it calls the gateway from its own origin (with CORS, as a browser does).
FOREIGN_PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><title>another app</title><script>
window.callGateway = async (url, init) => {
  try {
    const r = await fetch(url, init);
    return {read: true, status: r.status, body: await r.json(), retryAfter: r.headers.get("Retry-After")};
  } catch (e) {
    return {read: false, error: e.name};
  }
};
window.openSocket = (url, token) => new Promise((resolve) => {
  const ws = new WebSocket(url, ["wan.bearer", token]);
  ws.onopen = () => { resolve({open: true, protocol: ws.protocol}); ws.close(); };
  ws.onclose = (e) => resolve({open: false, code: e.code});
});
</script></head><body>another app</body></html>"""


class ForeignPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(FOREIGN_PAGE)))
        self.end_headers()
        self.wfile.write(FOREIGN_PAGE)


    def log_message(self, format: str, *args: Any) -> None:
        pass


def keyed_view(base: System, prefix: str) -> System:
    """The session's keyed system as one module sees it: its own `tokens` (the admin key, then
    what the module creates under names starting with `prefix`, so no module sees another's jobs
    as its users') and `headers`; `key_tokens` stays shared (no error body may hold any key)."""
    base.wait_ready()
    base.wait_idle()
    view = copy.copy(base)
    view.tokens = {"admin": base.tokens["admin"]}
    view.headers = {"Authorization": f"Bearer {base.tokens['admin']}"}
    view.key_prefix = prefix
    return view


# ---- LoRAs: tiny ones made with peft for the tiny models ----

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora(folder: Path, expert: str, out: Path, seed: int, rank: int = 4, targets: list[str] = ATTENTION,
              alpha: int | None = None) -> dict[str, torch.Tensor]:
    """A random (non-zero) LoRA for one expert of a tiny model, saved as diffusers saves LoRAs."""
    from diffusers import WanPipeline, WanTransformer3DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    transformer = WanTransformer3DModel.from_pretrained(folder, subfolder=expert)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(seed)
    transformer.add_adapter(config)
    state = get_peft_model_state_dict(transformer)
    WanPipeline.save_lora_weights(out.parent, transformer_lora_layers=state, weight_name=out.name,
                                  transformer_lora_adapter_metadata=config.to_dict())
    return load_file(out)


def official_lora(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA (`transformer.<module>.lora_A.weight`, as make_lora saves it with
    lora_alpha `alpha`) in the official names ComfyUI and the published Wan LoRAs use:
    `diffusion_model.<official module>.lora_down.weight` / `.lora_up.weight` and `.alpha`, renamed
    by the official loader's own table (stages/official_keys)."""
    from stages.official_keys import transformer_key_to_official

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, slot = key.removeprefix("transformer.").rsplit(".lora_", 1)
        official = "diffusion_model." + transformer_key_to_official(module + ".weight").removesuffix(".weight")
        out[f"{official}.lora_{'down' if slot == 'A.weight' else 'up'}.weight"] = value
        out[f"{official}.alpha"] = torch.tensor(float(alpha))
    return out


# ---- tiny weights in the release layouts of RIFE and TAEHV (post-processing and preview models) ----

def tiny_rife_layout() -> Any:
    """RIFE 4.25's layout (stages/rife.py) with few channels: the release's key names, small shapes."""
    from stages import rife

    return rife.Layout(head_channels=4, features=4, block_channels=(16, 12, 8, 8, 8), resconvs=2, carried=3)


def tiny_rife_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the tiny RIFE layout, scaled so the flows are a few pixels (not zero, not wild)."""
    from stages import rife

    torch.manual_seed(seed)
    net = rife.IFNet(tiny_rife_layout())
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("beta"):
                p.uniform_(0.5, 1.5)
            elif p.ndim > 1:
                p.normal_(0, 0.3 / (p[0].numel() ** 0.5))
            else:
                p.uniform_(-0.1, 0.1)
    return {k: v.clone() for k, v in net.state_dict().items()}


TAEHV_WIDTHS = (8, 6, 4, 4)


def tiny_taehv_state(z: int = 16, patch: int = 1, widths: tuple[int, ...] = TAEHV_WIDTHS, first_stride: int = 1,
                     encoder: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random TAEHV decoder weights in the released files' key layout (stages/taehv.py), few
    channels, scaled so the activations stay O(1)."""
    import math

    g = torch.Generator().manual_seed(seed)

    def conv(n_out: int, n_in: int, k: int = 3) -> torch.Tensor:
        return torch.randn(n_out, n_in, k, k, generator=g) / math.sqrt(n_in * k * k)

    def bias(n: int) -> torch.Tensor:
        return torch.randn(n, generator=g) * 0.1

    c0, c1, c2, c3 = widths
    state = {"decoder.1.weight": conv(c0, z), "decoder.1.bias": bias(c0)}
    for first, width, wider, stride in ((3, c0, c1, first_stride), (9, c1, c2, 2), (15, c2, c3, 2)):
        for block in range(first, first + 3):
            state[f"decoder.{block}.conv.0.weight"] = conv(width, 2 * width)
            for n in (0, 2, 4):
                if n:
                    state[f"decoder.{block}.conv.{n}.weight"] = conv(width, width)
                state[f"decoder.{block}.conv.{n}.bias"] = bias(width)
        state[f"decoder.{first + 4}.conv.weight"] = conv(width * stride, width, 1)
        state[f"decoder.{first + 5}.weight"] = conv(wider, width)
    state["decoder.22.weight"] = conv(3 * patch * patch, c3)
    state["decoder.22.bias"] = bias(3 * patch * patch) + 0.5
    if encoder:  # the released files hold the encoder too; previews ignore it
        state["encoder.0.weight"] = conv(64, 3 * patch * patch)
    return state


def tiny_srvgg_state(num_feat: int = 4, num_conv: int = 2, scale: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random SRVGGNetCompact weights (Real-ESRGAN's compact model, stages/upscale.py) in the
    released files' key layout, listed here from the architecture: `body.0` conv from RGB, a PReLU
    after every conv but the last (`body.{odd}.weight`, one slope per channel), `num_conv` body
    convs, the last conv to 3 x scale^2 channels; small, scaled so the residual stays O(0.1)."""
    import math

    g = torch.Generator().manual_seed(seed)

    def conv(n_out: int, n_in: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(n_out, n_in, 3, 3, generator=g) * gain / math.sqrt(n_in * 9)

    state: dict[str, torch.Tensor] = {}
    for i in range(num_conv + 1):
        state[f"body.{2 * i}.weight"] = conv(num_feat, 3 if i == 0 else num_feat)
        state[f"body.{2 * i}.bias"] = torch.randn(num_feat, generator=g) * 0.05
        state[f"body.{2 * i + 1}.weight"] = 0.25 + 0.1 * torch.randn(num_feat, generator=g)
    last = 2 * num_conv + 2
    state[f"body.{last}.weight"] = conv(3 * scale * scale, num_feat, 0.3)
    state[f"body.{last}.bias"] = torch.randn(3 * scale * scale, generator=g) * 0.02
    return state


def tiny_rrdb_state(num_feat: int = 4, num_block: int = 1, num_grow_ch: int = 2, scale: int = 4,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Random RRDBNet weights (ESRGAN / RealESRGAN_x4plus; x2plus with `scale=2`: 12 input channels,
    the input pixel-unshuffled by 2) in the released files' key layout, listed here from the
    architecture: conv_first, body.N.rdb{1,2,3}.conv{1..5} (dense: conv k sees num_feat + (k - 1)
    x num_grow_ch channels), conv_body, conv_up1, conv_up2, conv_hr, conv_last; small."""
    import math

    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, n_out: int, n_in: int, gain: float = 1.0) -> None:
        state[f"{name}.weight"] = torch.randn(n_out, n_in, 3, 3, generator=g) * gain / math.sqrt(n_in * 9)
        state[f"{name}.bias"] = torch.randn(n_out, generator=g) * 0.02

    conv("conv_first", num_feat, 3 * (4 // scale) ** 2)
    for b in range(num_block):
        for r in (1, 2, 3):
            for k in range(1, 6):
                conv(f"body.{b}.rdb{r}.conv{k}", num_feat if k == 5 else num_grow_ch, num_feat + (k - 1) * num_grow_ch)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(name, num_feat, num_feat)
    conv("conv_last", 3, num_feat, 0.5)
    state["conv_last.bias"] += 0.5  # mid-grey, so the picture is not clamped away
    return state


# ---- media files made here (uploads, pose videos) ----

def moving_square(frames: int = 9, height: int = 32, width: int = 48) -> np.ndarray:
    """A gradient with a bright square moving across it: something every codec compresses sanely."""
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        out[i, ..., 0] = (x * 255 // max(1, width - 1)).astype(np.uint8)
        out[i, ..., 1] = (y * 255 // max(1, height - 1)).astype(np.uint8)
        out[i, ..., 2] = 64
        out[i, 8:16, 2 * i:2 * i + 8] = 240
    return out


def probe(path: Path | bytes) -> dict[str, Any]:
    """What a player sees: codec, tag, pixel format, colour tags, rate, and the decoded RGB frames."""
    import av

    with av.open(io.BytesIO(path) if isinstance(path, bytes) else str(path), mode="r") as container:
        stream = container.streams.video[0]
        cc = stream.codec_context
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return {"codec": stream.codec_context.codec.name, "tag": stream.codec_tag, "pix_fmt": cc.pix_fmt,
                "colour": (cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range),
                "fps": stream.average_rate, "format": container.format.name, "frames": np.stack(frames),
                "comment": container.metadata.get("comment", container.metadata.get("COMMENT"))}


def multipart(parts: list[tuple[str, str | None, str | None, bytes]]) -> tuple[bytes, str]:
    """parts: (name, filename, content type, data)."""
    boundary = uuid.uuid4().hex
    out = b""
    for name, filename, ctype, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        out += (f"Content-Type: {ctype}\r\n" if ctype else "").encode() + b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_multipart(system, parts):
    body, ctype = multipart(parts)
    return system.request("POST", "/api/v1/generate", raw=body, headers={"Content-Type": ctype})



def encode_video(frames: list[np.ndarray], fmt: str = "mp4", codec: str = "mpeg4", fps: int = 16,
                 pix_fmt: str = "yuv420p") -> bytes:
    """(H, W, 3) uint8 frames as a video file in memory (`fmt` container, `codec`, `pix_fmt`; FFV1 in
    "matroska" with "bgr0" is the muxer's lossless master)."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        assert isinstance(stream, av.VideoStream)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def encode_audio(x: np.ndarray, rate: int, muxer: str, codec: str) -> bytes:
    """(channels, samples) float samples in [-1, 1] as an audio file in memory, encoded by PyAV in
    the codec's own sample format (mono or stereo)."""
    import av

    channels, n = x.shape
    buf = io.BytesIO()
    with av.open(buf, "w", format=muxer) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono" if channels == 1 else "stereo")
        assert isinstance(stream, av.AudioStream)
        fmt = stream.codec_context.format
        step = stream.codec_context.frame_size or 1024
        for pos in range(0, n, step):
            block = x[:, pos:pos + step]
            if fmt.name.startswith("s16"):
                block = (block * 32767).astype(np.int16)
            elif fmt.name.startswith("s32"):
                block = (block * 2147483000).astype(np.int32)
            else:
                block = block.astype(np.float32)
            planes = block if fmt.is_planar else block.T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes), format=fmt.name, layout=stream.layout.name)
            frame.sample_rate, frame.pts = rate, pos
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()
