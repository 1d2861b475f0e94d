"""The flow store in-process: chDB, a current ClickHouse engine inside this Python process.

``chdb:///DIR`` keeps the database in a directory that survives restarts (one process at a
time may hold it); ``chdb://`` uses a temporary one, removed on close. Inserts hand chDB
a pyarrow table through its ``Python()`` table function: the integer columns arrive as
``array``s or typed ``memoryview``s (collector.rows.sets_to_columns), which become arrow
arrays without a per-value conversion (a zero-copy numpy view of the buffer), the text
columns as :class:`~flowscope.collector.rows.TextColumn` (Arrow's offsets and UTF-8 data,
built once by the transposition or joined from the decoder's columns) or lists;
ClickHouse reads the block columnar. Reads come back as JSONCompact.
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Sequence
from typing import Any

from .rows import TextColumn
from .schema import COLUMN_NAMES, COLUMNS, Retention, quote
from .store import FlowStore, StoreAddress

__all__ = ["ChdbStore"]

_ARROW_TYPES = {"UInt8": "uint8", "UInt16": "uint16", "UInt32": "uint32", "UInt64": "uint64", "DateTime": "uint32",
                "String": "string", "Float64": "float64"}
_NUMPY_TYPES = {"UInt8": "u1", "UInt16": "u2", "UInt32": "u4", "UInt64": "u8", "DateTime": "u4"}

#: Settings of every insert. ``optimize_on_insert = 0``: a roll-up's view already groups
#: each block by the table's whole sort key (timeBucket and the family's keys), so the
#: merge a Summing/AggregatingMergeTree would run over the inserted block finds nothing to
#: fold and is skipped (the raw table's plain MergeTree has none; rows that meet in a part
#: are summed by the background merges and by every query's GROUP BY either way).
#: Measured in benchmarks/clickhouse_sink.py (docs/clickhouse.md).
INSERT_SETTINGS = "optimize_on_insert = 0"


class ChdbStore(FlowStore):
    """ClickHouse in-process (chDB): a directory that survives restarts, or a temporary one."""

    #: The text columns this backend inserts fastest (collector.rows): Arrow's layout.
    text_form = "arrow"

    def __init__(self, address: StoreAddress, database: str, table: str, *,
                 retention: Retention | None = None) -> None:
        super().__init__(address, database, table, retention=retention)
        self._session: Any = None
        self._insert_sql = (f"INSERT INTO {self.qualified} ({', '.join(quote(n) for n in COLUMN_NAMES)}) "
                            f"SELECT * FROM Python(flowscope_block) SETTINGS {INSERT_SETTINGS}")

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
        import numpy as np
        import pyarrow as pa

        # LowCardinality columns take a dictionary-encoded Arrow array for less than a plain
        # one (ClickHouse maps the dictionary once instead of hashing every value): measured
        # 12-16% less CPU for the whole insert, the encoding included
        low_cardinality = self.features is not None and self.features.low_cardinality
        arrays = {}
        for c, v in zip(COLUMNS, columns):
            if not c.is_int and not isinstance(v, (np.ndarray, pa.Array, pa.ChunkedArray)):
                # Arrow's layout already (offsets and data as built), or a list of str
                text = v.arrow() if isinstance(v, TextColumn) else pa.array(v, type=pa.string())
                arrays[c.name] = text.dictionary_encode() if c.repeats and low_cardinality else text
            elif isinstance(v, (array, memoryview)):  # a numpy view of the buffer, no per-value conversion
                arrays[c.name] = pa.array(np.frombuffer(v, dtype=_NUMPY_TYPES[c.type]))
            elif isinstance(v, (np.ndarray, pa.Array, pa.ChunkedArray)):
                arrays[c.name] = v if not isinstance(v, np.ndarray) else pa.array(v)
            else:
                arrays[c.name] = pa.array(v, type=getattr(pa, _ARROW_TYPES[c.type])())
        flowscope_block = pa.table(arrays)  # noqa: F841 - chDB's Python() table function finds it by name
        self._conn().query(self._insert_sql)

    def close(self) -> None:
        with self._lock:
            s, self._session = self._session, None
        if s is not None:
            s.close()
