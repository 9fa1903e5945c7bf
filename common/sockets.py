"""The one place sockets are made.

Every socket gets a bounded queue (HWM), a bounded LINGER, IMMEDIATE (a PUSH does not queue
messages for peers that are not connected) and a maximum message size. Endpoints are ipc:// or
loopback TCP; another address is accepted only with CURVE keys (`[network] curve_keys_dir`, see
`common/curve.py`): with keys, every tcp:// socket is encrypted and authenticated, binding sockets as
CURVE servers that accept only authorized client keys. Without keys, a non-loopback address is refused
rather than opened unauthenticated.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import zmq

from common.curve import CurveKeys
from common.errors import ConfigError

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

# A blocking or an asyncio socket: make_socket returns the kind its context makes.
_S = TypeVar("_S", bound="zmq.Socket[Any]")

# The deployment's CURVE keys, set once per process by `use_curve` from the config; None: no CURVE.
_curve: CurveKeys | None = None
# One ZAP authenticator per context that has a CURVE server socket.
_authenticators: dict[int, ThreadAuthenticator] = {}


def use_curve(keys: CurveKeys | None) -> None:
    """Make every tcp:// socket this process creates from now on use these CURVE keys."""
    global _curve
    _curve = keys


@dataclass(frozen=True)
class SocketOptions:
    hwm: int = 16
    linger_ms: int = 1000
    max_message_bytes: int = 2 << 30
    send_timeout_ms: int = -1
    recv_timeout_ms: int = -1
    # IMMEDIATE: queue only for connected peers. Off for sockets whose messages should wait for a
    # peer that is (re)starting, such as reports to the broker.
    immediate: bool = True
    # SO_SNDBUF/SO_RCVBUF (0 keeps the OS default). Larger kernel buffers mean fewer wake-ups per
    # large tensor: 64 MiB over ipc:// went from 0.86 to 1.2 GB/s with 4 MiB here (bench/transport.py).
    kernel_buffer_bytes: int = 4 << 20


def check_endpoint(endpoint: str, curve: CurveKeys | None = None) -> str:
    if endpoint.startswith("ipc://"):
        return endpoint
    if endpoint.startswith("tcp://"):
        host = urlsplit(endpoint).hostname or ""
        if host == "localhost" or curve is not None:
            return endpoint
        try:
            if ipaddress.ip_address(host).is_loopback:
                return endpoint
        except ValueError:
            pass
        raise ConfigError(
            f"endpoint {endpoint} is not loopback; remote endpoints need CURVE keys, which are not configured",
            {"endpoint": endpoint},
        )
    raise ConfigError(f"endpoint {endpoint} must be ipc:// or tcp://127.0.0.1", {"endpoint": endpoint})


def _ipc_in_use(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def make_socket(
    ctx: zmq.Context[_S],
    kind: int,
    endpoint: str,
    *,
    bind: bool,
    options: SocketOptions | None = None,
    curve: CurveKeys | None = None,
) -> _S:
    """`curve` defaults to the process's keys (`use_curve`); it applies to tcp:// endpoints only."""
    options = options or SocketOptions()
    curve = curve or _curve
    endpoint = check_endpoint(endpoint, curve)
    sock = ctx.socket(kind)
    if curve is not None and endpoint.startswith("tcp://"):
        _set_curve(ctx, sock, curve, server=bind)
    sock.setsockopt(zmq.SNDHWM, options.hwm)
    sock.setsockopt(zmq.RCVHWM, options.hwm)
    sock.setsockopt(zmq.LINGER, options.linger_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, options.max_message_bytes)
    sock.setsockopt(zmq.SNDTIMEO, options.send_timeout_ms)
    sock.setsockopt(zmq.RCVTIMEO, options.recv_timeout_ms)
    if options.kernel_buffer_bytes:
        sock.setsockopt(zmq.SNDBUF, options.kernel_buffer_bytes)
        sock.setsockopt(zmq.RCVBUF, options.kernel_buffer_bytes)
    if options.immediate and kind in (zmq.PUSH, zmq.DEALER, zmq.ROUTER, zmq.REQ):
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if bind:
        if endpoint.startswith("ipc://"):
            path = Path(endpoint[len("ipc://") :])
            path.parent.mkdir(parents=True, exist_ok=True)
            # A socket file left by a killed process would make bind fail; but never take the
            # address of a process that is still serving on it.
            if path.exists():
                if _ipc_in_use(path):
                    sock.close(0)
                    raise ConfigError(f"{endpoint} is in use by another process", {"endpoint": endpoint})
                os.unlink(path)
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    return sock


def stop_authenticators() -> None:
    """Stop the ZAP threads, so their contexts can be terminated (call before `ctx.term()`)."""
    while _authenticators:
        _, auth = _authenticators.popitem()
        auth.stop()


def _set_curve(ctx: zmq.Context[Any], sock: zmq.Socket[Any], keys: CurveKeys, *, server: bool) -> None:
    if server:
        if keys.server_secret is None:
            sock.close(0)
            raise ConfigError("this process binds a tcp:// socket but the keys folder has no server.key_secret", {})
        _authenticator(ctx, keys)
        sock.curve_secretkey = keys.server_secret
        sock.curve_publickey = keys.server_public
        sock.curve_server = True
    else:
        sock.curve_serverkey = keys.server_public
        sock.curve_publickey = keys.client_public
        sock.curve_secretkey = keys.client_secret


def _authenticator(ctx: zmq.Context[Any], keys: CurveKeys) -> None:
    """Start (once per context) the ZAP handler that admits only the authorized client keys."""
    if id(ctx) in _authenticators:
        return
    from zmq.auth.thread import ThreadAuthenticator

    # The authenticator's thread needs blocking sockets, also when `ctx` is an asyncio context.
    auth = ThreadAuthenticator(zmq.Context.shadow(ctx.underlying))
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized_dir))
    _authenticators[id(ctx)] = auth
