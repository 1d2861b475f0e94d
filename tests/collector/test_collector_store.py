"""The flow store and its query layer, on chDB and on Debian's clickhouse-server 18.16.

Proves: the same records give the same answers on both backends for every filter field,
every dimension of --top, series, sankey, overview, completion and record pages; every
answer a roll-up gives equals the raw table's answer to the same question; those answers
equal Python's own sums of what was inserted; the version-1 table migrates in place with
every row kept (and the roll-ups backfilled), a second open changes nothing, a store of a
newer schema is refused; filter injection attempts are refused or stay values.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import require_tool
from flowscope.collector import query
from flowscope.collector.filter import FilterError, bind, parse_filter
from flowscope.collector.rows import flows_to_columns, row_to_record, typed_columns
from flowscope.collector.schema import COLUMNS, SCHEMA_VERSION, DIMENSIONS
from flowscope.collector.store import SchemaError, open_store
from store_records import flow

sys.path.insert(0, str(Path(__file__).resolve().parent))

pytestmark = [pytest.mark.timeout(180)]

HOUR = 3600
T_END = (int(time.time()) // HOUR) * HOUR  # the last whole hour
T_START = T_END - 3 * HOUR


def cluster_flows(n: int = 1500, seed: int = 7) -> list:
    """Flows of 40 Pods in 5 namespaces on 4 Nodes over three hours: Services, policies with
    every action, every flow type, IPv4 and IPv6, TCP and UDP."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        s, d = rnd.randrange(40), rnd.randrange(40)
        ft = rnd.choice((1, 2, 3, 4))
        v6 = i % 11 == 0
        fam = "IPv6" if v6 else "IPv4"
        sip = f"fd00::{s + 1:x}" if v6 else f"10.0.{s % 4}.{s + 10}"
        dip = (f"fd00::{d + 100:x}" if v6 else f"10.0.{d % 4}.{d + 10}") if ft != 3 else (
            "2001:db8::9" if v6 else "203.0.113.9")
        end = T_START + rnd.randrange(3 * HOUR)
        ingress, egress = rnd.choice((0, 0, 1, 2, 3)), rnd.choice((0, 0, 1, 3))
        rec = {
            "flowStartSeconds": end - rnd.randrange(1, 600), "flowEndSeconds": end,
            "flowEndReason": rnd.choice((1, 2, 2, 3)),
            f"source{fam}Address": sip, f"destination{fam}Address": dip,
            "sourceTransportPort": 30000 + rnd.randrange(30000), "destinationTransportPort": rnd.choice((80, 443, 53, 5432)),
            "protocolIdentifier": rnd.choice((6, 6, 17)), "flowType": ft,
            "packetDeltaCount": rnd.randrange(1, 100), "octetDeltaCount": rnd.randrange(1, 10**6),
            "reversePacketDeltaCount": rnd.randrange(100), "reverseOctetDeltaCount": rnd.randrange(10**6),
            "sourceNodeName": f"node-{s % 4}", "tcpState": "ESTABLISHED",
        }
        if ft != 4:
            rec.update(sourcePodNamespace=f"ns-{s % 5}", sourcePodName=f"app{s % 8}-7d4b9c8f5-{s:05d}"[:26])
        if ft in (1, 2, 4):
            rec.update(destinationPodNamespace=f"ns-{d % 5}", destinationPodName=f"db{d % 3}-{d}",
                       destinationNodeName=f"node-{(s if ft == 1 else d) % 4}")
        if i % 3 == 0:
            rec["destinationServicePortName"] = f"ns-{d % 5}/svc-{d % 6}:http"
        if ingress:
            rec.update(ingressNetworkPolicyRuleAction=ingress, ingressNetworkPolicyNamespace=f"ns-{d % 5}",
                       ingressNetworkPolicyName=f"in-{d % 4}", ingressNetworkPolicyRuleName="r1",
                       ingressNetworkPolicyType=1)
        if egress:
            rec.update(egressNetworkPolicyRuleAction=egress, egressNetworkPolicyName=f"acnp-{s % 3}",
                       egressNetworkPolicyRuleName="e1", egressNetworkPolicyType=3)
        out.append(flow(v6=v6, final=rec["flowEndReason"] != 2, **rec))
    return out


FLOWS = cluster_flows()


def fill(store) -> None:
    store.open()
    for k in range(0, len(FLOWS), 500):  # several inserts: several parts, roll-ups not yet merged
        cols, bad = flows_to_columns(FLOWS[k:k + 500], time_inserted=int(time.time()), commit_id=k + 1)
        assert bad == 0
        store.insert(typed_columns(cols))


# The questions: every filter field, every dimension.
FILTERS = [
    "", 'namespace = "ns-1"', "srcNamespace in (ns-0, ns-2)", "not dstNamespace = ns-3", "pod = ns-1/app1-7d4b9c8f5-00001",
    "srcPod ~ app3", "workload = ns-2/app2", "node = node-1", "dstNode != node-2", "service ~ svc-3",
    "policy = acnp-1", "ingressPolicy = ns-0/in-1", "action = drop", "action in (drop, reject)", "ingressAction = allow",
    "egressAction = reject", "type = inter-node", "type != intra-node", "protocol = udp", "protocol = 6",
    "port = 5432", "dstPort in (80, 443)", "srcPort > 50000", "ip = 10.0.1.11", "srcIP = fd00::5",
    "dstIP = 203.0.113.9", "reason = 3", "bytes > 500000", "packets <= 20", "tcpState = ESTABLISHED",
    "rule = r1", 'namespace = "ns-1" and (action = drop or type = to-external)', "not (port = 53 or protocol = udp)",
]


def answers(store) -> dict:
    """Every question's answer, as JSON-ready data."""
    out: dict = {}
    base = query.FlowQuery(start=T_START, end=T_END)
    for f in FILTERS:
        q = base.with_(filter=f)
        out[f"flows {f}"] = [row_to_record(r) | {"c": r["correlation"]} for r in query.flows(store, q.with_(limit=10_000)).records]
        out[f"top {f}"] = query.top(store, q.with_(group="srcPod", top=5)).to_json() | {"table": ""}
        out[f"overview {f}"] = query.overview(store, q).to_json()
    for g in DIMENSIONS:
        out[f"top-by {g}"] = query.top(store, base.with_(group=g, top=3, by="packets")).to_json() | {"table": ""}
    out["series"] = query.series(store, base.with_(group="dstNamespace", resolution=600, top=3)).to_json() | {"table": ""}
    out["sankey"] = [x.to_json() for x in query.sankey(store, base.with_(group="srcNamespace"), "dstNamespace")]
    out["complete"] = query.complete(store, "pod", "app", q=base)
    return out


def rollup_answers_equal_raw(store) -> int:
    """For every question a roll-up can answer, its answer equals the raw table's; returns how many."""
    checked = 0
    base = query.FlowQuery(start=T_START, end=T_END)
    for f in FILTERS:
        for g in ("srcPod", "dstNamespace", "service", "policy", "flowType", "srcWorkload", "egressAction", "dstIP",
                  "srcIP"):
            q = base.with_(filter=f, group=g, top=4)
            auto = query.top(store, q)
            raw = query.top(store, q.with_(source="raw"))
            assert raw.table == "flows"
            assert auto.to_json() | {"table": ""} == raw.to_json() | {"table": ""}, (f, g)
            if auto.table != "flows":
                checked += 1
                one_minute = query.top(store, q.with_(source="1m"))
                assert one_minute.to_json() | {"table": ""} == raw.to_json() | {"table": ""}
        for res in (600, 3600, 7200):
            q = base.with_(filter=f, group="srcNamespace", resolution=res)
            try:
                auto_s = query.series(store, q)
            except query.QueryError:
                continue
            raw_s = query.series(store, q.with_(source="raw"))
            assert auto_s.lines == raw_s.lines and auto_s.buckets == raw_s.buckets, (f, res)
            checked += auto_s.table != "flows"
    q = base.with_(group="srcNamespace")
    links = query.sankey(store, q, "dstNamespace")
    assert links == query.sankey(store, q.with_(source="raw"), "dstNamespace")
    # the address roll-up: Pods to addresses (the Pod-to-External page), its tooltips' addresses
    for f in ("type = to-external", 'service != ""', "", "srcIP = fd00::5"):
        for a, b in (("srcPod", "dstIP"), ("dstPod", "srcIP"), ("service", "dstIP")):
            for top in (3, 500):
                q = base.with_(group=a, filter=f, top=top)
                assert query.sankey(store, q, b) == query.sankey(store, q.with_(source="raw"), b), (f, a, b)
        for res in (3600, 1800):
            q = base.with_(group="dstIP", filter=f, by="throughput", resolution=res, top=2)
            auto_s, raw_s = query.series(store, q), query.series(store, q.with_(source="raw"))
            assert auto_s.lines == raw_s.lines and auto_s.buckets == raw_s.buckets, (f, res)
            checked += auto_s.table.startswith("flows_addr_")
    # a many-keyed group's series: its keys ranked, then only their rows' buckets (the Pods'
    # names matched on their own column first), the rest "other"
    for f in ("", "type = from-external", 'namespace = "ns-1"'):
        for g in ("srcPod", "dstWorkload"):
            q = base.with_(group=g, filter=f, by="throughput", resolution=1800, top=4)
            auto_s, raw_s = query.series(store, q), query.series(store, q.with_(source="raw"))
            assert auto_s.lines == raw_s.lines and auto_s.lines and auto_s.buckets == raw_s.buckets, (f, g)
            checked += auto_s.table != "flows"
    assert query.top(store, base.with_(group="dstIP", filter="type = to-external")).table == "flows_addr_1h"
    assert query.top(store, base.with_(group="srcPod", filter="ip = 10.0.1.11")).table == "flows_addr_1h"
    assert query.top(store, base.with_(group="policy", filter="ip = 10.0.1.11")).table == "flows"  # no policies there
    # the narrowest family that keeps the columns answers
    assert query.top(store, base.with_(group="srcPod", filter="type = to-external")).table == "flows_src_1h"
    assert query.top(store, base.with_(group="srcPod", filter="policy = acnp-1")).table == "flows_1h"  # not in src
    assert query.top(store, base.with_(group="dstNamespace", filter="action = drop")).table == "flows_ns_1h"
    # connections: the conn roll-ups' merged uniq states answer an unfiltered overview, equal to the raw table's
    for start, end in ((T_START, T_END), (T_START + 1260, T_END - 540), (T_START + 3600, T_START + 7200)):
        q = query.FlowQuery(start=start, end=end)
        seen = _Tables(store)
        assert query.overview(seen, q) == query.overview(store, q.with_(source="raw"))
        assert any("flows_conn_1" in sql for sql in seen.sql) and not any("FROM `flowscope`.`flows` " in sql
                                                                           for sql in seen.sql), seen.sql
        checked += 1
    assert query.top(store, base.with_(group="srcPod", filter="port = 80")).table == "flows"  # ports: raw only
    with pytest.raises(query.QueryError, match="source: the 1h roll-up cannot answer this exactly"):
        query.top(store, base.with_(group="srcPod", filter="port = 80", source="1h"))
    assert query.top(store, base.with_(group="srcPod")).table == "flows_src_1h"
    # the hours from the 1-hour table, the 10 minutes at the edges from the 10-minute one,
    # the minutes from the main family's 1-minute table (the narrow families have none)
    assert query.top(store, base.with_(start=T_START + 60, group="srcPod")).table == \
        "flows_1m+flows_src_10m+flows_src_1h"
    assert query.top(store, base.with_(start=T_START + 600, group="policy")).table == "flows_ns_10m+flows_ns_1h"
    assert query.top(store, base.with_(start=T_START + 600, end=T_START + 1800, group="srcPod")).table == \
        "flows_src_10m"
    # a range on minute boundaries: whole hours from the 1-hour roll-up, the edges from the 1-minute one
    for f in FILTERS[:12]:
        for g in ("srcPod", "dstNamespace", "policy"):
            q = query.FlowQuery(start=T_START + 1260, end=T_END - 540, filter=f, group=g, top=5)
            split, raw = query.top(store, q), query.top(store, q.with_(source="raw"))
            assert split.to_json() | {"table": ""} == raw.to_json() | {"table": ""}, (f, g)
            checked += "+" in split.table
        q = query.FlowQuery(start=T_START + 1260, end=T_END - 540, filter=f)
        assert query.overview(store, q) == query.overview(store, q.with_(source="raw"))
        split_s = query.series(store, q.with_(group="dstNamespace", resolution=3600))
        raw_s = query.series(store, q.with_(group="dstNamespace", resolution=3600, source="raw"))
        assert split_s.lines == raw_s.lines and split_s.buckets == raw_s.buckets, f
        checked += "+" in split_s.table
        assert query.complete(store, "pod", "app", q=q) == query.complete(store, "pod", "app", q=q.with_(source="raw"))
    assert query.top(store, base.with_(start=T_START + 1, group="srcPod")).table == \
        "flows+flows_1m+flows_src_10m+flows_src_1h"
    # a range to the second (--since 2h): the seconds at its edges from the raw table, the rest from the roll-ups
    for f in FILTERS[:14] + ["ip = 10.0.1.11", "port = 80"]:
        for g in ("srcPod", "dstIP", "policy"):
            q = query.FlowQuery(start=T_START + 1277, end=T_END - 533, filter=f, group=g, top=5)
            pieces, raw = query.top(store, q), query.top(store, q.with_(source="raw"))
            assert pieces.to_json() | {"table": ""} == raw.to_json() | {"table": ""}, (f, g)
            checked += pieces.table.startswith("flows+")
        q = query.FlowQuery(start=T_START + 1277, end=T_END - 533, filter=f)
        assert query.overview(store, q) == query.overview(store, q.with_(source="raw")), f
        for res in (60, 3600):
            pieces_s = query.series(store, q.with_(group="srcNamespace", resolution=res))
            raw_s = query.series(store, q.with_(group="srcNamespace", resolution=res, source="raw"))
            assert pieces_s.lines == raw_s.lines and pieces_s.buckets == raw_s.buckets, (f, res)
        assert query.sankey(store, q.with_(group="srcPod"), "dstIP") == \
            query.sankey(store, q.with_(group="srcPod", source="raw"), "dstIP")
        assert query.complete(store, "pod", "app", q=q) == query.complete(store, "pod", "app", q=q.with_(source="raw"))
    assert query.top(store, query.FlowQuery(start=T_START + 1277, end=T_START + 1290, group="srcPod")).table == "flows"
    return checked


class _Tables:
    """A store that remembers the SQL it ran."""

    def __init__(self, store) -> None:
        self.store, self.database, self.table, self.sql = store, store.database, store.table, []

    def rows(self, sql, params):
        self.sql.append(sql.replace(f"`{self.database}`", "`flowscope`"))
        return self.store.rows(sql, params)


def python_top(flows, key, by="bytes"):
    acc: dict = defaultdict(lambda: [0, 0, 0])
    for f in flows:
        r = f.record
        a = acc[key(r)]
        a[0] += r["octetDeltaCount"] + r["reverseOctetDeltaCount"]
        a[1] += r["packetDeltaCount"] + r["reversePacketDeltaCount"]
        a[2] += 1
    return acc


def check_against_python(store) -> None:
    base = query.FlowQuery(start=T_START, end=T_END)
    acc = python_top(FLOWS, lambda r: r["sourcePodNamespace"])
    top = query.top(store, base.with_(group="srcNamespace", top=3))
    want = sorted(acc.items(), key=lambda kv: (-kv[1][0], kv[0]))
    assert [(e.key, e.bytes, e.packets, e.records) for e in top.entries] == [(k, *v) for k, v in want[:3]]
    rest = want[3:]
    assert top.other is not None and (top.other.bytes, top.other.records) == (
        sum(v[0] for _, v in rest), sum(v[2] for _, v in rest))
    assert top.total.records == len(FLOWS)
    dropped = [f for f in FLOWS if {f.record["ingressNetworkPolicyRuleAction"], f.record["egressNetworkPolicyRuleAction"]} & {2}]
    page = query.flows(store, base.with_(filter="action = drop", limit=10_000))
    assert len(page.records) == len(dropped) and not page.more
    ov = query.overview(store, base)
    assert ov.records == len(FLOWS) and ov.bytes == sum(
        f.record["octetDeltaCount"] + f.record["reverseOctetDeltaCount"] for f in FLOWS)
    flows_page = query.flows(store, base.with_(limit=100, offset=50))
    everything = query.flows(store, base.with_(limit=10_000)).records
    assert flows_page.records == everything[50:150]


@pytest.fixture(scope="module")
def chdb_store(tmp_path_factory):
    store = open_store(f"chdb://{tmp_path_factory.mktemp('chdb')}/store")
    fill(store)
    yield store
    store.close()


@pytest.fixture(scope="module")
def server_store(tmp_path_factory):
    require_tool("clickhouse-server", "clickhouse-client")
    from test_clickhouse_server import ClickHouseServer

    srv = ClickHouseServer(tmp_path_factory.mktemp("clickhouse"))
    srv.start()
    store = open_store(srv.address, database="fs_store")
    try:
        fill(store)
        yield store
    finally:
        store.close()
        srv.kill()


def test_the_query_layer_answers_what_python_sums_on_chdb(chdb_store):
    assert chdb_store.features is not None and chdb_store.features.low_cardinality and chdb_store.features.ttl
    check_against_python(chdb_store)
    assert rollup_answers_equal_raw(chdb_store) > 50


def test_18_16_answers_like_chdb_and_its_rollups_like_its_raw_table(chdb_store, server_store):
    assert server_store.features is not None and server_store.features.version[:2] == (18, 16)
    assert not server_store.features.ttl and not server_store.features.low_cardinality
    check_against_python(server_store)
    assert rollup_answers_equal_raw(server_store) > 50
    a, b = answers(chdb_store), answers(server_store)
    for key in a:
        assert json.dumps(a[key], sort_keys=True) == json.dumps(b[key], sort_keys=True), key


def test_18_16_migrates_the_version_1_table_in_place_every_row_kept(server_store):
    """The same migration as on chDB (test_collector_migrations.py), on the old server."""
    from flowscope.collector.schema import COLUMNS as COLS

    db = "fs_v1"
    cols = ",\n    ".join(f"`{c.name}` {c.type}" for c in COLS)
    server_store.execute(f"CREATE DATABASE {db}")
    server_store.execute(f"CREATE TABLE {db}.flows (\n    {cols}\n) ENGINE = MergeTree() "
                         "PARTITION BY toYYYYMMDD(timeInserted) ORDER BY (timeInserted, flowEndSeconds)")
    old = open_store(server_store.address, database=db)
    old.insert(typed_columns(flows_to_columns(FLOWS, time_inserted=int(time.time()), commit_id=5)[0]))
    before = old.select(f"SELECT count(), sum(octetDeltaCount), uniqExact(sourceIP, sourceTransportPort) FROM {db}.flows")
    old.close()
    store = open_store(server_store.address, database=db)
    store.open()
    try:
        assert store.schema_version == SCHEMA_VERSION
        assert store.select(f"SELECT count(), sum(octetDeltaCount), uniqExact(sourceIP, sourceTransportPort) "
                            f"FROM {db}.flows") == before
        assert int(before[0][0]) == len(FLOWS)
        assert store.count("flows_1h") > 0 and store.count("flows_1m") > 0
        check_against_python(store)
        base = query.FlowQuery(start=T_START, end=T_END, group="srcPod")
        assert query.top(store, base).to_json() | {"table": ""} == \
            query.top(store, base.with_(source="raw")).to_json() | {"table": ""}
    finally:
        store.close()


INJECTIONS = [
    ("namespace = x; DROP TABLE flows", "unexpected ';'"),
    ("namespace = x -- comment", "unexpected '--'"),
    ("namespace = x /* c */", "unexpected '/'|column"),
    ("namespace = 'x' or 1 = 1", "unknown field '1'|expected a field name"),
    ("sourcePodName = x", "unknown field 'sourcePodName'"),
    ("namespace = x) or (1", "unexpected"),
    ("namespace = `x`", "unexpected '`'"),
    ('namespace = "x\' OR \'1\'=\'1"', None),  # quotes inside a value: just characters of the value
    ("namespace = \"x\\\" or namespace != \\\"\"", None),
    ("port = 80 or 1", "unknown field '1'"),
    ("port = 80)", "unexpected"),
    ("action = allow; SELECT 1", "unexpected ';'"),
    ("namespace = \"unterminated", "never closed"),
    ("namespace in (a, b", r"expected ',' or '\)'"),
    ("bytes ~ 1", "applies to text fields"),
    ("type = sideways", "is not one of"),
    ("port = -1", "unexpected|not a whole number"),
    ("port = 1e9", "not a whole number"),
]


@pytest.mark.parametrize(("text", "error"), INJECTIONS)
def test_filter_injection_attempts_are_refused_or_stay_values(chdb_store, text, error):
    if error is None:
        w = parse_filter(text)
        assert all(isinstance(v, str) for v in w.params.values())
        sql = bind(w.sql, w.params)
        # the whole attempt is one escaped literal: the query runs and matches nothing
        assert chdb_store.select(f"SELECT count() FROM flowscope.flows WHERE {sql}") == [(0,)]
        assert chdb_store.count() == len(FLOWS)
        return
    with pytest.raises(FilterError, match=error):
        parse_filter(text)
    with pytest.raises(ValueError):
        query.top(chdb_store, query.FlowQuery(start=T_START, end=T_END, filter=text, group="srcPod"))
    assert chdb_store.count() == len(FLOWS)


def test_a_namespaced_keys_names_are_every_name_a_row_of_that_key_can_hold():
    """The names a series looks for first (Dimension.names_of) hold the name of every row
    whose key is one of the keys, whatever '/' the namespace or the name hold."""
    dim = DIMENSIONS["srcPod"]
    assert dim.name_column == "sourcePodName" and DIMENSIONS["srcNode"].name_column is None

    def key(ns: str, name: str) -> str:  # what the dimension's SQL builds
        return "" if name == "" else name if ns == "" else f"{ns}/{name}"

    rows = [(ns, name) for ns in ("", "a", "a/b", "x/") for name in ("", "b", "b/c", "/", "a/b")]
    for ns, name in rows:
        assert name in dim.names_of({key(ns, name)}), (ns, name)
    assert dim.names_of({"ns-1/web-1", ""}) == {"ns-1/web-1", "web-1", ""}


def test_filters_read_as_documented():
    w = parse_filter('namespace = "shop" and action = drop')
    assert w.sql == ("((sourcePodNamespace = {p0:String} OR destinationPodNamespace = {p1:String}) AND "
                     "(ingressNetworkPolicyRuleAction = {p2:UInt64} OR egressNetworkPolicyRuleAction = {p3:UInt64}))")
    assert dict(w.params) == {"p0": "shop", "p1": "shop", "p2": 2, "p3": 2}
    assert bind("x = {p0:String}", {"p0": "a'b\\c"}) == "x = 'a\\'b\\\\c'"
    w = parse_filter("pod = shop/web-1")
    assert set(w.params.values()) == {"shop", "web-1"} and "sourcePodName" in w.columns
    assert parse_filter("port not in (80, 443)").sql.startswith("NOT (")  # neither end in the list
    with pytest.raises(FilterError, match=r"unknown field 'Namespace' at column 1 \(did you mean namespace\?\)"):
        parse_filter("Namespace = x")
