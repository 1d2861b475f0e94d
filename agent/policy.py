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
]

# Antrea's vocabulary, defined once in flowscope.ipfix.antrea.
ACTION_ALLOW = antrea.RULE_ACTION_ALLOW
ACTION_DROP = antrea.RULE_ACTION_DROP
POLICY_TYPE_K8S = antrea.POLICY_TYPE_K8S
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
    if spec.protocol != protocol:
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
