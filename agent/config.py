"""The agent's configuration: one YAML file, parsed once, at start, into typed objects.

docs/configuration.md (Agent section) is the contract with the operator, which renders
this file into a ConfigMap; this module implements exactly those keys. Every value is
checked here, so that the rest of the agent never sees a string where it expects a
duration or an address: a bad value raises :class:`ConfigError` naming the key, the
value and what is allowed, and the agent refuses to start.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from flowscope.durations import DurationError, parse_duration
from flowscope.ipfix import antrea
from flowscope.ipfix.address import Address, AddressError, parse_address
from flowscope.listen import ListenAddressError, parse_listen_address

__all__ = [
    "AgentConfig", "TLSFiles", "MetadataConfig", "ConfigError", "load_config", "parse_config", "check_files",
    "EventsConfig", "DestinationConfig", "DestinationFilter",
]

DEFAULT_COLLECTOR = "flow-aggregator.flow-aggregator.svc:4739:tls"
GRPC_PORT = 14739  # Antrea's Flow Aggregator gRPC port
TLS_DIR = "/etc/flowscope/tls"
MetadataKind = Literal["kubernetes", "static", "none"]
MAX_DURATION = 7 * 24 * 3600.0  # a week: longer timeouts and intervals are typos


class ConfigError(ValueError):
    """A configuration value the agent cannot run with; the message names key, value and fix."""


@dataclass(frozen=True, slots=True)
class TLSFiles:
    ca_file: str = f"{TLS_DIR}/ca.crt"
    cert_file: str = f"{TLS_DIR}/tls.crt"
    key_file: str = f"{TLS_DIR}/tls.key"
    server_name: str | None = None  # None: the host of flowCollectorAddr


@dataclass(frozen=True, slots=True)
class MetadataConfig:
    source: MetadataKind = "none"
    static_file: str | None = None
    # Watch every Pod of the cluster (slimmed to IP, name, namespace, labels, ports) so that
    # policy peers on other nodes can be matched by label; False keeps only this node's Pods.
    watch_remote_pods: bool = True


@dataclass(frozen=True, slots=True)
class EventsConfig:
    """``conntrackEvents``: the DESTROY event subscription beside the dump."""

    enabled: bool = True
    buffer_size: int = 32 << 20  # the event socket's receive buffer, bytes
    # true: a TCP connection in TIME_WAIT is exported by its DESTROY (up to
    # nf_conntrack_tcp_timeout_time_wait later), not at once by the dump that saw it closing
    wait_for_destroy: bool = False


@dataclass(frozen=True, slots=True)
class DestinationFilter:
    protocols: frozenset[int] = frozenset()
    namespaces: frozenset[str] = frozenset()
    flow_types: frozenset[int] = frozenset()
    denied_only: bool = False


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    """One entry of ``destinations``: a collector beside flowCollectorAddr."""

    name: str
    address: Address
    active_timeout: float
    idle_timeout: float
    queue_size: int
    filter: DestinationFilter = field(default_factory=DestinationFilter)

    @property
    def tls_server_name(self) -> str:
        return self.address.host


@dataclass(frozen=True, slots=True)
class AgentConfig:
    flow_collector: Address = field(default_factory=lambda: parse_address(DEFAULT_COLLECTOR))
    poll_interval: float = 5.0
    active_timeout: float = 60.0
    idle_timeout: float = 15.0
    node_name: str = ""
    tls: TLSFiles = field(default_factory=TLSFiles)
    conntrack_zones: tuple[int, ...] = ()  # empty: every zone
    max_connections: int = 200_000
    metrics_address: tuple[str, int] | None = ("0.0.0.0", 9390)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    export_queue_size: int = 50_000
    export_host_flows: bool = False
    # recordContents.podLabels: add sourcePodLabels/destinationPodLabels (JSON), as Antrea can
    pod_labels: bool = False
    # flowCollectorAddr HOST:PORT:grpc: Antrea's Flow messages over gRPC (mutual TLS with the
    # tls files; flow_collector then holds the host and port, its protocol says tls)
    grpc: bool = False
    conntrack_events: EventsConfig = field(default_factory=EventsConfig)
    destinations: tuple[DestinationConfig, ...] = ()

    @property
    def tls_server_name(self) -> str:
        return self.tls.server_name or self.flow_collector.host


_TOP_KEYS = {
    "flowCollectorAddr", "flowPollInterval", "activeFlowExportTimeout", "idleFlowExportTimeout",
    "nodeName", "tls", "conntrackZones", "maxConnections", "metricsAddress", "metadata",
    "exportQueueSize", "exportHostFlows", "recordContents", "conntrackEvents", "destinations",
}
_RECORD_KEYS = {"podLabels"}
_TLS_KEYS = {"caFile", "certFile", "keyFile", "serverName"}
_META_KEYS = {"source", "staticFile", "watchRemotePods"}


def _unknown(section: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    extra = sorted(str(k) for k in section if k not in allowed)
    if extra:
        raise ConfigError(
            f"{prefix}{extra[0]}: unknown key; allowed keys are {', '.join(sorted(allowed))}"
        )


def _duration(raw: Mapping[str, Any], key: str, default: float, minimum: float) -> float:
    if raw.get(key) is None:
        return default
    value = raw[key]
    try:
        seconds = parse_duration(value, field=key)
    except DurationError as exc:
        raise ConfigError(str(exc)) from None
    if seconds < minimum:
        raise ConfigError(f"{key}: {value!r} is below the {minimum:g}s minimum")
    if seconds > MAX_DURATION:
        raise ConfigError(f"{key}: {value!r} is above the 168h (one week) maximum")
    return seconds


def _mapping(raw: Mapping[str, Any], key: str, what: str) -> Mapping[str, Any]:
    """A sub-section: absent or null is empty; anything but a mapping (a list, false, 0) is refused."""
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: {value!r} must be a mapping with {what}")
    return value


def _string(raw: Mapping[str, Any], key: str, default: str, prefix: str = "") -> str:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{prefix}{key}: {value!r} must be a non-empty string")
    return value.strip()


def _int(raw: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{key}: {value!r} must be a whole number from {lo} to {hi}")
    return value


def _listen_address(value: Any) -> tuple[str, int] | None:
    if value is None:
        return ("0.0.0.0", 9390)
    try:
        return parse_listen_address(value, "metricsAddress", example_port=9390)
    except ListenAddressError as exc:
        raise ConfigError(str(exc)) from None


def _default_node_name(env: Mapping[str, str]) -> str:
    return env.get("NODE_NAME") or socket.gethostname()


def parse_config(raw: Any, *, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Turn the YAML document (already loaded) into an :class:`AgentConfig`.

    ``env`` stands for the process environment (NODE_NAME, KUBERNETES_SERVICE_HOST).
    """
    env = os.environ if env is None else env
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the agent configuration must be a YAML mapping of keys, not {type(raw).__name__}")
    _unknown(raw, _TOP_KEYS, "")

    addr_text = raw.get("flowCollectorAddr")
    grpc = isinstance(addr_text, str) and addr_text.strip().lower().endswith(":grpc")
    if grpc:  # HOST[:PORT]:grpc: the host and port are read as for tls
        addr_text = addr_text.strip()[: -len(":grpc")]
    try:
        collector = parse_address(
            DEFAULT_COLLECTOR if addr_text in (None, "") else addr_text,
            default_protocol="tls",
            default_port=GRPC_PORT if grpc else 4739,
            field="flowCollectorAddr",
        )
    except AddressError as exc:
        raise ConfigError(str(exc)) from None

    poll = _duration(raw, "flowPollInterval", 5.0, 1.0)
    active = _duration(raw, "activeFlowExportTimeout", 60.0, 1.0)
    idle = _duration(raw, "idleFlowExportTimeout", 15.0, 1.0)

    node_name = _string(raw, "nodeName", "") or _default_node_name(env)

    tls_raw = _mapping(raw, "tls", "caFile, certFile, keyFile, serverName")
    _unknown(tls_raw, _TLS_KEYS, "tls.")
    tls = TLSFiles(
        ca_file=_string(tls_raw, "caFile", f"{TLS_DIR}/ca.crt", "tls."),
        cert_file=_string(tls_raw, "certFile", f"{TLS_DIR}/tls.crt", "tls."),
        key_file=_string(tls_raw, "keyFile", f"{TLS_DIR}/tls.key", "tls."),
        server_name=_string(tls_raw, "serverName", "", "tls.") if tls_raw.get("serverName") is not None else None,
    )

    zones_raw = raw.get("conntrackZones")
    if zones_raw is None:
        zones_raw = []
    if not isinstance(zones_raw, list):
        raise ConfigError(f"conntrackZones: {zones_raw!r} must be a list of zone numbers (0-65535); [] reads all zones")
    for z in zones_raw:
        if isinstance(z, bool) or not isinstance(z, int) or not 0 <= z <= 65535:
            raise ConfigError(f"conntrackZones: {z!r} is not a zone number; zones are whole numbers from 0 to 65535")
    zones = tuple(sorted(set(zones_raw)))

    max_conns = _int(raw, "maxConnections", 200_000, 1, 50_000_000)
    queue_size = _int(raw, "exportQueueSize", 50_000, 1, 50_000_000)
    metrics = _listen_address(raw.get("metricsAddress"))
    host_flows = raw.get("exportHostFlows", False)
    if not isinstance(host_flows, bool):
        raise ConfigError(f"exportHostFlows: {host_flows!r} must be true or false")

    contents = _mapping(raw, "recordContents", "podLabels")
    _unknown(contents, _RECORD_KEYS, "recordContents.")
    pod_labels = contents.get("podLabels", False)
    if not isinstance(pod_labels, bool):
        raise ConfigError(f"recordContents.podLabels: {pod_labels!r} must be true or false")

    meta_raw = _mapping(raw, "metadata", "source, staticFile and watchRemotePods")
    _unknown(meta_raw, _META_KEYS, "metadata.")
    default_source: MetadataKind = "kubernetes" if env.get("KUBERNETES_SERVICE_HOST") else "none"
    source = meta_raw.get("source")
    if source is None:
        source = default_source
    if source not in ("kubernetes", "static", "none"):
        raise ConfigError(f"metadata.source: {source!r} is not one of kubernetes, static, none")
    static_file = meta_raw.get("staticFile")
    if source == "static":
        if not isinstance(static_file, str) or not static_file.strip():
            raise ConfigError(
                f"metadata.staticFile: {static_file!r} must name the inventory YAML file when metadata.source is static"
            )
    elif static_file is not None and not isinstance(static_file, str):
        raise ConfigError(f"metadata.staticFile: {static_file!r} must be a file path")
    watch_remote = meta_raw.get("watchRemotePods", True)
    if not isinstance(watch_remote, bool):
        raise ConfigError(f"metadata.watchRemotePods: {watch_remote!r} must be true or false")

    return AgentConfig(
        flow_collector=collector,
        poll_interval=poll,
        active_timeout=active,
        idle_timeout=idle,
        node_name=node_name,
        tls=tls,
        conntrack_zones=zones,
        max_connections=max_conns,
        metrics_address=metrics,
        metadata=MetadataConfig(source=source, static_file=static_file, watch_remote_pods=watch_remote),
        export_queue_size=queue_size,
        export_host_flows=host_flows,
        pod_labels=pod_labels,
        grpc=grpc,
        conntrack_events=_events_config(raw.get("conntrackEvents")),
        destinations=_destinations_config(raw.get("destinations"), active, idle, queue_size),
    )


# --- conntrackEvents and destinations (issue 13): parsed in their own functions ---------

_EVENTS_KEYS = {"enabled", "bufferSize", "waitForDestroy"}
_DEST_KEYS = {"name", "address", "activeFlowExportTimeout", "idleFlowExportTimeout", "queueSize", "filter"}
_FILTER_KEYS = {"protocols", "namespaces", "flowTypes", "deniedOnly"}
# Names as a FlowExporterConfig writes them (the CRD's enums), numbers from the one vocabulary.
PROTOCOL_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132, "ICMP": 1, "ICMPV6": 58}
FLOW_TYPE_NUMBERS = {
    "Unknown": antrea.FLOW_TYPE_UNKNOWN, "IntraNode": antrea.FLOW_TYPE_INTRA_NODE,
    "InterNode": antrea.FLOW_TYPE_INTER_NODE, "ToExternal": antrea.FLOW_TYPE_TO_EXTERNAL,
    "FromExternal": antrea.FLOW_TYPE_FROM_EXTERNAL,
}


def _events_config(raw: Any) -> EventsConfig:
    if raw is None:
        return EventsConfig()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"conntrackEvents: {raw!r} must be a mapping with enabled and bufferSize")
    _unknown(raw, _EVENTS_KEYS, "conntrackEvents.")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"conntrackEvents.enabled: {enabled!r} must be true or false")
    size = raw.get("bufferSize", 32 << 20)
    lo, hi = 1 << 16, 1 << 30
    if isinstance(size, bool) or not isinstance(size, int) or not lo <= size <= hi:
        raise ConfigError(
            f"conntrackEvents.bufferSize: {size!r} must be a number of bytes from {lo} to {hi} "
            "(the kernel charges about 1.3 KB an event: the default 33554432 holds a burst of about 25000)"
        )
    wait = raw.get("waitForDestroy", False)
    if not isinstance(wait, bool):
        raise ConfigError(f"conntrackEvents.waitForDestroy: {wait!r} must be true or false")
    return EventsConfig(enabled=enabled, buffer_size=size, wait_for_destroy=wait)


def _names(raw: Any, key: str, table: Mapping[str, int], lo: int, hi: int) -> frozenset[int]:
    if raw is None:
        return frozenset()
    if not isinstance(raw, list):
        raise ConfigError(f"{key}: {raw!r} must be a list of {', '.join(table)} (or numbers)")
    out = set()
    folded = {k.lower(): v for k, v in table.items()}
    for item in raw:
        if isinstance(item, str) and item.lower() in folded:
            out.add(folded[item.lower()])
        elif isinstance(item, int) and not isinstance(item, bool) and lo <= item <= hi:
            out.add(item)
        else:
            raise ConfigError(f"{key}: {item!r} is not one of {', '.join(table)} nor a number from {lo} to {hi}")
    return frozenset(out)


def _destination_filter(raw: Any, prefix: str) -> DestinationFilter:
    if raw is None:
        return DestinationFilter()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: {raw!r} must be a mapping with protocols, namespaces, flowTypes, deniedOnly")
    _unknown(raw, _FILTER_KEYS, f"{prefix}.")
    namespaces = raw.get("namespaces")
    if namespaces is not None and (
        not isinstance(namespaces, list) or not all(isinstance(n, str) and n.strip() for n in namespaces)
    ):
        raise ConfigError(f"{prefix}.namespaces: {namespaces!r} must be a list of Kubernetes namespace names")
    denied = raw.get("deniedOnly", False)
    if not isinstance(denied, bool):
        raise ConfigError(f"{prefix}.deniedOnly: {denied!r} must be true or false")
    return DestinationFilter(
        protocols=_names(raw.get("protocols"), f"{prefix}.protocols", PROTOCOL_NUMBERS, 0, 255),
        namespaces=frozenset(n.strip() for n in namespaces or ()),
        flow_types=_names(raw.get("flowTypes"), f"{prefix}.flowTypes", FLOW_TYPE_NUMBERS, 0, 4),
        denied_only=denied,
    )


def _destinations_config(raw: Any, active: float, idle: float, queue_size: int) -> tuple[DestinationConfig, ...]:
    """``destinations``: collectors beside flowCollectorAddr, each with its own timeouts
    (default: the top-level ones), backlog and filter."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(
            f"destinations: {raw!r} must be a list of mappings with name, address and optionally "
            "activeFlowExportTimeout, idleFlowExportTimeout, queueSize, filter"
        )
    out: list[DestinationConfig] = []
    seen: set[str] = {"main"}
    for i, item in enumerate(raw):
        prefix = f"destinations[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{prefix}: {item!r} must be a mapping with name and address")
        _unknown(item, _DEST_KEYS, f"{prefix}.")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{prefix}.name: {name!r} must be a non-empty string (it labels the metrics)")
        name = name.strip()
        if name in seen:
            raise ConfigError(f"{prefix}.name: {name!r} is used twice (\"main\" is flowCollectorAddr's)")
        seen.add(name)
        addr_text = item.get("address")
        if not isinstance(addr_text, str) or not addr_text.strip():
            raise ConfigError(f"{prefix}.address: {addr_text!r} must be <HOST>:[<PORT>][:<PROTO>], e.g. 10.0.0.9:4739:udp")
        try:
            address = parse_address(addr_text, default_protocol="tls", field=f"{prefix}.address")
        except AddressError as exc:
            raise ConfigError(str(exc)) from None
        try:
            sub_active = _duration(item, "activeFlowExportTimeout", active, 1.0)
            sub_idle = _duration(item, "idleFlowExportTimeout", idle, 1.0)
            sub_queue = _int(item, "queueSize", queue_size, 1, 50_000_000)
        except ConfigError as exc:
            raise ConfigError(f"{prefix}.{exc}") from None
        out.append(DestinationConfig(
            name=name,
            address=address,
            active_timeout=sub_active,
            idle_timeout=sub_idle,
            queue_size=sub_queue,
            filter=_destination_filter(item.get("filter"), f"{prefix}.filter"),
        ))
    return tuple(out)


def check_files(cfg: AgentConfig) -> None:
    """What a real start reads, read now (for ``--check`` and before anything is opened):
    with tls transport the CA, certificate and key must load and match."""
    if cfg.flow_collector.protocol != "tls":
        return
    for key, path in (("tls.caFile", cfg.tls.ca_file), ("tls.certFile", cfg.tls.cert_file),
                      ("tls.keyFile", cfg.tls.key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(
                f"{key}: cannot read {path!r} ({exc.strerror}); flowCollectorAddr {cfg.flow_collector} uses tls, "
                "which needs the CA, certificate and key the operator mounts at /etc/flowscope/tls/"
            ) from None
    from flowscope.ipfix import UsageError
    from flowscope.ipfix.transport import TLSConfig

    try:
        TLSConfig(cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.ca_file).client_context()
    except UsageError as exc:
        raise ConfigError(f"{exc} (keys tls.caFile, tls.certFile, tls.keyFile)") from None


def load_config(path: str, *, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read and parse the YAML file at ``path``; unreadable or invalid YAML is a ConfigError too."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {path!r} is not valid YAML: {exc}") from None
    return parse_config(raw, env=env)
