"""Kubernetes metadata for flow records: who is behind an IP address, and which policy applies.

The agent enriches connections with Pod, Node and Service names, the flow type and
NetworkPolicy attribution. Where that information comes from is behind the small
:class:`MetadataSource` interface:

- :class:`StaticMetadata` reads a YAML inventory (Kubernetes manifests of Pods, Nodes,
  Services, Namespaces and NetworkPolicies) for machines outside a cluster and tests;
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
from the original destination, policies from :mod:`flowscope.agent.policy`.
"""

from __future__ import annotations

import ipaddress
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
    NetworkPolicy,
    PeerInfo,
    PolicyError,
    Verdict,
    evaluate,
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
    if spec.get("hostNetwork"):
        texts = []  # a host-network Pod shares the Node's addresses: not a Pod endpoint
    ips = []
    for t in texts:
        try:
            ips.append(_packed(t))
        except ValueError:
            raise MetadataError(f"Pod {ns}/{name}: status.podIPs: {t!r} is not an IP address") from None
    ports = []
    for c in spec.get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") and p.get("containerPort"):
                ports.append((str(p["name"]), int(p["containerPort"]), str(p.get("protocol") or "TCP").upper()))
    # Namespaces, node names and most labels repeat across thousands of Pods: interned,
    # they are stored once (the inventory may hold every Pod of a large cluster).
    labels = {sys.intern(str(k)): sys.intern(str(v)) for k, v in ((obj.get("metadata") or {}).get("labels") or {}).items()}
    node = sys.intern(str(spec.get("nodeName") or ""))
    return PodInfo(sys.intern(ns), name, node, tuple(ips), labels, tuple(ports))


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
        self._cidr_cache: dict[bytes, str | None] = {}

    # --- updates (the key is (namespace, name)) --------------------------------------
    def set_pod(self, pod: PodInfo) -> None:
        with self._lock:
            old = self.pods.get((pod.namespace, pod.name))
            if old is not None:
                for ip in old.ips:
                    if self.pod_by_ip.get(ip) is old:
                        del self.pod_by_ip[ip]
            self.pods[(pod.namespace, pod.name)] = pod
            for ip in pod.ips:
                self.pod_by_ip[ip] = pod

    def delete_pod(self, namespace: str, name: str) -> None:
        with self._lock:
            old = self.pods.pop((namespace, name), None)
            if old is not None:
                for ip in old.ips:
                    if self.pod_by_ip.get(ip) is old:
                        del self.pod_by_ip[ip]

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

    def delete_node(self, name: str) -> None:
        with self._lock:
            self.node_cidrs.pop(name, None)
            self._cidr_cache = {}

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

    # --- lookups ----------------------------------------------------------------------
    def node_of_ip(self, ip: bytes) -> str | None:
        """The Node whose podCIDR holds ``ip`` (a Pod we may not know), or None."""
        cache = self._cidr_cache
        if ip in cache:
            return cache[ip]
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
        return PeerInfo(addr, pod.namespace, pod.labels, self.namespace_labels.get(pod.namespace, {}), pod.ports)

    # --- bookkeeping for watchers: what is held, by kind ----------------------------
    @staticmethod
    def key_of(kind: str, obj: Mapping[str, Any]) -> Any:
        meta = obj.get("metadata") or {}
        if kind in ("Node", "Namespace"):
            return meta.get("name")
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
            self.delete_node(name) if deleted else self.set_node(name, cidrs)
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
        else:
            raise MetadataError(
                f"kind {kind!r} is not part of an inventory; use Pod, Node, Service, Namespace or NetworkPolicy"
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

    @property
    def denied(self) -> bool:
        return any(v is not None and v.action == ACTION_DROP for v in (self.ingress, self.egress))


EMPTY = Enrichment()


@dataclass
class Enricher:
    """Kubernetes fields of a connection as seen from ``node_name``."""

    node_name: str
    source: MetadataSource = field(default_factory=NoMetadata)

    def enrich(self, e: ConntrackEntry) -> Enrichment:
        inv = self.source.inventory()
        if inv is None:
            return EMPTY
        src_ip, dst_ip = e.orig_src, e.reply_src  # the destination after DNAT
        src_pod = inv.pod_by_ip.get(src_ip)
        dst_pod = inv.pod_by_ip.get(dst_ip)
        src_node = src_pod.node if src_pod else inv.node_of_ip(src_ip)
        dst_node = dst_pod.node if dst_pod else inv.node_of_ip(dst_ip)
        src_is_pod, dst_is_pod = src_node is not None, dst_node is not None
        if src_is_pod and dst_is_pod:
            flow_type = FLOW_TYPE_INTRA_NODE if src_node == dst_node else FLOW_TYPE_INTER_NODE
        elif src_is_pod:
            flow_type = FLOW_TYPE_TO_EXTERNAL
        elif dst_is_pod:
            flow_type = FLOW_TYPE_FROM_EXTERNAL
        else:
            flow_type = FLOW_TYPE_UNKNOWN
        local_src = src_pod is not None and src_pod.node == self.node_name
        local_dst = dst_pod is not None and dst_pod.node == self.node_name

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
            if local_dst:
                assert dst_pod is not None
                ingress = evaluate(
                    inv.policies_by_ns.get(dst_pod.namespace, ()), ingress=True,
                    pod_namespace=dst_pod.namespace, pod_labels=dst_pod.labels,
                    other=src_peer, dest=dst_peer, port=port, protocol=e.protocol,
                )
            if local_src:
                assert src_pod is not None
                egress = evaluate(
                    inv.policies_by_ns.get(src_pod.namespace, ()), ingress=False,
                    pod_namespace=src_pod.namespace, pod_labels=src_pod.labels,
                    other=dst_peer, dest=dst_peer, port=port, protocol=e.protocol,
                )
        return Enrichment(
            source_pod_namespace=src_pod.namespace if local_src and src_pod else "",
            source_pod_name=src_pod.name if local_src and src_pod else "",
            destination_pod_namespace=dst_pod.namespace if local_dst and dst_pod else "",
            destination_pod_name=dst_pod.name if local_dst and dst_pod else "",
            source_node_name=self.node_name if local_src else "",
            destination_node_name=self.node_name if local_dst else "",
            destination_cluster_ip=cluster_ip,
            destination_service_port=svc_port,
            destination_service_port_name=svc_port_name,
            flow_type=flow_type,
            ingress=ingress,
            egress=egress,
            host_only=flow_type == FLOW_TYPE_UNKNOWN,
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
            if pod is not None and pod.node == self.node_name and inv.policies_by_ns.get(pod.namespace):
                return self.enrich(e).denied
        return False


def _text(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)
