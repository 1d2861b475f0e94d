"""Decoded IPFIX records into the flow store, in batches, through a bounded queue.

``flowscope collector --store`` decodes on the event loop and commits from one worker
thread, so neither waits on the other. Theory of operation:

* :meth:`StoreWriter.offer_sets` (event loop) appends a message's data sets, decoded into
  columns (:class:`~flowscope.ipfix.columnar.ColumnSet`, what ``flowscope collector``
  decodes), to the open batch and returns at once; :meth:`StoreWriter.offer` does the same
  for records decoded as dicts. A batch closes when it holds ``batch_rows`` records or
  ``commit_interval`` has passed since it opened; closed batches wait in a queue.
* The worker takes the oldest closed batch, turns it into typed columns and inserts it as
  one block: column sets are joined column by column
  (:func:`flowscope.collector.rows.sets_to_columns`: the decoder's buffers concatenated,
  no value touched in Python), dict records transposed
  (:func:`flowscope.collector.rows.records_to_columns`: one pass over the records, in C
  where the extension is built, columns in the form the backend inserts fastest). A failed
  insert (store down, slow, refused) keeps the batch at the head of the queue and is retried
  after a backoff (0.5 s doubling to 10 s); decoding goes on meanwhile.
* The bound is ``max_rows`` records held in all (open batch plus queue). Past it the
  records of a message that does not fit are refused, counted in ``overflow`` and logged
  (at most once per 10 s with the running count), never blocking the decoder and never
  growing memory.
* :meth:`StoreWriter.close` (SIGTERM) closes the open batch and commits everything held,
  waiting up to ``close_timeout``; what could not be stored by then is counted in
  ``lost_at_close`` and logged.

Records that arrive from agents directly lack the aggregator's elements: their columns
read 0 or "". ``correlation`` is ``"collected"`` (no aggregator judged the record) and
``final`` is true for records whose flowEndReason ends the connection. A record with a
value its column cannot hold is left out and counted (``invalid``).

The queue holds what the decoder made as it is (a message's column sets, or its record
dicts, added to the batch): nothing is built per record on the event loop, and with
column sets no object exists per record at all. Each
stage's CPU is counted (:class:`WriterStats`): ``queue_cpu`` on the event loop in
:meth:`~StoreWriter.offer` (its wall time: it never blocks, and a CPU clock would cost a
system call per message), ``convert_cpu`` and ``insert_cpu`` in the worker (its thread's
CPU time: chDB's own threads, if it uses any, are not in it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from flowscope.ipfix.antrea import ENDED_REASONS

from flowscope.ipfix.columnar import ColumnSet

from .rows import records_to_columns, sets_to_columns
from .store import FlowStore

__all__ = ["CollectedFlow", "StoreWriter", "WriterStats"]

log = logging.getLogger("flowscope.collector.ingest")

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
OVERFLOW_LOG_EVERY = 10.0


class CollectedFlow(NamedTuple):
    """A decoded record with what the store adds (the shape rows.flows_to_columns reads;
    the writer itself queues the records bare and adds both in the columns)."""

    record: Mapping[str, Any]
    correlation: str
    final: bool


@dataclass(frozen=True, slots=True)
class WriterStats:
    offered: int
    committed: int
    overflow: int
    invalid: int
    held: int
    commits: int
    commit_failures: int
    lost_at_close: int
    last_error: str
    queue_cpu: float = 0.0  # CPU seconds: offer() / offer_sets() on the event loop
    convert_cpu: float = 0.0  # records to typed columns (worker)
    insert_cpu: float = 0.0  # the backend's insert (worker thread)
    convert_wall: float = 0.0  # the same two stages in wall seconds
    insert_wall: float = 0.0


_ENDED = frozenset(ENDED_REASONS)


class _Batch:
    """Records waiting for one insert: column sets and dict records, ``rows`` in all."""

    __slots__ = ("sets", "records", "rows")

    def __init__(self) -> None:
        self.sets: list[ColumnSet] = []
        self.records: list[Mapping[str, Any]] = []
        self.rows = 0

    def __len__(self) -> int:
        return self.rows


class StoreWriter:
    """Batches records into a store from a worker thread; bounded, never blocking the caller."""

    def __init__(self, store: FlowStore, *, batch_rows: int = 200_000, max_rows: int = 1_000_000,
                 commit_interval: float = 1.0, close_timeout: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        if batch_rows < 1 or max_rows < batch_rows:
            raise ValueError(f"batch_rows {batch_rows} must be >= 1 and <= max_rows {max_rows}")
        self.store = store
        self.batch_rows = batch_rows
        self.max_rows = max_rows
        self.commit_interval = commit_interval
        self.close_timeout = close_timeout
        self.clock = clock
        self.wall = wall
        self._open = _Batch()
        self._opened_at = 0.0
        self._queue: deque[_Batch] = deque()
        self.queue_cpu = self.convert_cpu = self.insert_cpu = self.convert_wall = self.insert_wall = 0.0
        self._held = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._commit_id = int(wall() * 1000) << 16
        self.offered = self.committed = self.overflow = self.invalid = 0
        self.commits = self.commit_failures = self.lost_at_close = 0
        self.last_error = ""
        self._overflow_logged_at = -OVERFLOW_LOG_EVERY
        self._overflow_logged = 0

    # ---- event loop side
    def offer(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Queue records for the store; returns how many were taken (the rest are overflow)."""
        n = len(records)
        if not n:
            return 0
        return self._take(n, records, None)

    def offer_sets(self, sets: Sequence[ColumnSet]) -> int:
        """Queue a message's data sets (decoded into columns); returns how many records were
        taken: all of them, or none when they do not fit the bound (counted as overflow)."""
        n = sum(s.count for s in sets)
        if not n:
            return 0
        return self._take(n, None, sets)

    def _take(self, n: int, records: Sequence[Mapping[str, Any]] | None, sets: Sequence[ColumnSet] | None) -> int:
        t = time.perf_counter()  # offer() never blocks: its wall time is its CPU (and costs no syscall)
        with self._cond:
            self.offered += n
            if self._held + n > self.max_rows:
                self.overflow += n
                self._log_overflow()
                self.queue_cpu += time.perf_counter() - t
                return 0
            batch = self._open
            if not batch.rows:
                self._opened_at = self.clock()
            if sets is not None:
                batch.sets += sets
            else:
                batch.records += records  # type: ignore[arg-type]
            batch.rows += n
            self._held += n
            if batch.rows >= self.batch_rows:
                self._close_batch()
                self._cond.notify()
            self.queue_cpu += time.perf_counter() - t
        return n

    def _log_overflow(self) -> None:
        now = self.clock()
        if now - self._overflow_logged_at >= OVERFLOW_LOG_EVERY:
            log.warning("collector: the store queue is full (%d records held, the bound is %d); %d records "
                        "refused so far (%d since the last report); last store error: %s",
                        self._held, self.max_rows, self.overflow, self.overflow - self._overflow_logged,
                        self.last_error or "none")
            self._overflow_logged_at = now
            self._overflow_logged = self.overflow

    def _close_batch(self) -> None:
        if self._open.rows:
            self._queue.append(self._open)
            self._open = _Batch()

    # ---- worker
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flowscope-store-writer", daemon=True)
        self._thread.start()

    def _next(self) -> _Batch | None:
        with self._cond:
            while True:
                if self._open.rows and (self._closing or self.clock() - self._opened_at >= self.commit_interval):
                    self._close_batch()
                if self._queue:
                    return self._queue[0]
                if self._closing:
                    return None
                wait = self.commit_interval
                if self._open.rows:
                    wait = max(self.commit_interval - (self.clock() - self._opened_at), 0.01)
                self._cond.wait(wait)

    def _run(self) -> None:
        failures = 0
        columns_of: dict[int, tuple[list[Any], int, int]] = {}
        while True:
            batch = self._next()
            if batch is None:
                return
            key = id(batch)
            try:
                if key not in columns_of:
                    self._commit_id += 1
                    t, w = time.thread_time(), time.perf_counter()
                    if batch.sets:
                        cols, bad = sets_to_columns(batch.sets, batch.records, correlation="collected",
                                                    ended=_ENDED, time_inserted=int(self.wall()),
                                                    commit_id=self._commit_id)
                    else:
                        cols, bad = records_to_columns(batch.records, correlation="collected", ended=_ENDED,
                                                       time_inserted=int(self.wall()), commit_id=self._commit_id,
                                                       text=getattr(self.store, "text_form", "list"))
                    batch.sets, batch.records = [], []  # the columns hold them now
                    self.convert_cpu += time.thread_time() - t
                    self.convert_wall += time.perf_counter() - w
                    columns_of[key] = (cols, bad, self._commit_id)
                    if bad:
                        log.warning("collector: %d records with values the table cannot hold left out", bad)
                cols, bad, commit_id = columns_of[key]
                if failures and len(cols[0]) and self.store.rows_of_commit(commit_id, int(cols[0][0])):
                    pass  # the last attempt landed though its answer was lost
                else:
                    t, w = time.thread_time(), time.perf_counter()
                    self.store.insert(cols)
                    self.insert_cpu += time.thread_time() - t
                    self.insert_wall += time.perf_counter() - w
            except Exception as exc:  # noqa: BLE001 - any store failure: keep the batch, back off, retry
                failures += 1
                self.commit_failures += 1
                self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                delay = min(BACKOFF_INITIAL * (2 ** (failures - 1)), BACKOFF_MAX)
                log.warning("collector: storing %d records failed (%s); retrying in %.1fs",
                            len(batch), self.last_error, delay)
                try:
                    self.store.reset()
                except Exception:  # noqa: BLE001
                    pass
                with self._cond:
                    if self._closing and self._deadline is not None and self.clock() > self._deadline:
                        return
                    self._cond.wait(delay)
                continue
            failures = 0
            del columns_of[key]
            with self._cond:
                self._queue.popleft()
                self._held -= len(batch)
                self.committed += len(batch) - bad
                self.invalid += bad
                self.commits += 1
                self._cond.notify_all()

    _deadline: float | None = None

    def close(self) -> None:
        """Commit everything held (waiting up to ``close_timeout``), then stop the worker."""
        with self._cond:
            self._closing = True
            self._deadline = self.clock() + self.close_timeout
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(self.close_timeout + 1)
        with self._cond:
            self.lost_at_close = self._held
        if self.lost_at_close:
            log.error("collector: %d records not stored at shutdown (%s)", self.lost_at_close,
                      self.last_error or "timed out")

    def stats(self) -> WriterStats:
        with self._cond:
            return WriterStats(self.offered, self.committed, self.overflow, self.invalid, self._held,
                               self.commits, self.commit_failures, self.lost_at_close, self.last_error,
                               self.queue_cpu, self.convert_cpu, self.insert_cpu, self.convert_wall,
                               self.insert_wall)
