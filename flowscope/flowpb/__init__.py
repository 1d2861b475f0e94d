"""Antrea's gRPC flow message, and the one mapping between it and flowscope's flow records.

Since v2.4 Antrea's Flow Exporter talks to its Flow Aggregator over gRPC by default:
a client stream of ``ExportRequest`` batches of ``Flow`` messages to
``FlowExportService.Export``, over mutual TLS. ``flow.proto`` beside this file is our
own definition of that API with Antrea's package, services, messages, field names and
numbers (tests/test_flowpb.py compares it with Antrea's published one as data);
``flow_pb2.py`` and ``flow_pb2_grpc.py`` are what grpcio-tools generates from it. They
are committed rather than generated at set-up: the wheel, the container image and a
checkout then work without the code generator, and the test regenerates them to prove
they are not stale.

Everything else in flowscope speaks flow records: dicts keyed by IPFIX element names,
as the agent builds them and the aggregator ingests them. :func:`record_to_flow` and
:func:`flow_to_record` are the only translation, so a flow sent over gRPC becomes the
same record the same flow sent over IPFIX would have decoded to (addresses as text,
"0.0.0.0"/"::" and 0 where Antrea leaves a field empty, Pod labels as the JSON object
text Antrea's IPFIX carries).
"""

from __future__ import annotations

import json
import socket
from typing import Any

from . import flow_pb2, flow_pb2_grpc

__all__ = ["flow_pb2", "flow_pb2_grpc", "record_to_flow", "flow_to_record", "SERVICE_PORT"]

SERVICE_PORT = 14739  # the Flow Aggregator's gRPC port in Antrea

# Kubernetes message field -> record element, for the fields that copy across unchanged.
_K8S_SAME = (
    ("source_pod_namespace", "sourcePodNamespace"), ("source_pod_name", "sourcePodName"),
    ("source_node_name", "sourceNodeName"), ("destination_pod_namespace", "destinationPodNamespace"),
    ("destination_pod_name", "destinationPodName"), ("destination_node_name", "destinationNodeName"),
    ("destination_service_port", "destinationServicePort"), ("destination_service_port_name", "destinationServicePortName"),
    ("ingress_network_policy_type", "ingressNetworkPolicyType"),
    ("ingress_network_policy_namespace", "ingressNetworkPolicyNamespace"),
    ("ingress_network_policy_name", "ingressNetworkPolicyName"),
    ("ingress_network_policy_rule_name", "ingressNetworkPolicyRuleName"),
    ("ingress_network_policy_rule_action", "ingressNetworkPolicyRuleAction"),
    ("egress_network_policy_type", "egressNetworkPolicyType"),
    ("egress_network_policy_namespace", "egressNetworkPolicyNamespace"),
    ("egress_network_policy_name", "egressNetworkPolicyName"),
    ("egress_network_policy_rule_name", "egressNetworkPolicyRuleName"),
    ("egress_network_policy_rule_action", "egressNetworkPolicyRuleAction"),
    ("egress_name", "egressName"), ("egress_node_name", "egressNodeName"),
    ("flow_type", "flowType"),
)


def _pack(text: str | None) -> bytes:
    """An address as Antrea's messages carry it: raw octets, empty for none."""
    if not text or text in ("0.0.0.0", "::"):
        return b""
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


def _text(raw: bytes, v6: bool) -> str:
    if not raw:
        return "::" if v6 else "0.0.0.0"
    if len(raw) not in (4, 16):
        raise ValueError(f"an address of {len(raw)} octets")
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


def _labels_in(text: str | None, into: Any) -> None:
    """Labels JSON into a Labels message; "" (no Pod, no labels known) leaves it unset."""
    if text:
        into.SetInParent()  # present even when the Pod has no labels ("{}")
        into.labels.update(json.loads(text))


def _labels_out(flow_k8s: Any, field: str) -> str:
    if not flow_k8s.HasField(field):
        return ""
    return json.dumps(dict(getattr(flow_k8s, field).labels), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)


def record_to_flow(rec: dict[str, Any], *, observation_domain_id: int = 0, export_time: int = 0) -> Any:
    """A flowscope agent record (IPFIX element names) as Antrea's ``Flow`` message."""
    v6 = "sourceIPv6Address" in rec
    fam = "IPv6" if v6 else "IPv4"
    f = flow_pb2.Flow()
    f.ipfix.observation_domain_id = observation_domain_id
    f.ipfix.export_time.seconds = export_time
    f.start_ts.seconds = int(rec["flowStartSeconds"])
    f.end_ts.seconds = int(rec["flowEndSeconds"])
    f.end_reason = int(rec["flowEndReason"])
    f.ip.version = 6 if v6 else 4
    f.ip.source = _pack(rec[f"source{fam}Address"])
    f.ip.destination = _pack(rec[f"destination{fam}Address"])
    t = f.transport
    t.protocol_number = int(rec["protocolIdentifier"])
    t.source_port = int(rec["sourceTransportPort"])
    t.destination_port = int(rec["destinationTransportPort"])
    if rec.get("tcpState"):
        t.TCP.state_name = rec["tcpState"]
    k = f.k8s
    for pb, name in _K8S_SAME:
        value = rec.get(name)
        if value:
            setattr(k, pb, value)
    fam_short = "v6" if v6 else "v4"
    k.destination_cluster_ip = _pack(rec.get(f"destinationClusterIP{fam_short}"))
    k.destination_service_ip = _pack(rec.get(f"destinationServiceIP{fam_short}") or rec.get(f"destinationClusterIP{fam_short}"))
    k.egress_ip = _pack(rec.get("egressIP"))
    if "sourcePodLabels" in rec:
        _labels_in(rec["sourcePodLabels"], k.source_pod_labels)
        _labels_in(rec.get("destinationPodLabels"), k.destination_pod_labels)
    for stats, prefix in ((f.stats, ""), (f.reverse_stats, "reverse")):
        def get(name: str) -> int:
            key = prefix + name[0].upper() + name[1:] if prefix else name
            return int(rec.get(key, 0))
        stats.packet_total_count = get("packetTotalCount")
        stats.packet_delta_count = get("packetDeltaCount")
        stats.octet_total_count = get("octetTotalCount")
        stats.octet_delta_count = get("octetDeltaCount")
    f.proxy_snat_ip = _pack(rec.get(f"proxySnatIP{fam_short}"))
    f.proxy_snat_port = int(rec.get("proxySnatPort", 0))
    return f


def flow_to_record(f: Any) -> dict[str, Any]:
    """Antrea's ``Flow`` message as the agent record the same flow would be over IPFIX.
    A message that is not a flow (no IP version, addresses of the wrong size) raises ValueError."""
    if f.ip.version not in (4, 6):
        raise ValueError(f"flow with IP version {f.ip.version}")
    v6 = f.ip.version == 6
    fam, short = ("IPv6", "v6") if v6 else ("IPv4", "v4")
    k = f.k8s
    rec: dict[str, Any] = {
        "flowStartSeconds": f.start_ts.seconds,
        "flowEndSeconds": f.end_ts.seconds,
        "flowEndReason": int(f.end_reason),
        f"source{fam}Address": _text(f.ip.source, v6),
        f"destination{fam}Address": _text(f.ip.destination, v6),
        "sourceTransportPort": f.transport.source_port,
        "destinationTransportPort": f.transport.destination_port,
        "protocolIdentifier": f.transport.protocol_number,
        "packetTotalCount": f.stats.packet_total_count,
        "octetTotalCount": f.stats.octet_total_count,
        "packetDeltaCount": f.stats.packet_delta_count,
        "octetDeltaCount": f.stats.octet_delta_count,
        "reversePacketTotalCount": f.reverse_stats.packet_total_count,
        "reverseOctetTotalCount": f.reverse_stats.octet_total_count,
        "reversePacketDeltaCount": f.reverse_stats.packet_delta_count,
        "reverseOctetDeltaCount": f.reverse_stats.octet_delta_count,
        f"destinationClusterIP{short}": _text(k.destination_cluster_ip or k.destination_service_ip, v6),
        f"destinationServiceIP{short}": _text(k.destination_service_ip or k.destination_cluster_ip, v6),
        f"proxySnatIP{short}": _text(f.proxy_snat_ip, v6),
        "proxySnatPort": f.proxy_snat_port,
        "tcpState": f.transport.TCP.state_name if f.transport.HasField("TCP") else "",
        "egressIP": _text(k.egress_ip, v6) if k.egress_ip else "",
    }
    for pb, name in _K8S_SAME:
        rec[name] = getattr(k, pb)
    if k.HasField("source_pod_labels") or k.HasField("destination_pod_labels"):
        rec["sourcePodLabels"] = _labels_out(k, "source_pod_labels")
        rec["destinationPodLabels"] = _labels_out(k, "destination_pod_labels")
    return rec
