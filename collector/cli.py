"""``flowscope collector`` and ``flowscope export``: IPFIX in and out of JSON Lines.

``flowscope collector --listen HOST:PORT[:PROTO]`` does the go-ipfix collector's job:
it decodes every data record any exporter sends and prints it, one JSON object per line
(see :mod:`flowscope.collector.records` for the value forms) or as a readable table.
``flowscope export --to HOST:PORT[:PROTO] < records.jsonl`` does the reverse: it reads
records in the same form and sends them as IPFIX, so a collector's output can be
replayed into any collector, the aggregator included.

Both default to TCP, both speak UDP and mutual TLS, and both stop cleanly on SIGINT or
SIGTERM: the collector after printing what it decoded, the exporter after flushing what
it had queued. Exit codes: 0 success; 1 some input was rejected or some records were not
delivered (each counted on stderr); 2 a usage error (bad option, unreadable TLS file);
3 the collector could not be reached or could not listen; 128+N stopped by signal N
(export only: the collector's normal way to end is a signal).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register"]

EXIT_OK, EXIT_DATA, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def register(subparsers: Any) -> None:
    c = subparsers.add_parser(
        "collector",
        help="receive IPFIX and print every data record (JSON Lines or a table)",
        description="Receive IPFIX over UDP, TCP or mutual TLS from any number of exporters and print every "
        "data record: one JSON object per line keyed by information element names, plus _exporter, "
        "_observationDomainId and _templateId.",
    )
    c.add_argument("--listen", required=True, metavar="HOST:PORT[:PROTO]",
                   help="address to listen on; PROTO is tcp (default), udp or tls; IPv6 in brackets")
    _tls_options(c)
    c.add_argument("--format", choices=("jsonl", "table"), default=None,
                   help="print records in this format (default jsonl; with --store nothing is printed unless given)")
    c.add_argument("--store", metavar="URL",
                   help="store every record in the flow store: chdb:///DIR (in-process) or tcp://HOST:PORT/DB "
                        "(a server; its user name and password from CLICKHOUSE_USERNAME / CLICKHOUSE_PASSWORD)")
    c.add_argument("--api", metavar="HOST:PORT",
                   help="with --store: serve the store's queries over HTTP (flowscope flows --api, the dashboards)")
    c.add_argument("--api-token-file", metavar="FILE",
                   help="require 'Authorization: Bearer <token>' with the token in FILE (needed off loopback)")
    c.add_argument("--api-tls-cert", metavar="FILE", help="serve --api over HTTPS with this PEM certificate")
    c.add_argument("--api-tls-key", metavar="FILE", help="the --api certificate's PEM private key")
    c.add_argument("--api-tls-ca", metavar="FILE",
                   help="require --api clients to present a certificate signed by this CA (mutual TLS)")
    c.add_argument("--api-insecure", action="store_true",
                   help="serve --api on a non-loopback address without authentication")
    from .ui.options import add_ui_options

    add_ui_options(c)  # --ui HOST:PORT (with --store): the web dashboards, with the API on the same address
    # chDB's insert costs about half as much a row in blocks of 100k rows and more as in
    # blocks of 50k (every table and view writes a part per block): benchmarks/clickhouse_sink.py
    c.add_argument("--batch-rows", type=int, default=200_000, metavar="N",
                   help="with --store: records per insert block at most (default 200000)")
    c.add_argument("--queue-rows", type=int, default=1_000_000, metavar="N",
                   help="with --store: records held while the store is slow or down; past it records are "
                        "refused and counted (default 1000000)")
    c.add_argument("--retention", default="168h,720h,8760h", metavar="RAW,1M,1H",
                   help="with --store: how long the raw table, the 1-minute and the 1-hour roll-ups keep rows, "
                        "Go durations, 0 for forever (default 168h,720h,8760h; servers before 19.6 have no TTL)")
    c.add_argument("--commit-interval", default="1s", metavar="DURATION",
                   help="with --store: commit a partial batch after this long (default 1s)")
    c.add_argument("--template-lifetime", default="30m", metavar="DURATION",
                   help="UDP only: forget templates not refreshed for this long (default 30m)")
    c.add_argument("--max-sessions", type=int, default=1024, metavar="N",
                   help="refuse new transport sessions past this many (default 1024)")
    c.add_argument("--idle-timeout", metavar="DURATION",
                   help="TCP/TLS only: close sessions that send nothing for this long (default: never)")
    c.set_defaults(func=_collector)
    from .flows_cli import register as register_flows

    register_flows(subparsers)

    e = subparsers.add_parser(
        "export",
        help="send JSON Lines records (stdin) as IPFIX",
        description="Read JSON records, one object per line (the collector's output form), and send them as IPFIX. "
        "Records with the same set of keys share one template; --template names a predefined one instead.",
    )
    e.add_argument("--to", required=True, metavar="HOST:PORT[:PROTO]",
                   help="collector address; PROTO is tcp (default), udp or tls; IPv6 in brackets")
    _tls_options(e, client=True)
    e.add_argument("--template", metavar="NAME",
                   help="use a predefined template: agent-ipv4, agent-ipv6, aggregator-ipv4, aggregator-ipv6")
    e.add_argument("--observation-domain", type=int, default=0, metavar="N", help="observation domain id (default 0)")
    e.add_argument("--path-mtu", type=int, default=512, metavar="OCTETS",
                   help="UDP only: path MTU that messages must fit (default 512)")
    e.add_argument("--connect-timeout", default="10s", metavar="DURATION",
                   help="give up when the collector cannot be reached for this long (default 10s)")
    e.add_argument("--input", metavar="FILE", help="read records from FILE instead of standard input")
    e.set_defaults(func=_export)


def _tls_options(p: argparse.ArgumentParser, *, client: bool = False) -> None:
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (tls)")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of the certificate (tls)")
    p.add_argument("--tls-ca", metavar="FILE", help="PEM CA certificate that signs the peer's certificate (tls)")
    if client:
        p.add_argument("--tls-server-name", metavar="NAME",
                       help="name the collector's certificate must carry (default: the host of --to)")


class _Usage(Exception):
    """A command-line mistake: printed as is, exit code 2."""


def _err(command: str, message: str) -> None:
    print(f"flowscope {command}: {message}", file=sys.stderr)


def _address(text: str, option: str) -> Any:
    from flowscope.ipfix.address import AddressError, parse_address

    try:
        return parse_address(text, default_protocol="tcp", field=option)
    except AddressError as exc:
        raise _Usage(str(exc)) from None


def _tls(args: argparse.Namespace, address: Any) -> Any:
    from flowscope.ipfix.transport import TLSConfig

    given = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-ca": args.tls_ca}
    if address.protocol != "tls":
        named = [k for k, v in given.items() if v]
        if named:
            raise _Usage(f"{', '.join(named)} given but {address} is not a tls address; end it with :tls")
        return None
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise _Usage(f"{address} is a tls address: {', '.join(missing)} must be given (mutual TLS needs all three)")
    return TLSConfig(args.tls_cert, args.tls_key, args.tls_ca, server_name=getattr(args, "tls_server_name", None))


def _duration(text: str, option: str) -> float:
    from flowscope.durations import DurationError, parse_duration

    try:
        seconds = parse_duration(text, field=option)
    except DurationError as exc:
        raise _Usage(str(exc)) from None
    if seconds <= 0:
        raise _Usage(f"{option}: {text!r} must be longer than 0")
    return seconds


def _install_signals(loop: Any, stop: Any) -> dict[str, int]:
    import signal

    got: dict[str, int] = {}

    def handler(signum: int) -> None:
        got.setdefault("signal", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler, sig)
    return got


def _logging() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="flowscope: %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# --------------------------------------------------------------------------- collector


class _TableWriter:
    """Readable columns for flow records; other records as key=value pairs."""

    HEADER = f"{'EXPORTER':<22} {'DOM':>5} {'TPL':>5} {'SOURCE':<28} {'DESTINATION':<28} {'PROTO':>5} " \
             f"{'PACKETS':>9} {'OCTETS':>11} {'R-PACKETS':>9} {'R-OCTETS':>11}  DETAILS"
    CORE = {
        "sourceIPv4Address", "sourceIPv6Address", "destinationIPv4Address", "destinationIPv6Address",
        "sourceTransportPort", "destinationTransportPort", "protocolIdentifier", "packetTotalCount",
        "octetTotalCount", "reversePacketTotalCount", "reverseOctetTotalCount",
    }

    def __init__(self) -> None:
        self.header_done = False

    @staticmethod
    def _endpoint(ip: Any, port: Any) -> str:
        if ip is None:
            return "-"
        host = f"[{ip}]" if ":" in str(ip) else str(ip)
        return f"{host}:{port}" if port is not None else host

    def lines(self, record: dict[str, Any], exporter: str, domain: int, template_id: int) -> list[str]:
        from .records import record_to_json

        out = []
        if not self.header_done:
            out.append(self.HEADER)
            self.header_done = True
        r = record_to_json(record)
        src = self._endpoint(r.get("sourceIPv4Address", r.get("sourceIPv6Address")), r.get("sourceTransportPort"))
        dst = self._endpoint(
            r.get("destinationIPv4Address", r.get("destinationIPv6Address")), r.get("destinationTransportPort")
        )
        proto = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6", 132: "sctp"}.get(
            r.get("protocolIdentifier", -1), str(r.get("protocolIdentifier", "-"))
        )
        details = " ".join(f"{k}={v}" for k, v in r.items() if k not in self.CORE and v not in ("", None))

        def num(key: str) -> str:
            v = r.get(key)
            return "-" if v is None else str(v)

        out.append(
            f"{exporter:<22} {domain:>5} {template_id:>5} {src:<28} {dst:<28} {proto:>5} "
            f"{num('packetTotalCount'):>9} {num('octetTotalCount'):>11} "
            f"{num('reversePacketTotalCount'):>9} {num('reverseOctetTotalCount'):>11}  {details}"
        )
        return out


def _collector(args: argparse.Namespace) -> int:
    import asyncio

    try:
        address = _address(args.listen, "--listen")
        lifetime = _duration(args.template_lifetime, "--template-lifetime")
        idle = _duration(args.idle_timeout, "--idle-timeout") if args.idle_timeout else None
        if args.max_sessions < 1:
            raise _Usage(f"--max-sessions: {args.max_sessions} must be at least 1")
        tls = _tls(args, address)
        sink = _store_options(args)
    except _Usage as exc:
        _err("collector", str(exc))
        return EXIT_USAGE
    _logging()
    fmt = args.format or ("jsonl" if sink is None else None)
    try:
        return asyncio.run(_collect(address, tls, fmt, lifetime, args.max_sessions, idle, sink))
    except _Usage as exc:
        _err("collector", str(exc))
        return EXIT_USAGE


class _StoreOptions:
    def __init__(self, url: str, api: Any, auth: Any, batch_rows: int, queue_rows: int, interval: float) -> None:
        self.url, self.api, self.auth = url, api, auth
        self.batch_rows, self.queue_rows, self.interval = batch_rows, queue_rows, interval
        self.ui: Any = None  # the dashboards' UIConfig (flowscope.collector.ui.options), or None
        self.retention: Any = None  # schema.Retention


def _store_options(args: argparse.Namespace) -> _StoreOptions | None:
    if args.store is None:
        if args.api or args.api_token_file or args.api_insecure or _api_tls_given(args):
            raise _Usage("--api serves the flow store: give --store too")
        if args.ui:
            raise _Usage("--ui serves the flow store's dashboards: give --store too")
        return None
    from .store import StoreError, parse_store_address

    try:
        parse_store_address(args.store, "--store")
    except StoreError as exc:
        raise _Usage(str(exc)) from None
    if args.batch_rows < 1 or args.queue_rows < args.batch_rows:
        raise _Usage(f"--queue-rows: {args.queue_rows} must be at least --batch-rows ({args.batch_rows}), "
                     "and --batch-rows at least 1")
    interval = _duration(args.commit_interval, "--commit-interval")
    retention = _retention(args.retention)
    api = auth = None
    if args.api:
        from flowscope.listen import parse_listen_address
        from flowscope.webauth import WebAuth, WebAuthError, check_exposure, read_token, server_ssl_context

        try:
            api = parse_listen_address(args.api, "--api", example_port=8080)
        except ValueError as exc:
            raise _Usage(str(exc)) from None
        if api is None:
            raise _Usage("--api: give HOST:PORT, e.g. 127.0.0.1:8080")
        try:
            token = read_token(args.api_token_file, "--api-token-file") if args.api_token_file else None
            ctx = None
            if _api_tls_given(args):
                if not (args.api_tls_cert and args.api_tls_key):
                    raise WebAuthError("--api-tls-cert and --api-tls-key: give both to serve --api over HTTPS")
                ctx = server_ssl_context(args.api_tls_cert, args.api_tls_key, args.api_tls_ca, "--api-tls")
            # the aggregator's rule: loopback open, otherwise a token, client certificates or --api-insecure
            auth = WebAuth(token=token, ssl_context=ctx, client_certs=bool(ctx and args.api_tls_ca),
                           insecure=args.api_insecure)
            check_exposure(api[0], auth, "--api")
        except WebAuthError as exc:
            raise _Usage(str(exc)) from None
    elif args.api_token_file or args.api_insecure or _api_tls_given(args):
        raise _Usage("--api-token-file, --api-tls-* and --api-insecure configure --api: give --api HOST:PORT too")
    from flowscope.webauth import WebAuthError

    from .ui.options import ui_from_args

    try:
        ui = ui_from_args(args)
    except (WebAuthError, ValueError) as exc:
        raise _Usage(str(exc)) from None
    options = _StoreOptions(args.store, api, auth, args.batch_rows, args.queue_rows, interval)
    options.retention = retention
    options.ui = ui
    return options


def _api_tls_given(args: argparse.Namespace) -> bool:
    return bool(args.api_tls_cert or args.api_tls_key or args.api_tls_ca)


def _retention(text: str) -> Any:
    """``RAW,1M,1H`` Go durations (0: forever) as a schema.Retention."""
    from flowscope.durations import DurationError, parse_duration

    from .schema import Retention

    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise _Usage(f"--retention: {text!r} is not RAW,1M,1H (three Go durations, e.g. 168h,720h,8760h; 0 for forever)")
    seconds = []
    for name, part in zip(("raw", "1m", "1h"), parts):
        try:
            v = 0.0 if part == "0" else parse_duration(part, field=f"--retention ({name})")
        except DurationError as exc:
            raise _Usage(str(exc)) from None
        if v and v < 3600:
            raise _Usage(f"--retention ({name}): {part!r} is below the 1h minimum")
        seconds.append(int(v))
    return Retention(*seconds)


async def _collect(address: Any, tls: Any, fmt: str | None, lifetime: float, max_sessions: int, idle: float | None,
                   sink: _StoreOptions | None = None) -> int:
    import asyncio

    from flowscope.ipfix import UsageError
    from flowscope.ipfix.codec import Decoder
    from flowscope.ipfix.collecting import CollectingProcess
    from flowscope.ipfix.columnar import ColumnarDecoder

    from .records import dumps_record

    import time

    loop_cpu0 = time.thread_time()  # this thread runs the event loop: decoding, queueing, the API
    out = sys.stdout
    table = _TableWriter() if fmt == "table" else None
    broken = asyncio.Event()
    writer: Any = None
    runner: Any = None
    if sink is not None:
        writer, runner = await _open_store(sink)
        if writer is None:
            return EXIT_UNREACHABLE

    def on_message(peer: Any, msg: Any) -> None:
        if writer is not None:  # the data sets as columns (ColumnarDecoder): no dict per record
            writer.offer_sets(msg.column_sets)
        if broken.is_set() or fmt is None:
            return
        exporter = str(peer)
        domain = msg.observation_domain_id
        lines: list[str] = []
        for template, record in msg.data_records():
            if table is None:
                lines.append(dumps_record(record, exporter=exporter, domain=domain, template_id=template.template_id))
            else:
                lines += table.lines(record, exporter, domain, template.template_id)
        if lines:
            try:
                out.write("\n".join(lines) + "\n")
                out.flush()
            except BrokenPipeError:  # the reader went away (| head): stop quietly
                broken.set()

    try:
        process = CollectingProcess(
            address, tls=tls, on_message=on_message, template_lifetime=lifetime, max_sessions=max_sessions,
            stream_idle_timeout=idle, decoder_class=ColumnarDecoder if writer is not None else Decoder,
        )
    except UsageError as exc:
        raise _Usage(str(exc)) from None
    try:
        await process.start()
    except OSError as exc:
        _err("collector", str(exc))
        await _close_store(writer, runner)
        return EXIT_UNREACHABLE
    print(f"flowscope collector: listening on {address} (port {process.port})", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    _install_signals(asyncio.get_running_loop(), stop)
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(broken.wait())]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    await process.close()
    await _close_store(writer, runner, time.thread_time() - loop_cpu0)
    s = process.stats
    print(
        f"flowscope collector: {s.records} records in {s.messages} messages from {s.sessions_total} sessions; "
        f"{s.malformed} malformed, {s.sessions_refused} sessions refused, {s.tls_refused} TLS handshakes refused, "
        f"{s.lost_records} records lost in transit (sequence numbers)",
        file=sys.stderr,
    )
    if broken.is_set():
        try:
            sys.stdout = None  # type: ignore[assignment]  # no flush of a dead pipe at exit
        except Exception:  # noqa: BLE001
            pass
    return EXIT_OK


async def _open_store(sink: _StoreOptions) -> tuple[Any, Any]:
    """The store opened (migrated), its writer started, the API served; (None, None) if it cannot be."""
    import asyncio

    from .ingest import StoreWriter
    from .store import StoreError, open_store

    import os

    # a server's credentials never go on the command line: the environment, as for the aggregator's sink
    store = open_store(sink.url, retention=sink.retention, user=os.environ.get("CLICKHOUSE_USERNAME") or "default",
                       password=os.environ.get("CLICKHOUSE_PASSWORD", ""))
    try:
        await asyncio.to_thread(store.open)
    except StoreError as exc:
        _err("collector", str(exc))
        return None, None
    except Exception as exc:  # noqa: BLE001 - unreachable server, locked chDB directory, ...
        _err("collector", f"--store {sink.url}: cannot open the store: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}")
        return None, None
    writer = StoreWriter(store, batch_rows=sink.batch_rows, max_rows=sink.queue_rows, commit_interval=sink.interval)
    writer.start()
    runner = None
    if sink.api is not None:
        from aiohttp import web

        from .api import make_app

        runner = web.AppRunner(make_app(store, sink.auth), access_log=None)
        await runner.setup()
        ssl_context = sink.auth.ssl_context if sink.auth is not None else None
        site = web.TCPSite(runner, sink.api[0], sink.api[1], ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            _err("collector", f"--api {sink.api[0]}:{sink.api[1]}: {exc}")
            await runner.cleanup()
            await asyncio.to_thread(writer.close)
            store.close()
            return None, None
        port = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else sink.api[1]  # type: ignore[union-attr]
        scheme = "https" if ssl_context is not None else "http"
        host = f"[{sink.api[0]}]" if ":" in sink.api[0] else sink.api[0]
        print(f"flowscope collector: API on {scheme}://{host}:{port}/api/v1"
              + (" (client certificates required)" if sink.auth is not None and sink.auth.client_certs else ""),
              file=sys.stderr, flush=True)
    if sink.ui is not None:
        from .ui.app import start_ui

        try:
            ui = await start_ui(store, sink.ui)
        except OSError as exc:
            _err("collector", str(exc.strerror or exc))
            if runner is not None:
                await runner.cleanup()
            await asyncio.to_thread(writer.close)
            store.close()
            return None, None
        print(f"flowscope collector: dashboards at {ui.url}", file=sys.stderr, flush=True)
        runner = _Servers(runner, ui)
    print(f"flowscope collector: storing into {store.address} (schema {store.schema_version}, "
          f"ClickHouse {store.features.label if store.features else '?'})", file=sys.stderr, flush=True)
    return writer, runner


class _Servers:
    """The API's runner and the dashboards' server, cleaned up together."""

    def __init__(self, *servers: Any) -> None:
        self.servers = [s for s in servers if s is not None]

    async def cleanup(self) -> None:
        for s in self.servers:
            await (s.cleanup() if hasattr(s, "cleanup") else s.close())


async def _close_store(writer: Any, runner: Any, loop_cpu: float | None = None) -> None:
    import asyncio

    if runner is not None:
        await runner.cleanup()
    if writer is not None:
        await asyncio.to_thread(writer.close)
        st = writer.stats()
        print(f"flowscope collector: {st.committed} records stored in {st.commits} commits; {st.overflow} refused "
              f"(queue full), {st.invalid} invalid, {st.lost_at_close} not stored at shutdown", file=sys.stderr)
        if loop_cpu is not None and st.offered:
            per_k = 1000 / st.offered * 1000  # ms of CPU per 1,000 records offered
            print(f"flowscope collector: CPU per 1,000 records: decode {max(loop_cpu - st.queue_cpu, 0) * per_k:.3f} ms "
                  f"(the event loop: decoding, the API), queueing {st.queue_cpu * per_k:.3f} ms, "
                  f"conversion {st.convert_cpu * per_k:.3f} ms, insert {st.insert_cpu * per_k:.3f} ms; "
                  f"wall seconds: conversion {st.convert_wall:.3f}, insert {st.insert_wall:.3f}",
                  file=sys.stderr)
        writer.store.close()


# --------------------------------------------------------------------------- export


def _export(args: argparse.Namespace) -> int:
    import asyncio

    try:
        address = _address(args.to, "--to")
        timeout = _duration(args.connect_timeout, "--connect-timeout")
        tls = _tls(args, address)
        if not 0 <= args.observation_domain <= 0xFFFFFFFF:
            raise _Usage(f"--observation-domain: {args.observation_domain} is outside 0..4294967295")
        if not 68 <= args.path_mtu <= 65535:
            raise _Usage(f"--path-mtu: {args.path_mtu} is outside 68..65535")
        if args.template is not None:
            from flowscope.ipfix.antrea import TEMPLATES

            if args.template not in TEMPLATES:
                raise _Usage(f"--template: {args.template!r} is not one of {', '.join(TEMPLATES)}")
        source = sys.stdin.buffer
        if args.input:
            try:
                source = open(args.input, "rb")  # noqa: SIM115 - read by a thread until EOF
            except OSError as exc:
                raise _Usage(f"--input: cannot read {args.input!r}: {exc.strerror}") from None
    except _Usage as exc:
        _err("export", str(exc))
        return EXIT_USAGE
    _logging()
    try:
        return asyncio.run(_send(args, address, tls, timeout, source))
    except _Usage as exc:
        _err("export", str(exc))
        return EXIT_USAGE


def _reader(source: Any, loop: Any, queue: Any, chunk: int = 1 << 16) -> None:
    """Thread: hand complete lines to the event loop as soon as they can be read (a pipe
    that stays open must not hold back what it already delivered); None marks the end."""
    import asyncio

    def put(item: Any) -> None:
        asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

    import os

    # os.read on the descriptor, not the buffered file: a daemon thread blocked inside a
    # BufferedReader holds its lock, and interpreter shutdown aborts on that lock
    fd = source.fileno()
    tail = b""
    try:
        while True:
            data = os.read(fd, chunk)
            if not data:
                break
            data = tail + data
            cut = data.rfind(b"\n") + 1
            tail = data[cut:]
            if cut:
                put(data[:cut].splitlines())
        if tail:
            put([tail])
        put(None)
    except RuntimeError:  # the loop is gone: we were stopped
        pass
    except Exception as exc:  # noqa: BLE001 - reported by the consumer
        try:
            put([exc])
            put(None)
        except RuntimeError:
            pass


class _Templates:
    """Template ids by key set, or the one predefined template."""

    def __init__(self, registry: Any, predefined: str | None) -> None:
        from flowscope.ipfix import Template
        from flowscope.ipfix.antrea import TEMPLATES

        self.registry = registry
        self.by_keys: dict[frozenset[str], Any] = {}
        self.predefined = predefined
        self.fixed = None
        if predefined is not None:
            self.fixed = Template.build(256, TEMPLATES[predefined], registry)
            self.fixed_keys = frozenset(self.fixed.names)

    def for_record(self, record: dict[str, Any], line: int) -> tuple[Any, bool]:
        """(template, new?) for a record; RecordError when it does not fit the predefined one."""
        from flowscope.ipfix import Template

        from .records import RecordError, template_order

        if self.fixed is not None:
            keys = frozenset(record)
            if keys != self.fixed_keys:
                missing = sorted(self.fixed_keys - keys)
                extra = sorted(keys - self.fixed_keys)
                if missing:
                    raise RecordError(
                        f"line {line}: field {missing[0]!r} is missing"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + f"; template {self.predefined} needs all of its {len(self.fixed_keys)} fields"
                    )
                raise RecordError(f"line {line}: field {extra[0]!r} is not part of template {self.predefined}")
            return self.fixed, False
        keys = frozenset(record)
        t = self.by_keys.get(keys)
        if t is not None:
            return t, False
        tid = 256 + len(self.by_keys)
        if tid > 65535:
            raise RecordError(f"line {line}: more than 65280 different key sets; no template id is left")
        t = Template.build(tid, template_order(record, self.registry), self.registry)
        self.by_keys[keys] = t
        return t, True


async def _send(args: argparse.Namespace, address: Any, tls: Any, timeout: float, source: Any) -> int:
    import asyncio
    import threading
    import time

    from flowscope.ipfix import UsageError, default_registry
    from flowscope.ipfix.exporting import ExportingProcess

    from .records import RecordError, parse_line

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = _install_signals(loop, stop)
    registry = default_registry().copy()
    templates = _Templates(registry, args.template)
    lines_q: asyncio.Queue[list[bytes] | None] = asyncio.Queue(maxsize=4)
    threading.Thread(target=_reader, args=(source, loop, lines_q), name="export-input", daemon=True).start()

    exporter: ExportingProcess | None = None
    rejected = 0
    line_no = 0
    unreachable = False
    queue_size = 65536

    async def open_exporter(first: Any) -> ExportingProcess | None:
        try:
            exp = ExportingProcess(
                address, tls=tls, templates=[first], observation_domain_id=args.observation_domain,
                path_mtu=args.path_mtu, queue_size=queue_size, backoff_initial=0.25,
                backoff_max=max(0.25, min(5.0, timeout / 4)), connect_timeout=timeout,
            )
        except UsageError as exc:
            raise _Usage(str(exc)) from None
        await exp.start()
        deadline = time.monotonic() + timeout
        while not exp.stats.connected and time.monotonic() < deadline and not stop.is_set():
            await asyncio.sleep(0.05)
        if not exp.stats.connected:
            _err("export", f"cannot reach the collector at {address} (gave up after {timeout:g}s)")
            await exp.close()
            return None
        return exp

    async def room(exp: ExportingProcess, n: int) -> bool:
        """Wait until n more records fit the queue; False if the collector stays away."""
        gone_since: float | None = None
        while exp.stats.queued + n > queue_size:
            if await exp.flush(timeout=0.5):
                break
            if exp.stats.connected:
                gone_since = None
            else:
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > timeout:
                    return False
        return True

    shown = 0
    try:
        while not stop.is_set():
            get = asyncio.ensure_future(lines_q.get())
            halt = asyncio.ensure_future(stop.wait())
            await asyncio.wait([get, halt], return_when=asyncio.FIRST_COMPLETED)
            halt.cancel()
            if not get.done():
                get.cancel()
                break
            batch = get.result()
            if batch is None:
                break
            runs: list[tuple[int, list[dict[str, Any]]]] = []  # consecutive records of one template, in input order
            for raw in batch:
                line_no += 1
                if isinstance(raw, Exception):
                    _err("export", f"reading input failed after line {line_no - 1}: {raw}")
                    rejected += 1
                    break
                try:
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise RecordError(f"line {line_no}: not UTF-8 text (octet {exc.start + 1})") from None
                    record = parse_line(text, registry, line_no)
                    if record is None:
                        continue
                    template, new = templates.for_record(record, line_no)
                except (RecordError, UsageError) as exc:
                    rejected += 1
                    if shown < 20:
                        _err("export", str(exc))
                        shown += 1
                    continue
                if exporter is None:
                    exporter = await open_exporter(template)
                    if exporter is None:
                        unreachable = True
                        return EXIT_UNREACHABLE
                elif new:
                    exporter.add_template(template)
                if runs and runs[-1][0] == template.template_id:
                    runs[-1][1].append(record)
                else:
                    runs.append((template.template_id, [record]))
            if exporter is not None:
                for tid, records in runs:
                    if not await room(exporter, len(records)):
                        _err("export", f"lost the collector at {address} and could not reconnect within {timeout:g}s")
                        unreachable = True
                        stop.set()
                        break
                    exporter.submit(tid, records)
        # drain: wait for what was queued, as long as the collector is there
        if exporter is not None and not unreachable:
            gone_since: float | None = None
            while not await exporter.flush(timeout=0.5):
                if exporter.stats.connected:
                    gone_since = None
                    continue
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > timeout:
                    _err("export", f"lost the collector at {address}; records still queued are dropped")
                    unreachable = True
                    break
    finally:
        if exporter is not None:
            await exporter.close()
    if shown < rejected:
        _err("export", f"... and {rejected - shown} more rejected lines")
    s = exporter.stats if exporter is not None else None
    sent = s.records_sent if s else 0
    failed = (s.records_dropped + s.records_invalid + s.records_lost) if s else 0
    n_templates = 1 if templates.fixed is not None else len(templates.by_keys)
    print(
        f"flowscope export: {sent} records sent to {address} with {n_templates} templates; "
        f"{rejected} input lines rejected, {failed} records not delivered"
        + (f" ({s.records_dropped} dropped, {s.records_invalid} invalid, {s.records_lost} lost on a broken connection)" if s and failed else ""),
        file=sys.stderr,
    )
    if "signal" in signals:
        return 128 + signals["signal"]
    if unreachable:
        return EXIT_UNREACHABLE
    return EXIT_DATA if rejected or failed else EXIT_OK
