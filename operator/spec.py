"""The two custom resources, parsed once into typed, validated specs.

The CRD schemas (crds/) reject most bad input at the apiserver, but the operator cannot
rely on that: ``flowscope render`` runs without an apiserver, a CRD may be older than the
operator, and some rules (the 1s minimum of a duration, the address syntax, the
transport agreement between agents and aggregator) are only partly expressible in
OpenAPI. So every spec goes through this module before anything is rendered. Parsing
collects *all* problems of a spec, each naming the field, the bad value and what is
allowed, and raises one ``SpecError``; the reconciler turns that into a ``Ready=False``
condition instead of applying half of a configuration.

Strict: a field this module does not know (``trasnport: tcp``) is a problem too, named with
the closest known field, never silently ignored. ``FIELDS`` is the tree of every known
field; a test checks that the CRD schemas declare exactly these fields, and that every
rule checked here is also in the CRD (OpenAPI or CEL), so ``kubectl apply`` refuses first.

Defaults live here as constants; a test checks that the CRD schemas carry the same ones.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from flowscope.durations import DurationError, parse_duration
from flowscope.ipfix.address import AddressError, parse_address

__all__ = [
    "GROUP", "VERSION", "API_VERSION", "SpecError", "ClickHouseSink", "FlowLogSink", "Certificates",
    "FlowAggregatorSpec", "FlowExporterConfigSpec", "AggregatorRef",
    "parse_flow_aggregator", "parse_flow_exporter_config", "DEFAULTS", "FIELDS", "IssuerRef", "PodOptions",
    "NetworkPolicyOptions", "MAX_NAME", "CollectorOptions", "Endpoint", "parse_endpoint", "GRPC_PORT", "MUTUAL_TLS",
    "TRANSPORTS",
]

GROUP = "flowscope.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# tls, tcp and udp carry IPFIX; grpc is Antrea's Flow messages over gRPC (its agents' default
# since v2.4), always over mutual TLS with the same certificates as tls
Transport = Literal["tls", "tcp", "udp", "grpc"]
TRANSPORTS: tuple[Transport, ...] = ("tls", "tcp", "udp", "grpc")
MUTUAL_TLS: tuple[Transport, ...] = ("tls", "grpc")  # the transports that need the TLS material
GRPC_PORT = 14739  # Antrea's Flow Aggregator gRPC port (the agent's default for :grpc)
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
RECLAIM_POLICIES = ("Retain", "Delete")  # spec.collector.store.chdb.reclaimPolicy, as a PersistentVolume's

# The design's defaults (network-flow-visibility.txt) plus flowscope's own.
DEFAULTS: dict[str, Any] = {
    "transport": "tls",
    "port": 4739,
    "replicas": 1,
    "flowExportInterval": "60s",
    "correlationTimeout": "30s",
    "inactiveFlowTimeout": "90s",
    "externalFlowCollectorAddr": "",
    "maxFlows": 500000,
    "flowPollInterval": "5s",
    "activeFlowExportTimeout": "60s",
    "idleFlowExportTimeout": "15s",
    "maxConnections": 200000,
    "imagePullPolicy": "IfNotPresent",
    "certificates.lifetime": "8760h",
    "certificates.caLifetime": "87600h",
    "certificates.rotationMargin": "720h",
    "flowLog.path": "/var/log/flowscope/flows.jsonl",
    "flowLog.maxSizeMB": 100,
    "flowLog.maxBackups": 3,
    "clickhouse.address": "tcp://clickhouse:9000",
    "clickhouse.database": "flowscope",
    "clickhouse.table": "flows",
    "clickhouse.commitInterval": "8s",
    "aggregator.metricsPort": 10349,
    "agent.metricsPort": 9390,
    "agent.metricsBind": "node",
    "maxUnavailable": 1,
    "collector.port": 4740,
    "collector.ui.port": 8080,
    "collector.retention": "168h,720h,8760h",
    "collector.chdb.size": "10Gi",
}
MAX_NAME = 52  # the longest derived object name (NAME-server-tls, ...) stays a valid DNS label

# Requests sized from benchmarks/agent_memory.py and the aggregator's maxFlows default; a CR's
# spec.resources replaces them as a whole.
DEFAULT_RESOURCES: dict[str, dict[str, dict[str, str]]] = {
    "FlowAggregator": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    "FlowExporterConfig": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
    # chDB runs in the collector's process: its caches and merges live in this limit
    "collector": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
}

# Every field a spec may carry. None: a leaf, or a Kubernetes type passed through as it is
# (affinity, selectors, tolerations, NetworkPolicy peers), which kubernetes-validate and the
# apiserver check on the rendered objects.
_POD_FIELDS: dict[str, Any] = {
    "image": None, "imagePullPolicy": None, "imagePullSecrets": None, "resources": {"requests": None, "limits": None},
    "priorityClassName": None, "podAnnotations": None, "podLabels": None, "affinity": None,
}
FIELDS: dict[str, dict[str, Any]] = {
    "FlowAggregator": {
        **_POD_FIELDS, "replicas": None, "transport": None, "port": None, "flowAggregatorAddress": None,
        "externalFlowCollectorAddr": None, "flowExportInterval": None, "correlationTimeout": None,
        "inactiveFlowTimeout": None, "maxFlows": None,
        "sinks": {
            "ipfix": {"enabled": None},
            "flowLog": {"enabled": None, "path": None, "maxSizeMB": None, "maxBackups": None,
                        "persistentVolumeClaim": {"size": None, "storageClassName": None}},
            "clickhouse": {"enabled": None, "address": None, "database": None, "table": None,
                           "commitInterval": None,
                           "credentialsSecretRef": {"name": None, "usernameKey": None, "passwordKey": None}},
        },
        "certificates": {"lifetime": None, "caLifetime": None, "rotationMargin": None,
                         "issuerRef": {"name": None, "kind": None, "group": None}},
        "metrics": {"port": None, "serviceMonitor": None, "podMonitor": None},
        "networkPolicy": {"enabled": None, "collectorFrom": None, "apiFrom": None, "metricsFrom": None},
        "collector": {
            "enabled": None, "port": None, "retention": None,
            "store": {"chdb": {"size": None, "storageClassName": None, "reclaimPolicy": None},
                      "clickhouse": {"address": None, "database": None,
                                     "credentialsSecretRef": {"name": None, "usernameKey": None,
                                                              "passwordKey": None}}},
            "ui": {"enabled": None, "port": None},
            "resources": {"requests": None, "limits": None},
        },
    },
    "FlowExporterConfig": {
        **_POD_FIELDS, "nodeSelector": None, "tolerations": None, "flowPollInterval": None,
        "activeFlowExportTimeout": None, "idleFlowExportTimeout": None, "conntrackZones": None,
        "maxConnections": None, "flowAggregatorRef": {"name": None, "namespace": None},
        "recordContents": {"podLabels": None},
        "flowCollectorAddr": None, "transport": None, "tlsSecretName": None, "maxUnavailable": None,
        "metrics": {"port": None, "bindAddress": None, "podMonitor": None},
        "destinations": None,  # a list; each item checked by _destinations (and again by the agent)
    },
}


def _unknown_fields(value: Any, tree: Mapping[str, Any], prefix: str) -> list[str]:
    """Fields of ``value`` that ``tree`` does not know, each with the closest known name."""
    if not isinstance(value, Mapping):
        return []
    out = []
    for key, sub in value.items():
        if key not in tree:
            close = difflib.get_close_matches(str(key), list(tree), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known fields here: {', '.join(tree)}"
            out.append(f"{prefix}.{key}: unknown field{hint}")
        elif isinstance(tree[key], Mapping):
            out += _unknown_fields(sub, tree[key], f"{prefix}.{key}")
    return out

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*$")


_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?$")


def _check_resources(r: "_Reader", key: str = "resources") -> Mapping[str, Any]:
    """Container resources: requests/limits of Kubernetes quantities, checked here so that a
    typo becomes a condition instead of a half-applied set of objects refused at the end."""
    value = r.mapping(key)
    for section, entries in value.items():
        if section not in ("requests", "limits"):
            r.problems.append(f"spec.{key}.{section}: unknown; only requests and limits are allowed")
            continue
        if not isinstance(entries, Mapping):
            r.problems.append(f"spec.{key}.{section}: must be a mapping like {{cpu: 100m, memory: 128Mi}}")
            continue
        for name, q in entries.items():
            if isinstance(q, bool) or not isinstance(q, (int, float, str)) or not _QUANTITY.match(str(q)):
                r.problems.append(
                    f"spec.{key}.{section}.{name}: {q!r} is not a Kubernetes quantity; write it like 100m, 0.5, 128Mi or 1G"
                )
    return value


_RESERVED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                    "app.kubernetes.io/managed-by")


def _string_map(r: "_Reader", key: str) -> dict[str, str]:
    value = r.mapping(key)
    out = {}
    for k, v in value.items():
        if not isinstance(v, str):
            r.problems.append(f"{r.path(key)}.{k}: {v!r} must be a string (quote numbers and booleans)")
        else:
            out[str(k)] = v
    return out


def _pod_options(r: "_Reader") -> PodOptions:
    labels = _string_map(r, "podLabels")
    for k in labels:
        if k in _RESERVED_LABELS:
            r.problems.append(f"spec.podLabels.{k}: reserved; the operator sets it to select its own pods")
    secrets_raw = r.raw("imagePullSecrets") or []
    secrets: list[str] = []
    if not isinstance(secrets_raw, list):
        r.problems.append("spec.imagePullSecrets: must be a list like [{name: regcred}]")
    else:
        for i, item in enumerate(secrets_raw):
            name = item.get("name") if isinstance(item, Mapping) else None
            if not isinstance(name, str) or not _DNS_NAME.match(name):
                r.problems.append(f"spec.imagePullSecrets[{i}]: {item!r} must be {{name: SECRET}}")
            else:
                secrets.append(name)
    return PodOptions(
        priority_class_name=r.string("priorityClassName"), annotations=_string_map(r, "podAnnotations"),
        labels=labels, image_pull_secrets=tuple(secrets), affinity=dict(r.mapping("affinity")),
    )


def _peers(r: "_Reader", key: str, default: tuple[Mapping[str, Any], ...]) -> tuple[Mapping[str, Any], ...]:
    value = r.raw(key)
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(p, Mapping) for p in value):
        r.problems.append(f"{r.path(key)}: must be a list of NetworkPolicy peers (podSelector, "
                          "namespaceSelector, ipBlock)")
        return default
    for i, peer in enumerate(value):
        extra = set(peer) - {"podSelector", "namespaceSelector", "ipBlock"}
        if extra:
            r.problems.append(f"{r.path(key)}[{i}].{sorted(extra)[0]}: unknown; a peer has podSelector, "
                              "namespaceSelector or ipBlock")
    return tuple(value)


class SpecError(ValueError):
    """One or more problems of a custom resource's spec, each a line a human can act on."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True, slots=True)
class IssuerRef:
    """A cert-manager issuer: with one, certificates come from cert-manager, not the operator."""

    name: str
    kind: str = "Issuer"
    group: str = "cert-manager.io"

    def reference(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "group": self.group}


@dataclass(frozen=True, slots=True)
class Certificates:
    lifetime: float
    ca_lifetime: float
    rotation_margin: float
    issuer: IssuerRef | None = None


@dataclass(frozen=True, slots=True)
class FlowLogSink:
    enabled: bool
    path: str
    max_size_mb: int
    max_backups: int
    pvc_size: str | None = None  # a PersistentVolumeClaim instead of an emptyDir
    pvc_storage_class: str | None = None


@dataclass(frozen=True, slots=True)
class PodOptions:
    """What platform teams set on every pod: scheduling, pull secrets, their own metadata."""

    priority_class_name: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    image_pull_secrets: tuple[str, ...] = ()
    affinity: Mapping[str, Any] = field(default_factory=dict)


ANY_ADDRESS = ({"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}})
API_CLIENT_LABEL = "flowscope.dev/api-client"


@dataclass(frozen=True, slots=True)
class NetworkPolicyOptions:
    """Who may reach the aggregator. Agents run with hostNetwork, so their packets come from
    node addresses, which pod selectors do not match: the collector port is open to any
    address by default (TLS authenticates the agents); the flow-records API only to pods
    labelled ``flowscope.dev/api-client: "true"``; metrics to any pod (the scraper)."""

    enabled: bool = True
    collector_from: tuple[Mapping[str, Any], ...] = ANY_ADDRESS
    api_from: tuple[Mapping[str, Any], ...] = (
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {API_CLIENT_LABEL: "true"}}},)
    metrics_from: tuple[Mapping[str, Any], ...] = ({"namespaceSelector": {}},)


@dataclass(frozen=True, slots=True)
class ClickHouseSink:
    enabled: bool
    address: str
    database: str
    table: str
    commit_interval: str
    credentials_secret: str | None
    username_key: str
    password_key: str


@dataclass(frozen=True, slots=True)
class CollectorOptions:
    """spec.collector: the flow store and dashboards (``flowscope collector``) deployed next
    to the aggregator, fed by its IPFIX sink. ``store`` is "chdb" (in-process, on a
    PersistentVolumeClaim, one replica) or "clickhouse" (a server, credentials from a Secret)."""

    enabled: bool = False
    port: int = DEFAULTS["collector.port"]
    store: Literal["chdb", "clickhouse"] = "chdb"
    chdb_size: str = DEFAULTS["collector.chdb.size"]
    chdb_storage_class: str | None = None
    # what becomes of the PersistentVolumeClaim (the stored flows) once the collector no longer
    # uses it (switched off, or moved to a ClickHouse server): kept unless the user says Delete
    chdb_reclaim_policy: Literal["Retain", "Delete"] = "Retain"
    clickhouse: ClickHouseSink | None = None  # address, database and the Secret (table is the store's)
    ui: bool = True
    ui_port: int = DEFAULTS["collector.ui.port"]
    retention: str = DEFAULTS["collector.retention"]
    resources: Mapping[str, Any] = field(default_factory=lambda: DEFAULT_RESOURCES["collector"])


@dataclass(frozen=True, slots=True)
class FlowAggregatorSpec:
    """A FlowAggregator, validated and with every default filled in."""

    name: str
    namespace: str
    image: str | None
    image_pull_policy: str
    replicas: int
    transport: Transport
    port: int
    flow_aggregator_address: str
    external_flow_collector_addr: str
    flow_export_interval: str
    correlation_timeout: str
    inactive_flow_timeout: str
    max_flows: int
    ipfix_sink: bool
    flow_log: FlowLogSink
    clickhouse: ClickHouseSink
    certificates: Certificates
    resources: Mapping[str, Any] = field(default_factory=dict)
    pod: PodOptions = field(default_factory=PodOptions)
    metrics_port: int = DEFAULTS["aggregator.metricsPort"]
    service_monitor: bool = False
    pod_monitor: bool = False
    network_policy: NetworkPolicyOptions = field(default_factory=NetworkPolicyOptions)
    collector: CollectorOptions = field(default_factory=CollectorOptions)

    @property
    def collector_service(self) -> str:
        """The Service of the deployed collector (spec.collector), NAME-collector."""
        return f"{self.name}-collector"

    @property
    def service_dns_names(self) -> tuple[str, ...]:
        """Every name a Pod may use to reach the Service (the server certificate's SANs)."""
        n, ns = self.name, self.namespace
        return (n, f"{n}.{ns}", f"{n}.{ns}.svc", f"{n}.{ns}.svc.cluster.local")

    @property
    def collector_address(self) -> str:
        """The ``flowCollectorAddr`` agents use to reach this aggregator."""
        return str(Endpoint(self.flow_aggregator_address, self.port, self.transport))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where agents export: an IPFIX collector (tls, tcp, udp) or a gRPC one (``HOST:PORT:grpc``,
    what the agent's flowCollectorAddr takes); written as the agent's config reads it."""

    host: str
    port: int
    protocol: Transport

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}:{self.protocol}"

    @property
    def mutual_tls(self) -> bool:
        return self.protocol in MUTUAL_TLS


def parse_endpoint(text: Any, *, default_protocol: Transport, field: str) -> Endpoint:
    """``HOST:[PORT][:PROTO]`` with PROTO tls, tcp, udp or grpc (default port 4739, 14739 for grpc)."""
    s = text.strip() if isinstance(text, str) else text
    grpc = isinstance(s, str) and s.lower().endswith(":grpc")
    explicit = isinstance(s, str) and re.search(r":(tls|tcp|udp)$", s, re.I) is not None
    if grpc or (default_protocol == "grpc" and not explicit):
        a = parse_address(s[: -len(":grpc")] if grpc else s, default_protocol="tls", default_port=GRPC_PORT,
                          field=field)
        return Endpoint(a.host, a.port, "grpc")
    a = parse_address(s, default_protocol="tls" if default_protocol == "grpc" else default_protocol, field=field)
    return Endpoint(a.host, a.port, a.protocol)


@dataclass(frozen=True, slots=True)
class AggregatorRef:
    name: str
    namespace: str


@dataclass(frozen=True, slots=True)
class FlowExporterConfigSpec:
    """A FlowExporterConfig, validated; the collector is either a reference or an address."""

    name: str
    namespace: str
    image: str | None
    image_pull_policy: str
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]
    flow_poll_interval: str
    active_flow_export_timeout: str
    idle_flow_export_timeout: str
    conntrack_zones: tuple[int, ...]
    max_connections: int
    aggregator_ref: AggregatorRef | None
    flow_collector_addr: Endpoint | None
    transport: Transport | None
    tls_secret: str | None
    resources: Mapping[str, Any] = field(default_factory=dict)
    # extra collectors, passed to the agent's config as they are (it validates them again)
    destinations: tuple[Mapping[str, Any], ...] = ()
    pod: PodOptions = field(default_factory=PodOptions)
    max_unavailable: int | str = DEFAULTS["maxUnavailable"]
    metrics_port: int = DEFAULTS["agent.metricsPort"]
    metrics_bind: str = DEFAULTS["agent.metricsBind"]  # "node": the node's address (status.hostIP)
    pod_monitor: bool = False
    pod_labels: bool = False  # recordContents.podLabels: sourcePodLabels/destinationPodLabels (JSON)


class _Reader:
    """Reads fields of a spec mapping, collecting problems instead of stopping at the first."""

    def __init__(self, spec: Any, prefix: str = "spec"):
        self.problems: list[str] = []
        self.prefix = prefix
        if spec is None:
            spec = {}
        if not isinstance(spec, Mapping):
            self.problems.append(f"{prefix}: must be a mapping, got {type(spec).__name__}")
            spec = {}
        self.spec = spec

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}"

    def raw(self, key: str) -> Any:
        node: Any = self.spec
        for part in key.split("."):
            if not isinstance(node, Mapping):
                return None
            node = node.get(part)
        return node

    def string(self, key: str, default: str | None = None, *, allowed: tuple[str, ...] | None = None) -> str | None:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, str):
            self.problems.append(f"{self.path(key)}: {value!r} must be a string")
            return default
        if allowed is not None and value not in allowed:
            self.problems.append(f"{self.path(key)}: {value!r} is not one of {', '.join(allowed)}")
            return default
        return value

    def integer(self, key: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems.append(f"{self.path(key)}: {value!r} must be an integer")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            self.problems.append(f"{self.path(key)}: {value} is out of range; it must be {bound}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problems.append(f"{self.path(key)}: {value!r} must be true or false")
            return default
        return value

    def duration(self, key: str, default: str, *, minimum: float = 1.0) -> str:
        value = self.raw(key)
        if value is None:
            return default
        try:
            seconds = parse_duration(value, field=self.path(key))
        except DurationError as exc:
            self.problems.append(str(exc))
            return default
        if seconds < minimum:
            self.problems.append(f"{self.path(key)}: {value!r} is below the {minimum:g}s minimum")
            return default
        return str(value)

    def mapping(self, key: str) -> Mapping[str, Any]:
        value = self.raw(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problems.append(f"{self.path(key)}: must be a mapping, got {value!r}")
            return {}
        return value


def _meta(body: Mapping[str, Any], kind: str) -> tuple[str, str, list[str]]:
    meta = body.get("metadata") or {}
    problems = []
    if body.get("kind") not in (None, kind):
        problems.append(f"kind: {body.get('kind')!r} is not {kind}")
    if body.get("apiVersion") not in (None, API_VERSION):
        problems.append(f"apiVersion: {body.get('apiVersion')!r} is not {API_VERSION}")
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS_LABEL.match(name) or len(name) > 52:
        problems.append(
            f"metadata.name: {name!r} must be a DNS label (lower case letters, digits, '-') "
            "of at most 52 characters, so that the derived object names stay valid"
        )
        name = "invalid"
    namespace = meta.get("namespace") or "default"
    return name, namespace, problems


def _transport(value: str | None) -> Transport:
    for t in TRANSPORTS:
        if value == t:
            return t
    return "tls"


def _host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_DNS_NAME.match(host))


def _max_unavailable(r: _Reader) -> int | str:
    value = r.raw("maxUnavailable")
    if value is None:
        return DEFAULTS["maxUnavailable"]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and re.fullmatch(r"([1-9][0-9]?|100)%", value):
        return value
    r.problems.append(f"spec.maxUnavailable: {value!r} must be a number of nodes (at least 1) or a percentage "
                      "like 10%")
    return DEFAULTS["maxUnavailable"]


def _bind(r: _Reader) -> str:
    value = r.string("metrics.bindAddress", DEFAULTS["agent.metricsBind"]) or "node"
    if value != "node":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            r.problems.append(f"spec.metrics.bindAddress: {value!r} must be \"node\" (the node's address) or an "
                              "IP address such as 127.0.0.1 or 0.0.0.0")
            return "node"
    return value


def parse_flow_aggregator(body: Mapping[str, Any]) -> FlowAggregatorSpec:
    """Validate a FlowAggregator object (the whole body) and fill every default."""
    name, namespace, problems = _meta(body, "FlowAggregator")
    r = _Reader(body.get("spec"))
    transport = r.string("transport", DEFAULTS["transport"], allowed=TRANSPORTS)
    replicas = r.integer("replicas", DEFAULTS["replicas"], minimum=1, maximum=1)
    port = r.integer("port", DEFAULTS["port"], minimum=1, maximum=65535)  # the CRD's default, grpc too
    address = r.string("flowAggregatorAddress", f"{name}.{namespace}.svc") or ""
    if not _host_ok(address):
        r.problems.append(f"spec.flowAggregatorAddress: {address!r} is neither a DNS name nor an IP address")
    external = r.string("externalFlowCollectorAddr", DEFAULTS["externalFlowCollectorAddr"]) or ""
    collector = _collector(r)
    if collector.enabled and not external:  # the aggregator's IPFIX sink feeds the deployed collector
        external = f"{name}-collector.{namespace}.svc:{collector.port}:tcp"
    if external:
        try:
            ext = parse_address(external, default_protocol="tcp", field="spec.externalFlowCollectorAddr")
            if ext.protocol == "tls":
                r.problems.append(
                    f"spec.externalFlowCollectorAddr: {external!r} asks for tls, but the aggregator exports "
                    "over tcp or udp only; end it with :tcp or :udp"
                )
        except AddressError as exc:
            r.problems.append(str(exc))
    r.mapping("sinks")
    ipfix_enabled = r.boolean("sinks.ipfix.enabled", bool(external))
    if ipfix_enabled and not external:
        r.problems.append(
            "spec.sinks.ipfix.enabled: true needs spec.externalFlowCollectorAddr; set the collector's "
            "address or disable the IPFIX sink"
        )
    flow_log = FlowLogSink(
        enabled=r.boolean("sinks.flowLog.enabled", False),
        path=r.string("sinks.flowLog.path", DEFAULTS["flowLog.path"]) or DEFAULTS["flowLog.path"],
        max_size_mb=r.integer("sinks.flowLog.maxSizeMB", DEFAULTS["flowLog.maxSizeMB"], minimum=1),
        max_backups=r.integer("sinks.flowLog.maxBackups", DEFAULTS["flowLog.maxBackups"], minimum=0),
        pvc_size=r.string("sinks.flowLog.persistentVolumeClaim.size"),
        pvc_storage_class=r.string("sinks.flowLog.persistentVolumeClaim.storageClassName"),
    )
    if r.raw("sinks.flowLog.persistentVolumeClaim") is not None and not (
            flow_log.pvc_size and _QUANTITY.match(flow_log.pvc_size)):
        r.problems.append(f"spec.sinks.flowLog.persistentVolumeClaim.size: {flow_log.pvc_size!r} must be a "
                          "storage size like 10Gi")
    if not flow_log.path.startswith("/"):
        r.problems.append(f"spec.sinks.flowLog.path: {flow_log.path!r} must be an absolute path")
    ch_address = r.string("sinks.clickhouse.address", DEFAULTS["clickhouse.address"]) or ""
    if not re.match(r"^(tcp|clickhouse)://[^\s/]+(:\d+)?/?$", ch_address):
        r.problems.append(
            f"spec.sinks.clickhouse.address: {ch_address!r} must look like tcp://HOST:9000"
        )
    clickhouse = ClickHouseSink(
        enabled=r.boolean("sinks.clickhouse.enabled", False),
        address=ch_address,
        database=r.string("sinks.clickhouse.database", DEFAULTS["clickhouse.database"]) or "",
        table=r.string("sinks.clickhouse.table", DEFAULTS["clickhouse.table"]) or "",
        commit_interval=r.duration("sinks.clickhouse.commitInterval", DEFAULTS["clickhouse.commitInterval"]),
        credentials_secret=r.string("sinks.clickhouse.credentialsSecretRef.name"),
        username_key=r.string("sinks.clickhouse.credentialsSecretRef.usernameKey", "username") or "username",
        password_key=r.string("sinks.clickhouse.credentialsSecretRef.passwordKey", "password") or "password",
    )
    for key, value in (("database", clickhouse.database), ("table", clickhouse.table)):
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", value):
            r.problems.append(f"spec.sinks.clickhouse.{key}: {value!r} must be an identifier (letters, digits, _)")
    lifetime = r.duration("certificates.lifetime", DEFAULTS["certificates.lifetime"], minimum=3600)
    ca_lifetime = r.duration("certificates.caLifetime", DEFAULTS["certificates.caLifetime"], minimum=3600)
    margin = r.duration("certificates.rotationMargin", DEFAULTS["certificates.rotationMargin"], minimum=60)
    issuer = None
    if r.raw("certificates.issuerRef") is not None:
        issuer_name = r.string("certificates.issuerRef.name")
        if not issuer_name:
            r.problems.append("spec.certificates.issuerRef.name: required, the cert-manager Issuer or ClusterIssuer")
        issuer = IssuerRef(
            issuer_name or "",
            r.string("certificates.issuerRef.kind", "Issuer", allowed=("Issuer", "ClusterIssuer")) or "Issuer",
            r.string("certificates.issuerRef.group", "cert-manager.io") or "cert-manager.io",
        )
        if transport not in MUTUAL_TLS:
            r.problems.append(f"spec.certificates.issuerRef: set, but spec.transport is {transport!r}; "
                              "certificates are only used with tls and grpc")
    certs = Certificates(
        parse_duration(lifetime), parse_duration(ca_lifetime), parse_duration(margin), issuer
    )
    if certs.rotation_margin >= certs.lifetime:
        r.problems.append(
            f"spec.certificates.rotationMargin: {margin!r} must be shorter than spec.certificates.lifetime "
            f"({lifetime!r}), or certificates would be rotated on every reconcile"
        )
    if certs.lifetime > certs.ca_lifetime:
        r.problems.append(
            f"spec.certificates.lifetime: {lifetime!r} must not exceed spec.certificates.caLifetime ({ca_lifetime!r})"
        )
    spec = FlowAggregatorSpec(
        name=name,
        namespace=namespace,
        image=r.string("image"),
        image_pull_policy=r.string("imagePullPolicy", DEFAULTS["imagePullPolicy"], allowed=PULL_POLICIES) or "",
        replicas=replicas,
        transport=transport,  # type: ignore[arg-type]
        port=port,
        flow_aggregator_address=address,
        external_flow_collector_addr=external,
        flow_export_interval=r.duration("flowExportInterval", DEFAULTS["flowExportInterval"]),
        correlation_timeout=r.duration("correlationTimeout", DEFAULTS["correlationTimeout"]),
        inactive_flow_timeout=r.duration("inactiveFlowTimeout", DEFAULTS["inactiveFlowTimeout"]),
        max_flows=r.integer("maxFlows", DEFAULTS["maxFlows"], minimum=1),
        ipfix_sink=ipfix_enabled,
        flow_log=flow_log,
        clickhouse=clickhouse,
        certificates=certs,
        resources=_check_resources(r) or DEFAULT_RESOURCES["FlowAggregator"],
        pod=_pod_options(r),
        metrics_port=r.integer("metrics.port", DEFAULTS["aggregator.metricsPort"], minimum=1, maximum=65535),
        service_monitor=r.boolean("metrics.serviceMonitor", False),
        pod_monitor=r.boolean("metrics.podMonitor", False),
        network_policy=NetworkPolicyOptions(
            enabled=r.boolean("networkPolicy.enabled", True),
            collector_from=_peers(r, "networkPolicy.collectorFrom", ANY_ADDRESS),
            api_from=_peers(r, "networkPolicy.apiFrom", NetworkPolicyOptions().api_from),
            metrics_from=_peers(r, "networkPolicy.metricsFrom", NetworkPolicyOptions().metrics_from),
        ),
        collector=collector,
    )
    ports = {"spec.port": spec.port, "spec.metrics.port": spec.metrics_port, "the API port": 10348}
    if len(set(ports.values())) < len(ports):
        r.problems.append(f"spec.metrics.port / spec.port: {spec.metrics_port} / {spec.port} must differ from "
                          "each other and from the API port 10348")
    problems += _unknown_fields(body.get("spec"), FIELDS["FlowAggregator"], "spec")
    if spec.clickhouse.enabled and not spec.clickhouse.credentials_secret:
        r.problems.append(
            "spec.sinks.clickhouse.credentialsSecretRef.name: required when the ClickHouse sink is enabled; "
            "name a Secret in this namespace with the user name and password"
        )
    problems += r.problems
    if problems:
        raise SpecError(problems)
    return spec


def _collector(r: _Reader) -> CollectorOptions:
    """spec.collector, checked for what the collector's own options would refuse at start."""
    if r.raw("collector") is None:
        return CollectorOptions()
    r.mapping("collector")
    enabled = r.boolean("collector.enabled", False)
    port = r.integer("collector.port", DEFAULTS["collector.port"], minimum=1, maximum=65535)
    ui_port = r.integer("collector.ui.port", DEFAULTS["collector.ui.port"], minimum=1, maximum=65535)
    if port == ui_port:
        r.problems.append(f"spec.collector.ui.port: {ui_port} must differ from spec.collector.port ({port})")
    retention = r.string("collector.retention", DEFAULTS["collector.retention"]) or DEFAULTS["collector.retention"]
    if not re.fullmatch(r"(0|[1-9][0-9]*h),(0|[1-9][0-9]*h),(0|[1-9][0-9]*h)", retention):
        r.problems.append(f"spec.collector.retention: {retention!r} must be RAW,1M,1H in whole hours (0 for "
                          "forever), e.g. 168h,720h,8760h")
        retention = DEFAULTS["collector.retention"]
    has_chdb, has_ch = r.raw("collector.store.chdb") is not None, r.raw("collector.store.clickhouse") is not None
    if has_chdb and has_ch:
        r.problems.append("spec.collector.store: set either chdb (in-process, on a PersistentVolumeClaim) or "
                          "clickhouse (a server), not both")
    size = r.string("collector.store.chdb.size", DEFAULTS["collector.chdb.size"]) or ""
    if not _QUANTITY.match(size):
        r.problems.append(f"spec.collector.store.chdb.size: {size!r} must be a storage size like 10Gi")
    clickhouse = None
    if has_ch:
        prefix = "collector.store.clickhouse"
        address = r.string(f"{prefix}.address", DEFAULTS["clickhouse.address"]) or ""
        if not re.match(r"^(tcp|clickhouse)://[^\s/@?#]+(:\d+)?/?$", address):
            r.problems.append(f"spec.{prefix}.address: {address!r} must look like tcp://HOST:9000")
        database = r.string(f"{prefix}.database", DEFAULTS["clickhouse.database"]) or ""
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", database):
            r.problems.append(f"spec.{prefix}.database: {database!r} must be an identifier (letters, digits, _)")
        secret = r.string(f"{prefix}.credentialsSecretRef.name")
        if not secret:
            r.problems.append(f"spec.{prefix}.credentialsSecretRef.name: required; name a Secret in this namespace "
                              "with the ClickHouse user name and password")
        clickhouse = ClickHouseSink(
            enabled=True, address=address.rstrip("/"), database=database, table=DEFAULTS["clickhouse.table"],
            commit_interval=DEFAULTS["clickhouse.commitInterval"], credentials_secret=secret,
            username_key=r.string(f"{prefix}.credentialsSecretRef.usernameKey", "username") or "username",
            password_key=r.string(f"{prefix}.credentialsSecretRef.passwordKey", "password") or "password",
        )
    return CollectorOptions(
        enabled=enabled, port=port, store="clickhouse" if has_ch else "chdb", chdb_size=size,
        chdb_storage_class=r.string("collector.store.chdb.storageClassName"), clickhouse=clickhouse,
        chdb_reclaim_policy="Delete" if r.string("collector.store.chdb.reclaimPolicy", "Retain",
                                                  allowed=RECLAIM_POLICIES) == "Delete" else "Retain",
        ui=r.boolean("collector.ui.enabled", True), ui_port=ui_port, retention=retention,
        resources=_check_resources(r, "collector.resources") or DEFAULT_RESOURCES["collector"],
    )


def parse_flow_exporter_config(body: Mapping[str, Any]) -> FlowExporterConfigSpec:
    """Validate a FlowExporterConfig object (the whole body) and fill every default."""
    name, namespace, problems = _meta(body, "FlowExporterConfig")
    r = _Reader(body.get("spec"))
    ref_raw = r.raw("flowAggregatorRef")
    addr_raw = r.raw("flowCollectorAddr")
    transport = r.string("transport", None, allowed=TRANSPORTS)
    ref: AggregatorRef | None = None
    addr: Endpoint | None = None
    if ref_raw is not None and addr_raw is not None:
        r.problems.append(
            "spec: set either flowAggregatorRef (the operator derives the address, transport and TLS) "
            "or flowCollectorAddr (an explicit collector), not both"
        )
    elif ref_raw is None and addr_raw is None:
        r.problems.append(
            "spec: set flowAggregatorRef (e.g. {name: flow-aggregator, namespace: flow-aggregator}) "
            "or flowCollectorAddr (e.g. \"10.0.0.5:4739:tcp\")"
        )
    if ref_raw is not None:
        ref_name = r.string("flowAggregatorRef.name")
        if not ref_name:
            r.problems.append("spec.flowAggregatorRef.name: required, the FlowAggregator's name")
        ref = AggregatorRef(ref_name or "", r.string("flowAggregatorRef.namespace", namespace) or namespace)
    if addr_raw is not None:
        try:
            addr = parse_endpoint(addr_raw, default_protocol=_transport(transport), field="spec.flowCollectorAddr")
            if transport is not None and addr.protocol != transport:
                r.problems.append(
                    f"spec.transport: {transport!r} disagrees with the protocol of spec.flowCollectorAddr "
                    f"({addr_raw!r}); make them the same or drop spec.transport"
                )
        except AddressError as exc:
            r.problems.append(str(exc))
    tls_secret = r.string("tlsSecretName")
    if addr is not None and addr.mutual_tls and not tls_secret:
        r.problems.append(
            f"spec.tlsSecretName: required when spec.flowCollectorAddr ({addr_raw!r}) uses {addr.protocol} (mutual "
            "TLS): name a Secret "
            "in this namespace holding ca.crt, tls.crt and tls.key; or use flowAggregatorRef to let the "
            "operator provide them"
        )
    zones_raw = r.raw("conntrackZones") or []
    zones: list[int] = []
    if not isinstance(zones_raw, list):
        r.problems.append(f"spec.conntrackZones: {zones_raw!r} must be a list of zone numbers")
    else:
        for i, z in enumerate(zones_raw):
            if isinstance(z, bool) or not isinstance(z, int) or not 0 <= z <= 65535:
                r.problems.append(f"spec.conntrackZones[{i}]: {z!r} must be a zone number from 0 to 65535")
            else:
                zones.append(z)
    node_selector = r.mapping("nodeSelector")
    for k, v in node_selector.items():
        if not isinstance(v, str):
            r.problems.append(f"spec.nodeSelector.{k}: {v!r} must be a string")
    tolerations = r.raw("tolerations") or []
    if not isinstance(tolerations, list) or not all(isinstance(t, Mapping) for t in tolerations):
        r.problems.append("spec.tolerations: must be a list of Kubernetes tolerations")
        tolerations = []
    poll = r.duration("flowPollInterval", DEFAULTS["flowPollInterval"])
    active = r.duration("activeFlowExportTimeout", DEFAULTS["activeFlowExportTimeout"])
    idle = r.duration("idleFlowExportTimeout", DEFAULTS["idleFlowExportTimeout"])
    r.mapping("recordContents")  # a non-mapping is reported here; its podLabels is read below
    spec = FlowExporterConfigSpec(
        name=name,
        namespace=namespace,
        image=r.string("image"),
        image_pull_policy=r.string("imagePullPolicy", DEFAULTS["imagePullPolicy"], allowed=PULL_POLICIES) or "",
        node_selector=dict(node_selector),
        tolerations=tuple(tolerations),
        flow_poll_interval=poll,
        active_flow_export_timeout=active,
        idle_flow_export_timeout=idle,
        conntrack_zones=tuple(zones),
        max_connections=r.integer("maxConnections", DEFAULTS["maxConnections"], minimum=1),
        aggregator_ref=ref,
        flow_collector_addr=addr,
        transport=transport,  # type: ignore[arg-type]
        tls_secret=tls_secret,
        destinations=_destinations(r),
        resources=_check_resources(r) or DEFAULT_RESOURCES["FlowExporterConfig"],
        pod=_pod_options(r),
        max_unavailable=_max_unavailable(r),
        metrics_port=r.integer("metrics.port", DEFAULTS["agent.metricsPort"], minimum=1, maximum=65535),
        metrics_bind=_bind(r),
        pod_monitor=r.boolean("metrics.podMonitor", False),
        pod_labels=r.boolean("recordContents.podLabels", False),
    )
    problems += _unknown_fields(body.get("spec"), FIELDS["FlowExporterConfig"], "spec")
    problems += r.problems
    if problems:
        raise SpecError(problems)
    return spec


_DESTINATION_KEYS = {"name", "address", "activeFlowExportTimeout", "idleFlowExportTimeout", "queueSize", "filter"}
_FILTER_KEYS = {"protocols", "namespaces", "flowTypes", "deniedOnly"}


def _destinations(r: _Reader) -> tuple[Mapping[str, Any], ...]:
    """spec.destinations: the agent's ``destinations`` (docs/configuration.md), checked
    here for what a user can fix in the resource: names, addresses, durations, keys."""
    raw = r.raw("destinations")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.problems.append(f"spec.destinations: {raw!r} must be a list of {{name, address, ...}}")
        return ()
    out = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        sub = _Reader(item, f"spec.destinations[{i}]")
        extra = sorted(str(k) for k in sub.spec if k not in _DESTINATION_KEYS)
        extra += sorted(f"filter.{k}" for k in sub.mapping("filter") if k not in _FILTER_KEYS)
        for key in extra:
            sub.problems.append(f"{sub.path(key)}: unknown key; allowed: {', '.join(sorted(_DESTINATION_KEYS))}")
        name = sub.string("name")
        if not name:
            sub.problems.append(f"{sub.path('name')}: required, a DNS label naming the destination in metrics")
        elif name in names or name == "main":
            sub.problems.append(f"{sub.path('name')}: {name!r} is used twice (\"main\" is the main destination's)")
        names.add(name or "")
        address = sub.string("address")
        if not address:
            sub.problems.append(f"{sub.path('address')}: required, e.g. \"10.0.0.9:4739:udp\"")
        else:
            try:
                parse_address(address, default_protocol="tls", field=sub.path("address"))
            except AddressError as exc:
                sub.problems.append(str(exc))
        sub.duration("activeFlowExportTimeout", "60s")
        sub.duration("idleFlowExportTimeout", "15s")
        sub.integer("queueSize", 1, minimum=1)
        r.problems += sub.problems
        if isinstance(item, Mapping):
            out.append(dict(item))
    return tuple(out)
