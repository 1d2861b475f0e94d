"""Properties of the aggregation core over generated histories (hypothesis):

* whatever the arrival order, tick times and lost records (all but a side's first), the
  deltas exported for each node add up to that node's final totals, and the final totals
  are exported exactly;
* no input, however malformed, makes ``ingest_many`` raise, and a dropped record is counted.
"""

from __future__ import annotations

from agg_records import NODE_A, NODE_B, destination_half, source_half
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowscope.aggregator.aggregation import AggregationProcess

SUFFIX = {"src": "FromSourceNode", "dst": "FromDestinationNode"}
FIELDS = ("packetTotalCount", "octetTotalCount", "reversePacketTotalCount", "reverseOctetTotalCount")


@st.composite
def histories(draw):
    """Per node: growing totals, reported in order; some reports lost; both nodes interleaved."""
    events = []
    for side in ("src", "dst"):
        n = draw(st.integers(1, 8))
        totals = [0, 0, 0, 0]
        sent = [0, 0, 0, 0]
        for i in range(n):
            totals = [t + draw(st.integers(0, 5000)) for t in totals]
            lost = i > 0 and i < n - 1 and draw(st.booleans())  # never a side's first or last report
            deltas = [t - s for t, s in zip(totals, sent)]
            sent = list(totals)  # the agent believes it sent it
            if not lost:
                events.append((side, i, list(totals), deltas))
    # interleave the two nodes, keeping each node's own order
    order = draw(st.permutations(range(len(events))))
    src = [e for e in events if e[0] == "src"]
    dst = [e for e in events if e[0] == "dst"]
    merged, si, di = [], 0, 0
    for k in order:
        if k % 2 == 0 and si < len(src) or di >= len(dst):
            merged.append(src[si]); si += 1
        else:
            merged.append(dst[di]); di += 1
    ticks = draw(st.lists(st.integers(0, 2), min_size=len(merged), max_size=len(merged)))
    return merged, ticks


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_exported_deltas_add_up_to_each_nodes_totals(history):
    events, ticks = history
    agg = AggregationProcess(export_interval=10, correlation_timeout=25, inactive_timeout=1000, max_flows=10)
    now, exported = 0.0, []
    final = {}
    for (side, i, totals, deltas), tick in zip(events, ticks):
        counters = dict(pkts=totals[0], octets=totals[1], rpkts=totals[2], roctets=totals[3],
                        dpkts=deltas[0], doctets=deltas[1], drpkts=deltas[2], droctets=deltas[3], end=1000 + i)
        rec = source_half(**counters) if side == "src" else destination_half(**counters)
        assert agg.ingest(rec, NODE_A if side == "src" else NODE_B, 1, now)
        final[side] = totals
        now += 4.0 * tick
        exported += agg.tick(now)
    exported += agg.drain()
    assert exported, "nothing exported"
    for side, suffix in SUFFIX.items():
        last = exported[-1].record
        assert [last[f + suffix] for f in FIELDS] == final[side]
        for f in FIELDS:
            delta_name = f.replace("Total", "Delta") + suffix
            assert sum(e.record[delta_name] for e in exported) == last[f + suffix], (side, f)
            assert all(e.record[delta_name] >= 0 for e in exported)
    # the flow's own counters are the source node's
    assert [exported[-1].record[f] for f in FIELDS] == final["src"]
    assert agg.stats.counter_resets == 0


_NAMES = st.sampled_from([
    "sourceIPv4Address", "destinationIPv4Address", "sourceIPv6Address", "destinationIPv6Address",
    "sourceTransportPort", "destinationTransportPort", "protocolIdentifier", "packetTotalCount", "octetTotalCount",
    "reversePacketTotalCount", "reverseOctetTotalCount", "packetDeltaCount", "flowType", "flowEndSeconds",
    "flowStartSeconds", "flowEndReason", "tcpState", "sourcePodName", "destinationPodName", "sourceNodeName",
    "egressNetworkPolicyRuleAction", "ingressNetworkPolicyRuleAction", "destinationClusterIPv4", "unknown:1:2",
])
_VALUES = st.one_of(st.none(), st.integers(-2**70, 2**70), st.text(max_size=8), st.binary(max_size=4),
                    st.floats(allow_nan=True), st.booleans(), st.sampled_from(["10.0.0.1", "fd00::1", "0.0.0.0"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(_NAMES, _VALUES, max_size=14), max_size=6), st.integers(0, 3))
def test_no_record_makes_ingest_raise(records, start):
    agg = AggregationProcess(export_interval=5, correlation_timeout=5, inactive_timeout=5, max_flows=3)
    kept = agg.ingest_many(records, NODE_A, 1, float(start))
    st_ = agg.stats
    assert st_.records_received == len(records)
    assert kept + st_.dropped_invalid + st_.dropped_flow_cap + st_.dropped_stale == len(records)
    # and whatever was kept can be exported, snapshotted and drained
    for t in (10.0, 20.0):
        agg.tick(t)
    agg.snapshot()
    agg.drain()
