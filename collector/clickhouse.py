"""The ClickHouse flow store: where aggregated flow records are kept for dashboards and queries.

Antrea's Flow Aggregator writes every aggregated record to ClickHouse and its dashboards
read them from there; this module is flowscope's side of that table. It owns four things:

*The schema* (:data:`COLUMNS`): one column per information element of the aggregated
record, derived from :func:`flowscope.ipfix.antrea.aggregator_fields` and the IE registry's
types, so the table follows the record. IPv4 and IPv6 records share one table: the
family-specific address elements (``sourceIPv4Address`` / ``sourceIPv6Address`` and the
other three pairs) fold into one String column each (``sourceIP``, ``destinationIP``,
``destinationClusterIP``, ``originalExporterIP``), which every backend understands and
every dashboard can group by; the family comes back from the text (a ``:`` is IPv6), so
:func:`row_to_record` rebuilds the original IE dict exactly. dateTimeSeconds elements are
``DateTime``, counters ``UInt64``, names ``String``. Added to the record: ``timeInserted``
(when the row was committed), ``correlation`` (the aggregator's correlation state),
``final`` (no more records for this flow) and ``commitId`` (which commit wrote the row,
so a retry after an unanswered insert can tell whether that insert landed).

*The table* is created idempotently (``CREATE DATABASE/TABLE IF NOT EXISTS``), a
``MergeTree`` partitioned by day and ordered by ``(timeInserted, flowEndSeconds)`` so the
dashboards' time-window queries read only the parts they need. The SQL stays within what
ClickHouse 18.16 (Debian's server, 2018) understands: no ``LowCardinality``, no IP domain
types, no ``TTL``; retention is ``ALTER TABLE ... DROP PARTITION``. An existing table that
lacks columns is reported by name rather than written into wrongly.

*Rows*: :func:`flows_to_columns` turns a batch of ExportedFlows into columns (the form
both backends insert fastest), checking every value's type and range; a record with a
value the column cannot hold is left out and counted, never sent to fail the whole insert.

*Two backends behind one interface* (:class:`FlowStore`): a ClickHouse server over the
native protocol (clickhouse-driver; ``tcp://HOST[:PORT][/DATABASE]``, also spelled
``clickhouse://``), and chDB, ClickHouse in-process (``chdb://`` a temporary directory,
``chdb:///DIR`` on disk). Methods are blocking; the aggregator's sink calls them from a
worker thread. Both share the query API dashboards and the CLI use: :meth:`FlowStore.recent_flows`,
:meth:`FlowStore.top_talkers`, :meth:`FlowStore.policy_verdicts`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter, itemgetter, methodcaller
from typing import Any, Literal
from urllib.parse import unquote

from flowscope.ipfix import DataType, default_registry
from flowscope.ipfix.antrea import aggregator_fields

__all__ = [
    "ADDRESS_FORMS",
    "COLUMNS",
    "COLUMN_NAMES",
    "TALKER_KEYS",
    "AddressError",
    "ChdbStore",
    "Column",
    "FlowStore",
    "PolicyVerdict",
    "SchemaError",
    "ServerStore",
    "StoreAddress",
    "StoreError",
    "StoredFlow",
    "Talker",
    "check_identifier",
    "create_statements",
    "flows_to_columns",
    "open_store",
    "parse_store_address",
    "row_to_record",
]

ADDRESS_FORMS = \
    "tcp://HOST[:PORT][/DATABASE], clickhouse://HOST[:PORT][/DATABASE], chdb:// (temporary) or chdb:///DIR"
DEFAULT_PORT = 9000


class StoreError(Exception):
    """The store cannot be used as configured (a caller's mistake, not a passing outage)."""


class AddressError(StoreError, ValueError):
    """A store address that is not one of :data:`ADDRESS_FORMS`."""


class SchemaError(StoreError):
    """The table exists but cannot hold flowscope's rows."""


# --------------------------------------------------------------------------- address

@dataclass(frozen=True, slots=True)
class StoreAddress:
    """Where the flow store lives: a server (host, port) or chDB (a directory, or memory)."""

    kind: Literal["server", "chdb"]
    host: str = ""
    port: int = DEFAULT_PORT
    database: str | None = None  # from the address path; None: the configured database
    path: str | None = None  # chDB directory; None: a temporary one

    def __str__(self) -> str:
        if self.kind == "chdb":
            return f"chdb://{self.path or ''}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}" + (f"/{self.database}" if self.database else "")


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_identifier(value: str, field: str) -> str:
    """A database or table name: letters, digits and _, not starting with a digit."""
    if not isinstance(value, str) or not _IDENT.match(value):
        raise StoreError(f"{field}: {value!r} is not a valid name; use letters, digits and _ (not starting with a digit)")
    return value


def parse_store_address(text: str, field: str = "sinks.clickhouse.address") -> StoreAddress:
    """Parse ``tcp://HOST[:PORT][/DATABASE]`` (or ``clickhouse://``), ``chdb://`` or ``chdb:///DIR``."""

    def bad(why: str) -> AddressError:
        return AddressError(f"{field}: {text!r} {why}; allowed forms: {ADDRESS_FORMS}")

    if not isinstance(text, str) or "://" not in text:
        raise bad("has no scheme")
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme == "chdb":
        if rest in ("", "/"):
            return StoreAddress("chdb")
        if not rest.startswith("/"):
            raise bad("names a relative or host path; chDB takes an absolute directory after chdb:// (chdb:///DIR)")
        return StoreAddress("chdb", path=unquote(rest))
    if scheme not in ("tcp", "clickhouse"):
        raise bad(f"has the scheme {scheme!r}")
    if "?" in rest or "#" in rest or "@" in rest:
        raise bad("carries credentials or options; credentials come from CLICKHOUSE_USERNAME / CLICKHOUSE_PASSWORD")
    hostport, _, path = rest.partition("/")
    database = path.strip("/") or None
    if database is not None and not _IDENT.match(database):
        raise bad(f"names the database {database!r}, not a valid name (letters, digits, _)")
    if hostport.startswith("["):
        host, sep, tail = hostport[1:].partition("]")
        if not sep or not host:
            raise bad("has an unclosed IPv6 bracket")
        if tail and not tail.startswith(":"):
            raise bad("has text after the IPv6 address")
        port_text = tail[1:] if tail else ""
    else:
        host, _, port_text = hostport.partition(":")
        if ":" in port_text:
            raise bad("has an IPv6 address without brackets (use tcp://[ADDR]:PORT)")
    if not host or any(c.isspace() for c in host):
        raise bad("has no host")
    port = DEFAULT_PORT
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise bad(f"has the port {port_text!r}, not 1-65535")
        port = int(port_text)
    return StoreAddress("server", host=host, port=port, database=database)


# --------------------------------------------------------------------------- schema

@dataclass(frozen=True, slots=True)
class Column:
    """A table column and the record element(s) it holds (IPv4 name, IPv6 name for folded addresses)."""

    name: str
    type: str
    elements: tuple[str, ...]

    @property
    def is_int(self) -> bool:
        return self.type.startswith("UInt") or self.type == "DateTime"

    @property
    def maximum(self) -> int:
        return (1 << _BITS[self.type]) - 1


_TYPES = {
    DataType.unsigned8: "UInt8", DataType.unsigned16: "UInt16", DataType.unsigned32: "UInt32",
    DataType.unsigned64: "UInt64", DataType.dateTimeSeconds: "DateTime", DataType.string: "String",
    DataType.ipv4Address: "String", DataType.ipv6Address: "String",
}
# Address elements of both families folded into one column.
_FOLDED = {
    "sourceIPv4Address": ("sourceIP", "sourceIPv6Address"),
    "destinationIPv4Address": ("destinationIP", "destinationIPv6Address"),
    "destinationClusterIPv4": ("destinationClusterIP", "destinationClusterIPv6"),
    "destinationServiceIPv4": ("destinationServiceIP", "destinationServiceIPv6"),
    "proxySnatIPv4": ("proxySnatIP", "proxySnatIPv6"),
    "originalExporterIPv4Address": ("originalExporterIP", "originalExporterIPv6Address"),
}


def _build_columns() -> tuple[Column, ...]:
    reg = default_registry()
    cols = [Column("timeInserted", "DateTime", ())]
    for name in aggregator_fields(4):
        if name in _FOLDED:
            col, v6 = _FOLDED[name]
            cols.append(Column(col, "String", (name, v6)))
        else:
            cols.append(Column(name, _TYPES[reg.get(name).data_type], (name,)))
    cols += [Column("correlation", "String", ()), Column("final", "UInt8", ()), Column("commitId", "UInt64", ())]
    return tuple(cols)


#: The table's columns, in order.
COLUMNS: tuple[Column, ...] = _build_columns()
COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
_RECORD_COLUMNS = tuple(c for c in COLUMNS if c.elements)


def _q(ident: str) -> str:
    return f"`{ident}`"


def create_statements(database: str, table: str) -> tuple[str, str]:
    """``CREATE DATABASE`` and ``CREATE TABLE`` (both IF NOT EXISTS), in SQL ClickHouse 18.16 accepts."""
    check_identifier(database, "database")
    check_identifier(table, "table")
    cols = ",\n    ".join(f"{_q(c.name)} {c.type}" for c in COLUMNS)
    return (
        f"CREATE DATABASE IF NOT EXISTS {_q(database)}",
        (f"CREATE TABLE IF NOT EXISTS {_q(database)}.{_q(table)} (\n    {cols}\n) ENGINE = MergeTree() "
         "PARTITION BY toYYYYMMDD(timeInserted) ORDER BY (timeInserted, flowEndSeconds)"),
    )


# --------------------------------------------------------------------------- rows

def _value_ok(col: Column, v: Any) -> bool:
    if col.is_int:
        return isinstance(v, int) and 0 <= v <= col.maximum
    return type(v) is str


def _shape_names(v6: bool, e6: bool) -> tuple[str, ...]:
    """The element names of the record columns for one record shape (flow family, exporter family)."""
    out = []
    for col in _RECORD_COLUMNS:
        if len(col.elements) == 2:
            out.append(col.elements[1 if (e6 if col.name == "originalExporterIP" else v6) else 0])
        else:
            out.append(col.elements[0])
    return tuple(out)


# Per record shape, one C-level getter per column.
_SHAPE_GETTERS = {
    (v6, e6): tuple(itemgetter(n) for n in _shape_names(v6, e6)) for v6 in (False, True) for e6 in (False, True)
}


def _slow_columns(recs: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Columns of records that may lack elements (defaults: 0, empty text)."""
    out: list[list[Any]] = []
    for col in _RECORD_COLUMNS:
        if len(col.elements) == 2:
            a, b = col.elements
            out.append([r.get(a) or r.get(b) or "" for r in recs])
        else:
            (name,) = col.elements
            default: Any = 0 if col.is_int else ""
            out.append([r.get(name, default) for r in recs])
    return out


def _record_columns(recs: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Columns of records of one shape; the aggregator's carry every element of theirs (fast path)."""
    if not recs:
        return [[] for _ in _RECORD_COLUMNS]
    r0 = recs[0]
    getters = _SHAPE_GETTERS["sourceIPv6Address" in r0, "originalExporterIPv6Address" in r0]
    try:
        return [list(map(g, recs)) for g in getters]
    except KeyError:
        return _slow_columns(recs)


_get_record = attrgetter("record")
_get_correlation = attrgetter("correlation")
_get_final = attrgetter("final")
_HAS_V6 = methodcaller("__contains__", "sourceIPv6Address")
_HAS_E6 = methodcaller("__contains__", "originalExporterIPv6Address")


def _shape(flow: Any) -> tuple[bool, bool]:
    r = flow.record
    return "sourceIPv6Address" in r, "originalExporterIPv6Address" in r


_ARRAY_CODES = {"UInt8": "B", "UInt16": "H", "UInt32": "I", "UInt64": "Q", "DateTime": "I"}
_BITS = {"UInt8": 8, "UInt16": 16, "UInt32": 32, "UInt64": 64, "DateTime": 32}
# Types whose array code is wider than the column on this platform (then the maximum is checked too).
_WIDER = frozenset(t for t, code in _ARRAY_CODES.items() if array(code).itemsize * 8 > _BITS[t])


def _columns_ok(values: Sequence[Sequence[Any]]) -> bool:
    """Every value fits its column: an ``array`` of the column's width takes an int column in
    one C pass (a non-int, a negative or too large a value raises); text must be str."""
    for col, vals in zip(_RECORD_COLUMNS, values):
        if not vals:
            continue
        if col.is_int:
            try:
                array(_ARRAY_CODES[col.type], vals)
            except (TypeError, OverflowError):
                return False
            if col.type in _WIDER and max(vals) > col.maximum:
                return False
        elif set(map(type, vals)) != {str}:
            return False
    return True


def flows_to_columns(flows: Sequence[Any], *, time_inserted: int, commit_id: int) -> tuple[list[list[Any]], int]:
    """Columns (in :data:`COLUMNS` order) of a batch of ExportedFlows, and how many were left out.

    Records are taken a shape (flow family, exporter family) at a time, each column with
    one C-level ``map``, and each column is checked as a whole; only when a column fails
    are its records checked one by one, so one bad record costs only itself. Rows may
    come out grouped by shape (a table has no row order).
    """
    groups: dict[tuple[bool, bool], list[Any]] = {}
    try:  # usually one shape (an IPv4 cluster): two C-level passes tell, no loop in Python
        recs = list(map(_get_record, flows))
        v6 = set(map(_HAS_V6, recs))
        e6 = set(map(_HAS_E6, recs))
        if len(v6) == 1 and len(e6) == 1:
            groups[v6.pop(), e6.pop()] = list(flows)
    except (AttributeError, TypeError):
        pass
    if not groups:
        for f in flows:
            try:
                key = _shape(f)
            except (AttributeError, TypeError):
                key = (False, False)  # not a record mapping: the row check below leaves it out
            groups.setdefault(key, []).append(f)
    parts = [_checked(g) for g in groups.values()]
    kept = [f for part in parts for f in part[0]]
    invalid = sum(part[2] for part in parts)
    if len(parts) == 1:
        values = parts[0][1]
    else:
        values = [[] for _ in _RECORD_COLUMNS]
        for _, vals, _ in parts:
            for acc, v in zip(values, vals):
                acc.extend(v)
    n = len(kept)
    final = [1 if x else 0 for x in map(_get_final, kept)]
    return [[time_inserted] * n, *values, list(map(_get_correlation, kept)), final, [commit_id] * n], invalid


def _row_ok(f: Any) -> bool:
    try:
        row = _slow_columns([f.record])
    except (AttributeError, TypeError):
        return False
    return type(f.correlation) is str and all(_value_ok(col, vals[0]) for col, vals in zip(_RECORD_COLUMNS, row))


def _checked(flows: list[Any]) -> tuple[list[Any], list[list[Any]], int]:
    """(flows kept, their record columns, how many were left out) for flows of one shape."""
    try:
        values = _record_columns(list(map(_get_record, flows)))
        if _columns_ok(values) and set(map(type, map(_get_correlation, flows))) == {str}:
            return flows, values, 0
    except (AttributeError, TypeError):
        pass
    good = [f for f in flows if _row_ok(f)]
    return good, _record_columns([f.record for f in good]), len(flows) - len(good)


def row_to_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """The aggregated record (IE names, the decoder's value forms) of a stored row.

    The family of the flow's addresses is the family of ``sourceIP``; the exporter's is
    that of ``originalExporterIP``.
    """
    v6 = ":" in row["sourceIP"]
    e6 = ":" in row["originalExporterIP"]
    out: dict[str, Any] = {}
    for col in _RECORD_COLUMNS:
        if len(col.elements) == 2:
            which = e6 if col.name == "originalExporterIP" else v6
            out[col.elements[1 if which else 0]] = row[col.name]
        else:
            out[col.elements[0]] = row[col.name]
    return out


# --------------------------------------------------------------------------- queries

@dataclass(frozen=True, slots=True)
class StoredFlow:
    """A row read back: the aggregated record and what the sink added."""

    record: dict[str, Any]
    correlation: str
    final: bool
    time_inserted: int


@dataclass(frozen=True, slots=True)
class Talker:
    """Traffic of one key (a Pod, namespace, Node or Service) in a time window."""

    key: tuple[str, ...]
    octets: int  # both directions: octetDeltaCount + reverseOctetDeltaCount
    packets: int
    flows: int  # distinct 5-tuples


@dataclass(frozen=True, slots=True)
class PolicyVerdict:
    """How many flows (and octets) one network policy rule allowed or denied."""

    direction: Literal["ingress", "egress"]
    namespace: str
    name: str
    rule: str
    action: str  # Allow, Drop, Reject (or the number the agent sent)
    flows: int
    octets: int


#: top_talkers(by=...) -> the key columns, per side.
TALKER_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "pod": {"source": ("sourcePodNamespace", "sourcePodName"), "destination": ("destinationPodNamespace", "destinationPodName")},
    "namespace": {"source": ("sourcePodNamespace",), "destination": ("destinationPodNamespace",)},
    "node": {"source": ("sourceNodeName",), "destination": ("destinationNodeName",)},
    "service": {"destination": ("destinationServicePortName",)},
}
_ACTIONS = {1: "Allow", 2: "Drop", 3: "Reject"}
_SELECT_ALL = ", ".join(f"toUInt32({_q(c.name)})" if c.type == "DateTime" else _q(c.name) for c in COLUMNS)


def _int(value: Any, field: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise ValueError(f"{field}: {value!r} must be an integer >= {minimum}")
    return value


class FlowStore:
    """One flow table; subclasses say how SQL reaches ClickHouse. Blocking, thread-safe."""

    address: StoreAddress

    def __init__(self, address: StoreAddress, database: str, table: str) -> None:
        self.address = address
        self.database = check_identifier(address.database or database, "sinks.clickhouse.database")
        self.table = check_identifier(table, "sinks.clickhouse.table")
        self.qualified = f"{_q(self.database)}.{_q(self.table)}"
        self._lock = threading.Lock()

    # What a backend provides.
    def _execute(self, sql: str) -> None:
        raise NotImplementedError

    def _select(self, sql: str) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _insert(self, columns: list[list[Any]]) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the connection after a failure (the next call reconnects)."""

    def close(self) -> None:
        """Release the connection or the chDB session."""

    # Shared behaviour.
    def open(self) -> None:
        """Create the database and the table if missing and check the table's columns."""
        with self._lock:
            for sql in create_statements(self.database, self.table):
                self._execute(sql)
            have = dict(self._select(
                f"SELECT name, type FROM system.columns WHERE database = '{self.database}' AND table = '{self.table}'"))
        missing = [f"{c.name} {c.type}" for c in COLUMNS if have.get(c.name) != c.type]
        if missing:
            raise SchemaError(
                f"table {self.database}.{self.table} exists but lacks (or has other types for) the columns "
                f"{', '.join(missing)}; point sinks.clickhouse.table at a new table or migrate this one")

    def insert(self, columns: list[list[Any]]) -> None:
        """Insert one block of rows (columns in :data:`COLUMNS` order)."""
        if not columns or not columns[0]:
            return
        with self._lock:
            self._insert(columns)

    def select(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a read query; rows as tuples (DateTime values only through ``toUInt32``)."""
        with self._lock:
            return self._select(sql)

    def rows_of_commit(self, commit_id: int, time_inserted: int) -> int:
        """How many rows a commit wrote (the retry of an unanswered insert asks this first)."""
        rows = self.select(
            f"SELECT count() FROM {self.qualified} WHERE timeInserted = toDateTime({int(time_inserted)}) "
            f"AND commitId = {int(commit_id)}")
        return int(rows[0][0])

    def count(self) -> int:
        return int(self.select(f"SELECT count() FROM {self.qualified}")[0][0])

    def _where(self, since: int | None) -> str:
        if since is None:
            return ""
        return f" WHERE timeInserted >= toDateTime({_int(since, 'since')})"

    def recent_flows(self, limit: int = 100, since: int | None = None) -> list[StoredFlow]:
        """The newest rows first (by commit time, then flow end)."""
        rows = self.select(
            f"SELECT {_SELECT_ALL} FROM {self.qualified}{self._where(since)} "
            f"ORDER BY timeInserted DESC, flowEndSeconds DESC LIMIT {_int(limit, 'limit', 1)}")
        out = []
        for row in rows:
            d = dict(zip(COLUMN_NAMES, row))
            out.append(StoredFlow(row_to_record(d), d["correlation"], bool(d["final"]), int(d["timeInserted"])))
        return out

    def top_talkers(self, by: str = "pod", side: str = "source", since: int | None = None,
                    limit: int = 10) -> list[Talker]:
        """The keys with the most traffic (delta counters summed over the rows of the window).

        ``by`` is pod, namespace, node or service (destination side only); rows with an
        empty key (external ends, host traffic) are left out.
        """
        if by not in TALKER_KEYS:
            raise ValueError(f"by: {by!r} is not one of {', '.join(TALKER_KEYS)}")
        if side not in TALKER_KEYS[by]:
            raise ValueError(f"side: {side!r} is not one of {', '.join(TALKER_KEYS[by])} for by={by!r}")
        keys = TALKER_KEYS[by][side]
        cond = f"{_q(keys[-1])} != ''"
        where = self._where(since)
        where = f"{where} AND {cond}" if where else f" WHERE {cond}"
        key_sql = ", ".join(_q(k) for k in keys)
        rows = self.select(
            f"SELECT {key_sql}, sum(octetDeltaCount + reverseOctetDeltaCount) AS octets, "
            "sum(packetDeltaCount + reversePacketDeltaCount) AS packets, "
            "uniqExact(sourceIP, destinationIP, sourceTransportPort, destinationTransportPort, protocolIdentifier) "
            f"FROM {self.qualified}{where} GROUP BY {key_sql} ORDER BY octets DESC, packets DESC "
            f"LIMIT {_int(limit, 'limit', 1)}")
        n = len(keys)
        return [Talker(tuple(r[:n]), int(r[n]), int(r[n + 1]), int(r[n + 2])) for r in rows]

    def policy_verdicts(self, since: int | None = None) -> list[PolicyVerdict]:
        """Flows and octets per network policy rule and action, ingress and egress, most flows first."""
        out: list[PolicyVerdict] = []
        for direction in ("ingress", "egress"):
            p = f"{direction}NetworkPolicy"
            cond = f"{p}RuleAction != 0"
            where = self._where(since)
            where = f"{where} AND {cond}" if where else f" WHERE {cond}"
            rows = self.select(
                f"SELECT {p}Namespace, {p}Name, {p}RuleName, {p}RuleAction, "
                "uniqExact(sourceIP, destinationIP, sourceTransportPort, destinationTransportPort, protocolIdentifier), "
                f"sum(octetDeltaCount + reverseOctetDeltaCount) FROM {self.qualified}{where} "
                f"GROUP BY {p}Namespace, {p}Name, {p}RuleName, {p}RuleAction")
            out += [PolicyVerdict(direction, r[0], r[1], r[2], _ACTIONS.get(int(r[3]), str(r[3])), int(r[4]), int(r[5]))
                    for r in rows]
        out.sort(key=lambda v: (-v.flows, v.direction, v.namespace, v.name, v.rule, v.action))
        return out


class ServerStore(FlowStore):
    """A ClickHouse server over the native protocol (clickhouse-driver)."""

    def __init__(self, address: StoreAddress, database: str, table: str, *, user: str = "default",
                 password: str = "", connect_timeout: float = 5.0, timeout: float = 30.0) -> None:
        super().__init__(address, database, table)
        self.user = user
        self.password = password
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._client: Any = None
        self._insert_sql = f"INSERT INTO {self.qualified} ({', '.join(_q(n) for n in COLUMN_NAMES)}) VALUES"

    def _conn(self) -> Any:
        if self._client is None:
            from clickhouse_driver import Client

            # The driver logs every failed connect with a traceback; the sink logs one line per attempt.
            quiet = logging.getLogger("clickhouse_driver.connection")
            if quiet.level == logging.NOTSET:
                quiet.setLevel(logging.ERROR)

            # No database in the connection: it may not exist yet (open() creates it).
            self._client = Client(
                self.address.host, port=self.address.port, user=self.user, password=self.password,
                connect_timeout=self.connect_timeout, send_receive_timeout=self.timeout,
                sync_request_timeout=self.connect_timeout, client_name="flowscope",
            )
        return self._client

    def _execute(self, sql: str) -> None:
        self._conn().execute(sql)

    def _select(self, sql: str) -> list[tuple[Any, ...]]:
        return list(self._conn().execute(sql))

    def _insert(self, columns: list[list[Any]]) -> None:
        self._conn().execute(self._insert_sql, columns, columnar=True)

    def reset(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            except Exception as exc:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                logging.getLogger("flowscope.collector.clickhouse").debug("disconnect: %s", exc)

    def close(self) -> None:
        self.reset()


_ARROW_TYPES = {"UInt8": "uint8", "UInt16": "uint16", "UInt32": "uint32", "UInt64": "uint64", "DateTime": "uint32",
                "String": "string"}


class ChdbStore(FlowStore):
    """ClickHouse in-process (chDB): a directory that survives restarts, or memory."""

    def __init__(self, address: StoreAddress, database: str, table: str) -> None:
        super().__init__(address, database, table)
        self._session: Any = None
        self._insert_sql = (f"INSERT INTO {self.qualified} ({', '.join(_q(n) for n in COLUMN_NAMES)}) "
                            "SELECT * FROM Python(flowscope_block)")

    def _conn(self) -> Any:
        if self._session is None:
            from chdb import session

            if self.address.path:
                import os

                os.makedirs(self.address.path, exist_ok=True)
            # None: a temporary directory, removed on close
            self._session = session.Session(self.address.path)  # type: ignore[no-untyped-call,unused-ignore]
        return self._session

    def _execute(self, sql: str) -> None:
        self._conn().query(sql)

    def _select(self, sql: str) -> list[tuple[Any, ...]]:
        res = self._conn().query(sql + " SETTINGS output_format_json_quote_64bit_integers = 0", "JSONCompact")
        data = res.bytes()
        if not data:
            return []
        return [tuple(r) for r in json.loads(data)["data"]]

    def _insert(self, columns: list[list[Any]]) -> None:
        import pyarrow as pa

        flowscope_block = pa.table(  # noqa: F841 - chDB's Python() table function finds it by name
            {c.name: pa.array(v, type=getattr(pa, _ARROW_TYPES[c.type])()) for c, v in zip(COLUMNS, columns)})
        self._conn().query(self._insert_sql)

    def close(self) -> None:
        with self._lock:
            s, self._session = self._session, None
        if s is not None:
            s.close()


def open_store(address: StoreAddress | str, database: str = "flowscope", table: str = "flows", *,
               user: str = "default", password: str = "", **kw: Any) -> FlowStore:
    """A store for an address (not yet connected; :meth:`FlowStore.open` connects and creates the table)."""
    addr = parse_store_address(address) if isinstance(address, str) else address
    if addr.kind == "chdb":
        return ChdbStore(addr, database, table)
    return ServerStore(addr, database, table, user=user, password=password, **kw)
