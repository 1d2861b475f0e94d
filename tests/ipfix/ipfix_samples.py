"""Antrea agent flow records with every element of the design's tables, for the transport,
peer and collector tests. Values differ per record (index ``i``) so that a test can tell
records apart and compare each one with what was actually sent."""

from __future__ import annotations

import ipaddress
from typing import Any

from flowscope.ipfix.antrea import (
    AGENT_IPV4_FIELDS,
    AGENT_IPV6_FIELDS,
    AGGREGATOR_EXTRA_FIELDS,
    AGGREGATOR_IPV4_FIELDS,
    AGGREGATOR_IPV6_FIELDS,
)

BASE_TIME = 1795716000


def agent_record(i: int, family: int = 4, *, unicode_names: bool = False) -> dict[str, Any]:
    """One complete agent record (every field of AGENT_IPV4/6_FIELDS)."""
    r: dict[str, Any] = {
        "flowStartSeconds": BASE_TIME + i,
        "flowEndSeconds": BASE_TIME + 60 + i,
        "flowEndReason": 1 + i % 5,
        "sourceTransportPort": 30000 + i % 30000,
        "destinationTransportPort": 8080 + i % 7,
        "protocolIdentifier": 6 if i % 3 else 17,
        "packetTotalCount": 1000 + i,
        "octetTotalCount": 2**40 + i * 1500,
        "packetDeltaCount": 10 + i % 100,
        "octetDeltaCount": 15000 + i,
        "reversePacketTotalCount": 900 + i,
        "reverseOctetTotalCount": 2**33 + i * 1400,
        "reversePacketDeltaCount": 9 + i % 50,
        "reverseOctetDeltaCount": 14000 + i,
        "destinationServicePort": 80 + i % 3,
        "ingressNetworkPolicyType": 1 + i % 4,
        "ingressNetworkPolicyRuleAction": 1 + i % 3,
        "egressNetworkPolicyType": 1 + (i + 1) % 4,
        "egressNetworkPolicyRuleAction": 1 + (i + 2) % 3,
        "flowType": 1 + i % 4,
        "sourcePodNamespace": "shop",
        "sourcePodName": f"frontend-7d9f8b6c5-{i:05d}",
        "destinationPodNamespace": "shop" if i % 2 else "payments",
        "destinationPodName": f"cart-5c8d7f9b4-{i % 97:05d}",
        "sourceNodeName": f"k8s-node-{i % 5}",
        "destinationNodeName": f"k8s-node-{(i + 1) % 5}",
        "destinationServicePortName": f"shop/cart:http-{i % 3}",
        "ingressNetworkPolicyName": "cart-allow-frontend",
        "ingressNetworkPolicyNamespace": "shop",
        "ingressNetworkPolicyRuleName": f"rule-{i % 4}",
        "egressNetworkPolicyName": "frontend-egress",
        "egressNetworkPolicyNamespace": "shop",
        "egressNetworkPolicyRuleName": "allow-db",
        "tcpState": "ESTABLISHED" if i % 3 else "",
        "proxySnatPort": 40000 + i % 20000 if i % 4 == 3 else 0,
        "egressName": "egress-prod" if i % 4 == 3 else "",
        "egressIP": f"172.18.0.{i % 200 + 1}" if i % 4 == 3 else "",
        "egressNodeName": f"k8s-node-{i % 5}" if i % 4 == 3 else "",
    }
    if family == 4:
        r["sourceIPv4Address"] = f"10.10.{i // 250 % 250}.{i % 250 + 1}"
        r["destinationIPv4Address"] = f"10.20.{i // 250 % 250}.{(i * 7) % 250 + 1}"
        r["destinationClusterIPv4"] = r["destinationServiceIPv4"] = f"10.96.0.{i % 200 + 10}"
        r["proxySnatIPv4"] = f"192.168.{i % 5}.1" if i % 4 == 3 else "0.0.0.0"
        fields = AGENT_IPV4_FIELDS
    else:
        r["sourceIPv6Address"] = str(ipaddress.IPv6Address((0xFD00_0010 << 96) | (i + 1)))
        r["destinationIPv6Address"] = str(ipaddress.IPv6Address((0xFD00_0020 << 96) | (i * 7 % 65000 + 1)))
        r["destinationClusterIPv6"] = str(ipaddress.IPv6Address((0xFD00_0096 << 96) | (i % 200 + 10)))
        r["destinationServiceIPv6"] = r["destinationClusterIPv6"]
        r["proxySnatIPv6"] = f"fd00:192:168:{i % 5 + 1}::1" if i % 4 == 3 else "::"
        fields = AGENT_IPV6_FIELDS
    if unicode_names:
        r["sourcePodName"] = f"fröntend-ßü-{i}"
    assert set(r) == set(fields), set(r) ^ set(fields)
    return r


def aggregator_record(i: int, family: int = 4) -> dict[str, Any]:
    """An aggregated record: the agent's fields plus every field the aggregator adds."""
    r = agent_record(i, family)
    r["originalExporterIPv4Address"] = f"192.168.{i % 4}.{i % 250 + 1}"
    r["originalObservationDomainId"] = 1000 + i
    for n, name in enumerate(AGGREGATOR_EXTRA_FIELDS[2:]):
        r[name] = (i + 1) * 1000 + n
    r["sourcePodLabels"] = '{"app":"frontend"}' if i % 2 else ""
    r["destinationPodLabels"] = '{"app":"cart","tier":"db"}' if i % 2 else ""
    fields = AGGREGATOR_IPV4_FIELDS if family == 4 else AGGREGATOR_IPV6_FIELDS
    assert set(r) == set(fields), set(r) ^ set(fields)
    return r
