"""Migrations of the flow store on chDB: the version-1 table (what flowscope wrote before
migrations existed) migrates in place with every row kept and the roll-ups backfilled; a
version-2 store gains the roll-ups of version 3, backfilled from its raw rows; a
version-4 raw table is rebuilt with version 5's sort key, every row and roll-up kept, its
views on the new table (also after an interrupted start); a second start changes nothing; a store
of a newer schema is refused, untouched; views an earlier flowscope fed from another table are
re-pointed without counting a backfill twice; a column the
table lacks (a new element of the aggregated record) is added in place.

(A separate module from test_collector_store.py: chDB holds one directory per process, and
that module keeps its store open.)"""

from __future__ import annotations

import time

import pytest
from flowscope.collector.rows import flows_to_columns, typed_columns
from flowscope.collector.schema import COLUMNS, SCHEMA_VERSION, rollup_tables
from flowscope.collector.store import SchemaError, open_store
from flowscope.collector import query
from test_collector_store import FLOWS, T_END, T_START, check_against_python, rollup_answers_equal_raw

pytestmark = [pytest.mark.timeout(180)]


def _v1_table(session, db: str = "flowscope") -> None:
    """The table as flowscope wrote it before migrations (schema version 1)."""
    cols = ",\n    ".join(f"`{c.name}` {c.type}" for c in COLUMNS)
    session.query(f"CREATE DATABASE {db}")
    session.query(f"CREATE TABLE {db}.flows (\n    {cols}\n) ENGINE = MergeTree() "
                  "PARTITION BY toYYYYMMDD(timeInserted) ORDER BY (timeInserted, flowEndSeconds)")


def test_the_version_1_table_migrates_in_place_every_row_kept(tmp_path):
    from chdb import session as chs

    path = tmp_path / "store"
    old = open_store(f"chdb://{path}")
    s = old._conn()
    _v1_table(s)
    old.insert(typed_columns(flows_to_columns(FLOWS, time_inserted=int(time.time()), commit_id=9)[0]))
    before = s.query("SELECT count(), sum(octetDeltaCount), uniqExact(sourceIP, sourceTransportPort, flowEndSeconds) "
                     "FROM flowscope.flows", "CSV").bytes()
    old.close()

    store = open_store(f"chdb://{path}")
    store.open()
    assert store.schema_version == SCHEMA_VERSION == 5
    after = store._conn().query("SELECT count(), sum(octetDeltaCount), uniqExact(sourceIP, sourceTransportPort, "
                                "flowEndSeconds) FROM flowscope.flows", "CSV").bytes()
    assert after == before and int(after.split(b",")[0]) == len(FLOWS)
    tables = {r[0] for r in store.select("SELECT name FROM system.tables WHERE database = 'flowscope'")}
    assert {"flows", "flows_1m", "flows_1h", "flows_1m_mv", "flows_1h_mv", "flowscope_schema"} <= tables
    assert set(rollup_tables("flows")) | {f"{t}_mv" for t in rollup_tables("flows")} <= tables
    assert not any(t.endswith(("__v1", "__v2")) for t in tables)
    # the roll-ups were backfilled from the migrated rows, and the derived columns computed
    check_against_python(store)
    assert rollup_answers_equal_raw(store) > 50
    assert store.select("SELECT count() FROM flowscope.flows WHERE sourcePodWorkload = 'app1' "
                        "AND sourcePodName LIKE 'app1-%'")[0][0] > 0
    store.close()

    again = open_store(f"chdb://{path}")  # idempotent: nothing changes on the next start
    again.open()
    assert again.count() == len(FLOWS) and again.count("flows_1h") == store_rollup_rows(again)
    assert [int(r[0]) for r in again.select("SELECT version FROM flowscope.flowscope_schema")] == [5]
    again.execute("INSERT INTO flowscope.flowscope_schema (version, note) SELECT 6, 'from the future'")
    again.close()
    newer = open_store(f"chdb://{path}")
    with pytest.raises(SchemaError, match="has schema version 6, newer than this flowscope's 5; upgrade flowscope"):
        newer.open()
    newer.close()
    s2 = chs.Session(str(path))
    try:
        assert s2.query("SELECT count() FROM flowscope.flows", "CSV").bytes().strip() == str(len(FLOWS)).encode()
    finally:
        s2.close()


def store_rollup_rows(store) -> int:
    return store.count("flows_1h")


def test_a_version_2_store_gains_the_new_rollups_backfilled_from_its_raw_rows(tmp_path):
    """Version 3 added the address and connection roll-ups: a version-2 store (its raw
    table and main roll-ups, nothing else) gets them in place, filled from the raw rows it
    holds, and their answers equal the raw table's; the main roll-ups are left as they were."""
    path = tmp_path / "store"
    store = open_store(f"chdb://{path}")
    store.open()
    store.insert(typed_columns(flows_to_columns(FLOWS, time_inserted=int(time.time()), commit_id=3)[0]))
    for name in rollup_tables("flows"):
        if name.startswith(("flows_addr_", "flows_conn_", "flows_ns_", "flows_src_", "flows_dst_")) or "_10m" in name:
            store.execute(f"DROP TABLE flowscope.{name}_mv")
            store.execute(f"DROP TABLE flowscope.{name}")
    store.execute("TRUNCATE TABLE flowscope.flowscope_schema")
    store.execute("INSERT INTO flowscope.flowscope_schema (version, note) SELECT 2, 'version 2'")
    main_1h = store.select("SELECT count(), sum(octetDeltaCount) FROM flowscope.flows_1h")
    store.close()

    again = open_store(f"chdb://{path}")
    again.open()
    try:
        assert again.schema_version == 5
        assert [int(r[0]) for r in again.select("SELECT version FROM flowscope.flowscope_schema ORDER BY version")] \
            == [2, 5]
        assert again.select("SELECT count(), sum(octetDeltaCount) FROM flowscope.flows_1h") == main_1h
        for name in ("flows_addr_1m", "flows_addr_1h"):
            assert again.select(f"SELECT sum(records), sum(octetDeltaCount) FROM flowscope.{name}") == \
                again.select("SELECT count(), sum(octetDeltaCount) FROM flowscope.flows")
        assert again.select("SELECT uniqCombinedMerge(connections), uniqMerge(srcPods) FROM flowscope.flows_conn_1h") == \
            again.select("SELECT uniqCombined(connectionHash), uniqIf(cityHash64(sourcePodNamespace, sourcePodName), "
                                                                  "sourcePodName != '') FROM flowscope.flows")
        assert rollup_answers_equal_raw(again) > 50
    finally:
        again.close()


def test_a_version_3_store_gains_the_narrow_rollups_from_its_rollups_not_its_raw_rows(tmp_path):
    """Version 4 added the 10-minute resolution and the families without Pods (ns) or with
    one side's (src, dst): a version-3 store gets them in place, filled from its roll-ups
    (the coarsest that keeps their keys), so they hold the history its raw table's shorter
    retention already removed: here the raw table is emptied before the upgrade, and the
    new tables still hold every bucket the old roll-ups hold, with the same sums."""
    from flowscope.collector.schema import FAMILIES, ROLLUP_SUMS, ROLLUPS, rollup_view_sql

    path = tmp_path / "store"
    store = open_store(f"chdb://{path}")
    store.open()
    store.insert(typed_columns(flows_to_columns(FLOWS, time_inserted=int(time.time()), commit_id=3)[0]))
    new = [n for n in rollup_tables("flows") if n.startswith(("flows_ns_", "flows_src_", "flows_dst_")) or "_10m" in n]
    assert len(new) == 7  # ns, src, dst at 10 min and 1 h; conn at 10 min
    for name in new:
        store.execute(f"DROP TABLE flowscope.{name}_mv")
        store.execute(f"DROP TABLE flowscope.{name}")
    # version 3's 1-hour connection states were fed from the 1-minute ones
    view = rollup_view_sql("flowscope", "flows", ROLLUPS[-1], store.features, FAMILIES[-1])
    store.execute("DROP TABLE flowscope.flows_conn_1h_mv")
    store.execute(view.replace("`flows_conn_10m`", "`flows_conn_1m`"))
    store.execute("TRUNCATE TABLE flowscope.flowscope_schema")
    store.execute("INSERT INTO flowscope.flowscope_schema (version, note) SELECT 3, 'version 3'")
    store.execute("TRUNCATE TABLE flowscope.flows")  # the raw rows' retention has passed
    kept = {n: store.count(n) for n in rollup_tables("flows") if n not in new}
    store.close()

    again = open_store(f"chdb://{path}")
    again.open()
    try:
        assert again.schema_version == 5 and again.count() == 0
        assert [int(r[0]) for r in again.select("SELECT version FROM flowscope.flowscope_schema ORDER BY version")] \
            == [3, 5]
        assert {n: again.count(n) for n in kept} == kept  # the old roll-ups as they were
        sums = ", ".join(f"sum({c})" for c in ROLLUP_SUMS + ("records", "ended"))
        for fam in FAMILIES:
            if fam.name not in ("ns", "src", "dst"):
                continue
            keys = ", ".join(fam.keys)
            for r in fam.rollups:
                source = "flows_1m" if r.seconds == 600 else "flows_1h"  # the main family's, regrouped
                want = again.select(f"SELECT intDiv(timeBucket, {r.seconds}) * {r.seconds} AS t, {keys}, {sums} "
                                    f"FROM flowscope.{source} GROUP BY t, {keys} ORDER BY t, {keys}")
                got = again.select(f"SELECT timeBucket AS t, {keys}, {sums} FROM flowscope.{fam.table('flows', r)} "
                                   f"GROUP BY t, {keys} ORDER BY t, {keys}")
                assert got == want and len(got) > 10, fam.table("flows", r)
        assert again.select("SELECT uniqCombinedMerge(connections), uniqMerge(srcPods) FROM flowscope.flows_conn_10m") \
            == again.select("SELECT uniqCombinedMerge(connections), uniqMerge(srcPods) FROM flowscope.flows_conn_1m") \
            != [(0, 0)]
        # the query layer answers from them: the same as before the upgrade, without a raw row
        q = query.FlowQuery(start=T_START, end=T_END, group="srcPod", top=5)
        top = query.top(again, q)
        assert top.table == "flows_src_1h" and top.total.records == len(FLOWS)
    finally:
        again.close()


_V4_KEY = "toStartOfHour(flowEndSeconds), sourcePodNamespace, destinationPodNamespace, flowEndSeconds"


def _as_version_4(store, db: str = "flowscope") -> None:
    """Make a current store what version 4 wrote: its raw table sorted by the hour first
    and its connection states in default-sized granules (the same rows), the views made
    on those tables."""
    from flowscope.collector.schema import CONN_GRANULARITY, FAMILIES, RAW_SORT_KEY, Retention, raw_table_sql, \
        rollup_table_sql, rollup_view_sql

    f = store.features
    fine = f" SETTINGS index_granularity = {CONN_GRANULARITY}"
    old = {"flows": raw_table_sql(db, "flows_h", f, Retention()).replace(RAW_SORT_KEY, _V4_KEY)}
    for fam in FAMILIES:
        if fam.kind == "connections":
            for r in fam.rollups:
                name = fam.table("flows", r)
                old[name] = rollup_table_sql(db, "flows", r, f, Retention(), fam, name=name + "_h")
                assert fine in old[name]
                old[name] = old[name].replace(fine, "")
    views = [(fam, r) for fam in FAMILIES for r in fam.rollups]
    for fam, r in views:
        store.execute(f"DROP TABLE {db}.{fam.table('flows', r)}_mv")
    for name, create in old.items():
        store.execute(create)
        cols = ", ".join(f"`{c}`" for c, in store.select(
            f"SELECT name FROM system.columns WHERE database = '{db}' AND table = '{name}' "
            "AND default_kind != 'MATERIALIZED'"))
        store.execute(f"INSERT INTO {db}.{name}_h ({cols}) SELECT {cols} FROM {db}.{name}")
        store.execute(f"DROP TABLE {db}.{name}")
        store.execute(f"RENAME TABLE {db}.{name}_h TO {db}.{name}")
    for fam, r in views:
        store.execute(rollup_view_sql(db, "flows", r, f, fam))
    store.execute(f"TRUNCATE TABLE {db}.flowscope_schema")
    store.execute(f"INSERT INTO {db}.flowscope_schema (version, note) SELECT 4, 'version 4'")


def _granularity(store, name: str, db: str = "flowscope") -> str:
    return store.select(f"SHOW CREATE TABLE {db}.{name}")[0][0].rsplit("index_granularity = ", 1)[1].split(",")[0]


def _sorting_key(store, db: str = "flowscope") -> str:
    return store.select(f"SELECT sorting_key FROM system.tables WHERE database = '{db}' AND name = 'flows'")[0][0]


def _rollup_sums(store, db: str = "flowscope") -> dict:
    return {n: store.select(f"SELECT count(), sum(records) FROM {db}.{n}" if "conn" not in n else
                            f"SELECT count(), uniqCombinedMerge(connections) FROM {db}.{n}")[0]
            for n in rollup_tables("flows")}


def test_a_version_4_store_is_rebuilt_minute_first_every_row_kept_its_views_on_the_new_table(tmp_path):
    """Version 5 sorts the raw table by the minute first and keeps connection states in
    granules of 8 rows: a version-4 store is rebuilt in place, every row kept, the sums'
    roll-ups untouched, the retention kept, and the views that read a rebuilt table fire
    on the new one (a view follows the table it reads through a rename: left alone, new
    rows would reach no roll-up)."""
    path = tmp_path / "store"
    store = open_store(f"chdb://{path}")
    store.open()
    store.insert(typed_columns(flows_to_columns(FLOWS, time_inserted=int(time.time()), commit_id=3)[0]))
    _as_version_4(store)
    assert _sorting_key(store) == _V4_KEY and _granularity(store, "flows_conn_1m") == "8192"
    raw = store.select("SELECT count(), sum(octetDeltaCount), uniqExact(sourceIP, sourceTransportPort, flowEndSeconds),"
                       " sum(cityHash64(sourcePodWorkload, connectionHash)) FROM flowscope.flows")
    rollups = _rollup_sums(store)
    store.close()

    again = open_store(f"chdb://{path}")
    again.open()
    try:
        assert again.schema_version == 5 and _sorting_key(again).startswith("toStartOfMinute(flowEndSeconds), ")
        assert [_granularity(again, f"flows_conn_{s}") for s in ("1m", "10m", "1h")] == ["8"] * 3
        assert [int(r[0]) for r in again.select("SELECT version FROM flowscope.flowscope_schema ORDER BY version")] \
            == [4, 5]
        assert again.select("SELECT count(), sum(octetDeltaCount), uniqExact(sourceIP, sourceTransportPort, "
                            "flowEndSeconds), sum(cityHash64(sourcePodWorkload, connectionHash)) "
                            "FROM flowscope.flows") == raw
        assert _rollup_sums(again) == rollups
        tables = {r[0] for r in again.select("SELECT name FROM system.tables WHERE database = 'flowscope'")}
        assert not any(t.endswith(("__v4", "__v5")) for t in tables)
        assert " TTL timeInserted + toIntervalSecond(604800)" in again.select(
            "SELECT engine_full FROM system.tables WHERE database = 'flowscope' AND name = 'flows'")[0][0]
        # new rows reach every roll-up (the views on the raw table and those after them)
        again.insert(typed_columns(flows_to_columns(FLOWS, time_inserted=int(time.time()), commit_id=4)[0]))
        for name in rollup_tables("flows"):
            if "conn" not in name:
                assert again.select(f"SELECT sum(records) FROM flowscope.{name}")[0][0] == 2 * len(FLOWS), name
        assert again.select("SELECT uniqCombinedMerge(connections) FROM flowscope.flows_conn_1h") == \
            again.select("SELECT uniqCombined(connectionHash) FROM flowscope.flows")
    finally:
        again.close()


def test_a_rebuild_interrupted_after_the_swap_makes_its_views_again_and_backfills_nothing(tmp_path):
    """A start interrupted after the raw table's swap (the old table left as flows__v4, a
    view dropped and not yet made again): the next start makes the views again before
    anything looks for a roll-up without its view (which it would refill from the raw
    rows: here the raw rows' retention has passed, so a refill would empty it)."""
    path = tmp_path / "store"
    store = open_store(f"chdb://{path}")
    store.open()
    store.insert(typed_columns(flows_to_columns(FLOWS, time_inserted=int(time.time()), commit_id=3)[0]))
    store.execute("TRUNCATE TABLE flowscope.flows")  # the raw rows' retention has passed
    store.execute("CREATE TABLE flowscope.flows__v4 AS flowscope.flows")
    store.execute("DROP TABLE flowscope.flows_1m_mv")
    store.execute("DROP TABLE flowscope.flows_src_10m_mv")
    store.execute("TRUNCATE TABLE flowscope.flowscope_schema")
    store.execute("INSERT INTO flowscope.flowscope_schema (version, note) SELECT 4, 'version 4'")
    rollups = _rollup_sums(store)
    assert rollups["flows_1m"][1] == len(FLOWS)
    store.close()

    again = open_store(f"chdb://{path}")
    again.open()
    try:
        assert again.schema_version == 5 and again.count() == 0
        assert _rollup_sums(again) == rollups
        tables = {r[0] for r in again.select("SELECT name FROM system.tables WHERE database = 'flowscope'")}
        assert {"flows_1m_mv", "flows_src_10m_mv"} <= tables and "flows__v4" not in tables
        again.insert(typed_columns(flows_to_columns(FLOWS, time_inserted=int(time.time()), commit_id=4)[0]))
        assert again.select("SELECT sum(records) FROM flowscope.flows_1m")[0][0] == 2 * len(FLOWS)
        assert again.select("SELECT sum(records) FROM flowscope.flows_src_1h")[0][0] == 2 * len(FLOWS)
    finally:
        again.close()


def test_a_new_element_of_the_record_joins_as_a_column(tmp_path, monkeypatch):
    """A column the table lacks (an IE added to the aggregated record) is added in place."""
    store = open_store(f"chdb://{tmp_path}/s")
    store.open()
    store.execute("ALTER TABLE flowscope.flows DROP COLUMN tcpState")
    store.close()
    again = open_store(f"chdb://{tmp_path}/s")
    again.open()
    assert "tcpState" in {r[0] for r in again.select(
        "SELECT name FROM system.columns WHERE database = 'flowscope' AND table = 'flows'")}
    again.close()


def test_retention_is_each_tables_ttl_and_changes_in_place(tmp_path):
    from flowscope.collector.schema import Retention

    def ttls(store) -> dict:
        rows = store.select("SELECT name, engine_full FROM system.tables WHERE database = 'flowscope'")
        out = {}
        for name, engine in rows:
            if name in ("flows", "flows_1m", "flows_1h"):
                out[name] = engine.split(" TTL ", 1)[1].split(" SETTINGS")[0] if " TTL " in engine else None
        return out

    store = open_store(f"chdb://{tmp_path}/s", retention=Retention(86400, 0, 2 * 86400))
    store.open()
    assert ttls(store) == {"flows": "timeInserted + toIntervalSecond(86400)", "flows_1m": None,
                           "flows_1h": "inserted + toIntervalSecond(172800)"}
    store.close()
    again = open_store(f"chdb://{tmp_path}/s", retention=Retention(3600, 7200, 0))
    again.open()
    assert ttls(again) == {"flows": "timeInserted + toIntervalSecond(3600)",
                           "flows_1m": "inserted + toIntervalSecond(7200)", "flows_1h": None}
    again.close()
    # a reader that names no retention (flowscope flows / ui / policy --store) keeps the writer's
    reader = open_store(f"chdb://{tmp_path}/s")
    reader.open()
    assert ttls(reader) == {"flows": "timeInserted + toIntervalSecond(3600)",
                            "flows_1m": "inserted + toIntervalSecond(7200)", "flows_1h": None}
    reader.close()


def _totals(store) -> dict[str, list[tuple]]:
    out = {}
    for name in rollup_tables("flows"):
        if "_conn_" in name:
            out[name] = store.select(f"SELECT uniqCombinedMerge(connections) FROM flowscope.{name}")
        else:
            out[name] = store.select(f"SELECT sum(records), sum(octetDeltaCount) FROM flowscope.{name}")
    return out


def test_views_fed_by_an_earlier_flowscope_are_re_pointed_and_a_backfill_is_not_counted_twice(tmp_path):
    """Where views cascade the narrow families' finest roll-ups read the main 1-minute
    rows: a store whose ``flows_ns_10m`` view still reads the raw insert gets it
    re-pointed on open; a ``flows_1m`` refilled on open (its view missing: a backfill
    interrupted) does not flow a second time into the tables fed from it. Every roll-up's
    totals equal the raw table's, before and after one more insert."""
    from flowscope.collector.schema import FAMILIES, rollup_select_sql

    path = tmp_path / "store"
    store = open_store(f"chdb://{path}")
    store.open()
    half = len(FLOWS) // 2
    store.insert(typed_columns(flows_to_columns(FLOWS[:half], time_inserted=int(time.time()), commit_id=3)[0]))
    ns = next(f for f in FAMILIES if f.name == "ns")
    store.execute("DROP TABLE flowscope.flows_ns_10m_mv")
    store.execute("CREATE MATERIALIZED VIEW flowscope.flows_ns_10m_mv TO flowscope.flows_ns_10m AS "
                  + rollup_select_sql("flowscope", "flows", ns.rollups[0], None, ns))  # as schema v4 first fed it
    store.execute("DROP TABLE flowscope.flows_1m_mv")
    store.close()

    again = open_store(f"chdb://{path}")
    again.open()
    try:
        sources = dict(again.select("SELECT name, create_table_query LIKE '%FROM flowscope.flows_1m %' "
                                    "FROM system.tables WHERE database = 'flowscope' AND name LIKE '%\\\\_10m\\\\_mv'"))
        assert sources == {"flows_ns_10m_mv": 1, "flows_src_10m_mv": 1, "flows_dst_10m_mv": 1, "flows_conn_10m_mv": 0}
        raw = again.select("SELECT count(), sum(octetDeltaCount) FROM flowscope.flows")
        conn = again.select("SELECT uniqCombined(connectionHash) FROM flowscope.flows")
        assert _totals(again) == {n: conn if "_conn_" in n else raw for n in rollup_tables("flows")}
        again.insert(typed_columns(flows_to_columns(FLOWS[half:], time_inserted=int(time.time()), commit_id=4)[0]))
        raw = again.select("SELECT count(), sum(octetDeltaCount) FROM flowscope.flows")
        conn = again.select("SELECT uniqCombined(connectionHash) FROM flowscope.flows")
        assert raw[0][0] == len(FLOWS)
        assert _totals(again) == {n: conn if "_conn_" in n else raw for n in rollup_tables("flows")}
    finally:
        again.close()
