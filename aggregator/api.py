"""The aggregator's small HTTP API, what ``flowscope aggregator flowrecords|recordmetrics`` reads.

Like Antrea's flow-aggregator API behind ``antctl get flowrecords`` and
``antctl get recordmetrics``:

* ``GET /flowrecords?srcip=&dstip=&srcport=&dstport=&proto=&limit=`` - the records held
  now (a partial 5-tuple filter; ``proto`` by number or name), as JSON
  ``{"flowRecords": [...], "truncated": bool}`` (at most ``limit``, default 10000);
  reading them does not reset any delta.
* ``GET /recordmetrics`` - record and flow counters, as JSON.
* ``GET /metrics`` - Prometheus text; ``GET /healthz`` - "ok".

:func:`handle` is the whole API as a pure function from a request target to a response;
:func:`serve` is a minimal HTTP/1.1 server (GET only, one request per connection) around
it, so the aggregator needs no web framework.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from .aggregation import FlowFilter
from .sinks import record_to_json

__all__ = ["Response", "ApiBackend", "handle", "serve", "parse_filter", "PROTOCOLS", "ApiError"]

log = logging.getLogger("flowscope.aggregator.api")

PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "ipv6-icmp": 58, "sctp": 132}
MAX_REQUEST_HEAD = 8192
# Without ?limit=, at most this many records: a store of 500k flows would otherwise be a
# gigabyte of JSON built on the event loop. The response says "truncated": true.
DEFAULT_LIMIT = 10_000

class ApiError(ValueError):
    """A bad query parameter; the message names it and what is allowed."""

@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes

class ApiBackend(Protocol):
    def flow_records(self, flt: FlowFilter, limit: int | None) -> list[Any]: ...

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
        if not lim.isdigit() or int(lim) < 1:
            raise ApiError(f"limit: {lim!r} must be a positive whole number")
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

def _json(status: int, doc: Any) -> Response:
    return Response(status, "application/json", json.dumps(doc, separators=(",", ":")).encode() + b"\n")

def handle(method: str, target: str, backend: ApiBackend) -> Response:
    """The API: (method, request target) -> response."""
    if method not in ("GET", "HEAD"):
        return _json(405, {"error": f"method {method} not allowed; use GET"})
    parts = urlsplit(target)
    path = parts.path.rstrip("/") or "/"
    query = parse_qs(parts.query, keep_blank_values=False)
    try:
        if path == "/flowrecords":
            flt, limit = parse_filter(query)
            cap = DEFAULT_LIMIT if limit is None else limit
            found = backend.flow_records(flt, cap + 1)
            records = [record_to_json(f) for f in found[:cap]]
            return _json(200, {"flowRecords": records, "truncated": len(found) > cap})
        if path == "/recordmetrics":
            return _json(200, backend.record_metrics())
        if path == "/metrics":
            return Response(200, "text/plain; version=0.0.4; charset=utf-8", backend.prometheus())
        if path == "/healthz":
            return Response(200, "text/plain", b"ok\n")
    except ApiError as exc:
        return _json(400, {"error": str(exc)})
    return _json(404, {"error": f"no such path {path!r}; try /flowrecords, /recordmetrics, /metrics, /healthz"})

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}

async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     backend: ApiBackend) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, target, _version = request_line.split(" ", 2)
        try:
            resp = handle(method, target, backend)
        except Exception:  # a bug must not take the API down
            log.exception("API request %r failed", request_line)
            resp = _json(500, {"error": "internal error; see the aggregator log"})
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, ConnectionError):
        resp = _json(400, {"error": "malformed HTTP request"})
        method = "GET"
    body = b"" if method == "HEAD" else resp.body
    writer.write(
        f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Error')}\r\n"
        f"Content-Type: {resp.content_type}\r\nContent-Length: {len(resp.body)}\r\n"
        "Connection: close\r\n\r\n".encode() + body
    )
    try:
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()

async def serve(host: str, port: int, backend: ApiBackend) -> asyncio.Server:
    """Start the API server; ``server.sockets[0].getsockname()[1]`` is the bound port."""

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        return _serve_one(reader, writer, backend)

    return await asyncio.start_server(on_connect, host, port, limit=MAX_REQUEST_HEAD)
