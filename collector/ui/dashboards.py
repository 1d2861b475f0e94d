"""What each dashboard panel shows, computed from the store's query layer.

The web pages ask for panels (a summary, a time series, a top-N bar, a sankey, a heatmap,
a page of records, completions); this module answers each with plain JSON-ready dicts,
reading only through :mod:`flowscope.collector.query`: its ``top``, ``series``,
``flows``, ``complete`` and connection states, and, for the panels that need both
directions apart (Tx/Rx sankeys, per-Node Tx/Rx heatmaps) or several dimensions at once
(the policy sankey's links with their Pod pairs), questions of its own over the same table
choice the query layer makes (the coarsest roll-up that answers exactly): :func:`grouped`
(one GROUP BY), :func:`pair_totals` and :func:`pair_lines` (a sankey page's ranked pairs and
its series' lines), :func:`node_traffic` (both ends of every Node) and
:func:`pods_either_end` (the top Pods as either end). Each is shaped so that only what the
panels draw comes back from the store: at 10M flows, converting tens of thousands of rows
in Python cost more than the query.

A dashboard's *scope* narrows every panel of a page the way Antrea's dashboards do
(Pod-to-Pod: flows between Pods not through a Service, Pod-to-Service, Pod-to-External,
...). Scopes, the Network Policy page's policy fields and the user's filter are all
filter-language text joined with ``and``, so they go through the one parser and are
never SQL. The time window is aligned to whole minutes (a little longer than asked, never
shorter) so that every question can be answered from the roll-ups.

Units: counters are bytes and packets; rates are bytes per second (the pages add SI
prefixes); heatmaps are Mbit/s, as network engineers read a link's load.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from flowscope.collector import query
from flowscope.collector.filter import FIELDS, FilterError
from flowscope.collector.schema import DIMENSIONS
from flowscope.ipfix.antrea import DENY_ACTIONS, FLOW_TYPES, PROTOCOLS, RULE_ACTIONS

__all__ = [
    "DASHBOARD_PARAMS",
    "PAGES",
    "SCOPES",
    "Dashboards",
    "PanelError",
    "Window",
    "window_from_params",
]

#: Filters that make a page what it is (filter-language text, ANDed with the user's).
SCOPES: Final[dict[str, str]] = {
    "all": "",
    "pod-to-pod": 'type in (intra-node, inter-node) and service = "" and srcPod != "" and dstPod != ""',
    "pod-to-service": 'service != ""',
    "pod-to-external": "type = to-external",
    "inter-node": "type = inter-node",
    "intra-node": "type = intra-node",
    "denied": "action in (drop, reject)",
    "policy": "",
}
#: The sankey pages' scopes: their sankeys' (source, target) dimensions, which their series
#: group by too.
SANKEY_ENDS: Final[dict[str, tuple[str, str]]] = {
    "pod-to-pod": ("srcPod", "dstPod"), "pod-to-service": ("srcPod", "service"),
    "pod-to-external": ("srcPod", "dstIP")}
#: The Network Policy page's fields: URL parameter -> (policy field, part).
POLICY_PARAMS: Final[dict[str, tuple[str, str]]] = {
    "ingressPolicyNamespace": ("ingressPolicy", "namespace"),
    "ingressPolicyName": ("ingressPolicy", "name"),
    "egressPolicyNamespace": ("egressPolicy", "namespace"),
    "egressPolicyName": ("egressPolicy", "name"),
}
_COMMON: Final = frozenset({"since", "from", "to", "filter", "scope"} | set(POLICY_PARAMS))
#: The URL parameters each panel reads (anything else is refused by name, never ignored).
PANEL_PARAMS: Final[dict[str, frozenset[str]]] = {
    "summary": _COMMON,
    "series": _COMMON | {"metric", "group", "top"},
    "top": _COMMON | {"group", "n"},
    "sankey": _COMMON | {"dir", "n"},
    "heatmap": _COMMON | {"dir"},
    "flows": _COMMON | {"page", "limit", "format"},
    "values": _COMMON | {"field"},
    "pairs": _COMMON | {"egress", "ingress"},
    "complete": frozenset({"since", "from", "to", "q", "pos"}),
}
DASHBOARD_PARAMS: Final = frozenset().union(*PANEL_PARAMS.values())

#: What each page asks, panel and parameters, in the order of VIEWS in static/app.js (whose
#: panels match each answer line's index and name): ``/ui/v1/page`` answers them in one
#: request; the benchmark and the tests that compare servers ask them too.
PAGES: Final[dict[str, list[tuple[str, dict[str, str]]]]] = {
    "overview": [("summary", {}), ("series", {"metric": "throughput", "group": "flowType"}),
                 ("series", {"metric": "flows"}), ("top", {"group": "pod", "n": "10"}),
                 ("top", {"group": "service", "n": "10"}), ("series", {"metric": "denied"})],
    "pod-to-pod": [("sankey", {"scope": "pod-to-pod", "dir": "tx", "n": "15"}),
                   ("sankey", {"scope": "pod-to-pod", "dir": "rx", "n": "15"}),
                   ("series", {"metric": "throughput", "group": "srcPod", "scope": "pod-to-pod", "top": "8"}),
                   ("series", {"metric": "throughput", "group": "dstPod", "scope": "pod-to-pod", "top": "8"})],
    "pod-to-service": [("sankey", {"scope": "pod-to-service", "dir": "tx", "n": "15"}),
                       ("sankey", {"scope": "pod-to-service", "dir": "rx", "n": "15"}),
                       ("series", {"metric": "throughput", "group": "service", "scope": "pod-to-service", "top": "8"}),
                       ("series", {"metric": "throughput", "group": "srcPod", "scope": "pod-to-service", "top": "8"})],
    "pod-to-external": [("sankey", {"scope": "pod-to-external", "dir": "tx", "n": "15"}),
                        ("sankey", {"scope": "pod-to-external", "dir": "rx", "n": "15"}),
                        ("series", {"metric": "throughput", "group": "dstIP", "scope": "pod-to-external", "top": "8"}),
                        ("series", {"metric": "throughput", "group": "srcPod", "scope": "pod-to-external", "top": "8"})],
    "flows": [("series", {"metric": "flows", "group": "flowType"}), ("flows", {"page": "1", "limit": "50"})],
    "nodes": [("series", {"metric": "throughput", "group": "node", "scope": "inter-node", "top": "10"}),
              ("series", {"metric": "throughput", "group": "node", "scope": "intra-node", "top": "10"}),
              ("heatmap", {"dir": "tx"}), ("heatmap", {"dir": "rx"})],
    "policy": [("sankey", {"scope": "policy", "dir": "tx", "n": "20"}), ("top", {"group": "ingressPolicy", "n": "10"}),
               ("series", {"metric": "denied", "group": "dstPod", "top": "8"}),
               ("series", {"metric": "flows", "group": "ingressAction"}),
               ("flows", {"scope": "denied", "limit": "10"})],
}

#: The parameters of a whole page (``/ui/v1/page``): which dashboard, its range, filter and
#: policy fields, and the Flow Records page's page number.
PAGE_PARAMS: Final = _COMMON - {"scope"} | {"d", "page"}


def page_panels(params: Mapping[str, str]) -> list[tuple[str, dict[str, str]]]:
    """The panel requests of the page ``params["d"]`` names, as :data:`PAGES` lists them, each
    with the page's range, filter and policy fields (and, for the Flow Records table, its
    page number)."""
    unknown = sorted(set(params) - PAGE_PARAMS)
    if unknown:
        raise PanelError(unknown[0], f"{unknown[0][:40]}: not a parameter of a page; known: "
                                     f"{', '.join(sorted(PAGE_PARAMS))}")
    name = params.get("d", "")
    if name not in PAGES:
        raise PanelError("d", f"d: {name[:40]!r} is not one of {', '.join(PAGES)}")
    common = {k: v for k, v in params.items() if k not in ("d", "page")}
    _int(params, "page", 1, 1, 1_000_000)
    out = []
    for panel, fixed in PAGES[name]:
        p = {**common, **fixed}
        if "page" in fixed and params.get("page"):
            p["page"] = params["page"]
        out.append((panel, p))
    return out


#: The dimensions of the one GROUP BY that every series of few lines reads (by flow type, by
#: rule action, in total, denied): :meth:`Dashboards._verdict_grid`.
_VERDICT_DIMS: Final = ["flowType", "ingressAction", "egressAction"]
#: The scopes that keep flow types only: the flow types each keeps (None: every type).
_NODE_SCOPES: Final[dict[str, frozenset[str] | None]] = {
    "all": None, "inter-node": frozenset({"2"}), "intra-node": frozenset({"1"})}

MAX_TOP: Final = 50
MAX_PAGE_LIMIT: Final = 500
EXPORT_LIMIT: Final = query.MAX_LIMIT
OTHER: Final = query.OTHER
DEFAULT_SINCE: Final = "15m"
MAX_SPAN: Final = 400 * 86400
IP_WINDOW: Final = 900  # tooltips name the addresses seen in the range's last 15 minutes
HEATMAP_COLUMNS: Final = 40  # a heatmap's most columns (50 Nodes by 91 ten-second buckets is 4,550 cells)


class PanelError(ValueError):
    """A panel request that cannot be answered; ``field`` names the URL parameter at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _error_field(exc: Exception) -> str:
    if isinstance(exc, FilterError):
        return "filter"
    head = str(exc).split(":", 1)[0]
    return head if head.isidentifier() else "query"


# --------------------------------------------------------------------------- the window

@dataclass(frozen=True, slots=True)
class Window:
    """The time range of a page, aligned to whole minutes, and its series step."""

    start: int
    end: int
    step: int

    @property
    def seconds(self) -> int:
        return self.end - self.start


_NICE_STEPS: Final = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def _step(span: int) -> int:
    """About 90 buckets over the span, at a step that divides a day; past 6 hours, whole
    hours (so the 1-hour roll-up answers: a day is 24 buckets, a week 84)."""
    raw = max(span / 90, 1)
    step = next((s for s in _NICE_STEPS if s >= raw), 86400 * math.ceil(raw / 86400))
    return max(step, 3600) if span > 6 * 3600 else step


def window_from_params(params: Mapping[str, str], *, now: Callable[[], float] = time.time) -> Window:
    """``since=15m`` (a Go duration back from now) or ``from=...&to=...`` (RFC 3339 or epoch
    seconds; ``to`` defaults to now)."""
    try:
        if params.get("from"):
            if params.get("since"):
                raise PanelError("since", "since: give either since or from/to, not both")
            start = query.parse_time(params["from"], "from", now=now)
            end = query.parse_time(params["to"], "to", now=now) if params.get("to") else int(now()) + 1
        else:
            if params.get("to"):
                raise PanelError("to", "to: only with from (since always ends now)")
            since = params.get("since") or DEFAULT_SINCE
            from flowscope.durations import DurationError, parse_duration

            try:
                span = parse_duration(since, field="since")
            except (DurationError, ValueError) as exc:
                raise PanelError("since", str(exc)) from None
            if span <= 0:
                raise PanelError("since", f"since: {since!r} must be longer than 0")
            end = int(now()) + 1
            start = max(int(end - span), 0)
    except query.QueryError as exc:
        raise PanelError(_error_field(exc), str(exc)) from None
    if end <= start:
        raise PanelError("to", f"to: {end} is not after from {start}")
    if end - start > MAX_SPAN:
        raise PanelError("from", f"from: the range is longer than {MAX_SPAN // 86400} days")
    step = _step(end - start)
    unit = 3600 if step % 3600 == 0 else 60
    start -= start % unit
    end = end + (-end) % unit
    return Window(start, end, step)


def _int(params: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    text = params.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise PanelError(name, f"{name}: {text!r} is not a whole number in {lo}..{hi}")
    return int(text)


def _choice(params: Mapping[str, str], name: str, default: str, allowed: Sequence[str]) -> str:
    value = params.get(name) or default
    if value not in allowed:
        raise PanelError(name, f"{name}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------- grouping

@dataclass(frozen=True, slots=True)
class GroupRow:
    """One group's counters, each direction apart."""

    keys: tuple[str, ...]
    bucket: int  # the bucket start (0 without buckets)
    octets: int  # source -> destination
    reverse_octets: int
    packets: int
    reverse_packets: int
    records: int


def _key_in(dim: str, keys: Sequence[str], params: Any) -> str:
    """The condition "``dim``'s key is one of ``keys``" (bound values), over its own columns."""
    if not keys:
        return "0"
    return f"CAST({DIMENSIONS[dim].sql} AS String) IN ({', '.join(params.add(k, 'String') for k in keys)})"


def grouped(store: query.Backend, q: query.FlowQuery, dims: Sequence[str], *, step: int = 0,
            limit_by: tuple[int, int] | None = None, only: Mapping[str, Sequence[str]] | None = None,
            now: Callable[[], float] = time.time) -> tuple[list[GroupRow], str]:
    """One GROUP BY over ``dims`` (DIMENSIONS names), per ``step`` bucket when given, read from
    the table the query layer would choose. Returns the rows and the table's name.
    ``limit_by=(n, k)``: only the ``n`` largest groups (by bytes) for each value of the first
    ``k`` dimensions (ClickHouse's LIMIT n BY); ``only``: a dimension's groups among these keys."""
    for d in dims:
        if d not in DIMENSIONS:
            raise PanelError("group", f"group: {d!r} is not one of {', '.join(DIMENSIONS)}")
    columns = frozenset(c for d in dims for c in DIMENSIONS[d].columns)
    src, where, params, _, _ = query._where(store, q, columns, now, step)  # the query layer's table choice
    for d, keys in sorted((only or {}).items()):
        where += f" AND {_key_in(d, keys, params)}"
    tcol = query._TIME  # the time column of whichever table a part reads
    # Group by the dimensions' own columns first (LowCardinality groups fast), then make the
    # keys' text over the far fewer grouped rows.
    raw_cols = list(dict.fromkeys(c for d in dims for c in DIMENSIONS[d].columns))
    inner_keys = raw_cols + ([f"intDiv({tcol}, {int(step):d}) * {int(step):d} AS t"] if step else [])
    inner = query._aggregate(store, src, where, inner_keys, [
        "sum(octetDeltaCount) AS o", "sum(reverseOctetDeltaCount) AS ro", "sum(packetDeltaCount) AS p",
        "sum(reversePacketDeltaCount) AS rp", f"{query._RECORDS} AS n"])
    keys = [f"{DIMENSIONS[d].sql} AS k{i}" for i, d in enumerate(dims)] + (["t"] if step else [])
    names = [f"k{i}" for i in range(len(dims))] + (["t"] if step else [])
    select = ", ".join(keys + ["sum(o)", "sum(ro)", "sum(p)", "sum(rp)", "sum(n)"])
    group_by = f" GROUP BY {', '.join(names)}" if names else ""
    if limit_by is not None:
        n, k = int(limit_by[0]), int(limit_by[1])
        group_by += f" ORDER BY sum(o) + sum(ro) DESC LIMIT {n:d} BY {', '.join(names[:k])}"
    rows = store.rows(f"SELECT {select} FROM ({inner}){group_by}", params.values)
    n = len(dims)
    out = []
    for r in rows:
        bucket = int(r[n]) if step else 0
        o = n + (1 if step else 0)
        out.append(GroupRow(tuple(str(k) for k in r[:n]), bucket, int(r[o] or 0), int(r[o + 1] or 0),
                            int(r[o + 2] or 0), int(r[o + 3] or 0), int(r[o + 4] or 0)))
    return out, src.name


def _label(dim: str, key: str) -> str:
    return query.label(dim, key)


#: How far down each ranking :func:`pair_totals` keeps keys: any top N of a panel (at most
#: MAX_TOP) and whether there is one more.
_PAIR_RANKS: Final = MAX_TOP + 1


@dataclass(frozen=True, slots=True)
class PairTotals:
    """A scope's traffic from source keys to target keys (a sankey page's question), told by
    what its panels draw rather than every pair: each end's totals for its keys that rank in
    the top :data:`_PAIR_RANKS` by bytes sent, received or both, the pairs between keys that
    rank there at both ends (in one direction), and the grand total. Totals are
    (bytes sent, bytes received back, records with bytes sent, records with bytes back)."""

    pairs: dict[tuple[str, str], tuple[int, int, int]]  # (octets, reverse octets, records)
    sources: dict[str, tuple[int, int, int, int]]
    targets: dict[str, tuple[int, int, int, int]]
    total: tuple[int, int, int, int]
    table: str


def pair_totals(store: query.Backend, q: query.FlowQuery, source: str, target: str, *,
                now: Callable[[], float] = time.time) -> PairTotals:
    """One question, one scan: the (source, target) pairs are grouped and ranked in the store
    (window functions over the grouped pairs) and only the few hundred rows the panels
    need come back, not the tens of thousands of pairs of a 5,000-Pod cluster."""
    s_dim, t_dim = DIMENSIONS[source], DIMENSIONS[target]
    columns = list(dict.fromkeys(s_dim.columns + t_dim.columns))
    src, where, params, _, _ = query._where(store, q, frozenset(columns), now, 0)
    inner = query._aggregate(store, src, where, columns, [
        "sum(octetDeltaCount) AS o", "sum(reverseOctetDeltaCount) AS ro", f"{query._RECORDS} AS n"])
    pairs = (f"SELECT CAST({s_dim.sql} AS String) AS s, CAST({t_dim.sql} AS String) AS d, sum(o) AS o, "
             f"sum(ro) AS ro, sum(n) AS n FROM ({inner}) GROUP BY s, d")
    if not _recent_server(store):
        return _pair_totals_here(store.rows(pairs, params.values), src.name)
    sums = ", ".join(f"sum(o) OVER {w} AS {e}_tx, sum(ro) OVER {w} AS {e}_rx, sumIf(n, o > 0) OVER {w} AS {e}_ntx, "
                     f"sumIf(n, ro > 0) OVER {w} AS {e}_nrx" for e, w in (("s", "ws"), ("d", "wd"), ("g", "wg")))
    totals = (f"SELECT s, d, o, ro, n, {sums} FROM ({pairs}) "
              "WINDOW ws AS (PARTITION BY s), wd AS (PARTITION BY d), wg AS ()")
    ranks = ", ".join(f"dense_rank() OVER (ORDER BY {v} DESC, {e}) AS r{e}_{name}"
                      for e in ("s", "d") for name, v in (("tx", f"{e}_tx"), ("rx", f"{e}_rx"),
                                                          ("all", f"{e}_tx + {e}_rx")))
    m = _PAIR_RANKS
    elements = ", ".join((
        f"('p', s, d, o, ro, n, 0, (rs_tx <= {m} AND rd_tx <= {m}) OR (rs_rx <= {m} AND rd_rx <= {m}))",
        f"('s', s, '', s_tx, s_rx, s_ntx, s_nrx, least(rs_tx, rs_rx, rs_all) <= {m})",
        f"('d', '', d, d_tx, d_rx, d_ntx, d_nrx, least(rd_tx, rd_rx, rd_all) <= {m})",
        "('t', '', '', g_tx, g_rx, g_ntx, g_nrx, 1)"))
    x = [f"tupleElement(x, {i})" for i in range(1, 8)]
    rows = store.rows(
        f"SELECT {x[0]} AS kind, {x[1]} AS a, {x[2]} AS b, any({x[3]}), any({x[4]}), any({x[5]}), any({x[6]}) "
        f"FROM (SELECT arrayJoin(arrayFilter(x -> tupleElement(x, 8), [{elements}])) AS x "
        f"FROM (SELECT *, {ranks} FROM ({totals}))) GROUP BY kind, a, b", params.values)
    pairs_out: dict[tuple[str, str], tuple[int, int, int]] = {}
    ends: dict[str, dict[str, tuple[int, int, int, int]]] = {"s": {}, "d": {}}
    total = (0, 0, 0, 0)
    for kind, a, b, v1, v2, v3, v4 in rows:
        vals = (int(v1), int(v2), int(v3), int(v4))
        if kind == "p":
            pairs_out[(str(a), str(b))] = vals[:3]
        elif kind == "s":
            ends["s"][str(a)] = vals
        elif kind == "d":
            ends["d"][str(b)] = vals
        else:
            total = vals
    return PairTotals(pairs_out, ends["s"], ends["d"], total, src.name)


def node_traffic(store: query.Backend, q: query.FlowQuery, step: int, *,
                 now: Callable[[], float] = time.time) -> tuple[dict[tuple[str, int], list[tuple[int, ...]]], str]:
    """Per Node and ``step`` bucket, per flow type: the bytes the Node sent and received and its
    records, counting each record for both its Nodes (each row read once, its two ends
    spread by ``arrayJoin`` once grouped), Nodes without a name left out. One row per Node and bucket
    comes back. Returns {(Node, bucket): [(flow type, sent, received, records)]} and the table."""
    src, where, params, _, _ = query._where(
        store, q, frozenset(("flowType", "sourceNodeName", "destinationNodeName")), now, step)
    # Grouped by both Nodes first (the table's own LowCardinality columns; a few tens of
    # thousands of Node pairs and buckets), then each group spread to its two ends.
    inner = query._aggregate(store, src, where, [
        "flowType", "sourceNodeName", "destinationNodeName", f"intDiv({query._TIME}, {int(step):d}) * {int(step):d} AS t"],
        ["sum(octetDeltaCount) AS o", "sum(reverseOctetDeltaCount) AS ro", f"{query._RECORDS} AS n"])
    ends = ("SELECT flowType, t, arrayJoin([(0, toString(sourceNodeName), o, ro, n), "
            f"(1, toString(destinationNodeName), ro, o, n)]) AS e FROM ({inner})")
    rows = store.rows(
        "SELECT node, t, groupArray((toUInt8(flowType), sent, received, n)) FROM (SELECT tupleElement(e, 2) AS node, "
        "flowType, t, sum(tupleElement(e, 3)) AS sent, sum(tupleElement(e, 4)) AS received, sum(tupleElement(e, 5)) AS n "
        f"FROM ({ends}) WHERE node != '' GROUP BY node, flowType, t) GROUP BY node, t", params.values)
    return {(str(r[0]), int(r[1])): [tuple(c) for c in r[2]] for r in rows}, src.name


def pods_either_end(store: query.Backend, q: query.FlowQuery, n: int, *, now: Callable[[], float] = time.time
                    ) -> tuple[list[tuple[str, tuple[int, int, int, int]]], tuple[int, int, int, int], int, str]:
    """The ``n`` Pods that sent and received most as either end (what a Pod sent is its forward
    bytes as the source and its reverse bytes as the destination), ranked in the store
    from each end's own narrow roll-up (the source Pods' and the destination Pods'), one
    round trip: ``n`` rows back, not every Pod. Returns [(Pod, (sent, received, packets,
    records))], the totals over every Pod, how many Pods there are, and the tables."""
    sides = []
    params: dict[str, Any] = {}
    tables = []
    for dim, sent, received in (("srcPod", "o", "ro"), ("dstPod", "ro", "o")):
        d = DIMENSIONS[dim]
        src, where, p, _, _ = query._where(store, q, frozenset(d.columns), now, 0)
        for k, v in p.values.items():  # both ends bind the same filter, in the same order
            if params.setdefault(k, v) != v:
                raise query.QueryError(f"filter: the two ends bound {k} differently")
        tables.append(src.name)
        inner = query._aggregate(store, src, where, list(d.columns), [
            "sum(octetDeltaCount) AS o", "sum(reverseOctetDeltaCount) AS ro",
            "sum(packetDeltaCount + reversePacketDeltaCount) AS p", f"{query._RECORDS} AS n"])
        sides.append(f"SELECT CAST({d.sql} AS String) AS pod, {sent} AS s, {received} AS r, p, n FROM ({inner})")
    pods = (f"SELECT pod, sum(s) AS s, sum(r) AS r, sum(p) AS p, sum(n) AS n FROM ({' UNION ALL '.join(sides)}) "
            "WHERE pod != '' GROUP BY pod")
    rank = _rank_lambda_both()
    rows = store.rows(f"SELECT sum(s), sum(r), sum(p), sum(n), count(), arraySlice(arraySort({rank}, "
                      f"groupArray((pod, s, r, p, n))), 1, {int(n):d}) FROM ({pods})", params)
    if not rows:
        return [], (0, 0, 0, 0), 0, ",".join(sorted(set(tables)))
    r = rows[0]
    top = [(str(e[0]), (int(e[1]), int(e[2]), int(e[3]), int(e[4]))) for e in r[5]]
    return top, (int(r[0] or 0), int(r[1] or 0), int(r[2] or 0), int(r[3] or 0)), int(r[4]), ",".join(sorted(set(tables)))


def _rank_lambda_both() -> str:
    """Groups (key, sent, received, ...) by sent plus received descending, then the key."""
    return "x -> (-toInt64(tupleElement(x, 2) + tupleElement(x, 3)), tupleElement(x, 1))"


def _recent_server(store: query.Backend) -> bool:
    """Whether the server runs window functions and sums maps of text keys (ClickHouse 21.9 on,
    chDB; not Debian's 18.16, whose answers are then summed here from plainer questions)."""
    features = getattr(store, "features", None)
    return features is None or tuple(features.version) >= (21, 9)


def _pair_totals_here(rows: Sequence[Sequence[Any]], table: str) -> PairTotals:
    """:func:`pair_totals` from every grouped pair, summed here (a server without window
    functions): the same totals and, as the panels read them, the same pairs."""
    pairs: dict[tuple[str, str], tuple[int, int, int]] = {}
    ends: dict[str, dict[str, list[int]]] = {"s": {}, "d": {}}
    total = [0, 0, 0, 0]
    for s_key, d_key, o, ro, n in rows:
        o, ro, n = int(o or 0), int(ro or 0), int(n or 0)
        pairs[(str(s_key), str(d_key))] = (o, ro, n)
        for acc in (ends["s"].setdefault(str(s_key), [0, 0, 0, 0]), ends["d"].setdefault(str(d_key), [0, 0, 0, 0]), total):
            acc[0] += o
            acc[1] += ro
            acc[2] += n if o else 0
            acc[3] += n if ro else 0
    return PairTotals(pairs, {k: (v[0], v[1], v[2], v[3]) for k, v in ends["s"].items()},
                      {k: (v[0], v[1], v[2], v[3]) for k, v in ends["d"].items()},
                      (total[0], total[1], total[2], total[3]), table)


def _ranked(keys: Mapping[str, tuple[int, int, int, int]], value: Callable[[tuple[int, int, int, int]], int],
            n: int, *, nonzero: bool = True) -> list[str]:
    """The ``n`` first keys by ``value`` descending, then the key (the store's rank order)."""
    chosen = [k for k, v in keys.items() if value(v) > 0 or not nonzero]
    return sorted(chosen, key=lambda k: (-value(keys[k]), k))[:n]


def _fold(pt: PairTotals, direction: str, n: int) -> tuple[dict[tuple[str, str], list[int]], list[str], list[str]]:
    """A sankey's links in one direction: pairs between the ``n`` largest sources and the ``n``
    largest targets, each end's remainder to "other" and "other" to "other", from the
    totals (what a pair row would add to them is the end's total less its shown pairs).
    Returns the links ({(source, target): [bytes, records]}) and the shown keys."""
    i = 0 if direction == "tx" else 1
    keep_s = _ranked(pt.sources, lambda v: v[i], n)
    keep_d = _ranked(pt.targets, lambda v: v[i], n)
    ks, kd = set(keep_s), set(keep_d)
    merged: dict[tuple[str, str], list[int]] = {}
    shown_s = {k: [0, 0] for k in keep_s}
    shown_d = {k: [0, 0] for k in keep_d}

    def add(s: str, d: str, v: int, recs: int) -> None:
        if v > 0:
            m = merged.setdefault((s, d), [0, 0])
            m[0] += v
            m[1] += recs

    for (s, d), pair in sorted(pt.pairs.items()):
        v = pair[i]
        if s in ks and d in kd and v > 0:
            add(s, d, v, pair[2])
            for acc in (shown_s[s], shown_d[d]):
                acc[0] += v
                acc[1] += pair[2]
    for k in keep_s:
        add(k, OTHER, pt.sources[k][i] - shown_s[k][0], pt.sources[k][2 + i] - shown_s[k][1])
    for k in keep_d:
        add(OTHER, k, pt.targets[k][i] - shown_d[k][0], pt.targets[k][2 + i] - shown_d[k][1])
    add(OTHER, OTHER, pt.total[i] - sum(m[0] for m in merged.values()),
        pt.total[2 + i] - sum(m[1] for m in merged.values()))
    return merged, keep_s, keep_d


def pair_lines(store: query.Backend, q: query.FlowQuery, w: Window, ends: Mapping[str, Sequence[str]], *,
               now: Callable[[], float] = time.time) -> tuple[list[int], list[int], dict[str, dict[str, list[int]]], str]:
    """Per bucket of ``w.step``, the bytes (both directions) of a scope in total and of each of
    the given keys of each dimension (``ends``: {"srcPod": [...], "dstPod": [...]}), in one
    GROUP BY by bucket over one scan: the lines of a sankey page's two series. Returns
    (buckets, totals, {dimension: {key: values}}, table)."""
    dims = sorted(ends)
    step = int(w.step)
    first = w.start - w.start % step
    buckets = list(range(first, w.end, step))
    index = {t: i for i, t in enumerate(buckets)}
    totals = [0] * len(buckets)
    lines: dict[str, dict[str, list[int]]] = {d: {k: [0] * len(buckets) for k in ends[d]} for d in dims}
    if not _recent_server(store):  # an old server (18.16): one GROUP BY for the total and one per end
        table = ""
        for r in grouped(store, q, [], step=step, now=now)[0]:
            if r.bucket in index:
                totals[index[r.bucket]] += r.octets + r.reverse_octets
        for d in dims:
            rows_d, table = grouped(store, q, [d], step=step, only={d: ends[d]}, now=now)
            for r in rows_d:
                if r.bucket in index and r.keys[0] in lines[d]:
                    lines[d][r.keys[0]][index[r.bucket]] += r.octets + r.reverse_octets
        return buckets, totals, lines, table
    columns = frozenset(c for d in dims for c in DIMENSIONS[d].columns)
    src, where, params, start, end = query._where(store, q, columns, now, w.step)
    bytes_ = "(octetDeltaCount + reverseOctetDeltaCount)"
    maps = [f"sumMapIf([CAST({DIMENSIONS[d].sql} AS String)], [toUInt64({bytes_})], {_key_in(d, ends[d], params)}) "
            f"AS m{i}" for i, d in enumerate(dims)]
    inner = query._aggregate(store, src, where, [f"intDiv({query._TIME}, {step:d}) * {step:d} AS t"],
                             [f"sum({bytes_}) AS b", *maps])
    outer = ", ".join(f"sumMap(m{i})" for i in range(len(dims)))
    rows = store.rows(f"SELECT t, sum(b){', ' + outer if outer else ''} FROM ({inner}) GROUP BY t", params.values)
    for r in rows:
        i = index.get(int(r[0]))
        if i is None:
            continue
        totals[i] += int(r[1] or 0)
        for j, d in enumerate(dims):
            keys, values = r[2 + j]
            for k, v in zip(keys, values):
                if k in lines[d]:
                    lines[d][k][i] += int(v)
    return buckets, totals, lines, src.name


# --------------------------------------------------------------------------- the panels

class _Shared:
    """One page load's questions to the store, each asked once. A page's panels ask some
    questions twice or more (a sankey page's sankeys and series read one ranked question,
    the Node page's four charts another, the Overview's series and summary a third) and run
    concurrently: the first asks, the others wait for its answer. It lives as long as one request, so nothing it holds is older
    than the request that asked: no answer outlives the page load (or panel) it was for."""

    def __init__(self, store: query.Backend) -> None:
        self.store = store
        self.database = store.database
        self.table = store.table
        self._lock = threading.Lock()
        self._answers: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
        self._flights: dict[tuple[Any, ...], threading.Lock] = {}
        self.asked = 0  # questions that reached the store (the tests and the benchmark read it)

    @property
    def features(self) -> Any:
        """The store's server features (set when it opened): what SQL it runs."""
        return getattr(self.store, "features", None)

    def rows(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        key = (sql, tuple(sorted(params.items())))
        with self._lock:
            if key in self._answers:
                return list(self._answers[key])
            flight = self._flights.setdefault(key, threading.Lock())
        with flight:
            with self._lock:
                if key in self._answers:
                    return list(self._answers[key])
            rows = self.store.rows(sql, params)
            with self._lock:
                self._answers[key] = rows
                self._flights.pop(key, None)
                self.asked += 1
            return list(rows)


class Dashboards:
    """The panels of every page over one store (blocking: call from a worker thread)."""

    def __init__(self, store: query.Backend, *, now: Callable[[], float] = time.time, source: str = "auto") -> None:
        """``source``: which table answers (the query layer's choice by default; ``raw`` is
        the benchmark's peer)."""
        self.backend = store
        self.store: query.Backend = _Shared(store)
        self.now = now
        self.source = source

    def scoped(self) -> Dashboards:
        """The same dashboards for one request: its questions asked once each, and nothing
        kept for the next request."""
        return Dashboards(self.backend, now=self.now, source=self.source)

    @property
    def asked(self) -> int:
        """How many questions this scope sent to the store."""
        return self.store.asked  # type: ignore[attr-defined,no-any-return]

    # ---- request -> query

    @staticmethod
    def check(panel: str, params: Mapping[str, str]) -> None:
        """Refuse, by name, a parameter ``panel`` does not read."""
        known = PANEL_PARAMS[panel]
        unknown = sorted(set(params) - known)
        if unknown:
            raise PanelError(unknown[0], f"{unknown[0][:40]}: not a parameter of the {panel} panel; known: "
                                         f"{', '.join(sorted(known))}")

    def check_common(self, params: Mapping[str, str]) -> None:
        """Refuse a bad range, filter or policy field (what every panel of a page shares)."""
        self._query(params)

    def _query(self, params: Mapping[str, str], *, extra: str = "") -> tuple[query.FlowQuery, Window]:
        w = window_from_params(params, now=self.now)
        scope = _choice(params, "scope", "all", tuple(SCOPES))
        parts = []
        user = params.get("filter", "")
        if len(user) > 4096:
            raise PanelError("filter", "filter: longer than 4096 characters")
        if user.strip():
            # Parsed alone first, so its errors name the user's own columns.
            try:
                from flowscope.collector.filter import parse_filter

                parse_filter(user)
            except FilterError as exc:
                raise PanelError("filter", str(exc)) from None
            parts.append(f"({user})")
        for text in (SCOPES[scope], self._policy_filter(params, w), extra):
            if text:
                parts.append(f"({text})")
        try:
            q = query.FlowQuery(start=w.start, end=w.end, filter=" and ".join(parts), source=self.source)
        except query.QueryError as exc:
            raise PanelError(_error_field(exc), str(exc)) from None
        return q, w

    @staticmethod
    def _check_policy_names(params: Mapping[str, str]) -> None:
        for label in POLICY_PARAMS:
            value = params.get(label, "").strip()
            if len(value) > 253 or any(c in value for c in "/\n\r\t"):
                raise PanelError(label, f"{label}: {value[:40]!r} is not a Kubernetes name")

    def _policy_filter(self, params: Mapping[str, str], w: Window) -> str:
        """The Network Policy page's namespace and name fields, as filter text."""
        self._check_policy_names(params)
        parts = []
        for side in ("ingressPolicy", "egressPolicy"):
            ns = params.get(f"{side}Namespace", "").strip()
            name = params.get(f"{side}Name", "").strip()
            if ns and name:
                parts.append(f"{side} = {_quote(f'{ns}/{name}')}")
            elif name:
                parts.append(f"{side} = {_quote(name)}")
            elif ns:
                # No field holds a policy's namespace alone: name every policy of it seen in range.
                keys = [e.key for e in query.top(self.store, query.FlowQuery(
                    start=w.start, end=w.end, group=side, top=query.MAX_TOP), now=self.now).entries]
                inside = [k for k in keys if k.startswith(f"{ns}/")]
                values = ", ".join(_quote(k) for k in inside) or _quote(f"{ns}/")
                parts.append(f"{side} in ({values})")
        return " and ".join(parts)

    def _run(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (query.QueryError, FilterError) as exc:
            raise PanelError(_error_field(exc), str(exc)) from None

    # ---- panels

    def summary(self, params: Mapping[str, str]) -> dict[str, Any]:
        self.check("summary", params)
        q, w = self._query(params)
        # Records, bytes and packets from the page's verdict grid (the question its series ask
        # too); the distinct connections, Pods, Nodes, Services and namespaces from the
        # connection states, as query.overview reads them.
        rows, _ = self._verdict_grid(params, w)
        n = sum(r.records for r in rows)
        b = sum(r.octets + r.reverse_octets for r in rows)
        packets = sum(r.packets + r.reverse_packets for r in rows)
        names = ("srcPods", "dstPods", "srcNodes", "dstNodes", "services", "srcNamespaces", "dstNamespaces")
        counts = ("connections", "ended", "denied")
        start, end = w.start, w.end
        from flowscope.collector.filter import parse_filter

        if parse_filter(q.filter).sql == "1":  # no filter: the conn roll-ups hold the names' states too (one read)
            conns = found = self._run(lambda: query._states(self.store, q, start, end, counts + names + ("namespaces",),
                                                            "connections", self.now))[0]
        else:
            conns = self._run(lambda: query._states(self.store, q, start, end, counts, "connections", self.now))[0]
            found = self._run(lambda: query._states(self.store, q, start, end, names + ("namespaces",), "sums",
                                                    self.now))[0]
        c, ended, denied = (int(conns[k]) for k in counts)
        seconds = max(end - start, 1)
        return {
            "start": start, "end": end,
            "flows": n, "flowsPerSecond": round(n / seconds, 3),
            "octets": b, "octetsPerSecond": round(b * 8 / seconds, 3) / 8, "packets": packets,
            "connections": c, "active": max(c - ended, 0), "ended": ended, "denied": denied,
            "namespaces": found["namespaces"], "pods": found["srcPods"] + found["dstPods"],
            "nodes": max(found["srcNodes"], found["dstNodes"]), "services": found["services"],
        }

    def series(self, params: Mapping[str, str]) -> dict[str, Any]:
        self.check("series", params)
        metric = _choice(params, "metric", "throughput", ("throughput", "flows", "denied"))
        group = params.get("group") or None
        top = _int(params, "top", 8, 1, MAX_TOP)
        q, w = self._query(params, extra=SCOPES["denied"] if metric == "denied" else "")
        if group is not None and group != "node" and group not in DIMENSIONS:
            raise PanelError("group", f"group: {group!r} is not node or one of {', '.join(DIMENSIONS)}")
        by = "throughput" if metric == "throughput" else "records"
        scope = params.get("scope") or "all"
        if group == "node":
            s = self._node_series(params, by, top, w)
        elif metric == "throughput" and scope in SANKEY_ENDS and group in SANKEY_ENDS[scope]:
            s = self._pair_series(params, group, top, w)
        elif group is None or group in _VERDICT_DIMS:
            s = self._verdict_series(params, metric, group, top, w)
        else:
            s = self._run(lambda: query.series(self.store, q.with_(group=group, by=by, top=top, resolution=w.step),
                                               now=self.now))
        unit = "B/s" if by == "throughput" else "1/s" if metric == "flows" else "count"
        lines = []
        for line in s.lines:
            if by == "throughput":
                values = [v / 8 for v in line.values]  # bits/s -> bytes/s
            elif metric == "flows":
                values = [v / s.resolution for v in line.values]
            else:
                values = list(line.values)
            name = "other" if line.key == OTHER else line.label
            lines.append({"name": name, "key": line.key, "data": values})
        return {"times": [t * 1000 for t in s.buckets], "step": s.resolution, "unit": unit,
                "series": lines, "table": s.table}

    def _verdict_grid(self, params: Mapping[str, str], w: Window) -> tuple[list[GroupRow], str]:
        """Per bucket, per flow type and rule actions: one GROUP BY from which every series of
        few lines is read (by flow type, by rule action, in total, denied). A page's such
        series ask this one question (the Overview's three, for example): one scan."""
        q, _ = self._query({k: v for k, v in params.items() if k in _COMMON})
        return self._run(lambda: grouped(self.store, q, _VERDICT_DIMS, step=w.step, now=self.now))

    def _verdict_series(self, params: Mapping[str, str], metric: str, group: str | None, top: int,
                        w: Window) -> query.Series:
        """A series by flow type, rule action or in total, read from :meth:`_verdict_grid`;
        ``denied`` counts the records an ingress or egress rule dropped or rejected (what
        the filter ``action in (drop, reject)`` selects)."""
        rows, table = self._verdict_grid(params, w)
        first = w.start - w.start % w.step
        buckets = list(range(first, w.end, w.step))
        index = {t: i for i, t in enumerate(buckets)}
        at = _VERDICT_DIMS.index(group) if group else None
        acc: dict[str, list[float]] = {}
        for r in rows:
            i = index.get(r.bucket)
            if i is None:
                continue
            if metric == "denied" and not any(a.isdigit() and int(a) in DENY_ACTIONS for a in r.keys[1:]):
                continue
            value = r.octets + r.reverse_octets if metric == "throughput" else r.records
            line = acc.setdefault(r.keys[at] if at is not None else "", [0.0] * len(buckets))
            line[i] += value
        if metric == "throughput":  # bytes per bucket -> bits/s, as query.series gives them
            for vals in acc.values():
                for i, v in enumerate(vals):
                    vals[i] = v * 8 / w.step
        if at is None:
            lines = [query.SeriesLine("total", "total", acc[""])] if acc else []
        else:
            ranked = sorted(acc, key=lambda k: (-sum(acc[k]), k))
            lines = [query.SeriesLine(k, query.label(group, k), acc[k]) for k in ranked[:top]]
            if len(ranked) > top:
                rest = [sum(vals) for vals in zip(*(acc[k] for k in ranked[top:]))]
                lines.append(query.SeriesLine(OTHER, "(other)", rest))
        by = "throughput" if metric == "throughput" else "records"
        return query.Series(group, by, w.step, buckets, lines, table)

    def _node_cells(self, params: Mapping[str, str], w: Window) -> tuple[dict[tuple[str, int], list[tuple[int, ...]]], str]:
        """Per Node and bucket, what it sent and received and its records, as either end (an
        inter-Node flow counts for both Nodes), per flow type, in the page's scope: for every
        type, inter-Node or intra-Node; the one question the Node Throughput page's lines and
        heatmaps all share (one scan of the table, both ends at once). Returns
        {(Node, bucket): [(flow type, sent, received, records), ...]} and the table, and keeps
        only the flow types of the scope."""
        scope = _choice(params, "scope", "all", tuple(SCOPES))
        types = _NODE_SCOPES.get(scope)
        keep = {k: v for k, v in params.items() if k in _COMMON and (k != "scope" or scope not in _NODE_SCOPES)}
        q, _ = self._query(keep)
        cells, table = self._run(lambda: node_traffic(self.store, q, w.step, now=self.now))
        if types is None:
            return cells, table
        wanted = {int(t) for t in types}
        return {k: [c for c in v if c[0] in wanted] for k, v in cells.items()}, table

    def _node_series(self, params: Mapping[str, str], by: str, top: int, w: Window) -> query.Series:
        """What went through each Node, as either end (an inter-Node flow counts for both)."""
        first = w.start - w.start % w.step
        buckets = list(range(first, w.end, w.step))
        index = {t: i for i, t in enumerate(buckets)}
        merged: dict[str, list[float]] = {}
        cells, table = self._node_cells(params, w)
        for (node, t), parts in cells.items():
            i = index.get(t)
            if i is None or not parts:
                continue
            acc = merged.setdefault(node, [0.0] * len(buckets))
            for _, sent, received, records in parts:
                acc[i] += (sent + received) * 8 / w.step if by == "throughput" else records
        ranked = sorted(merged, key=lambda k: (-sum(merged[k]), k))
        lines = [query.SeriesLine(k, k, merged[k]) for k in ranked[:top]]
        if len(ranked) > top:
            rest = [sum(vals) for vals in zip(*(merged[k] for k in ranked[top:]))]
            lines.append(query.SeriesLine(OTHER, "(other)", list(rest)))
        return query.Series("node", by, w.step, buckets, lines, table)

    def top(self, params: Mapping[str, str]) -> dict[str, Any]:
        self.check("top", params)
        group = params.get("group") or "srcPod"
        n = _int(params, "n", 10, 1, MAX_TOP)
        q, _ = self._query(params)
        if group == "pod":  # either end: what each Pod sent and received, as source or destination
            return self._top_pods(q, n)
        if group not in DIMENSIONS:
            raise PanelError("group", f"group: {group!r} is not pod or one of {', '.join(DIMENSIONS)}")
        rows, table = self._run(lambda: grouped(self.store, q, [group], now=self.now))
        entries = [(_label(group, r.keys[0]), r.keys[0], r.octets, r.reverse_octets, r.packets + r.reverse_packets,
                    r.records) for r in rows if r.keys[0] != ""]
        return _top_json(entries, n, table)

    def _top_pods(self, q: query.FlowQuery, n: int) -> dict[str, Any]:
        top, total, groups, table = self._run(lambda: pods_either_end(self.store, q, n, now=self.now))

        def row(name: str, v: Sequence[int]) -> dict[str, Any]:
            return {"name": name, "key": name, "octets": v[0], "reverseOctets": v[1], "packets": v[2], "flows": v[3]}

        other = None
        if groups > len(top):
            other = {**row("other", [t - sum(e[1][i] for e in top) for i, t in enumerate(total)]),
                     "key": OTHER, "groups": groups - len(top)}
        return {"rows": [row(k, v) for k, v in top], "other": other, "table": table}

    def sankey(self, params: Mapping[str, str]) -> dict[str, Any]:
        self.check("sankey", params)
        scope = _choice(params, "scope", "pod-to-pod", ("pod-to-pod", "pod-to-service", "pod-to-external", "policy"))
        direction = _choice(params, "dir", "tx", ("tx", "rx"))
        n = _int(params, "n", 15, 1, MAX_TOP)
        q, w = self._query(params)
        if scope == "policy":
            return self._policy_sankey(q, n)
        target = SANKEY_ENDS[scope][1]
        pt = self._pair_totals(q, scope)
        links, keep_s, keep_d = _fold(pt, direction, n)
        # The tooltips' addresses: of the Pods (and Services) either direction's sankey shows,
        # so that the Tx and Rx sankeys of a page ask one question.
        shown = [_fold(pt, d, n)[1:] for d in ("tx", "rx")]
        ips = self._ips(q, scope, sorted({k for s, _ in shown for k in s}), sorted({k for _, d in shown for k in d}))
        return _sankey_json(links, "srcPod", target, ips, pt.table)

    def _pair_totals(self, q: query.FlowQuery, scope: str) -> PairTotals:
        """The question a sankey page's sankeys and series share (:func:`pair_totals`)."""
        source, target = SANKEY_ENDS[scope]
        return self._run(lambda: pair_totals(self.store, q, source, target, now=self.now))  # type: ignore[no-any-return]

    def _pair_series(self, params: Mapping[str, str], group: str, top: int, w: Window) -> query.Series:
        """A series of a sankey page (throughput per source or per target in its scope): the
        keys ranked by :meth:`_pair_totals` (the sankeys' question), then one GROUP BY by
        bucket for the top keys of both ends and the total (shared by the page's two series)."""
        scope = params.get("scope") or "all"
        q, _ = self._query({k: v for k, v in params.items() if k in _COMMON})
        pt = self._pair_totals(q, scope)
        source, target = SANKEY_ENDS[scope]
        both = lambda v: v[0] + v[1]  # noqa: E731
        ranked = {source: _ranked(pt.sources, both, top + 1, nonzero=False),
                  target: _ranked(pt.targets, both, top + 1, nonzero=False)}
        ends = {d: keys[:top] for d, keys in ranked.items()}
        buckets, totals, lines, table = self._run(
            lambda: pair_lines(self.store, q, w, ends, now=self.now))
        out = [query.SeriesLine(k, query.label(group, k), [float(v) for v in lines[group][k]]) for k in ends[group]]
        if len(ranked[group]) > top:
            out.append(query.SeriesLine(OTHER, "(other)", [float(t - sum(line.values[i] for line in out))
                                                           for i, t in enumerate(totals)]))
        for line in out:  # bytes per bucket -> bits/s, as query.series gives them
            line.values[:] = [round(v * 8 / w.step, 3) for v in line.values]
        return query.Series(group, "throughput", w.step, buckets, out, table)

    def _ips(self, q: query.FlowQuery, scope: str, sources: Sequence[str], targets: Sequence[str]
             ) -> dict[tuple[str, str], list[str]]:
        """IP addresses behind the sankey's shown nodes, for the tooltips (from the address
        roll-ups: the main ones keep no addresses)."""
        out: dict[tuple[str, str], set[str]] = {}
        if q.start is not None and q.end is not None and q.end - q.start > IP_WINDOW:
            q = q.with_(start=q.end - IP_WINDOW)  # addresses seen lately
        pairs = [("srcPod", "srcIP", "s", sources)]
        if scope == "pod-to-pod":
            pairs.append(("dstPod", "dstIP", "d", targets))
        elif scope == "pod-to-service":
            pairs.append(("service", "dstIP", "d", targets))
        for dim, ip_dim, side, keys in pairs:
            keys = [k for k in keys if k and k != OTHER]
            if not keys:
                continue
            rows, _ = self._run(lambda dim=dim, ip_dim=ip_dim, keys=keys: grouped(
                self.store, q, [dim, ip_dim], only={dim: keys}, now=self.now))
            for r in rows:
                if r.keys[0] and r.keys[1]:
                    out.setdefault((side, r.keys[0]), set()).add(r.keys[1])
        return {k: sorted(v)[:8] for k, v in out.items()}

    def _policy_sankey(self, q: query.FlowQuery, n: int) -> dict[str, Any]:
        # The links (policy pairs and their verdicts); their largest Pod pairs are the
        # tooltips', asked when one is hovered (:meth:`pairs`), not with every page load.
        dims = ["egressPolicy", "ingressPolicy", "egressAction", "ingressAction"]
        rows, table = self._run(lambda: grouped(self.store, q, dims, now=self.now))
        links: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            eg, ing, eg_act, in_act = r.keys
            link = links.setdefault((eg, ing), {"bytes": 0, "records": 0, "denied": 0})
            link["bytes"] += r.octets + r.reverse_octets
            link["records"] += r.records
            if any(a.isdigit() and RULE_ACTIONS.get(int(a), "").lower() in ("drop", "reject") for a in (eg_act, in_act)):
                link["denied"] += r.records
        # Denied links first: they must show however small they are.
        ranked = sorted(links.items(), key=lambda kv: (0 if kv[1]["denied"] else 1, -kv[1]["bytes"], kv[0]))
        shown, rest = ranked[:n], ranked[n:]
        total = sum(v["bytes"] for v in links.values()) or 1
        nodes: dict[str, dict[str, Any]] = {}
        out_links = []

        def node(side: str, key: str) -> str:
            name = f"{side}:{key}"
            if name not in nodes:
                what = "egress" if side == "e" else "ingress"
                label = key if key and key != OTHER else ("(other)" if key == OTHER else f"(no {what} policy)")
                drill = (f"{what}Policy = {_quote(key)}" if key and key != OTHER else None)
                nodes[name] = {"name": name, "label": label, "side": side, "detail": [f"{what} policy"],
                               "filter": drill, "other": key == OTHER}
            return name

        for (eg, ing), v in shown:
            conds = [f"egressPolicy = {_quote(eg)}" if eg else 'egressPolicy = ""',
                     f"ingressPolicy = {_quote(ing)}" if ing else 'ingressPolicy = ""']
            s, t = node("e", eg), node("i", ing)
            if v["denied"]:
                nodes[t]["denied"] = True
            out_links.append({
                "source": s, "target": t,
                # a floor so a denied link with a handful of bytes is still drawn
                "value": max(v["bytes"], math.ceil(total * 0.04)), "bytes": v["bytes"], "records": v["records"],
                "denied": v["denied"], "detail": [], "pairs": {"egress": eg, "ingress": ing},
                "filter": " and ".join(conds),
            })
        if rest:
            b = sum(v["bytes"] for _, v in rest)
            out_links.append({"source": node("e", OTHER), "target": node("i", OTHER),
                              "value": max(b, 1), "bytes": b, "records": sum(v["records"] for _, v in rest),
                              "denied": sum(v["denied"] for _, v in rest), "detail": [], "filter": None})
        return {"nodes": list(nodes.values()), "links": out_links, "table": table}

    def pairs(self, params: Mapping[str, str]) -> dict[str, Any]:
        """The largest Pod pairs of one link of the policy sankey (``egress`` policy to
        ``ingress`` policy, "" for none), with their bytes (both directions), records and
        rule actions: the link's tooltip."""
        self.check("pairs", params)
        sides = {}
        for side in ("egress", "ingress"):
            key = params.get(side, "")
            if len(key) > 512 or any(c in key for c in "\n\r\t"):
                raise PanelError(side, f"{side}: {key[:40]!r} is not a policy")
            sides[side] = f"{side}Policy = {_quote(key)}"
        q, _ = self._query({k: v for k, v in params.items() if k not in ("egress", "ingress")},
                           extra=" and ".join(sides.values()))
        dims = ["egressPolicy", "srcPod", "dstPod", "egressAction", "ingressAction"]
        rows, table = self._run(lambda: grouped(self.store, q, dims, limit_by=(8, 1), now=self.now))
        pairs = []
        for r in sorted(rows, key=lambda r: (-(r.octets + r.reverse_octets), r.keys))[:8]:
            _, sp, dp, ea, ia = r.keys
            # numbers, not text: the page formats bytes with the one formatter it uses everywhere
            pairs.append({"source": sp or "(external)", "destination": dp or "(external)",
                          "octets": r.octets + r.reverse_octets, "records": r.records,
                          "egressAction": _label("egressAction", ea), "ingressAction": _label("ingressAction", ia)})
        return {"pairs": pairs, "table": table}

    def heatmap(self, params: Mapping[str, str]) -> dict[str, Any]:
        self.check("heatmap", params)
        direction = _choice(params, "dir", "tx", ("tx", "rx"))
        _, w = self._query(params)
        parts, table = self._node_cells(params, w)
        # At most HEATMAP_COLUMNS columns: whole multiples of the page's step (the question the
        # lines ask too), so that a Node's row stays a few dozen cells a browser draws at once.
        step = w.step * -(-len(range(w.start - w.start % w.step, w.end, w.step)) // HEATMAP_COLUMNS)
        cells: dict[tuple[str, int], int] = {}
        for (node, t), v in parts.items():
            if v:
                key = (node, t - t % step)
                cells[key] = cells.get(key, 0) + sum(p[1] if direction == "tx" else p[2] for p in v)
        nodes = sorted({k[0] for k in cells})
        first = w.start - w.start % step
        buckets = list(range(first, w.end, step))
        index = {t: i for i, t in enumerate(buckets)}
        row_of = {n: i for i, n in enumerate(nodes)}
        out = []
        peak = 0.0
        for (node, t), octets in cells.items():
            if t not in index:
                continue
            mbps = round(octets * 8 / step / 1e6, 6)
            peak = max(peak, mbps)
            out.append([index[t], row_of[node], mbps])
        return {"times": [t * 1000 for t in buckets], "nodes": nodes, "cells": sorted(out), "max": peak,
                "step": step, "unit": "Mbps", "table": table}

    def flows(self, params: Mapping[str, str]) -> dict[str, Any]:
        self.check("flows", params)
        fmt = _choice(params, "format", "page", ("page", "json", "csv"))
        q, _ = self._query(params)
        if fmt != "page":
            page = self._run(lambda: query.flows(self.store, q.with_(limit=EXPORT_LIMIT), now=self.now))
            return {"rows": page.records, "more": page.more, "total": len(page.records)}
        limit = _int(params, "limit", 50, 1, MAX_PAGE_LIMIT)
        number = _int(params, "page", 1, 1, 1_000_000)
        page = self._run(lambda: query.flows(self.store, q.with_(limit=limit, offset=(number - 1) * limit),
                                             now=self.now))
        return {"rows": page.records, "page": number, "limit": limit, "more": page.more,
                "total": self._records_total(params)}

    def _records_total(self, params: Mapping[str, str]) -> int:
        """How many records the range, filter and scope hold, read from the page's
        :meth:`_verdict_grid` (the question its series ask too); the ``denied`` scope is
        the grid's dropped and rejected records."""
        scope = params.get("scope") or "all"
        denied = scope == "denied"
        _, w = self._query(params)
        keep = {k: v for k, v in params.items() if k in _COMMON and not (denied and k == "scope")}
        rows, _ = self._verdict_grid(keep, w)
        return sum(r.records for r in rows
                   if not denied or any(a.isdigit() and int(a) in DENY_ACTIONS for a in r.keys[1:]))

    def values(self, params: Mapping[str, str]) -> dict[str, Any]:
        """Known values of one of the Network Policy page's fields, within the range."""
        self.check("values", params)
        self._check_policy_names(params)
        fld = _choice(params, "field", "", tuple(POLICY_PARAMS))
        side, part = POLICY_PARAMS[fld]
        clean = {k: v for k, v in params.items() if k != "field" and k not in POLICY_PARAMS}
        q, _ = self._query(clean)
        result = self._run(lambda: query.top(self.store, q.with_(group=side, top=query.MAX_TOP), now=self.now))
        keys = [e.key for e in result.entries if e.key]
        values = sorted({k.split("/", 1)[0] if part == "namespace" else k.split("/", 1)[-1] for k in keys if "/" in k}
                        | ({k for k in keys if "/" not in k} if part == "name" else set()))
        return {"field": fld, "values": values}

    # ---- completion of the filter box

    def complete(self, params: Mapping[str, str]) -> dict[str, Any]:
        self.check("complete", params)
        text = params.get("q", "")
        if len(text) > 4096:
            raise PanelError("q", "q: longer than 4096 characters")
        pos = _int(params, "pos", len(text), 0, len(text))
        clean = {k: v for k, v in params.items() if k in ("since", "from", "to")}
        _, w = self._query(clean)
        return complete_filter(self.store, text, pos, w, now=self.now)


def _si_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n} B"


def _top_json(entries: list[tuple[str, str, int, int, int, int]], n: int, table: str) -> dict[str, Any]:
    entries.sort(key=lambda e: (-(e[2] + e[3]), e[0]))

    def row(e: tuple[str, str, int, int, int, int]) -> dict[str, Any]:
        return {"name": e[0], "key": e[1], "octets": e[2], "reverseOctets": e[3], "packets": e[4], "flows": e[5]}

    rest = entries[n:]
    other = None
    if rest:
        other = {"name": "other", "key": OTHER, "octets": sum(e[2] for e in rest),
                 "reverseOctets": sum(e[3] for e in rest), "packets": sum(e[4] for e in rest),
                 "flows": sum(e[5] for e in rest), "groups": len(rest)}
    return {"rows": [row(e) for e in entries[:n]], "other": other, "table": table}


def _sankey_json(merged: Mapping[tuple[str, str], list[int]], source_dim: str, target_dim: str,
                 ips: Mapping[tuple[str, str], list[str]], table: str) -> dict[str, Any]:
    """The nodes and links of a sankey from its folded links (:func:`_fold`), largest first."""
    field = {"srcPod": "srcPod", "dstPod": "dstPod", "service": "service", "dstIP": "dstIP"}
    nodes: dict[str, dict[str, Any]] = {}

    def node(side: str, dim: str, key: str) -> str:
        name = f"{side}:{key}"
        if name not in nodes:
            is_other = key == OTHER
            label = "(other)" if is_other else _label(dim, key)
            detail = [f"IP {', '.join(ips[(side, key)])}"] if (side, key) in ips else []
            nodes[name] = {"name": name, "label": label, "side": side, "detail": detail, "other": is_other,
                           "filter": None if is_other or not key else f"{field[dim]} = {_quote(key)}"}
        return name

    out = []
    for (s, d), (v, recs) in sorted(merged.items(), key=lambda kv: (-kv[1][0], kv[0])):
        a, b = node("s", source_dim, s), node("d", target_dim, d)
        conds = [nodes[a]["filter"], nodes[b]["filter"]]
        out.append({"source": a, "target": b, "value": v, "records": recs,
                    "filter": " and ".join(c for c in conds if c) or None,
                    "detail": [f"{recs} flow records"]})
    return {"nodes": list(nodes.values()), "links": out, "table": table}


# --------------------------------------------------------------------------- completion

_OPERATORS: Final = ("=", "!=", "~", "in", "not in", "<", ">", "<=", ">=")
_ENUM_VALUES: Final = {
    "action": [n.lower() for n in RULE_ACTIONS.values() if n] + ["none"],
    "type": [n for n in FLOW_TYPES.values() if n],
    "protocol": list(PROTOCOLS.values()),
}


def _tokens(text: str) -> list[tuple[str, int, int]]:
    """A forgiving split of the filter text into (token, start, end), quotes kept whole
    (an unclosed quote runs to the end): enough to know what the cursor is completing."""
    out = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c in "\"'":
            j = i + 1
            while j < len(text) and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, len(text))
        elif c in "(),":
            j = i + 1
        elif c in "=!<>~":
            j = i + 1
            while j < len(text) and text[j] in "=":
                j += 1
        else:
            j = i
            while j < len(text) and not text[j].isspace() and text[j] not in "()\"',=!<>~":
                j += 1
        out.append((text[i:j], i, j))
        i = j
    return out


def complete_filter(store: query.Backend, text: str, pos: int, w: Window, *,
                    now: Callable[[], float] = time.time, limit: int = 20) -> dict[str, Any]:
    """Suggestions for the token at ``pos``: a field, an operator, a value (from the store:
    namespaces, Pods, Nodes, Services, policies; names for enumerations) or a keyword.
    Returns ``{"from", "to", "suggestions": [{"value", "kind"}]}``; ``from``/``to`` is the
    span of the text a suggestion replaces."""
    before = text[:pos]
    toks = _tokens(before)
    current = ""
    start = pos
    if toks and toks[-1][2] == pos and not before.endswith((" ", "(", ",")) and toks[-1][0] not in "(),":
        current, start, _ = toks[-1]
        toks = toks[:-1]
    end = pos
    while end < len(text) and not text[end].isspace() and text[end] not in "(),":
        end += 1
    words = [t[0] for t in toks]
    expect = "field"
    fld: str | None = None
    i = 0
    while i < len(words):
        w_ = words[i]
        if expect == "field":
            if w_.lower() == "not" or w_ == "(":
                pass
            else:
                fld = w_
                expect = "operator"
        elif expect == "operator":
            if w_.lower() == "not":
                pass
            elif w_.lower() == "in":
                expect = "list"
            else:
                expect = "value"
        elif expect == "list":
            if w_ == "(" or w_ == ",":
                expect = "listvalue"
            elif w_ == ")":
                expect = "connective"
        elif expect == "listvalue":
            expect = "list"
        elif expect == "value":
            expect = "connective"
        elif expect == "connective":
            if w_.lower() in ("and", "or"):
                expect = "field"
            elif w_ == ")":
                pass
        i += 1
    if expect == "listvalue" or (expect == "list" and words and words[-1] in ("(", ",")):
        expect = "value"
    suggestions: list[dict[str, str]] = []
    low = current.lower()
    if expect == "field":
        suggestions = [{"value": f, "kind": "field"} for f in FIELDS if f.lower().startswith(low)]
        if "not".startswith(low) and low:
            suggestions.append({"value": "not", "kind": "keyword"})
    elif expect == "operator":
        suggestions = [{"value": op, "kind": "operator"} for op in _OPERATORS if op.startswith(low)]
    elif expect == "connective":
        suggestions = [{"value": k, "kind": "keyword"} for k in ("and", "or") if k.startswith(low)]
    elif expect == "value" and fld in FIELDS:
        suggestions = _value_suggestions(store, FIELDS[fld].name, FIELDS[fld].kind, current, w, now=now, limit=limit)
    return {"from": start, "to": end, "suggestions": suggestions[:limit]}


_COMPLETE_DIMS: Final = {
    "namespace": ("srcNamespace", "dstNamespace"), "srcNamespace": ("srcNamespace",), "dstNamespace": ("dstNamespace",),
    "pod": ("srcPod", "dstPod"), "srcPod": ("srcPod",), "dstPod": ("dstPod",),
    "workload": ("srcWorkload", "dstWorkload"), "srcWorkload": ("srcWorkload",), "dstWorkload": ("dstWorkload",),
    "node": ("srcNode", "dstNode"), "srcNode": ("srcNode",), "dstNode": ("dstNode",),
    "service": ("service",),
    "policy": ("ingressPolicy", "egressPolicy"), "ingressPolicy": ("ingressPolicy",), "egressPolicy": ("egressPolicy",),
    "ip": ("srcIP", "dstIP"), "srcIP": ("srcIP",), "dstIP": ("dstIP",),
}


def _value_suggestions(store: query.Backend, fld: str, kind: str, current: str, w: Window, *,
                       now: Callable[[], float], limit: int) -> list[dict[str, str]]:
    prefix = current.lstrip("\"'")
    if kind in _ENUM_VALUES:
        return [{"value": v, "kind": fld} for v in _ENUM_VALUES[kind] if v.startswith(prefix.lower())]
    dims = _COMPLETE_DIMS.get(fld)
    if not dims:
        return []
    seen: dict[str, int] = {}
    for dim in dims:
        result = query.top(store, query.FlowQuery(start=w.start, end=w.end, group=dim, by="records",
                                                  top=query.MAX_TOP), now=now)
        for e in result.entries:
            if e.key and e.key.startswith(prefix):
                seen[e.key] = seen.get(e.key, 0) + e.records
            elif e.key and "/" in e.key and e.key.split("/", 1)[1].startswith(prefix):
                seen[e.key] = seen.get(e.key, 0) + e.records
    ranked = sorted(seen, key=lambda k: (-seen[k], k))[:limit]
    return [{"value": _quote(k), "kind": fld} for k in ranked]
