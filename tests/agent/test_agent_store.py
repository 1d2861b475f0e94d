"""The connection store under an injected clock: active, idle, end, reuse, cap, denial."""

from __future__ import annotations

from agent_entries import entry
from flowscope.agent.conntrack import IPS_DYING
from flowscope.agent.store import ConnectionStore, FlowEndReason
from hypothesis import given, settings
from hypothesis import strategies as st

T0 = 1_700_000_000.0


def store(**kw):
    args = dict(active_timeout=60.0, idle_timeout=15.0, max_connections=1000)
    args.update(kw)
    return ConnectionStore(**args)


def test_active_connection_is_exported_every_active_timeout_with_deltas():
    s = store()
    assert s.update([entry(packets=10, octets=1000, rpackets=8, roctets=800)], T0) == []
    assert s.expire(T0 + 5) == []
    # keeps moving: idle never fires, active fires at +60
    t = T0
    for i in range(1, 13):
        t = T0 + 5 * i
        s.update([entry(packets=10 + i, octets=1000 + 100 * i, rpackets=8 + i, roctets=800 + 50 * i)], t)
        out = s.expire(t)
        if t < T0 + 60:
            assert out == []
    assert len(out) == 1
    rec = out[0]
    assert rec.reason == FlowEndReason.ACTIVE_TIMEOUT
    assert (rec.packet_delta, rec.octet_delta, rec.reverse_packet_delta, rec.reverse_octet_delta) == (22, 2200, 20, 1400)
    # the next active export carries only what came after
    for i in range(13, 25):
        t = T0 + 5 * i
        s.update([entry(packets=10 + i, octets=1000 + 100 * i, rpackets=8 + i, roctets=800 + 50 * i)], t)
        out = s.expire(t)
        if out:
            break
    assert t == T0 + 120
    assert out[0].packet_delta == 12 and out[0].octet_delta == 1200
    assert out[0].reverse_packet_delta == 12 and out[0].reverse_octet_delta == 600


def test_idle_connection_is_exported_once_after_idle_timeout_and_again_when_it_moves():
    s = store()
    s.update([entry(packets=3, octets=300)], T0)
    assert s.expire(T0 + 14.9) == []
    out = s.expire(T0 + 15)
    assert [r.reason for r in out] == [FlowEndReason.IDLE_TIMEOUT]
    assert out[0].packet_delta == 3 and out[0].octet_delta == 300
    s.update([entry(packets=3, octets=300)], T0 + 20)
    assert s.expire(T0 + 100) == []  # still idle: no second idle export
    s.update([entry(packets=5, octets=500)], T0 + 101)
    out = s.expire(T0 + 116)
    assert [r.reason for r in out] == [FlowEndReason.IDLE_TIMEOUT]
    assert out[0].packet_delta == 2 and out[0].octet_delta == 200


def test_gone_from_table_gives_final_end_of_flow_export():
    s = store()
    s.update([entry(packets=3, octets=300)], T0)
    s.update([entry(packets=7, octets=900, rpackets=1, roctets=60)], T0 + 5)
    out = s.update([], T0 + 10)
    assert [r.reason for r in out] == [FlowEndReason.END_OF_FLOW]
    assert (out[0].packet_delta, out[0].octet_delta, out[0].reverse_packet_delta) == (7, 900, 1)
    assert len(s) == 0
    assert s.expire(T0 + 1000) == []


def test_time_wait_ends_once_and_stays_a_tombstone():
    s = store()
    s.update([entry(packets=3, octets=300)], T0)
    tw = entry(packets=6, octets=500, tcp_state=7)
    out = s.update([tw], T0 + 5)
    assert [r.reason for r in out] == [FlowEndReason.END_OF_FLOW]
    assert out[0].packet_delta == 6
    assert s.update([tw], T0 + 10) == []
    assert s.expire(T0 + 500) == []
    assert s.update([], T0 + 120) == []  # the kernel forgot it: no second final export
    assert len(s) == 0


def test_dying_and_short_lived_connections_seen_once_are_exported_once():
    s = store()
    out = s.update([entry(packets=4, octets=400, status=IPS_DYING | 2, stop_ns=1_700_000_003_000_000_000)], T0)
    assert [r.reason for r in out] == [FlowEndReason.END_OF_FLOW]
    assert out[0].end_time == 1_700_000_003.0 and out[0].start_time == 1_700_000_000.0


def test_tuple_reuse_ends_the_old_connection_and_restarts_counters():
    s = store()
    s.update([entry(packets=100, octets=10_000, ct_id=1)], T0)
    out = s.update([entry(packets=2, octets=120, ct_id=2, start_ns=1_700_000_010_000_000_000)], T0 + 5)
    assert [r.reason for r in out] == [FlowEndReason.END_OF_FLOW]
    assert out[0].packet_delta == 100
    out = s.expire(T0 + 5 + 15)
    assert out[0].packet_delta == 2 and out[0].octet_delta == 120  # never 2 - 100


def test_counters_going_down_without_id_change_never_give_negative_deltas():
    s = store()
    s.update([entry(packets=50, octets=5000, ct_id=0, start_ns=0)], T0)
    s.expire(T0 + 15)
    out = s.update([entry(packets=3, octets=90, ct_id=0, start_ns=0)], T0 + 20)
    assert [r.reason for r in out] == [FlowEndReason.END_OF_FLOW]
    assert out[0].packet_delta == 0  # the old one had nothing new since its idle export
    out = s.expire(T0 + 35)
    assert out[0].packet_delta == 3 and out[0].octet_delta == 90


def test_cap_counts_each_dropped_connection_once_and_holds_no_more():
    s = store(max_connections=10)
    batch = [entry(sport=1000 + i) for i in range(25)]
    s.update(batch, T0)
    assert len(s) == 10 and s.dropped_total == 15 and s.overflow_now == 15
    s.update(batch, T0 + 5)
    assert len(s) == 10 and s.dropped_total == 15
    s.update(batch + [entry(sport=5000)], T0 + 10)
    assert s.dropped_total == 16


def test_denied_unreplied_connection_is_exported_once_and_counted():
    denied_port = 9999
    s = store(is_denied=lambda e: e.orig_dport == denied_port)
    syn = entry(dport=denied_port, packets=3, octets=180, status=0, tcp_state=1)
    ok = entry(dport=80, packets=1, octets=60, status=0, tcp_state=1)
    out = s.update([syn, ok], T0)
    assert len(out) == 1 and out[0].denied and out[0].packet_delta == 3
    syn2 = entry(dport=denied_port, packets=5, octets=300, status=0, tcp_state=1)
    assert s.update([syn2, ok], T0 + 5) == []
    assert s.expire(T0 + 100)[0].entry.orig_dport == 80
    assert s.denied_total == 1


def test_flush_is_a_forced_end_for_live_connections():
    s = store()
    s.update([entry(sport=1, packets=1), entry(sport=2, packets=2, tcp_state=7)], T0)
    out = s.flush(T0 + 1)
    assert [(r.entry.orig_sport, r.reason) for r in out] == [(1, FlowEndReason.FORCED_END)]
    assert len(s) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 5000), st.integers(1, 40)), min_size=1, max_size=40))
def test_sum_of_deltas_is_the_conntrack_total(steps):
    """Whatever the timing, the deltas exported over a connection's life add up to its totals."""
    s = store(active_timeout=20.0, idle_timeout=10.0)
    t, packets, octets = T0, 0, 0
    exported_p = exported_o = 0
    for dp, do, dt in steps:
        packets, octets = packets + dp, octets + do
        for r in s.update([entry(packets=packets, octets=octets)], t) + s.expire(t):
            assert r.packet_delta >= 0 and r.octet_delta >= 0
            exported_p += r.packet_delta
            exported_o += r.octet_delta
        t += dt
    for r in s.update([], t):
        exported_p += r.packet_delta
        exported_o += r.octet_delta
    assert (exported_p, exported_o) == (packets, octets)


def test_an_incomplete_dump_ends_nothing():
    s = store()
    s.update([entry(sport=1, packets=1), entry(sport=2, packets=1)], T0)
    s.begin(T0 + 5)
    s.feed([entry(sport=1, packets=2)])
    assert s.finish(complete=False) == []
    assert len(s) == 2
    out = s.update([entry(sport=1, packets=2)], T0 + 10)
    assert [(r.entry.orig_sport, r.reason) for r in out] == [(2, FlowEndReason.END_OF_FLOW)]


def test_expiry_taken_one_by_one_and_stopped_early_leaves_the_rest_queued():
    def filled():
        s = store(idle_timeout=10.0)
        first = [entry(sport=1000 + i, ct_id=i + 1, packets=i) for i in range(30)]
        s.update(first, T0)
        s.update(first + [entry(sport=2000 + i, ct_id=100 + i) for i in range(20)], T0 + 3)  # a second deadline
        return s

    whole = filled().expire(T0 + 20)
    assert len(whole) == 50 and [fe.reason for fe in whole] == [FlowEndReason.IDLE_TIMEOUT] * 50
    s = filled()
    it = s.expire_iter(T0 + 20)
    first = [next(it) for _ in range(7)]
    it.close()  # a consumer that stopped (cancelled): nothing lost, nothing exported twice
    assert first + s.expire(T0 + 20) == whole
    assert s.expire(T0 + 20) == []
