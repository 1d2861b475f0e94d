"""The correlation and aggregation core, driven by an injected clock: no sockets, no sleeping."""

from __future__ import annotations

import pytest
from agg_records import NODE_A, NODE_B, T0, agent_record, destination_half, source_half

from flowscope.aggregator.aggregation import AggregationProcess, FlowFilter, output_names


def make(**kw) -> AggregationProcess:
    args = dict(export_interval=60.0, correlation_timeout=30.0, inactive_timeout=90.0, max_flows=1000)
    args.update(kw)
    return AggregationProcess(**args)


def only(exported):
    assert len(exported) == 1, exported
    return exported[0]


def node_counts(rec, suffix):
    return tuple(rec[n + suffix] for n in (
        "packetTotalCount", "octetTotalCount", "reversePacketTotalCount", "reverseOctetTotalCount",
        "packetDeltaCount", "octetDeltaCount", "reversePacketDeltaCount", "reverseOctetDeltaCount"))


@pytest.mark.parametrize("order", ["source-first", "destination-first"])
def test_inter_node_halves_merge_field_by_field(order):
    agg = make()
    src = source_half(pkts=12, octets=1200, rpkts=9, roctets=900, destinationClusterIPv4="10.96.0.10",
                      destinationServicePort=80, destinationServicePortName="shop/backend:http")
    dst = destination_half(pkts=11, octets=1100, rpkts=9, roctets=900, end=T0 + 6, tcp="TIME_WAIT")
    halves = [(src, NODE_A, 7), (dst, NODE_B, 8)]
    if order == "destination-first":
        halves.reverse()
    for i, (rec, exporter, domain) in enumerate(halves):
        assert agg.ingest(rec, exporter, domain, now=1.0 + i)
    assert len(agg) == 1
    assert agg.tick(59.0) == []  # complete, but nothing is due before the interval
    out = only(agg.tick(60.0))
    r = out.record
    assert out.correlation == "correlated" and not out.final
    assert list(r) == list(output_names(False, False))
    assert (r["sourceIPv4Address"], r["destinationIPv4Address"], r["sourceTransportPort"],
            r["destinationTransportPort"], r["protocolIdentifier"]) == ("10.0.1.5", "10.0.2.7", 40000, 80, 6)
    # each side's Kubernetes fields from the node that owns them
    assert (r["sourcePodNamespace"], r["sourcePodName"], r["sourceNodeName"]) == ("shop", "frontend-1", "node-a")
    assert (r["destinationPodNamespace"], r["destinationPodName"], r["destinationNodeName"]) == (
        "shop", "backend-1", "node-b")
    assert (r["destinationClusterIPv4"], r["destinationServicePort"], r["destinationServicePortName"]) == (
        "10.96.0.10", 80, "shop/backend:http")
    assert (r["egressNetworkPolicyName"], r["egressNetworkPolicyRuleName"], r["egressNetworkPolicyRuleAction"]) == (
        "allow-out", "rule-e", 1)
    assert (r["ingressNetworkPolicyName"], r["ingressNetworkPolicyRuleName"], r["ingressNetworkPolicyRuleAction"]) == (
        "allow-web", "rule-i", 1)
    # each node's statistics apart
    assert node_counts(r, "FromSourceNode") == (12, 1200, 9, 900, 12, 1200, 9, 900)
    assert node_counts(r, "FromDestinationNode") == (11, 1100, 9, 900, 11, 1100, 9, 900)
    # the flow's own counters are the source node's
    assert (r["packetTotalCount"], r["octetTotalCount"], r["packetDeltaCount"], r["reverseOctetDeltaCount"]) == (
        12, 1200, 12, 900)
    # newest record wins for times and state; the exporter is the source node's agent
    assert (r["flowEndSeconds"], r["tcpState"], r["flowType"]) == (T0 + 6, "TIME_WAIT", 2)
    assert (r["originalExporterIPv4Address"], r["originalObservationDomainId"]) == (NODE_A, 7)
    assert agg.stats.flows_correlated == 1 and agg.stats.flows_uncorrelated == 0


def test_intra_node_record_is_complete_and_counts_for_both_nodes():
    agg = make()
    rec = agent_record(flow_type=1, pkts=5, octets=500, rpkts=4, roctets=400,
                       sourcePodNamespace="a", sourcePodName="p1", sourceNodeName="node-a",
                       destinationPodNamespace="a", destinationPodName="p2", destinationNodeName="node-a")
    agg.ingest(rec, NODE_A, 1, now=0.0)
    r = only(agg.tick(60.0)).record
    assert (r["sourcePodName"], r["destinationPodName"], r["sourceNodeName"], r["destinationNodeName"]) == (
        "p1", "p2", "node-a", "node-a")
    assert node_counts(r, "FromSourceNode") == node_counts(r, "FromDestinationNode") == (5, 500, 4, 400, 5, 500, 4, 400)
    assert agg.stats.flows_correlated == 0 and agg.stats.flows_uncorrelated == 0


def test_to_external_is_complete_on_arrival():
    agg = make()
    rec = agent_record(flow_type=3, dst="93.184.216.34", dport=443, pkts=3, octets=180, rpkts=2, roctets=120,
                       sourcePodNamespace="a", sourcePodName="p1", sourceNodeName="node-a")
    agg.ingest(rec, NODE_A, 1, now=0.0)
    out = only(agg.tick(60.0))
    r = out.record
    assert out.correlation == "external"
    assert node_counts(r, "FromSourceNode") == (3, 180, 2, 120, 3, 180, 2, 120)
    assert node_counts(r, "FromDestinationNode") == (0,) * 8
    assert (r["destinationPodName"], r["destinationNodeName"]) == ("", "")


def test_from_external_counts_for_the_destination_node():
    agg = make()
    rec = agent_record(flow_type=4, src="198.51.100.9", pkts=3, octets=180, rpkts=2, roctets=120,
                       destinationPodNamespace="a", destinationPodName="web", destinationNodeName="node-b")
    agg.ingest(rec, NODE_B, 2, now=0.0)
    r = only(agg.tick(60.0)).record
    assert node_counts(r, "FromDestinationNode") == (3, 180, 2, 120, 3, 180, 2, 120)
    assert node_counts(r, "FromSourceNode") == (0,) * 8
    assert (r["packetTotalCount"], r["originalExporterIPv4Address"], r["originalObservationDomainId"]) == (3, NODE_B, 2)


@pytest.mark.parametrize("where", ["egress", "ingress"])
@pytest.mark.parametrize("action", [2, 3])
def test_denied_flow_is_exported_from_its_first_record(where, action):
    agg = make()
    if where == "egress":
        rec, exporter = source_half(egressNetworkPolicyRuleAction=action, pkts=1, octets=60, rpkts=0, roctets=0), NODE_A
    else:
        rec, exporter = destination_half(ingressNetworkPolicyRuleAction=action, pkts=1, octets=60, rpkts=0,
                                         roctets=0), NODE_B
    agg.ingest(rec, exporter, 1, now=0.0)
    out = only(agg.tick(0.5))  # at the next tick, not after correlationTimeout nor the export interval
    # denied at the source's egress: no twin will ever come; at the destination's ingress the
    # source node has a record of the attempt too, still to come
    assert out.correlation == ("denied" if where == "egress" else "pending")
    assert out.record[f"{where}NetworkPolicyRuleAction"] == action
    assert out.record["packetTotalCount"] == 1
    assert agg.tick(1.0) == []  # not again while nothing changed
    agg.tick(31.0)  # past the correlation timeout
    assert agg.stats.flows_uncorrelated == (0 if where == "egress" else 1)


def test_lost_half_is_exported_alone_at_the_correlation_timeout_and_counted():
    agg = make(correlation_timeout=30.0)
    agg.ingest(source_half(pkts=4, octets=400), NODE_A, 1, now=10.0)
    assert agg.tick(39.9) == []
    out = only(agg.tick(40.0))
    assert out.correlation == "uncorrelated" and not out.final
    r = out.record
    assert (r["sourcePodName"], r["destinationPodName"], r["destinationNodeName"]) == ("frontend-1", "", "")
    assert node_counts(r, "FromSourceNode")[:2] == (4, 400)
    assert node_counts(r, "FromDestinationNode") == (0,) * 8
    assert agg.stats.flows_uncorrelated == 1 and agg.stats.flows_correlated == 0
    # nothing new: the periodic export has nothing to send
    assert agg.tick(60.0) == []
    # the twin arrives late: merged and exported on the next interval, counted apart
    agg.ingest(destination_half(pkts=4, octets=400), NODE_B, 1, now=70.0)
    out = only(agg.tick(120.0))
    assert out.correlation == "correlated"
    assert out.record["destinationPodName"] == "backend-1"
    assert agg.stats.flows_late_correlated == 1


def test_deltas_accumulate_between_exports_and_reset_after():
    agg = make()
    agg.ingest(source_half(pkts=10, octets=1000, rpkts=5, roctets=500), NODE_A, 1, now=0.0)
    agg.ingest(destination_half(pkts=10, octets=1000, rpkts=5, roctets=500), NODE_B, 1, now=0.0)
    # two more reports from the source node before the export: deltas add up, totals take the newest
    agg.ingest(source_half(pkts=15, octets=1600, rpkts=8, roctets=700, dpkts=5, doctets=600), NODE_A, 1, now=10.0)
    agg.ingest(source_half(pkts=21, octets=2000, rpkts=9, roctets=800), NODE_A, 1, now=20.0)
    r = only(agg.tick(60.0)).record
    assert node_counts(r, "FromSourceNode") == (21, 2000, 9, 800, 21, 2000, 9, 800)
    assert node_counts(r, "FromDestinationNode") == (10, 1000, 5, 500, 10, 1000, 5, 500)
    # after the export: only the new traffic
    agg.ingest(source_half(pkts=30, octets=2500, rpkts=9, roctets=800), NODE_A, 1, now=70.0)
    r = only(agg.tick(120.0)).record
    assert node_counts(r, "FromSourceNode") == (30, 2500, 9, 800, 9, 500, 0, 0)
    assert node_counts(r, "FromDestinationNode") == (10, 1000, 5, 500, 0, 0, 0, 0)
    assert (r["packetDeltaCount"], r["octetDeltaCount"]) == (9, 500)


def test_nothing_is_exported_when_nothing_changed():
    agg = make()
    agg.ingest(source_half(), NODE_A, 1, now=0.0)
    agg.ingest(destination_half(), NODE_B, 1, now=0.0)
    assert len(agg.tick(60.0)) == 1
    # idle reports with the same totals (reason 2 -> 1: idle instead of active timeout) change nothing
    agg.ingest(source_half(reason=1), NODE_A, 1, now=61.0)
    agg.ingest(destination_half(reason=1), NODE_B, 1, now=62.0)
    assert agg.tick(120.0) == []
    # a new TCP state is news
    agg.ingest(source_half(reason=1, tcp="FIN_WAIT"), NODE_A, 1, now=130.0)
    assert [e.record["tcpState"] for e in agg.tick(180.0)] == ["FIN_WAIT"]
    assert agg.tick(240.0) == []


def test_periodic_scan_in_slices_sees_each_flow_once():
    agg = make()
    for port in range(10):
        agg.ingest(agent_record(flow_type=3, sport=port, sourcePodName="p"), NODE_A, 1, now=0.0)
    out = agg.tick(60.0, max_scan=4)
    assert len(out) == 4 and agg.scan_pending
    # a flow created while the scan is under way waits for the next interval
    agg.ingest(agent_record(flow_type=3, sport=99, sourcePodName="p"), NODE_A, 1, now=60.5)
    out += agg.tick(61.0, max_scan=4)
    out += agg.tick(61.0, max_scan=4)
    assert not agg.scan_pending
    assert sorted(e.record["sourceTransportPort"] for e in out) == list(range(10))
    assert [e.record["sourceTransportPort"] for e in agg.tick(120.0)] == [99]


def test_counter_going_backwards_is_a_new_connection_not_a_huge_delta():
    agg = make()
    agg.ingest(agent_record(flow_type=3, pkts=1000, octets=100_000, rpkts=900, roctets=90_000,
                            sourcePodName="p", sourceNodeName="n"), NODE_A, 1, now=0.0)
    agg.tick(60.0)
    # conntrack reused the 5-tuple: the totals restart small
    agg.ingest(agent_record(flow_type=3, pkts=3, octets=200, rpkts=2, roctets=100, start=T0 + 100,
                            sourcePodName="p", sourceNodeName="n"), NODE_A, 1, now=100.0)
    r = only(agg.tick(120.0)).record
    assert (r["packetDeltaCount"], r["octetDeltaCount"], r["reversePacketDeltaCount"], r["reverseOctetDeltaCount"]) == (
        3, 200, 2, 100)
    assert (r["packetTotalCount"], r["flowStartSeconds"]) == (3, T0 + 100)
    assert agg.stats.counter_resets == 1


def test_lost_record_does_not_lose_traffic():
    """Deltas come from the totals: a dropped UDP record's traffic shows up in the next one."""
    agg = make()
    agg.ingest(agent_record(flow_type=3, pkts=10, octets=1000, sourcePodName="p"), NODE_A, 1, now=0.0)
    # (the record with pkts=20 was lost) the next one says delta 5 but the totals moved by 15
    agg.ingest(agent_record(flow_type=3, pkts=25, octets=2500, dpkts=5, doctets=500, sourcePodName="p"),
               NODE_A, 1, now=10.0)
    r = only(agg.tick(60.0)).record
    assert (r["packetDeltaCount"], r["octetDeltaCount"]) == (25, 2500)


def test_first_record_uses_the_agents_delta_so_a_restart_does_not_recount_history():
    agg = make()
    agg.ingest(agent_record(flow_type=3, pkts=5000, octets=10**6, dpkts=7, doctets=700, drpkts=1, droctets=100,
                            sourcePodName="p"), NODE_A, 1, now=0.0)
    r = only(agg.tick(60.0)).record
    assert (r["packetTotalCount"], r["packetDeltaCount"], r["octetDeltaCount"], r["reverseOctetDeltaCount"]) == (
        5000, 7, 700, 100)


def test_ipv6_flow_and_ipv6_exporter():
    agg = make()
    src = source_half(src="fd00:10:0:1::5", dst="fd00:10:0:2::7", destinationClusterIPv6="fd00:96::10")
    dst = destination_half(src="fd00:10:0:1::5", dst="fd00:10:0:2::7")
    agg.ingest(src, "fd00:192::1", 3, now=0.0)
    agg.ingest(dst, "fd00:192::2", 4, now=0.0)
    r = only(agg.tick(60.0)).record
    assert list(r) == list(output_names(True, True))
    assert (r["sourceIPv6Address"], r["destinationIPv6Address"], r["destinationClusterIPv6"]) == (
        "fd00:10:0:1::5", "fd00:10:0:2::7", "fd00:96::10")
    assert (r["originalExporterIPv6Address"], r["originalObservationDomainId"]) == ("fd00:192::1", 3)
    assert (r["sourcePodName"], r["destinationPodName"]) == ("frontend-1", "backend-1")
    assert "sourceIPv4Address" not in r and "destinationClusterIPv4" not in r


def test_same_ports_different_families_are_different_flows():
    agg = make()
    agg.ingest(source_half(), NODE_A, 1, now=0.0)
    agg.ingest(source_half(src="fd00::1", dst="fd00::2"), NODE_A, 1, now=0.0)
    assert len(agg) == 2


def test_flow_cap_drops_new_flows_and_counts_them():
    agg = make(max_flows=3)
    for port in range(5):
        agg.ingest(source_half(sport=1000 + port), NODE_A, 1, now=0.0)
    assert len(agg) == 3
    assert agg.stats.dropped_flow_cap == 2
    # a record of a held flow is still taken
    assert agg.ingest(destination_half(sport=1000), NODE_B, 1, now=1.0)
    assert agg.stats.flows_correlated == 1


def test_invalid_records_are_counted_not_raised():
    agg = make()
    assert not agg.ingest({"flowType": 2}, NODE_A, 1, now=0.0)
    assert not agg.ingest({"sourceIPv4Address": "1.2.3.4"}, NODE_A, 1, now=0.0)
    bad = source_half()
    bad["packetTotalCount"] = -5
    assert not agg.ingest(bad, NODE_A, 1, now=0.0)
    assert agg.stats.dropped_invalid == 3 and len(agg) == 0


def test_record_missing_optional_fields_takes_the_slow_path():
    agg = make()
    rec = {"sourceIPv4Address": "10.0.0.1", "destinationIPv4Address": "10.0.0.2", "protocolIdentifier": 17,
           "packetDeltaCount": 4, "octetDeltaCount": 400, "flowType": 3, "sourcePodName": "p"}
    assert agg.ingest(rec, NODE_A, 1, now=0.0)
    assert agg.ingest(rec, NODE_A, 1, now=1.0)
    r = only(agg.tick(60.0)).record
    assert (r["sourceTransportPort"], r["packetTotalCount"], r["packetDeltaCount"], r["octetDeltaCount"]) == (
        0, 8, 8, 800)
    assert (r["destinationClusterIPv4"], r["tcpState"], r["ingressNetworkPolicyRuleAction"]) == ("0.0.0.0", "", 0)


def test_flow_end_exports_final_record_and_forgets_the_flow():
    agg = make()
    agg.ingest(agent_record(flow_type=1, sourcePodName="p1", destinationPodName="p2"), NODE_A, 1, now=0.0)
    agg.ingest(agent_record(flow_type=1, pkts=12, reason=3, tcp="TIME_WAIT", sourcePodName="p1",
                            destinationPodName="p2"), NODE_A, 1, now=5.0)
    out = only(agg.tick(5.5))
    assert out.final and out.record["flowEndReason"] == 3 and out.record["packetTotalCount"] == 12
    assert len(agg) == 0 and agg.stats.flows_ended == 1


def test_inter_node_flow_ends_when_both_nodes_say_so():
    agg = make()
    agg.ingest(source_half(), NODE_A, 1, now=0.0)
    agg.ingest(destination_half(), NODE_B, 1, now=0.0)
    agg.ingest(source_half(pkts=20, reason=3), NODE_A, 1, now=10.0)
    assert agg.tick(10.5) == []  # the destination node has not reported the end yet
    agg.ingest(destination_half(pkts=19, reason=3), NODE_B, 1, now=11.0)
    out = only(agg.tick(11.5))
    assert out.final and out.correlation == "correlated"
    assert (out.record["packetTotalCountFromSourceNode"], out.record["packetTotalCountFromDestinationNode"]) == (20, 19)
    assert len(agg) == 0


def test_inter_node_flow_ends_after_the_correlation_timeout_if_one_node_stays_silent():
    agg = make(correlation_timeout=30.0)
    agg.ingest(source_half(), NODE_A, 1, now=0.0)
    agg.ingest(destination_half(), NODE_B, 1, now=0.0)
    agg.ingest(source_half(pkts=20, reason=3), NODE_A, 1, now=10.0)
    assert agg.tick(39.0) == []
    out = only(agg.tick(40.0))
    assert out.final and out.record["packetTotalCountFromSourceNode"] == 20
    assert len(agg) == 0


def test_inactive_flow_is_exported_a_last_time_then_dropped():
    agg = make(export_interval=60.0, inactive_timeout=90.0)
    agg.ingest(agent_record(flow_type=3, sourcePodName="p"), NODE_A, 1, now=0.0)
    assert len(agg.tick(60.0)) == 1
    agg.ingest(agent_record(flow_type=3, pkts=11, sourcePodName="p"), NODE_A, 1, now=61.0)
    assert agg.tick(120.0)[0].record["packetDeltaCount"] == 1
    assert agg.tick(180.0) == []  # idle 119s > 90s but nothing changed: dropped silently
    assert len(agg) == 0 and agg.stats.flows_expired == 1


def test_inactive_flow_with_unexported_change_is_exported_final():
    agg = make(export_interval=60.0, inactive_timeout=30.0)
    agg.ingest(agent_record(flow_type=3, sourcePodName="p"), NODE_A, 1, now=0.0)
    out = only(agg.tick(60.0))
    assert out.final and len(agg) == 0


def test_late_ticks_do_not_burst():
    agg = make(export_interval=60.0)
    agg.ingest(agent_record(flow_type=3, sourcePodName="p"), NODE_A, 1, now=0.0)
    assert len(agg.tick(500.0)) == 1
    agg.ingest(agent_record(flow_type=3, pkts=20, sourcePodName="p"), NODE_A, 1, now=501.0)
    assert agg.tick(501.0) == [] and len(agg.tick(560.0)) == 1


def test_snapshot_filters_on_a_partial_five_tuple_without_touching_deltas():
    agg = make()
    agg.ingest(source_half(sport=1), NODE_A, 1, now=0.0)
    agg.ingest(source_half(sport=2, dport=443), NODE_A, 1, now=0.0)
    agg.ingest(source_half(sport=3, proto=17), NODE_A, 1, now=0.0)
    assert len(agg.snapshot()) == 3
    assert [s.record["sourceTransportPort"] for s in agg.snapshot(FlowFilter(dst_port=443))] == [2]
    assert [s.record["sourceTransportPort"] for s in agg.snapshot(FlowFilter(protocol=17, src_ip="10.0.1.5"))] == [3]
    assert agg.snapshot(FlowFilter(src_ip="10.9.9.9")) == []
    assert all(s.record["packetDeltaCountFromSourceNode"] == 10 for s in agg.snapshot())


def test_memory_stays_flat_at_the_cap():
    import tracemalloc

    agg = make(max_flows=2000)
    for i in range(2000):
        agg.ingest(source_half(sport=i), NODE_A, 1, now=0.0)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(2000, 12000):
        agg.ingest(source_half(sport=i), NODE_A, 1, now=0.0)
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert agg.stats.dropped_flow_cap == 10000
    assert grown < 50_000, grown


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("e6", [False, True])
def test_aggregated_record_is_in_template_order(v6, e6):
    """The record's keys are the IPFIX sink's template, in order (one definition: antrea.aggregator_fields)."""
    from flowscope.aggregator.sinks import template_names
    from flowscope.ipfix.antrea import agent_fields

    names = template_names(v6, e6)
    assert output_names(v6, e6) == names
    agg = make()
    src, dst = (f"fd00::{i}" if v6 else f"10.0.{i}.5" for i in (1, 2))
    exporter = "fd00:ff::1" if e6 else NODE_A
    agg.ingest(source_half(src=src, dst=dst), exporter, 1, now=1.0)
    agg.ingest(destination_half(src=src, dst=dst), exporter, 1, now=2.0)
    (out,) = agg.tick(60.0)
    assert tuple(out.record) == names
    # every agent element is kept
    assert set(agent_fields(6 if v6 else 4)) <= set(names)


def test_record_without_pods_or_nodes_is_complete_and_not_counted_uncorrelated():
    """Host traffic an agent reported (no Pod, no Node on either end): nothing to correlate."""
    agg = make()
    agg.ingest(agent_record(src="172.31.250.10", dst="172.31.250.12", dport=4739), NODE_A, 1, now=0.0)
    assert agg.tick(30.0) == []  # no lone-half export at the correlation timeout
    out = only(agg.tick(60.0))
    assert out.correlation == "unattributed" and out.record["packetTotalCount"] == 10
    assert agg.stats.flows_uncorrelated == 0


def test_a_report_overtaken_on_the_way_is_dropped_not_counted_twice():
    agg = make()
    agg.ingest(agent_record(flow_type=3, pkts=10, octets=1000, end=T0 + 5, sourcePodName="p"), NODE_A, 1, now=0.0)
    agg.ingest(agent_record(flow_type=3, pkts=30, octets=3000, end=T0 + 15, sourcePodName="p"), NODE_A, 1, now=1.0)
    # the report of T0+10 arrives last (UDP reordering): its totals are lower, and it is older
    assert not agg.ingest(agent_record(flow_type=3, pkts=20, octets=2000, end=T0 + 10, sourcePodName="p"),
                          NODE_A, 1, now=2.0)
    r = only(agg.tick(60.0)).record
    assert (r["packetTotalCount"], r["packetDeltaCount"], r["octetDeltaCount"]) == (30, 30, 3000)
    assert agg.stats.dropped_stale == 1 and agg.stats.counter_resets == 0


@pytest.mark.parametrize("late", ["denied at the destination", "uncorrelated first"])
def test_a_half_exported_before_its_twin_is_not_counted_again_when_the_twin_comes(late):
    """The flow's own counters switch from the destination node's to the source node's when
    the source half arrives after the flow was already exported (a connection the
    destination's ingress policy denied, or a lone half exported uncorrelated): the deltas
    the flow exported then sum to its total, not to the total twice. Each node's own
    numbers (the ...FromSourceNode / ...FromDestinationNode deltas) stay that node's."""
    agg = make()
    action = 2 if late == "denied at the destination" else 1
    dst = destination_half(ingressNetworkPolicyRuleAction=action, pkts=1, octets=60, rpkts=0, roctets=0)
    agg.ingest(dst, NODE_B, 2, now=0.0)
    first = only(agg.tick(0.5) if action == 2 else agg.tick(31.0))  # denied at once / uncorrelated after 30 s
    assert first.record["octetDeltaCount"] == 60 and first.record["octetTotalCount"] == 60
    src = source_half(pkts=1, octets=60, rpkts=0, roctets=0)
    agg.ingest(src, NODE_A, 1, now=32.0)
    later = [e.record for e in agg.tick(60.0) + agg.tick(120.0) + agg.tick(500.0)]
    exported = [first.record] + later
    assert sum(r["octetDeltaCount"] for r in exported) == 60, [r["octetDeltaCount"] for r in exported]
    assert sum(r["packetDeltaCount"] for r in exported) == 1
    assert sum(r["octetDeltaCountFromSourceNode"] for r in exported) == 60
    assert sum(r["octetDeltaCountFromDestinationNode"] for r in exported) == 60
    assert later and later[-1]["sourcePodName"] == "frontend-1"  # the source half did reach the record


def test_flow_bytes_bound_refuses_new_flows_and_is_given_back_when_flows_go():
    """max_flow_bytes counts a fixed cost per flow plus its strings; a side whose fields
    change is re-counted, and a flow that expires or ends gives back all it was counted."""
    from flowscope.aggregator.aggregation import FLOW_COST

    agg = make(max_flow_bytes=3 * FLOW_COST + 200)
    assert agg.ingest(source_half(sport=1), NODE_A, 1, now=0.0)
    one = agg.flow_bytes
    assert one > FLOW_COST  # the strings count too
    assert agg.ingest(destination_half(sport=1), NODE_B, 1, now=1.0)
    both = agg.flow_bytes
    assert both > one
    agg.ingest(destination_half(sport=1, destinationPodName="backend-1-with-a-longer-name"), NODE_B, 1, now=2.0)
    assert agg.flow_bytes == both + len("-with-a-longer-name")
    assert agg.ingest(source_half(sport=2), NODE_A, 1, now=3.0)
    assert not agg.ingest(source_half(sport=3, sourcePodName="x" * 300), NODE_A, 1, now=3.0)
    assert agg.stats.dropped_flow_bytes == 1 and len(agg) == 2
    agg.tick(60.0)
    agg.tick(200.0)  # both idle past inactive_timeout: exported and dropped
    assert len(agg) == 0 and agg.flow_bytes == 0
