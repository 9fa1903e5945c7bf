"""GET /metrics: the broker's numbers (broker/metrics.py) in the Prometheus text format, plus the
gateway's own (its WebSocket subscribers), which only the gateway knows.

With auth on, only an admin key may read them (the numbers cover every user's jobs); with auth off
(a loopback gateway) the route is open, like the rest of the API.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sized
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from common.errors import Forbidden
from gateway.auth import principal_of

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayMetrics:
    def __init__(self, call: Callable[..., Awaitable[dict[str, Any]]], subscribers: Sized) -> None:
        self.call = call  # Gateway.call: one broker operation
        self.subscribers = subscribers
        self.registry = CollectorRegistry(auto_describe=True)
        self.ws_subscribers = Gauge("wan_websocket_subscribers", "WebSocket clients connected to this gateway",
                                    registry=self.registry)

    def render(self) -> str:
        self.ws_subscribers.set(len(self.subscribers))
        return generate_latest(self.registry).decode()

    async def route(self, request: Request) -> Response:
        if not principal_of(request.scope).admin:
            raise Forbidden("/metrics needs an admin key (the numbers cover every user's jobs)")
        body = await self.call("metrics")
        # Two expositions with disjoint metric names concatenate into one valid exposition.
        return Response(str(body["text"]) + self.render(), media_type=CONTENT_TYPE)
