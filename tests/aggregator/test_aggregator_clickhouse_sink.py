"""The ClickHouse flow store's pure parts and the aggregator sink's behaviour, driven by an
injected clock and a scripted in-memory store (no ClickHouse here: the real server and chDB
are in test_clickhouse_server.py and test_clickhouse_chdb.py).

What a user relies on: bad addresses and names are refused at start naming the key and the
allowed forms; the table holds every element of the aggregated record of both families and
gives the record back unchanged; a failed commit keeps its rows, backs off, and retries
without inserting a chunk twice; past queueSize a batch is refused and counted exactly; what
cannot be stored at shutdown is counted.
"""

from __future__ import annotations

import asyncio

import time

import pytest
from flowscope.aggregator.aggregation import ExportedFlow, output_names
from flowscope.aggregator.config import ConfigError, parse_config
from flowscope.aggregator.service import build_sinks
from flowscope.aggregator.sinks import QueuedSink
from flowscope.aggregator.clickhouse_sink import (
    ClickHouseSink,
    backoff_delay,
    make_sink,
)
from flowscope.collector.rows import flows_to_columns, row_to_record
from flowscope.collector.schema import COLUMN_NAMES, COLUMNS, Retention, features_for_version, raw_table_sql
from flowscope.collector.store import AddressError, FlowStore, StoreAddress, parse_store_address
from flowscope.ipfix.antrea import aggregator_fields
from fakes import ManualClock


# Recent times, so the roll-ups' buckets are today's.
T_RECENT = (int(time.time()) // 86400 - 1) * 86400


def aggregated(i: int = 0, *, v6: bool = False, e6: bool = False, **over) -> dict:
    """An aggregated record with every output element set to a distinct, typed value."""
    rec: dict = {}
    for n, name in enumerate(output_names(v6, e6)):
        col = next(c for c in COLUMNS if name in c.elements)
        if col.type == "String":
            if "Address" in name or "ClusterIP" in name:
                rec[name] = (f"fd00::{n + 1:x}:{i + 1:x}" if ("IPv6" in name) else f"10.{n}.{i % 250}.{(i // 250) % 250}")
            else:
                rec[name] = f"{name[:6]}-{i}-ü"
        elif col.type == "DateTime":
            rec[name] = T_RECENT + i + n
        else:
            rec[name] = (i * 7 + n) % (col.maximum + 1)
    rec["octetDeltaCount"] = 2**64 - 1 - i  # the full UInt64 range survives
    rec.update(over)
    return rec


def test_addresses_and_their_errors():
    assert parse_store_address("tcp://clickhouse:9000") == StoreAddress("server", "clickhouse", 9000)
    assert parse_store_address("clickhouse://ch.ns.svc/") == StoreAddress("server", "ch.ns.svc", 9000)
    assert parse_store_address("tcp://[::1]:19000/flows_db") == StoreAddress("server", "::1", 19000, "flows_db")
    assert parse_store_address("chdb://") == StoreAddress("chdb")
    assert parse_store_address("chdb:///var/lib/flowscope") == StoreAddress("chdb", path="/var/lib/flowscope")
    for bad, why in [
        ("clickhouse:9000", "has no scheme"), ("http://ch:8123", "scheme 'http'"), ("tcp://:9000", "no host"),
        ("tcp://ch:99999", "port '99999'"), ("tcp://ch:x", "port 'x'"), ("tcp://u:p@ch:9000", "credentials"),
        ("tcp://ch/bad-db", "database 'bad-db'"), ("tcp://::1:9000", "without brackets"),
        ("chdb://relative/dir", "absolute directory"), ("tcp://[::1", "unclosed"),
    ]:
        with pytest.raises(AddressError) as err:
            parse_store_address(bad)
        msg = str(err.value)
        assert msg.startswith("sinks.clickhouse.address:") and repr(bad) in msg and why in msg, msg
        assert "tcp://HOST[:PORT][/DATABASE]" in msg and "chdb:///DIR" in msg


def test_make_sink_refuses_bad_config_naming_the_key():
    def cfg(**ch):
        return parse_config({"sinks": {"clickhouse": {"enabled": True, **ch}}})

    with pytest.raises(ConfigError, match=r"sinks.clickhouse.address: 'ftp://x'.*allowed forms"):
        build_sinks(cfg(address="ftp://x"))  # through the aggregator's own plug-in point
    with pytest.raises(ConfigError, match=r"sinks.clickhouse.table: 'flows-v2' is not a valid name"):
        make_sink(cfg(table="flows-v2").sinks.clickhouse)
    with pytest.raises(ConfigError, match=r"sinks.clickhouse.database: '1db'"):
        make_sink(cfg(database="1db").sinks.clickhouse)
    # The operator's default renders this address; it builds (without connecting) and takes the Secret's env.
    sink = make_sink(cfg(address="tcp://clickhouse.flowscope-lab.svc:9000", commitInterval="3s",
                         queueSize=500).sinks.clickhouse,
                     env={"CLICKHOUSE_USERNAME": "flowscope", "CLICKHOUSE_PASSWORD": "pw"})
    assert (sink.store.address.host, sink.store.user, sink.store.password) == ("clickhouse.flowscope-lab.svc",
                                                                              "flowscope", "pw")
    assert (sink.commit_interval, sink.max_buffer, sink.store.database, sink.store.table) == (3.0, 500, "flowscope",
                                                                                             "flows")
    # A database in the address path wins.
    assert make_sink(cfg(address="tcp://ch/other").sinks.clickhouse, env={}).store.database == "other"


def test_the_default_configuration_inserts_blocks_of_100000_rows():
    """ClickHouse pays about 0.1 s of CPU per INSERT whatever its size: with the 10,000 rows
    every sink once held by default, the sink inserted 5,000 rows at a time and managed
    12,700 rows/s into chDB (docs/clickhouse.md, "Insert size"). The default holds 200,000,
    so an insert carries 100,000, and the aggregator's queue in front of it as many."""
    config = parse_config({"sinks": {"clickhouse": {"enabled": True}}})
    sink = make_sink(config.sinks.clickhouse, env={})
    assert (sink.max_buffer, sink.chunk_rows) == (200_000, 100_000)
    (built, queue_size), = build_sinks(config)
    assert queue_size == 200_000 and built.name == "clickhouse"
    # a smaller queueSize still bounds what is held, and the inserts with it
    small = make_sink(parse_config({"sinks": {"clickhouse": {"enabled": True, "queueSize": 10_000}}}).sinks.clickhouse,
                      env={})
    assert (small.max_buffer, small.chunk_rows) == (10_000, 5_000)


def test_schema_has_every_element_of_both_families_and_18_16_sql():
    held = {e for c in COLUMNS for e in c.elements}
    for fam in (4, 6):
        assert set(aggregator_fields(fam)) <= held
    assert {"originalExporterIPv6Address", "originalExporterIPv4Address"} <= held
    types = {c.name: c.type for c in COLUMNS}
    assert types["flowStartSeconds"] == types["flowEndSeconds"] == types["timeInserted"] == "DateTime"
    assert types["octetDeltaCountFromDestinationNode"] == "UInt64" and types["sourcePodName"] == "String"
    assert types["sourceIP"] == "String" and types["correlation"] == "String"
    table = raw_table_sql("flowscope", "flows", features_for_version("18.16.1"), Retention())
    assert "CREATE TABLE IF NOT EXISTS `flowscope`.`flows`" in table
    for newer in ("LowCardinality", "IPv4", "IPv6", "TTL", "Nullable"):  # what 18.16 lacks or we avoid
        assert newer not in table.replace("IPv4Address", "").replace("IPv6Address", "")
    current = raw_table_sql("flowscope", "flows", features_for_version("25.8"), Retention())
    assert "`sourcePodName` LowCardinality(String)" in current and "TTL timeInserted + INTERVAL" in current


def test_rows_give_the_record_back_for_all_four_shapes():
    flows = [ExportedFlow(aggregated(i, v6=v6, e6=e6), corr, final)
             for i, (v6, e6, corr, final) in enumerate([(False, False, "correlated", True), (True, False, "external", False),
                                                         (False, True, "uncorrelated", False), (True, True, "denied", True)])]
    cols, invalid = flows_to_columns(flows, time_inserted=1_790_000_000, commit_id=42)
    assert invalid == 0 and len(cols) == len(COLUMNS)
    for i, f in enumerate(flows):
        row = dict(zip(COLUMN_NAMES, (c[i] for c in cols)))
        assert row_to_record(row) == f.record
        assert (row["correlation"], row["final"], row["timeInserted"], row["commitId"]) == (
            f.correlation, int(f.final), 1_790_000_000, 42)


def test_a_record_the_table_cannot_hold_costs_only_itself():
    good = [ExportedFlow(aggregated(i), "correlated", False) for i in range(5)]
    bad = [ExportedFlow(aggregated(9, packetTotalCount=-1), "x", False),
           ExportedFlow(aggregated(10, sourceTransportPort=70000), "x", False),
           ExportedFlow(aggregated(11, sourcePodName=b"bytes"), "x", False),
           ExportedFlow(aggregated(12, flowEndSeconds=2**32), "x", False),
           ExportedFlow(aggregated(13), None, False)]  # type: ignore[arg-type]
    cols, invalid = flows_to_columns(good[:2] + bad + good[2:], time_inserted=1, commit_id=1)
    assert invalid == len(bad)
    got = [row_to_record(dict(zip(COLUMN_NAMES, (c[i] for c in cols)))) for i in range(len(cols[0]))]
    assert got == [f.record for f in good]


def test_backoff_doubles_to_a_cap():
    assert [backoff_delay(n, 1.0, 30.0) for n in range(8)] == [0.0, 1, 2, 4, 8, 16, 30, 30]


class ScriptedStore(FlowStore):
    """An in-memory store whose next operations can be made to fail (connection refused, or an
    insert that lands but whose answer is lost)."""

    def __init__(self) -> None:
        super().__init__(StoreAddress("server", "scripted", 9000), "flowscope", "flows")
        self.stored: list[dict] = []
        self.down = False
        self.lose_answer = 0  # the next N inserts land but raise
        self.opens = self.resets = self.closed = 0

    def open(self) -> None:
        if self.down:
            raise ConnectionRefusedError("Connection refused (scripted:9000)")
        self.opens += 1

    def insert(self, columns) -> None:
        if self.down:
            raise ConnectionRefusedError("Connection refused (scripted:9000)")
        self.stored += [dict(zip(COLUMN_NAMES, r)) for r in zip(*columns)]
        if self.lose_answer:
            self.lose_answer -= 1
            raise EOFError("Unexpected EOF while reading bytes")

    def rows_of_commit(self, commit_id: int, time_inserted: int) -> int:
        if self.down:
            raise ConnectionRefusedError("Connection refused (scripted:9000)")
        return sum(1 for r in self.stored if r["commitId"] == commit_id and r["timeInserted"] == time_inserted)

    def reset(self) -> None:
        self.resets += 1

    def close(self) -> None:
        self.closed += 1


def batch(start: int, n: int) -> list[ExportedFlow]:
    return [ExportedFlow(aggregated(i), "correlated", False) for i in range(start, start + n)]


def stored_ports(store: ScriptedStore) -> list[int]:
    return sorted(r["sourceTransportPort"] for r in store.stored)


async def test_buffered_until_commit_then_one_insert_with_fixed_time_and_id():
    store, clock = ScriptedStore(), ManualClock(100.0)
    sink = ClickHouseSink(store, commit_interval=8, max_buffer=1000, clock=clock, wall=lambda: 1_790_000_123.7,
                          timer=False)
    await sink.start()
    await sink.write(batch(0, 10))
    await sink.write(batch(10, 5))
    assert store.stored == [] and sink.held == 15
    assert await sink.commit() == 15
    assert len(store.stored) == 15 and {r["timeInserted"] for r in store.stored} == {1_790_000_123}
    assert len({r["commitId"] for r in store.stored}) == 1
    assert sink.stats()["committedRows"] == 15 and sink.held == 0
    await sink.close()
    assert store.closed == 1 and sink.lost_at_close == 0


async def test_a_full_chunk_commits_from_write_in_chunks():
    store, clock = ScriptedStore(), ManualClock(100.0)
    sink = ClickHouseSink(store, commit_interval=8, max_buffer=100, chunk_rows=30, clock=clock, timer=False)
    await sink.write(batch(0, 20))
    assert store.stored == []
    await sink.write(batch(20, 25))  # 45 >= 30: commits now, as chunks of 30 and 15
    assert len(store.stored) == 45 and sink.commits == 2
    assert len({r["commitId"] for r in store.stored}) == 2


async def test_outage_keeps_rows_backs_off_and_recovers_without_loss():
    store, clock = ScriptedStore(), ManualClock(100.0)
    sink = ClickHouseSink(store, commit_interval=8, max_buffer=1000, chunk_rows=50, clock=clock, timer=False)
    store.down = True
    await sink.write(batch(0, 40))
    assert await sink.commit() == 0  # the failure is counted, not raised
    assert (sink.commit_failures, sink.held, store.resets) == (1, 40, 1)
    assert sink.next_due() == clock.t + 8  # the commit interval is longer than the first backoff (1 s)
    for expected in (2, 4, 8, 16, 30, 30):
        await sink.commit()
        assert sink.next_due() - clock.t == max(8, expected)
    # While backing off, a full chunk does not hammer the server from write.
    await sink.write(batch(40, 60))
    assert sink.commit_failures == 7 and sink.held == 100
    assert "Connection refused" in sink.stats()["lastCommitError"]
    store.down = False
    clock.t = sink.next_due()
    assert await sink.commit() == 100
    assert stored_ports(store) == sorted(f.record["sourceTransportPort"] for f in batch(0, 100))
    assert (sink.failures, sink.last_error, sink.next_due()) == (0, None, clock.t + 8)
    assert store.opens == 1  # the table is (re)created once the server answers


async def test_an_unanswered_insert_is_not_inserted_twice():
    store, clock = ScriptedStore(), ManualClock(100.0)
    sink = ClickHouseSink(store, commit_interval=8, max_buffer=1000, clock=clock, timer=False)
    await sink.write(batch(0, 25))
    store.lose_answer = 1
    assert await sink.commit() == 0
    assert len(store.stored) == 25 and sink.held == 25  # it landed, but the sink could not know
    await sink.write(batch(25, 5))
    assert await sink.commit() == 30
    assert stored_ports(store) == sorted(f.record["sourceTransportPort"] for f in batch(0, 30))
    assert sink.already_stored == 1 and sink.committed_rows == 30


async def test_past_queue_size_batches_are_refused_and_counted_exactly():
    store, clock = ScriptedStore(), ManualClock(100.0)
    sink = ClickHouseSink(store, commit_interval=8, max_buffer=50, chunk_rows=1000, clock=clock, timer=False)
    q = QueuedSink(sink, queue_size=1000, batch_size=20)
    await q.start()
    store.down = True
    await sink.commit()
    q.offer(batch(0, 100))  # 5 batches of 20: two fit in 50 rows, the other three are refused
    assert await q.flush(2.0)
    assert (q.written, q.failed) == (40, 60) and sink.refused_records == 60
    assert "reached sinks.clickhouse.queueSize (50)" in q.last_error and "Connection refused" in q.last_error
    store.down = False
    await q.close()  # close commits what is held
    assert stored_ports(store) == sorted(f.record["sourceTransportPort"] for f in batch(0, 40))
    assert sink.lost_at_close == 0
    # Every record offered is in the store or counted.
    assert len(store.stored) + q.failed + q.dropped + sink.invalid_records + sink.lost_at_close == q.offered


async def test_what_cannot_be_stored_at_shutdown_is_counted():
    store, clock = ScriptedStore(), ManualClock(100.0)
    sink = ClickHouseSink(store, commit_interval=8, max_buffer=100, clock=clock, timer=False)
    await sink.write(batch(0, 12))
    store.down = True
    await sink.close()
    assert (sink.lost_at_close, sink.held, store.stored) == (12, 0, [])


async def test_the_timer_commits_on_the_interval_and_never_blocks_the_loop():
    store = ScriptedStore()
    sink = ClickHouseSink(store, commit_interval=0.05, max_buffer=100)
    await sink.start()
    await sink.write(batch(0, 3))
    for _ in range(200):
        if store.stored:
            break
        await asyncio.sleep(0.01)
    assert len(store.stored) == 3
    await sink.close()
    assert sink.commits >= 1 and store.closed == 1


async def test_bad_records_are_counted_once_even_when_their_first_insert_fails(caplog):
    store, clock = ScriptedStore(), ManualClock(100.0)
    sink = ClickHouseSink(store, commit_interval=8, max_buffer=100, clock=clock, timer=False)
    await sink.commit()  # connected
    await sink.write(batch(0, 4) + [ExportedFlow(aggregated(50, destinationTransportPort=-80), "correlated", False)])
    store.down = True
    await sink.commit()
    assert (sink.invalid_records, sink.held) == (1, 4)  # converted once: the bad record is out, and counted
    store.down = False
    clock.t = sink.next_due()
    assert await sink.commit() == 4
    assert sink.invalid_records == 1 and len(store.stored) == 4
    assert caplog.text.count("1 records with values the table cannot hold left out") == 1
