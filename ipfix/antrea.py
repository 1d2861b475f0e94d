"""The field lists of Antrea's flow records, shared by everyone who builds their templates.

The agent's Flow Exporter, the Flow Aggregator, ``flowscope export --template`` and the
conformance tests must all agree on which information elements an Antrea record carries
and in which order; this module is that single list, taken from the tables of the
Network Flow Visibility design (IANA, RFC 5103 reverse and Antrea PEN 56506 elements).

Order matters for speed, not for meaning: every fixed-length field comes first and the
variable-length strings last, so a decoder reads all fixed fields of a record with one
precompiled struct and then walks the strings. Within each group the order follows the
design's tables. The IPv4 record leaves out destinationClusterIPv6 and the IPv6 record
destinationClusterIPv4, each carrying the addresses of its own family only.

The aggregator adds :data:`AGGREGATOR_EXTRA_FIELDS` (fixed-length, appended before the
strings by :func:`aggregator_fields`). originalObservationDomainId is IANA element 405;
the design's "151" is flowEndSeconds.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = [
    "AGENT_IPV4_FIELDS",
    "AGENT_IPV6_FIELDS",
    "AGENT_STRING_FIELDS",
    "AGGREGATOR_EXTRA_FIELDS",
    "AGGREGATOR_IPV4_FIELDS",
    "AGGREGATOR_IPV6_FIELDS",
    "TEMPLATES",
    "agent_fields",
    "aggregator_fields",
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
)

#: Every element of the agent's IPv4 flow record: fixed-length fields first, then strings.
AGENT_IPV4_FIELDS: Final[tuple[str, ...]] = (
    _COMMON_HEAD + _IPV4_ADDRESSES + _COMMON_FIXED + ("destinationClusterIPv4",) + _ANTREA_FIXED + AGENT_STRING_FIELDS
)

#: Every element of the agent's IPv6 flow record: fixed-length fields first, then strings.
AGENT_IPV6_FIELDS: Final[tuple[str, ...]] = (
    _COMMON_HEAD + _IPV6_ADDRESSES + _COMMON_FIXED + ("destinationClusterIPv6",) + _ANTREA_FIXED + AGENT_STRING_FIELDS
)

#: What the Flow Aggregator adds to an agent record (all fixed-length).
AGGREGATOR_EXTRA_FIELDS: Final[tuple[str, ...]] = (
    "originalExporterIPv4Address",
    "originalObservationDomainId",
    "packetTotalCountFromSourceNode",
    "octetTotalCountFromSourceNode",
    "packetDeltaCountFromSourceNode",
    "octetDeltaCountFromSourceNode",
    "reversePacketTotalCountFromSourceNode",
    "reverseOctetTotalCountFromSourceNode",
    "reversePacketDeltaCountFromSourceNode",
    "reverseOctetDeltaCountFromSourceNode",
    "packetTotalCountFromDestinationNode",
    "octetTotalCountFromDestinationNode",
    "packetDeltaCountFromDestinationNode",
    "octetDeltaCountFromDestinationNode",
    "reversePacketTotalCountFromDestinationNode",
    "reverseOctetTotalCountFromDestinationNode",
    "reversePacketDeltaCountFromDestinationNode",
    "reverseOctetDeltaCountFromDestinationNode",
)


def agent_fields(family: Literal[4, 6]) -> tuple[str, ...]:
    """The agent record's elements for IP version 4 or 6."""
    if family == 4:
        return AGENT_IPV4_FIELDS
    if family == 6:
        return AGENT_IPV6_FIELDS
    raise ValueError(f"IP family {family!r} is not 4 or 6")


def aggregator_fields(family: Literal[4, 6]) -> tuple[str, ...]:
    """The aggregated record: the agent's fixed fields, the aggregator's, then the strings."""
    base = agent_fields(family)
    fixed = tuple(name for name in base if name not in AGENT_STRING_FIELDS)
    return fixed + AGGREGATOR_EXTRA_FIELDS + AGENT_STRING_FIELDS


AGGREGATOR_IPV4_FIELDS: Final[tuple[str, ...]] = aggregator_fields(4)
AGGREGATOR_IPV6_FIELDS: Final[tuple[str, ...]] = aggregator_fields(6)

#: Predefined templates by the names ``flowscope export --template`` accepts.
TEMPLATES: Final[dict[str, tuple[str, ...]]] = {
    "agent-ipv4": AGENT_IPV4_FIELDS,
    "agent-ipv6": AGENT_IPV6_FIELDS,
    "aggregator-ipv4": AGGREGATOR_IPV4_FIELDS,
    "aggregator-ipv6": AGGREGATOR_IPV6_FIELDS,
}
