"""Pure builders: a validated spec in, the Kubernetes objects it needs out.

Nothing here talks to a cluster, reads a clock or generates a key: the reconciler and
``flowscope render`` hand in the spec, the image, the TLS material and the owner, and get
back plain dicts ready to apply or print. The manifests come from the jinja2 templates
next to this module; the component configuration files (``aggregator.yaml``,
``agent.yaml``, keys per docs/configuration.md) are built here as dicts and dumped to
YAML, so that the templates only place values and never compute them.

Each pod template carries ``flowscope.dev/config-hash``, a hash of the rendered config
file only, so that ``flowscope render`` (with or without Secrets) and the operator write
the same value; where the operator (or ``render``) makes the certificates itself,
``flowscope.dev/tls-hash`` hashes them too, so that a rotation rolls the pods. With
cert-manager (``spec.certificates.issuerRef``) Certificate objects replace the Secrets.

The aggregator's flow-records API (``apiAddress``, 0.0.0.0:10348) is never open: with tls
it is served with mutual TLS against the agents' CA (``N-api-client-tls`` is the
readers' client certificate), otherwise with a bearer token from ``N-api-token``.
Probes and Prometheus use the plain-HTTP ``metricsAddress``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
import yaml

from flowscope import __version__
from flowscope.operator.spec import (
    API_VERSION, MUTUAL_TLS, Endpoint, FlowAggregatorSpec, FlowExporterConfigSpec, IssuerRef, SpecError,
)
from flowscope.operator.tls import API_CLIENT_COMMON_NAME, CLIENT_COMMON_NAME, KeyPair, TLSMaterial

__all__ = [
    "Owner", "AgentTLS", "aggregator_config", "agent_config", "build_aggregator", "build_agent",
    "resolve_collector", "config_hash", "MANAGED_BY", "API_PORT", "CertManager", "NODE_IP", "go_duration",
    "api_mode", "collector_args", "collector_store_claim", "COLLECTOR_STORE_DIR", "UI_TOKEN_FILE",
]

MANAGED_BY = "flowscope-operator"
PART_OF = "flowscope"
API_PORT = 10348
TLS_DIR = "/etc/flowscope/tls"
API_TOKEN_FILE = "/etc/flowscope/api/token"
COLLECTOR_STORE_DIR = "/var/lib/flowscope/store"
UI_TOKEN_FILE = "/etc/flowscope/ui-token/token"
NODE_IP = "__NODE_IP__"  # replaced by the node's address (status.hostIP) in the agent pod
# what the agent's "config" init container runs (it has the image's /bin/sh and sed)
CONFIG_SCRIPT = (
    'case "$HOST_IP" in *:*) ip="[$HOST_IP]" ;; *) ip="$HOST_IP" ;; esac; '
    f'sed "s/{NODE_IP}\\(:[0-9]*\\)/\'$ip\\1\'/" /etc/flowscope/template/agent.yaml > /etc/flowscope/config/agent.yaml'
)  # quoted: a bracketed IPv6 address is not a plain YAML scalar


def go_duration(seconds: float) -> str:
    """Seconds as a Go duration (what cert-manager reads): 31536000 -> "8760h0m0s"."""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60}m{s % 60}s"


@dataclass(frozen=True, slots=True)
class CertManager:
    """Certificates from cert-manager: the issuer and the lifetimes to ask for."""

    issuer: IssuerRef
    duration: float
    renew_before: float

    def certificate(self, secret: str, common_name: str, *, client: bool,
                    names: tuple[str, ...] = ()) -> dict[str, Any]:
        dns = [n for n in names if not _is_ip(n)] or ([] if names else [common_name])
        return {
            "secret": secret, "common_name": common_name, "dns_names": dns,
            "ip_addresses": [n for n in names if _is_ip(n)],
            "usages": ["digital signature", "client auth" if client else "server auth"],
            "duration": go_duration(self.duration), "renew_before": go_duration(self.renew_before),
            "issuer": self.issuer.reference(),
        }


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def api_mode(spec: FlowAggregatorSpec) -> str:
    """How the flow-records API authenticates its readers: "mtls" (tls) or "token"."""
    return "mtls" if spec.transport in MUTUAL_TLS else "token"


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


def config_hash(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:16]


def _labels(component: str, name: str) -> tuple[dict[str, str], dict[str, str]]:
    selector = {"app.kubernetes.io/name": f"flowscope-{component}", "app.kubernetes.io/instance": name}
    labels = {**selector, "app.kubernetes.io/component": component, "app.kubernetes.io/managed-by": MANAGED_BY,
              "app.kubernetes.io/part-of": PART_OF, "app.kubernetes.io/version": __version__}
    return labels, selector


def _pod_annotations(user: Mapping[str, str], config_yaml: str, tls_fingerprint: str,
                     metrics_port: int) -> dict[str, str]:
    out = {**user, "prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port),
           "prometheus.io/path": "/metrics", "flowscope.dev/config-hash": config_hash(config_yaml)}
    if tls_fingerprint:
        out["flowscope.dev/tls-hash"] = hashlib.sha256(tls_fingerprint.encode()).hexdigest()[:16]
    return out


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
        "metricsAddress": f"0.0.0.0:{spec.metrics_port}",
    }
    tls_files = {"caFile": f"{TLS_DIR}/ca.crt", "certFile": f"{TLS_DIR}/tls.crt", "keyFile": f"{TLS_DIR}/tls.key"}
    if spec.transport in MUTUAL_TLS:  # grpc: the gRPC server's mutual TLS uses the same files
        config["tls"] = dict(tls_files)
        config["api"] = {"tls": {"certFile": tls_files["certFile"], "keyFile": tls_files["keyFile"],
                                 "caFile": tls_files["caFile"]}}
    else:
        config["api"] = {"tokenFile": API_TOKEN_FILE}
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


def agent_config(spec: FlowExporterConfigSpec, collector: Endpoint, server_name: str | None) -> dict[str, Any]:
    """The agent's config file (docs/configuration.md), from a FlowExporterConfig spec."""
    config: dict[str, Any] = {
        "flowCollectorAddr": str(collector),
        "flowPollInterval": spec.flow_poll_interval,
        "activeFlowExportTimeout": spec.active_flow_export_timeout,
        "idleFlowExportTimeout": spec.idle_flow_export_timeout,
        "conntrackZones": list(spec.conntrack_zones),
        "maxConnections": spec.max_connections,
        "metricsAddress": _agent_metrics_address(spec),
        "metadata": {"source": "kubernetes"},
    }
    if collector.mutual_tls:
        config["tls"] = {
            "caFile": f"{TLS_DIR}/ca.crt", "certFile": f"{TLS_DIR}/tls.crt", "keyFile": f"{TLS_DIR}/tls.key",
            "serverName": server_name or collector.host,
        }
    if spec.destinations:
        config["destinations"] = [dict(d) for d in spec.destinations]
    if spec.pod_labels:
        config["recordContents"] = {"podLabels": True}
    return config


def _agent_metrics_address(spec: FlowExporterConfigSpec) -> str:
    if spec.metrics_bind == "node":
        return f"{NODE_IP}:{spec.metrics_port}"
    host = f"[{spec.metrics_bind}]" if ":" in spec.metrics_bind else spec.metrics_bind
    return f"{host}:{spec.metrics_port}"


def resolve_collector(spec: FlowExporterConfigSpec, aggregator: FlowAggregatorSpec | None) -> tuple[Endpoint, str | None]:
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
        return Endpoint(aggregator.flow_aggregator_address, aggregator.port, aggregator.transport), (
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
    api_client_b64: str
    api_client_key_b64: str


def _tls_values(tls: TLSMaterial) -> _TLSValues:
    api = tls.api_client or tls.client
    return _TLSValues(
        tls.bundle.decode(), _b64(tls.bundle), _b64(tls.ca.cert_pem), _b64(tls.previous_ca or b""),
        _b64(tls.next_ca.cert_pem if tls.next_ca else b""), _b64(tls.next_ca.key_pem if tls.next_ca else b""),
        _b64(tls.ca.key_pem), _b64(tls.server.cert_pem),
        _b64(tls.server.key_pem), _b64(tls.client.cert_pem), _b64(tls.client.key_pem),
        _b64(api.cert_pem), _b64(api.key_pem),
    )


def cert_manager_for(spec: FlowAggregatorSpec) -> CertManager | None:
    c = spec.certificates
    return CertManager(c.issuer, c.lifetime, c.rotation_margin) if c.issuer else None


def build_aggregator(
    spec: FlowAggregatorSpec, *, image: str, tls: TLSMaterial | None, owner: Owner | None = None,
    secrets: bool = True, api_token: bytes | None = None, ui_token: bytes | None = None,
) -> list[dict[str, Any]]:
    """Every namespaced object of a FlowAggregator, in apply order.

    With tls and no issuerRef, ``tls`` (the material) is required; ``secrets=False``
    leaves the Secrets out (for reviews and GitOps) while keeping their mounts. ``api_token``
    is the flow-records API's token (tcp and udp); without it no token Secret is written.
    ``ui_token`` is the deployed collector's (spec.collector), in ``N-ui-token`` the same way.
    """
    cm = cert_manager_for(spec)
    mutual_tls = spec.transport in MUTUAL_TLS
    if mutual_tls and tls is None and cm is None and secrets:
        raise ValueError(f"a {spec.transport} FlowAggregator needs its TLS material")
    use_tls = tls if mutual_tls and cm is None else None
    config_yaml = _dump(aggregator_config(spec))
    labels, selector = _labels("aggregator", spec.name)
    certificates = []
    if cm is not None:
        names = tuple(dict.fromkeys((*spec.service_dns_names, spec.flow_aggregator_address)))
        certificates = [
            cm.certificate(f"{spec.name}-server-tls", names[0], client=False, names=names),
            cm.certificate(f"{spec.name}-client-tls", CLIENT_COMMON_NAME, client=True),
            cm.certificate(f"{spec.name}-api-client-tls", API_CLIENT_COMMON_NAME, client=True),
        ]
    fp = use_tls.fingerprint() if use_tls and secrets else ""
    pvc = None
    if spec.flow_log.enabled and spec.flow_log.pvc_size:
        pvc = {"size": spec.flow_log.pvc_size, "storage_class": spec.flow_log.pvc_storage_class}
    np = spec.network_policy
    collector = _collector_objects(spec, image=image, owner=owner, secrets=secrets, ui_token=ui_token) \
        if spec.collector.enabled else []
    return _render(
        "aggregator.yaml.j2",
        name=spec.name, namespace=spec.namespace, labels=labels, selector=selector,
        pod_labels={**spec.pod.labels, **labels},
        pod_annotations=_pod_annotations(spec.pod.annotations, config_yaml, fp, spec.metrics_port),
        owner=owner.reference() if owner else None,
        config_yaml=config_yaml,
        tls=_tls_values(use_tls) if use_tls and secrets else None, secrets=secrets,
        tls_mounted=mutual_tls, certificates=certificates,
        api_token=_b64(api_token) if api_token and secrets and api_mode(spec) == "token" else None,
        api_token_mounted=api_mode(spec) == "token",
        transport=spec.transport, port=spec.port, api_port=API_PORT, metrics_port=spec.metrics_port,
        replicas=spec.replicas, image=spec.image or image, image_pull_policy=spec.image_pull_policy,
        resources=dict(spec.resources), pod=_pod_values(spec.pod),
        clickhouse_secret=spec.clickhouse.credentials_secret if spec.clickhouse.enabled else None,
        clickhouse_username_key=spec.clickhouse.username_key, clickhouse_password_key=spec.clickhouse.password_key,
        flow_log_dir=posixpath.dirname(spec.flow_log.path), pvc=pvc,
        network_policy={"collector_from": list(np.collector_from), "api_from": list(np.api_from),
                        "metrics_from": list(np.metrics_from)} if np.enabled else None,
        service_monitor=spec.service_monitor, pod_monitor=spec.pod_monitor,
    ) + collector


def collector_args(spec: FlowAggregatorSpec) -> list[str]:
    """The deployed collector's command line (spec.collector): IPFIX over tcp from the
    aggregator, the flow store, and the dashboards (or, with the UI off, the query API) behind
    the token of ``N-ui-token``; both serve the public /healthz the probes use."""
    c = spec.collector
    if c.store == "chdb":
        store = f"chdb://{COLLECTOR_STORE_DIR}"
    else:
        assert c.clickhouse is not None
        store = f"{c.clickhouse.address}/{c.clickhouse.database}"
    web = ["--ui", f"0.0.0.0:{c.ui_port}", "--ui-token-file", UI_TOKEN_FILE] if c.ui else [
        "--api", f"0.0.0.0:{c.ui_port}", "--api-token-file", UI_TOKEN_FILE]
    return ["collector", "--listen", f"0.0.0.0:{c.port}:tcp", "--store", store, "--retention", c.retention, *web]


def collector_store_claim(spec: FlowAggregatorSpec) -> str | None:
    """The collector's chDB PersistentVolumeClaim when the spec no longer uses it (the
    collector off, or its store a ClickHouse server), else None: the claim whose fate
    spec.collector.store.chdb.reclaimPolicy decides."""
    c = spec.collector
    return None if c.enabled and c.store == "chdb" else f"{spec.collector_service}-store"


def _collector_objects(spec: FlowAggregatorSpec, *, image: str, owner: Owner | None, secrets: bool,
                       ui_token: bytes | None) -> list[dict[str, Any]]:
    c = spec.collector
    labels, selector = _labels("collector", spec.name)
    _, aggregator_selector = _labels("aggregator", spec.name)
    ch = c.clickhouse if c.store == "clickhouse" else None
    np = spec.network_policy
    return _render(
        "collector.yaml.j2",
        name=spec.collector_service, aggregator=spec.name, namespace=spec.namespace, labels=labels,
        selector=selector, aggregator_selector=aggregator_selector,
        pod_labels={**spec.pod.labels, **labels}, pod_annotations=dict(spec.pod.annotations),
        owner=owner.reference() if owner else None,
        args=collector_args(spec), port=c.port, ui_port=c.ui_port, store_dir=COLLECTOR_STORE_DIR,
        ui_token=_b64(ui_token) if ui_token and secrets else None,
        pvc={"size": c.chdb_size, "storage_class": c.chdb_storage_class} if c.store == "chdb" else None,
        clickhouse=ch, image=spec.image or image, image_pull_policy=spec.image_pull_policy,
        resources=dict(c.resources), pod=_pod_values(spec.pod),
        api_from=list(np.api_from) if np.enabled else None,
    )


def _pod_values(pod: Any) -> dict[str, Any]:
    return {"priority_class_name": pod.priority_class_name, "affinity": dict(pod.affinity),
            "image_pull_secrets": [{"name": n} for n in pod.image_pull_secrets]}


def agent_cluster_name(spec: FlowExporterConfigSpec) -> str:
    return f"flowscope-agent-{spec.namespace}-{spec.name}"


def build_agent(
    spec: FlowExporterConfigSpec, *, image: str, collector: Endpoint, server_name: str | None,
    tls: AgentTLS | None, owner: Owner | None = None, secrets: bool = True,
    cert_manager: CertManager | None = None,
) -> list[dict[str, Any]]:
    """Every object of a FlowExporterConfig, in apply order (two of them cluster-scoped).

    When the collector speaks tls, the agents' client certificate comes from ``tls``
    (material copied from the referenced FlowAggregator into a Secret the operator owns),
    ``cert_manager`` (a Certificate from the aggregator's issuer) or ``spec.tls_secret``
    (a Secret the user provides). ``secrets=False`` leaves the Secret out.
    """
    uses_tls = collector.mutual_tls
    if uses_tls and tls is None and cert_manager is None and not spec.tls_secret and secrets:
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
    secret_name = spec.tls_secret or f"{spec.name}-client-tls"
    certificates = []
    if uses_tls and cert_manager is not None and not spec.tls_secret:
        certificates = [cert_manager.certificate(secret_name, CLIENT_COMMON_NAME, client=True)]
    priority = spec.pod.priority_class_name
    if priority is None and spec.namespace == "kube-system":
        priority = "system-node-critical"  # only kube-system may use it (default admission quota)
    return _render(
        "agent.yaml.j2",
        name=spec.name, namespace=spec.namespace, labels=labels, selector=selector,
        pod_labels={**spec.pod.labels, **labels},
        pod_annotations=_pod_annotations(spec.pod.annotations, config_yaml, fp, spec.metrics_port),
        cluster_name=agent_cluster_name(spec), cluster_labels=cluster_labels,
        owner=owner.reference() if owner else None,
        config_yaml=config_yaml, config_script=CONFIG_SCRIPT,
        tls=tls_values, secrets=secrets and tls is not None and not certificates, mount_tls=uses_tls,
        tls_secret=secret_name, certificates=certificates,
        image=spec.image or image, image_pull_policy=spec.image_pull_policy,
        node_selector=agent_node_selector(spec),
        tolerations=list(spec.tolerations) or [{"operator": "Exists"}],
        resources=dict(spec.resources), pod=_pod_values(spec.pod), priority_class_name=priority,
        max_unavailable=spec.max_unavailable, metrics_port=spec.metrics_port, pod_monitor=spec.pod_monitor,
    )


def agent_cert_manager(spec: FlowExporterConfigSpec, aggregator: FlowAggregatorSpec | None) -> CertManager | None:
    """The agents' client certificate from the aggregator's cert-manager issuer, if it has one.
    An ``Issuer`` is namespaced: agents in another namespace need a ``ClusterIssuer``."""
    if aggregator is None or spec.aggregator_ref is None:
        return None
    cm = cert_manager_for(aggregator)
    if cm is None:
        return None
    if cm.issuer.kind == "Issuer" and spec.namespace != aggregator.namespace:
        raise SpecError([
            f"spec.flowAggregatorRef: FlowAggregator {aggregator.namespace}/{aggregator.name} takes its certificates "
            f"from Issuer {cm.issuer.name}, which cannot issue in namespace {spec.namespace}; use a ClusterIssuer "
            "(spec.certificates.issuerRef.kind) or put this FlowExporterConfig in the aggregator's namespace"
        ])
    return cm


def agent_node_selector(spec: FlowExporterConfigSpec) -> dict[str, str]:
    """The nodes a FlowExporterConfig's agents run on."""
    return {"kubernetes.io/os": "linux", **spec.node_selector}


Constraint = tuple[str, frozenset[str]]  # ("In" | "NotIn" | "Exists" | "DoesNotExist", values)


def node_constraints(spec: FlowExporterConfigSpec) -> dict[str, list[Constraint]]:
    """What a node's labels must satisfy to run this FlowExporterConfig's agent: the
    nodeSelector, plus the required node affinity when it is a single term (several terms
    are alternatives, which this judgement leaves out: it errs towards a conflict)."""
    out: dict[str, list[Constraint]] = {}
    for key, value in agent_node_selector(spec).items():
        out.setdefault(key, []).append(("In", frozenset([value])))
    required = (((spec.pod.affinity.get("nodeAffinity") or {})
                 .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or [])
    if len(required) == 1 and isinstance(required[0], Mapping):
        for expr in required[0].get("matchExpressions") or []:
            if isinstance(expr, Mapping) and expr.get("operator") in ("In", "NotIn", "Exists", "DoesNotExist"):
                out.setdefault(str(expr.get("key")), []).append(
                    (str(expr["operator"]), frozenset(str(v) for v in expr.get("values") or [])))
    return out


def _disjoint(a: Constraint, b: Constraint) -> bool:
    (op_a, va), (op_b, vb) = a, b
    if {op_a, op_b} <= {"In"}:
        return not va & vb
    if op_a == "In" and op_b == "NotIn":
        return va <= vb
    if op_a == "NotIn" and op_b == "In":
        return vb <= va
    return {op_a, op_b} in ({"In", "DoesNotExist"}, {"Exists", "DoesNotExist"})


def selectors_overlap(a: Mapping[str, list[Constraint]], b: Mapping[str, list[Constraint]]) -> bool:
    """Can one node satisfy both sets of constraints? Only a label key on which they
    contradict (different values, In against NotIn, Exists against DoesNotExist) keeps
    them apart; taints and preferred affinity are not judged (the operator errs towards a
    conflict rather than two agents on one node)."""
    for key in a.keys() & b.keys():
        if any(_disjoint(x, y) for x in a[key] for y in b[key]):
            return False
    return True
