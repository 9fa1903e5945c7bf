"""Webhooks: when a job that asked for one (`webhook_url`) reaches its final state, the broker POSTs
that state to the URL, signed as the Standard Webhooks spec says, at least once.

- Signing (`sign`): `webhook-signature: v1,<base64 HMAC-SHA256(secret, f"{id}.{timestamp}.{body}")>`
  with the secret of the job's API key when it has one (`python -m gateway.keys create NAME
  --webhook-secret`), else `[webhooks] secret` (each `whsec_` + base64 of its bytes); `webhook-id` is
  the same on every attempt (receivers dedupe on it), `webhook-timestamp` is the attempt's (seconds).
- The URL guard (`HostRules`, `check_url`): only hosts `[webhooks] allowed_hosts` names; an address
  that is not public (private, loopback, link-local, shared, multicast, reserved) only when an
  entry lists it (an IP or a network). At submit, the URL's form, its host and a literal address
  are checked (no DNS lookup there: it would hold up the broker's loop); at each attempt the host
  is resolved, every address checked, and the connection made to a checked address (`post`), so a
  DNS answer that changes between the check and the connect cannot send the request elsewhere.
  Redirects are not followed (a 3xx is a failed attempt), each attempt has a deadline, and at most
  MAX_RESPONSE_BYTES of a response body are read.
- Delivery (`Deliveries`): a thread with its own SQLite connection works the outbox table of the job
  store (broker/store.py: the row is written by the same statement that makes the job final). A
  thread, not sends from the loop's tick, because an attempt blocks (DNS, connect, a slow receiver,
  up to `timeout_s`), and the zmq loop must never wait on a receiver. A delivery is marked done only
  after a 2xx; a failed attempt is retried with exponential backoff (`backoff_initial_s`, doubling,
  at most `backoff_max_s`, with jitter) until `retry_window_s` after the job ended. After a crash
  the rows still pending are sent again, so a receiver may see one webhook-id twice, never none.

Payload: `{"type": "video.completed" | "video.failed" | "video.cancelled", "timestamp": ISO 8601 of the
final state, "data": {"job_id", "status", "model", "output_url" | "error"}}`; nothing secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.store import Delivery, Outbox
from common import catalog
from common.config import WebhooksSection
from common.errors import ConfigError, ValidationError, WebhookNotAllowed
from gateway.keys import webhook_secret

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64  # the spec: at least 24 bytes (192 bits), 512 bits at most
EVENT_TYPES = {"completed": "video.completed", "failed": "video.failed", "cancelled": "video.cancelled"}
MAX_RESPONSE_BYTES = 4096  # of a receiver's answer, read and dropped; only its status counts
BATCH = 16  # deliveries taken from the outbox per pass
IDLE_POLL_S = 1.0  # the longest the thread sleeps with nothing due (a wake() cuts it short)
# Outcomes counted by broker/metrics.py: a 2xx; a failed attempt that will be retried; given up after
# the retry window; refused (an address the config does not allow, or 410 Gone).
OUTCOMES = ("delivered", "failed", "expired", "refused")
HOST_NAME = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# ---- signing ----

def decode_secret(secret: str) -> bytes:
    """The key bytes of a `whsec_` secret; ConfigError if it is not one."""
    where = {"section": "webhooks", "key": "secret"}
    if not secret.startswith(SECRET_PREFIX):
        raise ConfigError("[webhooks] secret must be 'whsec_' followed by base64", where)
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("[webhooks] secret must be 'whsec_' followed by base64", where) from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ConfigError(f"[webhooks] secret must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, "
                          f"not {len(key)}", where)
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, msg_id, timestamp, body),
        "user-agent": "wan-server-webhooks",
    }


def payload(d: Delivery) -> bytes:
    """The body of `d`'s POST: the same bytes on every attempt."""
    data: dict[str, Any] = {"job_id": d.job_id, "status": d.status, "model": d.model}
    if d.status == "completed":
        data["output_url"] = f"/api/v1/files/{d.job_id}.mp4"
        data["result_url"] = f"/api/v1/result/{d.job_id}"
    else:
        data["error"] = d.error
    when = datetime.fromtimestamp(d.occurred_at, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    body = {"type": EVENT_TYPES.get(d.status, f"video.{d.status}"), "timestamp": when, "data": data}
    return json.dumps(body, separators=(",", ":")).encode()


# ---- the URL guard ----

@dataclass(frozen=True)
class Target:
    """A webhook URL taken apart: where to connect, and what to send as Host and path."""

    scheme: str
    host: str  # lower case; an IPv6 address without brackets
    port: int
    path: str  # path and query

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def literal(self) -> Address | None:
        try:
            return plain(ipaddress.ip_address(self.host))
        except ValueError:
            return None


def plain(address: Address) -> Address:
    """An IPv4-mapped IPv6 address as the IPv4 address it maps (so ::ffff:127.0.0.1 is loopback)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class HostRules:
    """`[webhooks] allowed_hosts`: which hosts a webhook may name, and which non-public addresses it may reach."""

    def __init__(self, entries: tuple[str, ...]):
        self.any = False
        self.names: set[str] = set()
        self.suffixes: list[str] = []  # "*.example.com" -> ".example.com"
        self.networks: list[Network] = []
        for raw in entries:
            entry = raw.strip().lower()
            if entry == "*":
                self.any = True
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if not HOST_NAME.match(entry):
                raise ConfigError(f"[webhooks] allowed_hosts entry {raw[:80]!r} is not a host name, '*.domain', "
                                  "'*', an IP address or a network", {"section": "webhooks", "key": "allowed_hosts"})
            if entry.startswith("*."):
                self.suffixes.append(entry[1:])
            else:
                self.names.add(entry)

    def listed(self, address: Address) -> bool:
        address = plain(address)
        return any(address.version == net.version and address in net for net in self.networks)

    def address_allowed(self, address: Address) -> bool:
        """Public addresses, and the others an entry lists."""
        address = plain(address)
        public = address.is_global and not address.is_multicast and not address.is_reserved
        return public or self.listed(address)

    def host_allowed(self, target: Target) -> bool:
        literal = target.literal()
        if literal is not None:
            return self.listed(literal) or (self.any and self.address_allowed(literal))
        host = target.host
        return self.any or host in self.names or any(host.endswith(s) for s in self.suffixes)


def refused(reason: str, **details: Any) -> WebhookNotAllowed:
    return WebhookNotAllowed(f"webhook_url refused: {reason}", {"field": "webhook_url", **details})


def parse_url(url: Any) -> Target:
    """The URL's parts; ValidationError (field webhook_url) when it is not an http(s) URL of a host."""
    spec = catalog.REQUEST_FIELDS["webhook_url"]
    # Checked here rather than by catalog.check, whose messages quote the value: a URL may hold a token.
    if not isinstance(url, str):
        raise ValidationError("webhook_url must be a string", {"field": "webhook_url", "got": type(url).__name__})
    if spec.max_length is not None and len(url) > spec.max_length:
        raise ValidationError(f"webhook_url is longer than {spec.max_length} characters",
                              {"field": "webhook_url", "max": spec.max_length})
    if spec.pattern is not None and not re.search(spec.pattern, url):
        raise ValidationError(f"webhook_url must be {spec.pattern_hint}, with a host and no user name",
                              {"field": "webhook_url"})
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValidationError("webhook_url is not a valid URL", {"field": "webhook_url"}) from None
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host or parts.username is not None:
        raise ValidationError("webhook_url must be an http:// or https:// URL with a host and no user name",
                              {"field": "webhook_url"})
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        raise ValidationError("webhook_url: write a host name in its ASCII (punycode) form",
                              {"field": "webhook_url"}) from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path)


class Guard:
    """The checks of one config: a URL at submit (`check_url`), its addresses at each attempt (`resolve`)."""

    def __init__(self, section: WebhooksSection):
        self.section = section
        self.key = decode_secret(section.secret) if section.secret is not None else None
        self.rules = HostRules(section.allowed_hosts)
        for name in ("timeout_s", "retry_window_s", "backoff_initial_s", "backoff_max_s"):
            if getattr(section, name) <= 0:
                raise ConfigError(f"[webhooks] {name} must be positive", {"section": "webhooks", "key": name})

    @property
    def enabled(self) -> bool:
        return self.key is not None and bool(self.section.allowed_hosts)

    def check_url(self, value: Any) -> str | None:
        """`value` (a request's webhook_url) if the server may call it, None if absent; else a 422."""
        if value is None:
            return None
        if not self.enabled:
            raise refused("webhooks are not enabled on this server ([webhooks] secret and allowed_hosts)")
        target = parse_url(value)
        if not self.rules.host_allowed(target):
            literal = target.literal()
            if literal is not None and not self.rules.address_allowed(literal):
                raise refused("the address is private, loopback or link-local", host=target.host[:80])
            raise refused("the host is not in the server's [webhooks] allowed_hosts", host=target.host[:80])
        return str(value)

    def resolve(self, target: Target) -> list[Address]:
        """Every address the host resolves to, each allowed; WebhookNotAllowed if one is not, OSError
        if it does not resolve (a failed attempt, retried)."""
        if not self.rules.host_allowed(target):
            raise refused("the host is not in the server's [webhooks] allowed_hosts", host=target.host[:80])
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        addresses: list[Address] = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if not self.rules.address_allowed(address):
                raise refused("the host resolves to a private, loopback or link-local address", host=target.host[:80])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise OSError("no address")
        return addresses


# ---- one POST ----

class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address already checked, with the certificate checked for the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self.address = address
        self.tls = context

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


def post(target: Target, address: Address, sent: dict[str, str], body: bytes, timeout_s: float,
         context: ssl.SSLContext | None = None) -> int:
    """POST `body` to `target` at `address` (never another: no DNS here, no redirect followed);
    the response status. The whole attempt is cut off after `timeout_s`; OSError on a network failure
    (a certificate not valid for the URL's host included). `context`: the TLS settings (default: the
    system's CAs)."""
    conn: http.client.HTTPConnection
    if target.scheme == "https":
        tls = context or ssl.create_default_context()
        conn = PinnedHTTPSConnection(target.host, target.port, str(address), timeout_s, tls)
    else:
        conn = http.client.HTTPConnection(str(address), target.port, timeout=timeout_s)

    def cut_off() -> None:  # a receiver that trickles its answer must not hold the thread past the deadline
        if conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout_s, cut_off)
    timer.daemon = True
    timer.start()
    try:
        conn.putrequest("POST", target.path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", target.host_header)
        for name, value in sent.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        response.read(MAX_RESPONSE_BYTES)
        return response.status
    except http.client.HTTPException as exc:
        raise OSError(f"bad HTTP response: {type(exc).__name__}") from None
    finally:
        timer.cancel()
        conn.close()


# ---- the delivery thread ----

class Deliveries:
    """The thread that works the outbox: due rows, one attempt each, the result recorded."""

    def __init__(self, section: WebhooksSection, db_path: Path, keys_path: Path | None = None,
                 on_outcome: Callable[[str], None] | None = None):
        self.guard = Guard(section)
        self.section = section
        self.db_path = db_path
        self.keys_path = keys_path  # the gateway's key store, for keys with a webhook secret of their own
        self.on_outcome = on_outcome or (lambda outcome: None)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="webhooks", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A job just became final: look at the outbox now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)  # an attempt in flight is sent again by the next broker

    def run(self) -> None:
        outbox = Outbox(self.db_path)
        try:
            while not self._stop.is_set():
                wait = IDLE_POLL_S
                try:
                    for delivery in outbox.due(time.time(), BATCH):
                        if self._stop.is_set():
                            break
                        self.attempt(outbox, delivery)
                    next_at = outbox.next_due()
                    if next_at is not None:
                        wait = min(IDLE_POLL_S, max(0.0, next_at - time.time()))
                except Exception:  # the thread must outlive one bad row or a locked database
                    log.exception("webhook delivery pass failed; trying again")
                if wait > 0:
                    self._wake.wait(wait)
                self._wake.clear()
        finally:
            outbox.close()

    def attempt(self, outbox: Outbox, d: Delivery) -> None:
        """One POST of `d`, and what came of it, recorded (the URL is never logged: it may hold a token)."""
        extra = {"job_id": d.job_id}
        status: int | None = None
        try:
            target = parse_url(d.url)
            addresses = self.guard.resolve(target)
            key = self.key_for(d.owner)
            if key is None:
                raise refused("webhooks are not enabled on this server")
            body = payload(d)
            status = post(target, addresses[0], headers(key, d.id, int(time.time()), body), body,
                          self.section.timeout_s)
        except (WebhookNotAllowed, ValidationError) as exc:
            log.warning("webhook refused: %s", exc.message, extra=extra)
            self.done(outbox, d, "refused", None, exc.code)
            return
        except OSError as exc:
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
        except Exception as exc:  # a failed attempt all the same: retried, within the window
            log.exception("webhook attempt failed", extra=extra)
            error = type(exc).__name__
        else:
            if 200 <= status < 300:
                log.info("webhook delivered (HTTP %d, attempt %d)", status, d.attempts + 1, extra=extra)
                self.done(outbox, d, "delivered", status, None)
                return
            if status == 410:
                log.warning("webhook receiver answered 410 Gone; not sent again", extra=extra)
                self.done(outbox, d, "refused", status, "HTTP 410")
                return
            error = f"HTTP {status}"
        delay = min(self.section.backoff_max_s, self.section.backoff_initial_s * 2 ** min(d.attempts, 40))
        next_at = time.time() + delay * random.uniform(0.8, 1.2)
        if next_at > d.occurred_at + self.section.retry_window_s:
            log.warning("webhook not delivered after %d attempts (last: %s); giving up", d.attempts + 1, error,
                        extra=extra)
            self.done(outbox, d, "expired", status, error)
            return
        log.info("webhook attempt %d failed (%s); next in %.1f s", d.attempts + 1, error, next_at - time.time(),
                 extra=extra)
        outbox.attempted(d.id, state="pending", next_at=next_at, status=status, error=error)
        self.on_outcome("failed")

    def key_for(self, owner: str) -> bytes | None:
        """The signing key: the job's API key's own secret, read now (so a new one applies to the next
        attempt), else the server's."""
        own = webhook_secret(self.keys_path, owner) if self.keys_path is not None and owner else None
        return decode_secret(own) if own is not None else self.guard.key

    def done(self, outbox: Outbox, d: Delivery, state: str, status: int | None, error: str | None) -> None:
        outbox.attempted(d.id, state=state, next_at=d.next_at, status=status, error=error)
        self.on_outcome(state)
