"""What the collecting and the exporting process share: TLS, peers, counters, sockets.

IPFIX runs over UDP, TCP or TLS (RFC 7011 section 10). The codec (``codec.py``) knows bytes
and messages; :mod:`.collecting` and :mod:`.exporting` know sockets, time and failure, one
direction each. This module holds the few things both directions need: the TLS settings
(1.2 or newer, mutual authentication), the :class:`Peer` a transport session talks to, the
stats base class, a rate limit for warnings, and the dual-stack listening socket.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .codec import Transport
from .errors import UsageError

__all__ = ["TLSConfig", "Peer", "Counters", "LogLimiter", "unmapped", "dual_stack_socket"]

log = logging.getLogger("flowscope.ipfix")


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """Paths of a PEM certificate, its private key and the CA that signs the peers.

    Both ends authenticate each other: the collector requires a client certificate signed
    by ``ca``, the exporter verifies the collector's certificate against ``ca`` and its
    name against ``server_name`` (by default the host of the collector's address).
    """

    cert: str
    key: str
    ca: str
    server_name: str | None = None

    def _load(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"tls ca: cannot load CA certificates from {self.ca!r}: {exc}") from None
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(
                f"tls cert/key: cannot load certificate {self.cert!r} with key {self.key!r}: {exc} "
                "(both must be PEM files and the key must match the certificate)"
            ) from None
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """Server side: TLS 1.2+, client certificate required and verified against ``ca``."""
        ctx = self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Client side: TLS 1.2+, server certificate and name verified against ``ca``."""
        ctx = self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
        return ctx


@dataclass(frozen=True, slots=True)
class Peer:
    """The remote end of one transport session."""

    host: str
    port: int
    protocol: Transport

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class Counters:
    """Counters readable as attributes or, for callers that prefer it, by key."""

    __slots__ = ()

    def __getitem__(self, name: str) -> Any:
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload, no-any-return]


class LogLimiter:
    """At most ``burst`` warnings per ``window`` seconds: a flood of garbage must not
    turn into a flood of log lines. Suppressed lines are still counted in the stats."""

    __slots__ = ("clock", "burst", "window", "start", "count", "suppressed")

    def __init__(self, clock: Callable[[], float], burst: int = 20, window: float = 10.0) -> None:
        self.clock, self.burst, self.window = clock, burst, window
        self.start, self.count, self.suppressed = -window, 0, 0

    def warn(self, msg: str, *args: object) -> None:
        now = self.clock()
        if now - self.start >= self.window:
            if self.suppressed:
                log.warning("%d similar warnings suppressed in the last %.0fs", self.suppressed, self.window)
            self.start, self.count, self.suppressed = now, 0, 0
        if self.count < self.burst:
            self.count += 1
            log.warning(msg, *args)
        else:
            self.suppressed += 1


def unmapped(host: str) -> str:
    """An IPv4 peer of a dual-stack socket shows as ``::ffff:a.b.c.d``: name it by its IPv4 address."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def dual_stack_socket(port: int, *, udp: bool) -> socket.socket | None:
    """A socket bound to ``[::]:port`` that takes IPv4 too (IPV6_V6ONLY off), so that one
    listener serves IPv4, IPv6 and dual-stack clusters alike; None where the host has no
    IPv6 (the caller falls back to 0.0.0.0)."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if not udp:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            return None
        raise
    sock.setblocking(False)
    return sock
