"""The C ingest loop on records as the IPFIX decoder makes them, against its pure-Python twin.

Why apart from test_aggregator_accel.py: that file feeds records built in Python (ordinary
dicts). The decoder's records are split-table dicts sharing one keys table per template,
which the C loop reads by position (aggregator/_aggr.c, "a record's values by position"),
and their strings and addresses come from the decoder's bounded caches, so equal values
are not always the same objects: the side-tuple table is keyed by value. Here records are
encoded with flowscope's ExportSession, decoded with its Decoder (the collecting process's
path), mutated the ways a caller could (a key deleted, a value replaced by a bad one, a key
added, which grows the template's shared keys table), and fed to the C loop and the twin:
their state and exports must agree. Also: a flow found by its key tuple whatever its
addresses and ports (the C loop hashes keys without building the tuple), and equal Pod
fields of distinct objects shared as one tuple. With FLOWSCOPE_AGGREGATOR_PURE=1 both sides
are the twin (and the last three tests hold for it as they do for the C loop);
test_aggregator_accel.py checks that the C loop serves wherever it is built.
"""

from __future__ import annotations

from typing import Any

from agg_records import T0, agent_record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_aggregator_accel import _exports, _records_agree, _state, _twin

from flowscope.aggregator import aggregation
from flowscope.aggregator.aggregation import AggregationProcess
from flowscope.ipfix import Decoder, ExportSession, Template
from flowscope.ipfix.antrea import agent_fields

PODS = ("web-1", "web-2", "db-1", "")
SERVICE_PORTS = (0, 80, 8080, 50051)  # past 256: a new int object in every decoded record


@st.composite
def agent_records(draw: Any, v6: bool) -> dict[str, Any]:
    src, dst = ("fd00::5", "fd00::7") if v6 else (draw(st.sampled_from(("10.0.1.5", "10.0.1.6"))), "10.0.2.7")
    side = draw(st.sampled_from(("src", "dst", "both", "none")))
    k8s: dict[str, Any] = {}
    if side in ("src", "both"):
        k8s.update(sourcePodNamespace="shop", sourcePodName=draw(st.sampled_from(PODS)), sourceNodeName="node-a")
    if side in ("dst", "both"):
        k8s.update(destinationPodNamespace="shop", destinationPodName=draw(st.sampled_from(PODS)),
                   destinationNodeName="node-b")
    k8s["destinationServicePort"] = draw(st.sampled_from(SERVICE_PORTS))
    k8s["egressNetworkPolicyRuleAction"] = draw(st.sampled_from((0, 0, 1, 2)))
    k8s["ingressNetworkPolicyRuleAction"] = draw(st.sampled_from((0, 0, 1, 3)))
    big = draw(st.sampled_from((1, 1, 1 << 40)))
    return agent_record(
        src=src, dst=dst, sport=draw(st.sampled_from((40000, 40001, 65535))), dport=draw(st.sampled_from((80, 8080))),
        proto=draw(st.sampled_from((6, 17))), pkts=draw(st.integers(0, 50)) * big, octets=draw(st.integers(0, 5000)),
        rpkts=draw(st.integers(0, 50)), roctets=draw(st.integers(0, 5000)),
        dpkts=draw(st.integers(0, 60)), doctets=draw(st.integers(0, 6000)),
        start=T0 + draw(st.integers(-3, 3)), end=T0 + draw(st.integers(-2, 40)),
        reason=draw(st.sampled_from((1, 2, 3, 5))), tcp=draw(st.sampled_from(("ESTABLISHED", "TIME_WAIT"))),
        flow_type=draw(st.sampled_from((0, 1, 2, 2, 3, 4))), **k8s,
    )


BAD = (None, "7", -1, 1 << 64, 65536, b"x")
MUTATIONS = st.sampled_from(("none", "none", "none", "delete", "bad", "add"))


def decoded(batches: list[list[dict[str, Any]]], v6: bool) -> list[list[dict[str, Any]]]:
    """The batches as the collecting process hands them over: encoded, then decoded."""
    session = ExportSession(1)
    session.add_template(Template.build(256, agent_fields(6 if v6 else 4)))
    decoder = Decoder()
    decoder.decode(session.encode_templates(0)[0])
    out = []
    for batch in batches:
        records: list[dict[str, Any]] = []
        for message in session.encode_records(256, batch, 0):
            records += [rec for _t, rec in decoder.decode(message).data_records()]
        out.append(records)
    return out


def mutate(rec: dict[str, Any], how: str, data: Any) -> None:
    if how == "delete":
        del rec[data.draw(st.sampled_from(sorted(rec)))]
    elif how == "bad":
        rec[data.draw(st.sampled_from(sorted(rec)))] = data.draw(st.sampled_from(BAD))
    elif how == "add":  # a key the template lacks: on 3.11 it joins the shared keys table
        rec[data.draw(st.sampled_from(("sourcePodLabels", "destinationPodLabels", "extra")))] = '{"app":"web"}'


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.data())
def test_decoded_records_give_the_twins_results(v6: bool, data: Any) -> None:
    batches = data.draw(st.lists(st.lists(agent_records(v6), min_size=1, max_size=8), min_size=1, max_size=6))
    kw: dict[str, Any] = dict(export_interval=60.0, correlation_timeout=30.0, inactive_timeout=90.0,
                              max_flows=data.draw(st.sampled_from((3, 1000))))
    native, twin = AggregationProcess(**kw), _twin(**kw)
    clock = 0.0
    for batch in decoded(batches, v6):
        for rec in batch:
            mutate(rec, data.draw(MUTATIONS), data)
        clock += data.draw(st.sampled_from((0.0, 5.0, 31.0, 95.0)))
        exporter = data.draw(st.sampled_from(("192.168.10.1", "192.168.10.2")))
        assert native.ingest_many(batch, exporter, 1, clock) == twin.ingest_many(batch, exporter, 1, clock)
        assert _state(native) == _state(twin)
        _records_agree(native)
        assert _exports(native.tick(clock)) == _exports(twin.tick(clock))
    assert _exports(native.drain()) == _exports(twin.drain())


def test_records_of_two_templates_and_of_instance_dicts_agree() -> None:
    """Split-table dicts of other shapes: two templates' records interleaved, and the
    __dict__ of objects (keys shared by the instances of a class, not the decoder's)."""

    class Rec:
        pass

    v4 = decoded([[agent_record(sport=40000 + i, destinationPodName="db-1") for i in range(4)]], False)[0]
    v6 = decoded([[agent_record(src="fd00::5", dst="fd00::7", sport=40000 + i) for i in range(4)]], True)[0]
    objs = []
    for i in range(4):
        o = Rec()
        o.__dict__.update(agent_record(sport=41000 + i, sourcePodName="web-1"))
        objs.append(o.__dict__)
    mixed = [r for pair in zip(v4, v6, objs) for r in pair]
    native, twin = AggregationProcess(), _twin()
    assert native.ingest_many(mixed, "192.168.10.1", 1, 1.0) == twin.ingest_many(mixed, "192.168.10.1", 1, 1.0) == 12
    assert _state(native) == _state(twin)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40), st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 255))
def test_a_flow_is_found_by_its_key_tuple_whatever_the_key(src: str, dst: str, sport: int, dport: int,
                                                           proto: int) -> None:
    """The C loop hashes a key from its items (CPython's tuple hash, without the tuple) and
    inserts the Flow with that hash: a lookup by the real tuple must find it."""
    proc = AggregationProcess()
    rec = agent_record(src="10.0.1.5", dst="10.0.2.7", sport=sport, dport=dport, proto=proto)
    rec["sourceIPv4Address"], rec["destinationIPv4Address"] = src, dst
    assert proc.ingest_many([rec, dict(rec, packetTotalCount=20)], "192.168.10.1", 1, 1.0) == 2
    key = (src, dst, sport, dport, proto)
    (flow,) = proc.flows.values()
    assert proc.flows.get(key) is flow and flow.key == key
    if type(flow) is not aggregation.Flow:  # the C Flow is its own key (the twin's dict is keyed by the tuple)
        assert hash(flow) == hash(key) and proc.flows.get(flow) is flow
    assert flow.c[0] == 20  # the second record found the first one's flow


def test_equal_pod_fields_of_distinct_objects_share_one_tuple() -> None:
    """Decoded records of one Pod carry equal values that are not always the same objects
    (a decoder cache's slot reused; a Service port past 256 is a new int every record):
    every flow of that Pod still holds one shared tuple, as with the twin."""
    def rec(i: int) -> dict[str, Any]:
        r = agent_record(sport=40000 + i, sourcePodNamespace="shop", sourcePodName="web-1", sourceNodeName="node-a",
                         destinationServicePort=int("8080"))
        r["destinationClusterIPv4"] = ".".join(["0"] * 4)  # a new str each time
        r["sourcePodName"] = "".join(["web", "-1"])
        return r

    for proc in (AggregationProcess(), _twin()):
        records = [rec(i) for i in range(50)]
        assert proc.ingest_many(records, "192.168.10.1", 1, 1.0) == 50
        metas = {id(f.smeta) for f in proc.flows.values()}
        assert len(metas) == 1, proc._accel
