"""The flow store on a ClickHouse server, over the native protocol (clickhouse-driver).

``tcp://HOST[:PORT][/DATABASE]``: what a cluster runs at scale, and what the tests run
as Debian's clickhouse-server 18.16. Queries go through the driver. Inserts send one block
whose bytes flowscope writes itself, over the driver's connection (:func:`send_block`):
the driver's column writers cost about 5 ms of CPU per 1,000 rows in the aggregator (a
NumPy object array, a pandas null check and a str encode per text value), the block
written from the typed columns about a tenth of it. The integer columns are the
transposition's buffers as they are, a ``String`` column its values in Native's layout
(collector.rows.native_text, one C pass), and a column of any other type the server names
(``LowCardinality(String)`` on servers that have it) goes through the driver's own writer
for that column. The framing (packet, block info, compression) is the driver's; without
the driver internals it needs (another major version), the driver's plain columnar insert
serves, said once in the log.
"""

from __future__ import annotations

import functools
import logging
from array import array
from collections.abc import Sequence
from typing import Any

from .rows import TextColumn, block_rows, int_bytes, native_text
from .schema import COLUMN_NAMES, COLUMNS, Retention, quote
from .store import FlowStore, StoreAddress

__all__ = ["ServerStore", "send_block"]

log = logging.getLogger("flowscope.collector.store")

_NUMPY_TYPES = {"UInt8": "u1", "UInt16": "u2", "UInt32": "u4", "UInt64": "u8", "DateTime": "u4"}


class ServerStore(FlowStore):
    """A ClickHouse server over the native protocol."""

    @property
    def text_form(self) -> str:
        """The text columns this backend inserts fastest (collector.rows): Arrow's layout,
        written as Native's by :func:`send_block`, where every text column is a ``String``
        (servers before 19.3, the schema's choice there); lists of str for the driver's
        writers where the table has LowCardinality columns, or before the store is open."""
        f = self.features
        return "arrow" if f is not None and not f.low_cardinality and _driver_internals() is not None else "list"

    def __init__(self, address: StoreAddress, database: str, table: str, *, user: str = "default",
                 password: str = "", connect_timeout: float = 5.0, timeout: float = 30.0,
                 retention: Retention | None = None) -> None:
        super().__init__(address, database, table, retention=retention)
        self.user = user
        self.password = password
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._client: Any = None
        self._numpy_client: Any = None
        self._insert_sql = f"INSERT INTO {self.qualified} ({', '.join(quote(n) for n in COLUMN_NAMES)}) VALUES"

    def _conn(self) -> Any:
        if self._client is None:
            from clickhouse_driver import Client

            # The driver logs every failed connect with a traceback; the callers log one line per attempt.
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

    def _insert(self, columns: Sequence[Any]) -> None:
        global _warned_internals
        if _driver_internals() is not None:
            send_block(self._conn(), self._insert_sql, columns)
            return
        if not _warned_internals:
            _warned_internals = True
            log.info("clickhouse-driver %s lacks the internals flowscope writes its insert blocks through; "
                     "its columnar insert serves (slower)", _driver_version())
        self._driver_insert(columns)

    def _driver_insert(self, columns: Sequence[Any]) -> None:
        """The driver's own columnar insert (NumPy columns where NumPy is installed)."""
        try:
            import numpy as np
        except ImportError:  # the driver's plain columnar insert: lists per column
            cols = [_as_list(c) for c in columns]
            self._conn().execute(self._insert_sql, cols, columnar=True)
            return
        # The driver's NumPy columns write an integer column as its buffer (one tobytes, no
        # per-value packing) and text from a list per column.
        typed = []
        for c, v in zip(COLUMNS, columns):
            if isinstance(v, (array, memoryview)):
                typed.append(np.frombuffer(v, dtype=_NUMPY_TYPES[c.type]))
            elif c.is_int:
                typed.append(np.asarray(v, dtype=_NUMPY_TYPES[c.type]))
            else:
                typed.append(np.array(v.tolist() if isinstance(v, TextColumn) else v, dtype=object))
        self._insert_conn().execute(self._insert_sql, typed, columnar=True)

    def _insert_conn(self) -> Any:
        """A second connection for inserts with the driver's NumPy columns (its reads would
        come back as NumPy arrays too, so queries keep the plain one)."""
        if self._numpy_client is None:
            from clickhouse_driver import Client

            self._conn()  # the driver's logging set quiet
            self._numpy_client = Client(
                self.address.host, port=self.address.port, user=self.user, password=self.password,
                connect_timeout=self.connect_timeout, send_receive_timeout=self.timeout,
                sync_request_timeout=self.connect_timeout, client_name="flowscope",
                settings={"use_numpy": True},
            )
        return self._numpy_client

    def reset(self) -> None:
        with self._lock:
            clients = (self._client, self._numpy_client)
            self._client = self._numpy_client = None
        for client in clients:
            if client is None:
                continue
            try:
                client.disconnect()
            except Exception as exc:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                log.debug("disconnect: %s", exc)

    def close(self) -> None:
        self.reset()


# --------------------------------------------------------------------------- the insert block

_warned_internals = False


def _driver_version() -> str:
    try:
        import clickhouse_driver

        return str(clickhouse_driver.__version__)
    except Exception:  # noqa: BLE001 - only for the log line
        return "?"


@functools.cache
def _driver_internals() -> Any:
    """The driver's pieces :func:`send_block` uses (its protocol constants, varint and
    string writers, block info, the generic column writer), or None if this driver lacks
    one of them."""
    try:
        from clickhouse_driver import defines
        from clickhouse_driver.block import BlockInfo, ColumnOrientedBlock
        from clickhouse_driver.columns.service import write_column
        from clickhouse_driver.protocol import ClientPacketTypes
        from clickhouse_driver.varint import write_varint
        from clickhouse_driver.writer import write_binary_str, write_binary_uint8

        for name in ("DBMS_MIN_REVISION_WITH_TEMPORARY_TABLES", "DBMS_MIN_REVISION_WITH_BLOCK_INFO",
                     "DBMS_MIN_REVISION_WITH_CUSTOM_SERIALIZATION"):
            getattr(defines, name)
    except (ImportError, AttributeError):
        return None
    return (defines, BlockInfo, ColumnOrientedBlock, write_column, ClientPacketTypes, write_varint,
            write_binary_str, write_binary_uint8)


def _as_list(v: Any) -> list[Any]:
    """A column as the driver's writers take it: a list of its values."""
    return v.tolist() if isinstance(v, (array, memoryview, TextColumn)) else list(v)


def send_block(client: Any, insert_sql: str, columns: Sequence[Any]) -> int:
    """Insert one block of the table's columns (in COLUMNS order) through ``client``'s
    connection, as the driver's ``execute(insert_sql, columns, columnar=True)`` would,
    with the column bytes written here; returns the rows sent. Each column goes in the
    type the server's sample block names for it; the lengths are checked before anything
    is sent. A failure disconnects the client (the driver's rule: the connection's state
    is unknown)."""
    (defines, BlockInfo, ColumnOrientedBlock, write_column, ClientPacketTypes, write_varint,
     write_binary_str, write_binary_uint8) = _driver_internals()
    n = block_rows(columns)
    with client.disconnect_on_error(insert_sql, None):
        conn = client.connection
        conn.send_query(insert_sql)
        conn.send_external_tables(None)
        sample = client.receive_sample_block()
        types = dict(sample.columns_with_types) if sample is not None else {}
        pieces: list[tuple[str, str, Any]] = []
        for c, v in zip(COLUMNS, columns):
            server_type = types.get(c.name)
            if server_type is None:
                raise ValueError(f"the server's table {insert_sql.split()[2]} has no column {c.name}")
            if c.is_int and server_type == c.type:
                pieces.append((c.name, server_type, int_bytes(v, c, n)))
            elif server_type == "String" and isinstance(v, TextColumn):
                pieces.append((c.name, server_type, native_text(v)))
            else:  # str objects (the driver's writer encodes them in C), or a type this writer does
                # not lay out (LowCardinality): the driver's writer
                pieces.append((c.name, server_type, _as_list(v)))
        revision = conn.server_info.used_revision
        write_varint(ClientPacketTypes.DATA, conn.fout)
        if revision >= defines.DBMS_MIN_REVISION_WITH_TEMPORARY_TABLES:
            write_binary_str("", conn.fout)
        out = conn.block_out.fout  # the compressing stream's buffer when compression is on
        if revision >= defines.DBMS_MIN_REVISION_WITH_BLOCK_INFO:
            BlockInfo().write(out)
        write_varint(len(pieces), out)
        write_varint(n, out)
        for name, server_type, data in pieces:
            write_binary_str(name, out)
            write_binary_str(server_type, out)
            if revision >= defines.DBMS_MIN_REVISION_WITH_CUSTOM_SERIALIZATION:
                write_binary_uint8(0, out)
            if isinstance(data, list):
                write_column(conn.context, name, server_type, data, out)
            else:  # bytes: the driver's writers take no other buffer (a memoryview comes out garbled)
                out.write(data if isinstance(data, bytes) else bytes(data))
        conn.block_out.finalize()
        client.receive_profile_events()
        conn.send_data(ColumnOrientedBlock())  # an empty block ends the data
        client.receive_profile_events()
        client.receive_end_of_insert_query()
    return n
