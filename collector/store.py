"""The flow store: one ClickHouse database holding the raw flows table and its roll-ups,
reached through one of two backends, created and migrated by flowscope itself.

*Where* (:func:`parse_store_address`): a ClickHouse server over the native protocol
(``tcp://HOST[:PORT][/DATABASE]``, also ``clickhouse://``; :mod:`.server_store`) or chDB,
ClickHouse in-process (``chdb://`` a temporary directory, ``chdb:///DIR`` on disk;
:mod:`.chdb_store`). A chDB directory belongs to one process at a time: the collector that
writes it answers queries for it (``flowscope flows --api``).

*What a backend provides* is three calls: run a statement, run a SELECT, insert one block
of columns. Everything else is here: :meth:`FlowStore.open` asks the server's version
(:class:`~flowscope.collector.schema.Features`) and applies the migrations
(:mod:`.migrations`); :meth:`FlowStore.rows` is what the query layer
(:mod:`flowscope.collector.query`) calls, with its ``{name:Type}`` placeholders bound by
:func:`flowscope.collector.filter.bind`.

Methods are blocking and thread-safe (one lock per store); the aggregator's sink and the
collector call them from worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

from .filter import bind
from .schema import Features, Retention, SchemaNameError, quote
from .schema import check_identifier as _check_identifier

__all__ = [
    "ADDRESS_FORMS",
    "AddressError",
    "FlowStore",
    "SchemaError",
    "StoreAddress",
    "StoreError",
    "check_identifier",
    "open_store",
    "parse_store_address",
]

ADDRESS_FORMS = \
    "tcp://HOST[:PORT][/DATABASE], clickhouse://HOST[:PORT][/DATABASE], chdb:// (temporary) or chdb:///DIR"
DEFAULT_PORT = 9000


class StoreError(Exception):
    """The store cannot be used as configured (a caller's mistake, not a passing outage)."""


class AddressError(StoreError, ValueError):
    """A store address that is not one of :data:`ADDRESS_FORMS`."""


class SchemaError(StoreError):
    """The tables exist but cannot hold flowscope's rows (or were written by a newer flowscope)."""


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
    if database is not None:
        try:
            _check_identifier(database, "database")
        except SchemaNameError:
            raise bad(f"names the database {database!r}, not a valid name (letters, digits, _)") from None
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


def check_identifier(value: str, field: str) -> str:
    """A database or table name (letters, digits and _, not starting with a digit), or StoreError."""
    try:
        return _check_identifier(value, field)
    except SchemaNameError as exc:
        raise StoreError(str(exc)) from None


_name = check_identifier


# --------------------------------------------------------------------------- the store

class FlowStore:
    """One flow database (raw table + roll-ups); subclasses say how SQL reaches ClickHouse."""

    address: StoreAddress
    features: Features | None

    def __init__(self, address: StoreAddress, database: str, table: str, *,
                 retention: Retention | None = None) -> None:
        self.address = address
        self.database = _name(address.database or database, "sinks.clickhouse.database")
        self.table = _name(table, "sinks.clickhouse.table")
        self.qualified = f"{quote(self.database)}.{quote(self.table)}"
        self.retention = retention or Retention()
        # Only a store opened with a retention applies it to existing tables: a reader
        # (flowscope flows / ui / policy --store) keeps the one its writer set.
        self.retention_given = retention is not None
        self.features = None
        self.schema_version: int | None = None
        self._lock = threading.Lock()

    # What a backend provides (called under the lock).
    def _execute(self, sql: str) -> None:
        raise NotImplementedError

    def _select(self, sql: str) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _insert(self, columns: Sequence[Any]) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the connection after a failure (the next call reconnects)."""

    def close(self) -> None:
        """Release the connection or the chDB session."""

    # Shared behaviour.
    def open(self) -> None:
        """Connect, detect the server's features, create or migrate the tables (idempotent)."""
        from .migrations import migrate

        with self._lock:
            migrate(self)

    def execute(self, sql: str) -> None:
        with self._lock:
            self._execute(sql)

    def insert(self, columns: Sequence[Any]) -> None:
        """Insert one block of rows (columns in :data:`~flowscope.collector.schema.COLUMNS` order)."""
        if not columns or not len(columns[0]):
            return
        with self._lock:
            self._insert(columns)

    def select(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a read query; rows as tuples (DateTime values only through ``toUInt32``)."""
        with self._lock:
            return self._select(sql)

    def rows(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run a SELECT whose ``{name:Type}`` placeholders are bound from ``params``."""
        return self.select(bind(sql, params))

    def rows_of_commit(self, commit_id: int, time_inserted: int) -> int:
        """How many rows a commit wrote (the retry of an unanswered insert asks this first)."""
        rows = self.select(
            f"SELECT count() FROM {self.qualified} WHERE timeInserted = toDateTime({int(time_inserted)}) "
            f"AND commitId = {int(commit_id)}")
        return int(rows[0][0])

    def count(self, table: str | None = None) -> int:
        name = f"{quote(self.database)}.{quote(table)}" if table else self.qualified
        return int(self.select(f"SELECT count() FROM {name}")[0][0])

    def disk_bytes(self) -> int:
        """Bytes on disk of the database's active parts (raw table and roll-ups)."""
        rows = self.select(
            f"SELECT sum(bytes_on_disk) FROM system.parts WHERE database = '{self.database}' AND active")
        return int(rows[0][0] or 0)


def open_store(address: StoreAddress | str, database: str = "flowscope", table: str = "flows", *,
               user: str = "default", password: str = "", retention: Retention | None = None,
               **kw: Any) -> FlowStore:
    """A store for an address (not yet connected; :meth:`FlowStore.open` connects and migrates)."""
    addr = parse_store_address(address, "store") if isinstance(address, str) else address
    if addr.kind == "chdb":
        from .chdb_store import ChdbStore

        return ChdbStore(addr, database, table, retention=retention)
    from .server_store import ServerStore

    return ServerStore(addr, database, table, user=user, password=password, retention=retention, **kw)



