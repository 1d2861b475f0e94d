"""Kubernetes NetworkPolicy attribution: which policy and rule admitted or dropped a connection.

The agent does not enforce policies (the CNI does); it re-evaluates the Kubernetes
NetworkPolicy semantics against each exported connection to name what applies, the
way Antrea's flow records do:

- A Pod is *isolated* for ingress (egress) when at least one NetworkPolicy of its
  namespace selects it with ``podSelector`` and has that policy type (``policyTypes``;
  when absent: Ingress, plus Egress if the policy has an ``egress`` section).
- A connection is admitted when any rule of any of those policies matches it: a rule
  matches when one of its peers matches the other end (no peers: every peer) and one
  of its ports matches the destination port and protocol (no ports: every port).
  Peers: ``podSelector`` (Pods of the policy's namespace), ``namespaceSelector`` (all
  Pods of the selected namespaces, optionally narrowed by ``podSelector``), ``ipBlock``
  (``cidr`` minus ``except``). Ports: ``protocol`` (default TCP), ``port`` as a number
  (with ``endPort``, a range) or a name resolved against the destination Pod's
  container ports.
- The destination is the endpoint after DNAT: policies see Pod IPs, not ClusterIPs.

Attribution (see docs/agent.md): an admitted connection is attributed to the first
matching rule in the order (policy namespace, policy name, rule index); the rule name is
``ingress-<i>`` or ``egress-<i>``, ``i`` the rule's 0-based index in ``spec.ingress`` or
``spec.egress``. A connection of an isolated Pod that no rule admits is attributed to
the first isolating policy (same order) with an empty rule name and action Drop.
Policy type is 1 (Kubernetes NetworkPolicy); action 1 is Allow, 2 is Drop.

Cluster-scoped policies (the sig-network policy API, ``policy.networking.k8s.io/v1alpha1``,
release v0.1.x: AdminNetworkPolicy and BaselineAdminNetworkPolicy, the version Antrea
(1.13+), OVN-Kubernetes, Calico and kube-network-policies ship; its successor
ClusterNetworkPolicy, v1alpha2, is not released by CNIs yet). :func:`evaluate_tiers`
decides one direction at one Pod in the spec's order:

1. AdminNetworkPolicies whose ``subject`` selects the Pod, lowest ``priority`` first
   (the spec leaves equal priorities to the implementation; we break ties by name),
   each policy's rules in the order written. The first rule whose peers and ports match
   decides: ``Allow`` and ``Deny`` are final; ``Pass`` skips every remaining
   AdminNetworkPolicy rule and hands the connection to the next tier.
2. Namespaced NetworkPolicies (:func:`evaluate`): an isolated Pod is decided here.
3. The BaselineAdminNetworkPolicy (the singleton named ``default``): first matching
   rule, ``Allow`` or ``Deny``.
4. Nothing decided: allowed, with no policy named.

Peers: ``namespaces`` (a namespace label selector) and ``pods`` (namespaceSelector and
podSelector) select Pods only; egress ``networks`` are CIDRs. ``nodes`` peers
(experimental) are refused at parse time with a clear error rather than evaluated
wrongly. Ports: ``portNumber``, ``portRange`` and ``namedPort``; no ``ports``: all.
The record names a cluster-scoped verdict with the policy's name, an empty namespace,
the rule's ``name`` (or ``ingress-<i>`` / ``egress-<i>`` when it has none) and policy
type 4, the value Antrea's IE definitions (go-ipfix's registry) give the sig-network
cluster-scoped kinds (``PolicyTypeK8sClusterNetworkPolicy``): 1 K8s NetworkPolicy,
2 Antrea NetworkPolicy, 3 Antrea ClusterNetworkPolicy, 4 K8s cluster network policy.
Deny is recorded as action 2 (Drop).

Everything here is pure: policies are parsed once into frozen objects, evaluation
takes plain values.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flowscope.ipfix import antrea

__all__ = [
    "PolicyError", "Selector", "NetworkPolicy", "Verdict", "PeerInfo", "parse_network_policy",
    "evaluate", "ACTION_ALLOW", "ACTION_DROP", "POLICY_TYPE_K8S", "PROTOCOL_NAMES",
    "POLICY_TYPE_ANTREA_NP", "POLICY_TYPE_ANTREA_CNP", "POLICY_TYPE_K8S_CLUSTER",
    "ClusterPolicy", "AdminRule", "AdminPeer", "PolicySet", "parse_cluster_policy", "parse_policy",
    "evaluate_tiers", "ANP_KIND", "BANP_KIND", "ADMIN_API_VERSION",
]

# Antrea's vocabulary, defined once in flowscope.ipfix.antrea.
ACTION_ALLOW = antrea.RULE_ACTION_ALLOW
ACTION_DROP = antrea.RULE_ACTION_DROP
ACTION_REJECT = antrea.RULE_ACTION_REJECT
POLICY_TYPE_K8S = antrea.POLICY_TYPE_K8S
POLICY_TYPE_ANTREA_NP = antrea.POLICY_TYPE_ANTREA_NP
POLICY_TYPE_ANTREA_CNP = antrea.POLICY_TYPE_ANTREA_CNP
POLICY_TYPE_K8S_CLUSTER = antrea.POLICY_TYPE_K8S_CLUSTER  # AdminNetworkPolicy and BaselineAdminNetworkPolicy
ADMIN_API_VERSION = "policy.networking.k8s.io/v1alpha1"
ANP_KIND = "AdminNetworkPolicy"
BANP_KIND = "BaselineAdminNetworkPolicy"
PROTOCOL_NAMES = {6: "TCP", 17: "UDP", 132: "SCTP"}  # the spelling of NetworkPolicy ports

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


class PolicyError(ValueError):
    """A NetworkPolicy that does not follow the Kubernetes schema; names the field."""


@dataclass(frozen=True, slots=True)
class Selector:
    """A label selector (matchLabels and matchExpressions); empty selects everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[tuple[str, str, frozenset[str]], ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        for k, v in self.match_labels:
            if labels.get(k) != v:
                return False
        for key, op, values in self.expressions:
            present = key in labels
            if op == "In":
                if not present or labels[key] not in values:
                    return False
            elif op == "NotIn":
                if present and labels[key] in values:
                    return False
            elif op == "Exists":
                if not present:
                    return False
            elif op == "DoesNotExist":
                if present:
                    return False
        return True


@dataclass(frozen=True, slots=True)
class IPBlock:
    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    def contains(self, addr: IPAddr) -> bool:
        if addr.version != self.cidr.version or addr not in self.cidr:
            return False
        return not any(addr in ex for ex in self.excepts)


@dataclass(frozen=True, slots=True)
class Peer:
    pod_selector: Selector | None = None
    namespace_selector: Selector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True, slots=True)
class PortSpec:
    protocol: str = "TCP"
    port: int | str | None = None
    end_port: int | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    peers: tuple[Peer, ...] = ()  # empty: every peer
    ports: tuple[PortSpec, ...] = ()  # empty: every port and protocol


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: Selector
    ingress: tuple[Rule, ...]
    egress: tuple[Rule, ...]
    affects_ingress: bool
    affects_egress: bool


@dataclass(frozen=True, slots=True)
class Verdict:
    policy_name: str
    policy_namespace: str
    rule_name: str
    action: int
    policy_type: int = POLICY_TYPE_K8S
    kind: str = "NetworkPolicy"  # or AdminNetworkPolicy, BaselineAdminNetworkPolicy (type 4 for both)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """One end of a connection as the policy engine sees it."""

    ip: IPAddr
    namespace: str | None = None  # None: not a known Pod
    labels: Mapping[str, str] | None = None
    namespace_labels: Mapping[str, str] | None = None
    container_ports: Sequence[tuple[str, int, str]] = ()  # (name, port, protocol)


# --- parsing -----------------------------------------------------------------------------

def _selector(raw: Any, where: str) -> Selector:
    if raw is None:
        return Selector()
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: {raw!r} must be a label selector (matchLabels, matchExpressions)")
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, Mapping):
        raise PolicyError(f"{where}.matchLabels: {labels!r} must be a mapping of label to value")
    exprs = []
    for i, e in enumerate(raw.get("matchExpressions") or []):
        w = f"{where}.matchExpressions[{i}]"
        if not isinstance(e, Mapping) or "key" not in e or "operator" not in e:
            raise PolicyError(f"{w}: {e!r} needs key and operator")
        op = e["operator"]
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise PolicyError(f"{w}.operator: {op!r} is not one of In, NotIn, Exists, DoesNotExist")
        values = e.get("values") or []
        if op in ("In", "NotIn") and not values:
            raise PolicyError(f"{w}.values: operator {op} needs a non-empty values list")
        exprs.append((str(e["key"]), op, frozenset(str(v) for v in values)))
    return Selector(tuple(sorted((str(k), str(v)) for k, v in labels.items())), tuple(exprs))


def _network(text: Any, where: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(text), strict=False)
    except ValueError:
        raise PolicyError(f"{where}: {text!r} is not a CIDR like 10.0.0.0/8 or fd00::/64") from None


def _peer(raw: Any, where: str) -> Peer:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: {raw!r} must be a peer (podSelector, namespaceSelector or ipBlock)")
    if "ipBlock" in raw:
        ib = raw["ipBlock"]
        if not isinstance(ib, Mapping) or "cidr" not in ib:
            raise PolicyError(f"{where}.ipBlock: {ib!r} needs a cidr")
        cidr = _network(ib["cidr"], f"{where}.ipBlock.cidr")
        excepts = tuple(_network(x, f"{where}.ipBlock.except[{j}]") for j, x in enumerate(ib.get("except") or []))
        return Peer(ip_block=IPBlock(cidr, excepts))
    pod = _selector(raw["podSelector"], f"{where}.podSelector") if "podSelector" in raw else None
    ns = _selector(raw["namespaceSelector"], f"{where}.namespaceSelector") if "namespaceSelector" in raw else None
    if pod is None and ns is None:
        raise PolicyError(f"{where}: a peer needs podSelector, namespaceSelector or ipBlock")
    return Peer(pod_selector=pod, namespace_selector=ns)


def _port(raw: Any, where: str) -> PortSpec:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: {raw!r} must be a port (protocol, port, endPort)")
    proto = str(raw.get("protocol") or "TCP").upper()
    if proto not in ("TCP", "UDP", "SCTP"):
        raise PolicyError(f"{where}.protocol: {raw.get('protocol')!r} is not one of TCP, UDP, SCTP")
    port = raw.get("port")
    if port is not None and not isinstance(port, (int, str)) or isinstance(port, bool):
        raise PolicyError(f"{where}.port: {port!r} must be a port number or a named port")
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    end = raw.get("endPort")
    if end is not None and (not isinstance(port, int) or not isinstance(end, int) or end < port):
        raise PolicyError(f"{where}.endPort: {end!r} needs a numeric port not above it")
    return PortSpec(proto, port, end)


def _rules(raw: Any, where: str, peer_key: str) -> tuple[Rule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise PolicyError(f"{where}: {raw!r} must be a list of rules")
    rules = []
    for i, r in enumerate(raw):
        w = f"{where}[{i}]"
        if r is None:
            r = {}
        if not isinstance(r, Mapping):
            raise PolicyError(f"{w}: {r!r} must be a rule with {peer_key} and ports")
        peers = tuple(_peer(p, f"{w}.{peer_key}[{j}]") for j, p in enumerate(r.get(peer_key) or []))
        ports = tuple(_port(p, f"{w}.ports[{j}]") for j, p in enumerate(r.get("ports") or []))
        rules.append(Rule(peers, ports))
    return tuple(rules)


def parse_network_policy(obj: Mapping[str, Any]) -> NetworkPolicy:
    """A ``networking.k8s.io/v1`` NetworkPolicy object (as a dict) to its evaluable form."""
    meta = obj.get("metadata") or {}
    name, ns = meta.get("name"), meta.get("namespace") or "default"
    if not name:
        raise PolicyError("metadata.name: a NetworkPolicy needs a name")
    where = f"NetworkPolicy {ns}/{name}: spec"
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise PolicyError(f"{where}: {spec!r} must be a mapping")
    types = spec.get("policyTypes")
    if types is None:
        types = ["Ingress"] + (["Egress"] if "egress" in spec else [])
    for t in types:
        if t not in ("Ingress", "Egress"):
            raise PolicyError(f"{where}.policyTypes: {t!r} is not Ingress or Egress")
    return NetworkPolicy(
        namespace=str(ns),
        name=str(name),
        pod_selector=_selector(spec.get("podSelector") or {}, f"{where}.podSelector"),
        ingress=_rules(spec.get("ingress"), f"{where}.ingress", "from"),
        egress=_rules(spec.get("egress"), f"{where}.egress", "to"),
        affects_ingress="Ingress" in types,
        affects_egress="Egress" in types,
    )


# --- evaluation --------------------------------------------------------------------------

def _peer_matches(peer: Peer, policy_ns: str, other: PeerInfo) -> bool:
    if peer.ip_block is not None:
        return peer.ip_block.contains(other.ip)
    if other.namespace is None or other.labels is None:
        return False  # selectors only select Pods
    if peer.namespace_selector is None:
        if other.namespace != policy_ns:
            return False
    elif not peer.namespace_selector.matches(other.namespace_labels or {}):
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(other.labels)


def _port_matches(spec: PortSpec, port: int, protocol: str, dest: PeerInfo) -> bool:
    if spec.protocol and spec.protocol != protocol:  # "": a named port, whose protocol the Pod says
        return False
    if spec.port is None:
        return True
    if isinstance(spec.port, int):
        return spec.port <= port <= (spec.end_port or spec.port)
    return any(n == spec.port and p == port and pr == protocol for n, p, pr in dest.container_ports)


def _rule_matches(rule: Rule, policy_ns: str, other: PeerInfo, port: int, protocol: str | None, dest: PeerInfo) -> bool:
    if rule.ports:
        if protocol is None or not any(_port_matches(s, port, protocol, dest) for s in rule.ports):
            return False
    return not rule.peers or any(_peer_matches(p, policy_ns, other) for p in rule.peers)


def evaluate(
    policies: Sequence[NetworkPolicy],
    *,
    ingress: bool,
    pod_namespace: str,
    pod_labels: Mapping[str, str],
    other: PeerInfo,
    dest: PeerInfo,
    port: int,
    protocol: int,
) -> Verdict | None:
    """The verdict for one direction at one Pod, or None when the Pod is not isolated.

    ``policies``: those of the Pod's namespace, sorted by name. ``other``: the far end
    (the source for ingress, the destination for egress). ``dest``: the destination
    end, whose container ports resolve named ports. ``port``/``protocol``: destination
    port after DNAT and IP protocol number.
    """
    proto = PROTOCOL_NAMES.get(protocol)
    isolating: NetworkPolicy | None = None
    for pol in policies:
        if pol.namespace != pod_namespace:
            continue
        if not (pol.affects_ingress if ingress else pol.affects_egress):
            continue
        if not pol.pod_selector.matches(pod_labels):
            continue
        if isolating is None:
            isolating = pol
        rules = pol.ingress if ingress else pol.egress
        for i, rule in enumerate(rules):
            if _rule_matches(rule, pol.namespace, other, port, proto, dest):
                prefix = "ingress" if ingress else "egress"
                return Verdict(pol.name, pol.namespace, f"{prefix}-{i}", ACTION_ALLOW)
    if isolating is None:
        return None
    return Verdict(isolating.name, isolating.namespace, "", ACTION_DROP)


# --- cluster-scoped policies (sig-network policy API v1alpha1) ---------------------------

@dataclass(frozen=True, slots=True)
class AdminPeer:
    """``namespaces`` (namespace selector only), ``pods`` (both selectors) or ``networks``."""

    namespace_selector: Selector | None = None
    pod_selector: Selector | None = None
    networks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class AdminRule:
    name: str
    action: str  # Allow, Deny, Pass (Pass only in an AdminNetworkPolicy)
    peers: tuple[AdminPeer, ...]
    ports: tuple[PortSpec, ...] = ()  # empty: every port and protocol


@dataclass(frozen=True, slots=True)
class ClusterPolicy:
    """An AdminNetworkPolicy (``priority`` set) or the BaselineAdminNetworkPolicy (None)."""

    kind: str
    name: str
    priority: int | None
    subject_namespaces: Selector
    subject_pods: Selector | None  # None: every Pod of the selected namespaces
    ingress: tuple[AdminRule, ...]
    egress: tuple[AdminRule, ...]

    def selects(self, pod: PeerInfo) -> bool:
        if pod.namespace is None or pod.labels is None:
            return False
        if not self.subject_namespaces.matches(pod.namespace_labels or {}):
            return False
        return self.subject_pods is None or self.subject_pods.matches(pod.labels)


_SELECTOR_KEYS = frozenset({"matchLabels", "matchExpressions"})


def _strict_selector(raw: Any, where: str) -> Selector:
    """A label selector whose keys are checked (an old, nested spelling must not select all)."""
    if isinstance(raw, Mapping):
        extra = set(raw) - _SELECTOR_KEYS
        if extra:
            raise PolicyError(f"{where}: {sorted(extra)} is not part of a label selector (matchLabels, matchExpressions)")
    return _selector(raw if raw is not None else {}, where)


def _admin_pods(raw: Any, where: str) -> tuple[Selector, Selector]:
    if not isinstance(raw, Mapping) or "namespaceSelector" not in raw or "podSelector" not in raw:
        raise PolicyError(f"{where}: {raw!r} needs namespaceSelector and podSelector")
    return (_strict_selector(raw["namespaceSelector"], f"{where}.namespaceSelector"),
            _strict_selector(raw["podSelector"], f"{where}.podSelector"))


def _admin_peer(raw: Any, where: str, egress: bool) -> AdminPeer:
    allowed = ("namespaces", "pods", "networks") if egress else ("namespaces", "pods")
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: {raw!r} must be a peer ({', '.join(allowed)})")
    if egress and "nodes" in raw:
        raise PolicyError(f"{where}.nodes: nodes peers (experimental) are not supported; use networks with the Nodes' CIDRs")
    present = [k for k in allowed if k in raw]
    if len(present) != 1 or set(raw) - set(allowed):
        raise PolicyError(f"{where}: a peer sets exactly one of {', '.join(allowed)}; got {sorted(raw)}")
    key = present[0]
    if key == "namespaces":
        return AdminPeer(namespace_selector=_strict_selector(raw[key], f"{where}.namespaces"))
    if key == "pods":
        ns, pod = _admin_pods(raw[key], f"{where}.pods")
        return AdminPeer(namespace_selector=ns, pod_selector=pod)
    nets = raw[key]
    if not isinstance(nets, list) or not nets:
        raise PolicyError(f"{where}.networks: {nets!r} must be a non-empty list of CIDRs")
    return AdminPeer(networks=tuple(_network(n, f"{where}.networks[{j}]") for j, n in enumerate(nets)))


def _admin_port(raw: Any, where: str) -> PortSpec:
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise PolicyError(f"{where}: {raw!r} sets exactly one of portNumber, portRange, namedPort")
    (key, val), = raw.items()

    def proto(v: Any) -> str:
        p = str(v.get("protocol") or "TCP").upper()
        if p not in ("TCP", "UDP", "SCTP"):
            raise PolicyError(f"{where}.{key}.protocol: {v.get('protocol')!r} is not one of TCP, UDP, SCTP")
        return p

    if key == "namedPort":
        if not isinstance(val, str) or not val:
            raise PolicyError(f"{where}.namedPort: {val!r} must be a port name")
        return PortSpec("", val)
    if not isinstance(val, Mapping):
        raise PolicyError(f"{where}.{key}: {val!r} must be a mapping")
    if key == "portNumber":
        port = val.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise PolicyError(f"{where}.portNumber.port: {port!r} must be a port number 1-65535")
        return PortSpec(proto(val), port)
    if key == "portRange":
        start, end = val.get("start"), val.get("end")
        if (not isinstance(start, int) or not isinstance(end, int) or isinstance(start, bool) or isinstance(end, bool)
                or not 1 <= start < end <= 65535):
            raise PolicyError(f"{where}.portRange: start {start!r} and end {end!r} must be ports with start < end")
        return PortSpec(proto(val), start, end)
    raise PolicyError(f"{where}: {key!r} is not one of portNumber, portRange, namedPort")


def _admin_rules(raw: Any, where: str, egress: bool, actions: tuple[str, ...]) -> tuple[AdminRule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise PolicyError(f"{where}: {raw!r} must be a list of rules")
    if len(raw) > 100:
        raise PolicyError(f"{where}: {len(raw)} rules; the API allows at most 100")
    peer_key = "to" if egress else "from"
    rules = []
    for i, r in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(r, Mapping):
            raise PolicyError(f"{w}: {r!r} must be a rule with action, {peer_key} and ports")
        action = r.get("action")
        if action not in actions:
            raise PolicyError(f"{w}.action: {action!r} is not one of {', '.join(actions)}")
        peers = r.get(peer_key)
        if not isinstance(peers, list) or not peers:
            raise PolicyError(f"{w}.{peer_key}: a rule needs at least one peer")
        ports = r.get("ports")
        if ports is not None and (not isinstance(ports, list) or not ports):
            raise PolicyError(f"{w}.ports: {ports!r} must be a non-empty list (or left out: all ports)")
        name = str(r.get("name") or f"{'egress' if egress else 'ingress'}-{i}")
        rules.append(AdminRule(
            name, str(action), tuple(_admin_peer(p, f"{w}.{peer_key}[{j}]", egress) for j, p in enumerate(peers)),
            tuple(_admin_port(p, f"{w}.ports[{j}]") for j, p in enumerate(ports or []))))
    return tuple(rules)


def parse_cluster_policy(obj: Mapping[str, Any]) -> ClusterPolicy:
    """An AdminNetworkPolicy or BaselineAdminNetworkPolicy (``policy.networking.k8s.io/v1alpha1``)."""
    kind = obj.get("kind")
    if kind not in (ANP_KIND, BANP_KIND):
        raise PolicyError(f"kind: {kind!r} is not {ANP_KIND} or {BANP_KIND}")
    api = obj.get("apiVersion")
    if api is not None and api != ADMIN_API_VERSION:
        raise PolicyError(f"{kind}: apiVersion {api!r} is not {ADMIN_API_VERSION} (the version CNIs implement)")
    name = (obj.get("metadata") or {}).get("name")
    if not name:
        raise PolicyError(f"{kind}: metadata.name is missing")
    where = f"{kind} {name}: spec"
    if kind == BANP_KIND and name != "default":
        raise PolicyError(f"{kind} {name}: metadata.name must be 'default' (the one baseline of a cluster)")
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise PolicyError(f"{where}: {spec!r} must be a mapping")
    priority: int | None = None
    if kind == ANP_KIND:
        priority = spec.get("priority")
        if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 1000:
            raise PolicyError(f"{where}.priority: {priority!r} must be an integer 0-1000 (lower is checked first)")
    subject = spec.get("subject")
    if not isinstance(subject, Mapping) or len(subject) != 1 or next(iter(subject)) not in ("namespaces", "pods"):
        raise PolicyError(f"{where}.subject: {subject!r} sets exactly one of namespaces, pods")
    if "namespaces" in subject:
        ns_sel, pod_sel = _strict_selector(subject["namespaces"], f"{where}.subject.namespaces"), None
    else:
        ns_sel, pod_sel = _admin_pods(subject["pods"], f"{where}.subject.pods")
    actions = ("Allow", "Deny", "Pass") if kind == ANP_KIND else ("Allow", "Deny")
    return ClusterPolicy(
        kind, str(name), priority, ns_sel, pod_sel,
        _admin_rules(spec.get("ingress"), f"{where}.ingress", False, actions),
        _admin_rules(spec.get("egress"), f"{where}.egress", True, actions),
    )


def parse_policy(obj: Mapping[str, Any]) -> NetworkPolicy | ClusterPolicy:
    """Any policy kind flowscope evaluates, by its ``kind``."""
    kind = obj.get("kind")
    if kind == "NetworkPolicy":
        return parse_network_policy(obj)
    if kind in (ANP_KIND, BANP_KIND):
        return parse_cluster_policy(obj)
    raise PolicyError(f"kind: {kind!r} is not NetworkPolicy, {ANP_KIND} or {BANP_KIND}")


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every policy of a cluster, in evaluation order: namespaced ones by namespace (sorted
    by name), AdminNetworkPolicies by (priority, name), the baseline last."""

    by_namespace: Mapping[str, tuple[NetworkPolicy, ...]]
    admin: tuple[ClusterPolicy, ...] = ()
    baseline: tuple[ClusterPolicy, ...] = ()

    @classmethod
    def of(cls, policies: Sequence[NetworkPolicy | ClusterPolicy]) -> PolicySet:
        nps: dict[tuple[str, str], NetworkPolicy] = {}
        cps: dict[tuple[str, str], ClusterPolicy] = {}
        for p in policies:
            if isinstance(p, NetworkPolicy):
                nps[(p.namespace, p.name)] = p
            else:
                cps[(p.kind, p.name)] = p
        by_ns: dict[str, list[NetworkPolicy]] = {}
        for (ns, _), p in sorted(nps.items()):
            by_ns.setdefault(ns, []).append(p)
        admin = sorted((p for p in cps.values() if p.kind == ANP_KIND), key=lambda p: (p.priority or 0, p.name))
        base = tuple(p for p in cps.values() if p.kind == BANP_KIND)
        return cls({k: tuple(v) for k, v in by_ns.items()}, tuple(admin), base)

    def all(self) -> list[NetworkPolicy | ClusterPolicy]:
        out: list[NetworkPolicy | ClusterPolicy] = [*self.admin]
        for ns in sorted(self.by_namespace):
            out += self.by_namespace[ns]
        return out + list(self.baseline)

    def isolates(self, namespace: str) -> bool:
        """Whether anything could decide for a Pod of ``namespace`` (a fast pre-check)."""
        return bool(self.admin or self.baseline or self.by_namespace.get(namespace))


def _admin_peer_matches(peer: AdminPeer, other: PeerInfo) -> bool:
    if peer.networks:
        return any(other.ip.version == n.version and other.ip in n for n in peer.networks)
    if other.namespace is None or other.labels is None:
        return False  # namespaces and pods peers select Pods only
    assert peer.namespace_selector is not None
    if not peer.namespace_selector.matches(other.namespace_labels or {}):
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(other.labels)


def _admin_rule_matches(rule: AdminRule, other: PeerInfo, port: int, protocol: str | None, dest: PeerInfo) -> bool:
    if rule.ports:
        if protocol is None or not any(_port_matches(s, port, protocol, dest) for s in rule.ports):
            return False
    return any(_admin_peer_matches(p, other) for p in rule.peers)


def _cluster_verdict(pol: ClusterPolicy, rule: AdminRule) -> Verdict:
    return Verdict(pol.name, "", rule.name, ACTION_ALLOW if rule.action == "Allow" else ACTION_DROP,
                   POLICY_TYPE_K8S_CLUSTER, pol.kind)


def evaluate_tiers(
    policies: PolicySet,
    *,
    ingress: bool,
    pod: PeerInfo,
    other: PeerInfo,
    dest: PeerInfo,
    port: int,
    protocol: int,
) -> Verdict | None:
    """The verdict for one direction at ``pod`` across the tiers (see the module docstring):
    AdminNetworkPolicies, then NetworkPolicies, then the baseline; None when nothing decides.

    ``pod`` is the end the direction belongs to (the destination for ingress, the source
    for egress) with its namespace labels; ``other``, ``dest``, ``port`` and ``protocol``
    as for :func:`evaluate`.
    """
    if pod.namespace is None or pod.labels is None:
        return None
    proto = PROTOCOL_NAMES.get(protocol)
    for pol in policies.admin:
        rules = pol.ingress if ingress else pol.egress
        if not rules or not pol.selects(pod):
            continue
        passed = False
        for rule in rules:
            if _admin_rule_matches(rule, other, port, proto, dest):
                if rule.action == "Pass":
                    passed = True
                    break
                return _cluster_verdict(pol, rule)
        if passed:
            break  # Pass skips every remaining AdminNetworkPolicy rule
    verdict = evaluate(policies.by_namespace.get(pod.namespace, ()), ingress=ingress, pod_namespace=pod.namespace,
                       pod_labels=pod.labels, other=other, dest=dest, port=port, protocol=protocol)
    if verdict is not None:
        return verdict
    for pol in policies.baseline:
        rules = pol.ingress if ingress else pol.egress
        if not rules or not pol.selects(pod):
            continue
        for rule in rules:
            if _admin_rule_matches(rule, other, port, proto, dest):
                return _cluster_verdict(pol, rule)
    return None
