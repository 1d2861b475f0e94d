"""The poll loop over a scripted conntrack and an injected clock; records decoded two ways."""

from __future__ import annotations

import ipaddress

import pytest
from agent_entries import INVENTORY, entry
from agent_peers import decode_ours, decode_pypi, encode
from fakes import ManualClock
from flowscope.agent.conntrack import StaticConntrack
from flowscope.agent.exporter import FlowExporter
from flowscope.agent.metadata import Enricher, StaticMetadata
from flowscope.agent.records import (
    FIELDS_IPV4,
    FIELDS_IPV6,
    IPV4_TEMPLATE_ID,
    IPV6_TEMPLATE_ID,
)


class ListSink:
    def __init__(self, accept: bool = True):
        self.batches: list[tuple[int, list[dict]]] = []
        self.accept = accept
        self.stats = {"records_sent": 0, "records_dropped": 0, "reconnects": 2, "connected": True}

    def submit(self, template_id, records):
        if not self.accept:
            self.stats["records_dropped"] += len(records)
            return False
        self.batches.append((template_id, list(records)))
        return True

    async def flush(self):
        pass

    async def close(self):
        pass


@pytest.fixture
def agent(tmp_path):
    inv = tmp_path / "inv.yaml"
    inv.write_text(INVENTORY)
    ct = StaticConntrack()
    sink = ListSink()
    clock = ManualClock(1_700_000_100.0)
    fx = FlowExporter(
        conntrack=ct, sink=sink, enricher=Enricher("node-a", StaticMetadata(str(inv))),
        active_timeout=60, idle_timeout=15, poll_interval=5, max_connections=100, clock=clock,
    )
    return fx, ct, sink, clock


async def test_records_carry_every_design_element_and_decode_identically_both_ways(agent):
    fx, ct, sink, clock = agent
    svc = entry("10.244.0.11", "10.96.0.10", 40000, 80, reply_src="10.244.0.12", reply_sport=8080,
                packets=10, octets=1500, rpackets=9, roctets=9000)
    v6 = entry("fd00:244::b", "2001:db8::1", 40001, 443, proto=17, packets=3, octets=300, status=2)
    ct.entries = [svc, v6]
    assert await fx.poll_once() == 0
    clock.t += 15
    ct.entries = []
    assert await fx.poll_once() == 2  # both gone: end of flow

    assert {tid for tid, _ in sink.batches} == {IPV4_TEMPLATE_ID, IPV6_TEMPLATE_ID}
    messages = encode(sink.batches)
    ours = decode_ours(messages)
    pypi = decode_pypi(messages)
    assert len(ours) == len(pypi) == 2
    r4 = next(r for r in ours if "sourceIPv4Address" in r)
    r6 = next(r for r in ours if "sourceIPv6Address" in r)
    assert set(r4) == set(FIELDS_IPV4) and set(r6) == set(FIELDS_IPV6)
    assert r4["sourceIPv4Address"] == "10.244.0.11" and r4["destinationIPv4Address"] == "10.244.0.12"
    assert (r4["sourceTransportPort"], r4["destinationTransportPort"]) == (40000, 8080)
    assert (r4["packetTotalCount"], r4["octetTotalCount"], r4["packetDeltaCount"], r4["octetDeltaCount"]) == (10, 1500, 10, 1500)
    assert (r4["reversePacketTotalCount"], r4["reverseOctetTotalCount"]) == (9, 9000)
    assert (r4["reversePacketDeltaCount"], r4["reverseOctetDeltaCount"]) == (9, 9000)
    assert r4["destinationClusterIPv4"] == "10.96.0.10" and r4["destinationServicePort"] == 80
    assert r4["destinationServicePortName"] == "shop/server:web"
    assert (r4["sourcePodName"], r4["destinationPodName"], r4["sourceNodeName"]) == ("client", "server", "node-a")
    assert (r4["ingressNetworkPolicyName"], r4["ingressNetworkPolicyRuleName"], r4["ingressNetworkPolicyRuleAction"]) == (
        "server-web", "ingress-0", 1)
    assert r4["ingressNetworkPolicyType"] == 1 and r4["egressNetworkPolicyRuleAction"] == 0
    assert r4["flowEndReason"] == 3 and r4["flowType"] == 1 and r4["tcpState"] == "ESTABLISHED"
    assert r6["destinationIPv6Address"] == "2001:db8::1" and r6["flowType"] == 3 and r6["tcpState"] == ""
    assert r6["destinationClusterIPv6"] == "::"
    # the independent decoder reads the same values
    p4 = next(r for r in pypi if "sourceIPv4Address" in r)
    for name in FIELDS_IPV4:
        theirs = p4[name]
        if isinstance(theirs, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            theirs = str(theirs)
        if name.startswith("flow") and name.endswith("Seconds"):
            theirs = int(theirs.timestamp()) if hasattr(theirs, "timestamp") else theirs
            continue  # naive datetimes in the PyPI package: compared below
        assert theirs == r4[name], name
    assert p4["flowEndSeconds"].replace(tzinfo=__import__("datetime").timezone.utc).timestamp() == r4["flowEndSeconds"]


async def test_metrics_follow_the_store_and_the_sink(agent):
    fx, ct, sink, clock = agent
    ct.entries = [entry(sport=1000 + i, packets=i) for i in range(5)]
    await fx.poll_once()
    m = fx.metrics
    assert m.conntrack_total._value.get() == 5 and m.tracked._value.get() == 5
    assert m.reconnections._value.get() == 2 and m.exporter_connected._value.get() == 1
    assert m.conntrack_max._value.get() == 262144
    assert fx.metrics.poll_duration._sum.get() > 0


async def test_refused_records_are_counted_not_lost_silently(agent):
    fx, ct, sink, clock = agent
    sink.accept = False
    ct.entries = [entry(packets=1)]
    await fx.poll_once()
    ct.entries = []
    clock.t += 5
    assert await fx.poll_once() == 0
    assert fx.records_refused == 1 and fx.metrics.records_dropped._value.get() == 1


async def test_denied_connection_is_exported_once_with_drop_and_counted(agent):
    fx, ct, sink, clock = agent
    syn = entry("10.244.0.11", "10.244.0.12", 40000, 9090, packets=2, octets=120, status=0, tcp_state=1)
    ct.entries = [syn]
    assert await fx.poll_once() == 1
    clock.t += 5
    assert await fx.poll_once() == 0
    (tid, [rec]), = sink.batches
    assert rec["ingressNetworkPolicyRuleAction"] == 2 and rec["ingressNetworkPolicyName"] == "server-web"
    assert rec["ingressNetworkPolicyRuleName"] == "" and rec["packetDeltaCount"] == 2
    assert fx.metrics.denied._value.get() == 1


async def test_shutdown_exports_forced_end(agent):
    fx, ct, sink, clock = agent
    ct.entries = [entry(packets=4, octets=400)]
    await fx.poll_once()
    await fx.shutdown()
    (_, [rec]), = sink.batches
    assert rec["flowEndReason"] == 4 and rec["packetDeltaCount"] == 4


async def test_a_failed_dump_is_counted_and_ends_nothing(agent):
    fx, ct, sink, clock = agent
    ct.entries = [entry(packets=1)]
    await fx.poll_once()

    def broken(consumer=None, held=None):
        raise OSError(105, "No buffer space available")

    ct.dump = broken
    clock.t += 5
    assert await fx.poll_once() == 0
    assert fx.metrics.poll_errors._value.get() == 1 and len(fx.store) == 1 and sink.batches == []


async def test_a_record_that_cannot_be_built_costs_only_itself(agent, monkeypatch):
    fx, ct, sink, clock = agent
    ct.entries = [entry(sport=1, packets=1), entry(sport=2, packets=1)]
    await fx.poll_once()
    real = fx.enricher.enrich

    def flaky(e):
        if e.orig_sport == 1:
            raise ValueError("odd connection")
        return real(e)

    monkeypatch.setattr(fx.enricher, "enrich", flaky)
    ct.entries = []
    clock.t += 5
    assert await fx.poll_once() == 1
    assert fx.records_failed == 1 and sink.batches[0][1][0]["sourceTransportPort"] == 2


async def test_large_export_batches_are_submitted_in_slices(agent):
    fx, ct, sink, clock = agent
    fx.store.max_connections = 5000
    ct.entries = [entry(sport=i, packets=1) for i in range(2500)]
    await fx.poll_once()
    ct.entries = []
    clock.t += 5
    assert await fx.poll_once() == 2500
    assert [len(b) for _, b in sink.batches] == [1000, 1000, 500]


async def test_interrupted_dumps_decide_no_end_until_the_third_in_a_row(agent):
    from flowscope.agent.conntrack import DumpResult

    fx, ct, sink, clock = agent
    ct.entries = [entry(sport=1, packets=1), entry(sport=2, packets=1)]
    await fx.poll_once()
    ct.entries = [entry(sport=1, packets=1)]

    def interrupted(consumer=None, held=None):
        consumer(list(ct.entries))
        return DumpResult([], len(ct.entries), interrupted=True)

    ct.dump = interrupted
    for _ in range(2):
        clock.t += 5
        assert await fx.poll_once() == 0
    clock.t += 5
    await fx.poll_once()  # the third: sport 2 is gone after all (and sport 1 is now idle)
    got = {(r["sourceTransportPort"], r["flowEndReason"]) for _, b in sink.batches for r in b}
    assert got == {(2, 3), (1, 1)}


async def test_node_traffic_is_skipped_with_an_inventory_unless_asked_for(agent):
    fx, ct, sink, clock = agent
    pod = entry("10.244.0.11", "10.244.0.12", 40000, 8080, packets=2, octets=120, rpackets=1, roctets=60)
    host = entry("192.0.2.10", "192.0.2.20", 51000, 4739, packets=5, octets=900, rpackets=4, roctets=700)
    ct.entries = [pod, host]
    await fx.poll_once()
    clock.t += 15
    ct.entries = []
    assert await fx.poll_once() == 1  # the Pod connection only
    sent = [r for _, batch in sink.batches for r in batch]
    assert [r["sourceIPv4Address"] for r in sent] == ["10.244.0.11"]
    assert fx.host_flows_skipped == 1
    fx.export_host_flows = True
    ct.entries = [host]
    await fx.poll_once()
    clock.t += 15
    ct.entries = []
    assert await fx.poll_once() == 1
    assert sink.batches[-1][1][0]["sourceIPv4Address"] == "192.0.2.10"
    assert sink.batches[-1][1][0]["flowType"] == 0
