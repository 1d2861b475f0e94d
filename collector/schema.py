"""The flow store's schema, defined once: the raw table, its derived columns, the roll-ups,
the dimensions queries group and filter by, and the DDL for each server generation.

Everything that knows a column name reads it from here: the row conversion
(:mod:`flowscope.collector.rows`), the backends, the migrations, the query layer
(:mod:`flowscope.collector.query`), the filter language (:mod:`flowscope.collector.filter`),
the CLI and the dashboards. As in akvorado, one definition drives the table, the
materialized views into the roll-ups and the consoles' dimensions.

*Columns.* :data:`COLUMNS` has one column per element of the aggregated record, in
:func:`flowscope.ipfix.antrea.aggregator_fields` order, typed from the IE registry. A new
element added to that field list (and to the registry's CSV) becomes a column with no
edit here; the migrations add missing columns to an existing table in place. IPv4 and
IPv6 share one table: each family-specific address pair folds into one String column
(``sourceIP``, ``destinationIP``, ``destinationClusterIP``, ``destinationServiceIP``,
``proxySnatIP``, ``originalExporterIP``). Added
by the store: ``timeInserted``, ``correlation``, ``final``, ``commitId``. Strings that
repeat (namespaces, Pods, Nodes, Services, policies, rule names) are ``LowCardinality``
where the server has it (:class:`Features`).

*Derived columns* (:data:`DERIVED`) are computed by ClickHouse on insert
(``MATERIALIZED``), so ingest pays nothing in Python: ``recordThroughput`` and
``reverseRecordThroughput`` (bits/s over the record's interval: the delta octets over
``flowEndSeconds - flowStartSeconds`` of this record, at least 1 s; every record has
them, whoever exported it, where Antrea's own ``throughput`` elements, stored as they
came, are there only in records of an aggregator that computes them), and
``sourcePodWorkload`` / ``destinationPodWorkload`` (the Pod name without the
ReplicaSet/StatefulSet/DaemonSet suffix: ``web-7d4b9c-x2x9k`` is ``web``), and
``connectionHash`` (the 5-tuple hashed, so distinct connections are counted over 8 bytes a row).

*Roll-ups* (:data:`ROLLUPS`): SummingMergeTree tables at 1 minute, 10 minutes and 1 hour, fed by
materialized views, keyed by the bucket start (``timeBucket``, epoch seconds, timezone
free) and :data:`ROLLUP_KEYS` (the dimensions the dashboards group by), carrying the four
delta counters, ``records`` (how many flow records fell in the key and bucket) and ``ended``
(how many of them ended their connection: flowEndReason end of flow, forced end or lack of
resources, or the aggregator's final record). Each
:class:`Family` of :data:`FAMILIES` keeps its own keys at the resolutions it names: the
main one every dimension at 1 minute and 1 hour, the narrow ones (no Pods; one side's
Pods) at 10 minutes and 1 hour, where they fold ten to a hundred times more than the
main one (whose 1-minute rows are nearly one per flow). The query layer reads each part of
a range from the coarsest resolution that holds it whole, of the narrowest family whose
keys hold every column the question touches: then its answer is exactly the raw
table's. A new roll-up table is backfilled from the coarsest one already filled that keeps
its keys (:func:`backfill_source`), else from the raw rows.

*Time.* A record belongs to the time of ``flowEndSeconds`` (when its deltas were counted).
Retention (TTL) counts from when the store received a row (``timeInserted``; a roll-up
row from the latest insert that touched it, ``inserted``), so a record from a skewed clock
or a replay of old records is kept like any other rather than dropped on arrival.

*Server generations* (:class:`Features`, from the server's version): ClickHouse 18.16
(Debian's server) lacks ``TTL`` (19.6) and ``LowCardinality`` outside an experimental
setting (19.x); there retention is left to ``ALTER TABLE ... DROP PARTITION`` and repeated
strings are plain ``String``. 18.16 also does not fire a materialized view on rows another
view inserted, so there every roll-up is fed from the raw insert; where views cascade
(:func:`rollup_source`), a family's coarser tables are fed from its finer one and the
finest tables of the families whose keys the main one holds (``ns``, ``src``, ``dst``) from
the main family's 1-minute rows, so only three views group the raw rows of an insert. chDB
is a current engine and gets all of it.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from flowscope.ipfix import DataType, default_registry
from flowscope.ipfix.antrea import DENY_ACTIONS, ENDED_REASONS, aggregator_fields

__all__ = [
    "COLUMNS",
    "COLUMN_NAMES",
    "CONN_GRANULARITY",
    "CONNECTION_STATES",
    "FAMILIES",
    "MAIN",
    "DERIVED",
    "DIMENSIONS",
    "ROLLUPS",
    "ROLLUP_KEYS",
    "ROLLUP_COUNTS",
    "ROLLUP_SUMS",
    "RECORD_COLUMNS",
    "RAW_SORT_KEY",
    "SCHEMA_VERSION",
    "Column",
    "Dimension",
    "Family",
    "Features",
    "Retention",
    "Rollup",
    "State",
    "backfill_source",
    "check_identifier",
    "features_for_version",
    "quote",
    "raw_table_settings",
    "raw_table_sql",
    "rollup_table_sql",
    "rollup_tables",
    "rollup_view_sql",
    "rollup_backfill_sql",
    "rollup_select_sql",
    "rollup_source",
]

#: The schema version this code writes (see :mod:`flowscope.collector.migrations`).
SCHEMA_VERSION: Final = 5

#: The raw table's sort key. It starts with the minute of ``flowEndSeconds``: a range to
#: the second (a page of records, the edges of a range the roll-ups answer the rest of)
#: reads only the granules of the minutes it touches, not whole hours (version 4's key
#: started with the hour: a quarter of an hour to the second read two hours' rows).
RAW_SORT_KEY: Final = "toStartOfMinute(flowEndSeconds), sourcePodNamespace, destinationPodNamespace, flowEndSeconds"

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SchemaNameError(ValueError):
    """A database or table name that is not a plain identifier."""


def check_identifier(value: str, field: str) -> str:
    """A database or table name: letters, digits and _, not starting with a digit."""
    if not isinstance(value, str) or not _IDENT.match(value):
        raise SchemaNameError(
            f"{field}: {value!r} is not a valid name; use letters, digits and _ (not starting with a digit)")
    return value


def quote(ident: str) -> str:
    """A column or table name in backquotes (every name here is checked or a constant)."""
    return f"`{ident}`"


# --------------------------------------------------------------------------- features

@dataclass(frozen=True, slots=True)
class Features:
    """What the server can do, told by its version."""

    version: tuple[int, ...]
    low_cardinality: bool  # LowCardinality(String) without experimental settings (19.x)
    ttl: bool  # table TTL expressions (19.6)
    cascading_views: bool  # a materialized view fires on rows another view inserted (not in 18.16)
    compact_parts: bool = False  # MergeTree's Compact part format and min_rows_for_wide_part (20.3)

    @property
    def label(self) -> str:
        return ".".join(map(str, self.version))


def features_for_version(version: str | tuple[int, ...]) -> Features:
    """Features of a server from its version (``"18.16.1"``, ``"25.8.2.1"``)."""
    if isinstance(version, str):
        parts = tuple(int(p) for p in re.findall(r"\d+", version)[:4])
    else:
        parts = tuple(version)
    if not parts:
        raise ValueError(f"server version {version!r} has no number")
    return Features(parts, low_cardinality=parts >= (19, 3), ttl=parts >= (19, 6), cascading_views=parts >= (20, 1),
                    compact_parts=parts >= (20, 3))


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each table keeps rows, in seconds (0: forever). Defaults like akvorado's:
    the raw table shortest, the 1-hour roll-up longest."""

    raw: int = 7 * 86400
    minute: int = 30 * 86400
    hour: int = 365 * 86400

    def for_table(self, seconds: int) -> int:
        """A table's retention by its resolution: the 10-minute roll-ups keep the minute's
        (they exist to answer the edges of ranges the 1-minute ones answer too)."""
        return {0: self.raw, 60: self.minute, 600: self.minute, 3600: self.hour}[seconds]


# --------------------------------------------------------------------------- columns

@dataclass(frozen=True, slots=True)
class Column:
    """A table column and the record element(s) it holds (IPv4 name, IPv6 name for folded addresses)."""

    name: str
    type: str  # the base type: UInt8..UInt64, DateTime, String, Float64
    elements: tuple[str, ...]
    repeats: bool = False  # a repeating string: LowCardinality where the server has it

    @property
    def is_int(self) -> bool:
        return self.type.startswith("UInt") or self.type == "DateTime"

    @property
    def maximum(self) -> int:
        return (1 << _BITS[self.type]) - 1

    @property
    def width(self) -> int:
        """Bytes a value of an integer column takes (little-endian, unsigned); 0 for text."""
        return _BITS[self.type] // 8 if self.is_int else 0

    def sql_type(self, features: Features) -> str:
        if self.repeats and features.low_cardinality:
            return f"LowCardinality({self.type})"
        return self.type


_BITS: Final = {"UInt8": 8, "UInt16": 16, "UInt32": 32, "UInt64": 64, "DateTime": 32}
_TYPES: Final = {
    DataType.unsigned8: "UInt8", DataType.unsigned16: "UInt16", DataType.unsigned32: "UInt32",
    DataType.unsigned64: "UInt64", DataType.dateTimeSeconds: "DateTime", DataType.string: "String",
    DataType.ipv4Address: "String", DataType.ipv6Address: "String",
}
# Address elements of both families folded into one column.
_FOLDED: Final = {
    "sourceIPv4Address": ("sourceIP", "sourceIPv6Address"),
    "destinationIPv4Address": ("destinationIP", "destinationIPv6Address"),
    "destinationClusterIPv4": ("destinationClusterIP", "destinationClusterIPv6"),
    "destinationServiceIPv4": ("destinationServiceIP", "destinationServiceIPv6"),
    "proxySnatIPv4": ("proxySnatIP", "proxySnatIPv6"),
    "originalExporterIPv4Address": ("originalExporterIP", "originalExporterIPv6Address"),
}
# Strings that repeat across rows (everything Antrea names, except free-form text).
_NOT_REPEATING: Final = frozenset()


def _build_columns() -> tuple[Column, ...]:
    reg = default_registry()
    cols = [Column("timeInserted", "DateTime", ())]
    for name in aggregator_fields(4):
        if name in _FOLDED:
            col, v6 = _FOLDED[name]
            cols.append(Column(col, "String", (name, v6)))
        else:
            t = _TYPES.get(reg.get(name).data_type, "String")
            cols.append(Column(name, t, (name,), repeats=t == "String" and name not in _NOT_REPEATING))
    cols += [Column("correlation", "String", (), repeats=True), Column("final", "UInt8", ()),
             Column("commitId", "UInt64", ())]
    return tuple(cols)


#: The stored columns, in insert order.
COLUMNS: Final[tuple[Column, ...]] = _build_columns()
COLUMN_NAMES: Final[tuple[str, ...]] = tuple(c.name for c in COLUMNS)
#: The columns that hold record elements (everything but what the store adds).
RECORD_COLUMNS: Final[tuple[Column, ...]] = tuple(c for c in COLUMNS if c.elements)
_BY_NAME: Final = {c.name: c for c in COLUMNS}

# A Pod name's controller suffix: -<replicaset hash>-<5 chars> (Deployment), -<5 chars>
# (DaemonSet, Job) or -<ordinal> (StatefulSet).
_WORKLOAD_RE: Final = r"(-[a-z0-9]{6,10})?-[a-z0-9]{5}$|-[0-9]+$"


def _throughput(octets: str) -> str:
    return (f"toFloat64({octets}) * 8 / greatest(toFloat64(toUInt32(flowEndSeconds)) - "
            "toFloat64(toUInt32(flowStartSeconds)), 1)")


@dataclass(frozen=True, slots=True)
class Derived:
    """A column ClickHouse computes on insert from stored ones."""

    name: str
    type: str
    expression: str
    repeats: bool = False

    def sql_type(self, features: Features) -> str:
        if self.repeats and features.low_cardinality:
            return f"LowCardinality({self.type})"
        return self.type


#: Derived columns (MATERIALIZED: computed on insert, read by name).
DERIVED: Final[tuple[Derived, ...]] = (
    Derived("recordThroughput", "Float64", _throughput("octetDeltaCount")),
    Derived("reverseRecordThroughput", "Float64", _throughput("reverseOctetDeltaCount")),
    Derived("sourcePodWorkload", "String", f"replaceRegexpOne(sourcePodName, '{_WORKLOAD_RE}', '')", True),
    Derived("destinationPodWorkload", "String", f"replaceRegexpOne(destinationPodName, '{_WORKLOAD_RE}', '')", True),
    # the connection (5-tuple) as one 64-bit hash: distinct connections counted over 8 bytes a row
    Derived("connectionHash", "UInt64", "cityHash64(sourceIP, destinationIP, sourceTransportPort, "
            "destinationTransportPort, protocolIdentifier)"),
)
DERIVED_NAMES: Final = tuple(d.name for d in DERIVED)


def column_type(name: str) -> str:
    """The base type of a stored or derived column."""
    if name in _BY_NAME:
        return _BY_NAME[name].type
    for d in DERIVED:
        if d.name == name:
            return d.type
    raise KeyError(name)


# --------------------------------------------------------------------------- roll-ups

@dataclass(frozen=True, slots=True)
class Rollup:
    """A summing table at one resolution."""

    suffix: str  # the table is <table>_<suffix>
    seconds: int
    partition: str  # partition expression over timeBucket


ROLLUPS: Final[tuple[Rollup, ...]] = (
    Rollup("1m", 60, "toYYYYMMDD(toDateTime(timeBucket))"),
    Rollup("10m", 600, "toYYYYMMDD(toDateTime(timeBucket))"),
    Rollup("1h", 3600, "toYYYYMM(toDateTime(timeBucket))"),
)

#: The dimensions a roll-up keeps (its ORDER BY after timeBucket): the columns the
#: dashboards group by and filter on.
ROLLUP_KEYS: Final[tuple[str, ...]] = (
    "sourcePodNamespace", "destinationPodNamespace", "sourcePodName", "destinationPodName",
    "sourcePodWorkload", "destinationPodWorkload", "sourceNodeName", "destinationNodeName",
    "destinationServicePortName", "flowType", "protocolIdentifier",
    "ingressNetworkPolicyNamespace", "ingressNetworkPolicyName", "ingressNetworkPolicyRuleAction",
    "egressNetworkPolicyNamespace", "egressNetworkPolicyName", "egressNetworkPolicyRuleAction",
)
#: What a roll-up sums: the delta counters, and ``records`` (a count of flow records).
ROLLUP_SUMS: Final[tuple[str, ...]] = (
    "packetDeltaCount", "octetDeltaCount", "reversePacketDeltaCount", "reverseOctetDeltaCount",
)
#: Counts a roll-up keeps: records, and records that ended their connection.
ROLLUP_COUNTS: Final[tuple[str, ...]] = ("records", "ended")


@dataclass(frozen=True, slots=True)
class Family:
    """Roll-up tables keeping one set of keys, one table per resolution of :data:`ROLLUPS`.

    ``sums`` families are SummingMergeTree tables of the delta counters and counts;
    the ``connections`` family is an AggregatingMergeTree of distinct-count states
    (:data:`CONNECTION_STATES`), merged at query time (``uniqMerge``,
    ``uniqCombinedMerge``): both functions' states hold the same content whichever order
    the values arrive in, so the merged states of the buckets answer exactly what the
    function over the raw rows does (the tests compare them on both servers)."""

    name: str  # "" for the main family (tables <table>_1m, <table>_1h), else <table>_<name>_1m ...
    keys: tuple[str, ...]
    kind: str = "sums"  # "sums" or "connections"
    doc: str = ""
    seconds: tuple[int, ...] = ()  # the resolutions it has tables at (empty: every one of ROLLUPS)

    @property
    def rollups(self) -> tuple[Rollup, ...]:
        """The resolutions this family keeps, finest first."""
        return tuple(r for r in ROLLUPS if not self.seconds or r.seconds in self.seconds)

    def table(self, table: str, rollup: Rollup) -> str:
        return f"{table}_{self.name + '_' if self.name else ''}{rollup.suffix}"

    @property
    def ttl_column(self) -> str:
        """What retention counts from: the latest insert into a row of sums (``inserted``);
        for connection states the bucket's time (an AggregatingMergeTree row has no column
        both servers would merge to the latest insert: 18.16 lacks SimpleAggregateFunction)."""
        return "inserted" if self.kind == "sums" else "toDateTime(timeBucket)"


@dataclass(frozen=True, slots=True)
class State:
    """A distinct count a ``connections`` family keeps per bucket, as an aggregate state:
    ``function`` (``uniq``, ``uniqCombined``) of ``value`` (a UInt64 hash) over the rows
    where ``condition`` holds. The query layer computes the same expression from rows
    where no roll-up answers, so either way the answer is the same."""

    name: str
    function: str
    value: str
    condition: str = ""

    def of_rows(self) -> str:
        """The state computed from raw (or summed roll-up) rows."""
        if self.condition:
            return f"{self.function}StateIf({self.value}, {self.condition})"
        return f"{self.function}State({self.value})"

    def merged(self, column: str) -> str:
        """The states of a column merged into one state (a roll-up re-bucketed, a segment)."""
        return f"{self.function}MergeState({column})"

    @property
    def sql_type(self) -> str:
        return f"AggregateFunction({self.function}, UInt64)"


def _deny(column: str) -> str:
    return f"{column} IN ({', '.join(str(a) for a in sorted(DENY_ACTIONS))})"


def _named(column: str) -> str:
    return f"{column} != ''"


#: What a ``connections`` family keeps. Connections (the 5-tuple's ``connectionHash``),
#: those that ended and those a rule denied, by ``uniqCombined``: exact for small sets,
#: HyperLogLog past some thousands (within about 1%), and a state of at most ~100 kB,
#: so a day's 24 hourly states merge in milliseconds; the cluster's distinct Pods, Nodes,
#: Services and namespaces by ``uniq`` (exact to 65,536) of their names' hash.
CONNECTION_STATES: Final[tuple[State, ...]] = (
    State("connections", "uniqCombined", "connectionHash"),
    State("ended", "uniqCombined", "connectionHash",
          f"flowEndReason IN ({', '.join(str(r) for r in sorted(ENDED_REASONS))}) OR final = 1"),
    State("denied", "uniqCombined", "connectionHash",
          f"{_deny('ingressNetworkPolicyRuleAction')} OR {_deny('egressNetworkPolicyRuleAction')}"),
    State("srcPods", "uniq", "cityHash64(sourcePodNamespace, sourcePodName)", _named("sourcePodName")),
    State("dstPods", "uniq", "cityHash64(destinationPodNamespace, destinationPodName)", _named("destinationPodName")),
    State("srcNodes", "uniq", "cityHash64(sourceNodeName)", _named("sourceNodeName")),
    State("dstNodes", "uniq", "cityHash64(destinationNodeName)", _named("destinationNodeName")),
    State("services", "uniq", "cityHash64(destinationServicePortName)", _named("destinationServicePortName")),
    # namespaces: both ends' states merged together count the union
    State("srcNamespaces", "uniq", "cityHash64(sourcePodNamespace)", _named("sourcePodNamespace")),
    State("dstNamespaces", "uniq", "cityHash64(destinationPodNamespace)", _named("destinationPodNamespace")),
)

_ACTIONS: Final = ("ingressNetworkPolicyRuleAction", "egressNetworkPolicyRuleAction")
_POLICIES: Final = ("ingressNetworkPolicyNamespace", "ingressNetworkPolicyName", "ingressNetworkPolicyRuleAction",
                    "egressNetworkPolicyNamespace", "egressNetworkPolicyName", "egressNetworkPolicyRuleAction")

#: The roll-up families, in the order the query layer prefers them when several answer:
#: the narrowest first. A Pod talks to a few peers, each pair's flows land in a row of
#: their own at 1-minute resolution (about 5,700 of the 7,000 flows a minute of a
#: 5,000-Pod cluster), and the main family folds little: the families without one side's
#: Pods (or without Pods) fold ten to a hundred times more, and answer the questions that
#: do not need them. They keep 10-minute and 1-hour tables (the edges of a range below
#: ten minutes come from the main family's 1-minute table).
FAMILIES: Final[tuple[Family, ...]] = (
    # Everything but Pods, workloads and addresses: namespaces, Nodes, Services, flow
    # types, protocols, policies and their actions (the Overview's totals, top namespaces,
    # Services, Nodes, policies; the Network Policy page; Node throughput).
    Family("ns", ("sourcePodNamespace", "destinationPodNamespace", "sourceNodeName", "destinationNodeName",
                  "destinationServicePortName", "flowType", "protocolIdentifier") + _POLICIES,
           doc="namespaces, Nodes, Services, flow types, protocols, policies: no Pods", seconds=(600, 3600)),
    # The source Pods (top talkers, their throughput), by the Service they reach (the
    # Pod-to-Service sankey), flow type and rule action.
    Family("src", ("sourcePodNamespace", "sourcePodName", "sourcePodWorkload", "sourceNodeName",
                   "destinationServicePortName", "flowType") + _ACTIONS,
           doc="source Pods, workloads and Nodes by destination Service, flow type and rule action",
           seconds=(600, 3600)),
    # The destination Pods and Services, by flow type and rule action.
    Family("dst", ("destinationPodNamespace", "destinationPodName", "destinationPodWorkload", "destinationNodeName",
                   "destinationServicePortName", "flowType") + _ACTIONS,
           doc="destination Pods, workloads, Nodes and Services by flow type and rule action", seconds=(600, 3600)),
    Family("", ROLLUP_KEYS, doc="every dimension the dashboards group by, no addresses", seconds=(60, 3600)),
    # The Pod-to-Pod, Pod-to-Service and Pod-to-External pages, and the sankeys' address
    # tooltips: the Pods with their addresses (an external end is only its address).
    # flowType leads the order, so a page's flow type reads only its own granules.
    Family("addr", ("flowType", "destinationServicePortName", "sourcePodNamespace", "sourcePodName",
                    "destinationPodNamespace", "destinationPodName", "sourceIP", "destinationIP"),
           doc="Pods and their IP addresses, Services, flow types", seconds=(60, 3600)),
    # The Overview's connections (active, ended, denied) and distinct Pods, Nodes,
    # Services and namespaces over the whole cluster.
    Family("conn", (), kind="connections", doc="distinct connections (ended, denied), Pods, Nodes, Services"),
)
MAIN: Final[Family] = next(f for f in FAMILIES if f.name == "")


def rollup_tables(table: str) -> tuple[str, ...]:
    """Every roll-up table's name."""
    return tuple(f.table(table, r) for f in FAMILIES for r in f.rollups)


def _key_type(name: str, features: Features) -> str:
    if name in _BY_NAME:
        return _BY_NAME[name].sql_type(features)
    return next(d.sql_type(features) for d in DERIVED if d.name == name)


def _ttl(column: str, seconds: int, features: Features) -> str:
    if not features.ttl or seconds <= 0:
        return ""
    return f" TTL {column} + INTERVAL {int(seconds)} SECOND"


def raw_table_sql(database: str, table: str, features: Features, retention: Retention) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for the raw flows table at :data:`SCHEMA_VERSION`."""
    check_identifier(database, "database")
    check_identifier(table, "table")
    cols = [f"{quote(c.name)} {c.sql_type(features)}" for c in COLUMNS]
    cols += [f"{quote(d.name)} {d.sql_type(features)} MATERIALIZED {d.expression}" for d in DERIVED]
    body = ",\n    ".join(cols)
    return (f"CREATE TABLE IF NOT EXISTS {quote(database)}.{quote(table)} (\n    {body}\n) ENGINE = MergeTree() "
            "PARTITION BY toYYYYMMDD(flowEndSeconds) "
            f"ORDER BY ({RAW_SORT_KEY})"
            + _ttl("timeInserted", retention.raw, features) + raw_table_settings(features))


#: Parts of the raw table with fewer rows than this are written in MergeTree's Compact
#: format (every column in one file) rather than Wide (two files a column, 80 columns):
#: an insert block (the collector's --batch-rows, 200,000; the sink's chunks, 100,000)
#: costs about a third less to write (docs/clickhouse.md), and the parts that merges
#: make past it are Wide as before, where queries read a few columns of many rows.
RAW_WIDE_PART_ROWS: Final = 1 << 20


def raw_table_settings(features: Features) -> str:
    """The raw table's ``SETTINGS`` clause (empty where the server has no part formats)."""
    return f" SETTINGS min_rows_for_wide_part = {RAW_WIDE_PART_ROWS}" if features.compact_parts else ""


#: Rows per granule of the connection-state tables. A state is large (a 1-minute bucket's
#: holds its thousands of connections, an hour's a 80 kB sketch), so ClickHouse's default
#: granules (up to 10 MB) hold a hundred buckets and a range's edge of a few minutes read
#: (and decoded) them all; at 8 rows it decodes at most 7 buckets more than it needs.
CONN_GRANULARITY: Final = 8


def rollup_table_sql(database: str, table: str, rollup: Rollup, features: Features, retention: Retention,
                     family: Family = MAIN, name: str | None = None) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for one roll-up table (``name``: another table of
    its layout, as a migration's copy)."""
    cols = ["`timeBucket` UInt32"]
    cols += [f"{quote(k)} {_key_type(k, features)}" for k in family.keys]
    if family.kind == "connections":
        cols += [f"{quote(st.name)} {st.sql_type}" for st in CONNECTION_STATES]
    else:
        cols += [f"{quote(s)} UInt64" for s in ROLLUP_SUMS + ROLLUP_COUNTS] + ["`inserted` DateTime"]
    body = ",\n    ".join(cols)
    keys = ", ".join(("timeBucket",) + family.keys)
    if family.kind == "connections":
        engine = "AggregatingMergeTree()"
    else:
        engine = f"SummingMergeTree(({', '.join(ROLLUP_SUMS + ROLLUP_COUNTS)}))"
    settings = f" SETTINGS index_granularity = {CONN_GRANULARITY}" if family.kind == "connections" else ""
    return (f"CREATE TABLE IF NOT EXISTS {quote(database)}.{quote(name or family.table(table, rollup))} (\n    {body}\n) "
            f"ENGINE = {engine} PARTITION BY {rollup.partition} ORDER BY ({keys})"
            + _ttl(family.ttl_column, retention.for_table(rollup.seconds), features) + settings)


def rollup_source(rollup: Rollup, features: Features, family: Family | None = None
                  ) -> tuple[Family, Rollup] | None:
    """The roll-up a view is fed from (None: the raw table). Where views cascade, a
    family's coarser table sums its next finer one's rows (the 1-hour roll-up the
    10-minute one's), and the finest table of a sums family whose keys the main family
    holds sums the main family's finest rows (``flows_ns_10m`` from ``flows_1m``): an
    insert is grouped over its raw rows by the main, address and connection families
    only, every other view over the rows those produce (the views' cost measured in
    docs/clickhouse.md's ingest section).
    18.16 does not fire a view on another view's inserts, so there every roll-up reads
    the raw insert."""
    family = family or MAIN
    if not features.cascading_views:
        return None
    kept = family.rollups
    i = kept.index(rollup)
    if i > 0:
        return family, kept[i - 1]
    if family == MAIN or family.kind != "sums" or not set(family.keys) <= set(MAIN.keys):
        return None
    finest = MAIN.rollups[0]
    return (MAIN, finest) if rollup.seconds % finest.seconds == 0 else None


def rollup_select_sql(database: str, table: str, rollup: Rollup, features: Features | None = None,
                      family: Family = MAIN) -> str:
    """The SELECT that turns rows of the raw table (or, given ``features`` where views
    cascade, of the finer roll-up) into roll-up rows: the view's body, and the backfill
    (no ``features``: from the raw table)."""
    keys = ", ".join(quote(k) for k in family.keys)
    keyed = f"{keys}, " if keys else ""
    group = f"timeBucket, {keys}" if keys else "timeBucket"
    source = None if features is None else rollup_source(rollup, features, family)
    if source is None:
        bucket = f"intDiv(toUInt32(flowEndSeconds), {rollup.seconds}) * {rollup.seconds}"
        if family.kind == "connections":
            aggs = ", ".join(f"{st.of_rows()} AS {quote(st.name)}" for st in CONNECTION_STATES)
        else:
            ended = ", ".join(str(r) for r in sorted(ENDED_REASONS))
            aggs = (", ".join(f"sum({quote(s)}) AS {quote(s)}" for s in ROLLUP_SUMS) + ", toUInt64(count()) AS records, "
                    f"toUInt64(countIf(flowEndReason IN ({ended}) OR final = 1)) AS ended")
        inserted = ", max(timeInserted) AS inserted" if family.kind == "sums" else ""
        return (f"SELECT toUInt32({bucket}) AS timeBucket, {keyed}{aggs}{inserted} "
                f"FROM {quote(database)}.{quote(table)} GROUP BY {group}")
    if family.kind == "connections":
        aggs = ", ".join(f"{st.merged(quote(st.name))} AS {quote(st.name)}" for st in CONNECTION_STATES)
    else:
        aggs = ", ".join(f"sum({quote(s)}) AS {quote(s)}" for s in ROLLUP_SUMS + ROLLUP_COUNTS)
    bucket = f"intDiv(timeBucket, {rollup.seconds}) * {rollup.seconds}"
    inserted = ", max(inserted) AS inserted" if family.kind == "sums" else ""
    return (f"SELECT toUInt32({bucket}) AS timeBucket, {keyed}{aggs}{inserted} "
            f"FROM {quote(database)}.{quote(source[0].table(table, source[1]))} GROUP BY {group}")


def rollup_view_sql(database: str, table: str, rollup: Rollup, features: Features, family: Family = MAIN) -> str:
    """The materialized view feeding one roll-up from every insert into the raw table (the
    finest roll-up) or into the next finer roll-up (the views cascade)."""
    name = family.table(table, rollup)
    return (f"CREATE MATERIALIZED VIEW IF NOT EXISTS {quote(database)}.{quote(name + '_mv')} "
            f"TO {quote(database)}.{quote(name)} AS {rollup_select_sql(database, table, rollup, features, family)}")


# --------------------------------------------------------------------------- backfill

def backfill_source(family: Family, rollup: Rollup, filled: Collection[tuple[Family, Rollup]]
                    ) -> tuple[Family, Rollup] | None:
    """Where a new roll-up table is backfilled from: of the roll-up tables already filled
    (``filled``), one of the same kind whose keys hold every key of ``family`` and whose
    resolution divides ``rollup``'s, the coarsest (it reads least and, with the longer
    retention of coarser tables, holds the longest history: the buckets the raw table's
    retention removed are still there); None: the raw table. Its sums (or states) summed
    (merged) into ``rollup``'s buckets are exactly what the raw rows would give."""
    best: tuple[Family, Rollup] | None = None
    for f, r in filled:
        if f.kind != family.kind or not set(family.keys) <= set(f.keys) or rollup.seconds % r.seconds:
            continue
        if (f, r) == (family, rollup):
            continue
        if best is None or r.seconds > best[1].seconds or (r.seconds == best[1].seconds and len(f.keys) < len(best[0].keys)):
            best = (f, r)
    return best


def rollup_backfill_sql(database: str, table: str, rollup: Rollup, family: Family,
                        filled: Collection[tuple[Family, Rollup]]) -> str:
    """The SELECT that fills a new roll-up table from what the store holds: from the table
    :func:`backfill_source` names, else from the raw rows."""
    found = backfill_source(family, rollup, filled)
    if found is None:
        return rollup_select_sql(database, table, rollup, None, family)
    f, r = found
    keys = ", ".join(quote(k) for k in family.keys)
    keyed = f"{keys}, " if keys else ""
    group = f"timeBucket, {keys}" if keys else "timeBucket"
    if family.kind == "connections":
        aggs = ", ".join(f"{st.merged(quote(st.name))} AS {quote(st.name)}" for st in CONNECTION_STATES)
        inserted = ""
    else:
        aggs = ", ".join(f"sum({quote(x)}) AS {quote(x)}" for x in ROLLUP_SUMS + ROLLUP_COUNTS)
        inserted = ", max(inserted) AS inserted"
    bucket = f"intDiv(timeBucket, {rollup.seconds}) * {rollup.seconds}"
    return (f"SELECT toUInt32({bucket}) AS timeBucket, {keyed}{aggs}{inserted} "
            f"FROM {quote(database)}.{quote(f.table(table, r))} GROUP BY {group}")


# --------------------------------------------------------------------------- dimensions

@dataclass(frozen=True, slots=True)
class Dimension:
    """Something queries group by: a name, the SQL that makes its key, the columns it reads."""

    name: str
    sql: str
    columns: tuple[str, ...]
    doc: str

    @property
    def name_column(self) -> str | None:
        """The column holding the name of a ``namespace/name`` key (see :func:`_pair`), else None."""
        if len(self.columns) == 2 and self.sql == _pair(*self.columns):
            return self.columns[1]
        return None

    def names_of(self, keys: Collection[str]) -> set[str]:
        """Every value :attr:`name_column` can hold in a row whose key is one of ``keys``:
        the key itself (no namespace) and what follows each ``/`` in it (whichever one
        joined the namespace to the name; "" for the empty key). A condition on them is
        implied by the key's, and is on one column, not on text built per row."""
        out = set()
        for k in keys:
            out.add(k)
            out.update(k[i + 1:] for i, c in enumerate(k) if c == "/")
        return out


def _pair(ns: str, name: str) -> str:
    # "namespace/name", or the name alone for cluster-scoped objects, "" when there is none
    return f"if({name} = '', '', if({ns} = '', {name}, concat({ns}, '/', {name})))"


def _dim(name: str, sql: str, columns: tuple[str, ...], doc: str) -> Dimension:
    return Dimension(name, sql, columns, doc)


_IN_POLICY = ("ingressNetworkPolicyNamespace", "ingressNetworkPolicyName")
_EG_POLICY = ("egressNetworkPolicyNamespace", "egressNetworkPolicyName")

#: Dimensions by name (the ``group`` of a query). Keys are text; empty means "none"
#: (an external end, host traffic, no policy).
DIMENSIONS: Final[dict[str, Dimension]] = {d.name: d for d in (
    _dim("srcNamespace", "sourcePodNamespace", ("sourcePodNamespace",), "source Pod's namespace"),
    _dim("dstNamespace", "destinationPodNamespace", ("destinationPodNamespace",), "destination Pod's namespace"),
    _dim("srcPod", _pair("sourcePodNamespace", "sourcePodName"), ("sourcePodNamespace", "sourcePodName"),
         "source Pod (namespace/name)"),
    _dim("dstPod", _pair("destinationPodNamespace", "destinationPodName"),
         ("destinationPodNamespace", "destinationPodName"), "destination Pod (namespace/name)"),
    _dim("srcWorkload", _pair("sourcePodNamespace", "sourcePodWorkload"), ("sourcePodNamespace", "sourcePodWorkload"),
         "source workload (namespace/name)"),
    _dim("dstWorkload", _pair("destinationPodNamespace", "destinationPodWorkload"),
         ("destinationPodNamespace", "destinationPodWorkload"), "destination workload (namespace/name)"),
    _dim("srcNode", "sourceNodeName", ("sourceNodeName",), "source Node"),
    _dim("dstNode", "destinationNodeName", ("destinationNodeName",), "destination Node"),
    _dim("service", "destinationServicePortName", ("destinationServicePortName",), "destination Service port name"),
    _dim("ingressPolicy", _pair(*_IN_POLICY), _IN_POLICY, "ingress network policy (namespace/name)"),
    _dim("egressPolicy", _pair(*_EG_POLICY), _EG_POLICY, "egress network policy (namespace/name)"),
    _dim("policy", f"if(ingressNetworkPolicyName != '', {_pair(*_IN_POLICY)}, {_pair(*_EG_POLICY)})",
         _IN_POLICY + _EG_POLICY, "the ingress policy, else the egress policy"),
    _dim("ingressAction", "toString(ingressNetworkPolicyRuleAction)", ("ingressNetworkPolicyRuleAction",),
         "ingress rule action (Allow, Drop, Reject)"),
    _dim("egressAction", "toString(egressNetworkPolicyRuleAction)", ("egressNetworkPolicyRuleAction",),
         "egress rule action (Allow, Drop, Reject)"),
    _dim("flowType", "toString(flowType)", ("flowType",), "intra-node, inter-node, to-external, from-external"),
    _dim("protocol", "toString(protocolIdentifier)", ("protocolIdentifier",), "IP protocol"),
    _dim("srcIP", "sourceIP", ("sourceIP",), "source IP address"),
    _dim("dstIP", "destinationIP", ("destinationIP",), "destination IP address"),
    _dim("dstPort", "toString(destinationTransportPort)", ("destinationTransportPort",), "destination port"),
)}
