"""Policies realized as nftables rules inside the lab's Pods: the lab's stand-in for a CNI's
policy dataplane, so that a what-if's prediction can be checked against connections that
really fail.

It is a translator, written apart from the evaluator it checks (:func:`evaluate_tiers`
is never called here): selectors are resolved to the lab's Pod addresses, and each
Pod's netns gets one table whose chains follow the spec's tiers. Ingress is enforced in
the destination Pod's input hook (the Nodes forward the SYN and see no answer, as with a
real dataplane); egress in the source Pod's output hook, where a Service's ClusterIP is
not yet translated, so an allowed backend ``IP:targetPort`` also allows the Service's
``ClusterIP:port`` (what a kube-proxy-aware CNI does).

    chain input  { ct established,related accept; jump admin_in; jump np_in; jump base_in }
    admin_in     AdminNetworkPolicy rules selecting the Pod, in priority order:
                 Allow -> accept, Deny -> drop, Pass -> return (skips the remaining ones)
    np_in        when a NetworkPolicy isolates the Pod: its rules -> accept, then drop
    base_in      BaselineAdminNetworkPolicy rules: Allow -> accept, Deny -> drop

Named ports are not translated (the lab's policies use numbers).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flowscope.agent.policy import (
    AdminRule,
    ClusterPolicy,
    NetworkPolicy,
    Peer,
    PolicySet,
    PortSpec,
)

TABLE = "flowscope_policy"


@dataclass(frozen=True)
class LabPod:
    netns: str
    ip: str
    namespace: str
    labels: Mapping[str, str]

    @property
    def ns_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


@dataclass(frozen=True)
class LabService:
    cluster_ip: str
    port: int
    protocol: str  # TCP, UDP
    backend_ip: str
    target_port: int


def _ports(specs: Sequence[PortSpec]) -> list[tuple[str, int | None, int | None]]:
    """(protocol, first, last) per port spec; (proto, None, None): every port; []: everything."""
    out = []
    for s in specs:
        if isinstance(s.port, str):
            raise NotImplementedError("named ports are not translated to nft in the lab")
        out.append((s.protocol.lower(), s.port, s.end_port or s.port))
    return out


def _match(addr_field: str, ips: Sequence[str], port: tuple[str, int | None, int | None] | None) -> str:
    text = f"ip {addr_field} {{ {', '.join(sorted(set(ips)))} }}" if ips else ""
    if port is not None:
        proto, lo, hi = port
        text += f" meta l4proto {proto}" if lo is None else f" {proto} dport {lo}-{hi}"
    return text.strip()


class Translator:
    def __init__(self, policies: PolicySet, pods: Sequence[LabPod], services: Sequence[LabService] = ()) -> None:
        self.policies = policies
        self.pods = pods
        self.services = services

    # which addresses a peer stands for (the ClusterIPs of their Services too, for egress)
    def _np_peer_ips(self, peer: Peer, policy_ns: str) -> list[str]:
        if peer.ip_block is not None:
            return []  # handled as CIDRs
        out = []
        for p in self.pods:
            if peer.namespace_selector is None:
                if p.namespace != policy_ns:
                    continue
            elif not peer.namespace_selector.matches(p.ns_labels):
                continue
            if peer.pod_selector is None or peer.pod_selector.matches(p.labels):
                out.append(p.ip)
        return out

    def _admin_peer_ips(self, rule: AdminRule) -> tuple[list[str], list[str]]:
        ips, cidrs = [], []
        for peer in rule.peers:
            if peer.networks:
                cidrs += [str(n) for n in peer.networks]
                continue
            for p in self.pods:
                assert peer.namespace_selector is not None
                if peer.namespace_selector.matches(p.ns_labels) and (
                        peer.pod_selector is None or peer.pod_selector.matches(p.labels)):
                    ips.append(p.ip)
        return ips, cidrs

    def _rules(self, addr_field: str, ips: list[str], cidrs: list[str], ports: list, verdict: str, egress: bool) -> list[str]:
        lines = []
        for port in ports or [None]:
            if ips:
                lines.append(f"{_match(addr_field, ips, port)} {verdict}")
            for c in cidrs:
                lines.append(f"{_match(addr_field, [c], port)} {verdict}")
            if egress:  # the Services whose backends this rule allows, by ClusterIP and Service port
                for s in self.services:
                    proto_ok = port is None or port[0] == s.protocol.lower()
                    port_ok = port is None or port[1] is None or port[1] <= s.target_port <= (port[2] or 0)
                    if s.backend_ip in ips and proto_ok and port_ok:
                        lines.append(f"ip daddr {s.cluster_ip} {s.protocol.lower()} dport {s.port} {verdict}")
        return lines

    def _cluster_chain(self, pols: Sequence[ClusterPolicy], pod: LabPod, ingress: bool) -> list[str]:
        lines = []
        addr = "saddr" if ingress else "daddr"
        for pol in pols:
            if pod.labels is None or not pol.subject_namespaces.matches(pod.ns_labels):
                continue
            if pol.subject_pods is not None and not pol.subject_pods.matches(pod.labels):
                continue
            for rule in pol.ingress if ingress else pol.egress:
                ips, cidrs = self._admin_peer_ips(rule)
                verdict = {"Allow": "accept", "Deny": "drop", "Pass": "return"}[rule.action]
                lines += self._rules(addr, ips, cidrs, _ports(rule.ports), verdict, not ingress)
        return lines

    def _np_chain(self, pod: LabPod, ingress: bool) -> list[str]:
        isolating: list[NetworkPolicy] = [
            p for p in self.policies.by_namespace.get(pod.namespace, ())
            if (p.affects_ingress if ingress else p.affects_egress) and p.pod_selector.matches(pod.labels)]
        if not isolating:
            return []
        lines = []
        addr = "saddr" if ingress else "daddr"
        for pol in isolating:
            for rule in pol.ingress if ingress else pol.egress:
                ports = _ports(rule.ports)
                if not rule.peers:
                    lines += [f"{_match(addr, [], port)} accept".strip() for port in ports or [None]] if ports else ["accept"]
                    continue
                for peer in rule.peers:
                    if peer.ip_block is not None:
                        excepts = [str(e) for e in peer.ip_block.excepts]
                        for port in ports or [None]:
                            ex = f" ip {addr} != {{ {', '.join(excepts)} }}" if excepts else ""
                            lines.append(f"{_match(addr, [str(peer.ip_block.cidr)], port)}{ex} accept")
                    else:
                        lines += self._rules(addr, self._np_peer_ips(peer, pol.namespace), [], ports, "accept", not ingress)
        return [*lines, "drop"]

    def table(self, pod: LabPod) -> str:
        chains = {
            "admin_in": self._cluster_chain(self.policies.admin, pod, True),
            "np_in": self._np_chain(pod, True),
            "base_in": self._cluster_chain(self.policies.baseline, pod, True),
            "admin_out": self._cluster_chain(self.policies.admin, pod, False),
            "np_out": self._np_chain(pod, False),
            "base_out": self._cluster_chain(self.policies.baseline, pod, False),
        }
        body = "".join(f"  chain {name} {{\n" + "".join(f"    {r}\n" for r in rules) + "  }\n"
                       for name, rules in chains.items())
        return (
            f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n"
            f"table inet {TABLE} {{\n{body}"
            "  chain input { type filter hook input priority 10; ct state established,related accept; "
            "iifname \"lo\" accept; jump admin_in; jump np_in; jump base_in; }\n"
            "  chain output { type filter hook output priority 10; ct state established,related accept; "
            "oifname \"lo\" accept; jump admin_out; jump np_out; jump base_out; }\n"
            "}\n"
        )

    def apply(self) -> None:
        for pod in self.pods:
            subprocess.run(["ip", "netns", "exec", pod.netns, "nft", "-f", "-"], input=self.table(pod), text=True,
                           check=True, capture_output=True)


def clear(pods: Sequence[LabPod]) -> None:
    for pod in pods:
        subprocess.run(["ip", "netns", "exec", pod.netns, "nft", "-f", "-"], text=True, capture_output=True,
                       input=f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n", check=True)

