"""Policy insight over the flow history: what a policy change would break, and the
least-privilege policies that allow exactly what was observed.

This is the pure engine behind ``flowscope policy what-if`` and ``flowscope policy
recommend``. It knows nothing of stores, files or clusters: it takes an iterable of
:class:`FlowKey` (one distinct connection shape of the history: source and destination
endpoint with their Pod labels, destination port and protocol, with the octets, the
number of flow records and the last time seen, and whether the stored record said it
was denied) and the policies as parsed by :mod:`flowscope.agent.policy`. It evaluates
with the agent's own evaluator (:func:`~flowscope.agent.policy.evaluate_tiers`), so a
what-if answers exactly what the agents would have recorded.

Why it works on distinct keys, not rows: a policy decides on (source Pod, destination
Pod or address, port, protocol), never on the source port or the byte count, so a day
of history with millions of rows collapses into the few thousand shapes the store
groups for us, and each is evaluated once.

What-if (:func:`what_if`): every key is evaluated under the *current* policies and under
the *proposed* ones (added to the current set, replacing any of the same kind and name;
or, with ``replace``, instead of it). A key whose verdict changes (allowed to denied or
back) is reported with the policy that decides afterwards; ``breaks`` counts keys that
actually flowed (their stored record was not a denial) and would now be denied. Keys
whose Pod end cannot be resolved to labels (a Pod gone from the inventory, with no
labels stored) cannot be evaluated honestly and are listed as unresolved, not guessed.

Recommendation (:func:`recommend`): for one namespace, one NetworkPolicy per workload
that had traffic, selecting the workload's Pods by the labels all of them share (minus
the controller-generated ones), with an ingress rule per observed peer and an egress
rule per observed destination, each with the exact ports and protocols seen; a Pod peer
by podSelector (with a namespaceSelector on ``kubernetes.io/metadata.name`` for other
namespaces), an external peer as an ipBlock of its single address; and a default-deny
of both directions for everything else in the namespace. Keys the history shows as
denied are not allowed by the recommendation: it never opens what policy closed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowscope.agent.policy import (
    ACTION_DROP,
    ANP_KIND,
    BANP_KIND,
    PROTOCOL_NAMES,
    ClusterPolicy,
    NetworkPolicy,
    PeerInfo,
    PolicySet,
    Verdict,
    evaluate_tiers,
)

__all__ = [
    "Endpoint", "FlowKey", "Decision", "Change", "WhatIf", "what_if", "decide", "recommend",
    "workload_of", "VOLATILE_LABELS",
]

# Labels a controller sets per Pod or per revision: selecting on them would break on the next rollout.
VOLATILE_LABELS = frozenset({
    "pod-template-hash", "controller-revision-hash", "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index", "pod-template-generation",
})
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One end of a stored connection. ``namespace`` empty: not a Pod (an external address
    or a Node). ``labels`` None: a Pod whose labels are unknown (cannot be evaluated)."""

    ip: str
    namespace: str = ""
    pod: str = ""
    labels: Mapping[str, str] | None = None
    namespace_labels: Mapping[str, str] | None = None
    ports: tuple[tuple[str, int, str], ...] = ()  # named container ports, for named-port rules

    @property
    def is_pod(self) -> bool:
        return bool(self.namespace)

    @property
    def workload(self) -> str:
        return f"{self.namespace}/{workload_of(self.pod)}" if self.is_pod else self.ip

    def peer(self) -> PeerInfo:
        addr = ipaddress.ip_address(self.ip)
        if not self.is_pod:
            return PeerInfo(addr)
        ns_labels = self.namespace_labels or {NAMESPACE_NAME_LABEL: self.namespace}
        return PeerInfo(addr, self.namespace, self.labels, ns_labels, self.ports)


@dataclass(frozen=True, slots=True)
class FlowKey:
    """A distinct connection shape of the history and what it moved."""

    source: Endpoint
    destination: Endpoint
    port: int  # destination port after DNAT
    protocol: int  # IP protocol number
    octets: int = 0  # both directions
    records: int = 0  # flow records stored for the key
    last_seen: int = 0  # epoch seconds
    denied: bool = False  # the stored record said Drop or Reject


# Kubernetes generates name suffixes and template hashes from an alphabet without vowels
# (so they never spell words): "cache" is a name, "x2x5z" a suffix.
_SAFE = "[bcdfghjklmnpqrstvwxz2456789]"
_HASHED = re.compile(rf"^(?P<base>.+?)(?:-{_SAFE}{{5,10}})?-{_SAFE}{{5}}$")
_ORDINAL = re.compile(r"^(?P<base>.+)-\d+$")


def workload_of(pod: str) -> str:
    """The workload a Pod name belongs to, from the names controllers generate:
    ``<deployment>-<hash>-<5>``, ``<daemonset>-<5>``, ``<statefulset>-<ordinal>`` (a
    heuristic until the store keeps the owner's name; a bare Pod keeps its own name)."""
    m = _ORDINAL.match(pod) or _HASHED.match(pod)
    return m.group("base") if m else pod


# --------------------------------------------------------------------------- deciding

@dataclass(frozen=True, slots=True)
class Decision:
    """Both directions' verdicts for one key (None: no policy applies at that end)."""

    egress: Verdict | None
    ingress: Verdict | None

    @property
    def allowed(self) -> bool:
        return not any(v is not None and v.action == ACTION_DROP for v in (self.egress, self.ingress))

    def deciding(self) -> Verdict | None:
        """The verdict that denies (egress first, as the packet meets it), or the one that allows."""
        for v in (self.egress, self.ingress):
            if v is not None and v.action == ACTION_DROP:
                return v
        return self.ingress or self.egress


def decide(policies: PolicySet, key: FlowKey, peers: tuple[PeerInfo, PeerInfo] | None = None,
           directions: tuple[bool, bool] = (True, True), known: Decision | None = None) -> Decision:
    """The verdicts the agent would record for ``key`` under ``policies``.

    ``peers``: the two ends already as PeerInfo (a caller evaluating many keys converts
    each endpoint once); ``directions``: (egress, ingress) to evaluate, the others taken
    from ``known``.
    """
    src, dst = peers or (key.source.peer(), key.destination.peer())
    egress = known.egress if known is not None else None
    ingress = known.ingress if known is not None else None
    if key.source.is_pod and directions[0]:
        egress = evaluate_tiers(policies, ingress=False, pod=src, other=dst, dest=dst, port=key.port, protocol=key.protocol)
    if key.destination.is_pod and directions[1]:
        ingress = evaluate_tiers(policies, ingress=True, pod=dst, other=src, dest=dst, port=key.port, protocol=key.protocol)
    return Decision(egress, ingress)


def _resolved(key: FlowKey) -> bool:
    return all(e.labels is not None for e in (key.source, key.destination) if e.is_pod)


# --------------------------------------------------------------------------- what-if

@dataclass(frozen=True, slots=True)
class Change:
    key: FlowKey
    before: Decision
    after: Decision

    @property
    def newly_denied(self) -> bool:
        return self.before.allowed and not self.after.allowed


@dataclass
class WhatIf:
    """The result of :func:`what_if`."""

    changes: list[Change] = field(default_factory=list)
    evaluated: int = 0
    unresolved: list[FlowKey] = field(default_factory=list)

    @property
    def breaks(self) -> list[Change]:
        """Changes to denied of connections that actually flowed."""
        return [c for c in self.changes if c.newly_denied and not c.key.denied]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary, grouped by source and destination workload."""
        groups: dict[tuple[str, str], list[Change]] = {}
        for c in self.changes:
            groups.setdefault((c.key.source.workload, c.key.destination.workload), []).append(c)
        out = []
        for (src, dst), changes in sorted(groups.items()):
            out.append({
                "source": src, "destination": dst,
                "octets": sum(c.key.octets for c in changes),
                "records": sum(c.key.records for c in changes),
                "lastSeen": max(c.key.last_seen for c in changes),
                "changes": [_change_json(c) for c in sorted(changes, key=_change_order)],
            })
        return {
            "evaluated": self.evaluated,
            "changed": len(self.changes),
            "newlyDenied": sum(1 for c in self.changes if c.newly_denied),
            "newlyAllowed": sum(1 for c in self.changes if not c.newly_denied),
            "breaks": len(self.breaks),
            "groups": out,
            "unresolved": [_key_json(k) for k in self.unresolved],
        }


def _change_order(c: Change) -> tuple[Any, ...]:
    k = c.key
    return (k.source.namespace, k.source.pod, k.source.ip, k.destination.namespace, k.destination.pod,
            k.destination.ip, k.protocol, k.port)


def _verdict_json(v: Verdict | None) -> dict[str, Any] | None:
    if v is None:
        return None
    tier = {ANP_KIND: "admin", BANP_KIND: "baseline"}.get(v.kind, "namespaced")
    return {"name": v.policy_name, "namespace": v.policy_namespace, "rule": v.rule_name, "kind": v.kind,
            "action": "Allow" if v.action == 1 else "Drop", "policyType": v.policy_type, "tier": tier}


def _key_json(k: FlowKey) -> dict[str, Any]:
    def end(e: Endpoint) -> dict[str, Any]:
        return {"namespace": e.namespace, "pod": e.pod, "ip": e.ip}

    return {"source": end(k.source), "destination": end(k.destination), "port": k.port,
            "protocol": PROTOCOL_NAMES.get(k.protocol, str(k.protocol)), "octets": k.octets, "records": k.records,
            "lastSeen": k.last_seen, "storedVerdict": "denied" if k.denied else "allowed"}


def _change_json(c: Change) -> dict[str, Any]:
    d = _key_json(c.key)
    d.update(change="allowed->denied" if c.newly_denied else "denied->allowed",
             before=_verdict_json(c.before.deciding()), after=_verdict_json(c.after.deciding()))
    return d


def what_if(
    keys: Iterable[FlowKey],
    current: Sequence[NetworkPolicy | ClusterPolicy],
    proposed: Sequence[NetworkPolicy | ClusterPolicy],
    *,
    replace: bool = False,
) -> WhatIf:
    """Which keys change verdict when ``proposed`` is applied (see the module docstring)."""
    before_set = PolicySet.of(list(current))
    after_set = PolicySet.of(list(proposed) if replace else [*current, *proposed])
    # A direction at a Pod can change only if a policy that differs between the two sets
    # (a proposed one, or the current one it replaces) applies there: a NetworkPolicy of
    # the Pod's namespace for that direction, a cluster policy whose subject selects the
    # Pod and that has rules for that direction. Every other direction keeps its verdict
    # and is not evaluated twice. With ``replace`` everything may change.
    delta: list[NetworkPolicy | ClusterPolicy] | None = None
    if not replace:
        replaced = {_policy_key(p) for p in proposed}
        delta = [*proposed, *(p for p in current if _policy_key(p) in replaced)]
    applies: dict[tuple[int, bool], bool] = {}

    def may_change(e: Endpoint, p: PeerInfo, ingress: bool) -> bool:
        if not e.is_pod:
            return False
        if delta is None:
            return True
        hit = applies.get((id(e), ingress))
        if hit is None:
            hit = applies[(id(e), ingress)] = any(_may_apply(d, p, ingress) for d in delta)
        return hit

    peers: dict[int, PeerInfo] = {}  # by endpoint identity: the resolver shares Endpoint objects

    def peer(e: Endpoint) -> PeerInfo:
        p = peers.get(id(e))
        if p is None:
            p = peers[id(e)] = e.peer()
            held.append(e)  # keep it alive, so its id is not reused
        return p

    held: list[Endpoint] = []
    result = WhatIf()
    for key in keys:
        src, dst = key.source, key.destination
        if not (src.is_pod or dst.is_pod):
            continue  # no Pod end: no policy applies
        if not _resolved(key):
            result.unresolved.append(key)
            continue
        result.evaluated += 1
        ends = (peer(src), peer(dst))
        dirs = (may_change(src, ends[0], False), may_change(dst, ends[1], True))
        if not (dirs[0] or dirs[1]):
            continue
        before = decide(before_set, key, ends)
        after = decide(after_set, key, ends, dirs, before)
        if before.allowed != after.allowed:
            result.changes.append(Change(key, before, after))
    return result


def _policy_key(p: NetworkPolicy | ClusterPolicy) -> tuple[str, str, str]:
    return ("NetworkPolicy", p.namespace, p.name) if isinstance(p, NetworkPolicy) else (p.kind, "", p.name)


def _may_apply(p: NetworkPolicy | ClusterPolicy, pod: PeerInfo, ingress: bool) -> bool:
    """Whether ``p`` can take part in deciding the direction at ``pod``."""
    if isinstance(p, NetworkPolicy):
        return p.namespace == pod.namespace and (p.affects_ingress if ingress else p.affects_egress)
    return bool(p.ingress if ingress else p.egress) and p.selects(pod)


# --------------------------------------------------------------------------- recommendation

def _selector_labels(pods: Iterable[Endpoint]) -> dict[str, str]:
    common: dict[str, str] | None = None
    for p in pods:
        labels = {k: v for k, v in (p.labels or {}).items() if k not in VOLATILE_LABELS}
        common = labels if common is None else {k: v for k, v in common.items() if labels.get(k) == v}
    return dict(sorted((common or {}).items()))


def _host_cidr(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"


def _port_entries(ports: set[tuple[int, int]]) -> list[dict[str, Any]]:
    return [{"protocol": PROTOCOL_NAMES[proto], "port": port} for proto, port in sorted(ports, key=lambda x: (PROTOCOL_NAMES[x[0]], x[1]))]


@dataclass
class _Workload:
    namespace: str
    name: str
    pods: dict[str, Endpoint] = field(default_factory=dict)
    ingress: dict[tuple[Any, ...], set[tuple[int, int]]] = field(default_factory=dict)
    egress: dict[tuple[Any, ...], set[tuple[int, int]]] = field(default_factory=dict)


def recommend(keys: Iterable[FlowKey], namespace: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Least-privilege NetworkPolicies (as Kubernetes objects) for ``namespace`` and the
    warnings met on the way (keys left out, and why)."""
    workloads: dict[str, _Workload] = {}
    peers: dict[str, _Workload] = {}  # Pod peers of other namespaces, by workload, for their selectors
    warnings: list[str] = []
    kept: list[FlowKey] = []
    for key in keys:
        src, dst = key.source, key.destination
        if namespace not in (src.namespace, dst.namespace):
            continue
        if key.denied:
            continue  # never open what a policy closed
        if key.protocol not in PROTOCOL_NAMES:
            warnings.append(f"{src.workload} -> {dst.workload}: protocol {key.protocol} has no NetworkPolicy form; left out")
            continue
        if not _resolved(key):
            warnings.append(f"{_label(src)} -> {_label(dst)}:{key.port}: a Pod end has no known labels; left out")
            continue
        kept.append(key)
        for e in (src, dst):
            if e.is_pod:
                table = workloads if e.namespace == namespace else peers
                w = table.setdefault(e.workload, _Workload(e.namespace, workload_of(e.pod)))
                w.pods[e.pod] = e
    selectors = {name: _selector_labels(w.pods.values()) for name, w in {**peers, **workloads}.items()}
    for name, sel in selectors.items():
        if not sel:
            warnings.append(f"{name}: its Pods share no stable label; its rules select every Pod of the namespace")

    def peer_of(e: Endpoint) -> tuple[Any, ...]:
        if not e.is_pod:
            return ("ip", _host_cidr(e.ip))
        return ("pod", e.namespace, tuple(selectors[e.workload].items()))

    for key in kept:
        port = (key.protocol, key.port)
        if key.destination.namespace == namespace:
            workloads[key.destination.workload].ingress.setdefault(peer_of(key.source), set()).add(port)
        if key.source.namespace == namespace:
            workloads[key.source.workload].egress.setdefault(peer_of(key.destination), set()).add(port)

    def peer_json(peer: tuple[Any, ...]) -> dict[str, Any]:
        if peer[0] == "ip":
            return {"ipBlock": {"cidr": peer[1]}}
        _, ns, labels = peer
        out: dict[str, Any] = {"podSelector": {"matchLabels": dict(labels)} if labels else {}}
        if ns != namespace:
            out = {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: ns}}, **out}
        return out

    def rules(table: dict[tuple[Any, ...], set[tuple[int, int]]], peer_key: str) -> list[dict[str, Any]]:
        return [{peer_key: [peer_json(p)], "ports": _port_entries(ports)} for p, ports in sorted(table.items(), key=repr)]

    out: list[dict[str, Any]] = [{
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "default-deny", "namespace": namespace,
                     "labels": {"app.kubernetes.io/managed-by": "flowscope"}},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }]
    for wname, w in sorted(workloads.items()):
        if not w.ingress and not w.egress:
            continue
        spec: dict[str, Any] = {"podSelector": {"matchLabels": selectors[wname]} if selectors[wname] else {}}
        types = []
        if w.ingress:
            types.append("Ingress")
            spec["ingress"] = rules(w.ingress, "from")
        if w.egress:
            types.append("Egress")
            spec["egress"] = rules(w.egress, "to")
        spec["policyTypes"] = types
        out.append({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": _dns_name(f"{w.name}-observed"), "namespace": namespace,
                         "labels": {"app.kubernetes.io/managed-by": "flowscope"}},
            "spec": spec,
        })
    return out, warnings


def _label(e: Endpoint) -> str:
    return f"{e.namespace}/{e.pod}" if e.is_pod else e.ip


def _dns_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return name[:63].rstrip("-") or "workload"
