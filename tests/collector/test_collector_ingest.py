"""The collector's batch queue into the store (collector/ingest.py), against a scripted store:
batches by size and by interval; a store that is down keeps the records (within the bound)
and gets them all once it is back, never twice; past the bound records are refused and
counted while offer() keeps returning at once; close() commits the open batch."""

from __future__ import annotations

import threading
import time

from flowscope.collector.ingest import StoreWriter
from flowscope.collector.schema import COLUMN_NAMES
from flowscope.collector.store import FlowStore, StoreAddress
from store_records import aggregated_record


class ScriptedStore(FlowStore):
    def __init__(self) -> None:
        super().__init__(StoreAddress("server", "scripted", 9000), "flowscope", "flows")
        self.stored: list[dict] = []
        self.down = threading.Event()
        self.inserts = 0

    def insert(self, columns) -> None:
        if self.down.is_set():
            raise ConnectionRefusedError("Connection refused (scripted:9000)")
        self.inserts += 1
        self.stored += [dict(zip(COLUMN_NAMES, r)) for r in zip(*columns)]

    def rows_of_commit(self, commit_id: int, time_inserted: int) -> int:
        if self.down.is_set():
            raise ConnectionRefusedError("Connection refused (scripted:9000)")
        return sum(1 for r in self.stored if r["commitId"] == commit_id)


def records(start: int, n: int, reason: int = 2) -> list[dict]:
    return [aggregated_record(sourceTransportPort=i % 65536, flowEndReason=reason, octetDeltaCount=i)
            for i in range(start, start + n)]


def wait(pred, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end
        time.sleep(0.01)


def test_batches_commit_by_size_and_interval_and_close_commits_the_rest():
    store = ScriptedStore()
    w = StoreWriter(store, batch_rows=100, max_rows=1000, commit_interval=60)
    w.start()
    assert w.offer(records(0, 100)) + w.offer(records(100, 100)) + w.offer(records(200, 50)) == 250
    # two full batches close at once (a message's records stay in one batch)
    wait(lambda: len(store.stored) == 200)
    assert w.stats().held == 50
    w.offer(records(250, 10, reason=3))
    w.close()  # SIGTERM: the open batch is committed
    st = w.stats()
    assert (st.committed, st.lost_at_close, st.held, st.overflow) == (260, 0, 0, 0)
    assert sorted(r["octetDeltaCount"] for r in store.stored) == list(range(260))
    assert {r["correlation"] for r in store.stored} == {"collected"}
    assert sum(r["final"] for r in store.stored) == 10  # flowEndReason 3 ends the connection


def test_a_store_that_is_down_keeps_records_within_the_bound_and_counts_the_overflow():
    store = ScriptedStore()
    store.down.set()
    w = StoreWriter(store, batch_rows=100, max_rows=500, commit_interval=0.05)
    w.start()
    taken = 0
    t = time.monotonic()
    for k in range(10):
        taken += w.offer(records(k * 100, 100))
    assert time.monotonic() - t < 1.0  # offer never waits on the store
    assert taken == 500
    st = w.stats()
    assert (st.offered, st.overflow, st.held) == (1000, 500, 500)
    wait(lambda: w.stats().commit_failures >= 1)
    assert "refused" in w.stats().last_error.lower()
    store.down.clear()
    wait(lambda: w.stats().committed == 500, timeout=30)
    assert sorted(r["octetDeltaCount"] for r in store.stored) == list(range(500))  # each once
    w.close()
    assert w.stats().lost_at_close == 0
