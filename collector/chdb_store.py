"""The flow store in-process: chDB, a current ClickHouse engine inside this Python process.

``chdb:///DIR`` keeps the database in a directory that survives restarts (one process at a
time may hold it); ``chdb://`` uses a temporary one, removed on close. Inserts hand chDB
one block in ClickHouse's Native format through a streaming insert: the integer columns
arrive as ``array``s or typed ``memoryview``s (collector.rows.sets_to_columns), written as
their little-endian bytes without a per-value conversion, the text columns as
:class:`~flowscope.collector.rows.TextColumn` (Arrow's offsets and UTF-8 data, built once
by the transposition or joined from the decoder's columns) or lists, rewritten in one pass
as Native's length-prefixed strings (collector.rows.native_text). chDB reads a Native
block for about half the CPU its ``Python()`` table function takes over the same columns
as a pyarrow table (docs/clickhouse.md); text goes in as ``String`` and ClickHouse turns
it into the table's LowCardinality where the column has one. Reads come back as
JSONCompact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from .rows import TextColumn, block_rows, int_bytes, leb128, native_text
from .schema import COLUMN_NAMES, COLUMNS, Retention, quote
from .store import FlowStore, StoreAddress

__all__ = ["ChdbStore", "native_parts"]


#: Settings of every insert. ``optimize_on_insert = 0``: a roll-up's view already groups
#: each block by the table's whole sort key (timeBucket and the family's keys), so the
#: merge a Summing/AggregatingMergeTree would run over the inserted block finds nothing to
#: fold and is skipped (the raw table's plain MergeTree has none; rows that meet in a part
#: are summed by the background merges and by every query's GROUP BY either way).
#: Measured in benchmarks/clickhouse_sink.py (docs/clickhouse.md).
INSERT_SETTINGS = "optimize_on_insert = 0"


def _header(name: str, type_name: str) -> bytes:
    raw_name, raw_type = name.encode(), type_name.encode()
    return leb128(len(raw_name)) + raw_name + leb128(len(raw_type)) + raw_type


#: Each column's Native header (its name and the type its bytes are in).
_HEADERS = tuple(_header(c.name, c.type if c.is_int else "String") for c in COLUMNS)


def _as_text(v: Any) -> TextColumn | list[str]:
    """A text column as :func:`~flowscope.collector.rows.native_text` takes it: as it is
    (TextColumn, list of str), or from a pyarrow string array (the benchmarks' generator)
    by its buffers."""
    if isinstance(v, (TextColumn, list)):
        return v
    if hasattr(v, "combine_chunks"):
        v = v.combine_chunks()
    if hasattr(v, "buffers") and str(v.type) == "string" and not v.null_count:
        import numpy as np

        _, offsets, data = v.buffers()
        off = np.frombuffer(offsets, dtype="<i4")[v.offset:v.offset + len(v) + 1]
        return TextColumn(off.tobytes(), data.to_pybytes() if data is not None else b"")
    return [str(x) for x in (v.to_pylist() if hasattr(v, "to_pylist") else v)]


def native_parts(columns: Sequence[Any]) -> Iterator[bytes | memoryview]:
    """One insert block in ClickHouse's Native format, piece by piece (the streaming insert
    takes them in turn; joined they are the block): the column and row counts, then each
    column in :data:`~flowscope.collector.schema.COLUMNS` order (its name, its type, its
    values). Checked first: one column per table column, each as long as the first."""
    n = block_rows(columns)
    yield leb128(len(COLUMNS)) + leb128(n)
    for c, head, v in zip(COLUMNS, _HEADERS, columns):
        yield head
        yield int_bytes(v, c, n) if c.is_int else native_text(_as_text(v))


class ChdbStore(FlowStore):
    """ClickHouse in-process (chDB): a directory that survives restarts, or a temporary one."""

    #: The text columns this backend inserts fastest (collector.rows): Arrow's layout.
    text_form = "arrow"

    def __init__(self, address: StoreAddress, database: str, table: str, *,
                 retention: Retention | None = None) -> None:
        super().__init__(address, database, table, retention=retention)
        self._session: Any = None
        self._insert_sql = (f"INSERT INTO {self.qualified} ({', '.join(quote(n) for n in COLUMN_NAMES)}) "
                            f"SETTINGS {INSERT_SETTINGS}")

    def _conn(self) -> Any:
        if self._session is None:
            from chdb import session

            if self.address.path:
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

    def _insert(self, columns: Sequence[Any]) -> None:
        # the pieces one after another: measured cheaper than one joined block (docs/clickhouse.md)
        parts = list(native_parts(columns))  # every column checked before anything is sent
        with self._conn().send_insert(self._insert_sql, "Native") as inserter:
            for part in parts:
                inserter.append(part)
            inserter.finish()

    def close(self) -> None:
        with self._lock:
            s, self._session = self._session, None
        if s is not None:
            s.close()
