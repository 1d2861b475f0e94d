"""The C export's Records (aggregator/_aggr.c) against the twin's dicts, and the sinks'
fast paths that read them without names (hypothesis).

Two AggregationProcess instances take the same random record streams (well-formed agent
records and malformed ones, as in test_aggregator_accel.py, plus values only a Record
can bring to a sink: strings with lone surrogates, names past 255 and 65535 octets, ints
where strings belong, addresses inet_pton refuses), one with the C accelerator where it
is built, one the twin alone. For every tick's exports:

- the Record reads as the twin's dict: ``dict(rec)``, key order, ``rec[k]``, ``get``,
  ``in``, ``len``, ``items()``, ``==`` (a value the C Flow cannot hold makes the flow the
  twin's, Flow.odd, and its record a dict: that path must agree too), and the flow log
  writes the same JSON line for it;
- the ClickHouse sink's columns from the Records (clickhouse_sink.flows_columns, C) equal
  collector.rows.flows_to_columns of the twin's dicts, column for column and type for
  type, with the same records refused, in both text forms;
- the IPFIX sink's data records (sinks.data_records: the C encoder's bytes, the codec for
  what it leaves) are byte for byte what the codec encodes from the twin's dicts, and a
  message of them decodes (flowscope.ipfix) to the records the dicts' message decodes to.

With FLOWSCOPE_AGGREGATOR_PURE=1 both sides are the twin (dicts) and the same checks run.
"""

from __future__ import annotations

import json
import sys
import tracemalloc
from collections.abc import Mapping
from typing import Any

import pytest
from agg_records import T0, agent_record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_aggregator_accel import records as accel_records

from flowscope.aggregator import aggregation
from flowscope.aggregator.aggregation import AggregationProcess, ExportedFlow
from flowscope.aggregator.clickhouse_sink import flows_columns
from flowscope.aggregator.sinks import TEMPLATE_IDS, data_records, record_to_json, template_names
from flowscope.collector.rows import flows_to_columns
from flowscope.ipfix import Decoder, ExportSession, Template, UsageError

TEMPLATES = {tid: Template.build(tid, template_names(v6, e6)) for (v6, e6), tid in TEMPLATE_IDS.items()}
ODD_TEXT = ("\ud800", "é" * 200, "x" * 300, "y" * 70_000, 7, "not-an-ip", "1.2.3.4\x00", "",
            "10.9.9.9", "0.0.0.0", "::1", "::")  # addresses of the other family, too


@st.composite
def sink_records(draw: Any) -> Any:
    """An agent record, sometimes with a value that a Record holds and a sink must refuse
    or leave to the codec exactly as it does the dict's."""
    rec = draw(accel_records())
    if isinstance(rec, dict) and draw(st.integers(0, 2)) == 0:
        field = draw(st.sampled_from(("sourcePodName", "destinationPodName", "tcpState", "sourcePodLabels",
                                      "egressName", "sourceIPv4Address", "destinationServicePortName",
                                      "destinationClusterIPv4", "egressIP", "sourceIPv6Address",
                                      "destinationClusterIPv6", "proxySnatIPv6")))
        rec[field] = draw(st.sampled_from(ODD_TEXT))
    return rec


streams = st.lists(
    st.tuples(st.lists(sink_records(), min_size=1, max_size=6),
              st.sampled_from(("192.168.10.1", "192.168.10.2", "fd00::1", "")),
              st.sampled_from((0, 1, 1 << 32)), st.sampled_from((0.0, 5.0, 31.0, 61.0, 95.0))),
    min_size=1, max_size=10,
)


def _twin(**kw: Any) -> AggregationProcess:
    proc = AggregationProcess(**kw)
    proc._accel = None
    return proc


def _reads_as(rec: Mapping[str, Any], want: dict[str, Any]) -> None:
    assert type(want) is dict
    got = dict(rec)
    assert got == want and list(got) == list(want) and list(rec) == list(want)
    assert rec == want and not rec != want and len(rec) == len(want)
    assert list(rec.items()) == list(want.items()) and list(rec.keys()) == list(want)
    assert list(rec.values()) == list(want.values())
    for k, v in want.items():
        assert k in rec and rec[k] == v and type(rec[k]) is type(v) and rec.get(k) == v
    assert "noSuchElement" not in rec and rec.get("noSuchElement", 5) == 5
    with pytest.raises(KeyError):
        rec["noSuchElement"]
    assert isinstance(rec, Mapping)


def _same_columns(got: tuple[list[Any], int], want: tuple[list[Any], int]) -> None:
    gc_, gb = got
    wc, wb = want
    assert gb == wb and len(gc_) == len(wc)
    for g, w in zip(gc_, wc):
        assert type(g) is type(w) and list(g) == list(w)
        if hasattr(w, "typecode"):
            assert g.typecode == w.typecode


def _codec_bytes(rec: Mapping[str, Any]) -> bytes | None:
    tid = TEMPLATE_IDS[("sourceIPv6Address" in rec, "originalExporterIPv6Address" in rec)]
    try:
        return TEMPLATES[tid].encode_record(dict(rec))
    except UsageError:
        return None


LIMIT = 65535 - 20  # a TCP session's data set limit


def _sink_bytes(flow: ExportedFlow) -> bytes | None:
    [(tid, [item], sets)] = data_records([flow], LIMIT)
    if sets:
        payload, count = item
        assert count == 1
        return payload
    return _codec_bytes(item)


def _session() -> ExportSession:
    session = ExportSession(7)
    for t in TEMPLATES.values():
        session.add_template(t)
    return session


def _messages(items: list[tuple[int, list[Any], bool]], session: ExportSession) -> list[bytes]:
    wire: list[bytes] = []
    for tid, recs, sets in items:
        if sets:
            wire += session.encode_data_sets(tid, recs, 0)
        else:
            wire += session.encode_records(tid, [r for r in recs if _codec_bytes(r) is not None], 0)
    return wire


def _decoded(items: list[tuple[int, list[Any], bool]]) -> list[dict[str, Any]]:
    session = _session()
    wire = session.encode_templates(0) + _messages(items, session)
    dec = Decoder()
    return sorted((rec for m in wire for _t, rec in dec.decode(m).data_records()), key=repr)


def _agree(native: list[ExportedFlow], twin: list[ExportedFlow]) -> None:
    assert len(native) == len(twin)
    for n, t in zip(native, twin):
        assert (n.correlation, n.final) == (t.correlation, t.final)
        if aggregation.accelerated() and type(n.record) is not dict:
            assert type(n.record) is aggregation._aggr.Record
        _reads_as(n.record, t.record)  # type: ignore[arg-type]
        assert json.dumps(record_to_json(n)) == json.dumps(record_to_json(t))  # the flow log's line
        assert _sink_bytes(n) == _codec_bytes(t.record)
    for text in ("list", "arrow"):
        _same_columns(flows_columns(native, time_inserted=T0, commit_id=9, text=text),
                      flows_to_columns(twin, time_inserted=T0, commit_id=9, text=text))
    assert _decoded(data_records(native, LIMIT)) == _decoded(data_records(twin, LIMIT))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams)
def test_records_and_the_sinks_fast_paths_agree_with_the_twins_dicts(stream: Any) -> None:
    kw = dict(export_interval=60.0, correlation_timeout=30.0, inactive_timeout=90.0, max_flows=1000)
    native, twin = AggregationProcess(**kw), _twin(**kw)  # type: ignore[arg-type]
    clock = 0.0
    for batch, exporter, domain, dt in stream:
        clock += dt
        native.ingest_many(batch, exporter, domain, clock)
        twin.ingest_many(batch, exporter, domain, clock)
        _agree(native.tick(clock), twin.tick(clock))
    _agree(native.drain(), twin.drain())


def _exported(n: int, accel: bool, **k8s: Any) -> list[ExportedFlow]:
    proc = AggregationProcess(export_interval=60.0)
    if not accel:
        proc._accel = None
    for i in range(n):
        proc.ingest_many([agent_record(sport=10000 + i, flow_type=1, sourcePodName=f"web-{i % 7}",
                                       destinationPodName="db", **k8s)], "192.168.10.1", 1, 1.0)
    out = proc.tick(60.0)
    assert len(out) == n
    return out


def test_a_batch_of_records_and_dicts_goes_the_dict_way_and_agrees() -> None:
    """A batch that mixes Records with dicts (a flow the twin laid out) converts the dict
    way, whole: the same columns, the same data records."""
    a, b = _exported(5, True), _exported(5, False)
    mixed = a[:3] + b[3:]
    _same_columns(flows_columns(mixed, time_inserted=T0, commit_id=1),
                  flows_to_columns(b, time_inserted=T0, commit_id=1))
    assert [_sink_bytes(f) for f in mixed] == [_codec_bytes(f.record) for f in b]
    assert flows_columns([], time_inserted=T0, commit_id=1)[1] == 0


def test_a_record_is_immutable_unhashable_and_pickles_as_its_dict() -> None:
    import copy
    import pickle

    [f] = _exported(1, True)
    rec = f.record
    if type(rec) is dict:
        pytest.skip("the twin serves (FLOWSCOPE_AGGREGATOR_PURE=1 or no compiler): records are dicts")
    want = dict(rec)
    with pytest.raises(TypeError):
        rec["flowType"] = 3  # type: ignore[index]
    with pytest.raises(TypeError):
        hash(rec)
    assert pickle.loads(pickle.dumps(rec)) == want and copy.copy(rec) == want and rec.copy() == want
    assert repr(rec) == f"Record({want!r})"


@pytest.mark.parametrize("size", [1500, 65535])
def test_data_sets_frame_as_the_codecs_messages_and_bad_sets_are_refused(size: int) -> None:
    """The C encoder's data sets, framed by ExportSession.encode_data_sets, are the very
    messages the codec makes of the dicts (split at the same records, the same sequence
    numbers, across calls); a set too large or not (bytes, count) raises, sending none."""
    from flowscope.ipfix import RecordTooLarge

    native = _exported(300, True, ingressNetworkPolicyName="p" * 40)
    dicts = [dict(f.record) for f in native]
    a, b = _session(), _session()
    a.max_message_size = b.max_message_size = size
    tid = TEMPLATE_IDS[(False, False)]
    for start in (0, 150):
        got = _messages(data_records(native[start:start + 150], a.data_set_limit), a)
        assert got == b.encode_records(tid, dicts[start:start + 150], 0)
    assert a.sequence_number == b.sequence_number == 300
    with pytest.raises(RecordTooLarge):
        a.encode_data_sets(tid, [(b"x" * (a.data_set_limit + 1), 1)], 0)
    for bad in ([(bytearray(b"x"), 1)], [(b"x", 0)], [(b"x", True)]):
        with pytest.raises(UsageError):
            a.encode_data_sets(tid, bad, 0)  # type: ignore[arg-type]
    assert a.sequence_number == 300


def test_a_queued_record_holds_less_than_a_third_of_the_dict() -> None:
    """What an exported record holds while it waits in a sink queue (tracemalloc: its
    ExportedFlow, record and values; the strings are the flow's, shared)."""
    if not aggregation.accelerated():
        pytest.skip("the twin serves: records are dicts")

    def held(accel: bool) -> float:
        proc = AggregationProcess(export_interval=60.0)
        if not accel:
            proc._accel = None
        for i in range(2000):
            proc.ingest_many([agent_record(sport=10000 + i, flow_type=1, sourcePodName="web")], "192.168.10.1", 1, 1.0)
        proc.tick(60.0)
        for i in range(2000):
            proc.ingest_many([agent_record(sport=10000 + i, flow_type=1, sourcePodName="web", pkts=20, octets=2000)],
                             "192.168.10.1", 1, 61.0)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        out = proc.tick(120.0)
        size = (tracemalloc.get_traced_memory()[0] - before) / len(out)
        tracemalloc.stop()
        assert len(out) == 2000
        return size

    record, dicts = held(True), held(False)
    assert record < dicts / 3, (record, dicts)
    assert sys.getsizeof(_exported(1, True)[0].record) < 512


def _mixed_exports(n: int) -> list[ExportedFlow]:
    """n flows of the four templates (flow and exporter families), some with names too
    long for a 512-octet UDP message (the codec then sends that record alone)."""
    proc = AggregationProcess(export_interval=60.0, max_flows=10 * n)
    for i in range(n):
        v6, e6 = i % 4 >= 2, i % 2 == 1
        src, dst = (f"fd00::{i + 1:x}", "fd00::ffff") if v6 else (f"10.1.{i // 250}.{i % 250}", "10.2.0.1")
        name = "n" * 600 if i % 17 == 0 else f"web-{i % 5}"
        proc.ingest_many([agent_record(src=src, dst=dst, sport=20000 + i, flow_type=1, sourcePodName=name,
                                       destinationPodName="db")], "fd00:192::1" if e6 else "192.168.10.1", 1, 1.0)
    out = proc.tick(60.0)
    assert len(out) == n
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_the_ipfix_sink_sends_records_as_data_sets_a_collector_decodes(protocol: str) -> None:
    """The IPFIX sink over a real loopback socket (submit_data_sets for Records, the codec
    for the rest, a too-long record alone in its own message over UDP): the collector side
    (flowscope.ipfix's framer and decoder) reads back every record, equal to its dict."""
    import asyncio

    from flowscope.aggregator.sinks import IPFIXSink
    from flowscope.ipfix import MessageFramer
    from flowscope.ipfix.address import Address

    exported = _mixed_exports(400)
    want = sorted((dict(f.record) for f in exported), key=repr)

    async def run() -> list[bytes]:
        chunks: list[bytes] = []
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        if protocol == "tcp":
            async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                while data := await reader.read(65536):
                    chunks.append(data)
                done.set()

            server = await asyncio.start_server(on_client, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
        else:
            class Receiver(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: Any) -> None:
                    chunks.append(data)

            import socket

            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            # the burst of 400 datagrams arrives before this loop reads any: room for all
            # (SO_RCVBUFFORCE as root, past rmem_max; else as much as rmem_max allows)
            try:
                sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
            sock.bind(("127.0.0.1", 0))
            transport, _ = await loop.create_datagram_endpoint(Receiver, sock=sock)
            port = sock.getsockname()[1]
        sink = IPFIXSink(Address("127.0.0.1", port, protocol), queue_size=10_000)  # type: ignore[arg-type]
        await sink.start()
        try:
            await sink.write(exported)
            assert await sink.process.flush(10)
        finally:
            await sink.close()
        if protocol == "tcp":
            await asyncio.wait_for(done.wait(), 10)
            server.close()
            await server.wait_closed()
        else:
            for _ in range(500):  # loopback datagrams: wait until every record is in
                if len(_decode(chunks, protocol)) >= len(want):
                    break
                await asyncio.sleep(0.02)
            transport.close()
        st = sink.process.stats
        assert (st.records_sent, st.records_invalid, st.records_dropped) == (400, 0, 0)
        return chunks

    def _decode(chunks: list[bytes], proto: str) -> list[dict[str, Any]]:
        dec = Decoder()
        msgs: list[bytes] = []
        if proto == "tcp":
            framer = MessageFramer()
            for c in chunks:
                msgs += framer.feed(c)
        else:
            msgs = chunks
        return [rec for m in msgs for _t, rec in dec.decode(m).data_records()]

    chunks = asyncio.run(run())
    got = sorted(_decode(chunks, protocol), key=repr)
    assert got == want


def test_an_address_string_is_read_for_the_family_its_field_has() -> None:
    """The encoder caches what inet_pton makes of an address by the str object: the very
    same object in an IPv4 field and then in an IPv6 one (or the reverse) is each time
    what the codec makes of it there (for one of the two, a refusal)."""
    v4, v6 = "10.9.9.9", "fd00::99"  # one object each, used in both families' fields
    proc, twin = AggregationProcess(export_interval=60.0), _twin(export_interval=60.0)
    recs = []
    for i, (a, b) in enumerate(((v4, v4), (v6, v6), (v4, v6), (v6, v4))):
        recs.append(agent_record(sport=30000 + i, flow_type=1, destinationClusterIPv4=a))
        recs.append(agent_record(src="fd00::1", dst="fd00::2", sport=30000 + i, flow_type=1, destinationClusterIPv6=b))
    for p in (proc, twin):
        for r in recs:
            p.ingest_many([dict(r)], "192.168.10.1", 1, 1.0)
    native, dicts = proc.tick(60.0), twin.tick(60.0)
    assert len(native) == len(dicts) == 8
    for n, t in zip(native, dicts):
        assert _sink_bytes(n) == _codec_bytes(t.record)
    assert sum(_codec_bytes(t.record) is None for t in dicts) == 4
