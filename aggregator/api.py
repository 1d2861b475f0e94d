"""The aggregator's HTTP API, what ``flowscope aggregator flowrecords|recordmetrics`` reads.

Like Antrea's flow-aggregator API behind ``antctl get flowrecords`` and
``antctl get recordmetrics``:

* ``GET /flowrecords?srcip=&dstip=&srcport=&dstport=&proto=&limit=`` - the records held
  now (a partial 5-tuple filter; ``proto`` by number or name), as JSON
  ``{"flowRecords": [...], "truncated": bool}`` (at most ``limit``, default 10000);
  reading them does not reset any delta.
* ``GET /recordmetrics`` - record and flow counters, as JSON.
* ``GET /metrics`` - Prometheus text; ``GET /healthz`` - "ok" (public: no credentials).

A second, plain-HTTP server on ``metricsAddress`` serves ``/metrics`` and ``/healthz``
only, so that probes and scrapers need no credentials and see no flows.

It is an aiohttp application, because an endpoint that hands every flow of a cluster to
whoever asks must hold up against clients that are slow, many or hostile:

* who may ask is :mod:`flowscope.webauth`'s rule (a bearer token, HTTPS with client
  certificates, or loopback), checked at config time and on every request;
* ``/flowrecords`` is streamed: the matching flows are picked by key (a list of
  references), and their records are built, encoded and written a chunk at a time, each
  write waiting for the client to read (back-pressure) at most ``write_timeout`` seconds;
  a client that stops reading is dropped and counted, and holds no built answer;
* at most ``max_clients`` requests are served at once (more get 503 at once, and
  ``/healthz`` never waits), at most ``max_connections`` connections are kept (more
  are closed as soon as they are accepted, which keeps file descriptors free), and idle
  connections are closed after ``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from flowscope.webauth import WebAuth, auth_middleware

from .aggregation import FlowFilter
from .sinks import record_to_json

__all__ = ["ApiBackend", "ApiServer", "ApiStats", "parse_filter", "PROTOCOLS", "ApiError", "DEFAULT_LIMIT"]

log = logging.getLogger("flowscope.aggregator.api")

PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "ipv6-icmp": 58, "sctp": 132}
# Without ?limit=, at most this many records. The response says "truncated": true.
DEFAULT_LIMIT = 10_000
MAX_LIMIT = 10_000_000
CHUNK = 64  # records built and written at a time (a few milliseconds of work)
IDLE_TIMEOUT = 10.0  # seconds a connection may wait between requests (or before the first)

class ApiError(ValueError):
    """A bad query parameter; the message names it and what is allowed."""

class ApiBackend(Protocol):
    def select_flows(self, flt: FlowFilter, limit: int) -> Sequence[Any]: ...

    def render_flows(self, flows: Sequence[Any]) -> list[Any]: ...

    def record_metrics(self) -> dict[str, Any]: ...

    def prometheus(self) -> bytes: ...


def _port(value: str, name: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise ApiError(f"{name}: {value!r} must be a port number from 0 to 65535")
    return int(value)

def _ip(value: str, name: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ApiError(f"{name}: {value!r} is not an IPv4 or IPv6 address") from None

def parse_protocol(value: str, name: str = "proto") -> int:
    v = value.strip().lower()
    if v in PROTOCOLS:
        return PROTOCOLS[v]
    if v.isdigit() and int(v) < 256:
        return int(v)
    raise ApiError(f"{name}: {value!r} is not a protocol; use a number 0-255 or one of {', '.join(PROTOCOLS)}")

def parse_filter(query: dict[str, list[str]]) -> tuple[FlowFilter, int | None]:
    allowed = ("srcip", "dstip", "srcport", "dstport", "proto", "limit")
    for key in query:
        if key not in allowed:
            raise ApiError(f"{key}: unknown parameter; allowed: {', '.join(allowed)}")

    def one(key: str) -> str | None:
        vals = query.get(key)
        return vals[-1] if vals else None

    limit = None
    if (lim := one("limit")) is not None:
        if not lim.isdigit() or not 1 <= int(lim) <= MAX_LIMIT:
            raise ApiError(f"limit: {lim!r} must be a whole number from 1 to {MAX_LIMIT}")
        limit = int(lim)
    srcip, dstip, srcport, dstport, proto = (one(k) for k in allowed[:5])
    flt = FlowFilter(
        src_ip=_ip(srcip, "srcip") if srcip else None,
        dst_ip=_ip(dstip, "dstip") if dstip else None,
        src_port=_port(srcport, "srcport") if srcport else None,
        dst_port=_port(dstport, "dstport") if dstport else None,
        protocol=parse_protocol(proto) if proto else None,
    )
    return flt, limit

@dataclass(slots=True)
class ApiStats:
    requests: int = 0
    busy: int = 0  # answered 503: max_clients requests in progress
    connections_refused: int = 0  # closed at accept: max_connections open
    write_timeouts: int = 0  # clients dropped for not reading within write_timeout
    errors: int = 0  # 500s

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "busy": self.busy, "connectionsRefused": self.connections_refused,
                "writeTimeouts": self.write_timeouts, "errors": self.errors}


def _json_body(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=_json_body({"error": message}), content_type="application/json")


def _fd_share() -> int:
    """Connections one HTTP server may keep: a quarter of the open-file limit, so that
    slow clients can never take the descriptors the IPFIX sessions and the other server
    need (and an accept always finds one free, to refuse with)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 1 << 30
    if soft == getattr(resource, "RLIM_INFINITY", -1) or soft <= 0:
        return 1 << 30
    return max(4, soft // 4)


class _Refused(asyncio.Protocol):
    """A connection past ``max_connections``: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


@dataclass
class ApiServer:
    """One HTTP(S) server: the full API, or (``metrics_only``) just /metrics and /healthz."""

    backend: ApiBackend
    auth: WebAuth = field(default_factory=WebAuth)
    metrics_only: bool = False
    max_clients: int = 64
    max_connections: int | None = None  # default: 4 x max_clients
    write_timeout: float = 30.0
    idle_timeout: float = IDLE_TIMEOUT
    stats: ApiStats = field(default_factory=ApiStats)

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._active = 0
        # One chunk is built at a time, handed from request to request in turn: however many
        # clients read at once, the event loop does one chunk of rendering per turn, so a
        # health check or an IPFIX message waits milliseconds, not a pile of chunks.
        self._render = asyncio.Lock()
        if self.max_connections is None:
            self.max_connections = 4 * self.max_clients

    def app(self) -> web.Application:
        middlewares: list[Any] = [self._errors]
        if not self.metrics_only and self.auth.token is not None:
            middlewares.append(auth_middleware(self.auth))
        app = web.Application(middlewares=middlewares, client_max_size=8192)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        if not self.metrics_only:
            app.router.add_get("/flowrecords", self._flowrecords)
            app.router.add_get("/recordmetrics", self._recordmetrics)
        return app

    async def start(self, host: str, port: int) -> None:
        """Listen; an OSError (the port is taken, ...) is the caller's to name."""
        runner = web.AppRunner(self.app(), access_log=None, keepalive_timeout=self.idle_timeout,
                               handle_signals=False)
        await runner.setup()
        handler_factory = runner.server
        assert handler_factory is not None
        limit = min(self.max_connections or 1, _fd_share())

        def factory() -> asyncio.BaseProtocol:
            if len(handler_factory.connections) >= limit:
                self.stats.connections_refused += 1
                return _Refused()
            return handler_factory()

        loop = asyncio.get_running_loop()
        ctx: ssl.SSLContext | None = self.auth.ssl_context if not self.metrics_only else None
        try:
            self._server = await loop.create_server(
                factory, host or None, port, ssl=ctx, ssl_handshake_timeout=10.0 if ctx else None,
                # asyncio accepts up to ``backlog`` connections per wake-up before any is
                # closed: kept small, a burst of clients cannot run the process out of fds
                reuse_address=True, backlog=max(8, min(128, limit // 2)),
            )
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    @property
    def port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        self.stats.requests += 1
        try:
            return await handler(request)
        except web.HTTPNotFound:
            paths = "/metrics, /healthz" if self.metrics_only else "/flowrecords, /recordmetrics, /metrics, /healthz"
            return _error(404, f"no such path {request.path!r}; try {paths}")
        except web.HTTPMethodNotAllowed:
            return _error(405, f"method {request.method} not allowed; use GET")
        except web.HTTPException:
            raise
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:  # a bug must not take the API down
            self.stats.errors += 1
            log.exception("API request %s %s failed", request.method, request.path_qs)
            return _error(500, "internal error; see the aggregator log")

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.backend.prometheus(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def _busy(self) -> web.Response | None:
        if self._active >= self.max_clients:
            self.stats.busy += 1
            return _error(503, f"{self.max_clients} requests in progress (api.maxClients); retry shortly")
        return None

    async def _recordmetrics(self, request: web.Request) -> web.Response:
        busy = self._busy()
        if busy is not None:
            return busy
        return web.Response(body=_json_body(self.backend.record_metrics()), content_type="application/json")

    async def _flowrecords(self, request: web.Request) -> web.StreamResponse:
        query: dict[str, list[str]] = {}
        for key, value in request.query.items():
            if value != "":
                query.setdefault(key, []).append(value)
        try:
            flt, limit = parse_filter(query)
        except ApiError as exc:
            return _error(400, str(exc))
        busy = self._busy()
        if busy is not None:
            return busy
        self._active += 1
        try:
            cap = DEFAULT_LIMIT if limit is None else limit
            flows = self.backend.select_flows(flt, cap + 1)
            truncated = len(flows) > cap
            del flows[cap:]  # type: ignore[attr-defined]
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            if request.method == "HEAD":
                return resp
            sep = b""
            head = b'{"flowRecords":['
            for start in range(0, len(flows), CHUNK):
                async with self._render:
                    records = self.backend.render_flows(flows[start:start + CHUNK])
                    parts = [json.dumps(record_to_json(f), separators=(",", ":")).encode() for f in records]
                    await asyncio.sleep(0)  # the next request's chunk comes after the loop's other work
                if parts:
                    chunk = head + sep + b",".join(parts)
                    head, sep = b"", b","
                    if not await self._write(request, resp, chunk):
                        return resp
            tail = head + b'],"truncated":' + (b"true" if truncated else b"false") + b"}\n"
            if await self._write(request, resp, tail):
                await resp.write_eof()
            return resp
        finally:
            self._active -= 1

    async def _write(self, request: web.Request, resp: web.StreamResponse, data: bytes) -> bool:
        try:
            await asyncio.wait_for(resp.write(data), self.write_timeout)
            return True
        except (asyncio.TimeoutError, TimeoutError):
            self.stats.write_timeouts += 1
            log.info("API client %s read nothing for %.0fs: dropped", request.remote, self.write_timeout)
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        if request.transport is not None:
            request.transport.abort()
        return False


class QuietExceptionHandler:
    """The event loop's exception handler, rate-limited: when file descriptors run out,
    asyncio reports every failed accept, which turned into 146k log lines in 25 s. At most
    ``burst`` reports per ``window`` seconds are logged; the rest are counted."""

    def __init__(self, burst: int = 10, window: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.window, self.clock = burst, window, clock
        self.start = -window
        self.count = 0
        self.suppressed = 0
        self.total = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.total += 1
        now = self.clock()
        if now - self.start >= self.window:
            if self.suppressed:
                log.warning("%d more event loop errors in the last %.0fs (not logged)", self.suppressed, self.window)
            self.start, self.count, self.suppressed = now, 0, 0
        if self.count < self.burst:
            self.count += 1
            loop.default_exception_handler(context)
        else:
            self.suppressed += 1
