"""The gateway's side of the broker: request/reply over DEALER, and job events over SUB.

The gateway holds no job state; every answer comes from the broker. Requests carry an id so many
can be in flight on one socket; a broker that does not answer in time gives 503, never a hang.

Two listener tasks read the sockets (replies, events). They are supervised: one that dies is
logged and restarted on a fresh socket after a backoff, and `listener_state()` says which are
down, so /health can report a gateway whose events have stopped instead of saying ok.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from common import messages as m
from common.config import Config
from common.errors import BrokerUnavailable, ServerError, WireError
from common.sockets import SocketOptions, make_socket

log = logging.getLogger(__name__)

LISTENERS = ("replies", "events")
STABLE_S = 30.0  # a listener that ran this long before dying starts its backoff afresh


@dataclass
class ListenerState:
    running: bool = False
    restarts: int = 0
    last_error: str = ""  # the exception's type name only: /health is open to anyone


class BrokerClient:
    def __init__(self, config: Config, timeout_s: float = 10.0, restart_s: float = 0.5, max_restart_s: float = 10.0):
        self.config = config
        self.timeout_s = timeout_s
        self.restart_s = restart_s
        self.max_restart_s = max(restart_s, max_restart_s)
        self.ctx = zmq.asyncio.Context()
        self.pending: dict[str, asyncio.Future[m.ApiReply]] = {}
        self.listeners: list[Callable[[m.JobEvent], None]] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.state = {name: ListenerState() for name in LISTENERS}
        self.opts = SocketOptions(hwm=10_000, max_message_bytes=config.limits.max_message_bytes)
        self.send_to_broker = self._open("replies")
        self.recv_events = self._open("events")

    def _open(self, name: str) -> zmq.asyncio.Socket:
        if name == "replies":
            sock = make_socket(self.ctx, zmq.DEALER, self.config.endpoint("broker"), bind=False, options=self.opts)
        else:
            sock = make_socket(self.ctx, zmq.SUB, self.config.endpoint("events"), bind=False, options=self.opts)
            sock.setsockopt(zmq.SUBSCRIBE, b"job")
        return sock  # make_socket's type follows the context: an asyncio socket

    def _reopen(self, name: str) -> None:
        """A fresh socket for a restarted listener: the old one may be closed or in an error state."""
        old = self.send_to_broker if name == "replies" else self.recv_events
        if not old.closed:
            old.close(0)
        if name == "replies":
            self.send_to_broker = self._open(name)
        else:
            self.recv_events = self._open(name)

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self._supervise("replies", self._read_replies), name="broker-replies"),
            asyncio.create_task(self._supervise("events", self._read_events), name="broker-events"),
        ]

    def listener_state(self) -> dict[str, dict[str, Any]]:
        return {name: {"running": s.running, "restarts": s.restarts, **({"last_error": s.last_error} if s.last_error
                                                                          else {})}
                for name, s in self.state.items()}

    @property
    def healthy(self) -> bool:
        return all(s.running for s in self.state.values())

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.send_to_broker.close(0)
        self.recv_events.close(0)
        self.ctx.term()

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        state = self.state[name]
        loop = asyncio.get_running_loop()
        delay = self.restart_s
        while True:
            started = loop.time()
            state.running = True
            try:
                await run()
                raise RuntimeError("the listener returned")  # they loop forever; returning is a fault too
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    state.running = False
                    raise  # the gateway is stopping
                # Nobody cancelled the task: pyzmq cancels a pending receive when its socket is closed.
                state.last_error = "SocketClosed"
                log.error("the broker %s listener lost its socket; restarting it in %.1f s", name, delay)
            except Exception as exc:
                state.last_error = type(exc).__name__
                log.exception("the broker %s listener died; restarting it in %.1f s", name, delay)
            state.running = False
            if loop.time() - started > STABLE_S:
                delay = self.restart_s
            await asyncio.sleep(delay)
            delay = min(2 * delay, self.max_restart_s)
            self._reopen(name)
            state.restarts += 1
            log.info("the broker %s listener restarted (%d restarts)", name, state.restarts)

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        request_id = uuid.uuid4().hex
        future: asyncio.Future[m.ApiReply] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        try:
            try:
                await self.send_to_broker.send_multipart(
                    m.encode(m.ApiRequest(request_id=request_id, op=op, args=args)), flags=zmq.NOBLOCK
                )
            except zmq.Again:
                raise BrokerUnavailable("the broker is not running; try again shortly") from None
            except zmq.ZMQError:  # the socket is being replaced after its listener died
                raise BrokerUnavailable("the gateway is reconnecting to the broker; try again shortly") from None
            try:
                reply = await asyncio.wait_for(future, self.timeout_s)
            except TimeoutError:
                raise BrokerUnavailable("the broker did not answer in time; try again shortly") from None
        finally:
            self.pending.pop(request_id, None)
        if not reply.ok:
            raise ServerError.from_dict(reply.error or {}, http_status=reply.http_status)
        return reply.result or {}

    async def _read_replies(self) -> None:
        while True:
            parts = await self.send_to_broker.recv_multipart(copy=False)
            try:
                reply = m.decode(parts, self.config.limits)
            except WireError as exc:
                log.error("dropped a bad reply: %s", exc.message)
                continue
            future = self.pending.get(getattr(reply, "request_id", ""))
            if future is not None and not future.done() and isinstance(reply, m.ApiReply):
                future.set_result(reply)

    async def _read_events(self) -> None:
        while True:
            parts = await self.recv_events.recv_multipart(copy=False)
            try:
                event = m.decode(parts[1:], self.config.limits)
            except WireError as exc:
                log.error("dropped a bad event: %s", exc.message)
                continue
            if isinstance(event, m.JobEvent):
                for listener in list(self.listeners):
                    try:
                        listener(event)
                    except Exception:  # one listener's fault must not stop events for the others
                        log.exception("a job event listener failed on job %s", event.job_id)
