"""The Flow Exporter loop: poll conntrack, update the store, enrich, hand records to IPFIX.

This is the thin asynchronous shell around the pure parts (the store decides what to
export, :mod:`flowscope.agent.records` builds records, :mod:`flowscope.agent.metadata`
enriches them). One :meth:`FlowExporter.poll_once` is one poll cycle: the conntrack
dump runs in a worker thread (it blocks on netlink), everything after it on the event
loop. Records go to a :class:`RecordSink`, the exporting process of flowscope.ipfix in
production: its ``submit`` never blocks, keeps a bounded backlog while the collector is
away, and counts what it has to drop; the agent keeps polling either way.

The clock is injected (``clock`` returns epoch seconds) so that tests can drive the
export deadlines.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from flowscope.agent.conntrack import ConntrackError, ConntrackSource, DumpResult
from flowscope.agent.metadata import Enricher
from flowscope.agent.metrics import AgentMetrics
from flowscope.agent.records import build_record
from flowscope.agent.store import ConnectionStore, FlowExport

__all__ = ["FlowExporter", "RecordSink"]

log = logging.getLogger(__name__)

SUBMIT_BATCH = 1000


class RecordSink(Protocol):
    """The part of flowscope.ipfix.process.ExportingProcess the agent uses."""

    def submit(self, template_id: int, records: Sequence[dict[str, Any]]) -> bool: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def stats(self) -> Any: ...


class FlowExporter:
    def __init__(
        self,
        *,
        conntrack: ConntrackSource,
        sink: RecordSink,
        enricher: Enricher,
        active_timeout: float,
        idle_timeout: float,
        poll_interval: float,
        max_connections: int,
        metrics: AgentMetrics | None = None,
        clock: Callable[[], float] = time.time,
        export_host_flows: bool = False,
    ) -> None:
        self.conntrack = conntrack
        # With a metadata inventory, connections with no Pod at either end (kubelet, the
        # agent's own export stream) are the Node's traffic, not the cluster's: skipped,
        # as Antrea's agent never sees them, unless asked for.
        self.export_host_flows = export_host_flows
        self.host_flows_skipped = 0
        self.sink = sink
        self.enricher = enricher
        self.poll_interval = poll_interval
        self.metrics = metrics or AgentMetrics()
        self.clock = clock
        self.store = ConnectionStore(
            active_timeout=active_timeout,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
            is_denied=enricher.is_denied,
        )
        self.records_submitted = 0
        self.records_refused = 0  # submit() answered False: the backlog was full
        self.records_failed = 0  # could not be built (a bug: logged with the connection)
        self.polls = 0
        self._carry: list[FlowExport] = []
        self._interrupted = 0  # consecutive interrupted dumps

    # --- one cycle ------------------------------------------------------------------
    async def poll_once(self) -> int:
        """Dump, update, export; returns how many records were handed to the sink."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            result, exports = await loop.run_in_executor(None, self.cycle, self.clock())
        except (ConntrackError, OSError) as exc:
            self.metrics.poll_errors.inc()
            log.error("conntrack dump failed (the agent keeps polling): %s", exc)
            return 0
        sent = await self._submit(exports)
        self.polls += 1
        m = self.metrics
        m.poll_duration.observe(time.perf_counter() - t0)
        m.conntrack_total.set(result.total)
        m.tracked.set(len(self.store))
        m.denied.set(self.store.denied_total)
        m.connections_dropped.set(self.store.dropped_total)
        ct_max = self.conntrack.max_entries()
        if ct_max is not None:
            m.conntrack_max.set(ct_max)
        self._sink_metrics()
        return sent

    def cycle(self, now: float) -> tuple[DumpResult, list[FlowExport]]:
        """Dump and merge (batch by batch, never two copies of the table), then expire.

        Runs in a worker thread; the event loop does not touch the store meanwhile.
        The garbage collector is paused: a poll makes 100k short-lived tuples without
        reference cycles, and full collections over them cost more than the poll.
        """
        store = self.store
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            store.begin(now)
            try:
                result = self.conntrack.dump(store.feed)
            except BaseException:
                # A partial dump says nothing about which connections are gone: close the
                # poll without end-of-flow decisions. Exports already decided are kept
                # for the next cycle rather than lost.
                self._carry = store.finish(complete=False)
                raise
            # An interrupted dump may miss entries, so it decides no end of flow; but a
            # table so busy that every dump is interrupted must not keep ended
            # connections forever: the third interrupted dump in a row decides anyway.
            self._interrupted = self._interrupted + 1 if result.interrupted else 0
            trusted = self._interrupted == 0 or self._interrupted >= 3
            if not trusted:
                log.info("the conntrack table changed during the dump; end-of-flow decisions wait for the next poll")
            else:
                self._interrupted = 0
            exports = self._carry + store.finish(complete=trusted)
            self._carry = []
            exports += store.expire(now)
        finally:
            if gc_was_on:
                gc.enable()
        return result, exports

    async def _submit(self, exports: list[FlowExport]) -> int:
        """Build and hand over records a slice at a time, yielding to the event loop in
        between: the exporting process encodes each slice to bytes (about 150 octets a
        record) before the next slice of dicts (about 2 KB each) is built, so exporting
        100k connections at once does not hold 100k record dicts."""
        if not exports:
            return 0
        enrich = self.enricher.enrich
        sent = 0
        for i in range(0, len(exports), SUBMIT_BATCH):
            by_template: dict[int, list[dict[str, Any]]] = {}
            for fe in exports[i : i + SUBMIT_BATCH]:
                try:
                    k8s = enrich(fe.entry)
                    if k8s.host_only and not self.export_host_flows:
                        self.host_flows_skipped += 1
                        continue
                    tid, rec = build_record(fe, k8s)
                except Exception:  # noqa: BLE001 - one odd connection must not cost the others
                    self.records_failed += 1
                    log.exception("could not build the record of %s", fe.entry)
                    continue
                by_template.setdefault(tid, []).append(rec)
            # a slice refused by a full backlog is counted; later slices may still fit
            for tid, recs in by_template.items():
                if self.sink.submit(tid, recs):
                    sent += len(recs)
                else:
                    self.records_refused += len(recs)
            await asyncio.sleep(0)
        self.records_submitted += sent
        self.metrics.records_exported.inc(sent)
        self.metrics.host_flows_skipped.set(self.host_flows_skipped)
        return sent

    def _sink_metrics(self) -> None:
        stats = getattr(self.sink, "stats", None)
        if stats is None:
            return
        m = self.metrics
        get = stats.get if isinstance(stats, dict) else lambda k, d=0: getattr(stats, k, d)
        m.reconnections.set(get("reconnects", 0))
        m.records_dropped.set(get("records_dropped", 0) or self.records_refused)
        m.records_lost.set(get("records_lost", 0))
        m.exporter_connected.set(1 if get("connected", False) else 0)

    # --- the daemon ----------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Poll every poll interval until ``stop`` is set; then final exports and close."""
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    await self.poll_once()
                except Exception:  # noqa: BLE001 - a daemon logs, counts and polls on
                    self.metrics.poll_errors.inc()
                    log.exception("poll cycle failed; polling on")
                delay = max(0.0, self.poll_interval - (time.monotonic() - started))
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Export every live connection with flowEndReason 4 (forced end), flush, close."""
        await self._submit(self.store.flush(self.clock()))
        try:
            await asyncio.wait_for(self.sink.flush(), timeout=10.0)
        except (asyncio.TimeoutError, OSError) as exc:
            log.warning("could not flush the last records to the collector: %s", exc)
        await self.sink.close()
        self._sink_metrics()
        self.conntrack.close()
