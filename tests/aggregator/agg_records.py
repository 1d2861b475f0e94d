"""Agent records as the two halves of a connection would send them (shared by the aggregator tests)."""

from __future__ import annotations

import sys
from typing import Any

T0 = 1_780_000_000
NODE_A, NODE_B = "192.168.10.1", "192.168.10.2"  # the agents' addresses (originalExporter...)

_K8S_EMPTY: dict[str, Any] = {
    "sourcePodNamespace": "", "sourcePodName": "", "sourceNodeName": "",
    "destinationPodNamespace": "", "destinationPodName": "", "destinationNodeName": "",
    "destinationServicePort": 0, "destinationServicePortName": "",
    "ingressNetworkPolicyName": "", "ingressNetworkPolicyNamespace": "", "ingressNetworkPolicyType": 0,
    "ingressNetworkPolicyRuleName": "", "ingressNetworkPolicyRuleAction": 0,
    "egressNetworkPolicyName": "", "egressNetworkPolicyNamespace": "", "egressNetworkPolicyType": 0,
    "egressNetworkPolicyRuleName": "", "egressNetworkPolicyRuleAction": 0,
    "proxySnatPort": 0, "egressName": "", "egressIP": "", "egressNodeName": "",
}


def agent_record(
    *,
    src: str = "10.0.1.5", dst: str = "10.0.2.7", sport: int = 40000, dport: int = 80, proto: int = 6,
    pkts: int = 10, octets: int = 1000, rpkts: int = 8, roctets: int = 800,
    dpkts: int | None = None, doctets: int | None = None, drpkts: int | None = None, droctets: int | None = None,
    start: int = T0, end: int = T0 + 5, reason: int = 2, tcp: str = "ESTABLISHED", flow_type: int = 2,
    **k8s: Any,
) -> dict[str, Any]:
    """A record like the agent's: the 34 design IEs and Antrea v2.7's six more; deltas default to the totals (first export)."""
    v6 = ":" in src
    fam = "IPv6" if v6 else "IPv4"
    # the keys are the same string objects record after record, as a decoder's (its
    # template's names) are: the aggregator's C loop caches field names by identity
    name = sys.intern
    rec: dict[str, Any] = {
        "flowStartSeconds": start, "flowEndSeconds": end, "flowEndReason": reason,
        name(f"source{fam}Address"): src, name(f"destination{fam}Address"): dst,
        "sourceTransportPort": sport, "destinationTransportPort": dport, "protocolIdentifier": proto,
        "packetTotalCount": pkts, "octetTotalCount": octets,
        "packetDeltaCount": pkts if dpkts is None else dpkts,
        "octetDeltaCount": octets if doctets is None else doctets,
        "reversePacketTotalCount": rpkts, "reverseOctetTotalCount": roctets,
        "reversePacketDeltaCount": rpkts if drpkts is None else drpkts,
        "reverseOctetDeltaCount": roctets if droctets is None else droctets,
        ("destinationClusterIPv6" if v6 else "destinationClusterIPv4"): "::" if v6 else "0.0.0.0",
        name(f"destinationServiceIP{'v6' if v6 else 'v4'}"): "::" if v6 else "0.0.0.0",
        name(f"proxySnatIP{'v6' if v6 else 'v4'}"): "::" if v6 else "0.0.0.0",
        "tcpState": tcp, "flowType": flow_type,
    }
    rec.update(_K8S_EMPTY)
    rec.update(k8s)
    return rec


def source_half(**kw: Any) -> dict[str, Any]:
    """The source node's record of an inter-node flow: source Pod, Service, egress policy."""
    base = dict(sourcePodNamespace="shop", sourcePodName="frontend-1", sourceNodeName="node-a",
                egressNetworkPolicyName="allow-out", egressNetworkPolicyNamespace="shop",
                egressNetworkPolicyType=1, egressNetworkPolicyRuleName="rule-e", egressNetworkPolicyRuleAction=1)
    base.update(kw)
    return agent_record(**base)


def destination_half(**kw: Any) -> dict[str, Any]:
    """The destination node's record of an inter-node flow: destination Pod, ingress policy."""
    base = dict(destinationPodNamespace="shop", destinationPodName="backend-1", destinationNodeName="node-b",
                ingressNetworkPolicyName="allow-web", ingressNetworkPolicyNamespace="shop",
                ingressNetworkPolicyType=1, ingressNetworkPolicyRuleName="rule-i", ingressNetworkPolicyRuleAction=1)
    base.update(kw)
    return agent_record(**base)
