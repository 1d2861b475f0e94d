"""The Flow Aggregator's ClickHouse sink: aggregated records into the flow store, on a commit interval.

The aggregator builds it with :func:`make_sink` from the parsed
:class:`~flowscope.aggregator.config.ClickHouseSinkConfig` when ``sinks.clickhouse.enabled``
is true. The store itself (schema, migrations, backends) is the collector's
(:mod:`flowscope.collector.store`): the aggregator writes the table the collector reads.

Theory of operation
-------------------
*Buffer.* ``write`` only appends the batch to an in-memory buffer (the aggregator's
:class:`~flowscope.aggregator.sinks.QueuedSink` worker calls it). A commit takes the
buffer a chunk at a time (at most ``chunk_rows`` rows, one insert block each, which
ClickHouse writes atomically as one part) and inserts it from a worker thread
(``asyncio.to_thread``): the event loop that collects IPFIX never waits on ClickHouse.

*When.* A timer task commits every ``commitInterval``; a buffer that reaches a chunk
commits at once from ``write`` (so a burst is paced by ClickHouse's speed and the
QueuedSink's bounded queue absorbs it); ``close`` commits what is left.

*Failures.* A commit that fails (server down, refused, timed out) keeps its rows: the
chunk in flight stays in flight and the buffer keeps filling, the connection is dropped,
and the next attempt waits an exponential backoff (1 s doubling to 30 s; the timer waits
at least ``commitInterval``, a full chunk only the backoff). The table is
created again on reconnect (a server that lost its data gets it back). Nothing is lost
while the rows held stay within ``queueSize``; past that, ``write`` refuses the new
batch and raises, and the QueuedSink counts exactly those records as failed. So every
record offered is either in ClickHouse or counted: refused (QueuedSink ``failed``),
left out as invalid (``invalidRecords``), or still uncommitted at shutdown
(``lostAtClose``). The aggregator starts even when ClickHouse is unreachable: the
first connection is attempted by the timer task, logged and retried like any failure.

*No duplicates.* An insert whose answer never came may or may not have landed. Every
chunk carries a random ``commitId`` and its ``timeInserted``, fixed at its first
attempt; a retry first counts the rows with that id (a primary-key range read) and
inserts only if none landed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import random
import threading
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .aggregation import ExportedFlow
from .config import ClickHouseSinkConfig, ConfigError

from flowscope.collector.rows import columns_of, flows_to_columns
from flowscope.collector.schema import RECORD_COLUMNS
from flowscope.collector.store import FlowStore, StoreError, check_identifier, open_store, parse_store_address

from . import aggregation

__all__ = ["BufferFull", "ClickHouseSink", "backoff_delay", "flows_columns", "make_sink"]

log = logging.getLogger("flowscope.aggregator.clickhouse")

BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 30.0
CHUNK_ROWS = 100_000
CLOSE_TIMEOUT = 15.0


# The store's record columns as the C export's columns() reads them: (kind, width in
# octets, element, the folded IPv6 element or None), collector.rows' plan by name.
_PLAN = tuple((0 if c.is_int else 1, c.width, c.elements[0], c.elements[1] if len(c.elements) == 2 else None)
              for c in RECORD_COLUMNS)


def flows_columns(flows: Sequence[Any], *, time_inserted: int, commit_id: int,
                  text: str = "list") -> tuple[list[Any], int]:
    """:func:`flowscope.collector.rows.flows_to_columns` of a batch of ExportedFlows, the
    same columns and the same records left out, read straight from the C export's Records
    (aggregator/_aggr.c ``columns``: no dict per record, no int object per value) when the
    whole batch is what the C export made; any other batch goes to flows_to_columns."""
    native = aggregation._aggr
    got = None
    if native is not None and text in ("list", "arrow"):
        got = native.columns(flows if type(flows) is list else list(flows), _PLAN, text == "list")
    if got is None:
        return flows_to_columns(flows, time_inserted=time_inserted, commit_id=commit_id, text=text)  # type: ignore[arg-type]
    raw, bad, final = got
    cols = columns_of(raw)
    n = len(final)
    return [array("I", (time_inserted,)) * n, *cols, array("B", final), array("Q", (commit_id,)) * n], len(bad)


class BufferFull(Exception):
    """The sink holds as many rows as it may while ClickHouse does not take them; a batch was refused."""


def backoff_delay(failures: int, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX) -> float:
    """Seconds to wait after ``failures`` consecutive failed commits (1, 2, 4, ... up to ``maximum``)."""
    if failures <= 0:
        return 0.0
    return min(maximum, initial * 2.0 ** min(failures - 1, 30))


@dataclass(slots=True)
class _Chunk:
    """Rows of one insert: fixed id and insertion time, so a retry can find whether it landed."""

    commit_id: int
    time_inserted: int
    flows: Sequence[ExportedFlow] | None
    columns: list[list[Any]] | None = None
    invalid: int = 0
    attempts: int = 0
    rows: int = 0
    invalid_counted: bool = False


class ClickHouseSink:
    """A :class:`~flowscope.aggregator.sinks.Sink` that commits to a :class:`FlowStore`.

    ``clock`` (monotonic) schedules commits and backoff; ``wall`` gives ``timeInserted``.
    ``timer=False`` leaves commits to ``write``, :meth:`commit` and ``close`` (tests drive it).
    """

    name = "clickhouse"

    def __init__(
        self,
        store: FlowStore,
        *,
        commit_interval: float,
        max_buffer: int,
        chunk_rows: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        timer: bool = True,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        if commit_interval <= 0 or max_buffer < 1:
            raise ValueError("commit_interval must be positive and max_buffer at least 1")
        self.store = store
        self.commit_interval = commit_interval
        self.max_buffer = max_buffer
        self.chunk_rows = chunk_rows or max(1, min(CHUNK_ROWS, max_buffer // 2))
        self.clock = clock
        self.wall = wall
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.timer = timer
        self.close_timeout = close_timeout
        self._buffer: list[ExportedFlow] = []
        self._inflight: _Chunk | None = None
        self._lock = asyncio.Lock()
        self._send_lock = threading.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._opened = False
        self._closed = False
        self._last_attempt = float("-inf")
        self._retry_at = float("-inf")
        self._next_id = random.getrandbits(62) + 1
        self.failures = 0  # consecutive
        # counters
        self.committed_rows = 0
        self.commits = 0
        self.commit_failures = 0
        self.invalid_records = 0
        self.refused_records = 0
        self.lost_at_close = 0
        self.already_stored = 0  # retried chunks found already in the table (not inserted twice)
        self.missing_rows = 0  # rows of a chunk found only in part (one block a chunk: not expected)
        self.last_error: str | None = None
        # CPU seconds of the committing thread: records to typed columns, and the backend's insert
        # (chDB's own threads, if it uses any, are not in it)
        self.convert_cpu = 0.0
        self.insert_cpu = 0.0

    # ------------------------------------------------------------------ Sink
    @property
    def held(self) -> int:
        """Rows waiting for ClickHouse (the buffer and the chunk in flight)."""
        return len(self._buffer) + (self._inflight_rows())

    def _inflight_rows(self) -> int:
        c = self._inflight
        if c is None:
            return 0
        return c.rows

    async def start(self) -> None:
        if self.timer:
            self._task = asyncio.create_task(self._run(), name="sink-clickhouse-commit")

    async def write(self, batch: Sequence[ExportedFlow]) -> None:
        if not batch:
            return
        held = self.held
        if held + len(batch) > self.max_buffer:
            self.refused_records += len(batch)
            # The text stays the same while the outage lasts: QueuedSink logs a failure when its text changes.
            raise BufferFull(
                f"records not stored: the rows waiting for ClickHouse at {self.store.address} reached "
                f"sinks.clickhouse.queueSize ({self.max_buffer}); last error: {self.last_error or 'none, it is slow'}")
        self._buffer.extend(batch)
        if len(self._buffer) >= self.chunk_rows and self.clock() >= self._retry_at:
            await self.commit()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            async with self._lock:  # never cancel the timer mid-commit
                self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self.held:
            try:
                await asyncio.wait_for(self.commit(final=True), self.close_timeout)
            except TimeoutError:
                self.last_error = f"final commit did not finish within {self.close_timeout:g}s"
        left = self.held
        if left:
            self.lost_at_close += left
            log.error("clickhouse sink: %d rows not stored in %s at shutdown (%s)", left, self.store.address,
                      self.last_error)
            self._buffer.clear()
            self._inflight = None
        try:
            await asyncio.to_thread(self.store.close)
        except Exception as exc:  # noqa: BLE001 - shutdown goes on whatever the backend raises
            log.warning("clickhouse sink: closing %s: %s", self.store.address, exc)

    def stats(self) -> dict[str, Any]:
        return {
            "committedRows": self.committed_rows, "commits": self.commits, "commitFailures": self.commit_failures,
            "bufferedRows": self.held, "invalidRecords": self.invalid_records, "refusedRecords": self.refused_records,
            "lostAtClose": self.lost_at_close, "alreadyStored": self.already_stored, "missingRows": self.missing_rows,
            "connected": self._opened, "lastCommitError": self.last_error,
        }

    # ------------------------------------------------------------------ commits
    def next_due(self) -> float:
        """Monotonic time of the timer's next commit attempt."""
        return max(self._last_attempt + self.commit_interval, self._retry_at)

    async def _run(self) -> None:
        while True:
            delay = self.next_due() - self.clock()
            if delay > 0:
                await asyncio.sleep(min(delay, self.commit_interval))
                continue
            try:
                await self.commit()
            except asyncio.CancelledError:
                raise
            except Exception:  # commit() handles its failures; never let the timer die
                log.exception("clickhouse sink: commit loop")
                self._last_attempt = self.clock()

    def _take_chunk(self) -> _Chunk:
        flows = self._buffer[: self.chunk_rows]
        del self._buffer[: self.chunk_rows]
        cid, self._next_id = self._next_id, self._next_id + 1
        return _Chunk(cid, int(self.wall()), flows, rows=len(flows))

    def _send(self, chunk: _Chunk) -> int:
        """In a worker thread: convert once, then insert unless an earlier attempt landed. Rows stored.

        Serialized by a thread lock: an attempt abandoned by a timeout at shutdown may still be
        running in its thread, and the next one must see its insert before deciding.
        """
        with self._send_lock:
            return self._send_locked(chunk)

    def _send_locked(self, chunk: _Chunk) -> int:
        if chunk.columns is None:
            t = time.thread_time()
            chunk.columns, chunk.invalid = flows_columns(
                chunk.flows or (), time_inserted=chunk.time_inserted, commit_id=chunk.commit_id,
                text=getattr(self.store, "text_form", "list"))
            self.convert_cpu += time.thread_time() - t
            chunk.flows = None
            chunk.rows = len(chunk.columns[0])
        if chunk.attempts:
            landed = self.store.rows_of_commit(chunk.commit_id, chunk.time_inserted)
            if landed:
                return -landed  # negative: found, not inserted
        chunk.attempts += 1
        t = time.thread_time()
        self.store.insert(chunk.columns)
        self.insert_cpu += time.thread_time() - t
        return chunk.rows

    async def commit(self, *, final: bool = False) -> int:
        """One attempt to store everything held; returns rows stored. Failures are kept and counted, not raised."""
        async with self._lock:
            self._last_attempt = self.clock()
            stored = 0
            try:
                if not self._opened:
                    await asyncio.to_thread(self.store.open)
                    self._opened = True
                    if self.failures:
                        log.warning("clickhouse sink: %s reachable again after %d failed attempts; %d rows to commit",
                                    self.store.address, self.failures, self.held)
                    else:
                        log.info("clickhouse sink: connected to %s, table %s.%s", self.store.address,
                                 self.store.database, self.store.table)
                while self._inflight is not None or self._buffer:
                    if self._inflight is None:
                        self._inflight = self._take_chunk()
                    chunk = self._inflight
                    try:
                        n = await asyncio.to_thread(self._send, chunk)
                    finally:
                        self._count_invalid(chunk)
                    if n < 0:
                        self.already_stored += 1
                        n = -n
                        if n != chunk.rows:  # cannot happen with one block a chunk; say so if it does
                            log.error("clickhouse sink: commit %d found with %d of %d rows", chunk.commit_id, n,
                                      chunk.rows)
                            self.missing_rows += max(0, chunk.rows - n)
                    self._inflight = None
                    stored += n
                    self.committed_rows += n
                    self.commits += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure keeps the rows and is counted
                await self._failed(exc, final)
                return stored
            if self.failures:
                self.failures = 0
                self._retry_at = float("-inf")
            self.last_error = None
            return stored

    def _count_invalid(self, chunk: _Chunk) -> None:
        """Count a chunk's left-out records once, as soon as it is converted (even if its insert failed)."""
        if chunk.columns is not None and not chunk.invalid_counted:
            chunk.invalid_counted = True
            self.invalid_records += chunk.invalid
            if chunk.invalid:
                log.warning("clickhouse sink: %d records with values the table cannot hold left out", chunk.invalid)

    async def _failed(self, exc: Exception, final: bool) -> None:
        self.failures += 1
        self.commit_failures += 1
        self._opened = False
        self._retry_at = self.clock() + backoff_delay(self.failures, self.backoff_initial, self.backoff_max)
        delay = self.next_due() - self.clock()  # the longer of the backoff and the commit interval
        kind = "cannot be used" if isinstance(exc, StoreError) else "failed"
        self.last_error = f"{type(exc).__name__}: {exc}".strip()
        if final:
            log.error("clickhouse sink: final commit to %s %s: %s", self.store.address, kind, self.last_error)
        else:
            log.warning("clickhouse sink: commit to %s %s (%d in a row): %s; %d rows kept, retry in %.0fs",
                        self.store.address, kind, self.failures, self.last_error, self.held, delay)
        try:
            await asyncio.to_thread(self.store.reset)
        except Exception as reset_exc:  # noqa: BLE001 - the next attempt reconnects anyway
            log.debug("clickhouse sink: dropping the connection: %s", reset_exc)


def make_sink(config: ClickHouseSinkConfig, *, env: Mapping[str, str] | None = None) -> ClickHouseSink:
    """The aggregator's ClickHouse sink for ``sinks.clickhouse`` (credentials from
    CLICKHOUSE_USERNAME / CLICKHOUSE_PASSWORD). Raises ConfigError for a bad address or
    name, or a missing client package; never connects (the sink does, retrying)."""
    env = os.environ if env is None else env
    try:
        address = parse_store_address(config.address, "sinks.clickhouse.address")
        check_identifier(config.database, "sinks.clickhouse.database")
        check_identifier(config.table, "sinks.clickhouse.table")
    except StoreError as exc:
        raise ConfigError(str(exc)) from None
    package = "chdb" if address.kind == "chdb" else "clickhouse_driver"
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"sinks.clickhouse.address: {config.address!r} needs the Python package {package!r}, "
                          "which is not installed; install flowscope[collector]")
    if address.database and address.database != config.database:
        log.info("clickhouse sink: the address names the database %r; it is used instead of sinks.clickhouse.database %r",
                 address.database, config.database)
    store = open_store(address, config.database, config.table,
                       user=env.get("CLICKHOUSE_USERNAME") or "default", password=env.get("CLICKHOUSE_PASSWORD", ""))
    return ClickHouseSink(store, commit_interval=config.commit_interval, max_buffer=config.queue_size)
