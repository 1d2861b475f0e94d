"""The aggregator's configuration: one YAML file, parsed once, at start, into typed objects.

docs/configuration.md (Aggregator section) is the contract with the operator, which
renders this file into a ConfigMap; this module implements exactly those keys, with the
Antrea design's names and defaults. Every value is checked here, so that the rest of the
aggregator never sees a string where it expects a duration or an address: a bad value
raises :class:`ConfigError` naming the key, the value and what is allowed, and the
aggregator refuses to start. Unknown keys are refused too (a typo such as
``flowExportIntreval`` would otherwise silently keep the default).
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from flowscope import listen
from flowscope.durations import DurationError, parse_duration
from flowscope.ipfix.address import Address, AddressError, parse_address

__all__ = [
    "AggregatorConfig", "TLSFiles", "APIConfig", "APITLSFiles", "CollectingConfig", "IPFIXSinkConfig", "FlowLogSinkConfig", "ClickHouseSinkConfig",
    "SinksConfig", "ConfigError", "load_config", "parse_config", "parse_listen_address",
]

TLS_DIR = "/etc/flowscope/tls"
Transport = Literal["tls", "tcp", "udp"]
DEFAULT_QUEUE_SIZE = 10_000
#: The ClickHouse sink's default: it holds up to this many rows for the store, and inserts
#: them in blocks of up to half as many (100,000: aggregator/clickhouse_sink.py CHUNK_ROWS).
#: ClickHouse pays about 0.1 s of CPU per INSERT whatever its size (one part for the raw
#: table and for each of the 13 roll-up tables its views fill), so blocks of 5,000 rows (half
#: of the other sinks' 10,000) held the sink to 12,000-22,000 rows/s; 100,000-row blocks take
#: 115,000-150,000 rows/s (docs/clickhouse.md, "Insert size"). The memory it costs: an
#: exported record held is a C Record of about 460 bytes (the twin's dicts about 2.2 KB).
DEFAULT_CLICKHOUSE_QUEUE_SIZE = 200_000
MAX_QUEUE_SIZE = 10_000_000
MAX_DURATION = 7 * 24 * 3600.0  # a week: longer timeouts and intervals are typos
MAX_BACKUPS = 1000
MAX_LOG_SIZE_MB = 1 << 20  # a terabyte


class ConfigError(ValueError):
    """A configuration value the aggregator cannot run with; the message names key, value and fix."""


@dataclass(frozen=True, slots=True)
class TLSFiles:
    ca_file: str = f"{TLS_DIR}/ca.crt"
    cert_file: str = f"{TLS_DIR}/tls.crt"
    key_file: str = f"{TLS_DIR}/tls.key"


@dataclass(frozen=True, slots=True)
class APITLSFiles:
    cert_file: str
    key_file: str
    ca_file: str | None = None  # set: clients must present a certificate it signed


@dataclass(frozen=True, slots=True)
class APIConfig:
    """Who may read the HTTP API (see flowscope.webauth): a bearer token, HTTPS with client
    certificates, or ``insecure`` said out loud; the API on loopback may be open."""

    token_file: str | None = None
    tls: APITLSFiles | None = None
    insecure: bool = False
    max_clients: int = 64  # concurrent requests; more are answered 503 at once
    write_timeout: float = 30.0  # a client that reads nothing for this long is dropped


@dataclass(frozen=True, slots=True)
class CollectingConfig:
    """Limits of the IPFIX collecting process: what one peer can make the aggregator hold."""

    max_sessions: int = 1024
    max_sessions_per_source: int = 64
    max_pending_handshakes: int = 128
    handshake_timeout: float = 10.0
    stream_idle_timeout: float | None = 300.0  # None: never
    udp_session_timeout: float = 1800.0
    template_lifetime: float = 1800.0
    max_templates: int = 4096
    max_template_fields: int = 1024
    max_domains: int = 1024
    template_compile_rate: int = 2048  # new template fields compiled per second, all peers together


@dataclass(frozen=True, slots=True)
class IPFIXSinkConfig:
    enabled: bool = False
    queue_size: int = DEFAULT_QUEUE_SIZE


@dataclass(frozen=True, slots=True)
class FlowLogSinkConfig:
    enabled: bool = False
    path: str = "/var/log/flowscope/flows.jsonl"
    max_size_mb: float = 100.0
    max_backups: int = 3
    queue_size: int = DEFAULT_QUEUE_SIZE


@dataclass(frozen=True, slots=True)
class ClickHouseSinkConfig:
    enabled: bool = False
    address: str = "tcp://clickhouse:9000"
    database: str = "flowscope"
    table: str = "flows"
    commit_interval: float = 8.0
    queue_size: int = DEFAULT_CLICKHOUSE_QUEUE_SIZE


@dataclass(frozen=True, slots=True)
class SinksConfig:
    ipfix: IPFIXSinkConfig = field(default_factory=IPFIXSinkConfig)
    flow_log: FlowLogSinkConfig = field(default_factory=FlowLogSinkConfig)
    clickhouse: ClickHouseSinkConfig = field(default_factory=ClickHouseSinkConfig)


@dataclass(frozen=True, slots=True)
class AggregatorConfig:
    external_collector: Address | None = None  # None: storage sinks only
    export_interval: float = 60.0
    transport: Transport = "tls"
    aggregator_address: str = "flow-aggregator.flow-aggregator.svc"
    listen_port: int = 4739
    listen_host: str = "::"  # dual stack: IPv4 and IPv6 agents on one port (IPv4 only where IPv6 is off)
    tls: TLSFiles = field(default_factory=TLSFiles)
    correlation_timeout: float = 30.0
    inactive_timeout: float = 90.0
    max_flows: int = 500_000
    max_flows_mb: int = 1024  # estimated memory of the flows held (their strings included)
    api_address: tuple[str, int] | None = ("127.0.0.1", 10348)  # None: no HTTP API
    metrics_address: tuple[str, int] | None = ("0.0.0.0", 10349)  # /metrics and /healthz only; None: off
    api: APIConfig = field(default_factory=APIConfig)
    collecting: CollectingConfig = field(default_factory=CollectingConfig)
    sinks: SinksConfig = field(default_factory=SinksConfig)


_TOP_KEYS = (
    "externalFlowCollectorAddr", "flowExportInterval", "aggregatorTransportProtocol",
    "flowAggregatorAddress", "listenPort", "listenAddress", "tls", "correlationTimeout", "inactiveFlowTimeout",
    "maxFlows", "maxFlowsMB", "apiAddress", "metricsAddress", "api", "collectingProcess", "sinks",
)
_API_KEYS = ("tokenFile", "tls", "insecure", "maxClients", "writeTimeout")
_API_TLS_KEYS = ("certFile", "keyFile", "caFile")
_COLLECTING_KEYS = (
    "maxSessions", "maxSessionsPerSource", "maxPendingHandshakes", "handshakeTimeout", "streamIdleTimeout",
    "udpSessionTimeout", "templateLifetime", "maxTemplates", "maxTemplateFields", "maxObservationDomains",
    "templateCompileRate",
)
_TLS_KEYS = ("caFile", "certFile", "keyFile")
_SINK_KEYS = {
    "ipfix": ("enabled", "queueSize"),
    "flowLog": ("enabled", "path", "maxSizeMB", "maxBackups", "queueSize"),
    "clickhouse": ("enabled", "address", "database", "table", "commitInterval", "queueSize"),
}


def _check_keys(section: Mapping[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f'; did you mean "{prefix}{close[0]}"?' if close else f"; allowed keys: {', '.join(allowed)}"
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")


def _section(raw: Mapping[str, Any], key: str, name: str) -> Mapping[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: {value!r} must be a mapping of keys to values")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: {value!r} must be true or false")
    return value


def _int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: {value!r} must be a whole number")
    if value < lo or (hi is not None and value > hi):
        allowed = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"{name}: {value} is out of range; it must be {allowed}")
    return value


def _str(value: Any, name: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        raise ConfigError(f"{name}: {value!r} must be a non-empty string")
    return value.strip()


def _duration(value: Any, name: str, minimum: float, maximum: float = MAX_DURATION) -> float:
    try:
        seconds = parse_duration(value, field=name)
    except DurationError as exc:
        raise ConfigError(str(exc)) from None
    from flowscope.durations import format_duration

    if seconds < minimum:
        raise ConfigError(f"{name}: {value!r} is below the {format_duration(minimum)} minimum")
    if seconds > maximum:
        raise ConfigError(f"{name}: {value!r} is above the {format_duration(maximum)} maximum")
    return seconds


def _number(value: Any, name: str, lo: float, hi: float, unit: str) -> float:
    """A finite number (YAML .nan and .inf are refused) from ``lo`` (exclusive) to ``hi``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        raise ConfigError(f"{name}: {value!r} must be a finite number of {unit}")
    if not lo < value <= hi:
        raise ConfigError(f"{name}: {value!r} is out of range; it must be above {lo:g} and at most {hi:g} {unit}")
    return float(value)


def parse_listen_address(text: Any, name: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (IPv6 host in brackets) for a listening socket; empty disables it."""
    try:
        return listen.parse_listen_address(text, name, example_port=10348)
    except listen.ListenAddressError as exc:
        raise ConfigError(str(exc)) from None


def parse_config(raw: Mapping[str, Any] | None) -> AggregatorConfig:
    """Check every key of the aggregator YAML and build the typed configuration."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the configuration must be a YAML mapping of keys to values, not {type(raw).__name__}")
    _check_keys(raw, _TOP_KEYS, "")
    d = AggregatorConfig()

    collector: Address | None = None
    addr = raw.get("externalFlowCollectorAddr", "")
    if addr is None:
        addr = ""
    if not isinstance(addr, str):
        raise ConfigError(f"externalFlowCollectorAddr: {addr!r} must be a string like \"10.0.0.5:4739:tcp\"")
    if addr.strip():
        try:
            collector = parse_address(addr, default_protocol="tcp", field="externalFlowCollectorAddr")
        except AddressError as exc:
            raise ConfigError(str(exc)) from None
        if collector.protocol == "tls":
            raise ConfigError(
                f"externalFlowCollectorAddr: protocol tls in {addr!r} is not supported for the external "
                "collector; use tcp or udp (the design's <IP>:<port>[:<proto>] with proto tcp or udp)"
            )

    export_interval = d.export_interval
    if "flowExportInterval" in raw:
        export_interval = _duration(raw["flowExportInterval"], "flowExportInterval", 1.0)

    transport: Transport = d.transport
    if "aggregatorTransportProtocol" in raw:
        t = raw["aggregatorTransportProtocol"]
        if not isinstance(t, str) or t.strip().lower() not in ("tls", "tcp", "udp", "grpc"):
            raise ConfigError(
                f"aggregatorTransportProtocol: {t!r} is not one of tls, tcp, udp, grpc "
                "(it must match the protocol of the agents' flowCollectorAddr; grpc is Antrea's default "
                "since v2.4, always over mutual TLS)"
            )
        transport = t.strip().lower()  # type: ignore[assignment]

    agg_address = d.aggregator_address
    if "flowAggregatorAddress" in raw:
        agg_address = _str(raw["flowAggregatorAddress"], "flowAggregatorAddress")

    listen_port = d.listen_port
    if "listenPort" in raw:
        listen_port = _int(raw["listenPort"], "listenPort", 0, 65535)

    listen_host = d.listen_host
    if "listenAddress" in raw:
        host = _str(raw["listenAddress"], "listenAddress").strip("[]")
        try:
            listen_host = str(ipaddress.ip_address(host))
        except ValueError:
            raise ConfigError(
                f"listenAddress: {raw['listenAddress']!r} must be an IP address to listen on, "
                'e.g. "::" (IPv4 and IPv6, the default) or "0.0.0.0" (IPv4 only)'
            ) from None

    tls_raw = _section(raw, "tls", "tls")
    _check_keys(tls_raw, _TLS_KEYS, "tls.")
    tls = TLSFiles(
        ca_file=_str(tls_raw.get("caFile", d.tls.ca_file), "tls.caFile"),
        cert_file=_str(tls_raw.get("certFile", d.tls.cert_file), "tls.certFile"),
        key_file=_str(tls_raw.get("keyFile", d.tls.key_file), "tls.keyFile"),
    )

    correlation = d.correlation_timeout
    if "correlationTimeout" in raw:
        correlation = _duration(raw["correlationTimeout"], "correlationTimeout", 1.0)
    inactive = d.inactive_timeout
    if "inactiveFlowTimeout" in raw:
        inactive = _duration(raw["inactiveFlowTimeout"], "inactiveFlowTimeout", 1.0)
    max_flows = d.max_flows
    if "maxFlows" in raw:
        max_flows = _int(raw["maxFlows"], "maxFlows", 1, 100_000_000)
    max_flows_mb = d.max_flows_mb
    if "maxFlowsMB" in raw:
        max_flows_mb = _int(raw["maxFlowsMB"], "maxFlowsMB", 1, 1 << 20)

    api_address = d.api_address
    if "apiAddress" in raw:
        api_address = parse_listen_address(raw["apiAddress"], "apiAddress")
    metrics_address = d.metrics_address
    if "metricsAddress" in raw:
        metrics_address = parse_listen_address(raw["metricsAddress"], "metricsAddress")
    if (api_address is not None and metrics_address is not None and api_address[1] != 0
            and api_address[1] == metrics_address[1]):
        raise ConfigError(
            f"metricsAddress: port {metrics_address[1]} is apiAddress's port too; give them different ports "
            '(or "" to serve no separate metrics endpoint)'
        )
    api = _parse_api(_section(raw, "api", "api"), api_address)
    collecting = _parse_collecting(_section(raw, "collectingProcess", "collectingProcess"))

    sinks = _parse_sinks(_section(raw, "sinks", "sinks"), collector, addr)
    return AggregatorConfig(
        external_collector=collector, export_interval=export_interval, transport=transport,
        aggregator_address=agg_address, listen_port=listen_port, listen_host=listen_host, tls=tls,
        correlation_timeout=correlation, inactive_timeout=inactive, max_flows=max_flows, max_flows_mb=max_flows_mb,
        api_address=api_address, metrics_address=metrics_address, api=api, collecting=collecting, sinks=sinks,
    )


def _parse_api(raw: Mapping[str, Any], address: tuple[str, int] | None) -> APIConfig:
    from flowscope.webauth import is_loopback

    _check_keys(raw, _API_KEYS, "api.")
    d = APIConfig()
    token_file = None
    if raw.get("tokenFile") not in (None, ""):
        token_file = _str(raw["tokenFile"], "api.tokenFile")
    tls = None
    tls_raw = _section(raw, "tls", "api.tls")
    _check_keys(tls_raw, _API_TLS_KEYS, "api.tls.")
    if tls_raw:
        missing = [k for k in ("certFile", "keyFile") if not tls_raw.get(k)]
        if missing:
            raise ConfigError(f"api.tls.{missing[0]}: required when api.tls is set (HTTPS needs a certificate and its key)")
        ca = tls_raw.get("caFile")
        tls = APITLSFiles(
            cert_file=_str(tls_raw["certFile"], "api.tls.certFile"),
            key_file=_str(tls_raw["keyFile"], "api.tls.keyFile"),
            ca_file=_str(ca, "api.tls.caFile") if ca not in (None, "") else None,
        )
    insecure = _bool(raw.get("insecure", False), "api.insecure")
    max_clients = _int(raw.get("maxClients", d.max_clients), "api.maxClients", 1, 10_000)
    write_timeout = d.write_timeout
    if "writeTimeout" in raw:
        write_timeout = _duration(raw["writeTimeout"], "api.writeTimeout", 0.1, 3600.0)
    if address is not None and not is_loopback(address[0]) and token_file is None and not (
            tls is not None and tls.ca_file) and not insecure:
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        raise ConfigError(
            f"apiAddress: {host}:{address[1]} is reachable from other hosts, but the API serves every flow and "
            "no client authentication is configured; set api.tokenFile (a bearer token) or api.tls with a caFile "
            "(client certificates), listen on 127.0.0.1, or set api.insecure: true to serve it open"
        )
    return APIConfig(token_file=token_file, tls=tls, insecure=insecure, max_clients=max_clients,
                     write_timeout=write_timeout)


def _parse_collecting(raw: Mapping[str, Any]) -> CollectingConfig:
    _check_keys(raw, _COLLECTING_KEYS, "collectingProcess.")
    d = CollectingConfig()
    p = "collectingProcess."

    def count(key: str, default: int, lo: int, hi: int) -> int:
        return _int(raw.get(key, default), p + key, lo, hi)

    def duration(key: str, default: float, lo: float) -> float:
        return _duration(raw[key], p + key, lo) if key in raw else default

    idle = d.stream_idle_timeout
    if "streamIdleTimeout" in raw:
        idle = _duration(raw["streamIdleTimeout"], p + "streamIdleTimeout", 0.0) or None  # "0": never
    max_sessions = count("maxSessions", d.max_sessions, 1, 100_000)
    return CollectingConfig(
        max_sessions=max_sessions,
        max_sessions_per_source=count("maxSessionsPerSource", min(d.max_sessions_per_source, max_sessions), 1,
                                      max_sessions),
        max_pending_handshakes=count("maxPendingHandshakes", d.max_pending_handshakes, 1, 100_000),
        handshake_timeout=duration("handshakeTimeout", d.handshake_timeout, 0.1),
        stream_idle_timeout=idle,
        udp_session_timeout=duration("udpSessionTimeout", d.udp_session_timeout, 1.0),
        template_lifetime=duration("templateLifetime", d.template_lifetime, 1.0),
        max_templates=count("maxTemplates", d.max_templates, 1, 65536),
        max_template_fields=count("maxTemplateFields", d.max_template_fields, 1, 16383),
        max_domains=count("maxObservationDomains", d.max_domains, 1, 1_000_000),
        template_compile_rate=count("templateCompileRate", d.template_compile_rate, 1, 1_000_000),
    )


def _parse_sinks(raw: Mapping[str, Any], collector: Address | None, addr: str) -> SinksConfig:
    _check_keys(raw, tuple(_SINK_KEYS), "sinks.")
    sections = {}
    for name, keys in _SINK_KEYS.items():
        sec = _section(raw, name, f"sinks.{name}")
        _check_keys(sec, keys, f"sinks.{name}.")
        sections[name] = sec

    def queue(sec: Mapping[str, Any], name: str, default: int = DEFAULT_QUEUE_SIZE) -> int:
        return _int(sec.get("queueSize", default), f"sinks.{name}.queueSize", 1, MAX_QUEUE_SIZE)

    ip = sections["ipfix"]
    ipfix_enabled = _bool(ip.get("enabled", collector is not None), "sinks.ipfix.enabled")
    if ipfix_enabled and collector is None:
        raise ConfigError(
            f"sinks.ipfix.enabled: true needs externalFlowCollectorAddr, which is {addr!r}; "
            "set the collector address or disable the IPFIX sink"
        )
    ipfix = IPFIXSinkConfig(enabled=ipfix_enabled, queue_size=queue(ip, "ipfix"))

    fl = sections["flowLog"]
    fd = FlowLogSinkConfig()
    size = _number(fl.get("maxSizeMB", fd.max_size_mb), "sinks.flowLog.maxSizeMB", 0, MAX_LOG_SIZE_MB, "megabytes")
    flow_log = FlowLogSinkConfig(
        enabled=_bool(fl.get("enabled", False), "sinks.flowLog.enabled"),
        path=_str(fl.get("path", fd.path), "sinks.flowLog.path"),
        max_size_mb=size,
        max_backups=_int(fl.get("maxBackups", fd.max_backups), "sinks.flowLog.maxBackups", 0, MAX_BACKUPS),
        queue_size=queue(fl, "flowLog"),
    )

    ch = sections["clickhouse"]
    cd = ClickHouseSinkConfig()
    commit = cd.commit_interval
    if "commitInterval" in ch:
        commit = _duration(ch["commitInterval"], "sinks.clickhouse.commitInterval", 0.001, 3600.0)
    clickhouse = ClickHouseSinkConfig(
        enabled=_bool(ch.get("enabled", False), "sinks.clickhouse.enabled"),
        address=_str(ch.get("address", cd.address), "sinks.clickhouse.address"),
        database=_str(ch.get("database", cd.database), "sinks.clickhouse.database"),
        table=_str(ch.get("table", cd.table), "sinks.clickhouse.table"),
        commit_interval=commit,
        queue_size=queue(ch, "clickhouse", cd.queue_size),
    )
    return SinksConfig(ipfix=ipfix, flow_log=flow_log, clickhouse=clickhouse)


def load_config(path: str) -> AggregatorConfig:
    """Read and check the YAML file; every problem becomes a :class:`ConfigError`."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {path!r} is not valid YAML: {exc}") from None
    return parse_config(raw)
