"""Kubernetes metadata for flow records: who is behind an IP address, and which policy applies.

The agent enriches connections with Pod, Node and Service names, the flow type and
NetworkPolicy attribution. Where that information comes from is behind the small
:class:`MetadataSource` interface:

- :class:`StaticMetadata` reads a YAML inventory (Kubernetes manifests of Pods, Nodes,
  Services, Namespaces, NetworkPolicies and the cluster-scoped AdminNetworkPolicies and
  BaselineAdminNetworkPolicy) for machines outside a cluster and tests;
- ``flowscope.agent.kube.KubernetesMetadata`` watches the same kinds through the API;
- :class:`NoMetadata` is the agent without a source: connections are exported with the
  Kubernetes fields empty.

Both real sources fill one :class:`Inventory` from Kubernetes-shaped dicts through the
same converters, so the static file and the API are read identically. The inventory
keeps only what enrichment needs (a slim :class:`PodInfo` per Pod) and indexes it by
packed IP address, the form conntrack entries carry, so a lookup costs a dict access.

:class:`Enricher` turns a conntrack entry into the Kubernetes fields of its record. It
follows the design: Pod and Node names only for Pods on this Node (the aggregator
correlates the two halves of an inter-node flow), the ClusterIP and Service port name
from the original destination, policies from :mod:`flowscope.agent.policy`. With
``pod_labels`` it also gives this Node's Pods' labels as JSON objects (keys sorted, no
spaces: what Antrea writes into sourcePodLabels/destinationPodLabels), "" for an end that
is no Pod of this Node.

hostNetwork Pods and Nodes (Antrea issue #8260). A hostNetwork Pod has its Node's
addresses, so its address alone names the Node, not the Pod; and a Node talking to a
Pod may use its gateway address, the first of its Pod CIDR, which is no Pod either.
The inventory therefore knows each Node's own addresses (status.addresses, the gateway
of every podCIDR, and the podIPs of its hostNetwork Pods) and, by address, port and
protocol, the hostNetwork Pods that declare a containerPort. An end of a connection is
then a Pod, a hostNetwork Pod (its address and a declared port: the server end), a
Node (its address, no declared port: a hostNetwork client, the kubelet...), or outside
the cluster. The flowType follows from the Nodes of the two ends: intra-node when both
are on this Node or the same one, inter-node when on two (both agents see it and the
aggregator correlates the halves), to/from external with one end outside. Only when no
end is a Pod of either kind is the connection the Nodes' own traffic (``host_only``).
hostNetwork Pods are named in records but never judged by NetworkPolicies, which do not
apply to them.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from flowscope.agent.conntrack import ConntrackEntry
from flowscope.ipfix import antrea
from flowscope.agent.policy import (
    ACTION_DROP,
    ANP_KIND,
    BANP_KIND,
    ClusterPolicy,
    NetworkPolicy,
    PeerInfo,
    PolicyError,
    PolicySet,
    Verdict,
    evaluate_tiers,
    parse_cluster_policy,
    parse_network_policy,
)

__all__ = [
    "PodInfo", "ServiceInfo", "Inventory", "MetadataSource", "StaticMetadata", "NoMetadata",
    "Enricher", "Enrichment", "MetadataError", "load_inventory_file",
    "FLOW_TYPE_UNKNOWN", "FLOW_TYPE_INTRA_NODE", "FLOW_TYPE_INTER_NODE", "FLOW_TYPE_TO_EXTERNAL",
    "FLOW_TYPE_FROM_EXTERNAL",
]

log = logging.getLogger(__name__)

# flowType values: Antrea's vocabulary, defined once in flowscope.ipfix.antrea.
FLOW_TYPE_UNKNOWN = antrea.FLOW_TYPE_UNKNOWN  # neither end is a Pod (host traffic, or no metadata source)
FLOW_TYPE_INTRA_NODE = antrea.FLOW_TYPE_INTRA_NODE
FLOW_TYPE_INTER_NODE = antrea.FLOW_TYPE_INTER_NODE
FLOW_TYPE_TO_EXTERNAL = antrea.FLOW_TYPE_TO_EXTERNAL
FLOW_TYPE_FROM_EXTERNAL = antrea.FLOW_TYPE_FROM_EXTERNAL

_PROTO_NUM = {"TCP": 6, "UDP": 17, "SCTP": 132}


class MetadataError(ValueError):
    """An inventory that cannot be read; names the object and field."""


@dataclass(frozen=True, slots=True)
class PodInfo:
    namespace: str
    name: str
    node: str
    ips: tuple[bytes, ...]  # packed
    labels: Mapping[str, str]
    ports: tuple[tuple[str, int, str], ...] = ()  # named container ports: (name, port, protocol)
    host_network: bool = False  # spec.hostNetwork: ``ips`` are its Node's
    host_ports: tuple[tuple[int, int], ...] = ()  # hostNetwork: every declared (containerPort, protocol number)


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    namespace: str
    name: str
    cluster_ips: tuple[bytes, ...]
    ports: tuple[tuple[str, int, int], ...]  # (port name, port, protocol number)


def _packed(text: str) -> bytes:
    addr = ipaddress.ip_address(text)
    return addr.packed


def _meta(obj: Mapping[str, Any], kind: str) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not name:
        raise MetadataError(f"{kind}: metadata.name is missing in {obj!r:.120}")
    return str(meta.get("namespace") or ("" if kind in ("Node", "Namespace") else "default")), str(name)


def pod_from_k8s(obj: Mapping[str, Any]) -> PodInfo:
    ns, name = _meta(obj, "Pod")
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    texts = [p.get("ip") for p in status.get("podIPs") or [] if p.get("ip")]
    if not texts and status.get("podIP"):
        texts = [status["podIP"]]
    host_network = bool(spec.get("hostNetwork"))  # its podIPs are the Node's addresses
    ips = []
    for t in texts:
        try:
            ips.append(_packed(t))
        except ValueError:
            raise MetadataError(f"Pod {ns}/{name}: status.podIPs: {t!r} is not an IP address") from None
    ports = []
    host_ports = []
    for c in spec.get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") and p.get("containerPort"):
                ports.append((str(p["name"]), int(p["containerPort"]), str(p.get("protocol") or "TCP").upper()))
            if host_network and isinstance(p.get("containerPort"), int):
                proto = _PROTO_NUM.get(str(p.get("protocol") or "TCP").upper())
                if proto is not None:
                    host_ports.append((p["containerPort"], proto))
    # Namespaces, node names and most labels repeat across thousands of Pods: interned,
    # they are stored once (the inventory may hold every Pod of a large cluster).
    labels = {sys.intern(str(k)): sys.intern(str(v)) for k, v in ((obj.get("metadata") or {}).get("labels") or {}).items()}
    node = sys.intern(str(spec.get("nodeName") or ""))
    return PodInfo(sys.intern(ns), name, node, tuple(ips), labels, tuple(ports), host_network, tuple(host_ports))


def service_from_k8s(obj: Mapping[str, Any]) -> ServiceInfo:
    ns, name = _meta(obj, "Service")
    spec = obj.get("spec") or {}
    texts = list(spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else []))
    ips = []
    for t in texts:
        if t in ("None", ""):
            continue  # headless
        try:
            ips.append(_packed(t))
        except ValueError:
            raise MetadataError(f"Service {ns}/{name}: spec.clusterIPs: {t!r} is not an IP address") from None
    ports = []
    for i, p in enumerate(spec.get("ports") or []):
        proto = str(p.get("protocol") or "TCP").upper()
        if proto not in _PROTO_NUM or not isinstance(p.get("port"), int):
            raise MetadataError(f"Service {ns}/{name}: spec.ports[{i}]: {p!r} needs a numeric port and TCP/UDP/SCTP")
        ports.append((str(p.get("name") or ""), p["port"], _PROTO_NUM[proto]))
    return ServiceInfo(ns, name, tuple(ips), tuple(ports))


def node_addresses_from_k8s(obj: Mapping[str, Any]) -> tuple[bytes, ...]:
    """The Node's own addresses: status.addresses of type InternalIP and ExternalIP."""
    out = []
    for a in (obj.get("status") or {}).get("addresses") or []:
        if a.get("type") in ("InternalIP", "ExternalIP") and a.get("address"):
            try:
                out.append(_packed(str(a["address"])))
            except ValueError:
                _, name = _meta(obj, "Node")
                raise MetadataError(f"Node {name}: status.addresses: {a['address']!r} is not an IP address") from None
    return tuple(out)


def _gateways(nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> tuple[bytes, ...]:
    """The first address of each Pod CIDR: the Node's side of its Pods' links (antrea-gw0)."""
    return tuple((n.network_address + 1).packed for n in nets if n.num_addresses > 2)


def node_cidrs_from_k8s(obj: Mapping[str, Any]) -> tuple[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    _, name = _meta(obj, "Node")
    spec = obj.get("spec") or {}
    texts = list(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))
    nets = []
    for t in texts:
        try:
            nets.append(ipaddress.ip_network(t, strict=False))
        except ValueError:
            raise MetadataError(f"Node {name}: spec.podCIDRs: {t!r} is not a CIDR") from None
    return name, nets


class Inventory:
    """What enrichment needs, indexed by packed IP; safe to update from a watch thread.

    Writers take the lock; readers (the poll loop) use single dict lookups, which see
    either the old or the new object, never a half-updated one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pods: dict[tuple[str, str], PodInfo] = {}
        self.pod_by_ip: dict[bytes, PodInfo] = {}
        self.services: dict[tuple[str, str], ServiceInfo] = {}
        self.service_by_ip_port: dict[tuple[bytes, int, int], tuple[ServiceInfo, str]] = {}
        self.node_cidrs: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {}
        self.namespace_labels: dict[str, Mapping[str, str]] = {}
        self.policies: dict[tuple[str, str], NetworkPolicy] = {}
        self.policies_by_ns: dict[str, tuple[NetworkPolicy, ...]] = {}
        # AdminNetworkPolicies and the BaselineAdminNetworkPolicy, keyed (kind, name)
        self.cluster_policies: dict[tuple[str, str], ClusterPolicy] = {}
        self.policy_set = PolicySet(self.policies_by_ns)
        self._cidr_cache: dict[bytes, str | None] = {}
        # hostNetwork Pods and Nodes (see the module docstring)
        self.node_addresses: dict[str, tuple[bytes, ...]] = {}  # node -> status.addresses
        self.host_by_ip: dict[bytes, str] = {}  # a Node's address, gateway or hostNetwork podIP -> node
        self.host_pod_by_port: dict[tuple[bytes, int, int], PodInfo] = {}  # (ip, port, proto) -> hostNetwork Pod

    # --- updates (the key is (namespace, name)) --------------------------------------
    def set_pod(self, pod: PodInfo) -> None:
        with self._lock:
            old = self.pods.get((pod.namespace, pod.name))
            if old is not None:
                self._unindex_pod(old)
            self.pods[(pod.namespace, pod.name)] = pod
            if pod.host_network:
                self._index_host_pod(pod)
            else:
                for ip in pod.ips:
                    self.pod_by_ip[ip] = pod

    def delete_pod(self, namespace: str, name: str) -> None:
        with self._lock:
            old = self.pods.pop((namespace, name), None)
            if old is not None:
                self._unindex_pod(old)

    def _unindex_pod(self, old: PodInfo) -> None:
        for ip in old.ips:
            if self.pod_by_ip.get(ip) is old:
                del self.pod_by_ip[ip]
            for port, proto in old.host_ports:
                if self.host_pod_by_port.get((ip, port, proto)) is old:
                    del self.host_pod_by_port[(ip, port, proto)]
        if old.host_network:
            self._reindex_hosts()

    def _index_host_pod(self, pod: PodInfo) -> None:
        for ip in pod.ips:
            for port, proto in pod.host_ports:
                self.host_pod_by_port[(ip, port, proto)] = pod
        self._reindex_hosts()

    def _reindex_hosts(self) -> None:
        """host_by_ip from the Nodes' addresses and gateways and the hostNetwork Pods."""
        hosts: dict[bytes, str] = {}
        for p in self.pods.values():
            if p.host_network and p.node:
                for ip in p.ips:
                    hosts[ip] = p.node
        for node, addrs in self.node_addresses.items():
            for ip in addrs:
                hosts[ip] = node
        for node, nets in self.node_cidrs.items():
            for ip in _gateways(nets):
                hosts[ip] = node
        self.host_by_ip = hosts

    def set_node_addresses(self, name: str, addresses: tuple[bytes, ...]) -> None:
        with self._lock:
            self.node_addresses[name] = addresses
            self._reindex_hosts()

    def set_service(self, svc: ServiceInfo) -> None:
        with self._lock:
            self._drop_service((svc.namespace, svc.name))
            self.services[(svc.namespace, svc.name)] = svc
            for ip in svc.cluster_ips:
                for pname, port, proto in svc.ports:
                    self.service_by_ip_port[(ip, port, proto)] = (svc, pname)

    def delete_service(self, namespace: str, name: str) -> None:
        with self._lock:
            self._drop_service((namespace, name))

    def _drop_service(self, key: tuple[str, str]) -> None:
        old = self.services.pop(key, None)
        if old is not None:
            for ip in old.cluster_ips:
                for _, port, proto in old.ports:
                    if self.service_by_ip_port.get((ip, port, proto), (None,))[0] is old:
                        del self.service_by_ip_port[(ip, port, proto)]

    def set_node(self, name: str, cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        with self._lock:
            self.node_cidrs[name] = cidrs
            self._cidr_cache = {}
            self._reindex_hosts()

    def delete_node(self, name: str) -> None:
        with self._lock:
            self.node_cidrs.pop(name, None)
            self.node_addresses.pop(name, None)
            self._cidr_cache = {}
            self._reindex_hosts()

    def set_namespace(self, name: str, labels: Mapping[str, str]) -> None:
        labels = dict(labels)
        labels.setdefault("kubernetes.io/metadata.name", name)
        with self._lock:
            self.namespace_labels[name] = labels

    def delete_namespace(self, name: str) -> None:
        with self._lock:
            self.namespace_labels.pop(name, None)

    def set_policy(self, pol: NetworkPolicy) -> None:
        with self._lock:
            self.policies[(pol.namespace, pol.name)] = pol
            self._reindex_policies(pol.namespace)

    def delete_policy(self, namespace: str, name: str) -> None:
        with self._lock:
            self.policies.pop((namespace, name), None)
            self._reindex_policies(namespace)

    def _reindex_policies(self, ns: str) -> None:
        self.policies_by_ns[ns] = tuple(p for k, p in sorted(self.policies.items()) if k[0] == ns)

    def set_cluster_policy(self, pol: ClusterPolicy) -> None:
        with self._lock:
            self.cluster_policies[(pol.kind, pol.name)] = pol
            self._reindex_cluster()

    def delete_cluster_policy(self, kind: str, name: str) -> None:
        with self._lock:
            self.cluster_policies.pop((kind, name), None)
            self._reindex_cluster()

    def _reindex_cluster(self) -> None:
        tiers = PolicySet.of(list(self.cluster_policies.values()))
        self.policy_set = PolicySet(self.policies_by_ns, tiers.admin, tiers.baseline)

    # --- lookups ----------------------------------------------------------------------
    def node_of_ip(self, ip: bytes) -> str | None:
        """The Node whose podCIDR holds ``ip`` (a Pod we may not know), or None."""
        cache = self._cidr_cache
        if ip in cache:
            return cache[ip]
        if ip in self.host_by_ip:
            return None  # a Node's gateway address, inside its Pod CIDR but no Pod
        addr = ipaddress.ip_address(ip)
        found = None
        for node, nets in self.node_cidrs.items():
            if any(addr.version == n.version and addr in n for n in nets):
                found = node
                break
        if len(cache) > 65536:
            cache.clear()
        cache[ip] = found
        return found

    def peer_info(self, ip: bytes) -> PeerInfo:
        pod = self.pod_by_ip.get(ip)
        addr = ipaddress.ip_address(ip)
        if pod is None:
            return PeerInfo(addr)
        # Kubernetes gives every Namespace its name as a label, known to the inventory or not
        ns_labels = self.namespace_labels.get(pod.namespace) or {"kubernetes.io/metadata.name": pod.namespace}
        return PeerInfo(addr, pod.namespace, pod.labels, ns_labels, pod.ports)

    # --- bookkeeping for watchers: what is held, by kind ----------------------------
    @staticmethod
    def key_of(kind: str, obj: Mapping[str, Any]) -> Any:
        meta = obj.get("metadata") or {}
        if kind in ("Node", "Namespace"):
            return meta.get("name")
        if kind in (ANP_KIND, BANP_KIND):
            return (kind, meta.get("name"))
        return (meta.get("namespace") or "default", meta.get("name"))

    def keys(self, kind: str) -> set[Any]:
        with self._lock:
            if kind == "Pod":
                return set(self.pods)
            if kind == "Service":
                return set(self.services)
            if kind == "Node":
                return set(self.node_cidrs)
            if kind == "Namespace":
                return set(self.namespace_labels)
            if kind == "NetworkPolicy":
                return set(self.policies)
            if kind in (ANP_KIND, BANP_KIND):
                return {k for k in self.cluster_policies if k[0] == kind}
        raise MetadataError(f"kind {kind!r} is not part of an inventory")

    def delete(self, kind: str, key: Any) -> None:
        if kind == "Pod":
            self.delete_pod(*key)
        elif kind == "Service":
            self.delete_service(*key)
        elif kind == "Node":
            self.delete_node(key)
        elif kind == "Namespace":
            self.delete_namespace(key)
        elif kind == "NetworkPolicy":
            self.delete_policy(*key)
        elif kind in (ANP_KIND, BANP_KIND):
            self.delete_cluster_policy(*key)

    # --- loading from Kubernetes-shaped objects --------------------------------------
    def apply(self, obj: Mapping[str, Any], deleted: bool = False) -> None:
        """Add, replace or (``deleted``) remove one object of a supported kind."""
        kind = obj.get("kind")
        if kind == "Pod":
            if deleted:
                self.delete_pod(*_meta(obj, "Pod"))
            else:
                self.set_pod(pod_from_k8s(obj))
        elif kind == "Service":
            if deleted:
                self.delete_service(*_meta(obj, "Service"))
            else:
                self.set_service(service_from_k8s(obj))
        elif kind == "Node":
            name, cidrs = node_cidrs_from_k8s(obj)
            if deleted:
                self.delete_node(name)
            else:
                self.set_node(name, cidrs)
                self.set_node_addresses(name, node_addresses_from_k8s(obj))
        elif kind == "Namespace":
            _, name = _meta(obj, "Namespace")
            if deleted:
                self.delete_namespace(name)
            else:
                self.set_namespace(name, (obj.get("metadata") or {}).get("labels") or {})
        elif kind == "NetworkPolicy":
            if deleted:
                self.delete_policy(*_meta(obj, "NetworkPolicy"))
            else:
                try:
                    self.set_policy(parse_network_policy(obj))
                except PolicyError as exc:
                    raise MetadataError(str(exc)) from None
        elif kind in (ANP_KIND, BANP_KIND):
            name = (obj.get("metadata") or {}).get("name")
            if deleted:
                self.delete_cluster_policy(str(kind), str(name))
            else:
                try:
                    self.set_cluster_policy(parse_cluster_policy(obj))
                except PolicyError as exc:
                    raise MetadataError(str(exc)) from None
        else:
            raise MetadataError(
                f"kind {kind!r} is not part of an inventory; use Pod, Node, Service, Namespace, NetworkPolicy, "
                f"{ANP_KIND} or {BANP_KIND}"
            )


class MetadataSource(Protocol):
    """Where the agent's Kubernetes knowledge comes from."""

    def start(self) -> None: ...

    def inventory(self) -> Inventory | None: ...

    def close(self) -> None: ...


class NoMetadata:
    def start(self) -> None:
        pass

    def inventory(self) -> Inventory | None:
        return None

    def close(self) -> None:
        pass


def load_inventory_file(path: str) -> Inventory:
    """A YAML file of Kubernetes manifests (several documents, or ``kind: List``)."""
    try:
        with open(path, encoding="utf-8") as fh:
            docs = list(yaml.safe_load_all(fh))
    except OSError as exc:
        raise MetadataError(f"metadata.staticFile: cannot read {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise MetadataError(f"metadata.staticFile: {path!r} is not valid YAML: {exc}") from None
    inv = Inventory()
    for obj in _flatten(docs):
        try:
            inv.apply(obj)
        except MetadataError as exc:
            raise MetadataError(f"metadata.staticFile {path!r}: {exc}") from None
    return inv


def _flatten(docs: Iterable[Any]) -> Iterable[Mapping[str, Any]]:
    for d in docs:
        if d is None:
            continue
        if isinstance(d, Mapping) and d.get("kind") == "List":
            yield from _flatten(d.get("items") or [])
        elif isinstance(d, Mapping):
            yield d
        else:
            raise MetadataError(f"metadata.staticFile: {d!r:.80} is not a Kubernetes object")


class StaticMetadata:
    """An inventory read once from a file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._inv = load_inventory_file(path)

    def start(self) -> None:
        pass

    def inventory(self) -> Inventory | None:
        return self._inv

    def close(self) -> None:
        pass


# --- enrichment --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Enrichment:
    source_pod_namespace: str = ""
    source_pod_name: str = ""
    destination_pod_namespace: str = ""
    destination_pod_name: str = ""
    source_node_name: str = ""
    destination_node_name: str = ""
    destination_cluster_ip: str = ""
    destination_service_port: int = 0
    destination_service_port_name: str = ""
    flow_type: int = FLOW_TYPE_UNKNOWN
    ingress: Verdict | None = None
    egress: Verdict | None = None
    # The inventory knows neither end as a Pod (nor a Pod CIDR): the Node's own traffic.
    host_only: bool = False
    # The Pods' labels as JSON (None: the agent does not export labels)
    source_pod_labels: str | None = None
    destination_pod_labels: str | None = None

    @property
    def denied(self) -> bool:
        return any(v is not None and v.action == ACTION_DROP for v in (self.ingress, self.egress))


EMPTY = Enrichment()
EMPTY_WITH_LABELS = Enrichment(source_pod_labels="", destination_pod_labels="")


def labels_json(labels: Mapping[str, str]) -> str:
    """A Pod's labels as Antrea writes them: a JSON object, keys sorted, no spaces."""
    return json.dumps(dict(labels), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass
class Enricher:
    """Kubernetes fields of a connection as seen from ``node_name``."""

    node_name: str
    source: MetadataSource = field(default_factory=NoMetadata)
    pod_labels: bool = False  # add the Pods' labels (recordContents.podLabels)

    def enrich(self, e: ConntrackEntry) -> Enrichment:
        inv = self.source.inventory()
        if inv is None:
            return EMPTY_WITH_LABELS if self.pod_labels else EMPTY
        src_ip, dst_ip = e.orig_src, e.reply_src  # the destination after DNAT
        src_pod = inv.pod_by_ip.get(src_ip)
        dst_pod = inv.pod_by_ip.get(dst_ip)
        src_node = src_pod.node if src_pod else inv.node_of_ip(src_ip)
        dst_node = dst_pod.node if dst_pod else inv.node_of_ip(dst_ip)
        src_is_pod, dst_is_pod = src_node is not None, dst_node is not None
        # hostNetwork Pods and Nodes: Pods of their Node when identified, else the Node
        src_host = dst_host = None
        if src_node is None and inv.host_by_ip:
            src_host = inv.host_pod_by_port.get((src_ip, e.orig_sport, e.protocol))
            src_node = src_host.node if src_host else inv.host_by_ip.get(src_ip)
        if dst_node is None and inv.host_by_ip:
            dst_host = inv.host_pod_by_port.get((dst_ip, e.reply_sport, e.protocol))
            dst_node = dst_host.node if dst_host else inv.host_by_ip.get(dst_ip)
        any_pod = src_is_pod or dst_is_pod or src_host is not None or dst_host is not None
        if src_node is not None and dst_node is not None:
            flow_type = FLOW_TYPE_INTRA_NODE if src_node == dst_node else FLOW_TYPE_INTER_NODE
        elif src_node is not None:
            flow_type = FLOW_TYPE_TO_EXTERNAL
        elif dst_node is not None:
            flow_type = FLOW_TYPE_FROM_EXTERNAL
        else:
            flow_type = FLOW_TYPE_UNKNOWN
        if not any_pod:
            flow_type = FLOW_TYPE_UNKNOWN  # Nodes and the outside only: the Nodes' own traffic
        local_src = src_pod is not None and src_pod.node == self.node_name
        local_dst = dst_pod is not None and dst_pod.node == self.node_name
        name_src = src_pod if local_src else (src_host if src_host is not None and src_host.node == self.node_name else None)
        name_dst = dst_pod if local_dst else (dst_host if dst_host is not None and dst_host.node == self.node_name else None)

        cluster_ip, svc_port, svc_port_name = "", 0, ""
        hit = inv.service_by_ip_port.get((e.orig_dst, e.orig_dport, e.protocol))
        if hit is not None:
            svc, pname = hit
            cluster_ip = _text(e.orig_dst)
            svc_port = e.orig_dport
            svc_port_name = f"{svc.namespace}/{svc.name}:{pname}" if pname else f"{svc.namespace}/{svc.name}"

        ingress = egress = None
        if local_dst or local_src:
            src_peer, dst_peer = inv.peer_info(src_ip), inv.peer_info(dst_ip)
            port = e.reply_sport
            policies = inv.policy_set
            if local_dst:
                ingress = evaluate_tiers(
                    policies, ingress=True, pod=dst_peer, other=src_peer, dest=dst_peer, port=port, protocol=e.protocol,
                )
            if local_src:
                egress = evaluate_tiers(
                    policies, ingress=False, pod=src_peer, other=dst_peer, dest=dst_peer, port=port, protocol=e.protocol,
                )
        return Enrichment(
            source_pod_namespace=name_src.namespace if name_src else "",
            source_pod_name=name_src.name if name_src else "",
            destination_pod_namespace=name_dst.namespace if name_dst else "",
            destination_pod_name=name_dst.name if name_dst else "",
            source_node_name=self.node_name if name_src or (src_host is None and src_node == self.node_name
                                                            and not src_is_pod and any_pod) else "",
            destination_node_name=self.node_name if name_dst or (dst_host is None and dst_node == self.node_name
                                                                 and not dst_is_pod and any_pod) else "",
            destination_cluster_ip=cluster_ip,
            destination_service_port=svc_port,
            destination_service_port_name=svc_port_name,
            flow_type=flow_type,
            ingress=ingress,
            egress=egress,
            host_only=not any_pod,
            source_pod_labels=(labels_json(name_src.labels) if name_src else "") if self.pod_labels else None,
            destination_pod_labels=(labels_json(name_dst.labels) if name_dst else "") if self.pod_labels else None,
        )

    def is_denied(self, e: ConntrackEntry) -> bool:
        """For the store: an unreplied new connection that the policies drop.

        Asked for every new unreplied connection (a first poll may bring 100k), so it
        looks only at what can isolate: a Pod of this node whose namespace has policies.
        """
        inv = self.source.inventory()
        if inv is None:
            return False
        for ip in (e.reply_src, e.orig_src):
            pod = inv.pod_by_ip.get(ip)
            if pod is not None and pod.node == self.node_name and inv.policy_set.isolates(pod.namespace):
                return self.enrich(e).denied
        return False


def _text(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)
