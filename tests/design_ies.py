"""The Antrea design's enterprise information elements, written out by hand from its tables
(shared/design), independently of flowscope.ipfix's registry, for declaring them to the
PyPI ``ipfix`` package when it checks what we put on the wire."""

from __future__ import annotations

# The agent tables (PEN 56506).
ANTREA_SPECS = [
    "sourcePodNamespace(56506/100)<string>[65535]", "sourcePodName(56506/101)<string>[65535]",
    "destinationPodNamespace(56506/102)<string>[65535]", "destinationPodName(56506/103)<string>[65535]",
    "sourceNodeName(56506/104)<string>[65535]", "destinationNodeName(56506/105)<string>[65535]",
    "destinationClusterIPv4(56506/106)<ipv4Address>[4]", "destinationClusterIPv6(56506/107)<ipv6Address>[16]",
    "destinationServicePort(56506/108)<unsigned16>[2]", "destinationServicePortName(56506/109)<string>[65535]",
    "ingressNetworkPolicyName(56506/110)<string>[65535]", "ingressNetworkPolicyNamespace(56506/111)<string>[65535]",
    "ingressNetworkPolicyType(56506/115)<unsigned8>[1]", "ingressNetworkPolicyRuleName(56506/141)<string>[65535]",
    "egressNetworkPolicyName(56506/112)<string>[65535]", "egressNetworkPolicyNamespace(56506/113)<string>[65535]",
    "egressNetworkPolicyType(56506/118)<unsigned8>[1]", "egressNetworkPolicyRuleName(56506/142)<string>[65535]",
    "ingressNetworkPolicyRuleAction(56506/139)<unsigned8>[1]", "egressNetworkPolicyRuleAction(56506/140)<unsigned8>[1]",
    "tcpState(56506/136)<string>[65535]", "flowType(56506/137)<unsigned8>[1]",
    # beyond the design: what a current Antrea agent (v2.7) adds, from go-ipfix's registry table
    "egressName(56506/153)<string>[65535]", "egressIP(56506/154)<string>[65535]",
    "egressNodeName(56506/157)<string>[65535]",
    "destinationServiceIPv4(56506/168)<ipv4Address>[4]", "destinationServiceIPv6(56506/169)<ipv6Address>[16]",
    "proxySnatIPv4(56506/170)<ipv4Address>[4]", "proxySnatIPv6(56506/171)<ipv6Address>[16]",
    "proxySnatPort(56506/172)<unsigned16>[2]",
    "sourcePodLabels(56506/143)<string>[65535]", "destinationPodLabels(56506/144)<string>[65535]",
]

# What the Flow Aggregator adds: IANA 403/404/405 and the per-Node counters 120-135.
AGGREGATOR_SPECS = [
    "originalExporterIPv4Address(403)<ipv4Address>[4]", "originalExporterIPv6Address(404)<ipv6Address>[16]",
    "originalObservationDomainId(405)<unsigned32>[4]",
] + [
    f"{name}From{side}(56506/{120 + 8 * i + j})<unsigned64>[8]"
    for i, side in enumerate(("SourceNode", "DestinationNode"))
    for j, name in enumerate((
        "packetTotalCount", "octetTotalCount", "packetDeltaCount", "octetDeltaCount",
        "reversePacketTotalCount", "reverseOctetTotalCount", "reversePacketDeltaCount", "reverseOctetDeltaCount",
    ))
] + [
    # Antrea's Flow Aggregator today: throughput (145-150) and each node's flow end (151-152)
    "throughput(56506/145)<unsigned64>[8]", "reverseThroughput(56506/146)<unsigned64>[8]",
    "throughputFromSourceNode(56506/147)<unsigned64>[8]", "throughputFromDestinationNode(56506/148)<unsigned64>[8]",
    "reverseThroughputFromSourceNode(56506/149)<unsigned64>[8]",
    "reverseThroughputFromDestinationNode(56506/150)<unsigned64>[8]",
    "flowEndSecondsFromSourceNode(56506/151)<dateTimeSeconds>[4]",
    "flowEndSecondsFromDestinationNode(56506/152)<dateTimeSeconds>[4]",
]
