"""The Flow Aggregator daemon: collecting process -> aggregation -> sinks, plus API and metrics.

This is the thin asynchronous shell around the sans-IO core. :class:`FlowAggregator`
owns one :class:`~flowscope.aggregator.aggregation.AggregationProcess`, feeds it from
the IPFIX collecting process (``on_message`` runs on the event loop, one call per
message, no awaiting), calls ``tick`` once a second with its injected clock, and hands
what is due to every sink's bounded queue, waiting for room rather than dropping (the
ticker waits, collection never does: the flow store holds and keeps aggregating the
records meanwhile; only a sink that takes nothing for ``sink_stall`` seconds has the rest
counted as dropped). Start checks every file and opens the HTTP ports before the IPFIX
port; on shutdown it half-closes the IPFIX sessions and reads what the agents still
send, exports every flow with unexported changes the same patient way, and drains the
sinks.

Sinks are built from the configuration (IPFIX to ``externalFlowCollectorAddr``, the
JSON-lines flow log, ClickHouse when the collector provides it) or passed in; anything
that implements :class:`~flowscope.aggregator.sinks.Sink` plugs in.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from .aggregation import AggregationProcess, ExportedFlow, FlowFilter
from .config import AggregatorConfig, ConfigError
from .sinks import FlowLogSink, IPFIXSink, QueuedSink, Sink

__all__ = ["FlowAggregator", "build_sinks", "check_tls", "check_files", "api_auth", "exporter_address",
           "certificate_name_problem", "MAX_EXPORTER_SERIES"]

log = logging.getLogger("flowscope.aggregator")

TICK_INTERVAL = 1.0
SCAN_SLICE = 5000  # flows per slice of the periodic export (~30 ms)
SLICE_WAIT = 1.0  # at most this long for a slow sink to make room for the next slice
MAX_EXPORTER_SERIES = 512  # per-exporter counters kept by name; the rest are summed as "other"
DRAIN_TIMEOUT = 3.0  # at shutdown, read what exporters sent until they close (at most this long)
SINK_STALL = 10.0  # a sink that takes nothing for this long: what does not fit is dropped (counted)


async def _listen(server: Any, address: tuple[str, int], key: str) -> None:
    host, port = address
    try:
        await server.start(host, port)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(exc.errno, f"{key}: cannot listen on {where}: {exc.strerror or exc}") from None


def exporter_address(host: str) -> str:
    """The agent's address as originalExporterIPv4/IPv6Address: IPv4-mapped IPv6 becomes IPv4."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def build_sinks(config: AggregatorConfig) -> list[tuple[Sink, int]]:
    """The enabled sinks of the configuration, each with its queue size."""
    out: list[tuple[Sink, int]] = []
    sc = config.sinks
    if sc.ipfix.enabled and config.external_collector is not None:
        out.append((IPFIXSink(config.external_collector, queue_size=sc.ipfix.queue_size), sc.ipfix.queue_size))
    if sc.flow_log.enabled:
        fl = sc.flow_log
        out.append((FlowLogSink(fl.path, max_size_mb=fl.max_size_mb, max_backups=fl.max_backups), fl.queue_size))
    if sc.clickhouse.enabled:
        from .clickhouse_sink import make_sink

        out.append((make_sink(sc.clickhouse), sc.clickhouse.queue_size))
    return out


def certificate_name_problem(cert_file: str, name: str) -> str | None:
    """Why agents checking ``name`` would refuse the server certificate, or None.

    flowAggregatorAddress is the name agents verify (their flowCollectorAddr host); a
    certificate that does not carry it fails every agent's handshake, which is the most
    common TLS deployment mistake, so the aggregator says so at start. Needs the
    ``cryptography`` package; without it nothing is checked.
    """
    try:
        from cryptography import x509
    except ImportError:
        return None
    try:
        with open(cert_file, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
    except (OSError, ValueError) as exc:
        return f"tls.certFile: cannot read {cert_file!r} as a PEM certificate: {exc}"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return f"tls.certFile: {cert_file!r} has no subjectAltName; agents cannot verify it as {name!r}"
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    try:
        if str(ipaddress.ip_address(name)) in ips:
            return None
    except ValueError:
        lowered = name.lower().rstrip(".")
        for d in dns:
            d = d.lower().rstrip(".")
            if d == lowered or (d.startswith("*.") and lowered.split(".", 1)[-1] == d[2:] and "." in lowered):
                return None
    return (
        f"flowAggregatorAddress: {name!r} is not among the names of tls.certFile {cert_file!r} "
        f"({', '.join(dns + ips) or 'none'}); agents that verify this name will fail the TLS handshake"
    )


def check_tls(config: AggregatorConfig) -> list[str]:
    """With tls or grpc transport: raise ConfigError for unreadable TLS files; return warnings."""
    if config.transport not in ("tls", "grpc"):
        return []
    tls = config.tls
    for key, path in (("tls.caFile", tls.ca_file), ("tls.certFile", tls.cert_file), ("tls.keyFile", tls.key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(
                f"{key}: cannot read {path!r} ({exc.strerror}); aggregatorTransportProtocol tls needs the "
                "CA, certificate and key the operator mounts at /etc/flowscope/tls/"
            ) from None
    problem = certificate_name_problem(tls.cert_file, config.aggregator_address)
    return [problem] if problem else []


def api_auth(config: AggregatorConfig) -> Any:
    """The API's :class:`flowscope.webauth.WebAuth`: the token read, the HTTPS context
    loaded; a ConfigError naming the key when a file is missing or wrong."""
    from flowscope.webauth import WebAuth, WebAuthError, read_token, server_ssl_context

    api = config.api
    try:
        token = read_token(api.token_file, "api.tokenFile") if api.token_file else None
        ctx = None
        if api.tls is not None:
            ctx = server_ssl_context(api.tls.cert_file, api.tls.key_file, api.tls.ca_file, "api.tls")
    except WebAuthError as exc:
        raise ConfigError(str(exc)) from None
    return WebAuth(token=token, ssl_context=ctx, client_certs=bool(api.tls and api.tls.ca_file),
                   insecure=api.insecure)


def check_files(config: AggregatorConfig) -> list[str]:
    """Everything a real start reads, checked without opening a socket or creating a file:
    the IPFIX TLS files, the API's token and certificates, the flow log's directory.
    Raises ConfigError naming the key; returns warnings."""
    import os

    warnings = check_tls(config)
    if config.api_address is not None:
        api_auth(config)
    fl = config.sinks.flow_log
    if fl.enabled:
        path = os.path.abspath(fl.path)
        if os.path.isdir(path):
            raise ConfigError(f"sinks.flowLog.path: {fl.path!r} is a directory; give the path of the log file")
        parent = os.path.dirname(path)
        existing = parent
        while existing and not os.path.isdir(existing):  # the sink creates missing directories
            if os.path.exists(existing):
                raise ConfigError(f"sinks.flowLog.path: cannot write {fl.path!r}: {existing!r} is not a directory")
            existing = os.path.dirname(existing) if os.path.dirname(existing) != existing else ""
        target = path if os.path.exists(path) else existing
        if not target or not os.access(target, os.W_OK | (0 if target == path else os.X_OK)):
            raise ConfigError(
                f"sinks.flowLog.path: cannot write {fl.path!r} ({target or parent} is not writable by this "
                "process); mount a writable volume there or choose another path"
            )
    return warnings


class FlowAggregator:
    """The running aggregator. ``clock`` is monotonic seconds (injected in tests)."""

    def __init__(
        self,
        config: AggregatorConfig,
        *,
        sinks: Sequence[tuple[Sink, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        tick_interval: float = TICK_INTERVAL,
        template_lifetime: float = 1800.0,
        sink_stall: float = SINK_STALL,
    ) -> None:
        self.config = config
        self.sink_stall = sink_stall
        self.clock = clock
        self.tick_interval = tick_interval
        self.template_lifetime = template_lifetime
        self.process = AggregationProcess(
            export_interval=config.export_interval,
            correlation_timeout=config.correlation_timeout,
            inactive_timeout=config.inactive_timeout,
            max_flows=config.max_flows,
            max_flow_bytes=config.max_flows_mb << 20,
            start=clock(),
        )
        pairs = build_sinks(config) if sinks is None else list(sinks)
        self.sinks = [QueuedSink(sink, queue_size=size) for sink, size in pairs]
        # A slice of the periodic export never holds more records than the smallest sink queue.
        self.scan_slice = min([SCAN_SLICE, *(s.queue_size for s in self.sinks)])
        self.received_by_exporter: dict[str, int] = {}
        self.exporter_seen: dict[str, float] = {}
        self.messages = 0
        self.ingest_errors = 0
        self.exporters_over_limit = 0  # records of exporters past MAX_EXPORTER_SERIES, counted under "other"
        self.collecting: Any = None
        self.api_server: Any = None  # api.ApiServer
        self.metrics_server: Any = None
        self.loop_errors: Any = None  # api.QuietExceptionHandler, once started
        self._ticker: asyncio.Task[None] | None = None
        self._registry: Any = None
        self.started_at = clock()

    # ---------------------------------------------------------------- collection
    def on_message(self, peer: Any, message: Any) -> None:
        """Collecting process callback: every data record of one IPFIX message."""
        exporter = exporter_address(peer.host)
        domain = message.observation_domain_id
        now = self.clock()
        records = [record for _template, record in message.data_records()]
        n = len(records)
        try:
            self.process.ingest_many(records, exporter, domain, now)
        except Exception as exc:  # a bug must not take the collecting process down; it is counted
            self._bad_record(exporter, exc)
        self.messages += 1
        self._count_exporter(exporter, n, now)

    def _count_exporter(self, exporter: str, n: int, now: float) -> None:
        """Per-exporter counters, at most MAX_EXPORTER_SERIES of them: the first exporters
        heard keep their own series (a cluster's agents), later ones are summed under
        "other", so that a peer sending from many addresses cannot grow /metrics."""
        counts = self.received_by_exporter
        if exporter in counts:
            counts[exporter] += n
        elif len(counts) < MAX_EXPORTER_SERIES:
            counts[exporter] = n
        else:
            counts["other"] = counts.get("other", 0) + n
            self.exporters_over_limit += 1
            return
        seen = self.exporter_seen
        if exporter in seen or len(seen) < MAX_EXPORTER_SERIES:
            seen[exporter] = now

    def _bad_record(self, exporter: str, exc: Exception) -> None:
        self.ingest_errors += 1
        if self.ingest_errors <= 10 or self.ingest_errors % 10000 == 0:
            log.error("records from %s lost to an internal error (%d so far): %r", exporter, self.ingest_errors, exc,
                      exc_info=self.ingest_errors == 1)

    def ingest_records(self, records: Sequence[dict[str, Any]], exporter: str, domain: int = 0) -> None:
        """Feed decoded records directly (tests, replays)."""
        now = self.clock()
        self.process.ingest_many(records, exporter, domain, now)
        self._count_exporter(exporter, len(records), now)

    def tick(self, max_scan: int | None = None) -> list[ExportedFlow]:
        """Run the aggregation's timers and hand what is due to every sink; returns it."""
        out = self.process.tick(self.clock(), max_scan)
        if out:
            self._dispatch(out)
        return out

    def _dispatch(self, out: list[ExportedFlow]) -> None:
        for sink in self.sinks:
            sink.offer(out)

    async def _deliver(self, out: list[ExportedFlow]) -> None:
        """Hand ``out`` to every sink (all at once), waiting for room instead of dropping: the
        flow store is the buffer meanwhile (records keep being aggregated into it). Only a
        sink that takes nothing for ``sink_stall`` seconds has the rest counted as dropped
        (and is not waited for again until it takes something)."""
        if out and self.sinks:
            await asyncio.gather(*(self._deliver_to(sink, out) for sink in self.sinks))

    async def _deliver_to(self, sink: QueuedSink, out: list[ExportedFlow]) -> None:
        rest: Sequence[ExportedFlow] = out
        while rest:
            rest = rest[sink.offer_fit(rest):]
            if rest and not await sink.wait_progress(min(len(rest), sink.queue_size), self.sink_stall):
                sink.offer(rest)  # counts what still does not fit as dropped
                return

    async def _paced(self) -> None:
        """Between slices of a periodic export: let the sinks make room (each at most
        SLICE_WAIT), so that exporting many flows at once is paced, not dropped."""
        if self.sinks:
            await asyncio.gather(*(s.wait_room(self.scan_slice, SLICE_WAIT) for s in self.sinks))
        else:
            await asyncio.sleep(0)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                # The periodic scan of a large store runs in slices, letting the collecting
                # process read its sockets in between (a 100k-flow scan takes ~0.5 s).
                await self._deliver(self.process.tick(self.clock(), self.scan_slice))
                while self.process.scan_pending:
                    await self._paced()
                    await self._deliver(self.process.tick(self.clock(), self.scan_slice))
            except Exception:  # never let a bug stop exports; it is logged loudly
                log.exception("aggregation tick failed")

    # ---------------------------------------------------------------- lifecycle
    async def start(self, *, collect: bool = True, api: bool = True, ticker: bool = True) -> None:
        """Check everything, then open: the HTTP ports first (cheap to undo), the sinks,
        and the IPFIX port last, so that a bad value or a taken port fails the start
        before agents can connect. An OSError names the key of what could not open."""
        from .api import ApiServer, QuietExceptionHandler

        c = self.config
        for problem in check_files(c) if (collect or api) else []:
            log.warning("%s", problem)
        loop = asyncio.get_running_loop()
        if self.loop_errors is None:
            self.loop_errors = QuietExceptionHandler()
            loop.set_exception_handler(self.loop_errors)
        try:
            if api and c.api_address is not None:
                server = ApiServer(self, auth=api_auth(c), max_clients=c.api.max_clients,
                                   write_timeout=c.api.write_timeout)
                await _listen(server, c.api_address, "apiAddress")
                self.api_server = server
            if api and c.metrics_address is not None:
                server = ApiServer(self, metrics_only=True, max_clients=8)
                await _listen(server, c.metrics_address, "metricsAddress")
                self.metrics_server = server
            for sink in self.sinks:
                try:
                    await sink.start()
                except OSError as exc:
                    key = "sinks.flowLog.path" if sink.name == "flowLog" else f"sinks.{sink.name}"
                    raise OSError(exc.errno, f"{key}: cannot start the {sink.name} sink: {exc.strerror or exc}"
                                  ) from None
            if collect:
                await self._start_collecting()
        except BaseException:
            await self._close_servers()
            raise
        if ticker:
            self._ticker = asyncio.create_task(self._tick_loop(), name="aggregator-tick")
        log.info(
            "flow aggregator started: collecting %s on port %d, sinks %s, API %s",
            self.config.transport, self.collecting_port or self.config.listen_port,
            ", ".join(s.name for s in self.sinks) or "none", self.api_port,
        )

    async def _start_collecting(self) -> None:
        c = self.config
        cp = c.collecting
        from flowscope.ipfix.address import Address
        from flowscope.ipfix.errors import UsageError
        from flowscope.ipfix.collecting import CollectingProcess
        from flowscope.ipfix.transport import TLSConfig
        from flowscope.ipfix.template import CompileBudget

        if c.transport == "grpc":  # Antrea agents' Flow messages over gRPC, mutual TLS
            from .grpc_collector import GrpcCollectingProcess

            try:
                self.collecting = GrpcCollectingProcess(
                    c.listen_host, c.listen_port, cert=c.tls.cert_file, key=c.tls.key_file, ca=c.tls.ca_file,
                    on_records=self.ingest_records,
                )
            except ValueError as exc:
                raise ConfigError(f"tls.certFile / tls.keyFile / tls.caFile: {exc}") from None
            await self.collecting.start()
            return
        try:
            tls = None
            if c.transport == "tls":
                tls = TLSConfig(cert=c.tls.cert_file, key=c.tls.key_file, ca=c.tls.ca_file)
            self.collecting = CollectingProcess(
                Address(c.listen_host, c.listen_port, c.transport), tls=tls, on_message=self.on_message,
                template_lifetime=min(self.template_lifetime, cp.template_lifetime),
                max_sessions=cp.max_sessions, max_sessions_per_source=cp.max_sessions_per_source,
                max_pending_handshakes=cp.max_pending_handshakes, tls_handshake_timeout=cp.handshake_timeout,
                stream_idle_timeout=cp.stream_idle_timeout, udp_session_timeout=cp.udp_session_timeout,
                max_templates=cp.max_templates, max_template_fields=cp.max_template_fields,
                max_domains=cp.max_domains,
                compile_budget=CompileBudget(cp.template_compile_rate, max(cp.template_compile_rate,
                                                                           cp.max_template_fields)),
            )
        except UsageError as exc:  # unreadable or mismatched TLS material
            raise ConfigError(f"tls.certFile / tls.keyFile / tls.caFile: {exc}") from None
        try:
            await self.collecting.start()
        except OSError as exc:
            self.collecting = None
            raise OSError(exc.errno, f"listenPort: {exc.strerror or exc}") from None

    @property
    def collecting_port(self) -> int | None:
        return getattr(self.collecting, "port", None)

    @property
    def api_port(self) -> int | None:
        return None if self.api_server is None else self.api_server.port

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_server is None else self.metrics_server.port

    async def _close_servers(self) -> None:
        for name in ("api_server", "metrics_server"):
            server = getattr(self, name)
            if server is not None:
                await server.close()
                setattr(self, name, None)

    async def close(self) -> None:
        """Stop collecting, export what changed, drain and close the sinks."""
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
            self._ticker = None
        if self.collecting is not None:
            await self.collecting.close(drain=DRAIN_TIMEOUT)  # exporters stop; what they sent is read
            self.collecting = None
        # what is due, then every flow with unexported changes: waited for, not dropped, so that
        # a restart loses nothing a sink could still take
        await self._deliver(self.process.tick(self.clock()))
        await self._deliver(self.process.drain())
        for sink in self.sinks:
            await sink.close()
        await self._close_servers()

    # ------------------------------------------------------------ API backend
    def flow_records(self, flt: FlowFilter, limit: int | None) -> list[ExportedFlow]:
        return self.process.snapshot(flt, limit)

    def select_flows(self, flt: FlowFilter, limit: int) -> list[Any]:
        return self.process.select(flt, limit)

    def render_flows(self, flows: Sequence[Any]) -> list[ExportedFlow]:
        return self.process.render(flows)

    def exporters_connected(self) -> int:
        peers = getattr(self.collecting, "peers", None)
        if peers is not None and self.config.transport != "udp":
            try:
                return len(peers)
            except TypeError:
                pass
        horizon = self.clock() - self.config.inactive_timeout
        return sum(1 for t in self.exporter_seen.values() if t >= horizon)

    def collecting_stats(self) -> dict[str, Any]:
        st = getattr(self.collecting, "stats", None)
        if st is None:
            return {}
        if hasattr(st, "as_dict"):
            return dict(st.as_dict())
        return dict(st) if isinstance(st, dict) else {}

    def record_metrics(self) -> dict[str, Any]:
        """antctl-style record metrics, plus the details behind them."""
        st = self.process.stats
        coll = self.collecting_stats()
        return {
            "numRecordsExported": st.records_exported,
            "numRecordsReceived": st.records_received,
            "numFlows": len(self.process),
            "numConnToCollector": self.exporters_connected(),
            "numRecordsDropped": st.dropped_flow_cap + st.dropped_flow_bytes + st.dropped_invalid + st.dropped_stale,
            "aggregation": st.as_dict(),
            "receivedByExporter": dict(self.received_by_exporter),
            "messagesReceived": self.messages,
            "collectingProcess": coll,
            "sinks": {s.name: s.stats() for s in self.sinks},
            "api": self.api_server.stats.as_dict() if self.api_server is not None else {},
            "exportersOverLimit": self.exporters_over_limit,
        }

    def metrics_snapshot(self) -> dict[str, Any]:
        coll = self.collecting_stats()
        return {
            "aggregation": self.process.stats.as_dict(),
            "flows": len(self.process),
            "max_flows": self.process.max_flows,
            "received_by_exporter": dict(self.received_by_exporter),
            "exporters_connected": self.exporters_connected(),
            "malformed_messages": int(coll.get("malformed", 0) or 0),
            "collecting": coll,
            "sinks": {s.name: s.stats() for s in self.sinks},
            "api": self.api_server.stats.as_dict() if self.api_server is not None else {},
        }

    def prometheus(self) -> bytes:
        from prometheus_client import generate_latest

        if self._registry is None:
            from .metrics import make_registry

            self._registry = make_registry(self.metrics_snapshot)
        return bytes(generate_latest(self._registry))
