"""The loop every stage process runs: receive -> decode -> handle -> send, plus heartbeats.

Everything that touches a socket or a signal lives here, so a stage's `handle` can be driven
in-process by tests, replay and benchmarks (`stages/base.py`).

- Job messages returned by `handle` go to the next stage in the job's route; anything else
  (JobDone, JobFailed) goes to the reports endpoint.
- A message that does not decode is logged and dropped; the stage keeps serving.
- An exception in `handle` fails that job with a structured error (`stages/failures.py`); the
  stage keeps serving.
- A heartbeat thread, with its own socket, reports liveness whatever the main loop is doing; a
  cancellation thread listens to the broker's `cancel` events.
- Job messages to a stage on an ipc:// endpoint hand their tensors over in shared memory
  (`common/shm.py`, `runtime.shared_memory`): this process writes them into a segment of its pool
  for that stage once the stage can take the message, and maps the segments of the messages it
  receives; it clears its own segment folder before it binds and when it stops.
- With `runtime.record_dir` set, the traffic is recorded for replay (`stages/recording.py`).
- A job message sent to a stage of a kind in `runtime.checkpoint_kinds` (default: the DiTs and
  the VAE) is first written to the job's spool folder, and the broker is told (`checkpoint`
  report); a `ResumeJob` from the broker replays that checkpoint as a new attempt.
- The same job message (job id + attempt, and the clip of an S2V job, which passes each stage
  once per clip) delivered twice is handled once.
- An S2V job's next clip goes from the VAE back to the route's first DiT (`next_stage` with
  `JobMessage.starts_cycle`); its reports name the clip.
- A DiT stage with `max_batch` > 1 handles compatible DenoiseJobs together (`_gather`,
  `Stage.batch_key` / `handle_batch`, stages/batching.py): the first, and those queued or arriving
  within `batch_wait_ms` of its arrival; the others wait in a backlog, handled next in arrival
  order. Each job of a batch is accepted, cancelled, forwarded or failed on its own.
- SIGTERM stops a job between two steps (the broker dispatches it again). During `setup()` it
  abandons the loading where it is (`SetupAborted`): loading keeps no state worth finishing, and
  one 14B expert takes minutes to load, so waiting for a check between models would hold a stop
  up that long. Whatever way the process ends, the threads are joined and the sockets closed;
  reports still queued (the broker restarting) get `runtime.shutdown_linger_s` to leave.
- With `runtime.fault_dir` set (tests only), a file `<stage>.<point>.delay` (seconds) or
  `<stage>.<point>.hang` there makes the stage sleep or hang once at that point (`setup`: before
  the models load; `handle`: after accepting a job; stages add their own, e.g. the muxer's `write`).
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import zmq

from common import messages as m
from common import procs, spool
from common.config import Config, StageSpec, load_or_exit
from common.errors import (
    CheckpointError,
    JobCancelled,
    ServerError,
    StageStopping,
    StageTimeout,
    WireError,
)
from common.logs import job_context, setup_logging
from common.shm import Segment, SegmentPool, SharedReceiver
from common.sockets import SocketOptions, make_socket, stop_authenticators, use_curve
from stages.base import Stage, StageContext
from stages.failures import as_out_of_memory, error_body, free_memory
from stages.recording import Recorder, frame_bytes

log = logging.getLogger(__name__)

REMEMBERED = 10_000  # job ids kept for dedupe and cancellation


def is_clip(msg: m.Message) -> bool:
    return isinstance(msg, (m.ClipDenoiseJob, m.ClipDecodeJob))


def clip_of(msg: m.Message) -> int:
    """The S2V clip a job message carries (0 for every other message)."""
    return msg.clip if isinstance(msg, (m.ClipDenoiseJob, m.ClipDecodeJob)) else 0


@dataclass
class Taken:
    """A received message, decoded and not a second delivery, waiting to be handled."""

    seq: int
    msg: m.Message
    job_id: str | None
    attempt: int
    incoming: list[bytes]  # its frames, for the recording (empty when not recording)
    received: float  # time.monotonic() when it was taken


class SetupAborted(BaseException):
    """Raised by the SIGTERM handler while `setup()` runs. A BaseException, so that the loaders'
    `except Exception` (which turn failures into MODEL_LOAD_ERROR) let it through."""


def next_stage(config: Config, route: list[str], current: str, kind: str, cycle: bool = False) -> str | None:
    """The first stage of `kind` after `current` on `route`; with `cycle` (a message that starts
    an S2V job's next clip, `JobMessage.starts_cycle`) the first on the route when none follows."""
    try:
        i = route.index(current)
    except ValueError:
        raise ServerError(f"stage {current!r} is not on the job's route {route}", {"route": route}) from None
    after = next((s for s in route[i + 1 :] if config.stage(s).kind == kind), None)
    if after is None and cycle:
        return next((s for s in route[: i + 1] if config.stage(s).kind == kind), None)
    return after


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


class FaultPoints:
    """Test-only delays and hangs (`runtime.fault_dir`), each armed by a file and fired once."""

    def __init__(self, folder: Path | None, stage: str, stop_event: threading.Event):
        self.folder = folder
        self.stage = stage
        self.stop_event = stop_event

    def __call__(self, point: str) -> None:
        if self.folder is None:
            return
        for kind in ("hang", "delay"):
            trigger = self.folder / f"{self.stage}.{point}.{kind}"
            try:
                text = trigger.read_text().strip()
                trigger.unlink()  # one shot: the restarted process runs normally
            except FileNotFoundError:
                continue
            if kind == "hang":  # like a library call that never returns: not woken by a stop
                log.warning("fault injected: hanging at %s", point)
                threading.Event().wait()
            seconds = float(text or 0)
            log.warning("fault injected: sleeping %.1f s at %s", seconds, point)
            self.stop_event.wait(seconds)


class Cancellations:
    """The job ids the broker cancelled (the newest `REMEMBERED`), shared by two threads."""

    def __init__(self) -> None:
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, job_id: str) -> None:
        with self._lock:
            self._ids[job_id] = None
            while len(self._ids) > REMEMBERED:
                self._ids.popitem(last=False)

    def __contains__(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._ids


class RuntimeContext(StageContext):
    """The context of a stage in its process: reports on the reports socket, cancellations from the
    broker's events, the stop flag SIGTERM sets, the configured fault points."""

    def __init__(self, runtime: StageRuntime):
        self._runtime = runtime

    def emit(self, report: m.Message) -> None:
        self._runtime.send_report(report)

    def cancelled(self, job_id: str) -> bool:
        return job_id in self._runtime.cancellations

    def stopping(self) -> bool:
        return self._runtime.stop_event.is_set()

    def fault_point(self, name: str) -> None:
        self._runtime.faults(name)


class StageRuntime:
    def __init__(self, config: Config, spec: StageSpec, stage_cls: type[Stage]):
        self.config = config
        self.name = spec.name
        self.limits = config.limits
        # Our own context, terminated when the process stops (after its sockets are closed).
        self.ctx = zmq.Context()
        runtime = config.runtime
        self.options = SocketOptions(
            hwm=runtime.hwm,
            max_message_bytes=self.limits.max_message_bytes,
            send_timeout_ms=int(runtime.forward_timeout_s * 1000),
        )
        # Reports queue (bounded) while the tracker is down or restarting, instead of being lost.
        self.report_options = SocketOptions(
            hwm=runtime.report_hwm, max_message_bytes=self.limits.max_message_bytes, immediate=False
        )
        self.shutdown_linger_ms = int(runtime.shutdown_linger_s * 1000)
        record_dir = runtime.record_dir
        self.recorder = Recorder(config.path(record_dir) / self.name if record_dir else None, self.name)
        self.checkpoint_kinds = set(runtime.checkpoint_kinds)
        self.start_ticks = procs.start_ticks(os.getpid())
        self.stop_event = threading.Event()
        fault_dir = runtime.fault_dir
        self.faults = FaultPoints(config.path(fault_dir) if fault_dir else None, self.name, self.stop_event)
        self.cancellations = Cancellations()
        # (job id, attempt, clip) of the job messages taken, so a message delivered twice runs once.
        self._seen: collections.OrderedDict[tuple[str, int, int], None] = collections.OrderedDict()
        self.busy_job: str | None = None
        # Batching (a DiT's max_batch > 1, stages/batching.py): messages taken while a batch
        # gathered that were not of its kind, handled next in arrival order.
        self.max_batch = spec.max_batch
        self.batch_wait_s = spec.batch_wait_ms / 1000
        self._backlog: collections.deque[Taken] = collections.deque()
        self.handled = 0
        self.seq = 0
        self._peers: dict[str, zmq.Socket[bytes]] = {}
        self._pools: dict[str, SegmentPool | None] = {}
        own_ipc = config.endpoint(self.name).startswith("ipc://")
        self.shared_in = SharedReceiver(config.shm_dir / self.name) if runtime.shared_memory and own_ipc else None
        self._in_setup = False
        self.stage = stage_cls(config, spec, RuntimeContext(self))

    # ---- signals ----
    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM/SIGINT (supervisord stops us with SIGTERM): stop between two steps; abandon setup."""
        self.stop_event.set()
        if self._in_setup:
            self._in_setup = False  # raise once: the cleanup after it must not be interrupted
            raise SetupAborted(f"signal {signum} during setup")

    # ---- sockets ----
    def _peer(self, name: str) -> zmq.Socket[bytes]:
        sock = self._peers.get(name)
        if sock is None:
            options = self.report_options if name == "reports" else self.options
            sock = make_socket(self.ctx, zmq.PUSH, self.config.endpoint(name), bind=False, options=options)
            self._peers[name] = sock
        return sock

    def _share(self, dest: str, frames: list[Any]) -> tuple[list[Any], Segment | None]:
        """`frames` as they go to `dest`: through a shared-memory segment to a same-host stage."""
        if dest not in self._pools:
            runtime = self.config.runtime
            same_host = runtime.shared_memory and self.config.endpoint(dest).startswith("ipc://")
            self._pools[dest] = SegmentPool(
                self.config.shm_dir / dest, self.name, runtime.shm_pool_bytes, runtime.shm_min_bytes
            ) if same_host else None
        pool = self._pools[dest]
        return pool.share(frames) if pool is not None else (frames, None)

    def send_report(self, msg: m.Message) -> None:
        """Reports never block the stage: if nobody is listening they are dropped."""
        try:
            if isinstance(msg, m.StageReport):
                msg.pid = os.getpid()
            self._peer("reports").send_multipart(m.encode(msg), copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("no listener for reports; dropped %s", msg.type_name)

    def _forward(self, msg: m.JobMessage, frames: list[Any]) -> None:
        dest = next_stage(self.config, msg.route, self.name, msg.stage_kind, msg.starts_cycle)
        if dest is None:
            raise ServerError(
                f"no {msg.stage_kind} stage after {self.name} on the route {msg.route}", {"route": msg.route}
            )
        if self.config.stage(dest).kind in self.checkpoint_kinds:
            self._checkpoint(msg, dest, frames)
        sock = self._peer(dest)
        deadline = time.monotonic() + self.options.send_timeout_ms / 1000
        while True:  # wait for the next stage in short slices, so SIGTERM is not held up by a peer that is down
            # Fill a segment only once the peer can take the message: one that restarts meanwhile
            # clears its segment folder before it binds.
            if sock.poll(0, zmq.POLLOUT):
                parts, segment = self._share(dest, frames)
                try:
                    sock.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
                    break
                except zmq.Again:
                    if segment is not None:
                        segment.release()
            if self.stop_event.is_set():
                raise StageStopping(f"{self.name} is stopping", {"stage": self.name})
            if time.monotonic() > deadline:
                raise StageTimeout(f"stage {dest} did not take the job in time", {"stage": dest})
            sock.poll(200, zmq.POLLOUT)
        clip = clip_of(msg)
        self.send_report(m.StageReport(msg.job_id, msg.attempt, self.name, "forwarded", at=time.time(), to=dest,
                                       clip=clip))
        log.info("attempt %d: %s%s sent to %s", msg.attempt, msg.type_name, f" (clip {clip})" if is_clip(msg) else "",
                 dest)

    def _checkpoint(self, msg: m.JobMessage, dest: str, frames: list[Any]) -> None:
        """Keep the message for `dest` in the job's spool folder. Best effort: without it the job
        still runs, and a crash later sends it again from an earlier checkpoint."""
        try:
            started = time.monotonic()
            path = spool.write_checkpoint(self.config, msg.job_id, dest, frames)
        except (OSError, ServerError) as exc:
            log.warning("attempt %d: no checkpoint for %s: %s",
                        msg.attempt, dest, getattr(exc, "strerror", None) or exc)
            return
        self.send_report(m.StageReport(msg.job_id, msg.attempt, self.name, "checkpoint", at=time.time(), to=dest,
                                       clip=clip_of(msg)))
        log.info("attempt %d: checkpoint for %s%s written (%d bytes, %.3f s)", msg.attempt, dest,
                 f" (clip {clip_of(msg)})" if is_clip(msg) else "", path.stat().st_size, time.monotonic() - started)

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
        log.info("attempt %d: resumed from the checkpoint for %s%s", resume.attempt, self.name,
                 f" at clip {clip_of(msg)}" if is_clip(msg) else "")
        return msg

    # ---- threads ----
    def _heartbeat_loop(self) -> None:
        options = SocketOptions(hwm=1, linger_ms=0, immediate=True)  # a stale heartbeat is worthless
        sock = make_socket(self.ctx, zmq.PUSH, self.config.endpoint("reports"), bind=False, options=options)
        try:
            while not self.stop_event.is_set():
                try:
                    memory = self.stage.memory()
                except Exception as exc:  # noqa: BLE001 - a heartbeat without memory figures beats none
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

    def _cancel_loop(self) -> None:
        """Listen to the broker's `cancel` events; the main loop checks the set between steps."""
        sub = make_socket(
            self.ctx, zmq.SUB, self.config.endpoint("events"), bind=False, options=SocketOptions(hwm=1000)
        )
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
                    self.cancellations.add(msg.job_id)
        finally:
            sub.close(0)

    # ---- one message ----
    def process(self, parts: list[Any]) -> None:
        """Handle one received multipart message (already off the socket)."""
        taken = self._take(parts)
        if taken is not None:
            self._run(taken)

    def _take(self, parts: list[Any]) -> Taken | None:
        """Decode a received message (a ResumeJob: its checkpoint's); None when it is dropped (it
        does not decode, its checkpoint cannot be read, or it is a second delivery)."""
        self.seq += 1
        seq = self.seq
        incoming = [frame_bytes(p) for p in parts] if self.recorder.enabled else []
        try:
            msg = m.decode(parts, self.limits, self.shared_in)
        except WireError as exc:
            log.error("dropped a bad message: %s %s", exc.code, exc.message)
            self.recorder.record(seq, None, incoming, None)
            return None
        if self.recorder.enabled and len(parts) == 1:  # perhaps shared: record the framed message
            incoming = [frame_bytes(f) for f in m.encode(msg)]
        job_id = getattr(msg, "job_id", None)
        attempt = getattr(msg, "attempt", 0)
        with job_context(job_id):
            if isinstance(msg, m.ResumeJob):
                try:
                    msg = self._resume(msg)
                except ServerError as exc:
                    log.error("cannot resume: %s", exc.message)
                    self.send_report(m.JobFailed(msg.job_id, attempt, self.name, exc.to_dict()))
                    return None
                if self.recorder.enabled:
                    incoming = [frame_bytes(f) for f in m.encode(msg)]
            if job_id is not None and isinstance(msg, m.JobMessage):
                key = (job_id, attempt, clip_of(msg))
                if key in self._seen:
                    log.warning("dropped a second delivery of attempt %d%s", attempt,
                                f" (clip {key[2]})" if is_clip(msg) else "")
                    return None
                self._seen[key] = None
                while len(self._seen) > REMEMBERED:
                    self._seen.popitem(last=False)
            self.recorder.record(seq, job_id, incoming, None)
        return Taken(seq, msg, job_id, attempt, incoming, time.monotonic())

    def _run(self, taken: Taken) -> None:
        with job_context(taken.job_id):
            if self._start(taken):
                self._finish(taken, lambda: self.stage.handle(taken.msg))

    def _start(self, taken: Taken) -> bool:
        """Drop a cancelled job (False), else report it accepted."""
        job_id = taken.job_id
        self.busy_job = job_id
        if job_id is not None and job_id in self.cancellations:
            log.info("dropped a cancelled job")
            self.send_report(m.StageReport(job_id, taken.attempt, self.name, "cancelled", at=time.time()))
            self.busy_job = None
            return False
        if job_id is not None:
            self.send_report(m.StageReport(job_id, taken.attempt, self.name, "accepted", at=time.time(),
                                           clip=clip_of(taken.msg)))
        return True

    def _finish(self, taken: Taken, handle: Callable[[], list[m.Message]]) -> None:
        """Run `handle` (the stage's handling of the job, or a batch's result for it), then send
        its outputs on; a failure fails this job only."""
        job_id, attempt, seq = taken.job_id, taken.attempt, taken.seq
        outputs: list[list[Any]] = []
        oom = None
        try:
            self.faults("handle")
            if job_id is not None:
                self.stage.check_cancelled(job_id)
            for out in handle():
                frames = m.encode(out)
                outputs.append(frames)
                if isinstance(out, m.JobMessage):
                    self._forward(out, frames)
                else:
                    self._peer("reports").send_multipart(frames, copy=False)
            self.recorder.record(seq, job_id, taken.incoming, outputs)
        except JobCancelled:
            log.info("stopped: the job was cancelled")
            if job_id is not None:
                self.send_report(m.StageReport(job_id, attempt, self.name, "cancelled", at=time.time()))
        except StageStopping:
            log.warning("stopping: dropped attempt %d; the broker dispatches the job again", attempt)
        except Exception as exc:  # noqa: BLE001 - a job's failure is not the process's failure
            device = self.stage.device_name()
            oom = as_out_of_memory(exc, self.name, device)
            # The full text stays here, in the stage's log (with the job id); the report
            # carries only the structured error.
            if oom is not None:
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                log.error("job failed in %s: out of memory on %s: %s", self.name, device, first)
            else:
                if isinstance(exc, ServerError):
                    what = f"{exc.code} {exc.message}"
                else:
                    what = f"{type(exc).__name__}: {exc}"
                log.error("job failed in %s: %s\n%s", self.name, what, traceback.format_exc())
            if job_id is not None:
                self.send_report(m.JobFailed(job_id, attempt, self.name, error_body(oom or exc, self.name)))
            exc.__traceback__ = None  # its frames hold the failed job's tensors
        finally:
            self.busy_job = None
            self.handled += 1
        if oom is not None:
            free_memory(self.stage.device_name())

    # ---- batches (stages/batching.py) ----
    def _gather(self, pull: zmq.Socket[bytes], first: Taken, key: Any) -> list[Taken]:
        """`first` and the messages of the same batch key taken after it, up to `max_batch`: those
        already waiting (in the backlog, then on the socket), and those arriving until
        `batch_wait_ms` after `first` arrived. Others join the backlog, in arrival order."""
        group = [first]
        limit = self.max_batch
        for taken in list(self._backlog):
            if len(group) >= limit:
                return group
            if self.stage.batch_key(taken.msg) == key:
                self._backlog.remove(taken)
                group.append(taken)
        deadline = first.received + self.batch_wait_s
        # Past the deadline, only what is queued already; at most `hwm` others held back (backpressure).
        while len(group) < limit and len(self._backlog) < self.options.hwm and not self.stop_event.is_set():
            if not pull.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                break
            arrived = self._take(pull.recv_multipart(copy=False))
            if arrived is None:
                continue
            if self.stage.batch_key(arrived.msg) == key:
                group.append(arrived)
            else:
                self._backlog.append(arrived)
        return group

    def _run_batch(self, group: list[Taken]) -> None:
        """Handle a gathered group: one `handle_batch` for the jobs still wanted, then each job's
        outputs (or failure) as `_run` would have sent them."""
        started = [t for t in group if self._start(t)]
        if not started:
            return
        self.busy_job = started[0].job_id
        log.info("batch of %d: %s", len(started), " ".join(str(t.job_id) for t in started))
        try:
            results: list[list[m.Message] | Exception] = self.stage.handle_batch([t.msg for t in started])
        except Exception as exc:  # noqa: BLE001 - the batch failed as a whole: each of its jobs
            results = [exc] * len(started)
        for taken, result in zip(started, results, strict=True):
            def handled(result: list[m.Message] | Exception = result) -> list[m.Message]:
                if isinstance(result, Exception):
                    raise result
                return result

            with job_context(taken.job_id):
                self._finish(taken, handled)

    # ---- the process ----
    def run(self) -> None:
        """Set up, then serve until stopped. Raises what setup raised (`SetupAborted` on SIGTERM
        during setup); the threads and sockets are cleaned up however it ends."""
        threads = [
            threading.Thread(target=self._cancel_loop, name="cancel", daemon=True),
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
        ]
        pull: zmq.Socket[bytes] | None = None
        try:
            if self.shared_in is not None:
                removed = self.shared_in.start()
                if removed:
                    log.info("removed %d shared-memory segments an earlier process left", removed)
            pull = make_socket(self.ctx, zmq.PULL, self.config.endpoint(self.name), bind=True, options=self.options)
            self._peer("reports")
            for thread in threads:
                thread.start()
            self._setup()
            self._serve(pull)
        finally:
            self._shutdown(threads, pull)

    def _setup(self) -> None:
        started = time.monotonic()
        stage = self.stage
        self._in_setup = True
        try:
            if self.stop_event.is_set():  # the signal came before setup began
                raise SetupAborted("stopped before setup")
            self.faults("setup")
            stage.setup()
        finally:
            self._in_setup = False
        if stage.placement is not None:
            log.info("%s", stage.placement.summary())
        headroom = stage.spec.address_space_headroom_mib
        if headroom:
            limit_address_space(int(headroom))
        # What the imports and the loading created lives as long as the process: keep it out of
        # every later full collection, and out of the two the interpreter runs at exit, which
        # otherwise take seconds over torch's, diffusers' and transformers' objects.
        gc.freeze()
        stage.ready = True
        log.info("%s ready in %.1f s, listening on %s",
                 self.name, time.monotonic() - started, self.config.endpoint(self.name))

    def _serve(self, pull: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        taken: Taken | None
        while not self.stop_event.is_set():
            if self._backlog:  # taken while a batch gathered, not of its kind
                taken = self._backlog.popleft()
            elif not poller.poll(200):
                continue
            else:
                taken = self._take(pull.recv_multipart(copy=False))
            if taken is None:
                continue
            key = self.stage.batch_key(taken.msg) if self.max_batch > 1 else None
            group = [taken] if key is None else self._gather(pull, taken, key)
            if len(group) == 1:
                self._run(taken)
            else:
                self._run_batch(group)

    def _shutdown(self, threads: list[threading.Thread], pull: zmq.Socket[bytes] | None) -> None:
        self.stop_event.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(timeout=2)
        stuck = [t.name for t in threads if t.is_alive()]
        log.info("closing sockets; queued messages get up to %.1f s to leave", self.shutdown_linger_ms / 1000)
        if pull is not None:
            pull.close(linger=0)
        for sock in self._peers.values():
            # Reports and forwarded jobs still queued get a short while to leave (the broker or the
            # next stage restarting); after that they are dropped.
            sock.close(linger=self.shutdown_linger_ms)
        for pool in self._pools.values():
            if pool is not None:
                pool.close()
        if self.shared_in is not None:
            self.shared_in.stop()
        stop_authenticators()
        if stuck:
            # term() would wait for the sockets those threads hold; the OS closes them at exit.
            log.warning("threads %s did not stop; the ZeroMQ context is left to the OS", ", ".join(stuck))
        else:
            self.ctx.term()
        log.info("%s stopped", self.name)


def stage_main(stage_cls: type[Stage], argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=f"run a {stage_cls.kind} stage process")
    parser.add_argument("--config", help="profile TOML (default: $WAN_SERVER_CONFIG or the tiny profile)")
    parser.add_argument("--name", default=stage_cls.kind, help="stage name in the config (default: %(default)s)")
    args = parser.parse_args(argv)
    config = load_or_exit(args.config)
    setup_logging(config.log_level)
    spec = config.stage(args.name)
    if spec.kind != stage_cls.kind:
        parser.error(f"stage {args.name!r} is a {spec.kind} stage, not {stage_cls.kind}")
    configure_torch(config)
    use_curve(config.curve_keys())
    runtime = StageRuntime(config, spec, stage_cls)
    signal.signal(signal.SIGTERM, runtime.on_signal)
    signal.signal(signal.SIGINT, runtime.on_signal)
    try:
        runtime.run()
    except SetupAborted:
        log.info("%s stopped during setup", args.name)
    except ServerError as exc:  # e.g. MODEL_LOAD_ERROR from setup(): one structured line, no traceback
        log.error("%s could not start: %s", args.name, json.dumps(exc.to_dict()["error"], default=str))
        raise SystemExit(3) from None
    except Exception as exc:
        if runtime.stage.ready:
            raise
        error = {"code": "INTERNAL_ERROR", "message": f"{type(exc).__name__}: {exc}",
                 "details": {"stage": args.name, "exception": type(exc).__name__}}
        log.exception("%s could not start: %s", args.name, json.dumps(error, default=str))
        raise SystemExit(3) from None


def configure_torch(config: Config) -> None:
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
