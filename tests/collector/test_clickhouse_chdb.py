"""The ClickHouse sink into chDB (ClickHouse in-process): rows written through the sink to a
directory read back field for field by a fresh chDB session on that directory (they survive
the sink closing), and the query API's numbers (top talkers by Pod, namespace, Node and
Service; policy verdicts) equal sums computed from what was written. ``check_query_api``
runs unchanged against the real server in test_clickhouse_server.py."""

from __future__ import annotations

import json
from collections import defaultdict

import sys
from pathlib import Path

import pytest
from flowscope.aggregator.aggregation import ExportedFlow
from flowscope.aggregator.config import parse_config
from flowscope.aggregator.clickhouse_sink import make_sink
from flowscope.collector import query
from flowscope.collector.rows import row_to_record
from flowscope.collector.schema import COLUMN_NAMES, COLUMNS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "aggregator"))  # the sink tests' records

pytestmark = [pytest.mark.timeout(120)]


def chdb_config(address: str):
    return parse_config({"sinks": {"clickhouse": {"enabled": True, "address": address}}}).sinks.clickhouse


def talker_flows() -> list[ExportedFlow]:
    """Flows of 6 Pods in 2 namespaces on 3 Nodes, some through Services, some policed; the same
    connection exported twice (two rows, one flow)."""
    from test_aggregator_clickhouse_sink import aggregated

    out = []
    for i in range(24):
        ns = ("shop", "web")[i % 2]
        over = dict(  # noqa: C408 - keyword form: these are IE names
            sourceTransportPort=40000 + i, destinationTransportPort=80, protocolIdentifier=6,
            sourceIPv4Address=f"10.0.{i % 6}.5", destinationIPv4Address="10.0.9.9",
            sourcePodNamespace=ns, sourcePodName=f"pod-{i % 6}", sourceNodeName=f"node-{i % 3}",
            destinationPodNamespace="db", destinationPodName="pg-0" if i % 4 else "", destinationNodeName="node-9",
            destinationServicePortName="db/pg:5432" if i % 3 == 0 else "",
            octetDeltaCount=1000 * (i + 1), reverseOctetDeltaCount=10 * (i + 1),
            packetDeltaCount=i + 1, reversePacketDeltaCount=1,
            ingressNetworkPolicyRuleAction=(0, 1, 2)[i % 3], ingressNetworkPolicyNamespace="db" if i % 3 else "",
            ingressNetworkPolicyName="pg-allow" if i % 3 == 1 else ("pg-deny" if i % 3 == 2 else ""),
            ingressNetworkPolicyRuleName="r1" if i % 3 else "",
            egressNetworkPolicyRuleAction=3 if i == 5 else 0, egressNetworkPolicyNamespace="web" if i == 5 else "",
            egressNetworkPolicyName="no-egress" if i == 5 else "", egressNetworkPolicyRuleName="r9" if i == 5 else "",
        )
        out.append(ExportedFlow(aggregated(i, **over), "correlated", False))
    again = dict(out[0].record, octetDeltaCount=500, reverseOctetDeltaCount=5, packetDeltaCount=2,
                 reversePacketDeltaCount=0)
    out.append(ExportedFlow(again, "correlated", True))
    return out


def expected_top(flows, keys) -> list[tuple[str, int, int, int]]:
    """(key, bytes, packets, records) per key, as query.top orders them (bytes, then key)."""
    acc: dict = defaultdict(lambda: [0, 0, 0])
    for f in flows:
        r = f.record
        vals = [r[k] for k in keys]
        key = vals[-1] if len(vals) == 1 else ("" if not vals[1] else f"{vals[0]}/{vals[1]}" if vals[0] else vals[1])
        a = acc[key]
        a[0] += r["octetDeltaCount"] + r["reverseOctetDeltaCount"]
        a[1] += r["packetDeltaCount"] + r["reversePacketDeltaCount"]
        a[2] += 1
    return sorted(((k, *v) for k, v in acc.items()), key=lambda t: (-t[1], -t[1], t[0]))


async def check_query_api(sink) -> None:
    """Write talker_flows() through the sink and compare the query layer's answers with Python's own sums."""
    flows = talker_flows()
    await sink.start()
    await sink.write(flows)
    assert await sink.commit() == len(flows)
    store = sink.store
    now = int(sink.wall())
    q = query.FlowQuery(start=now - 86400 * 30, end=now + 3600)
    cases = [("srcPod", ("sourcePodNamespace", "sourcePodName")),
             ("dstPod", ("destinationPodNamespace", "destinationPodName")),
             ("srcNamespace", ("sourcePodNamespace",)), ("srcNode", ("sourceNodeName",)),
             ("service", ("destinationServicePortName",))]
    for group, keys in cases:
        want = expected_top(flows, keys)
        got = query.top(store, q.with_(group=group, top=100))
        assert [(e.key, e.bytes, e.packets, e.records) for e in got.entries] == want, group
        assert got.other is None and got.total.bytes == sum(w[1] for w in want)
        two = query.top(store, q.with_(group=group, top=2))
        assert [(e.key, e.bytes) for e in two.entries] == [w[:2] for w in want[:2]]
        if len(want) > 2:
            assert two.other is not None and two.other.bytes == sum(w[1] for w in want[2:])
    assert query.top(store, q.with_(start=now + 7200, end=now + 10800, group="srcPod")).entries == []
    with pytest.raises(query.QueryError, match="group: 'rack' is not one of"):
        q.with_(group="rack")

    page = query.flows(store, q.with_(limit=5))
    assert len(page.records) == 5 and page.more
    assert {json.dumps(row_to_record(r), sort_keys=True) for r in query.flows(store, q.with_(limit=100)).records} == {
        json.dumps(f.record, sort_keys=True) for f in flows}
    denied = query.flows(store, q.with_(filter="action in (drop, reject)", limit=100)).records
    assert len(denied) == sum(1 for f in flows if {f.record["ingressNetworkPolicyRuleAction"],
                                                    f.record["egressNetworkPolicyRuleAction"]} & {2, 3}) > 0


async def test_rows_survive_in_a_chdb_directory_field_for_field(tmp_path):
    from chdb import session
    from test_aggregator_clickhouse_sink import aggregated

    path = tmp_path / "store"
    sink = make_sink(chdb_config(f"chdb://{path}"))
    await sink.start()
    flows = [ExportedFlow(aggregated(i, v6=bool(i & 1), e6=bool(i & 2)), ("correlated", "uncorrelated")[i % 2],
                          bool(i % 3)) for i in range(64)]
    await sink.write(flows[:40])
    await sink.write(flows[40:])
    await sink.close()
    assert (sink.committed_rows, sink.commit_failures, sink.lost_at_close) == (64, 0, 0)

    select = ", ".join(f"toUInt32({c.name})" if c.type == "DateTime" else c.name for c in COLUMNS)
    s = session.Session(str(path))
    try:
        res = s.query(f"SELECT {select} FROM flowscope.flows SETTINGS output_format_json_quote_64bit_integers = 0",
                      "JSONCompact")
        rows = json.loads(res.bytes())["data"]
        engine = s.query("SELECT engine, sorting_key FROM system.tables WHERE database = 'flowscope' AND name = 'flows'",
                         "CSV").bytes().decode()
    finally:
        s.close()
    assert len(rows) == 64
    by_key = {(f.record["flowStartSeconds"], f.record["sourceTransportPort"]): f for f in flows}
    for row in rows:
        d = dict(zip(COLUMN_NAMES, row))
        f = by_key[(d["flowStartSeconds"], d["sourceTransportPort"])]
        assert row_to_record(d) == f.record
        assert (d["correlation"], d["final"]) == (f.correlation, int(f.final))
    assert engine.strip().startswith('"MergeTree","toStartOfMinute(flowEndSeconds), sourcePodNamespace')


async def test_query_api_on_chdb_in_memory():
    sink = make_sink(chdb_config("chdb://"))
    try:
        await check_query_api(sink)
    finally:
        await sink.close()


def doc_queries() -> list[str]:
    """The ``sql`` blocks of docs/clickhouse.md's "Example queries" section."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "clickhouse.md").read_text()
    section = text.split("## Example queries", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sql\n(.*?)```", section, re.DOTALL)
    assert len(blocks) >= 5
    return blocks


async def check_doc_queries(sink) -> None:
    """Every example query of the docs runs on this backend; the first one equals top_talkers."""
    await sink.start()
    await sink.write(talker_flows())
    assert await sink.commit() == len(talker_flows())
    store = sink.store
    results = [store.select(q.replace("flowscope.flows", store.qualified)) for q in doc_queries()]
    now = int(sink.wall())
    top_ns = query.top(store, query.FlowQuery(start=now - 86400 * 30, end=now + 3600, group="srcNamespace"))
    by_ns = [(e.key, e.bytes) for e in top_ns.entries if e.key]
    assert [(r[0], int(r[1])) for r in results[0]] == by_ns and len(by_ns) == 2
    denied = sum(1 for f in talker_flows() if f.record["ingressNetworkPolicyRuleAction"] in (2, 3)
                 or f.record["egressNetworkPolicyRuleAction"] in (2, 3))
    assert sum(int(r[-1]) for r in results[1]) == denied > 0


async def test_the_docs_example_queries_run_on_chdb():
    sink = make_sink(chdb_config("chdb://"))
    try:
        await check_doc_queries(sink)
    finally:
        await sink.close()


async def test_a_table_of_another_shape_is_named_not_written(tmp_path):
    from chdb import session
    from test_aggregator_clickhouse_sink import aggregated

    path = tmp_path / "store"
    s = session.Session(str(path))
    s.query("CREATE DATABASE flowscope")
    s.query("CREATE TABLE flowscope.flows (timeInserted DateTime, sourceIP UInt32) ENGINE = MergeTree() "
            "ORDER BY timeInserted")
    s.close()
    sink = make_sink(chdb_config(f"chdb://{path}"))
    sink.timer = False
    await sink.start()
    await sink.write([ExportedFlow(aggregated(1), "correlated", False)])
    assert await sink.commit() == 0
    err = sink.stats()["lastCommitError"]
    assert err.startswith("SchemaError: table flowscope.flows is not a flowscope flows table (no flowEndSeconds)")
    assert (sink.commit_failures, sink.held) == (1, 1)
    await sink.close()
    assert sink.lost_at_close == 1


async def test_a_large_periodic_export_is_paced_into_chdb_none_dropped(tmp_path):
    """50,000 flows due at once: the aggregator's slices wait for the ClickHouse sink's queue,
    the sink commits a chunk whenever one is full; every record ends in the table."""
    import asyncio
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "aggregator"))
    from agg_records import agent_record
    from flowscope.aggregator.service import FlowAggregator

    n = 50_000
    now = [0.0]
    cfg = parse_config({"aggregatorTransportProtocol": "tcp", "apiAddress": "", "flowExportInterval": "60s",
                        "sinks": {"clickhouse": {"enabled": True, "address": f"chdb://{tmp_path}/store",
                                                 "queueSize": 10_000}}})
    agg = FlowAggregator(cfg, clock=lambda: now[0], tick_interval=0.01)
    base = agent_record(flow_type=3, dst="203.0.113.9", sourcePodNamespace="shop", sourcePodName="p",
                        sourceNodeName="node-a")
    records = [dict(base, sourceTransportPort=i % 60000 + 1, sourceIPv4Address=f"10.1.{i // 60000}.1",
                    packetTotalCount=i + 1, packetDeltaCount=i + 1) for i in range(n)]
    await agg.start(collect=False, api=False)
    ch = agg.sinks[0]
    try:
        agg.ingest_records(records, "192.168.1.1")
        while len(agg.process) < n:
            await asyncio.sleep(0.01)
        now[0] += 61
        deadline = time.monotonic() + 60
        while ch.written + ch.dropped + ch.failed < n:
            assert time.monotonic() < deadline, ch.stats()
            await asyncio.sleep(0.02)
    finally:
        await agg.close()
    st = ch.stats()
    assert (st["written"], st["dropped"], st["failed"]) == (n, 0, 0), st
    assert st["committedRows"] == n and st["invalidRecords"] == 0 and st["commits"] >= n // 5000
    from chdb import session

    s = session.Session(f"{tmp_path}/store")
    try:
        got = s.query("SELECT count(), sum(packetTotalCount), uniqExact(sourceIP, sourceTransportPort) "
                      "FROM flowscope.flows", "CSV").bytes().decode().strip()
    finally:
        s.close()
    assert got == f"{n},{n * (n + 1) // 2},{n}"
