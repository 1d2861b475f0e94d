"""chDB's insert path: every block goes in as ClickHouse's Native format through a
streaming insert. Proves: each form a column may come in (Arrow-layout TextColumn, list of
str, pyarrow and numpy arrays, typed buffers) stores the same rows, non-ASCII and long
text included; a block with a column of the wrong length or width is refused before
anything is sent, naming the column, and nothing of it is stored.

(A separate module: chDB holds one directory per process, and test_collector_store.py
keeps its store open for its whole module.)"""

from __future__ import annotations

import time
from array import array

import numpy as np
import pyarrow as pa
import pytest

from flowscope.collector.rows import TextColumn, _text_part, flows_to_columns, typed_columns
from flowscope.collector.schema import COLUMNS
from flowscope.collector.store import open_store
from store_records import flow

pytestmark = [pytest.mark.timeout(180)]

NAMES = ["frontend-ü-0", "b" * 300, "", "€uro-pod"]


def _flows():
    return [flow(sourcePodName=NAMES[i % 4], sourceTransportPort=1000 + i, octetDeltaCount=2**64 - 1 - i,
                 flowEndSeconds=int(time.time()) - 60) for i in range(40)]


def _read(store):
    return store.select("SELECT sourcePodName, sourceTransportPort, toString(octetDeltaCount), sourcePodNamespace, "
                        "toUInt32(flowEndSeconds) FROM flowscope.flows ORDER BY sourceTransportPort, commitId")


def _forms(cols, form):
    out = []
    for c, v in zip(COLUMNS, cols):
        if c.is_int:
            values = list(array(v.format, v) if isinstance(v, memoryview) else v)
            out.append({"list": values, "numpy": np.array(values, dtype=np.uint64).astype(
                {"UInt8": "u1", "UInt16": "u2", "UInt32": "u4", "UInt64": "u8", "DateTime": "u4"}[c.type]),
                "buffer": v}[form])
        else:
            values = list(v)
            out.append({"list": values, "numpy": pa.array(values, type=pa.string()).slice(0),
                        "buffer": TextColumn(*_text_part(values))}[form])
    return out


def test_every_form_of_a_column_stores_the_same_rows(tmp_path):
    store = open_store(f"chdb://{tmp_path / 'store'}")
    store.open()
    try:
        cols = typed_columns(flows_to_columns(_flows(), time_inserted=int(time.time()), commit_id=1, text="arrow")[0])
        store.insert(cols)
        want = _read(store)
        assert len(want) == 40 and {r[0] for r in want} == set(NAMES)
        assert want[0][2] == str(2**64 - 1)
        for form in ("list", "numpy", "buffer"):
            store.execute("TRUNCATE TABLE flowscope.flows")
            store.insert(_forms(cols, form))
            assert _read(store) == want, form
    finally:
        store.close()


def test_a_column_of_the_wrong_length_or_width_is_refused_by_name_and_nothing_is_stored(tmp_path):
    store = open_store(f"chdb://{tmp_path / 'store'}")
    store.open()
    try:
        cols = typed_columns(flows_to_columns(_flows(), time_inserted=int(time.time()), commit_id=1, text="arrow")[0])
        at = next(i for i, c in enumerate(COLUMNS) if c.type == "UInt32")
        wide = list(cols)
        wide[at] = array("Q", list(cols[at]))  # 8-byte values where the column takes 4
        with pytest.raises(ValueError, match="a UInt32 column of 40 values takes 160 bytes, not 320"):
            store.insert(wide)
        short = list(cols)
        t = next(i for i, c in enumerate(COLUMNS) if not c.is_int)
        short[t] = list(cols[t])[:39]
        with pytest.raises(ValueError, match=f"column {COLUMNS[t].name} has 39 values, the block 40"):
            store.insert(short)
        assert store.count() == 0
        store.insert(cols)
        assert store.count() == 40
    finally:
        store.close()
