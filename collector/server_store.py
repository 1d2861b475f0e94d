"""The flow store on a ClickHouse server, over the native protocol (clickhouse-driver).

``tcp://HOST[:PORT][/DATABASE]``: what a cluster runs at scale, and what the tests run
as Debian's clickhouse-server 18.16. Inserts go as one columnar block per call (the
driver's fastest path); the integer columns arrive as ``array``s, which the driver takes
as sequences.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Sequence
from typing import Any

from .rows import TextColumn
from .schema import COLUMN_NAMES, Retention, quote
from .store import FlowStore, StoreAddress

__all__ = ["ServerStore"]

log = logging.getLogger("flowscope.collector.store")


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
        # the driver takes lists or tuples per column (tolist: one C pass per typed column;
        # text comes as lists of str, text_form, or is decoded from a TextColumn)
        cols = [c.tolist() if isinstance(c, (array, TextColumn)) else c for c in columns]
        self._conn().execute(self._insert_sql, cols, columnar=True)

    def reset(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            except Exception as exc:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                log.debug("disconnect: %s", exc)

    def close(self) -> None:
        self.reset()
