"""Where aggregated records go: one small interface, a bounded queue in front of each sink.

A :class:`Sink` receives batches of :class:`~flowscope.aggregator.aggregation.ExportedFlow`
(the aggregated record dict plus how complete it is and whether it is the flow's last).
It knows nothing of correlation, and correlation knows nothing of sinks: a new store
(the ClickHouse sink of the collector, for instance) implements ``start``, ``write`` and
``close`` and plugs in through :func:`flowscope.aggregator.service.FlowAggregator`'s
``sinks`` argument without touching anything else. A sink that buffers (ClickHouse
commits every ``commitInterval``) does so inside ``write``/``close``.

:class:`QueuedSink` is what keeps one slow sink from stalling collection: ``offer`` never
blocks; it appends to a bounded queue (in records) that a worker task drains into the
sink, and counts what did not fit (``dropped``) and what the sink failed to take
(``failed``). Nothing is lost silently.

Two sinks live here: :class:`IPFIXSink` (the design's exporting process to
``externalFlowCollectorAddr``) and :class:`FlowLogSink` (JSON lines with size-based
rotation, written by :class:`FlowLogWriter`, which is plain synchronous code).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from flowscope.ipfix.antrea import aggregator_fields

from .aggregation import ExportedFlow

__all__ = ["Sink", "QueuedSink", "FlowLogWriter", "FlowLogSink", "IPFIXSink", "data_records", "record_to_json", "TEMPLATE_IDS",
           "template_names"]

log = logging.getLogger("flowscope.aggregator.sinks")


@runtime_checkable
class Sink(Protocol):
    """A destination of aggregated records."""

    name: str

    async def start(self) -> None: ...

    async def write(self, batch: Sequence[ExportedFlow]) -> None:
        """Store or send a batch; raise to report a failure (the batch is counted as failed)."""

    async def close(self) -> None:
        """Flush what is buffered and release resources."""


class QueuedSink:
    """A sink behind its own bounded queue and worker task; ``offer`` never blocks."""

    def __init__(self, sink: Sink, *, queue_size: int, batch_size: int = 1000) -> None:
        self.sink = sink
        self.name = sink.name
        self.queue_size = queue_size
        self.batch_size = batch_size
        self._queue: deque[ExportedFlow] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._taken = asyncio.Event()  # set whenever the worker takes a batch off the queue
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.offered = 0
        self.written = 0
        self.dropped = 0  # did not fit in the queue
        self.failed = 0  # the sink raised while writing them
        self.stalled = False  # took nothing for a whole stall interval (see wait_progress)
        self.last_error: str | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        await self.sink.start()
        self._task = asyncio.create_task(self._run(), name=f"sink-{self.name}")

    def offer_fit(self, batch: Sequence[ExportedFlow]) -> int:
        """Queue as much of ``batch`` as fits, from its start, dropping nothing; returns how
        many were queued (the caller waits for room and offers the rest)."""
        room = self.queue_size - len(self._queue)
        take = batch if len(batch) <= room else batch[: max(room, 0)]
        if take:
            self.offered += len(take)
            self._queue.extend(take)
            self._idle.clear()
            self._wakeup.set()
        return len(take)

    def offer(self, batch: Sequence[ExportedFlow]) -> int:
        """Queue what fits, count the rest as dropped; returns how many were queued."""
        self.offered += len(batch)
        room = self.queue_size - len(self._queue)
        take = batch if len(batch) <= room else batch[: max(room, 0)]
        if len(take) < len(batch):
            lost = len(batch) - len(take)
            if not self.dropped:
                log.warning("sink %s: queue full (%d records); dropping and counting", self.name, self.queue_size)
            self.dropped += lost
        if take:
            self._queue.extend(take)
            self._idle.clear()
            self._wakeup.set()
        return len(take)

    async def _run(self) -> None:
        q = self._queue
        while True:
            if not q:
                self._idle.set()
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            n = min(len(q), self.batch_size)
            batch = [q.popleft() for _ in range(n)]
            self.stalled = False
            self._taken.set()
            try:
                await self.sink.write(batch)
                self.written += n
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a sink's failure must not stop the others or collection
                self.failed += n
                if str(exc) != self.last_error:
                    log.error("sink %s: write of %d records failed: %s", self.name, n, exc)
                self.last_error = str(exc)
                await asyncio.sleep(0)

    @property
    def room(self) -> int:
        return self.queue_size - len(self._queue)

    async def wait_room(self, n: int, timeout: float) -> bool:
        """Wait (at most ``timeout``) until ``n`` records fit; the exporter paces its bursts
        with this, so that a periodic export of many flows is not dropped by a sink that
        keeps up on average. False: still no room (the next ``offer`` will count drops)."""
        n = min(n, self.queue_size)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.room < n:
            left = deadline - loop.time()
            if left <= 0 or self._task is None or self._task.done():
                return False
            self._taken.clear()
            try:
                await asyncio.wait_for(self._taken.wait(), left)
            except TimeoutError:
                return self.room >= n
        return True

    async def wait_progress(self, n: int, stall: float) -> bool:
        """Wait until ``n`` records fit, for as long as the sink keeps taking batches: False
        only when it took nothing for ``stall`` seconds (it is then marked stalled, and not
        waited for again until it takes a batch). Back-pressure for a slow sink, a bounded
        wait for a stuck one."""
        n = min(n, self.queue_size)
        if self.stalled:
            return self.room >= n
        while self.room < n:
            if self._task is None or self._task.done():
                return False
            self._taken.clear()
            try:
                await asyncio.wait_for(self._taken.wait(), stall)
            except TimeoutError:
                self.stalled = True
                return self.room >= n
        return True

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the queue is empty (True) or ``timeout`` passed (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self, timeout: float = 10.0) -> None:
        """Drain the queue (within ``timeout``), then close the sink."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.CancelledError:
                if not self._task.cancelled():  # we are being cancelled, not the worker
                    raise
            except TimeoutError:
                left = len(self._queue)
                self._task.cancel()
                self.failed += left
                self._queue.clear()
                log.error("sink %s: %d records not written before shutdown", self.name, left)
            except Exception:  # the worker never raises, but never hang shutdown on it either
                pass
        await self.sink.close()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "offered": self.offered, "written": self.written, "dropped": self.dropped,
            "failed": self.failed, "queued": len(self._queue), "queueSize": self.queue_size,
        }
        extra = getattr(self.sink, "stats", None)
        if callable(extra):
            out.update(extra())
        return out


def record_to_json(flow: ExportedFlow) -> dict[str, Any]:
    """A flow log line: the IPFIX record's fields plus how complete it is and whether it is final."""
    out = {k: (v.hex() if isinstance(v, (bytes, bytearray)) else v) for k, v in flow.record.items()}
    out["correlation"] = flow.correlation
    out["final"] = flow.final
    return out


def _cut_torn_tail(path: str) -> int:
    """Cut off a last line that has no newline and return its length: what a process killed
    in the middle of a write (kill -9, a lost node) leaves. Appended to as it is, the next
    record would be glued onto the fragment and both lines would be unreadable."""
    try:
        fh = open(path, "r+b")
    except FileNotFoundError:
        return 0
    with fh:
        end = fh.seek(0, os.SEEK_END)
        if end == 0:
            return 0
        fh.seek(end - 1)
        if fh.read(1) == b"\n":
            return 0
        keep, pos = 0, end
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            fh.seek(pos)
            at = fh.read(step).rfind(b"\n")
            if at >= 0:
                keep = pos + at + 1
                break
        fh.truncate(keep)
        return end - keep


class FlowLogWriter:
    """Append JSON lines to a file, rotating by size: ``flows.jsonl`` -> ``.1`` -> ... ``.N``.

    ``max_backups`` 0 keeps no old file (the log restarts when it is full). A batch is
    never split across files; a single batch larger than ``max_bytes`` still goes whole
    into a fresh file (the cap is about rotation, not about losing records).
    """

    def __init__(self, path: str, *, max_bytes: int, max_backups: int) -> None:
        if max_bytes < 1 or max_backups < 0:
            raise ValueError("max_bytes must be positive and max_backups not negative")
        self.path = path
        self.max_bytes = max_bytes
        self.max_backups = max_backups
        self.rotations = 0
        self._fh: Any = None
        self._size = 0

    def _open(self) -> None:
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        cut = _cut_torn_tail(self.path)
        if cut:
            log.warning("flow log %s ended in %d bytes of a line cut short (a crash mid-write); "
                        "they are removed so the next record starts a line of its own", self.path, cut)
        self._fh = open(self.path, "ab")
        self._size = self._fh.tell()

    def rotate(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.max_backups == 0:
            if os.path.exists(self.path):
                os.remove(self.path)
        else:
            for i in range(self.max_backups - 1, 0, -1):
                older = f"{self.path}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{i + 1}")
            if os.path.exists(self.path):
                os.replace(self.path, f"{self.path}.1")
        self.rotations += 1
        self._open()

    def write_lines(self, lines: Sequence[str]) -> int:
        """Write one JSON document per line; returns the bytes written."""
        data = "".join(line + "\n" for line in lines).encode()
        if self._fh is None:
            self._open()
        if self._size and self._size + len(data) > self.max_bytes:
            self.rotate()
        self._fh.write(data)
        self._fh.flush()
        self._size += len(data)
        return len(data)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class FlowLogSink:
    """The JSON-lines flow log (``sinks.flowLog``); file IO runs in a worker thread."""

    name = "flowLog"

    def __init__(self, path: str, *, max_size_mb: float, max_backups: int) -> None:
        self.writer = FlowLogWriter(path, max_bytes=max(1, int(max_size_mb * 1024 * 1024)), max_backups=max_backups)

    async def start(self) -> None:
        await asyncio.to_thread(self.writer._open)

    async def write(self, batch: Sequence[ExportedFlow]) -> None:
        await asyncio.to_thread(self._write, batch)  # serializing too: off the event loop

    def _write(self, batch: Sequence[ExportedFlow]) -> None:
        self.writer.write_lines([json.dumps(record_to_json(f), separators=(",", ":")) for f in batch])

    async def close(self) -> None:
        await asyncio.to_thread(self.writer.close)

    def stats(self) -> dict[str, Any]:
        return {"rotations": self.writer.rotations}


def template_names(ipv6: bool, exporter_ipv6: bool) -> tuple[str, ...]:
    """The aggregated record's template: :func:`flowscope.ipfix.antrea.aggregator_fields`
    (fixed fields first, strings last), the order the records are built in.

    The exporter's address is originalExporterIPv4Address, or ...IPv6Address for an agent
    that reached the aggregator over IPv6.
    """
    return aggregator_fields(6 if ipv6 else 4, 6 if exporter_ipv6 else 4)


# Template ids of the aggregated records: (flow is IPv6, exporter is IPv6) -> id.
TEMPLATE_IDS: dict[tuple[bool, bool], int] = {(False, False): 256, (True, False): 257, (False, True): 258, (True, True): 259}


_LAYOUTS = ((False, False), (False, True), (True, False), (True, True))  # _aggr's layout i: (flow v6, exporter v6)
_IPFIX_CODES = {"unsigned8": 1, "unsigned16": 2, "unsigned32": 4, "unsigned64": 8}
_ipfix_native: Any = None  # _aggr, once its IPFIX codes are configured; False: not available


def _native_encoder() -> Any:
    """The C export's data record encoder (aggregator/_aggr.c encode_records), configured
    with each template's field codes on first use; None where the twin serves or a field
    is of a type it does not write (the codec then encodes every record)."""
    global _ipfix_native
    if _ipfix_native is None:
        from flowscope.ipfix import Template
        from flowscope.ipfix.template import VARIABLE_LENGTH

        from .aggregation import _aggr, output_names

        _ipfix_native = False
        codes = []
        for v6, e6 in _LAYOUTS:
            t = Template.build(TEMPLATE_IDS[(v6, e6)], template_names(v6, e6))
            if _aggr is None or t.keys != output_names(v6, e6):
                return None
            out = bytearray()
            for f in t.fields:
                dt, n = f.ie.data_type.name, f.length
                code = {
                    **{(k, w): w for k, w in _IPFIX_CODES.items()}, ("dateTimeSeconds", 4): ord("T"),
                    ("ipv4Address", 4): ord("4"), ("ipv6Address", 16): ord("6"), ("string", VARIABLE_LENGTH): ord("S"),
                }.get((dt, n))
                if code is None:
                    return None
                out.append(code)
            codes.append(bytes(out))
        _aggr.configure_ipfix(tuple(codes))
        _ipfix_native = _aggr
    return _ipfix_native or None


def data_records(batch: Sequence[ExportedFlow], limit: int) -> list[tuple[int, list[Any], bool]]:
    """The IPFIX sink's submissions for a batch: (template id, items, data sets or not).
    The C export's Records are encoded straight from their values into data sets of at
    most ``limit`` octets (items ``(payload, records)``: the bytes the codec makes of their
    dicts, split where the codec would split them); any other record, and a Record
    holding a value the codec takes some other way, goes to the codec as a dict (items:
    records, by template)."""
    out: list[tuple[int, list[Any], bool]] = []
    rest: Sequence[ExportedFlow] = batch
    native = _native_encoder()
    if native is not None:
        got = native.encode_sets(batch if type(batch) is list else list(batch), limit)
        if got is not None:
            per, rest = got
            out += [(TEMPLATE_IDS[_LAYOUTS[i]], sets, True) for i, sets in enumerate(per) if sets]
    groups: dict[int, list[Any]] = {}
    for f in rest:
        rec = f.record
        if type(rec) is not dict:
            rec = dict(rec)
        tid = TEMPLATE_IDS[("sourceIPv6Address" in rec, "originalExporterIPv6Address" in rec)]
        groups.setdefault(tid, []).append(rec)
    out += [(tid, recs, False) for tid, recs in groups.items()]
    return out


class IPFIXSink:
    """The design's exporting process: aggregated records over IPFIX to the external collector.

    Templates are announced by the :class:`flowscope.ipfix.exporting.ExportingProcess`, which
    resends them on every reconnect and refresh; records go to its own bounded queue, and
    what it refuses is counted here too (``exporterDropped``).
    """

    name = "ipfix"

    def __init__(self, address: Any, *, observation_domain_id: int = 0, queue_size: int = 10_000,
                 submit_wait: float = 5.0) -> None:
        self.address = address
        self.submit_wait = submit_wait
        self.observation_domain_id = observation_domain_id
        self.queue_size = queue_size
        self.process: Any = None

    async def start(self) -> None:
        from flowscope.ipfix import Template
        from flowscope.ipfix.exporting import ExportingProcess

        templates = [Template.build(tid, template_names(v6, e6)) for (v6, e6), tid in TEMPLATE_IDS.items()]
        self.process = ExportingProcess(
            self.address, tls=None, templates=templates, observation_domain_id=self.observation_domain_id,
            queue_size=self.queue_size,
        )
        await self.process.start()

    async def write(self, batch: Sequence[ExportedFlow]) -> None:
        loop = asyncio.get_running_loop()
        for tid, items, sets in data_records(batch, self.process.data_set_limit):
            n = sum(count for _payload, count in items) if sets else len(items)
            # Backpressure: wait (a bounded time) for the exporting process's queue to take the
            # batch, so that this sink's own queue absorbs bursts and counts what overflows.
            deadline = loop.time() + self.submit_wait
            st = self.process.stats
            while st.queued + n > self.process.queue_size and loop.time() < deadline:
                await asyncio.sleep(0.005)
            # a refusal is counted by the process (records_dropped)
            if sets:
                self.process.submit_data_sets(tid, items)
            else:
                self.process.submit(tid, items)

    async def close(self) -> None:
        if self.process is not None:
            try:
                await asyncio.wait_for(self.process.flush(), 5.0)
            except (TimeoutError, OSError):
                log.warning("ipfix sink: could not flush to %s before shutdown", self.address)
            await self.process.close()

    def stats(self) -> dict[str, Any]:
        st = getattr(self.process, "stats", None)
        if st is None:
            return {}
        d = st.as_dict() if hasattr(st, "as_dict") else {}
        keep = ("records_sent", "records_dropped", "records_lost", "records_invalid", "connects", "reconnects",
                "connected", "queued")
        return {f"exporter_{k}": d[k] for k in keep if k in d}
