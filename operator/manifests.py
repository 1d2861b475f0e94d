"""Pure builders: a validated spec in, the Kubernetes objects it needs out.

Nothing here talks to a cluster, reads a clock or generates a key: the reconciler and
``flowscope render`` hand in the spec, the image, the TLS material and the owner, and get
back plain dicts ready to apply or print. The manifests come from the jinja2 templates
next to this module; the component configuration files (``aggregator.yaml``,
``agent.yaml``, keys per docs/configuration.md) are built here as dicts and dumped to
YAML, so that the templates only place values and never compute them.

Each pod template carries ``flowscope.dev/config-hash``: a hash of the rendered config and
of the certificates, so that a change of either rolls the pods.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
import yaml

from flowscope.ipfix.address import Address
from flowscope.operator.spec import API_VERSION, FlowAggregatorSpec, FlowExporterConfigSpec, SpecError
from flowscope.operator.tls import KeyPair, TLSMaterial

__all__ = [
    "Owner", "AgentTLS", "aggregator_config", "agent_config", "build_aggregator", "build_agent",
    "resolve_collector", "config_hash", "MANAGED_BY", "API_PORT",
]

MANAGED_BY = "flowscope-operator"
API_PORT = 10348
TLS_DIR = "/etc/flowscope/tls"


@dataclass(frozen=True, slots=True)
class Owner:
    """The custom resource that owns the rendered objects (None when rendering offline)."""

    kind: str
    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION, "kind": self.kind, "name": self.name, "uid": self.uid,
            "controller": True, "blockOwnerDeletion": True,
        }


@dataclass(frozen=True, slots=True)
class AgentTLS:
    """What an agent needs to speak TLS to its aggregator: the CA bundle and a client pair."""

    ca_pem: bytes
    client: KeyPair

    @classmethod
    def from_material(cls, tls: TLSMaterial) -> AgentTLS:
        return cls(tls.bundle, tls.client)


@functools.cache
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("flowscope.operator", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _render(template: str, **values: Any) -> list[dict[str, Any]]:
    text = _env().get_template(template).render(**values)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _dump(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)


def config_hash(config_yaml: str, tls_fingerprint: str = "") -> str:
    return hashlib.sha256((config_yaml + "\0" + tls_fingerprint).encode()).hexdigest()[:16]


def _labels(component: str, name: str) -> tuple[dict[str, str], dict[str, str]]:
    selector = {"app.kubernetes.io/name": f"flowscope-{component}", "app.kubernetes.io/instance": name}
    labels = {**selector, "app.kubernetes.io/component": component, "app.kubernetes.io/managed-by": MANAGED_BY}
    return labels, selector


def aggregator_config(spec: FlowAggregatorSpec) -> dict[str, Any]:
    """The aggregator's config file (docs/configuration.md), from a FlowAggregator spec."""
    config: dict[str, Any] = {
        "externalFlowCollectorAddr": spec.external_flow_collector_addr,
        "flowExportInterval": spec.flow_export_interval,
        "aggregatorTransportProtocol": spec.transport,
        "flowAggregatorAddress": spec.flow_aggregator_address,
        "listenPort": spec.port,
        "correlationTimeout": spec.correlation_timeout,
        "inactiveFlowTimeout": spec.inactive_flow_timeout,
        "maxFlows": spec.max_flows,
        "apiAddress": f"0.0.0.0:{API_PORT}",
    }
    if spec.transport == "tls":
        config["tls"] = {"caFile": f"{TLS_DIR}/ca.crt", "certFile": f"{TLS_DIR}/tls.crt", "keyFile": f"{TLS_DIR}/tls.key"}
    sinks: dict[str, Any] = {"ipfix": {"enabled": spec.ipfix_sink}}
    fl = spec.flow_log
    sinks["flowLog"] = {"enabled": fl.enabled, "path": fl.path, "maxSizeMB": fl.max_size_mb, "maxBackups": fl.max_backups}
    ch = spec.clickhouse
    sinks["clickhouse"] = {
        "enabled": ch.enabled, "address": ch.address, "database": ch.database, "table": ch.table,
        "commitInterval": ch.commit_interval,
    }
    config["sinks"] = sinks
    return config


def agent_config(spec: FlowExporterConfigSpec, collector: Address, server_name: str | None) -> dict[str, Any]:
    """The agent's config file (docs/configuration.md), from a FlowExporterConfig spec."""
    config: dict[str, Any] = {
        "flowCollectorAddr": str(collector),
        "flowPollInterval": spec.flow_poll_interval,
        "activeFlowExportTimeout": spec.active_flow_export_timeout,
        "idleFlowExportTimeout": spec.idle_flow_export_timeout,
        "conntrackZones": list(spec.conntrack_zones),
        "maxConnections": spec.max_connections,
        "metricsAddress": "0.0.0.0:9390",
        "metadata": {"source": "kubernetes"},
    }
    if collector.protocol == "tls":
        config["tls"] = {
            "caFile": f"{TLS_DIR}/ca.crt", "certFile": f"{TLS_DIR}/tls.crt", "keyFile": f"{TLS_DIR}/tls.key",
            "serverName": server_name or collector.host,
        }
    if spec.destinations:
        config["destinations"] = [dict(d) for d in spec.destinations]
    return config


def resolve_collector(spec: FlowExporterConfigSpec, aggregator: FlowAggregatorSpec | None) -> tuple[Address, str | None]:
    """Where the agents export to, and the name to check in the server's certificate.

    With a reference, both come from the FlowAggregator; the transports must agree (the
    design insists: TLS on both sides or on neither).
    """
    if spec.aggregator_ref is not None:
        ref = spec.aggregator_ref
        if aggregator is None:
            raise SpecError([
                f"spec.flowAggregatorRef: FlowAggregator {ref.namespace}/{ref.name} does not exist; create it "
                "or point flowAggregatorRef at an existing one (kubectl get flowaggregators -A)"
            ])
        if spec.transport is not None and spec.transport != aggregator.transport:
            raise SpecError([
                f"spec.transport: {spec.transport!r} does not match FlowAggregator {ref.namespace}/{ref.name}, "
                f"which listens with {aggregator.transport!r}; remove spec.transport (it is derived from the "
                f"reference) or set it to {aggregator.transport!r}, or change the FlowAggregator's spec.transport"
            ])
        return Address(aggregator.flow_aggregator_address, aggregator.port, aggregator.transport), (
            aggregator.flow_aggregator_address
        )
    assert spec.flow_collector_addr is not None
    return spec.flow_collector_addr, None


@dataclass(frozen=True, slots=True)
class _TLSValues:
    ca_pem: str  # the bundle (current + previous CA) every peer trusts
    ca_b64: str
    ca_cert_b64: str
    previous_b64: str
    next_b64: str
    next_key_b64: str
    ca_key_b64: str
    server_b64: str
    server_key_b64: str
    client_b64: str
    client_key_b64: str


def _tls_values(tls: TLSMaterial) -> _TLSValues:
    return _TLSValues(
        tls.bundle.decode(), _b64(tls.bundle), _b64(tls.ca.cert_pem), _b64(tls.previous_ca or b""),
        _b64(tls.next_ca.cert_pem if tls.next_ca else b""), _b64(tls.next_ca.key_pem if tls.next_ca else b""),
        _b64(tls.ca.key_pem), _b64(tls.server.cert_pem),
        _b64(tls.server.key_pem), _b64(tls.client.cert_pem), _b64(tls.client.key_pem),
    )


def build_aggregator(
    spec: FlowAggregatorSpec, *, image: str, tls: TLSMaterial | None, owner: Owner | None = None,
    secrets: bool = True,
) -> list[dict[str, Any]]:
    """Every namespaced object of a FlowAggregator, in apply order.

    ``tls`` is required when the transport is tls; ``secrets=False`` leaves the Secrets
    out (for reviews) while keeping their mounts.
    """
    if spec.transport == "tls" and tls is None:
        raise ValueError("a tls FlowAggregator needs its TLS material")
    use_tls = tls if spec.transport == "tls" else None
    config_yaml = _dump(aggregator_config(spec))
    labels, selector = _labels("aggregator", spec.name)
    return _render(
        "aggregator.yaml.j2",
        name=spec.name, namespace=spec.namespace, labels=labels, selector=selector,
        owner=owner.reference() if owner else None,
        config_yaml=config_yaml,
        config_hash=config_hash(config_yaml, use_tls.fingerprint() if use_tls and secrets else ""),
        tls=_tls_values(use_tls) if use_tls else None, secrets=secrets,
        transport=spec.transport, port=spec.port, api_port=API_PORT, replicas=spec.replicas,
        image=spec.image or image, image_pull_policy=spec.image_pull_policy,
        resources=dict(spec.resources),
        clickhouse_secret=spec.clickhouse.credentials_secret if spec.clickhouse.enabled else None,
        clickhouse_username_key=spec.clickhouse.username_key, clickhouse_password_key=spec.clickhouse.password_key,
        flow_log_dir=posixpath.dirname(spec.flow_log.path),
    )


def agent_cluster_name(spec: FlowExporterConfigSpec) -> str:
    return f"flowscope-agent-{spec.namespace}-{spec.name}"


def build_agent(
    spec: FlowExporterConfigSpec, *, image: str, collector: Address, server_name: str | None,
    tls: AgentTLS | None, owner: Owner | None = None, secrets: bool = True,
) -> list[dict[str, Any]]:
    """Every object of a FlowExporterConfig, in apply order (two of them cluster-scoped).

    When the collector speaks tls, either ``tls`` (material copied from the referenced
    FlowAggregator into a Secret the operator owns) or ``spec.tls_secret`` (a Secret the
    user provides) must be given.
    """
    uses_tls = collector.protocol == "tls"
    if uses_tls and tls is None and not spec.tls_secret:
        raise ValueError("a tls collector needs the agent's TLS material or spec.tlsSecretName")
    config_yaml = _dump(agent_config(spec, collector, server_name))
    labels, selector = _labels("agent", spec.name)
    cluster_labels = {
        **labels, "flowscope.dev/owner-namespace": spec.namespace, "flowscope.dev/owner-name": spec.name,
    }
    fp = ""
    if uses_tls and tls is not None and secrets:
        fp = hashlib.sha256(tls.ca_pem + tls.client.cert_pem).hexdigest()
    tls_values = None
    if uses_tls and tls is not None:
        tls_values = {"ca_b64": _b64(tls.ca_pem), "client_b64": _b64(tls.client.cert_pem),
                      "client_key_b64": _b64(tls.client.key_pem)}
    return _render(
        "agent.yaml.j2",
        name=spec.name, namespace=spec.namespace, labels=labels, selector=selector,
        cluster_name=agent_cluster_name(spec), cluster_labels=cluster_labels,
        owner=owner.reference() if owner else None,
        config_yaml=config_yaml, config_hash=config_hash(config_yaml, fp),
        tls=tls_values, secrets=secrets and tls is not None, mount_tls=uses_tls,
        tls_secret=spec.tls_secret or f"{spec.name}-client-tls",
        image=spec.image or image, image_pull_policy=spec.image_pull_policy,
        node_selector={"kubernetes.io/os": "linux", **spec.node_selector},
        tolerations=list(spec.tolerations) or [{"operator": "Exists"}],
        resources=dict(spec.resources),
    )
