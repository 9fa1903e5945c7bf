"""The gateway's side of the broker: request/reply over DEALER, and job events over SUB.

The gateway holds no job state; every answer comes from the broker. Requests carry an id so many
can be in flight on one socket; a broker that does not answer in time gives 503, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from common import messages as m
from common.config import Config
from common.errors import BrokerUnavailable, ServerError, WireError
from common.sockets import SocketOptions, make_socket

log = logging.getLogger(__name__)


class BrokerClient:
    def __init__(self, config: Config, timeout_s: float = 10.0):
        self.config = config
        self.timeout_s = timeout_s
        self.ctx = zmq.asyncio.Context()
        self.pending: dict[str, asyncio.Future] = {}
        self.listeners: list[Callable[[m.JobEvent], None]] = []
        self.tasks: list[asyncio.Task] = []
        opts = SocketOptions(hwm=10_000, max_message_bytes=config.limits.max_message_bytes)
        self.send_to_broker = make_socket(self.ctx, zmq.DEALER, config.endpoint("broker"), bind=False, options=opts)
        self.recv_events = make_socket(self.ctx, zmq.SUB, config.endpoint("events"), bind=False, options=opts)
        self.recv_events.setsockopt(zmq.SUBSCRIBE, b"job")

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._read_replies()), asyncio.create_task(self._read_events())]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.send_to_broker.close(0)
        self.recv_events.close(0)
        self.ctx.term()

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        request_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        try:
            try:
                await self.send_to_broker.send_multipart(
                    m.encode(m.ApiRequest(request_id=request_id, op=op, args=args)), flags=zmq.NOBLOCK
                )
            except zmq.Again:
                raise BrokerUnavailable("the broker is not running; try again shortly") from None
            try:
                reply: m.ApiReply = await asyncio.wait_for(future, self.timeout_s)
            except asyncio.TimeoutError:
                raise BrokerUnavailable("the broker did not answer in time; try again shortly") from None
        finally:
            self.pending.pop(request_id, None)
        if not reply.ok:
            error = reply.error or {}
            exc = ServerError(str(error.get("message", "")), dict(error.get("details") or {}), code=error.get("code"))
            exc.http_status = reply.http_status
            raise exc
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
            if future is not None and not future.done():
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
                    listener(event)
