"""The flow store's query layer: the one contract ``flowscope flows``, the collector's HTTP
API and the web dashboards share.

How to call it
--------------
Build a :class:`FlowQuery` (time range, filter expression, group, ranking, paging,
resolution), then call one function with an open store (any object with the
:class:`Backend` shape: :class:`flowscope.collector.store.FlowStore` is one)::

    from flowscope.collector import query
    from flowscope.collector.store import open_store

    store = open_store("chdb:///var/lib/flowscope")
    store.open()
    q = query.FlowQuery(start=now - 900, end=now, filter='namespace = "shop" and action = drop')
    page = query.flows(store, q)                          # FlowPage: raw records, newest first
    top = query.top(store, q.with_(group="srcPod", by="bytes", top=10))   # TopResult (+ "other")
    ts = query.series(store, q.with_(group="dstNamespace", resolution=60))  # Series per group
    links = query.sankey(store, q.with_(group="srcNamespace"), "dstNamespace")  # SankeyLink list
    ov = query.overview(store, q)                          # Overview totals
    names = query.complete(store, "namespace", prefix="sh")  # completion for the filter box

Every function is blocking (call it from a worker thread in async code) and returns
frozen dataclasses of plain values (``to_json()`` gives their JSON form, which is what
the HTTP API sends; :func:`query_from_params` reads a FlowQuery back from URL
parameters, so a dashboard's URL is a shareable query). Bad input raises
:class:`QueryError` (a :class:`ValueError`; :class:`flowscope.collector.filter.FilterError`
is one too) whose message is one line naming the field and what is allowed.

Groups are the dimensions of :data:`flowscope.collector.schema.DIMENSIONS` (``srcPod``,
``dstNamespace``, ``service``, ``policy``, ``flowType`` ...); ``by`` is ``bytes``,
``packets``, ``records`` or ``throughput`` (bits/s over the query's time range). Counters
are the records' deltas summed, both directions unless a function says otherwise.

Which table answers (``FlowQuery.source``, default ``auto``): the range is cut into the
whole buckets of the coarsest roll-up resolution inside it (1 h), then at each side the
whole buckets of the next finer one (10 min, 1 min), then the raw table's seconds before
the first and after the last whole minute; each part is read from the narrowest roll-up
family (:data:`flowscope.collector.schema.FAMILIES`: ``ns`` without Pods, ``src``,
``dst``, the main one, ``addr``) that keeps every column the filter and the group read
and has a table at that resolution (a series' buckets must be whole buckets of it), so
a day on minute boundaries by source Pod is ``flows_1m+flows_src_10m+flows_src_1h``.
Columns no family keeps: the raw table. Each part is aggregated apart and the parts
summed. Either way the answer is the same (the tests compare them on chDB and on 18.16);
:attr:`TopResult.table` and :attr:`Series.table` say which answered. Top N and sankeys
read the table once and rank their groups in the store (the total is the groups' sum, the
top N + 1 are sorted out of them: one row back); series rank theirs too, and a
many-keyed group's series (Pods, addresses) ranks its keys over the whole range first,
then gathers only the top keys' buckets. :func:`overview`'s distinct counts are aggregate
states (see :data:`flowscope.collector.schema.CONNECTION_STATES`), merged from the
``conn`` roll-ups when the question has no filter. Nothing is cached: every answer is read
from the store when asked.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Final, Literal, Protocol

from flowscope.ipfix.antrea import FLOW_TYPES, PROTOCOLS, RULE_ACTIONS

from .filter import Params, parse_filter
from .schema import (
    COLUMN_NAMES, CONNECTION_STATES, DERIVED_NAMES, DIMENSIONS, FAMILIES, ROLLUP_KEYS, ROLLUPS, Family, State,
    column_type, quote,
)

__all__ = [
    "BY",
    "Backend",
    "COMPLETIONS",
    "FlowPage",
    "FlowQuery",
    "Overview",
    "QueryError",
    "SankeyLink",
    "Series",
    "SeriesLine",
    "TopEntry",
    "TopResult",
    "complete",
    "flows",
    "flows_since",
    "overview",
    "query_from_params",
    "sankey",
    "series",
    "top",
]

OTHER: Final = "other"  # the key of the remainder past the top N
MAX_LIMIT: Final = 10_000
MAX_TOP: Final = 1000
MAX_BUCKETS: Final = 2000

By = Literal["bytes", "packets", "records", "throughput"]
BY: Final[tuple[str, ...]] = ("bytes", "packets", "records", "throughput")


class QueryError(ValueError):
    """A query that cannot be answered as asked (the message names the field)."""


class Backend(Protocol):
    """What the query layer needs of a store."""

    database: str
    table: str

    def rows(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run a SELECT with ``{name:Type}`` placeholders bound from ``params``."""
        ...


# --------------------------------------------------------------------------- the query

@dataclass(frozen=True, slots=True)
class FlowQuery:
    """One question to the store. Times are epoch seconds of ``flowEndSeconds``: [start, end)."""

    start: int | None = None  # None: the beginning of the store
    end: int | None = None  # None: now (exclusive end: the records of this second and later are left out)
    filter: str = ""  # the filter language (flowscope.collector.filter)
    group: str | None = None  # a DIMENSIONS name, for top / series / sankey
    by: By = "bytes"
    top: int = 10  # top N groups (the rest summed as "other")
    limit: int = 100  # raw records per page
    offset: int = 0
    resolution: int | None = None  # series bucket in seconds; None: about 120 buckets over the range
    source: str = "auto"  # which table answers: auto (the coarsest exact one), raw, 1m or 1h (refused if inexact)

    def with_(self, **changes: Any) -> FlowQuery:
        """A copy with some fields changed (the same checks apply)."""
        return replace(self, **changes)

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > 0xFFFFFFFF):
                raise QueryError(f"{name}: {v!r} is not epoch seconds (an integer 0..4294967295)")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise QueryError(f"end: {self.end} is not after start {self.start}")
        if not isinstance(self.filter, str):
            raise QueryError("filter: must be text")
        if self.group is not None and self.group not in DIMENSIONS:
            raise QueryError(f"group: {self.group!r} is not one of {', '.join(DIMENSIONS)}")
        if self.by not in BY:
            raise QueryError(f"by: {self.by!r} is not one of {', '.join(BY)}")
        _bounded("top", self.top, 1, MAX_TOP)
        _bounded("limit", self.limit, 1, MAX_LIMIT)
        _bounded("offset", self.offset, 0, 1 << 40)
        if self.resolution is not None:
            _bounded("resolution", self.resolution, 1, 366 * 86400)
        if self.source not in _SOURCES:
            raise QueryError(f"source: {self.source!r} is not one of {', '.join(_SOURCES)}")


def _bounded(name: str, v: Any, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise QueryError(f"{name}: {v!r} is not a whole number in {lo}..{hi}")


# --------------------------------------------------------------------------- results

class _Json:
    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload, no-any-return]


@dataclass(frozen=True, slots=True)
class FlowPage(_Json):
    """One page of raw flow records, newest first (by flowEndSeconds, then commit time)."""

    records: list[dict[str, Any]]  # column name -> value (see schema.COLUMN_NAMES + derived)
    offset: int
    limit: int
    more: bool  # another page follows


@dataclass(frozen=True, slots=True)
class TopEntry(_Json):
    """One group's traffic in the range."""

    key: str  # the dimension's value ("" means none: an external end, no policy); "other" for the remainder
    label: str  # for people: flowType / action / protocol numbers named, "" shown as "(none)"
    bytes: int
    packets: int
    records: int
    throughput: float  # bits/s over the range


@dataclass(frozen=True, slots=True)
class TopResult(_Json):
    group: str
    by: str
    entries: list[TopEntry]  # the top N, largest first
    other: TopEntry | None  # what the groups past N add up to (None when there are none)
    total: TopEntry  # every group together
    table: str  # which table answered (flows, flows_1m, flows_1h)
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class SeriesLine(_Json):
    key: str
    label: str
    values: list[float]  # one per bucket, in the unit of ``by`` (throughput: bits/s in the bucket)


@dataclass(frozen=True, slots=True)
class Series(_Json):
    """Time series per group (line charts, heatmaps): top N groups plus "other"."""

    group: str | None
    by: str
    resolution: int
    buckets: list[int]  # bucket starts, epoch seconds
    lines: list[SeriesLine]
    table: str


@dataclass(frozen=True, slots=True)
class SankeyLink(_Json):
    source: str  # the source group's key ("" none)
    target: str
    source_label: str
    target_label: str
    bytes: int
    packets: int
    records: int


@dataclass(frozen=True, slots=True)
class Overview(_Json):
    """Totals of the range for the Overview dashboard."""

    start: int
    end: int
    records: int  # flow records
    records_per_second: float
    bytes: int
    packets: int
    throughput: float  # bits/s
    connections: int  # distinct 5-tuples (exact to 65,536, then within about 1%: see overview())
    active: int  # connections with no ending record in the range
    ended: int  # connections whose last record ended them (idle, end of flow, forced, resources)
    denied: int  # connections a rule dropped or rejected
    namespaces: int
    pods: int
    nodes: int
    services: int


# --------------------------------------------------------------------------- table choice

_BYTES: Final = "(octetDeltaCount + reverseOctetDeltaCount)"
_PACKETS: Final = "(packetDeltaCount + reversePacketDeltaCount)"


@dataclass(frozen=True, slots=True)
class _Source:
    name: str  # the table name (no database); "a+b" for segments
    seconds: int  # 0 raw; else the finest roll-up resolution it reads
    records: str  # SQL of the records count (of the whole source; a piecewise one's parts use _RECORDS)
    # The tables over parts of the range: (table, resolution seconds (0: raw), start, end);
    # their union answers the range.
    segments: tuple[tuple[str, int, int, int], ...] = ()


def _window(q: FlowQuery, now: Callable[[], float]) -> tuple[int, int]:
    end = q.end if q.end is not None else int(now()) + 1
    start = q.start if q.start is not None else 0
    return start, end


_SOURCES: Final = ("auto", "raw") + tuple(r.suffix for r in ROLLUPS)


def _levels(store: Backend, columns: frozenset[str], step: int, kind: str) -> list[tuple[int, str]]:
    """(resolution, table) per roll-up resolution that can serve a part of the range, finest
    first: at each resolution the first family (:data:`~flowscope.collector.schema.FAMILIES`
    order: the narrowest first) that keeps every column and has a table there; a series'
    bucket must be whole buckets of it."""
    out = []
    for r in ROLLUPS:
        if step % r.seconds:
            continue
        fam = next((f for f in FAMILIES if f.kind == kind and r in f.rollups and columns <= frozenset(f.keys)), None)
        if fam is not None:
            out.append((r.seconds, fam.table(store.table, r)))
    return out


def _pieces(a: int, b: int, levels: Sequence[tuple[int, str]], raw: str) -> list[tuple[str, int, int, int]]:
    """[a, b) as the whole buckets of the coarsest level inside it, the rest at each side from
    the next finer level, down to the raw table's seconds."""
    if a >= b:
        return []
    if not levels:
        return [(raw, 0, a, b)]
    seconds, table = levels[-1]
    c0, c1 = -(-a // seconds) * seconds, b // seconds * seconds
    if c0 >= c1:
        return _pieces(a, b, levels[:-1], raw)
    return _pieces(a, c0, levels[:-1], raw) + [(table, seconds, c0, c1)] + _pieces(c1, b, levels[:-1], raw)


def _source(store: Backend, columns: frozenset[str], start: int, end: int, step: int = 0,
            wanted: str = "auto", kind: str = "sums") -> _Source:
    """The tables that answer exactly and read least (or the one asked for, if it can):
    the range's whole buckets of the coarsest roll-up that keeps every column, the parts
    before and after them from the next finer one, and so on down to the raw table for
    the seconds before the first and after the last whole minute (``--since 24h``: now
    less a day, to the second). At each resolution the narrowest family that keeps the
    columns serves (:func:`_levels`), so the edges of a range may come from a wider
    family than its middle."""
    raw = _Source(store.table, 0, "count()")
    if wanted == "raw":
        return raw
    levels = _levels(store, columns, step, kind)
    if wanted != "auto":
        r = next(r for r in ROLLUPS if r.suffix == wanted)
        table = next((t for s, t in levels if s == r.seconds), None)
        if table is None or start % r.seconds or end % r.seconds:
            raise QueryError(f"source: the {r.suffix} roll-up cannot answer this exactly (it needs a range and "
                             f"buckets on {r.seconds}s boundaries and only the dimensions it keeps)")
        return _Source(table, r.seconds, "sum(records)")
    segs = _pieces(start, end, levels, store.table)
    # The raw table is read by whole minutes (its sort key's first part): when its edges touch
    # every minute of the range (a minute or two to the second), the raw rows of the whole
    # range cost what the edges alone do, and one table answers.
    g = _RAW_GRAIN
    raw_grains = {m for t, s, a, b in segs if s == 0 for m in range(a // g, (b - 1) // g + 1)}
    if raw_grains and set(range(start // g, (end - 1) // g + 1)) <= raw_grains:
        return raw
    if len(segs) == 1:
        table, seconds, _, _ = segs[0]
        return raw if seconds == 0 else _Source(table, seconds, "sum(records)")
    order = {t: s for t, s, _, _ in segs}
    name = "+".join(sorted(order, key=lambda t: (order[t], t)))
    finest = min((s for s in order.values() if s), default=0)
    return _Source(name, finest, "sum(records)" if finest else "count()", tuple(segs))


#: The raw table's sort key starts with the minute of flowEndSeconds (schema.RAW_SORT_KEY),
#: and a condition on the seconds alone is pruned only by partition (a whole day read for a
#: minute's edge): the minute's condition is stated too (implied by the seconds', so the
#: rows are the same), and a range to the second reads the granules of its minutes.
_RAW_MINUTE: Final = "toStartOfMinute(flowEndSeconds)"
_RAW_GRAIN: Final = 60  # seconds: what the raw table's sort key reads together


def _raw_range(start: str | None, end: str) -> list[str]:
    """The conditions of a raw-table range [start, end) (SQL of UInt32 epoch seconds)."""
    conds = []
    if start is not None:
        conds += [f"toUInt32(flowEndSeconds) >= {start}", f"{_RAW_MINUTE} >= toStartOfMinute(toDateTime({start}))"]
    conds += [f"toUInt32(flowEndSeconds) < {end}", f"{_RAW_MINUTE} <= toStartOfMinute(toDateTime({end}))"]
    return conds


def _time_where(src: _Source, start: int, end: int, params: Params) -> str:
    if src.segments:
        return "1"  # each segment reads its own part of the range
    if not src.seconds:
        return " AND ".join(_raw_range(params.add(start, "UInt32") if start > 0 else None,
                                       params.add(end, "UInt32")))
    conds = []
    if start > 0:
        conds.append(f"timeBucket >= {params.add(start, 'UInt32')}")
    conds.append(f"timeBucket < {params.add(end, 'UInt32')}")
    return " AND ".join(conds)


def _where(store: Backend, q: FlowQuery, extra: frozenset[str], now: Callable[[], float], step: int = 0
           ) -> tuple[_Source, str, Params, int, int]:
    params = Params()
    w = parse_filter(q.filter, params)
    start, end = _window(q, now)
    src = _source(store, w.columns | extra, start, end, step, q.source)
    sql = _time_where(src, start, end, params)
    if w.sql != "1":
        sql = f"{sql} AND ({w.sql})"
    return src, sql, params, start, end


def _table(store: Backend, src: _Source) -> str:
    """The one table a source reads (a piecewise source is read through :func:`_aggregate`)."""
    if src.segments:
        raise ValueError("a piecewise source has no one table; aggregate each segment (_aggregate)")
    return f"{quote(store.database)}.{quote(src.name)}"


#: In the expressions given to :func:`_aggregate`: the records count and the time column of
#: whichever table a part reads (a roll-up's ``sum(records)`` and ``timeBucket``, the raw
#: table's ``count()`` and ``toUInt32(flowEndSeconds)``).
_RECORDS: Final = "__RECORDS__"
_TIME: Final = "__TIME__"


def _aggregate(store: Backend, src: _Source, where: str, keys: Sequence[str], aggregates: Sequence[str],
               raw_aggregates: Sequence[str] | None = None) -> str:
    """``SELECT keys, aggregates FROM source WHERE where GROUP BY keys``. A piecewise source
    aggregates each segment on its own (each GROUP BY runs over its table's own columns,
    LowCardinality ones grouped fast, rather than over a UNION of their rows) and returns
    the UNION ALL of the parts: the caller aggregates again (sums, ``uniqMerge`` of states).
    ``keys`` are column names or ``expression AS name``; :data:`_RECORDS` and :data:`_TIME`
    in them stand for the part's own; ``raw_aggregates``, when given, replace the
    aggregates in the parts that read the raw table (states computed from rows rather
    than merged)."""
    names = [k.rsplit(" AS ", 1)[-1] for k in keys]
    group = f" GROUP BY {', '.join(names)}" if names else ""

    def part(table: str, seconds: int, cond: str) -> str:
        aggs = raw_aggregates if (seconds == 0 and raw_aggregates is not None) else aggregates
        select = ", ".join(list(keys) + list(aggs))
        select = select.replace(_RECORDS, "sum(records)" if seconds else "count()")
        select = select.replace(_TIME, "timeBucket" if seconds else "toUInt32(flowEndSeconds)")
        return f"SELECT {select} FROM {quote(store.database)}.{quote(table)} WHERE {cond}{group}"

    if not src.segments:
        return part(src.name, src.seconds, where)
    parts = []
    for t, seconds, a, b in src.segments:
        cond = f"timeBucket >= {a:d} AND timeBucket < {b:d}" if seconds else " AND ".join(_raw_range(f"{a:d}", f"{b:d}"))
        parts.append(part(t, seconds, f"{cond} AND ({where})"))
    return " UNION ALL ".join(parts)


# --------------------------------------------------------------------------- labels

_NUMERIC_LABELS: Final[dict[str, Mapping[int, str]]] = {
    "flowType": FLOW_TYPES, "ingressAction": RULE_ACTIONS, "egressAction": RULE_ACTIONS, "protocol": PROTOCOLS,
}


def label(group: str | None, key: str) -> str:
    """A group key for people: numbers named, the empty key "(none)"."""
    if key == OTHER and group is not None:
        return "(other)"
    names = _NUMERIC_LABELS.get(group or "")
    if names is not None and key.isdigit():
        return names.get(int(key), key) or "(none)"
    return key or "(none)"


# --------------------------------------------------------------------------- raw records

_DISPLAY: Final = tuple(COLUMN_NAMES) + tuple(DERIVED_NAMES)
_SELECT: Final = ", ".join(
    f"toUInt32({quote(c)})" if column_type(c) == "DateTime" else quote(c)  # epoch seconds, as decoded
    for c in _DISPLAY)


def _records(rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        d = dict(zip(_DISPLAY, r))
        for k in ("recordThroughput", "reverseRecordThroughput"):
            d[k] = float(d[k])
        out.append(d)
    return out


# A total order, so pages never overlap or skip: newest first, ties broken by the flow's key.
_PAGE_ORDER: Final = ("flowEndSeconds DESC, timeInserted DESC, commitId DESC, sourceIP, destinationIP, "
                      "sourceTransportPort, destinationTransportPort, protocolIdentifier, flowStartSeconds, "
                      "octetDeltaCount, packetDeltaCount, reverseOctetDeltaCount, reversePacketDeltaCount")


#: How far back a page's rows are looked for first (seconds), before the whole range.
_PAGE_SPANS: Final = (60, 900, 3600, 6 * 3600)


def flows(store: Backend, q: FlowQuery, *, now: Callable[[], float] = time.time) -> FlowPage:
    """One page of raw records matching the query, newest first (a total order: pages tile)."""
    params = Params()
    w = parse_filter(q.filter, params)
    start, end = _window(q, now)
    src = _Source(store.table, 0, "count()")
    filt = f" AND ({w.sql})" if w.sql != "1" else ""
    where = _time_where(src, start, end, params) + filt
    # First the end time of the page's last row, reading one column; then whole rows only
    # from that time on (the sort key's minute prunes the rest), not every matching row. The
    # newest rows are looked for in the last minute first, then in longer spans back: a
    # span that holds the page's last row holds every row after it, so its answer is the
    # whole range's, and a busy store's first page reads a minute or two of rows, not a day's.
    edge: list[tuple[Any, ...]] = []
    for span in (*_PAGE_SPANS, 0):
        a = max(start, end - span) if span else start
        if span and a == start:
            continue  # the whole range: the last try
        cond = " AND ".join(_raw_range(params.add(a, "UInt32") if a > 0 else None, params.add(end, "UInt32")))
        edge = store.rows(
            f"SELECT toUInt32(flowEndSeconds) FROM {_table(store, src)} WHERE {cond}{filt} "
            f"ORDER BY flowEndSeconds DESC LIMIT 1 OFFSET {q.offset + q.limit:d}", params.values)
        if edge:
            break
    if edge:
        edge_t = int(edge[0][0])
        where = " AND ".join(_raw_range(params.add(edge_t, "UInt32"), params.add(end, "UInt32"))) + filt
    rows = store.rows(
        f"SELECT {_SELECT} FROM {_table(store, src)} WHERE {where} "
        f"ORDER BY {_PAGE_ORDER} LIMIT {q.limit + 1:d} OFFSET {q.offset:d}", params.values)
    return FlowPage(_records(rows[: q.limit]), q.offset, q.limit, len(rows) > q.limit)


def flows_since(store: Backend, q: FlowQuery, inserted_after: int, *, limit: int = MAX_LIMIT) -> list[dict[str, Any]]:
    """Records committed after ``inserted_after`` (timeInserted, epoch seconds) that match the
    filter, oldest first: what ``--follow`` prints next. The time range is ignored."""
    params = Params()
    w = parse_filter(q.filter, params)
    where = f"toUInt32(timeInserted) > {params.add(inserted_after, 'UInt32')}"
    if w.sql != "1":
        where += f" AND ({w.sql})"
    rows = store.rows(
        f"SELECT {_SELECT} FROM {quote(store.database)}.{quote(store.table)} WHERE {where} "
        f"ORDER BY timeInserted, flowEndSeconds LIMIT {int(limit):d}", params.values)
    return _records(rows)


# --------------------------------------------------------------------------- top N

def _metric(by: str) -> str:
    return {"bytes": "b", "packets": "p", "records": "r", "throughput": "b"}[by]


def _entry(group: str | None, key: str, b: int, p: int, r: int, seconds: int) -> TopEntry:
    return TopEntry(key, label(group, key), int(b), int(p), int(r), round(int(b) * 8 / max(seconds, 1), 3))


def _require_group(q: FlowQuery) -> str:
    if q.group is None:
        raise QueryError(f"group: required here; one of {', '.join(DIMENSIONS)}")
    return q.group


_VALUE: Final = {"bytes": "sum(b)", "packets": "sum(p)", "records": "sum(r)", "throughput": "sum(b)"}
# How groups rank (largest first, ties by bytes, then by key): the ORDER BY and Python's sort
_RANK_SQL: Final = {"b": "b DESC, k", "p": "p DESC, b DESC, k", "r": "r DESC, b DESC, k"}


def _inner(columns: Sequence[str], src: _Source, store: Backend, where: str, extra: Sequence[str] = ()) -> str:
    """The aggregation by the dimension's own columns (LowCardinality groups fast); the outer
    query builds the key text over the far fewer grouped rows (and sums the segments)."""
    cols = list(dict.fromkeys(columns))
    return _aggregate(store, src, where, cols + list(extra),
                      [f"sum({_BYTES}) AS b", f"sum({_PACKETS}) AS p", f"{_RECORDS} AS r"])


def _rank_lambda(fields: Sequence[tuple[int, bool]]) -> str:
    """An ``arraySort`` key over tuples: (element, descending) in order (numbers descend,
    text ascends), the order an ``ORDER BY`` of the same columns gives."""
    parts = [f"-toInt64(tupleElement(x, {i:d}))" if desc else f"tupleElement(x, {i:d})" for i, desc in fields]
    return f"x -> ({', '.join(parts)})"


#: How groups rank in the one-pass form (tuples (k, b, p, r)): as _RANK_SQL.
_RANK_TUPLE: Final = {"b": _rank_lambda(((2, True), (1, False))),
                      "p": _rank_lambda(((3, True), (2, True), (1, False))),
                      "r": _rank_lambda(((4, True), (2, True), (1, False)))}


def _top_and_total(store: Backend, inner: str, key_sql: str, metric: str, n: int,
                   params: Mapping[str, Any]) -> tuple[list[tuple[Any, ...]], tuple[int, int, int], bool]:
    """The ``n`` largest groups (key, b, p, r), ranked in the store, the total of every
    group, and whether more groups than ``n`` exist: one round trip, one row back, and one
    pass over the table (the groups are gathered once; the total is their sum and the top
    ``n + 1`` are sorted out of them)."""
    rows = store.rows(
        f"SELECT sum(b), sum(p), sum(r), arraySlice(arraySort({_RANK_TUPLE[metric]}, groupArray((k, b, p, r))), "
        f"1, {n + 1:d}) FROM (SELECT CAST({key_sql} AS String) AS k, sum(b) AS b, sum(p) AS p, sum(r) AS r "
        f"FROM ({inner}) GROUP BY k)", params)
    row = rows[0] if rows else (0, 0, 0, [])
    groups = [tuple(g) for g in row[3]]
    totals = (int(row[0] or 0), int(row[1] or 0), int(row[2] or 0))
    return groups, totals, len(groups) > n


def top(store: Backend, q: FlowQuery, *, now: Callable[[], float] = time.time) -> TopResult:
    """The top ``q.top`` groups of ``q.group`` by ``q.by``, the remainder as "other", and the total."""
    group = _require_group(q)
    dim = DIMENSIONS[group]
    src, where, params, start, end = _where(store, q, frozenset(dim.columns), now)
    m = _metric(q.by)
    groups, (tb, tp, tr), more = _top_and_total(
        store, _inner(dim.columns, src, store, where), dim.sql, m, q.top, params.values)
    i = {"b": 1, "p": 2, "r": 3}[m]
    groups.sort(key=lambda r: (-int(r[i]), -int(r[1]), str(r[0])))
    seconds = end - start
    entries = [_entry(group, str(r[0]), r[1], r[2], r[3], seconds) for r in groups[: q.top]]
    other = None
    if more:
        other = _entry(group, OTHER, tb - sum(e.bytes for e in entries), tp - sum(e.packets for e in entries),
                       tr - sum(e.records for e in entries), seconds)
    total = replace(_entry(None, "", tb, tp, tr, seconds), label="total")
    return TopResult(group, q.by, entries, other, total, src.name, start, end)


# --------------------------------------------------------------------------- series

def _resolution(q: FlowQuery, start: int, end: int) -> int:
    if q.resolution is not None:
        step = q.resolution
    else:
        # About 120 buckets; from an hour on, whole minutes, from 12 hours on, whole hours
        # (so the roll-ups answer).
        raw = max((end - start) / 120, 1)
        nice = [1, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400]
        step = next((n for n in nice if n >= raw), 86400 * math.ceil(raw / 86400))
        if end - start >= 12 * 3600:
            step = max(step, 3600)
        elif end - start >= 3600:
            step = max(step, 60)
    if (end - start) / step > MAX_BUCKETS:
        raise QueryError(f"resolution: {step}s makes more than {MAX_BUCKETS} buckets over {end - start}s; "
                         "choose a coarser one")
    return step


#: Groups with thousands of keys (Pods, workloads, addresses, ports): a series of them is
#: ranked first and only the top keys' buckets are gathered (keys times buckets is
#: otherwise hundreds of thousands of groups: 5,000 Pods over 60 minutes).
_MANY_KEYS: Final = frozenset(("srcPod", "dstPod", "srcWorkload", "dstWorkload", "srcIP", "dstIP", "dstPort"))


def _series_of_ranked(store: Backend, q: FlowQuery, dim: Any, start: int, end: int, step: int, bucket: str,
                      value: str, now: Callable[[], float]) -> list[tuple[Any, ...]]:
    """A series of a many-keyed group in three reads: the keys ranked over the whole range
    (by the same order as the one-pass form: the value's sum descending, then the key),
    from the tables that read least whatever the buckets; then, in one round trip, the
    top N + 1 keys' buckets (only their rows grouped) and the buckets' totals (from the
    tables that keep the filter's columns, without the group's). Rows as the one-pass
    form gives them: (0, key, buckets, values) per key, (1, "", buckets, totals)."""
    src, where, params, _, _ = _where(store, q, frozenset(dim.columns), now)
    ranked = store.rows(
        f"SELECT arraySlice(arraySort({_rank_lambda(((2, True), (1, False)))}, groupArray((k, v))), 1, {q.top + 1:d}) "
        f"FROM (SELECT CAST({dim.sql} AS String) AS k, {value} AS v FROM ({_inner(dim.columns, src, store, where)}) "
        "GROUP BY k)", params.values)
    keys = [str(x[0]) for x in (ranked[0][0] if ranked else [])]
    params = Params()
    w = parse_filter(q.filter, params)
    lines_src = _source(store, w.columns | frozenset(dim.columns), start, end, step, q.source)
    total_src = _source(store, w.columns, start, end, step, q.source)
    filt = f" AND ({w.sql})" if w.sql != "1" else ""
    lines_where = _time_where(lines_src, start, end, params) + filt
    total_where = _time_where(total_src, start, end, params) + filt
    totals = (f"SELECT 1 AS part, '' AS k, groupArray(t) AS ts, groupArray(v) AS vs FROM (SELECT t, {value} AS v "
              f"FROM ({_inner((), total_src, store, total_where, (f'{bucket} AS t',))}) GROUP BY t)")
    if not keys:
        return store.rows(totals, params.values)
    chosen = ", ".join(params.add(k, "String") for k in keys)
    lines_where += f" AND (CAST({dim.sql} AS String) IN ({chosen}))"
    if dim.name_column:
        # the names first, on their own column (implied by the keys' condition, which still
        # decides): the rows of other Pods are left without building their keys' text
        names = ", ".join(params.add(n, "String") for n in sorted(dim.names_of(keys)))
        lines_where += f" AND {quote(dim.name_column)} IN ({names})"
    inner = _inner(dim.columns, lines_src, store, lines_where, (f"{bucket} AS t",))
    rows = store.rows(
        f"SELECT 0 AS part, k, groupArray(t) AS ts, groupArray(v) AS vs FROM (SELECT CAST({dim.sql} AS String) AS k, "
        f"t, {value} AS v FROM ({inner}) GROUP BY k, t) GROUP BY k UNION ALL {totals}", params.values)
    order = {k: i for i, k in enumerate(keys)}
    return sorted(rows, key=lambda r: (int(r[0]), order.get(str(r[1]), 0)))


def series(store: Backend, q: FlowQuery, *, now: Callable[[], float] = time.time) -> Series:
    """Per-bucket values of the top ``q.top`` groups (by the range's total) plus "other";
    without a group, one line "total". Buckets start at multiples of the resolution. The
    ranking happens in the store: at most ``top + 2`` rows of buckets come back (the top
    lines, one more, the totals), whatever the number of groups."""
    start, end = _window(q, now)
    if q.start is None:
        raise QueryError("start: a series needs the start of its range")
    step = _resolution(q, start, end)
    first = start - start % step
    dim = DIMENSIONS[q.group] if q.group else None
    src, where, params, _, _ = _where(store, q, frozenset(dim.columns if dim else ()), now, step)
    bucket = f"intDiv({_TIME}, {step:d}) * {step:d}"
    inner = _inner(dim.columns if dim else (), src, store, where, (f"{bucket} AS t",))
    value = _VALUE[q.by]
    buckets = list(range(first, end, step))
    index = {t: i for i, t in enumerate(buckets)}
    if dim is None:
        # The buckets' totals, without the groups (no key to hash), as one row of arrays.
        rows = store.rows(
            f"SELECT 1 AS part, '' AS k, groupArray(t) AS ts, groupArray(v) AS vs FROM ("
            f"SELECT t, {value} AS v FROM ({inner}) GROUP BY t)", params.values)
    elif q.group in _MANY_KEYS:
        rows = _series_of_ranked(store, q, dim, start, end, step, bucket, value, now)
    else:
        # One pass over the table: each key's buckets gathered (one row per key), the
        # buckets' totals summed over the keys' rows (sumMap), the keys ranked and the top
        # N + 1 kept (one more says that there are more); "other" is the totals less the
        # top lines. One row comes back, whatever the number of groups.
        one = store.rows(
            f"SELECT arraySlice(arraySort({_rank_lambda(((4, True), (1, False)))}, groupArray((k, ts, vs, s))), 1, "
            f"{q.top + 1:d}), sumMap(ts, vs) FROM (SELECT k, groupArray(t) AS ts, groupArray(v) AS vs, sum(v) AS s "
            f"FROM (SELECT CAST({dim.sql} AS String) AS k, t, {value} AS v FROM ({inner}) GROUP BY k, t) GROUP BY k)",
            params.values)
        ranked_rows, sums = (one[0][0], one[0][1]) if one else ([], ([], []))
        rows = [(0, line[0], line[1], line[2]) for line in ranked_rows] + [(1, "", sums[0], sums[1])]

    def spread(ts: Sequence[Any], vs: Sequence[Any]) -> list[float]:
        vals = [0.0] * len(buckets)
        for t, v in zip(ts, vs):
            i = index.get(int(t))
            if i is not None:
                vals[i] += int(v)
        return vals

    total_row = next((r for r in rows if int(r[0]) == 1), None)
    total = spread(total_row[2], total_row[3]) if total_row is not None else [0.0] * len(buckets)
    lines: dict[str, list[float]] = {}
    if dim is None:
        if total_row is not None and len(total_row[2]):
            lines[""] = total
    else:
        ranked = sorted(((str(r[1]), spread(r[2], r[3])) for r in rows if int(r[0]) == 0),
                        key=lambda kv: (-sum(kv[1]), kv[0]))
        lines = dict(ranked[: q.top])
        if len(ranked) > q.top:
            kept = list(lines.values())
            lines[OTHER] = [tv - sum(line[i] for line in kept) for i, tv in enumerate(total)]
    if q.by == "throughput":
        for vals in lines.values():
            for i, v in enumerate(vals):
                vals[i] = round(v * 8 / step, 3)
    group = q.group
    out = [SeriesLine(k if dim else "total", label(group, k) if dim else "total", v) for k, v in lines.items()]
    return Series(group, q.by, step, buckets, out, src.name)


# --------------------------------------------------------------------------- sankey

def sankey(store: Backend, q: FlowQuery, target: str, *, now: Callable[[], float] = time.time) -> list[SankeyLink]:
    """Links from ``q.group`` (source side) to ``target`` groups with their traffic, the
    ``q.top`` largest by ``q.by`` (the rest summed into an "other" -> "other" link), ranked
    in the store: ``top + 1`` links come back, not every pair."""
    group = _require_group(q)
    if target not in DIMENSIONS:
        raise QueryError(f"target: {target!r} is not one of {', '.join(DIMENSIONS)}")
    a, b = DIMENSIONS[group], DIMENSIONS[target]
    src, where, params, _, _ = _where(store, q, frozenset(a.columns + b.columns), now)
    cols = tuple(dict.fromkeys(a.columns + b.columns))
    m = _metric(q.by)
    # tuples (s, d, b, p, r), ranked by the metric, then by the keys
    rank = _rank_lambda((({"b": 3, "p": 4, "r": 5}[m], True), (1, False), (2, False)))
    # one pass: the pairs gathered once, their sum the total, the top N + 1 sorted out of them
    rows = store.rows(
        f"SELECT sum(b), sum(p), sum(r), arraySlice(arraySort({rank}, groupArray((s, d, b, p, r))), 1, {q.top + 1:d}) "
        f"FROM (SELECT CAST({a.sql} AS String) AS s, CAST({b.sql} AS String) AS d, sum(b) AS b, sum(p) AS p, "
        f"sum(r) AS r FROM ({_inner(cols, src, store, where)}) GROUP BY s, d)", params.values)
    row = rows[0] if rows else (0, 0, 0, [])
    links = [tuple(x) for x in row[3]]
    totals = (int(row[0] or 0), int(row[1] or 0), int(row[2] or 0))
    i = {"b": 2, "p": 3, "r": 4}[m]
    links.sort(key=lambda r: (-int(r[i]), str(r[0]), str(r[1])))
    out = [SankeyLink(str(r[0]), str(r[1]), label(group, str(r[0])), label(target, str(r[1])),
                      int(r[2]), int(r[3]), int(r[4])) for r in links[: q.top]]
    if len(links) > q.top:
        out.append(SankeyLink(OTHER, OTHER, "(other)", "(other)", totals[0] - sum(x.bytes for x in out),
                              totals[1] - sum(x.packets for x in out), totals[2] - sum(x.records for x in out)))
    return out


# --------------------------------------------------------------------------- overview

_STATES: Final = {st.name: st for st in CONNECTION_STATES}


def overview(store: Backend, q: FlowQuery, *, now: Callable[[], float] = time.time) -> Overview:
    """Totals of the range. Records, octets and packets come from the coarsest roll-up that
    answers exactly. Connections (distinct 5-tuples: ``connectionHash``), how many of them
    ended or were denied, and the distinct namespaces, Pods, Nodes and Services are the
    states of :data:`~flowscope.collector.schema.CONNECTION_STATES`: from the ``conn``
    roll-ups' states, merged, when the question has no filter; else computed from the
    rows (the main roll-up's for Pods, Nodes, Services and namespaces when it holds the
    filter's columns, the raw table's for connections). Either way the same answer:
    merged states equal the state of all the rows.

    Connections are counted by ``uniqCombined`` (exact for small sets, past some
    thousands HyperLogLog within about 1%: a busy day's millions), the rest by ``uniq``
    (exact to 65,536 distinct values: every namespace, Pod, Node and Service count of a
    cluster) of their names' hash."""
    src, where, params, start, end = _where(store, q, frozenset(), now)
    sums = _aggregate(store, src, where, (), [f"{_RECORDS} AS n", f"sum({_BYTES}) AS b", f"sum({_PACKETS}) AS p"])
    r = store.rows(f"SELECT sum(n), sum(b), sum(p) FROM ({sums})", params.values)
    n, b, p = (int(x or 0) for x in (r[0] if r else (0, 0, 0)))
    names = ("srcPods", "dstPods", "srcNodes", "dstNodes", "services", "srcNamespaces", "dstNamespaces")
    counts = ("connections", "ended", "denied")
    if parse_filter(q.filter).sql == "1":  # no filter: the conn roll-ups hold the names' states too (one read)
        conns = found = _states(store, q, start, end, counts + names + ("namespaces",), "connections", now)[0]
    else:
        conns = _states(store, q, start, end, counts, "connections", now)[0]
        found = _states(store, q, start, end, names + ("namespaces",), "sums", now)[0]
    c, ended_n, denied = (conns[k] for k in counts)
    seconds = max(end - start, 1)
    return Overview(start, end, n, round(n / seconds, 3), b, p, round(b * 8 / seconds, 3), c,
                    max(c - ended_n, 0), ended_n, denied, found["namespaces"], found["srcPods"] + found["dstPods"],
                    max(found["srcNodes"], found["dstNodes"]), found["services"])


def _states(store: Backend, q: FlowQuery, start: int, end: int, names: Sequence[str], kind: str,
            now: Callable[[], float]) -> tuple[dict[str, int], str]:
    """The distinct counts ``names`` (:data:`_STATES`, and ``namespaces``: both ends' states
    merged) of the range and filter, from a ``conn`` roll-up (``kind="connections"``: only
    an unfiltered question), else from the rows of the table that answers (``kind="sums"``:
    the main roll-up when it holds every column the states and the filter read). Returns
    the counts and the filter's SQL ("" when there is none)."""
    params = Params()
    w = parse_filter(q.filter, params)
    wanted = [n for n in names if n != "namespaces"]
    if "namespaces" in names:
        wanted += [n for n in ("srcNamespaces", "dstNamespaces") if n not in wanted]
    states = [_STATES[n] for n in wanted]
    columns: frozenset[str] = frozenset()
    if kind == "sums":
        columns = frozenset().union(*(_state_columns(st) for st in states))
    src = _source(store, w.columns | columns, start, end, wanted="raw" if q.source == "raw" else "auto", kind=kind)
    filt = w.sql if w.sql != "1" else ""
    where = _time_where(src, start, end, params) + (f" AND ({filt})" if filt else "")
    of_rows = [f"{st.of_rows()} AS {quote(st.name)}" for st in states]
    if src.seconds and kind == "connections":  # a conn roll-up's states merged (the raw edges' from rows)
        inner = _aggregate(store, src, where, (), [f"{st.merged(quote(st.name))} AS {quote(st.name)}"
                                                   for st in states], of_rows)
    else:
        inner = _aggregate(store, src, where, (), of_rows)
    merged = [f"{st.function}Merge({quote(st.name)})" for st in states]
    if "namespaces" in names:
        both = _STATES["srcNamespaces"]
        merged.append(f"{both.function}Merge(arrayJoin([{quote('srcNamespaces')}, {quote('dstNamespaces')}]))")
    rows = store.rows(f"SELECT {', '.join(merged)} FROM ({inner})", params.values)
    values = [int(x or 0) for x in rows[0]] if rows else [0] * len(merged)
    out = dict(zip(wanted, values))
    if "namespaces" in names:
        out["namespaces"] = values[-1]
    return out, filt


def _state_columns(st: State) -> frozenset[str]:
    """The columns a state's expressions read."""
    return frozenset(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", f"{st.value} {st.condition}")) & _COLUMNS_ALL


_COLUMNS_ALL: Final = frozenset(COLUMN_NAMES) | frozenset(DERIVED_NAMES)


# --------------------------------------------------------------------------- completion

#: Completion sources for the filter box: field -> the columns whose values complete it.
COMPLETIONS: Final[dict[str, tuple[str, ...]]] = {
    "namespace": ("sourcePodNamespace", "destinationPodNamespace"),
    "pod": ("sourcePodName", "destinationPodName"),
    "workload": ("sourcePodWorkload", "destinationPodWorkload"),
    "node": ("sourceNodeName", "destinationNodeName"),
    "service": ("destinationServicePortName",),
    "policy": ("ingressNetworkPolicyName", "egressNetworkPolicyName"),
}
_COMPLETE_ROLLUP: Final = frozenset(ROLLUP_KEYS)


def complete(store: Backend, field: str, prefix: str = "", *, limit: int = 50, q: FlowQuery | None = None,
             now: Callable[[], float] = time.time) -> list[str]:
    """Distinct values of a field starting with ``prefix`` (most frequent first), from the
    1-hour roll-up when the field's columns are in it (pods, namespaces, nodes, services,
    policies all are), within ``q``'s range and filter when given."""
    if field not in COMPLETIONS:
        raise QueryError(f"field: {field!r} has no completion; one of {', '.join(COMPLETIONS)}")
    if not isinstance(prefix, str) or len(prefix) > 256:
        raise QueryError("prefix: must be text of at most 256 characters")
    _bounded("limit", limit, 1, 1000)
    cols = COMPLETIONS[field]
    q = q or FlowQuery()
    base = q
    if q.start is None and q.end is None:
        # the whole store: the 1-hour roll-up answers, with an hour-aligned end
        end = (int(now()) // 3600 + 1) * 3600
        base = q.with_(start=None, end=end)
    parts, all_params = [], Params()
    for i, col in enumerate(cols):
        params = Params(prefix=f"c{i}_")
        w = parse_filter(base.filter, params)
        start, end = _window(base, now)
        src = _source(store, w.columns | {col}, start, end)
        where = _time_where(src, start, end, params)
        if w.sql != "1":
            where += f" AND ({w.sql})"
        where += f" AND {col} != '' AND startsWith({col}, {params.add(prefix, 'String')})"
        parts.append(_aggregate(store, src, where, (f"{col} AS v",), (f"{_RECORDS} AS n",)))
        all_params.values.update(params.values)
    rows = store.rows(
        f"SELECT v, sum(n) AS total FROM ({' UNION ALL '.join(parts)}) GROUP BY v ORDER BY total DESC, v "
        f"LIMIT {limit:d}", all_params.values)
    return [str(r[0]) for r in rows]


# --------------------------------------------------------------------------- URL parameters

_INT_PARAMS: Final = ("start", "end", "top", "limit", "offset", "resolution")


def query_from_params(params: Mapping[str, str], *, now: Callable[[], float] = time.time) -> FlowQuery:
    """A FlowQuery from URL parameters (``start``/``end`` as epoch seconds, RFC 3339 or a
    Go duration before now such as ``15m``; ``filter``, ``group``, ``by``, ``top``, ``limit``,
    ``offset``, ``resolution``, ``source``). Unknown parameters are refused by name."""
    known = set(_INT_PARAMS) | {"filter", "group", "by", "source", "since", "until", "target", "field", "prefix"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise QueryError(f"{unknown[0]}: not a query parameter; known: {', '.join(sorted(known))}")
    kw: dict[str, Any] = {}
    for name in _INT_PARAMS:
        if name in params:
            text = params[name]
            if name in ("start", "end"):
                kw[name] = parse_time(text, name, now=now)
            else:
                if not text.isdigit():
                    raise QueryError(f"{name}: {text!r} is not a whole number")
                kw[name] = int(text)
    for name, key in (("since", "start"), ("until", "end")):
        if name in params:
            kw[key] = parse_time(params[name], name, now=now)
    for name in ("filter", "group", "by", "source"):
        if name in params:
            kw[name] = params[name] or (None if name == "group" else "")
    return FlowQuery(**kw)


def parse_time(text: str, field: str, *, now: Callable[[], float] = time.time) -> int:
    """Epoch seconds from ``1764582000``, RFC 3339 (``2026-12-01T09:00:00Z``) or a Go
    duration before now (``15m``, ``1h30m``)."""
    from datetime import datetime

    from flowscope.durations import DurationError, parse_duration

    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        seconds = parse_duration(text)
    except (DurationError, ValueError):
        pass
    else:
        return max(int(now() - seconds), 0)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"{field}: {text!r} is neither a duration (15m, 1h30m), RFC 3339 "
                         "(2026-12-01T09:00:00Z) nor epoch seconds") from None
    if dt.tzinfo is None:
        raise QueryError(f"{field}: {text!r} has no time zone; end it with Z or +HH:MM")
    return int(dt.timestamp())

