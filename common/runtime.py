"""The loop every stage process runs: receive -> decode -> handle -> send, plus heartbeats.

A stage is a class with `setup()` (load models) and `handle(message) -> messages`. Everything that
touches a socket lives here, so `handle` can be driven in-process by tests and by replay.

- Job messages returned by `handle` go to the next stage in the job's route; anything else
  (JobDone, JobFailed) goes to the reports endpoint.
- A message that does not decode is logged and dropped; the stage keeps serving.
- An exception in `handle` fails that job with a structured error; the stage keeps serving.
- A heartbeat thread, with its own socket, reports liveness whatever the main loop is doing.
- With `runtime.record_dir` set, every received message and what `handle` returned for it are
  written, as raw wire frames in a msgpack file, for replay (see `replay_file`).
- A job message sent to a stage of a kind in `runtime.checkpoint_kinds` (default: the DiTs and
  the VAE) is first written to the job's spool folder, and the broker is told (`checkpoint`
  report); a `ResumeJob` from the broker replays that checkpoint as a new attempt.
- The same job message (job id + attempt) delivered twice is handled once.
- SIGTERM stops a job between two steps (the broker dispatches it again).
- With `runtime.fault_dir` set (tests only), a file `<stage>.<point>.delay` (seconds) or
  `<stage>.<point>.hang` there makes the stage sleep or hang once at that point (`handle`: after
  accepting a job; stages add their own, e.g. the muxer's `write`).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import os
import resource
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import msgpack
import torch
import zmq

from common import messages as m
from common.config import Config, StageSpec
from common import procs, spool
from common.errors import CheckpointError, JobCancelled, OutOfMemory, ServerError, StageStopping, StageTimeout, WireError
from common.logs import job_context, setup_logging
from common.sockets import SocketOptions, make_socket, stop_authenticators, use_curve

log = logging.getLogger(__name__)


class Stage:
    """Base of every stage. Subclasses set `kind` and implement `setup` and `handle`."""

    kind = ""

    def __init__(self, config: Config, spec: StageSpec):
        self.config = config
        self.spec = spec
        self.name = spec.name
        self.ready = False

    def setup(self) -> None:
        """Load models. Called once before the first message."""

    def handle(self, msg: m.Message) -> list[m.Message]:
        raise NotImplementedError

    def memory(self) -> dict[str, Any]:
        """Heartbeat memory fields (see `Heartbeat`): from the stage's `placement`, once set up."""
        placement = getattr(self, "placement", None)
        return placement.memory() if placement is not None and self.ready else {}

    def device_name(self) -> str:
        """The device this stage computes on (for error details)."""
        placement = getattr(self, "placement", None)
        return str(placement.device if placement is not None else self.spec.device)

    def emit(self, msg: m.Message) -> None:
        """Send a side report (progress) while handling; the runtime replaces this."""

    def cancelled(self, job_id: str) -> bool:
        """True once the broker has cancelled `job_id`; the runtime replaces this."""
        return False

    def stopping(self) -> bool:
        """True once the process was asked to stop; the runtime replaces this."""
        return False

    def fault_point(self, point: str) -> None:
        """A place where tests inject a delay or a hang (`runtime.fault_dir`); the runtime replaces this."""

    def check_cancelled(self, job_id: str) -> None:
        """Called between steps of long work: stops a cancelled job there, or any job when stopping."""
        if self.cancelled(job_id):
            raise JobCancelled(f"job {job_id} was cancelled", {"job_id": job_id})
        if self.stopping():
            raise StageStopping(f"{self.name} is stopping", {"stage": self.name})


def next_stage(config: Config, route: list[str], current: str, kind: str) -> str | None:
    """The first stage of `kind` after `current` on `route`."""
    try:
        i = route.index(current)
    except ValueError:
        raise ServerError(f"stage {current!r} is not on the job's route {route}", {"route": route}) from None
    return next((s for s in route[i + 1 :] if config.stage(s).kind == kind), None)


def as_out_of_memory(exc: BaseException, stage: str, device: str) -> OutOfMemory | None:
    """The structured error for an allocation failure, whichever way torch reported it.

    On CUDA torch raises `torch.OutOfMemoryError`; the CPU allocator raises a RuntimeError
    ("DefaultCPUAllocator: can't allocate memory ..."), and Python's own allocations MemoryError.
    """
    text = str(exc)
    if not (
        isinstance(exc, (torch.OutOfMemoryError, MemoryError))
        or (isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()))
    ):
        return None
    first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    return OutOfMemory(
        f"{device} ran out of memory in stage {stage} while running this job; try a lower resolution or fewer frames",
        {"stage": stage, "device": device, "exception": type(exc).__name__, "detail": first},
    )


def free_memory(device: str) -> None:
    """After an allocation failure: collect what the failed job held and give cached blocks back."""
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
        log.info("after freeing: %s allocated %.2f GiB, reserved %.2f GiB", device,
                 torch.cuda.memory_allocated(device) / 2**30, torch.cuda.memory_reserved(device) / 2**30)


def limit_address_space(headroom_mib: int) -> int:
    """Cap this process's address space at its current size plus `headroom_mib` (RLIMIT_AS).

    For tests and for hosts that want a hard per-stage memory bound on the CPU: an allocation past
    the cap fails like any out-of-memory, and the job fails with GPU_OUT_OF_MEMORY."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + headroom_mib * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    log.info("address space capped at %.2f GiB (%d MiB over its size after setup)", limit / 2**30, headroom_mib)
    return limit


def error_body(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ServerError):
        return exc.to_dict()
    return ServerError(f"{type(exc).__name__}: {exc}", {"exception": type(exc).__name__}).to_dict()


class StageRuntime:
    def __init__(self, stage: Stage):
        self.stage = stage
        self.config = stage.config
        self.name = stage.name
        self.limits = self.config.limits
        self.ctx = zmq.Context.instance()
        runtime = self.config.section("runtime")
        self.options = SocketOptions(
            hwm=int(runtime.get("hwm", 16)),
            max_message_bytes=self.limits.max_message_bytes,
            send_timeout_ms=int(float(runtime.get("forward_timeout_s", 60)) * 1000),
        )
        record_dir = runtime.get("record_dir")
        self.record_dir = self.config.path(record_dir) / self.name if record_dir else None
        fault_dir = runtime.get("fault_dir")
        self.fault_dir = self.config.path(fault_dir) if fault_dir else None
        self.checkpoint_kinds = set(runtime.get("checkpoint_kinds", ["dit", "vae"]))
        self.start_ticks = procs.start_ticks(os.getpid())
        # (job id, attempt) of the job messages taken, so a message delivered twice runs once.
        self._seen: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        self.stop_event = threading.Event()
        self.busy_job: str | None = None
        self.handled = 0
        self.seq = 0
        self._peers: dict[str, zmq.Socket] = {}
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._cancel_lock = threading.Lock()
        # Reports queue (bounded) while the tracker is down or restarting, instead of being lost.
        self.report_options = SocketOptions(
            hwm=int(runtime.get("report_hwm", 1000)), max_message_bytes=self.limits.max_message_bytes, immediate=False
        )

    # ---- sockets ----
    def _peer(self, name: str) -> zmq.Socket:
        sock = self._peers.get(name)
        if sock is None:
            options = self.report_options if name == "reports" else self.options
            sock = make_socket(self.ctx, zmq.PUSH, self.config.endpoint(name), bind=False, options=options)
            self._peers[name] = sock
        return sock

    def _send_report(self, msg: m.Message) -> None:
        """Reports never block the stage: if nobody is listening they are dropped."""
        try:
            if isinstance(msg, m.StageReport):
                msg.pid = os.getpid()
            self._peer("reports").send_multipart(m.encode(msg), copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("no listener for reports; dropped %s", msg.type_name)

    def _forward(self, msg: m.JobMessage, frames: list[Any]) -> None:
        dest = next_stage(self.config, msg.route, self.name, msg.stage_kind)
        if dest is None:
            raise ServerError(
                f"no {msg.stage_kind} stage after {self.name} on the route {msg.route}", {"route": msg.route}
            )
        if self.config.stage(dest).kind in self.checkpoint_kinds:
            self._checkpoint(msg, dest, frames)
        sock = self._peer(dest)
        deadline = time.monotonic() + self.options.send_timeout_ms / 1000
        while True:  # wait for the next stage in short slices, so SIGTERM is not held up by a peer that is down
            try:
                sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                break
            except zmq.Again:
                if self.stop_event.is_set():
                    raise StageStopping(f"{self.name} is stopping", {"stage": self.name}) from None
                if time.monotonic() > deadline:
                    raise StageTimeout(f"stage {dest} did not take the job in time", {"stage": dest}) from None
                sock.poll(200, zmq.POLLOUT)
        self._send_report(m.StageReport(msg.job_id, msg.attempt, self.name, "forwarded", at=time.time(), to=dest))
        log.info("attempt %d: %s sent to %s", msg.attempt, msg.type_name, dest)

    def _checkpoint(self, msg: m.JobMessage, dest: str, frames: list[Any]) -> None:
        """Keep the message for `dest` in the job's spool folder. Best effort: without it the job
        still runs, and a crash later sends it again from an earlier checkpoint."""
        try:
            started = time.monotonic()
            path = spool.write_checkpoint(self.config, msg.job_id, dest, frames)
        except (OSError, ServerError) as exc:
            log.warning("attempt %d: no checkpoint for %s: %s", msg.attempt, dest, getattr(exc, "strerror", None) or exc)
            return
        self._send_report(m.StageReport(msg.job_id, msg.attempt, self.name, "checkpoint", at=time.time(), to=dest))
        log.info("attempt %d: checkpoint for %s written (%d bytes, %.3f s)", msg.attempt, dest, path.stat().st_size,
                 time.monotonic() - started)

    def _resume(self, resume: m.ResumeJob) -> m.JobMessage:
        """The job message of a checkpoint written for this stage, as attempt `resume.attempt`."""
        try:
            frames = spool.read_checkpoint(self.config, resume.job_id, self.name, self.limits)
            msg = m.decode(frames, self.limits)
        except (OSError, ValueError, ServerError) as exc:
            raise CheckpointError(f"the checkpoint for {self.name} could not be read",
                                  {"stage": self.name, "reason": type(exc).__name__}) from None
        if not isinstance(msg, m.JobMessage) or msg.job_id != resume.job_id:
            raise CheckpointError(f"the checkpoint for {self.name} holds another job", {"stage": self.name})
        msg.attempt = resume.attempt
        log.info("attempt %d: resumed from the checkpoint for %s", resume.attempt, self.name)
        return msg

    def fault_point(self, point: str) -> None:
        if self.fault_dir is None:
            return
        for kind in ("hang", "delay"):
            trigger = self.fault_dir / f"{self.name}.{point}.{kind}"
            try:
                text = trigger.read_text().strip()
                trigger.unlink()  # one shot: the restarted process runs normally
            except FileNotFoundError:
                continue
            if kind == "hang":
                log.warning("fault injected: hanging at %s", point)
                threading.Event().wait()
            seconds = float(text or 0)
            log.warning("fault injected: sleeping %.1f s at %s", seconds, point)
            self.stop_event.wait(seconds)

    # ---- heartbeat ----
    def _heartbeat_loop(self) -> None:
        options = SocketOptions(hwm=1, linger_ms=0, immediate=True)  # a stale heartbeat is worthless
        sock = make_socket(self.ctx, zmq.PUSH, self.config.endpoint("reports"), bind=False, options=options)
        try:
            while not self.stop_event.is_set():
                try:
                    memory = self.stage.memory()
                except Exception as exc:  # a heartbeat without memory figures beats none
                    log.warning("could not read device memory: %s", exc)
                    memory = {}
                beat = m.Heartbeat(
                    stage=self.name,
                    pid=os.getpid(),
                    ready=self.stage.ready,
                    busy_job=self.busy_job,
                    handled=self.handled,
                    at=time.time(),
                    start_ticks=self.start_ticks,
                    **memory,
                )
                try:
                    sock.send_multipart(m.encode(beat), flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
                self.stop_event.wait(self.config.heartbeat_interval)
        finally:
            sock.close(0)

    # ---- cancellation ----
    def cancelled(self, job_id: str) -> bool:
        with self._cancel_lock:
            return job_id in self._cancelled

    def _cancel_loop(self) -> None:
        """Listen to the broker's `cancel` events; the main loop checks the set between steps."""
        sub = make_socket(self.ctx, zmq.SUB, self.config.endpoint("events"), bind=False, options=SocketOptions(hwm=1000))
        sub.setsockopt(zmq.SUBSCRIBE, b"cancel")
        try:
            while not self.stop_event.is_set():
                if not sub.poll(200):
                    continue
                parts = sub.recv_multipart(copy=False)
                try:
                    msg = m.decode(parts[1:], self.limits)
                except WireError as exc:
                    log.error("dropped a bad cancel event: %s %s", exc.code, exc.message)
                    continue
                if isinstance(msg, m.CancelJob):
                    with self._cancel_lock:
                        self._cancelled[msg.job_id] = None
                        while len(self._cancelled) > 10_000:
                            self._cancelled.popitem(last=False)
        finally:
            sub.close(0)

    # ---- recording ----
    def _record(self, seq: int, job_id: str | None, incoming: list[bytes], outgoing: list[list[Any]] | None) -> None:
        if self.record_dir is None:
            return
        body = {
            "stage": self.name,
            "job_id": job_id,
            "in": incoming,
            "out": None if outgoing is None else [[bytes(memoryview(f)) for f in parts] for parts in outgoing],
        }
        path = self.record_dir / f"{seq:06d}-{job_id or 'undecodable'}.msgpack"
        tmp = path.with_suffix(".tmp")
        try:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(msgpack.packb(body, use_bin_type=True))
            tmp.replace(path)
        except OSError as exc:  # a recording is a debugging aid: losing one must not stop the stage
            log.warning("could not record message %d: %s", seq, exc.strerror)
            tmp.unlink(missing_ok=True)

    # ---- main loop ----
    def process(self, parts: list[Any]) -> None:
        """Handle one received multipart message (already off the socket)."""
        self.seq += 1
        seq = self.seq
        incoming = [bytes(p.buffer if hasattr(p, "buffer") else p) for p in parts] if self.record_dir else []
        try:
            msg = m.decode(parts, self.limits)
        except WireError as exc:
            log.error("dropped a bad message: %s %s", exc.code, exc.message)
            self._record(seq, None, incoming, None)
            return
        job_id = getattr(msg, "job_id", None)
        attempt = getattr(msg, "attempt", 0)
        with job_context(job_id):
            if isinstance(msg, m.ResumeJob):
                try:
                    msg = self._resume(msg)
                except ServerError as exc:
                    log.error("cannot resume: %s", exc.message)
                    self._send_report(m.JobFailed(job_id, attempt, self.name, exc.to_dict()))
                    return
                if self.record_dir:
                    incoming = [bytes(memoryview(f)) for f in m.encode(msg)]
            if job_id is not None and isinstance(msg, m.JobMessage):
                if (job_id, attempt) in self._seen:
                    log.warning("dropped a second delivery of attempt %d", attempt)
                    return
                self._seen[(job_id, attempt)] = None
                while len(self._seen) > 10_000:
                    self._seen.popitem(last=False)
            self._record(seq, job_id, incoming, None)
            self.busy_job = job_id
            if job_id is not None and self.cancelled(job_id):
                log.info("dropped a cancelled job")
                self._send_report(m.StageReport(job_id, attempt, self.name, "cancelled", at=time.time()))
                self.busy_job = None
                return
            if job_id is not None:
                self._send_report(m.StageReport(job_id, attempt, self.name, "accepted", at=time.time()))
            outputs: list[list[Any]] = []
            oom = None
            try:
                self.fault_point("handle")
                if job_id is not None:
                    self.stage.check_cancelled(job_id)
                for out in self.stage.handle(msg):
                    frames = m.encode(out)
                    outputs.append(frames)
                    if isinstance(out, m.JobMessage):
                        self._forward(out, frames)
                    else:
                        self._peer("reports").send_multipart(frames, copy=False)
                self._record(seq, job_id, incoming, outputs)
            except JobCancelled:
                log.info("stopped: the job was cancelled")
                self._send_report(m.StageReport(job_id, attempt, self.name, "cancelled", at=time.time()))
            except StageStopping:
                log.warning("stopping: dropped attempt %d; the broker dispatches the job again", attempt)
            except Exception as exc:  # a job's failure is not the process's failure
                oom = as_out_of_memory(exc, self.name, self.stage.device_name())
                if oom is not None:
                    log.error("job failed in %s: out of memory on %s: %s", self.name, self.stage.device_name(),
                              oom.details["detail"])
                else:
                    log.error("job failed in %s: %s\n%s", self.name, exc, traceback.format_exc())
                if job_id is not None:
                    self._send_report(m.JobFailed(job_id, attempt, self.name, error_body(oom or exc)))
                exc.__traceback__ = None  # its frames hold the failed job's tensors
            finally:
                self.busy_job = None
                self.handled += 1
            if oom is not None:
                free_memory(self.stage.device_name())

    def run(self) -> None:
        stage = self.stage
        pull = make_socket(self.ctx, zmq.PULL, self.config.endpoint(self.name), bind=True, options=self.options)
        stage.emit = self._send_report  # type: ignore[method-assign]
        stage.cancelled = self.cancelled  # type: ignore[method-assign]
        stage.stopping = self.stop_event.is_set  # type: ignore[method-assign]
        stage.fault_point = self.fault_point  # type: ignore[method-assign]
        cancel = threading.Thread(target=self._cancel_loop, name="cancel", daemon=True)
        cancel.start()
        self._peer("reports")
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        started = time.monotonic()
        stage.setup()
        placement = getattr(stage, "placement", None)
        if placement is not None:
            log.info("%s", placement.summary())
        headroom = stage.spec.options.get("address_space_headroom_mib")
        if headroom:
            limit_address_space(int(headroom))
        stage.ready = True
        log.info("%s ready in %.1f s, listening on %s", self.name, time.monotonic() - started, self.config.endpoint(self.name))
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                if not poller.poll(200):
                    continue
                parts = pull.recv_multipart(copy=False)
                self.process(parts)
        finally:
            self.stop_event.set()
            beat.join(timeout=2)
            cancel.join(timeout=2)
            pull.close(0)
            for sock in self._peers.values():
                sock.close()
            stop_authenticators()
            log.info("%s stopped", self.name)


def replay_file(path: str | os.PathLike[str], stage: Stage, limits) -> tuple[list[list[bytes]], list[list[bytes]]]:
    """Feed a recorded message to `stage.handle` in-process; returns (recorded outputs, replayed outputs)."""
    body = msgpack.unpackb(Path(path).read_bytes(), raw=False)
    msg = m.decode(body["in"], limits)
    replayed = [[bytes(memoryview(f)) for f in m.encode(out)] for out in stage.handle(msg)]
    return body["out"], replayed


def stage_main(stage_cls: type[Stage], argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=f"run a {stage_cls.kind} stage process")
    parser.add_argument("--config", help="profile TOML (default: $WAN_SERVER_CONFIG or the tiny profile)")
    parser.add_argument("--name", default=stage_cls.kind, help="stage name in the config (default: %(default)s)")
    args = parser.parse_args(argv)
    config = Config.load(args.config)
    setup_logging(config.log_level)
    spec = config.stage(args.name)
    if spec.kind != stage_cls.kind:
        parser.error(f"stage {args.name!r} is a {spec.kind} stage, not {stage_cls.kind}")
    configure_torch(config)
    use_curve(config.curve_keys())
    runtime = StageRuntime(stage_cls(config, spec))

    def on_term(signum, frame):  # supervisord stops us with SIGTERM
        runtime.stop_event.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        runtime.run()
    except ServerError as exc:  # e.g. MODEL_LOAD_ERROR from setup(): one structured line, no traceback
        log.error("%s could not start: %s", args.name, json.dumps(exc.to_dict()["error"], default=str))
        raise SystemExit(3) from None
    # Sockets are closed and logs written: leave now. Interpreter teardown (library finalizers,
    # threads) has been seen to hang for seconds after SIGTERM, which delays a restart.
    logging.shutdown()
    os._exit(0)


def configure_torch(config: Config) -> None:
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
