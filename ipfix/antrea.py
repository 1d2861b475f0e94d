"""The field lists of Antrea's flow records, shared by everyone who builds their templates.

The agent's Flow Exporter, the Flow Aggregator, ``flowscope export --template`` and the
conformance tests must all agree on which information elements an Antrea record carries
and in which order; this module is that single list, taken from the tables of the
Network Flow Visibility design (IANA, RFC 5103 reverse and Antrea PEN 56506 elements).

Order matters for speed, not for meaning: every fixed-length field comes first and the
variable-length strings last, so a decoder reads all fixed fields of a record with one
precompiled struct and then walks the strings. Within each group the order follows the
design's tables. The IPv4 record leaves out the IPv6 addresses and the IPv6 record the
IPv4 ones, each carrying the addresses of its own family only.

Beyond the design's tables the agent record carries every element a current Antrea agent
(v2.7) puts in its templates: destinationServiceIPv4/IPv6 (the Service's address; the
older destinationClusterIPv4/IPv6 stays beside it with the same value), proxySnatIPv4/
IPv6 and proxySnatPort (the source NAT that conntrack's reply tuple shows), and
egressName, egressIP and egressNodeName (the Egress that applied, empty when unknown).
Pod labels (sourcePodLabels, destinationPodLabels: JSON objects, as Antrea writes them)
are optional, off by default (``agent_fields(family, labels=True)``).

The aggregator adds :data:`AGGREGATOR_EXTRA_FIELDS` (fixed-length, appended before the
strings by :func:`aggregator_fields`): the original exporter, the per-node counters, the
per-node flow end times and the six throughput elements as Antrea's Flow Aggregator
computes them; its record always has the two label fields (empty when the agents sent
none). originalObservationDomainId is IANA element 405; the design's "151" is
flowEndSeconds.

One deliberate difference from Antrea's aggregator: the aggregated record's own counters
(packetTotalCount ... reverseOctetDeltaCount) are the source node's whenever it reported
(else the destination node's), where Antrea takes them from whichever record came last.
Ours is deterministic (the same records in any order give the same record); each node's
own numbers are in the ``...FromSourceNode`` / ``...FromDestinationNode`` elements either
way. The throughput elements follow Antrea exactly: octets times 8 over the seconds
between a node's consecutive flowEndSeconds (its first record: since flowStartSeconds),
``throughput`` / ``reverseThroughput`` from the newest record, all reset after an export.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = [
    "AGENT_LABEL_FIELDS",
    "AGENT_IPV4_FIELDS",
    "AGENT_IPV6_FIELDS",
    "AGENT_STRING_FIELDS",
    "AGGREGATOR_EXTRA_FIELDS",
    "AGGREGATOR_TIME_FIELDS",
    "FLOW_COUNTER_FIELDS",
    "NODE_SUFFIXES",
    "AGGREGATOR_IPV4_FIELDS",
    "AGGREGATOR_IPV6_FIELDS",
    "TEMPLATES",
    "agent_fields",
    "aggregator_fields",
    "node_counter_fields",
    # vocabulary
    "DENY_ACTIONS", "ENDED_REASONS", "END_REASONS", "FLOW_TYPES", "POLICY_TYPES", "PROTOCOLS", "RULE_ACTIONS",
    "END_REASON_ACTIVE_TIMEOUT", "END_REASON_END_OF_FLOW", "END_REASON_FORCED_END", "END_REASON_IDLE_TIMEOUT",
    "END_REASON_LACK_OF_RESOURCES", "FLOW_TYPE_FROM_EXTERNAL", "FLOW_TYPE_INTER_NODE", "FLOW_TYPE_INTRA_NODE",
    "FLOW_TYPE_TO_EXTERNAL", "FLOW_TYPE_UNKNOWN", "POLICY_TYPE_ANTREA_CNP", "POLICY_TYPE_K8S_CLUSTER",
    "POLICY_TYPE_ANTREA_NP", "POLICY_TYPE_K8S", "POLICY_TYPE_NONE",
    "RULE_ACTION_ALLOW", "RULE_ACTION_DROP", "RULE_ACTION_NONE", "RULE_ACTION_REJECT",
]

_COMMON_HEAD: Final = ("flowStartSeconds", "flowEndSeconds", "flowEndReason")
_IPV4_ADDRESSES: Final = ("sourceIPv4Address", "destinationIPv4Address")
_IPV6_ADDRESSES: Final = ("sourceIPv6Address", "destinationIPv6Address")
_COMMON_FIXED: Final = (
    "sourceTransportPort",
    "destinationTransportPort",
    "protocolIdentifier",
    "packetTotalCount",
    "octetTotalCount",
    "packetDeltaCount",
    "octetDeltaCount",
    # RFC 5103 reverse elements (PEN 29305)
    "reversePacketTotalCount",
    "reverseOctetTotalCount",
    "reversePacketDeltaCount",
    "reverseOctetDeltaCount",
)
_ANTREA_FIXED: Final = (
    "destinationServicePort",
    "ingressNetworkPolicyType",
    "ingressNetworkPolicyRuleAction",
    "egressNetworkPolicyType",
    "egressNetworkPolicyRuleAction",
    "flowType",
    "proxySnatPort",
)

#: Antrea's variable-length string elements (PEN 56506), in the design's order.
AGENT_STRING_FIELDS: Final[tuple[str, ...]] = (
    "sourcePodNamespace",
    "sourcePodName",
    "destinationPodNamespace",
    "destinationPodName",
    "sourceNodeName",
    "destinationNodeName",
    "destinationServicePortName",
    "ingressNetworkPolicyName",
    "ingressNetworkPolicyNamespace",
    "ingressNetworkPolicyRuleName",
    "egressNetworkPolicyName",
    "egressNetworkPolicyNamespace",
    "egressNetworkPolicyRuleName",
    "tcpState",
    "egressName",
    "egressIP",
    "egressNodeName",
)

#: The Pod labels (JSON objects), sent only when the agent is told to (``podLabels: true``).
AGENT_LABEL_FIELDS: Final[tuple[str, ...]] = ("sourcePodLabels", "destinationPodLabels")

_IPV4_ANTREA: Final = ("destinationClusterIPv4", "destinationServiceIPv4", "proxySnatIPv4")
_IPV6_ANTREA: Final = ("destinationClusterIPv6", "destinationServiceIPv6", "proxySnatIPv6")

#: Every element of the agent's IPv4 flow record: fixed-length fields first, then strings.
AGENT_IPV4_FIELDS: Final[tuple[str, ...]] = (
    _COMMON_HEAD + _IPV4_ADDRESSES + _COMMON_FIXED + _IPV4_ANTREA + _ANTREA_FIXED + AGENT_STRING_FIELDS
)

#: Every element of the agent's IPv6 flow record: fixed-length fields first, then strings.
AGENT_IPV6_FIELDS: Final[tuple[str, ...]] = (
    _COMMON_HEAD + _IPV6_ADDRESSES + _COMMON_FIXED + _IPV6_ANTREA + _ANTREA_FIXED + AGENT_STRING_FIELDS
)

#: A flow's eight counters, as the agent record carries them (totals then deltas, each
#: forward then reverse): the aggregated record has them three times, as the flow's own and
#: once per node with the suffix of :data:`NODE_SUFFIXES`.
FLOW_COUNTER_FIELDS: Final[tuple[str, ...]] = tuple(n for n in _COMMON_FIXED if n.endswith("Count"))

#: The suffixes of the aggregator's per-node elements: the source node's, the destination node's.
NODE_SUFFIXES: Final[tuple[str, str]] = ("FromSourceNode", "FromDestinationNode")


def node_counter_fields(suffix: str) -> tuple[str, ...]:
    """One node's counters in the aggregated record (:data:`FLOW_COUNTER_FIELDS` + ``suffix``)."""
    return tuple(name + suffix for name in FLOW_COUNTER_FIELDS)


#: Each node's last flowEndSeconds, then the throughputs (bits per second): the newest
#: record's, then each node's (forward, reverse).
AGGREGATOR_TIME_FIELDS: Final[tuple[str, ...]] = (
    "flowEndSecondsFromSourceNode",
    "flowEndSecondsFromDestinationNode",
    "throughput",
    "reverseThroughput",
    "throughputFromSourceNode",
    "reverseThroughputFromSourceNode",
    "throughputFromDestinationNode",
    "reverseThroughputFromDestinationNode",
)

#: What the Flow Aggregator adds to an agent record (all fixed-length): the agent that
#: reported it (IPv4 here; :func:`aggregator_fields` names the IPv6 form), each node's
#: counters, then :data:`AGGREGATOR_TIME_FIELDS`.
AGGREGATOR_EXTRA_FIELDS: Final[tuple[str, ...]] = (
    "originalExporterIPv4Address",
    "originalObservationDomainId",
    *node_counter_fields(NODE_SUFFIXES[0]),
    *node_counter_fields(NODE_SUFFIXES[1]),
    *AGGREGATOR_TIME_FIELDS,
)


def agent_fields(family: Literal[4, 6], *, labels: bool = False) -> tuple[str, ...]:
    """The agent record's elements for IP version 4 or 6 (with the Pod labels if ``labels``)."""
    if family == 4:
        base = AGENT_IPV4_FIELDS
    elif family == 6:
        base = AGENT_IPV6_FIELDS
    else:
        raise ValueError(f"IP family {family!r} is not 4 or 6")
    return base + AGENT_LABEL_FIELDS if labels else base


def aggregator_fields(family: Literal[4, 6], exporter_family: Literal[4, 6] = 4) -> tuple[str, ...]:
    """The aggregated record, in template order - the one definition of it: the agent's
    fixed fields, the aggregator's, then the strings (the Pod labels included).

    ``family`` is the flow's addresses', ``exporter_family`` that of the agent's address
    as the aggregator saw it (originalExporterIPv4Address or ...IPv6Address). The Flow
    Aggregator builds its records in this order (flowscope.aggregator.aggregation derives
    its layout from it), its IPFIX sink announces it as the template, the store's schema
    follows it.
    """
    if exporter_family not in (4, 6):
        raise ValueError(f"IP family {exporter_family!r} of the exporter is not 4 or 6")
    base = agent_fields(family)
    fixed = tuple(name for name in base if name not in AGENT_STRING_FIELDS)
    extra = AGGREGATOR_EXTRA_FIELDS
    if exporter_family == 6:
        extra = ("originalExporterIPv6Address", *extra[1:])
    return fixed + extra + AGENT_STRING_FIELDS + AGENT_LABEL_FIELDS


AGGREGATOR_IPV4_FIELDS: Final[tuple[str, ...]] = aggregator_fields(4)
AGGREGATOR_IPV6_FIELDS: Final[tuple[str, ...]] = aggregator_fields(6)

#: Predefined templates by the names ``flowscope export --template`` accepts.
TEMPLATES: Final[dict[str, tuple[str, ...]]] = {
    "agent-ipv4": AGENT_IPV4_FIELDS,
    "agent-ipv6": AGENT_IPV6_FIELDS,
    "aggregator-ipv4": AGGREGATOR_IPV4_FIELDS,
    "aggregator-ipv6": AGGREGATOR_IPV6_FIELDS,
}


# --------------------------------------------------------------------------- vocabulary
# Antrea's value vocabulary, defined once: the agent writes these numbers, the aggregator
# correlates on them, the store and `flowscope flows` name them, the demo prints them.
# Numbers are the IE values on the wire; names are the ones the CLI and filters accept.

FLOW_TYPE_UNKNOWN: Final = 0  # neither end is a Pod (host traffic, or no metadata)
FLOW_TYPE_INTRA_NODE: Final = 1
FLOW_TYPE_INTER_NODE: Final = 2
FLOW_TYPE_TO_EXTERNAL: Final = 3
FLOW_TYPE_FROM_EXTERNAL: Final = 4
#: flowType (56506/137) value -> name.
FLOW_TYPES: Final[dict[int, str]] = {
    FLOW_TYPE_UNKNOWN: "host",
    FLOW_TYPE_INTRA_NODE: "intra-node",
    FLOW_TYPE_INTER_NODE: "inter-node",
    FLOW_TYPE_TO_EXTERNAL: "to-external",
    FLOW_TYPE_FROM_EXTERNAL: "from-external",
}

RULE_ACTION_NONE: Final = 0  # no policy rule applied
RULE_ACTION_ALLOW: Final = 1
RULE_ACTION_DROP: Final = 2
RULE_ACTION_REJECT: Final = 3
#: ingress/egressNetworkPolicyRuleAction (56506/139, 140) value -> name.
RULE_ACTIONS: Final[dict[int, str]] = {
    RULE_ACTION_NONE: "",
    RULE_ACTION_ALLOW: "Allow",
    RULE_ACTION_DROP: "Drop",
    RULE_ACTION_REJECT: "Reject",
}
#: The actions that deny a connection.
DENY_ACTIONS: Final[frozenset[int]] = frozenset((RULE_ACTION_DROP, RULE_ACTION_REJECT))

POLICY_TYPE_NONE: Final = 0
POLICY_TYPE_K8S: Final = 1  # K8s NetworkPolicy
POLICY_TYPE_ANTREA_NP: Final = 2  # Antrea-native NetworkPolicy
POLICY_TYPE_ANTREA_CNP: Final = 3  # Antrea-native ClusterNetworkPolicy
# Kubernetes' cluster-scoped policies (AdminNetworkPolicy and BaselineAdminNetworkPolicy of
# policy.networking.k8s.io): one value for both, as Antrea's registry defines it; the rule's
# policy name tells them apart (the baseline is always "default").
POLICY_TYPE_K8S_CLUSTER: Final = 4
#: ingress/egressNetworkPolicyType (56506/115, 118) value -> name.
POLICY_TYPES: Final[dict[int, str]] = {
    POLICY_TYPE_NONE: "",
    POLICY_TYPE_K8S: "K8sNetworkPolicy",
    POLICY_TYPE_ANTREA_NP: "AntreaNetworkPolicy",
    POLICY_TYPE_ANTREA_CNP: "AntreaClusterNetworkPolicy",
    POLICY_TYPE_K8S_CLUSTER: "K8sClusterNetworkPolicy",
}

END_REASON_IDLE_TIMEOUT: Final = 1
END_REASON_ACTIVE_TIMEOUT: Final = 2
END_REASON_END_OF_FLOW: Final = 3
END_REASON_FORCED_END: Final = 4
END_REASON_LACK_OF_RESOURCES: Final = 5
#: flowEndReason (IANA 136, RFC 5102) value -> name.
END_REASONS: Final[dict[int, str]] = {
    END_REASON_IDLE_TIMEOUT: "idle timeout",
    END_REASON_ACTIVE_TIMEOUT: "active timeout",
    END_REASON_END_OF_FLOW: "end of flow",
    END_REASON_FORCED_END: "forced end",
    END_REASON_LACK_OF_RESOURCES: "lack of resources",
}
#: The reasons that mean the connection is over (an idle timeout only says it was quiet).
ENDED_REASONS: Final[frozenset[int]] = frozenset(
    (END_REASON_END_OF_FLOW, END_REASON_FORCED_END, END_REASON_LACK_OF_RESOURCES))

#: IANA protocol numbers the CLI and filters name.
PROTOCOLS: Final[dict[int, str]] = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}
