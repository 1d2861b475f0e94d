"""The flow store on a ClickHouse server, over the native protocol (clickhouse-driver).

``tcp://HOST[:PORT][/DATABASE]``: what a cluster runs at scale, and what the tests run
as Debian's clickhouse-server 18.16. Inserts go as one columnar block per call over a
second connection with the driver's NumPy columns (its fastest path): the integer
columns, ``array``s from the transposition, go as their buffers (a zero-copy NumPy view;
no per-value packing), the text columns as the lists of str the transposition made
(``text_form``). Without NumPy the plain columnar insert takes lists.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Sequence
from typing import Any

from .rows import TextColumn
from .schema import COLUMN_NAMES, COLUMNS, Retention, quote
from .store import FlowStore, StoreAddress

__all__ = ["ServerStore"]

log = logging.getLogger("flowscope.collector.store")

_NUMPY_TYPES = {"UInt8": "u1", "UInt16": "u2", "UInt32": "u4", "UInt64": "u8", "DateTime": "u4"}


class ServerStore(FlowStore):
    """A ClickHouse server over the native protocol."""

    #: The text columns this backend inserts fastest (collector.rows): lists of str.
    text_form = "list"

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
        try:
            import numpy as np
        except ImportError:  # the driver's plain columnar insert: lists per column
            cols = [c.tolist() if isinstance(c, (array, memoryview, TextColumn)) else c for c in columns]
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
