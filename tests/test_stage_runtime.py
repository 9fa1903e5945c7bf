"""The stage runtime's process life and what a failed job tells its client:

- a stage process stops promptly and cleanly on SIGTERM: idle, in the middle of a setup that hangs
  (a fault point in setup), and after a failed model load (non-zero, one structured log line);
- reports still queued when it stops (nobody listening yet) get a bounded linger, not dropped;
- a job's error as the client sees it holds no library text, file path or spool folder;
- the muxer's MP4 is fsynced before it is renamed into place, and its folder after;
- a stage reports progress, and learns of cancellation and stopping, through the context it is
  handed (no method of it is replaced).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from PIL import Image

from common import messages as m
from common.config import Config
from common.errors import InvalidRequest, JobCancelled, StageStopping
from common.sockets import SocketOptions, make_socket
from stages.base import StageContext
from stages.dit import DitStage
from stages.failures import as_out_of_memory, error_body
from stages.image_condition import load_image
from stages.muxer import write_mp4
from tests.helpers import ROOT, short_tmpdir, stack_env, wait_for

EXIT_BOUND_S = 10  # a stop must end the process in this long, on a loaded 2-core machine


class StageProcess:
    """One `python -m stages.<kind> --name <name>` on a private state folder."""

    def __init__(self, name: str, kind: str, model_cache: Path, **extra_env: str):
        self.name = name
        self.state = short_tmpdir("wsr-")
        self.env = stack_env(self.state, model_cache, **extra_env)
        self.config = Config.load(environ=self.env)
        self.log_path = self.state / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", f"stages.{kind}", "--name", name], cwd=ROOT,
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout_s: float = 120) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return text in self.log()
        wait_for(seen, timeout_s, f"{self.name} to log {text!r}")

    def stop(self) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds to exit)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(), time.monotonic() - started

    def wait_exit(self, timeout_s: float = EXIT_BOUND_S) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not exit within {timeout_s} s:\n{self.log()[-3000:]}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def processes() -> Iterator[list[StageProcess]]:
    started: list[StageProcess] = []
    yield started
    for p in started:
        p.close()


def test_idle_stage_exits_with_0_on_sigterm(processes, model_cache):
    p = StageProcess("dit_high", "dit", model_cache)
    processes.append(p)
    p.wait_log("ready in")
    rc, seconds = p.stop()
    assert rc == 0, p.log()[-3000:]
    assert seconds < EXIT_BOUND_S
    assert p.log().rstrip().endswith("dit_high stopped"), p.log()[-2000:]


def test_sigterm_during_a_hanging_setup_stops_the_process(processes, model_cache):
    state_faults = short_tmpdir("wsf-")
    (state_faults / "dit_high.setup.hang").write_text("")
    p = StageProcess("dit_high", "dit", model_cache, WAN_SERVER__RUNTIME__FAULT_DIR=str(state_faults))
    processes.append(p)
    p.wait_log("fault injected: hanging at setup")
    rc, _ = p.stop()
    log = p.log()
    assert rc == 0, log[-3000:]
    assert "dit_high stopped during setup" in log and "ready in" not in log
    assert "dit_high stopped\n" in log  # the threads were joined and the sockets closed first


def test_failed_model_load_exits_non_zero_with_one_structured_line(processes, model_cache, tmp_path):
    missing = tmp_path / "no-such-model"
    profile = (ROOT / "common" / "profiles" / "tiny.toml").read_text()
    assert "[models.t2v-A14B]\ntiny = true\n" in profile
    profile = profile.replace("[models.t2v-A14B]\ntiny = true\n", f'[models.t2v-A14B]\npath = "{missing}"\n')
    (tmp_path / "broken.toml").write_text(profile)
    p = StageProcess("dit_high", "dit", model_cache, WAN_SERVER_CONFIG=str(tmp_path / "broken.toml"))
    processes.append(p)
    assert p.wait_exit(timeout_s=120) == 3  # the imports alone take seconds here
    log = p.log()
    lines = [ln for ln in log.splitlines() if "could not start" in ln]
    assert len(lines) == 1 and "Traceback" not in log, log[-3000:]
    error = json.loads(lines[0].split("dit_high could not start: ", 1)[1])
    assert error["code"] == "MODEL_LOAD_ERROR" and error["details"]["model"] == "t2v-A14B"
    assert "dit_high stopped\n" in log  # cleanup ran before the process gave up


def test_reports_queued_at_stop_are_delivered_within_the_linger(processes: list[StageProcess],
                                                                 model_cache: Path) -> None:
    p = StageProcess("muxer", "muxer", model_cache, WAN_SERVER__RUNTIME__SHUTDOWN_LINGER_S="20")
    processes.append(p)
    p.wait_log("ready in")
    config = p.config
    frames = torch.from_numpy(np.full((3, 32, 32, 3), 128, dtype=np.uint8))
    job = m.MuxJob(job_id="lingered", attempt=1, route=["muxer"],
                   params=m.JobParams("t2v-A14B", "x", "", 0, 2, 32, 32, 3, 16, 4.0), frames=frames)
    ctx = zmq.Context()
    try:
        sock = make_socket(ctx, zmq.PUSH, config.endpoint("muxer"), bind=False)
        sock.send_multipart(m.encode(job), copy=True)
        sock.close(linger=5000)
        # Nobody listens on the reports endpoint: the muxer's 'accepted' and JobDone wait in its queue.
        wait_for(lambda: (config.results_dir / "lingered.mp4").exists(), 60, "the MP4")
        p.proc.send_signal(signal.SIGTERM)
        # The listener comes up only once the muxer is closing its sockets (or has already exited).
        wait_for(lambda: p.proc.poll() is not None or "closing sockets" in p.log(), EXIT_BOUND_S, "the muxer to stop")
        reports = make_socket(ctx, zmq.PULL, config.endpoint("reports"), bind=True, options=SocketOptions(hwm=1000))
        got: list[m.Message] = []
        deadline = time.monotonic() + 15
        while not any(isinstance(r, m.JobDone) for r in got) and time.monotonic() < deadline:
            if reports.poll(200):
                got.append(m.decode(reports.recv_multipart(), config.limits))
        reports.close(0)
    finally:
        ctx.destroy(0)
    done = [r for r in got if isinstance(r, m.JobDone)]
    assert len(done) == 1 and done[0].job_id == "lingered", got
    assert p.wait_exit() == 0


# ---- what a failed job tells its client ------------------------------------------------------


def test_an_unexpected_exception_reaches_the_client_as_stage_error_without_its_text():
    exc = RuntimeError("mat1 and mat2 shapes cannot be multiplied in /opt/models/secret/transformer.py")
    body = error_body(exc, "dit_high")
    assert body == {"success": False, "error": {
        "code": "STAGE_ERROR", "message": "stage dit_high failed while running this job",
        "details": {"stage": "dit_high", "exception": "RuntimeError"}}}


def test_out_of_memory_error_holds_no_allocator_text():
    exc = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 604000000 bytes")
    err = as_out_of_memory(exc, "dit_high", "cpu")
    assert err is not None and err.code == "GPU_OUT_OF_MEMORY"
    assert err.details == {"stage": "dit_high", "device": "cpu", "exception": "RuntimeError"}
    assert "alloc" not in json.dumps(err.to_dict()).replace("allocation", "")
    assert as_out_of_memory(ValueError("can't allocate memory"), "vae", "cpu") is None


@pytest.mark.parametrize("case", ["missing", "broken", "other image"])
def test_input_image_errors_name_no_path_and_no_decoder_text(tmp_path, case, caplog):
    spool = tmp_path / "spool" / "job123"
    spool.mkdir(parents=True)
    path = spool / "image.png"
    if case == "broken":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    elif case == "other image":
        Image.new("RGB", (8, 8), "red").save(path)
    with pytest.raises(InvalidRequest) as info:
        load_image(path, 32, 32, sha256="0" * 64 if case == "other image" else None)
    text = json.dumps(info.value.to_dict())
    assert str(tmp_path) not in text and "job123" not in text and "image.png" not in text
    assert info.value.details["field"] == "image"
    if case == "broken":
        assert info.value.message == "the job's input image does not decode"
        assert info.value.details["reason"] == "UnidentifiedImageError"
    assert str(path) in caplog.text  # the stage's log keeps the path, for the operator


def test_mp4_is_fsynced_before_the_rename_and_its_folder_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        calls.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "results" / "job1.mp4"
    write_mp4(np.zeros((3, 32, 32, 3), dtype=np.uint8), 16, path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    assert calls == [("fsync", str(tmp)), ("replace", str(path)), ("fsync", str(path.parent))]
    assert path.stat().st_size > 0 and not tmp.exists()


# ---- the context a stage is handed ----------------------------------------------------------


class Recorded(StageContext):
    """An in-process context that keeps the reports and cancels or stops on request."""

    def __init__(self, cancel: str | None = None, stop: bool = False):
        self.reports: list[m.Message] = []
        self.cancel, self.stop = cancel, stop

    def emit(self, report: m.Message) -> None:
        self.reports.append(report)

    def cancelled(self, job_id: str) -> bool:
        return job_id == self.cancel

    def stopping(self) -> bool:
        return self.stop


@pytest.fixture(scope="module")
def tiny_config(model_cache, tmp_path_factory) -> Config:
    # Its own spool: the DiT writes live previews of the jobs it handles there.
    return Config.load(environ={"WAN_SERVER__RUNTIME__MODEL_CACHE_DIR": str(model_cache),
                                "WAN_SERVER__RUNTIME__SPOOL_DIR": str(tmp_path_factory.mktemp("spool"))})


def denoise_job(stage: DitStage, job_id: str) -> m.DenoiseJob:
    text_dim = stage.models["t2v-A14B"]["experts"]["transformer"].config.text_dim
    p = m.JobParams("t2v-A14B", "x", "", 0, 4, 32, 32, 5, 16, 1.0)
    return m.DenoiseJob(job_id=job_id, attempt=1, route=["dit_high", "dit_low"], params=p,
                        prompt_embeds=torch.randn(1, 8, text_dim, generator=torch.Generator().manual_seed(0)))


def test_a_dit_stage_reports_cancels_and_stops_through_its_context(tiny_config):
    context = Recorded()
    stage = DitStage(tiny_config, tiny_config.stage("dit_high"), context)
    assert stage.placement is None and stage.memory() == {} and stage.device_name() == "cpu"
    stage.setup()
    assert stage.placement is not None and stage.placement.weight_bytes > 0
    (out,) = stage.handle(denoise_job(stage, "ctx1"))
    assert isinstance(out, m.DenoiseJob) and out.step > 0
    # A step report after every step, each followed by its live preview (the tiny profile previews every step).
    assert [(r.job_id, r.stage, r.event, r.step) for r in context.reports] == [
        ("ctx1", "dit_high", event, i + 1) for i in range(out.step) for event in ("step", "preview")]
    stage.ready = True
    assert stage.memory()["device"] == "cpu" and stage.memory()["weight_bytes"] == stage.placement.weight_bytes

    stage.context = Recorded(cancel="ctx2")
    with pytest.raises(JobCancelled):
        stage.handle(denoise_job(stage, "ctx2"))
    stage.context = Recorded(stop=True)
    with pytest.raises(StageStopping):
        stage.handle(denoise_job(stage, "ctx3"))
    assert stage.context.reports == []  # stopped before the first step ran
