"""Exact endings in the store (conntrack DESTROY events beside the dump) and several
destinations in the exporter, with scripted conntrack and an injected clock."""

from __future__ import annotations

import pytest
from agent_entries import INVENTORY, entry
from flowscope.agent.config import ConfigError, parse_config
from flowscope.agent.conntrack import StaticConntrack
from flowscope.agent.exporter import Destination, FlowExporter, FlowFilter
from flowscope.agent.metadata import Enricher, StaticMetadata
from flowscope.agent.store import ConnectionStore, FlowEndReason
from fakes import ManualClock

DESTROY, NEW = 0x102, 0x100
T0 = 1_700_000_100.0
STOP_NS = 1_700_000_103_500_000_000


def store() -> ConnectionStore:
    s = ConnectionStore(active_timeout=60, idle_timeout=15, max_connections=100)
    s.events_enabled = True
    return s


def test_destroy_of_a_held_connection_gives_the_kernels_final_counters_and_stop_time():
    s = store()
    s.update([entry(packets=3, octets=300, rpackets=2, roctets=200)], T0)
    final = entry(packets=9, octets=900, rpackets=8, roctets=800, tcp_state=7, stop_ns=STOP_NS, status=0x206)
    out = s.apply_events([(DESTROY, final)], T0 + 5)
    assert len(out) == 1
    fe = out[0]
    assert fe.reason == FlowEndReason.END_OF_FLOW and fe.end_time == STOP_NS / 1e9
    assert (fe.packet_delta, fe.octet_delta, fe.reverse_packet_delta, fe.reverse_octet_delta) == (9, 900, 8, 800)
    assert len(s) == 0
    assert s.update([], T0 + 10) == []  # the dump that no longer lists it ends nothing more
    assert (s.ended_by_event, s.ended_by_dump) == (1, 0)


def test_deltas_after_an_active_export_are_what_came_since():
    s = store()
    s.update([entry(packets=3, octets=300)], T0)
    s.update([entry(packets=5, octets=500)], T0 + 61)
    assert [fe.reason for fe in s.expire(T0 + 61)] == [FlowEndReason.ACTIVE_TIMEOUT]
    (fe,) = s.apply_events([(DESTROY, entry(packets=7, octets=700, stop_ns=STOP_NS))], T0 + 62)
    assert (fe.packet_delta, fe.octet_delta) == (2, 200)


def test_a_connection_born_and_gone_between_two_dumps_is_exported_once_from_its_event():
    s = store()
    short = entry(sport=41000, proto=17, packets=2, octets=256, rpackets=2, roctets=456, stop_ns=STOP_NS, ct_id=7)
    (fe,) = s.apply_events([(NEW, short), (DESTROY, short)], T0)
    assert (fe.packet_delta, fe.octet_delta, fe.reverse_packet_delta, fe.reverse_octet_delta) == (2, 256, 2, 456)
    assert fe.start_time == short.start_ns / 1e9 and fe.end_time == STOP_NS / 1e9
    assert len(s) == 0 and s.event_only == 1
    assert s.update([], T0 + 5) == []


def test_a_tombstone_is_removed_by_its_destroy_without_a_second_export():
    s = store()
    tw = entry(packets=6, octets=600, tcp_state=7)
    assert len(s.update([tw], T0)) == 1  # TIME_WAIT: exported at once
    assert s.apply_events([(DESTROY, tw._replace(stop_ns=STOP_NS))], T0 + 2) == []
    assert len(s) == 0


def test_time_wait_waits_for_the_destroy_whose_counters_include_the_last_acks():
    s = store()
    s.wait_for_destroy = True
    s.update([entry(packets=3, octets=300)], T0)
    assert s.update([entry(packets=5, octets=400, rpackets=4, roctets=416, tcp_state=7)], T0 + 5) == []
    assert s.expire(T0 + 100) == []  # no idle export of a closing connection
    final = entry(packets=6, octets=452, rpackets=5, roctets=468, tcp_state=7, stop_ns=STOP_NS)
    (fe,) = s.apply_events([(DESTROY, final)], T0 + 125)
    assert (fe.packet_delta, fe.octet_delta, fe.reverse_packet_delta, fe.reverse_octet_delta) == (6, 452, 5, 468)
    assert fe.end_time == STOP_NS / 1e9
    # a closing connection whose DESTROY was lost: the dump's counters, once
    s.update([entry(sport=40001, packets=5, octets=400, tcp_state=7, ct_id=4)], T0 + 130)
    (fe,) = s.update([], T0 + 135)
    assert (fe.entry.sport if hasattr(fe.entry, "sport") else fe.entry.orig_sport, fe.packet_delta) == (40001, 5)
    assert s.update([], T0 + 140) == []


def test_a_reused_tuple_waits_for_the_old_connections_destroy():
    s = store()
    s.update([entry(packets=3, octets=300, ct_id=1)], T0)
    s.begin(T0 + 5)
    s.feed([entry(packets=1, octets=60, ct_id=2, start_ns=1_700_000_104_000_000_000)])
    old_final = entry(packets=4, octets=400, ct_id=1, stop_ns=STOP_NS)
    (fe,) = s.apply_events([(DESTROY, old_final)], T0 + 5)
    assert (fe.entry.ct_id, fe.packet_delta, fe.octet_delta) == (1, 4, 400)
    assert s.finish() == []
    assert s.get(old_final.key).entry.ct_id == 2


def test_lost_events_fall_back_to_the_dump_and_never_export_twice():
    s = store()
    s.update([entry(packets=3, octets=300, ct_id=1), entry(sport=40001, packets=1, octets=60, ct_id=5)], T0)
    # the first one's tuple was reused, the second vanished; both DESTROYs were lost
    s.begin(T0 + 5)
    s.feed([entry(packets=1, octets=60, ct_id=2, start_ns=1_700_000_104_000_000_000)])
    assert s.apply_events([], T0 + 5) == []
    out = s.finish()
    assert sorted((fe.entry.ct_id, fe.packet_delta) for fe in out) == [(1, 3), (5, 1)]
    assert s.ended_by_dump == 2
    # a very late event of either (it cannot come after the dump, but if it did) is a
    # connection unknown to the store: counted, never a second record of a held one
    assert s.get(entry().key).entry.ct_id == 2


def test_without_events_a_reused_tuple_ends_the_old_connection_at_once():
    s = ConnectionStore(active_timeout=60, idle_timeout=15, max_connections=100)
    s.update([entry(packets=3, octets=300, ct_id=1)], T0)
    out = s.update([entry(packets=1, octets=60, ct_id=2, start_ns=1_700_000_104_000_000_000)], T0 + 5)
    assert [(fe.entry.ct_id, fe.packet_delta) for fe in out] == [(1, 3)]


# --- the exporter: events in the cycle, several destinations --------------------------

class ListSink:
    def __init__(self, accept: bool = True):
        self.records: list[dict] = []
        self.accept = accept
        self.stats = {"records_dropped": 0, "connected": accept, "reconnects": 0}

    def submit(self, template_id, records):
        if not self.accept:
            self.stats["records_dropped"] += len(records)
            return False
        self.records.extend(records)
        return True

    async def flush(self):
        pass

    async def close(self):
        pass


class ScriptedEvents:
    def __init__(self):
        self.queue: list = []
        self.closed = False

    def take(self):
        out, self.queue = self.queue, []
        return out

    def stats(self):
        from flowscope.agent.ctevents import EventStats

        return EventStats(len(self.queue), 0, 0, 0)

    def close(self):
        self.closed = True


@pytest.fixture
def inventory(tmp_path):
    inv = tmp_path / "inv.yaml"
    inv.write_text(INVENTORY)
    return StaticMetadata(str(inv))


async def test_events_between_polls_reach_every_destination_and_an_absent_one_holds_back_none(inventory):
    ct, events, clock = StaticConntrack(), ScriptedEvents(), ManualClock(T0)
    main, security, absent = ListSink(), ListSink(), ListSink(accept=False)
    fx = FlowExporter(
        conntrack=ct, sink=main, enricher=Enricher("node-a", inventory), active_timeout=60, idle_timeout=15,
        poll_interval=5, max_connections=100, clock=clock, events=events,
        destinations=[
            Destination("security", security, 60, 15, FlowFilter(protocols=frozenset({17}))),
            Destination("away", absent, 60, 15),
        ],
    )
    tcp = entry("10.244.0.11", "10.244.0.12", 40000, 80, packets=4, octets=400, rpackets=3, roctets=300)
    ct.entries = [tcp]
    await fx.poll_once()
    # a UDP exchange begins and ends between two polls; the TCP one ends too
    udp = entry("10.244.0.11", "10.244.0.12", 41000, 53, proto=17, packets=2, octets=256, rpackets=2,
                roctets=456, ct_id=9, stop_ns=STOP_NS)
    events.queue = [(DESTROY, udp), (DESTROY, tcp._replace(orig_packets=6, orig_bytes=600, tcp_state=7, stop_ns=STOP_NS))]
    ct.entries = []
    clock.t += 5
    await fx.poll_once()
    assert sorted((r["protocolIdentifier"], r["packetTotalCount"], r["octetTotalCount"]) for r in main.records) == [
        (6, 6, 600), (17, 2, 256)]
    assert all(r["flowEndReason"] == 3 and r["flowEndSeconds"] == STOP_NS // 10**9 for r in main.records)
    assert [(r["protocolIdentifier"], r["sourceTransportPort"]) for r in security.records] == [(17, 41000)]
    assert fx.destinations[2].records_refused == 2 and fx.records_refused == 0
    dropped = fx.metrics.registry.get_sample_value("flowscope_agent_destination_records_dropped", {"destination": "away"})
    assert dropped == 2
    assert fx.metrics.registry.get_sample_value("flowscope_agent_connections_ended_by_event") == 2
    await fx.shutdown()
    assert events.closed


async def test_a_destinations_own_timeouts_and_its_namespace_and_flow_type_filter(inventory):
    ct, clock = StaticConntrack(), ManualClock(T0)
    main, fast = ListSink(), ListSink()
    fx = FlowExporter(
        conntrack=ct, sink=main, enricher=Enricher("node-a", inventory), active_timeout=60, idle_timeout=15,
        poll_interval=5, max_connections=100, clock=clock,
        destinations=[Destination("fast", fast, 10, 5, FlowFilter(namespaces=frozenset({"shop"}),
                                                                  flow_types=frozenset({1})))],
    )
    live = entry("10.244.0.11", "10.244.0.12", 40000, 80, packets=4, octets=400)
    ct.entries = [live]
    await fx.poll_once()
    clock.t += 6
    await fx.poll_once()  # idle for 6 s: past fast's 5 s, not main's 15 s
    assert [r["flowEndReason"] for r in fast.records] == [1] and main.records == []
    assert fast.records[0]["flowType"] == 1
    other = FlowFilter(namespaces=frozenset({"elsewhere"}))
    fx.destinations[1].filter = other
    ct.entries = [live._replace(orig_packets=5, orig_bytes=500)]
    clock.t += 11
    await fx.poll_once()  # it moved, then fast's active timeout: filtered out now
    assert len(fast.records) == 1 and fx.destinations[1].records_filtered >= 1


async def test_a_denied_only_destination_gets_denials_only(inventory):
    ct, clock = StaticConntrack(), ManualClock(T0)
    main, security = ListSink(), ListSink()
    fx = FlowExporter(
        conntrack=ct, sink=main, enricher=Enricher("node-a", inventory), active_timeout=60, idle_timeout=15,
        poll_interval=5, max_connections=100, clock=clock,
        destinations=[Destination("security", security, 60, 15, FlowFilter(denied_only=True))],
    )
    ok = entry("10.244.0.11", "10.244.0.12", 40000, 8080, packets=4, octets=400)
    denied = entry("10.244.0.11", "10.244.0.12", 40001, 80, packets=1, octets=60, status=0, tcp_state=1, ct_id=3)
    ct.entries = [ok, denied]
    await fx.poll_once()
    ct.entries = []
    clock.t += 5
    await fx.poll_once()
    assert sorted(r["destinationTransportPort"] for r in main.records) == [80, 8080]
    assert [(r["destinationTransportPort"], r["ingressNetworkPolicyRuleAction"]) for r in security.records] == [(80, 2)]
    assert fx.destinations[1].records_filtered == 1


def test_config_destinations_and_events():
    cfg = parse_config({
        "activeFlowExportTimeout": "30s",
        "destinations": [{
            "name": "security", "address": "10.0.0.9:4739:udp", "idleFlowExportTimeout": "5s",
            "filter": {"protocols": ["TCP", "udp"], "namespaces": ["shop"], "flowTypes": ["InterNode", 3],
                       "deniedOnly": True},
        }],
        "conntrackEvents": {"bufferSize": 1 << 22},
    }, env={})
    (d,) = cfg.destinations
    assert (d.name, str(d.address), d.active_timeout, d.idle_timeout) == ("security", "10.0.0.9:4739:udp", 30.0, 5.0)
    assert d.filter.protocols == {6, 17} and d.filter.flow_types == {2, 3} and d.filter.denied_only
    assert cfg.conntrack_events.buffer_size == 1 << 22 and cfg.conntrack_events.enabled
    assert parse_config({}, env={}).conntrack_events.enabled


@pytest.mark.parametrize("raw, message", [
    ({"destinations": {"a": 1}}, "destinations: "),
    ({"destinations": [{"address": "a:1"}]}, "destinations[0].name"),
    ({"destinations": [{"name": "x"}]}, "destinations[0].address"),
    ({"destinations": [{"name": "x", "address": "a:1:sctp"}]}, "destinations[0].address"),
    ({"destinations": [{"name": "x", "address": "a", "idleFlowExportTimeout": "1ms"}]},
     "destinations[0].idleFlowExportTimeout"),
    ({"destinations": [{"name": "x", "address": "a"}, {"name": "x", "address": "b"}]}, "used twice"),
    ({"destinations": [{"name": "x", "address": "a", "filter": {"flowTypes": ["Sideways"]}}]}, "flowTypes"),
    ({"destinations": [{"name": "x", "address": "a", "filter": {"color": 1}}]}, "filter.color: unknown key"),
    ({"conntrackEvents": {"bufferSize": 10}}, "conntrackEvents.bufferSize"),
    ({"conntrackEvents": {"enabled": "yes"}}, "conntrackEvents.enabled"),
])
def test_config_errors_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(raw, env={})
