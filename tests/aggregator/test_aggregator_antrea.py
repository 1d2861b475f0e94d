"""Records shaped exactly like a current Antrea agent's decode by name, correlate and aggregate.

The templates below are Antrea v2.7's agent templates element for element, in its order
(pkg/agent/flowexporter/exporter/ipfix.go: the IANA elements, the four reverse counters,
the Antrea elements, then the family's three addresses), written out here as data. Two
agents' halves of inter-node flows in those templates go through our codec and our
aggregation; the throughput elements must come out as Antrea's aggregator computes them.
"""

from __future__ import annotations

from typing import Any

import pytest

from flowscope.aggregator.aggregation import AggregationProcess
from flowscope.ipfix import Decoder, ExportSession, Template

_IANA = ["flowStartSeconds", "flowEndSeconds", "flowEndReason", "sourceTransportPort", "destinationTransportPort",
         "protocolIdentifier", "packetTotalCount", "octetTotalCount", "packetDeltaCount", "octetDeltaCount"]
_REVERSE = ["reversePacketTotalCount", "reverseOctetTotalCount", "reversePacketDeltaCount", "reverseOctetDeltaCount"]
_ANTREA = ["sourcePodName", "sourcePodNamespace", "sourceNodeName", "destinationPodName", "destinationPodNamespace",
           "destinationNodeName", "destinationServicePort", "destinationServicePortName", "ingressNetworkPolicyName",
           "ingressNetworkPolicyNamespace", "ingressNetworkPolicyType", "ingressNetworkPolicyRuleName",
           "ingressNetworkPolicyRuleAction", "egressNetworkPolicyName", "egressNetworkPolicyNamespace",
           "egressNetworkPolicyType", "egressNetworkPolicyRuleName", "egressNetworkPolicyRuleAction", "tcpState",
           "flowType", "egressName", "egressIP", "egressNodeName", "proxySnatPort"]
ANTREA_AGENT_IPV4 = (_IANA + ["sourceIPv4Address", "destinationIPv4Address"] + _REVERSE + _ANTREA
                     + ["destinationClusterIPv4", "proxySnatIPv4", "destinationServiceIPv4"])
ANTREA_AGENT_IPV6 = (_IANA + ["sourceIPv6Address", "destinationIPv6Address"] + _REVERSE + _ANTREA
                     + ["destinationClusterIPv6", "proxySnatIPv6", "destinationServiceIPv6"])

T0 = 1_790_000_000


def antrea_record(v6: bool, side: str, *, end: int, octets: int, roctets: int, sport: int = 41000) -> dict[str, Any]:
    """One half of an inter-node flow as an Antrea agent fills it (its own side's fields only)."""
    src = side == "source"
    r: dict[str, Any] = dict.fromkeys(_ANTREA, "")
    r.update(
        flowStartSeconds=T0, flowEndSeconds=end, flowEndReason=2, sourceTransportPort=sport,
        destinationTransportPort=8080, protocolIdentifier=6, packetTotalCount=octets // 100,
        octetTotalCount=octets, packetDeltaCount=octets // 100, octetDeltaCount=octets,
        reversePacketTotalCount=roctets // 100, reverseOctetTotalCount=roctets,
        reversePacketDeltaCount=roctets // 100, reverseOctetDeltaCount=roctets,
        destinationServicePort=80 if src else 0, ingressNetworkPolicyType=0 if src else 1,
        ingressNetworkPolicyRuleAction=0 if src else 1, egressNetworkPolicyType=2 if src else 0,
        egressNetworkPolicyRuleAction=1 if src else 0, flowType=2, tcpState="ESTABLISHED", proxySnatPort=0,
    )
    if src:
        r.update(sourcePodName="web-0", sourcePodNamespace="shop", sourceNodeName="node-a",
                 destinationServicePortName="shop/api:http", egressNetworkPolicyName="web-out",
                 egressNetworkPolicyNamespace="shop", egressNetworkPolicyRuleName="allow-api")
    else:
        r.update(destinationPodName="api-0", destinationPodNamespace="shop", destinationNodeName="node-b",
                 ingressNetworkPolicyName="api-in", ingressNetworkPolicyNamespace="shop",
                 ingressNetworkPolicyRuleName="from-web")
    if v6:
        r.update(sourceIPv6Address="fd00:10:1::5", destinationIPv6Address="fd00:10:2::7",
                 destinationClusterIPv6="fd00:96::10" if src else "::", proxySnatIPv6="::",
                 destinationServiceIPv6="fd00:96::10" if src else "::")
    else:
        r.update(sourceIPv4Address="10.10.1.5", destinationIPv4Address="10.10.2.7",
                 destinationClusterIPv4="10.96.0.10" if src else "0.0.0.0", proxySnatIPv4="0.0.0.0",
                 destinationServiceIPv4="10.96.0.10" if src else "0.0.0.0")
    assert set(r) == set(ANTREA_AGENT_IPV6 if v6 else ANTREA_AGENT_IPV4)
    return r


def through_the_wire(v6: bool, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Encoded with Antrea's template, decoded by our collecting side."""
    t = Template.build(256, ANTREA_AGENT_IPV6 if v6 else ANTREA_AGENT_IPV4)
    session = ExportSession(5)
    session.add_template(t)
    decoder = Decoder()
    out = []
    for m in session.encode_templates(0) + session.encode_records(256, records, 0):
        out += [r for _, r in decoder.decode(m).data_records()]
    return out


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_antrea_agent_records_decode_by_name_correlate_and_aggregate(v6: bool) -> None:
    src1 = antrea_record(v6, "source", end=T0 + 5, octets=1000, roctets=500)
    dst1 = antrea_record(v6, "destination", end=T0 + 4, octets=1000, roctets=500)
    src2 = antrea_record(v6, "source", end=T0 + 10, octets=3000, roctets=1500)
    got = through_the_wire(v6, [src1, dst1, src2])
    assert got == [src1, dst1, src2]  # every element by its name, none as unknown:56506:N
    assert list(got[0]) == list(ANTREA_AGENT_IPV6 if v6 else ANTREA_AGENT_IPV4)
    agg = AggregationProcess(export_interval=60.0, correlation_timeout=30.0, inactive_timeout=90.0)
    assert agg.ingest(got[0], "192.168.1.1", 1, now=1.0)
    assert agg.ingest(got[1], "192.168.1.2", 2, now=1.5)
    assert agg.ingest(got[2], "192.168.1.1", 1, now=2.0)
    (out,) = agg.tick(60.0)
    r = out.record
    assert out.correlation == "correlated"
    assert (r["sourcePodName"], r["sourceNodeName"], r["destinationPodName"], r["destinationNodeName"]) == (
        "web-0", "node-a", "api-0", "node-b")
    fam = "v6" if v6 else "v4"
    assert r[f"destinationServiceIP{fam}"] == r[f"destinationClusterIP{fam}"] == ("fd00:96::10" if v6 else "10.96.0.10")
    assert (r["egressNetworkPolicyName"], r["ingressNetworkPolicyName"]) == ("web-out", "api-in")
    assert (r["flowEndSecondsFromSourceNode"], r["flowEndSecondsFromDestinationNode"]) == (T0 + 10, T0 + 4)
    # Antrea's throughput: octets*8 over the seconds since the node's previous record
    # (first record: since flowStartSeconds); throughput itself from the newest record
    assert (r["throughputFromSourceNode"], r["reverseThroughputFromSourceNode"]) == (2000 * 8 // 5, 1000 * 8 // 5)
    assert (r["throughputFromDestinationNode"], r["reverseThroughputFromDestinationNode"]) == (
        1000 * 8 // 4, 500 * 8 // 4)
    assert (r["throughput"], r["reverseThroughput"]) == (2000 * 8 // 5, 1000 * 8 // 5)
    assert (r["octetTotalCountFromSourceNode"], r["octetDeltaCountFromSourceNode"]) == (3000, 3000)
    # exported: deltas and throughputs start again from zero, as in Antrea
    assert agg.ingest(antrea_record(v6, "destination", end=T0 + 12, octets=1800, roctets=900), "192.168.1.2", 2,
                      now=70.0)
    (again,) = agg.tick(120.0)
    r2 = again.record
    assert (r2["throughputFromSourceNode"], r2["throughputFromDestinationNode"]) == (0, 800 * 8 // 8)
    assert (r2["throughput"], r2["flowEndSecondsFromDestinationNode"]) == (800 * 8 // 8, T0 + 12)
