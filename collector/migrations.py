"""Versioned migrations of the flow store, applied by :meth:`FlowStore.open` on every start.

The store's version lives in ``<database>.flowscope_schema`` (one row per applied
version). Theory of operation:

* **Which version is there.** The highest row of ``flowscope_schema``; without that table,
  version 1 when the flows table exists (the table flowscope wrote before migrations
  existed: every record column, ordered by ``(timeInserted, flowEndSeconds)``, no derived
  columns, no roll-ups), else 0 (an empty database).
* **Newer than the code**: refused with :class:`SchemaError` naming both versions; nothing
  is touched.
* **0 -> 5**: the tables, the roll-ups and their views are created.
* **2..4 -> 5, in place, rows kept**: after the steps below brought everything else to
  the current version, the tables of an older layout are rebuilt: the raw table with
  version 5's sort key (:data:`~flowscope.collector.schema.RAW_SORT_KEY`: the minute
  first, where version 4's began with the hour) and the connection-state roll-ups in
  granules of :data:`~flowscope.collector.schema.CONN_GRANULARITY` rows (a table setting
  fixed at creation). For each, a copy ``<name>__v5`` is created without a TTL, every row
  copied into it and the counts compared; then all are swapped by one ``RENAME`` (the old
  ones kept as ``<name>__v4``); then the views that read a swapped table are dropped and
  created again (a materialized view follows the table it reads through a rename, not
  its name; the table it writes to it finds by name), each old table's TTL given to its
  successor, the version recorded and the ``__v4`` tables dropped. A start interrupted
  anywhere in between repeats the step it was in: leftover ``__v5`` copies beside
  old-layout tables are dropped and the copies redone; a leftover ``__v4`` means the swap
  was done, and the views are made again first (before anything looks for missing views:
  a roll-up without its view would be backfilled). The sums' roll-ups are not touched.
* **3 -> 4, in place** (then on to 5): the 10-minute roll-ups and the narrow families (``ns``, ``src``,
  ``dst``) are created and backfilled from the coarsest roll-up already filled that keeps
  their keys (:func:`~flowscope.collector.schema.backfill_source`), so they hold the
  history the raw table's retention already removed; then their views. Nothing else
  changes (version 3's views, fed as they were, stay: their sums are exact either way).
* **Every start, where the server has part formats** (20.3): a raw table without
  ``min_rows_for_wide_part`` gets it (``ALTER TABLE ... MODIFY SETTING``; parts written
  from then on follow it).
* **Every start, where views cascade**: a view that reads another table than
  :func:`~flowscope.collector.schema.rollup_source` names (an earlier flowscope fed the
  narrow families from the raw insert) is dropped and created again reading the new one,
  before any insert: the sums are the same, the new source cheaper.
* **2 -> 4, in place** (then on to 5): the roll-up families added in version 3 (``<table>_addr_1m/1h``:
  Pods with their addresses; ``<table>_conn_1m/1h``: connection states, see
  :class:`~flowscope.collector.schema.Family`) are created and backfilled from the raw
  rows the store holds (so they know what the raw table knows: buckets the raw table's
  retention removed are in the version-2 roll-ups only, which the query layer prefers
  where they answer), then their views; nothing else changes.
* **1 -> 5, in place, rows kept**: a new table ``<table>__v2`` is created at the current version,
  every row copied into it (``INSERT ... SELECT``, the derived columns computed as they
  are on insert), the counts compared, then the tables swapped by ``RENAME`` (the old one
  kept as ``<table>__v1`` until the roll-ups are backfilled from the new table and the
  version recorded; then it is dropped). A start interrupted anywhere in between repeats
  the step it was in: a leftover ``__v2`` (copy not finished) is dropped and the copy
  redone; a leftover ``__v1`` with the new table in place means only the backfill and the
  record are left.
* **Every start, at the current version**: tables and views ``IF NOT EXISTS``; columns
  of the aggregated record that the table lacks (a new IE added to
  :func:`flowscope.ipfix.antrea.aggregator_fields`) are added with ``ALTER TABLE ADD
  COLUMN``, and existing rows read the type's default; a column with another type is a
  :class:`SchemaError` naming it. On servers with TTL the configured retention is applied
  when it differs.

The server's :class:`~flowscope.collector.schema.Features` are read from ``version()``
first, so one code path serves chDB and ClickHouse 18.16.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from .schema import (
    COLUMNS,
    CONN_GRANULARITY,
    DERIVED,
    FAMILIES,
    RAW_SORT_KEY,
    RAW_WIDE_PART_ROWS,
    SCHEMA_VERSION,
    Family,
    Features,
    Retention,
    Rollup,
    features_for_version,
    quote,
    backfill_source,
    raw_table_sql,
    rollup_backfill_sql,
    rollup_source,
    rollup_table_sql,
    rollup_view_sql,
)

if TYPE_CHECKING:
    from .store import FlowStore

__all__ = ["current_version", "migrate"]

log = logging.getLogger("flowscope.collector.store")
META = "flowscope_schema"


def _tables(store: FlowStore) -> set[str]:
    rows = store._select(f"SELECT name FROM system.tables WHERE database = '{store.database}'")
    return {str(r[0]) for r in rows}


def _columns(store: FlowStore, table: str) -> dict[str, str]:
    rows = store._select(
        f"SELECT name, type FROM system.columns WHERE database = '{store.database}' AND table = '{table}'")
    return {str(r[0]): str(r[1]) for r in rows}


def current_version(store: FlowStore) -> int:
    """The schema version the store holds (0: nothing yet)."""
    tables = _tables(store)
    if META in tables:
        rows = store._select(f"SELECT max(version) FROM {quote(store.database)}.{quote(META)}")
        if rows and rows[0][0]:
            return int(rows[0][0])
    if store.table in tables or f"{store.table}__v1" in tables:
        return 1
    return 0


def _record(store: FlowStore, version: int, note: str) -> None:
    # INSERT ... SELECT: the native protocol takes inline VALUES as a data insert
    store._execute(f"INSERT INTO {quote(store.database)}.{quote(META)} (version, note) "
                   f"SELECT {int(version)}, '{note}'")


def _count(store: FlowStore, table: str) -> int:
    return int(store._select(f"SELECT count() FROM {quote(store.database)}.{quote(table)}")[0][0])


def migrate(store: FlowStore) -> None:
    """Bring the store to :data:`SCHEMA_VERSION` (called under the store's lock)."""
    from .store import SchemaError

    version = str(store._select("SELECT version()")[0][0])
    store.features = features = features_for_version(version)
    db = quote(store.database)
    store._execute(f"CREATE DATABASE IF NOT EXISTS {db}")
    have = current_version(store)
    if have > SCHEMA_VERSION:
        raise SchemaError(
            f"store {store.address} database {store.database} has schema version {have}, newer than this "
            f"flowscope's {SCHEMA_VERSION}; upgrade flowscope, or point --store at another database")
    store._execute(f"CREATE TABLE IF NOT EXISTS {db}.{quote(META)} (version UInt32, "
                   "applied DateTime DEFAULT now(), note String) ENGINE = MergeTree() ORDER BY version")
    if have == 1:
        _from_v1(store)
    _finish_rebuild(store)  # a start interrupted after a rebuild's swap: its views first
    _ensure(store)
    _rebuild(store)
    if have < SCHEMA_VERSION:
        _record(store, SCHEMA_VERSION, "created" if have == 0 else f"migrated from {have}")
        log.info("flow store %s: schema version %d (was %d)", store.database, SCHEMA_VERSION, have)
    tables = _tables(store)
    ours = [store.table] + [fam.table(store.table, r) for fam in FAMILIES for r in fam.rollups]
    for old in [f"{store.table}__v1"] + [n + _OLD for n in ours]:
        if old in tables:
            store._execute(f"DROP TABLE {db}.{quote(old)}")
    store.schema_version = SCHEMA_VERSION
    log.debug("flow store %s on ClickHouse %s (LowCardinality %s, TTL %s)", store.database, features.label,
              features.low_cardinality, features.ttl)


def _from_v1(store: FlowStore) -> None:
    from .store import SchemaError

    assert store.features is not None
    db, table = store.database, store.table
    new, old = f"{table}__v2", f"{table}__v1"
    tables = _tables(store)
    if table in tables and "sourcePodWorkload" in _columns(store, table):  # a v2 column
        return  # swapped already: the backfill is what is left (ensure does it)
    if new in tables:
        store._execute(f"DROP TABLE {quote(db)}.{quote(new)}")  # a copy that did not finish
    have = _columns(store, table)
    common = [c.name for c in COLUMNS if c.name in have]
    if not common or "flowEndSeconds" not in have:
        raise SchemaError(f"table {db}.{table} is not a flowscope flows table (no flowEndSeconds); "
                          "point the store at another table or database")
    store._execute(raw_table_sql(db, new, store.features, _no_ttl(store)))
    cols = ", ".join(quote(c) for c in common)
    store._execute(f"INSERT INTO {quote(db)}.{quote(new)} ({cols}) SELECT {cols} FROM {quote(db)}.{quote(table)}")
    before, after = _count(store, table), _count(store, new)
    if before != after:
        raise SchemaError(f"migrating {db}.{table} to version 2 copied {after} of {before} rows; "
                          f"the table is unchanged ({db}.{new} holds the partial copy)")
    store._execute(f"RENAME TABLE {quote(db)}.{quote(table)} TO {quote(db)}.{quote(old)}, "
                   f"{quote(db)}.{quote(new)} TO {quote(db)}.{quote(table)}")
    log.info("flow store %s.%s: %d rows migrated to schema version 2", db, table, after)


def _raw_key_current(store: FlowStore) -> bool:
    """Whether the raw table is sorted by :data:`RAW_SORT_KEY` (its CREATE statement says so)."""
    return f"ORDERBY({RAW_SORT_KEY})".replace(" ", "") in re.sub(r"\s", "", _create(store, store.table))


def _create(store: FlowStore, table: str) -> str:
    return str(store._select(f"SHOW CREATE TABLE {quote(store.database)}.{quote(table)}")[0][0])


_OLD, _COPY = "__v4", "__v5"  # the tables a version-5 rebuild leaves while it runs


def _stale(store: FlowStore) -> list[tuple[str, str]]:
    """The tables whose layout is older than version 5's, each with the CREATE of its copy:
    the raw table sorted by the hour first, connection states in default-sized granules."""
    assert store.features is not None
    f, db, table = store.features, store.database, store.table
    out = []
    if not _raw_key_current(store):
        out.append((table, raw_table_sql(db, table + _COPY, f, _no_ttl(store))))
    for family in FAMILIES:
        if family.kind != "connections":
            continue
        for r in family.rollups:
            name = family.table(table, r)
            if not re.search(rf"index_granularity = {CONN_GRANULARITY}\b", _create(store, name)):
                out.append((name, rollup_table_sql(db, table, r, f, _no_ttl(store), family, name=name + _COPY)))
    return out


def _rebuild(store: FlowStore) -> None:
    """Rebuild the tables of an older layout (:func:`_stale`), every row kept (see the
    module's docstring): copy each, compare the counts, swap them all in one ``RENAME``,
    then :func:`_finish_rebuild`."""
    from .store import SchemaError

    db = store.database
    stale = _stale(store)
    if not stale:
        return
    for name, create in stale:
        copy = name + _COPY
        store._execute(f"DROP TABLE IF EXISTS {quote(db)}.{quote(copy)}")  # a copy that did not finish
        store._execute(create)
        have, new = _columns(store, name), _columns(store, copy)
        cols = ", ".join(quote(c) for c in new if c in have and c not in _DERIVED_NAMES)
        store._execute(f"INSERT INTO {quote(db)}.{quote(copy)} ({cols}) SELECT {cols} FROM {quote(db)}.{quote(name)}")
        before, after = _count(store, name), _count(store, copy)
        if before != after:
            raise SchemaError(f"rebuilding {db}.{name} for schema version 5 copied {after} of {before} rows; "
                              f"the table is unchanged ({db}.{copy} holds the partial copy)")
    store._execute("RENAME TABLE " + ", ".join(
        f"{quote(db)}.{quote(n)} TO {quote(db)}.{quote(n + _OLD)}, {quote(db)}.{quote(n + _COPY)} TO {quote(db)}.{quote(n)}"
        for n, _ in stale))
    log.info("flow store %s: rebuilt for schema version 5 (%s), every row kept", db, ", ".join(n for n, _ in stale))
    _finish_rebuild(store)


def _finish_rebuild(store: FlowStore) -> None:
    """After the swap of :func:`_rebuild` (or a start interrupted after it): the views that
    read a swapped table made again on the new one (a view follows the table it reads
    through a rename; the table it writes to it finds by name), each old table's retention
    given to its successor. Nothing to do when no ``__v4`` table is there."""
    assert store.features is not None
    f, db, table = store.features, store.database, store.table
    tables = _tables(store)
    ours = [table] + [fam.table(table, r) for fam in FAMILIES for r in fam.rollups]
    swapped = {n for n in ours if n + _OLD in tables}
    if not swapped:
        return
    for n in swapped:
        if n not in tables and n + _COPY in tables:  # interrupted between the renames
            store._execute(f"RENAME TABLE {quote(db)}.{quote(n + _COPY)} TO {quote(db)}.{quote(n)}")
    tables = _tables(store)
    for family in FAMILIES:
        for r in family.rollups:
            name = family.table(table, r)
            if name in tables and _wanted_source(table, r, f, family) in swapped:
                store._execute(f"DROP TABLE IF EXISTS {quote(db)}.{quote(name + '_mv')}")
                store._execute(rollup_view_sql(db, table, r, f, family))
    if f.ttl:
        for n in swapped:
            old, new = _ttl_clause(store, n + _OLD), _ttl_clause(store, n)
            if old and old != new:
                store._execute(f"ALTER TABLE {quote(db)}.{quote(n)} MODIFY TTL {old}")


def _engine_full(store: FlowStore, table: str) -> str:
    """A table's engine clause as the server shows it (TTL and SETTINGS included; "" when
    there is no such table)."""
    rows = store._select(f"SELECT engine_full FROM system.tables WHERE database = '{store.database}' "
                         f"AND name = '{table}'")
    return str(rows[0][0]) if rows else ""


def _ttl_clause(store: FlowStore, table: str) -> str:
    """A table's TTL expression as the server shows it ("" when none)."""
    m = re.search(r" TTL (.*?)(?: SETTINGS |$)", _engine_full(store, table))
    return m.group(1).strip() if m else ""


def _no_ttl(store: FlowStore) -> Retention:
    # The copy must keep every row: the TTL is applied after the swap (a row older than the
    # retention goes when the server's TTL would have removed it anyway).
    return Retention(0, 0, 0)


_DERIVED_NAMES = frozenset(d.name for d in DERIVED)


def _ensure(store: FlowStore) -> None:
    """Create what is missing at the current version, add new columns, apply the retention
    (new tables get the store's; existing ones only when the opener asked for one)."""
    from .store import SchemaError

    assert store.features is not None
    f, db, table = store.features, store.database, store.table
    tables = _tables(store)
    store._execute(raw_table_sql(db, table, f, store.retention))
    if f.compact_parts:
        _part_format(store)
    have = _columns(store, table)
    wrong = []
    for c in COLUMNS:
        t = have.get(c.name)
        if t is None:
            store._execute(f"ALTER TABLE {quote(db)}.{quote(table)} ADD COLUMN {quote(c.name)} {c.sql_type(f)}")
            log.info("flow store %s.%s: added the column %s %s", db, table, c.name, c.sql_type(f))
        elif _base(t) != c.type:
            wrong.append(f"{c.name} is {t}, not {c.type}")
    for d in DERIVED:
        t = have.get(d.name)
        if t is None:
            store._execute(f"ALTER TABLE {quote(db)}.{quote(table)} ADD COLUMN {quote(d.name)} {d.sql_type(f)} "
                           f"MATERIALIZED {d.expression}")
        elif _base(t) != d.type:
            wrong.append(f"{d.name} is {t}, not {d.type}")
    if wrong:
        raise SchemaError(f"table {db}.{table} has columns of other types ({'; '.join(wrong)}); "
                          "point the store at another table or database")
    # Roll-ups whose table and view are there hold what they should; a new one (or one whose
    # view is missing: a backfill interrupted) is filled before its view exists (nothing is
    # inserted meanwhile: open runs before any insert), from the coarsest filled roll-up
    # that keeps its keys (schema.backfill_source), else from the raw rows. Finest first,
    # the widest family first at each resolution, so new tables read the coarsest source.
    order = sorted(((fam, r) for fam in FAMILIES for r in fam.rollups), key=lambda fr: (fr[1].seconds, -len(fr[0].keys)))
    filled = [(fam, r) for fam, r in order if fam.table(table, r) in tables and f"{fam.table(table, r)}_mv" in tables]
    views = _view_sources(store) if f.cascading_views else {}
    for family, r in order:
        name = family.table(table, r)
        fresh = name not in tables
        store._execute(rollup_table_sql(db, table, r, f, store.retention, family))
        if fresh or f"{name}_mv" not in tables:
            if not fresh:
                store._execute(f"TRUNCATE TABLE {quote(db)}.{quote(name)}")
            # the views fed from this table would count the backfill a second time into
            # theirs (already right): dropped for it, created again below (they come later)
            for view in [v for v, src in views.items() if src == name]:
                store._execute(f"DROP TABLE {quote(db)}.{quote(view)}")
                del views[view]
            source = backfill_source(family, r, filled)
            store._execute(f"INSERT INTO {quote(db)}.{quote(name)} {rollup_backfill_sql(db, table, r, family, filled)}")
            filled.append((family, r))
            if not fresh or _count(store, table):
                log.info("flow store %s.%s: roll-up backfilled from %s", db, name,
                         source[0].table(table, source[1]) if source else "the raw table")
        elif f"{name}_mv" in views and views[f"{name}_mv"] != _wanted_source(table, r, f, family):
            # fed from another table by an earlier flowscope (the sums are the same either
            # way; the new source is cheaper): replaced between inserts, nothing missed
            store._execute(f"DROP TABLE {quote(db)}.{quote(name + '_mv')}")
            log.info("flow store %s.%s: its view now reads %s", db, name, _wanted_source(table, r, f, family))
        store._execute(rollup_view_sql(db, table, r, f, family))
    if f.ttl and store.retention_given:
        _retention(store)


def _part_format(store: FlowStore) -> None:
    """A raw table created before it had its part-format setting gets it (new parts only)."""
    wanted = f"min_rows_for_wide_part = {RAW_WIDE_PART_ROWS}"
    engine = _engine_full(store, store.table)
    if engine and wanted not in engine:
        store._execute(f"ALTER TABLE {quote(store.database)}.{quote(store.table)} MODIFY SETTING {wanted}")
        log.info("flow store %s.%s: parts below %d rows written Compact", store.database, store.table,
                 RAW_WIDE_PART_ROWS)


_FROM = re.compile(r"\bFROM\s+`?\w+`?\.`?(\w+)`?")


def _view_sources(store: FlowStore) -> dict[str, str]:
    """Each materialized view of the database and the table it reads."""
    rows = store._select(f"SELECT name, create_table_query FROM system.tables WHERE database = '{store.database}' "
                         "AND engine = 'MaterializedView'")
    out = {}
    for name, sql in rows:
        m = _FROM.search(str(sql))
        if m:
            out[str(name)] = m.group(1)
    return out


def _wanted_source(table: str, rollup: Rollup, features: Features, family: Family) -> str:
    source = rollup_source(rollup, features, family)
    return table if source is None else source[0].table(table, source[1])


def _base(t: str) -> str:
    m = re.fullmatch(r"LowCardinality\((.*)\)", t)
    return m.group(1) if m else t


def _retention(store: FlowStore) -> None:
    assert store.features is not None
    db = store.database
    wanted = {store.table: ("timeInserted", store.retention.raw)}
    for family in FAMILIES:
        for r in family.rollups:
            wanted[family.table(store.table, r)] = (family.ttl_column, store.retention.for_table(r.seconds))
    rows = store._select(f"SELECT name, engine_full FROM system.tables WHERE database = '{db}'")
    engines = {str(n): str(e) for n, e in rows}
    for name, (col, seconds) in wanted.items():
        engine = engines.get(name, "")
        m = re.search(r"TTL .*?(?:INTERVAL (\d+) SECOND|toIntervalSecond\((\d+)\))", engine)
        have = int(m.group(1) or m.group(2)) if m else 0
        if have == seconds:
            continue
        target = f"{quote(db)}.{quote(name)}"
        if seconds:
            store._execute(f"ALTER TABLE {target} MODIFY TTL {col} + INTERVAL {int(seconds)} SECOND")
        elif m:
            store._execute(f"ALTER TABLE {target} REMOVE TTL")
        log.info("flow store %s: retention %ss", name, seconds or "unlimited")
