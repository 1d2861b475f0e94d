"""The agent's IPFIX records: templates and the pure builder from a store export to a record.

Two templates carry every information element of the design's agent tables: one with
the IPv4 address elements (sourceIPv4Address, destinationIPv4Address,
destinationClusterIPv4) and one with the IPv6 ones; a connection uses the template of
its address family. Records are dicts keyed by element names, as flowscope.ipfix wants.

Field choices, as in Antrea's agent:
- source address and port are the original direction's; the destination address and
  port are the endpoint after DNAT (the reply direction's source), so that a connection
  to a ClusterIP names the Pod that served it; the ClusterIP and Service port go in
  destinationClusterIPv4/IPv6 and destinationServicePort ("0.0.0.0"/"::" and 0 when the
  destination is no Service);
- flowStartSeconds/flowEndSeconds come from conntrack timestamps (when
  nf_conntrack_timestamp is on), else from when the agent first saw the connection and
  the export time;
- the ICMP type and code go nowhere (the design has no ICMP element); ports are 0;
- destinationServiceIPv4/IPv6 repeats destinationClusterIPv4/IPv6 (Antrea deprecated the
  latter for the former and sends both);
- proxySnatIPv4/IPv6 and proxySnatPort come from conntrack's reply tuple when it shows
  source NAT (its destination is not the original source, or its port not the original
  port: a masqueraded to-external connection, or a Service's SNAT), as Antrea's agent
  derives them; "0.0.0.0"/"::" and 0 when there was none;
- egressName, egressIP and egressNodeName stay empty: flowscope knows no Egress objects
  (Antrea sends them empty too when no Egress applied);
- sourcePodLabels/destinationPodLabels only when the agent is told to (the second pair
  of templates, :func:`templates` with ``labels``).
"""

from __future__ import annotations

import socket
from typing import Any

from flowscope.agent.metadata import Enrichment
from flowscope.agent.store import FlowExport
from flowscope.ipfix import Registry, Template
from flowscope.ipfix.antrea import AGENT_IPV4_FIELDS, AGENT_IPV6_FIELDS, agent_fields

__all__ = ["IPV4_TEMPLATE_ID", "IPV6_TEMPLATE_ID", "FIELDS_IPV4", "FIELDS_IPV6", "templates", "build_record"]

IPV4_TEMPLATE_ID = 256
IPV6_TEMPLATE_ID = 257

# The shared field lists (fixed-length first, strings last), so that the aggregator and
# the conformance tests agree with what the agent sends.
FIELDS_IPV4 = AGENT_IPV4_FIELDS
FIELDS_IPV6 = AGENT_IPV6_FIELDS


def templates(registry: Registry | None = None, *, labels: bool = False) -> list[Template]:
    """The IPv4 and IPv6 templates (with the Pod label elements if ``labels``)."""
    return [
        Template.build(IPV4_TEMPLATE_ID, agent_fields(4, labels=labels), registry),
        Template.build(IPV6_TEMPLATE_ID, agent_fields(6, labels=labels), registry),
    ]


def _ntop(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


def build_record(fe: FlowExport, k8s: Enrichment) -> tuple[int, dict[str, Any]]:
    """The template id and record dict of one export."""
    e = fe.entry
    v6 = len(e.orig_src) == 16
    ing, egr = k8s.ingress, k8s.egress
    rec: dict[str, Any] = {
        "flowStartSeconds": int(fe.start_time),
        "flowEndSeconds": int(fe.end_time),
        "flowEndReason": int(fe.reason),
    }
    if v6:
        rec["sourceIPv6Address"] = _ntop(e.orig_src)
        rec["destinationIPv6Address"] = _ntop(e.reply_src)
    else:
        rec["sourceIPv4Address"] = _ntop(e.orig_src)
        rec["destinationIPv4Address"] = _ntop(e.reply_src)
    rec.update(
        sourceTransportPort=e.orig_sport,
        destinationTransportPort=e.reply_sport,
        protocolIdentifier=e.protocol,
        packetTotalCount=e.orig_packets,
        octetTotalCount=e.orig_bytes,
        packetDeltaCount=fe.packet_delta,
        octetDeltaCount=fe.octet_delta,
        reversePacketTotalCount=e.reply_packets,
        reverseOctetTotalCount=e.reply_bytes,
        reversePacketDeltaCount=fe.reverse_packet_delta,
        reverseOctetDeltaCount=fe.reverse_octet_delta,
        sourcePodNamespace=k8s.source_pod_namespace,
        sourcePodName=k8s.source_pod_name,
        destinationPodNamespace=k8s.destination_pod_namespace,
        destinationPodName=k8s.destination_pod_name,
        sourceNodeName=k8s.source_node_name,
        destinationNodeName=k8s.destination_node_name,
    )
    snat = e.reply_dst != e.orig_src or e.reply_dport != e.orig_sport
    if v6:
        rec["destinationClusterIPv6"] = rec["destinationServiceIPv6"] = k8s.destination_cluster_ip or "::"
        rec["proxySnatIPv6"] = _ntop(e.reply_dst) if snat else "::"
    else:
        rec["destinationClusterIPv4"] = rec["destinationServiceIPv4"] = k8s.destination_cluster_ip or "0.0.0.0"
        rec["proxySnatIPv4"] = _ntop(e.reply_dst) if snat else "0.0.0.0"
    rec["proxySnatPort"] = e.reply_dport if snat else 0
    rec.update(
        destinationServicePort=k8s.destination_service_port,
        destinationServicePortName=k8s.destination_service_port_name,
        ingressNetworkPolicyName=ing.policy_name if ing else "",
        ingressNetworkPolicyNamespace=ing.policy_namespace if ing else "",
        ingressNetworkPolicyType=ing.policy_type if ing else 0,
        ingressNetworkPolicyRuleName=ing.rule_name if ing else "",
        ingressNetworkPolicyRuleAction=ing.action if ing else 0,
        egressNetworkPolicyName=egr.policy_name if egr else "",
        egressNetworkPolicyNamespace=egr.policy_namespace if egr else "",
        egressNetworkPolicyType=egr.policy_type if egr else 0,
        egressNetworkPolicyRuleName=egr.rule_name if egr else "",
        egressNetworkPolicyRuleAction=egr.action if egr else 0,
        tcpState=e.tcp_state_name if e.protocol == 6 else "",
        flowType=k8s.flow_type,
        egressName="",
        egressIP="",
        egressNodeName="",
    )
    if k8s.source_pod_labels is not None:
        rec["sourcePodLabels"] = k8s.source_pod_labels
        rec["destinationPodLabels"] = k8s.destination_pod_labels or ""
    return (IPV6_TEMPLATE_ID if v6 else IPV4_TEMPLATE_ID), rec
