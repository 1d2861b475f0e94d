"""The C ingest loop (aggregator/_aggr.c) against its pure-Python twin (hypothesis).

Two AggregationProcess instances take the same random record streams, one with the C
accelerator where it is built and one with the twin alone (its ``_accel`` None: the ingest
loop, the export, the record builder); every held flow's record from ``build_record`` (C)
must also equal ``_build_record_py``'s;
after every batch both must hold the same state (every flow's flags, counters, sides,
exporters, reasons, timers, urgent list, caches' effect on ``flow_bytes``, stats) and every
tick must hand out the same aggregated records in the same order. The streams mix
well-formed agent records (both halves, intra-node, external, denied, ended, reused
5-tuples, reordered reports, labels, IPv6) with malformed ones (missing fields, None,
strings for numbers, floats, bools, negative and past-2^64 values, a record that is no
dict), so both the C loop's own path and its hand-over to the twin are compared.

With ``FLOWSCOPE_AGGREGATOR_PURE=1`` (or without a compiler) both sides are the twin and
the test still runs: it then checks that the dispatch adds nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from array import array
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from agg_records import T0, agent_record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowscope.aggregator import aggregation
from flowscope.aggregator.aggregation import AggregationProcess

IPS = ("10.0.1.5", "10.0.2.7", "fd00::5")
EXPORTERS = ("192.168.10.1", "192.168.10.2", "fd00::1")
# ...and values past what a C Flow holds in its fields (a port past 16 bits, a protocol,
# reason or type past 8, a second past 32): the twin takes those and the Flow keeps them
# as objects (Flow.odd), so they must come out exactly as the twin's array and slots keep them.
BAD_VALUES = (None, "7", 7.0, True, -1, 1 << 64, (1 << 64) - 1, 1 << 70, b"x", (1,), "", 65536, 256, (1 << 32) + 5)
INT_FIELDS = (
    "packetTotalCount", "octetTotalCount", "reversePacketTotalCount", "reverseOctetTotalCount",
    "packetDeltaCount", "octetDeltaCount", "reversePacketDeltaCount", "reverseOctetDeltaCount",
    "flowStartSeconds", "flowEndSeconds", "flowEndReason", "flowType", "sourceTransportPort",
    "destinationTransportPort", "protocolIdentifier", "egressNetworkPolicyRuleAction",
    "ingressNetworkPolicyRuleAction", "destinationServicePort",
)
STR_FIELDS = ("sourcePodName", "destinationPodName", "sourceNodeName", "destinationNodeName", "tcpState",
              "sourceIPv4Address", "sourcePodLabels")


@st.composite
def records(draw: Any) -> Any:
    src = draw(st.sampled_from(IPS[:2]))
    v6 = draw(st.integers(0, 9)) == 0
    dst = "fd00::7" if v6 else draw(st.sampled_from(IPS[:2]))
    if v6:
        src = IPS[2]
    side = draw(st.sampled_from(("src", "dst", "both", "none", "node-only")))
    k8s: dict[str, Any] = {}
    if side in ("src", "both"):
        k8s.update(sourcePodNamespace="shop", sourcePodName=draw(st.sampled_from(("web-1", "web-2"))),
                   sourceNodeName="node-a")
    if side in ("dst", "both"):
        k8s.update(destinationPodNamespace="shop", destinationPodName="db-1", destinationNodeName="node-b")
    if side == "node-only":
        k8s.update(destinationNodeName="node-b")
    k8s["egressNetworkPolicyRuleAction"] = draw(st.sampled_from((0, 0, 0, 1, 2, 3)))
    k8s["ingressNetworkPolicyRuleAction"] = draw(st.sampled_from((0, 0, 0, 1, 2, 3)))
    if draw(st.booleans()):
        k8s["ingressNetworkPolicyName"] = draw(st.sampled_from(("allow", "x" * 1500)))
    big = draw(st.sampled_from((1, 1, 1, 1 << 40, (1 << 64) - 10)))
    pkts, octets = draw(st.integers(0, 50)) * big, draw(st.integers(0, 5000)) * big
    rec = agent_record(
        src=src, dst=dst, sport=draw(st.sampled_from((40000, 40001))), dport=80, proto=draw(st.sampled_from((6, 17))),
        pkts=pkts, octets=octets, rpkts=draw(st.integers(0, 50)), roctets=draw(st.integers(0, 5000)),
        dpkts=draw(st.one_of(st.none(), st.integers(0, 60))), doctets=draw(st.one_of(st.none(), st.integers(0, 6000))),
        start=T0 + draw(st.integers(-3, 3)), end=T0 + draw(st.integers(-2, 40)),
        reason=draw(st.sampled_from((1, 2, 2, 3, 4, 5))), tcp=draw(st.sampled_from(("ESTABLISHED", "TIME_WAIT"))),
        flow_type=draw(st.sampled_from((0, 1, 2, 2, 2, 3, 4))), **k8s,
    )
    if draw(st.integers(0, 5)) == 0:
        rec["sourcePodLabels"] = draw(st.sampled_from(('{"app":"web"}', "", None)))
    for _ in range(draw(st.sampled_from((0, 0, 0, 0, 1, 2)))):  # malformed
        what = draw(st.integers(0, 3))
        if what == 0:
            rec.pop(draw(st.sampled_from(sorted(rec))), None)
        elif what == 1:
            rec[draw(st.sampled_from(INT_FIELDS))] = draw(st.sampled_from(BAD_VALUES))
        elif what == 2:
            rec[draw(st.sampled_from(STR_FIELDS))] = draw(st.sampled_from(BAD_VALUES))
        else:
            rec.pop("packetTotalCount", None)  # an exporter of deltas alone
    if draw(st.integers(0, 40)) == 0:
        return _NotADict(rec)
    return rec


class _NotADict(Mapping[str, Any]):
    """A record that is a mapping but no dict (a foreign decoder's)."""

    def __init__(self, d: dict[str, Any]) -> None:
        self._d = d

    def __getitem__(self, k: str) -> Any:
        return self._d[k]

    def __iter__(self) -> Any:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


streams = st.lists(
    st.tuples(st.lists(records(), min_size=1, max_size=6), st.sampled_from(EXPORTERS),
              st.sampled_from((0, 1, 2, 3, 3, 1 << 32, -1)),
              st.sampled_from((0.0, 1.0, 5.0, 31.0, 61.0, 95.0))),
    min_size=1, max_size=12,
)


def _typed(v: Any) -> Any:
    return (type(v).__name__, v)


def _state(proc: AggregationProcess) -> Any:
    for k, f in proc.flows.items():  # the C Flow is its own key: it finds itself by its key tuple
        assert k == f.key and hash(k) == hash(f.key) and proc.flows.get(f.key) is f
    flows = [
        (tuple(map(_typed, f.key)), _typed(f.flow_type), _typed(f.flags), f.c.tolist(), f.smeta, f.dmeta, f.sexp, f.dexp,
         _typed(f.sdom), _typed(f.ddom), _typed(f.reason), f.tcp_state, f.last_seen,
         None if f.sw is None else f.sw.tolist(), f.correlation)
        for f in proc.flows.values()
    ]
    timers = [(d, w, [f.key for f in due]) for d, w, due in proc._timers]
    return flows, timers, [f.key for f in proc._urgent], proc.flow_bytes, proc.stats.as_dict()


def _exports(out: list[aggregation.ExportedFlow]) -> list[Any]:
    return [(e.record, list(e.record), e.correlation, e.final) for e in out]


def _twin(**kw: Any) -> AggregationProcess:
    proc = AggregationProcess(**kw)
    proc._accel = None
    return proc


def _records_agree(proc: AggregationProcess) -> None:
    """build_record (C where built, with the process's merge cache) and its twin give the
    same record, key order included, for every flow held."""
    for flow in proc.flows.values():
        got = aggregation.build_record(flow, proc._merge_cache, proc._accel)
        want = aggregation._build_record_py(flow, {})
        assert (got, list(got)) == (want, list(want))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams, st.sampled_from((2, 3, 1000)), st.sampled_from((1 << 30, 3000)))
def test_the_c_loop_and_its_twin_agree_on_any_stream(stream: Any, max_flows: int, max_bytes: int) -> None:
    kw = dict(export_interval=60.0, correlation_timeout=30.0, inactive_timeout=90.0, max_flows=max_flows,
              max_flow_bytes=max_bytes)
    native, twin = AggregationProcess(**kw), _twin(**kw)  # type: ignore[arg-type]
    clock = 0.0
    for batch, exporter, domain, dt in stream:
        clock += dt
        kept = native.ingest_many(batch, exporter, domain, clock)
        assert kept == twin.ingest_many(batch, exporter, domain, clock)
        assert _state(native) == _state(twin)
        _records_agree(native)
        assert _exports(native.tick(clock)) == _exports(twin.tick(clock))
        assert _state(native) == _state(twin)
    assert _exports(native.drain()) == _exports(twin.drain())


def test_the_accelerator_is_used_where_built() -> None:
    """Where the extension is built and not turned off, ingest_many is the C loop (so the
    test above compares two implementations, not one with itself)."""
    if os.environ.get(aggregation.PURE_ENV, "") not in ("", "0"):
        assert not aggregation.accelerated()
        return
    try:
        import flowscope.aggregator._aggr  # noqa: F401
    except ImportError:
        assert not aggregation.accelerated()
    else:
        assert aggregation.accelerated() and AggregationProcess()._accel is not None


@pytest.mark.slow
def test_the_aggregation_tests_pass_with_the_twin_forced() -> None:
    """FLOWSCOPE_AGGREGATOR_PURE=1 turns the accelerator off at import, and the aggregation
    core's own tests pass on the twin alone (what a machine without a compiler runs)."""
    env = {**os.environ, aggregation.PURE_ENV: "1"}
    probe = subprocess.run(
        [sys.executable, "-c",
         "import logging; logging.basicConfig(level=logging.INFO)\n"
         "from flowscope.aggregator import aggregation as a\n"
         "p = a.AggregationProcess()\n"
         "for _ in range(3): p.ingest_many([{}], '192.168.10.1', 1, 0.0)\n"
         "print(a.accelerated(), p._accel, p.stats.dropped_invalid)"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert probe.stdout.strip() == "False None 3", probe.stderr
    # the twin says once why it serves
    assert probe.stderr.count(f"aggregation: pure-Python ingest loop, {aggregation.PURE_ENV} is set") == 1, probe.stderr
    here = Path(__file__).parent
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("pytest")), "-q", "-p", "no:cacheprovider",
         str(here / "test_aggregator_core.py"), str(here / "test_aggregator_merge.py"),
         str(here / "test_aggregator_review.py")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_records_with_keys_of_their_own_and_extra_keys_agree() -> None:
    """The C loop maps each record's keys by object first: records whose keys are new str
    objects every time (thousands of them, past its table's size) and records with keys it
    does not read are taken as the twin takes them."""
    from agg_records import destination_half, source_half

    def fresh(rec: dict[str, Any], i: int) -> dict[str, Any]:
        out = {"".join(list(k)): v for k, v in rec.items()}  # equal keys, new objects
        out[f"extra{i}"] = i
        return out

    native, twin = AggregationProcess(), _twin()
    for i in range(120):
        batch = [fresh(source_half(sport=30000 + i, pkts=i + 1), i), fresh(destination_half(sport=30000 + i), i)]
        assert native.ingest_many(batch, "192.168.10.1", 1, float(i)) == twin.ingest_many(batch, "192.168.10.1", 1, float(i)) == 2
    assert _state(native) == _state(twin)
    assert native.stats.flows_correlated == 120
    assert _exports(native.tick(61.0)) == _exports(twin.tick(61.0))


def test_a_periodic_scan_in_slices_agrees() -> None:
    """The C scan loop (exports and skips) and the twin's, over a store where flows are
    ready, pending, unchanged, removed and past their inactivity timeout, in slices of 7
    (``tick(now, max_scan=7)``): the same exports in the same order, the same state."""
    from agg_records import destination_half, source_half

    kw = dict(export_interval=60.0, correlation_timeout=30.0, inactive_timeout=90.0)
    native, twin = AggregationProcess(**kw), _twin(**kw)  # type: ignore[arg-type]
    for proc in (native, twin):
        for i in range(60):
            batch = [source_half(sport=30000 + i, pkts=i + 1)]
            if i % 3:  # every third flow waits for its twin
                batch.append(destination_half(sport=30000 + i))
            proc.ingest_many(batch, "192.168.10.1", 1, 10.0 if i % 4 else 1.0)
    assert _exports(native.tick(30.0)) == _exports(twin.tick(30.0))  # lone halves, uncorrelated
    for proc in (native, twin):  # some flows change again, one ends (removed before the scan)
        proc.ingest_many([source_half(sport=30000 + i, pkts=100 + i) for i in range(0, 60, 5)], "192.168.10.1", 1, 50.0)
        proc.ingest_many([source_half(sport=30001, pkts=500, reason=3)], "192.168.10.1", 1, 50.0)
    assert _state(native) == _state(twin)
    sliced = 0
    for now in (92.0, 92.5, 93.0, 93.5, 94.0, 94.5, 95.0, 95.5, 96.0, 96.5, 97.0):
        got, want = native.tick(now, max_scan=7), twin.tick(now, max_scan=7)
        sliced += len(got)
        assert _exports(got) == _exports(want)
        assert _state(native) == _state(twin)
        assert native.scan_pending == twin.scan_pending
    assert native.stats.records_exported == twin.stats.records_exported
    assert sliced >= 10 and native.stats.flows_expired == twin.stats.flows_expired > 0  # both branches were taken


def test_records_past_the_byte_budget_leave_nothing_in_the_shared_values() -> None:
    """A new flow refused by the byte budget (a peer's long Pod names) is not interned: the
    shared values hold what the held flows hold, in C as in the twin, so refused names
    cannot pile up there (RSS grew by every refused name once, tests/hostile test_5)."""
    from agg_records import source_half

    kw = dict(max_flow_bytes=200_000)
    native, twin = AggregationProcess(**kw), _twin(**kw)  # type: ignore[arg-type]
    batch = [source_half(sport=20000 + i, sourcePodName="é" + f"{i:06d}" * 2000) for i in range(40)]
    assert native.ingest_many(batch, "192.168.10.1", 1, 0.0) == twin.ingest_many(batch, "192.168.10.1", 1, 0.0)
    assert 0 < len(native.flows) < 40 and native.stats.dropped_flow_bytes == 40 - len(native.flows)
    assert _state(native) == _state(twin)
    held = {f.smeta[1] for f in native.flows.values()}
    shared = {v[1] for v in native._shared if isinstance(v, tuple) and len(v) > 1 and isinstance(v[1], str)
              and v[1].startswith("é")}
    assert shared == held
    assert len(native._shared) == len(twin._shared)


# What the twin's code writes into a Flow, and the values a malformed record can bring.
FLOW_VALUES = st.one_of(
    st.integers(-2, 3), st.sampled_from((255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 64) - 1, 1 << 64)),
    st.sampled_from((None, "", "x", 7.0, True, False, b"x", (1,), ("a", 2))),
)
INT_ATTRS = ("flow_type", "flags", "sdom", "ddom", "reason")
OBJ_ATTRS = ("smeta", "dmeta", "sexp", "dexp", "tcp_state", "last_seen", "sw")
flow_ops = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(INT_ATTRS + OBJ_ATTRS), FLOW_VALUES),
    st.tuples(st.just("c="), st.integers(-26, 25), FLOW_VALUES),
    st.tuples(st.just("c+="), st.integers(0, 25), FLOW_VALUES),
    st.tuples(st.just("c[:]="), st.integers(0, 24), st.lists(st.integers(0, 1 << 40), min_size=1, max_size=6)),
)
KEYS = st.tuples(
    st.sampled_from(("10.0.1.5", "fd00::5", b"x", None)), st.sampled_from(("10.0.2.7",)),
    st.sampled_from((0, 80, 65535, 65536, -1, True, 80.0, "80")), st.sampled_from((80, 1 << 20)),
    st.sampled_from((6, 17, 255, 256, -6)),
)


def _correlation(flow: Any) -> str:
    try:
        return str(flow.correlation)
    except Exception as exc:  # noqa: BLE001 - odd flags: the same error
        return type(exc).__name__


def _read(flow: Any) -> Any:
    values = [_typed(getattr(flow, n)) for n in INT_ATTRS] + [getattr(flow, n) for n in OBJ_ATTRS]
    return (tuple(map(_typed, flow.key)), values, flow.c.tolist(), [_typed(v) for v in flow.c],
            list(flow.c[3:9]), list(flow.c[::-5]), len(flow.c), flow.c[-1], _correlation(flow))


def _apply(flow: Any, op: tuple[str, Any, Any]) -> Any:
    what, at, value = op
    try:
        if what == "set":
            setattr(flow, at, value)
        elif what == "c=":
            flow.c[at] = value
        elif what == "c+=":
            flow.c[at] += value
        else:
            flow.c[at:at + len(value)] = array("Q", value[:26 - at])
    except Exception as exc:  # noqa: BLE001 - the kind of error is what is compared
        return type(exc).__name__
    return None


@settings(max_examples=300, deadline=None)
@given(KEYS, FLOW_VALUES, st.lists(flow_ops, max_size=12))
def test_the_c_flow_reads_and_writes_as_the_twins(key: Any, flow_type: Any, ops: Any) -> None:
    """The C Flow (counters, ports, flags, reasons, domains and seconds in C fields) holds
    whatever the twin's code writes into it exactly as the twin's slots-and-array Flow does:
    the same values of the same types read back, the same errors raised (an array('Q')'s
    TypeError / OverflowError), values past its fields' ranges kept as objects; it hashes
    and compares as its key, which is how the flows dict finds it by a key tuple."""
    _aggr = pytest.importorskip("flowscope.aggregator._aggr")
    try:
        hash(flow_type)
    except TypeError:
        return
    c_flow, py_flow = _aggr.Flow(key, flow_type, 5.0), aggregation.Flow(key, flow_type, 5.0)
    assert _read(c_flow) == _read(py_flow)
    assert hash(c_flow) == hash(key) and c_flow == key and not c_flow != key and {key: 1}[c_flow] == 1
    for op in ops:
        assert _apply(c_flow, op) == _apply(py_flow, op), op
        assert _read(c_flow) == _read(py_flow), op
    if tuple(map(type, key)) == (str, str, int, int, int) and 0 <= key[2] <= 65535 and 0 <= key[4] <= 255 and key[3] == 80:
        assert "key" not in c_flow.odd  # a key an agent sends is held in C fields


def test_a_c_flow_is_small_and_untracked() -> None:
    """What keeps a held flow under 400 bytes (benchmarks/aggregator_correlation.py): one
    object of at most 320 bytes, not tracked by the cycle collector, its own dict key."""
    _aggr = pytest.importorskip("flowscope.aggregator._aggr")
    import gc

    flow = _aggr.Flow(("10.0.1.5", "10.0.2.7", 40000, 80, 6), 2, 5.0)
    assert sys.getsizeof(flow) <= 320 and not gc.is_tracked(flow)
    native = AggregationProcess()
    if native._accel is None:
        return
    from agg_records import destination_half, source_half

    native.ingest_many([source_half(sport=30000), destination_half(sport=30000)], "192.168.10.1", 1, 0.0)
    (k, f), = native.flows.items()
    assert k is f and type(f) is _aggr.Flow and f.odd == {} and not gc.is_tracked(f)
