"""The Flow Exporter loop: poll conntrack, update the store, enrich, hand records to IPFIX.

This is the thin asynchronous shell around the pure parts (the store decides what to
export, :mod:`flowscope.agent.records` builds records, :mod:`flowscope.agent.metadata`
enriches them). One :meth:`FlowExporter.poll_once` is one poll cycle: the conntrack
dump runs in a worker thread (it blocks on netlink), everything after it on the event
loop. Records go to a :class:`RecordSink`, the exporting process of flowscope.ipfix in
production: its ``submit`` never blocks, keeps a bounded backlog while the collector is
away, and counts what it has to drop; the agent keeps polling either way.

Several destinations (Antrea's FlowExporterDestination): besides the main sink, each
:class:`Destination` has its own connection store (so its own active and idle timeouts
and its own view of what was exported), its own sink (so its own queue and drop
counter: a slow or absent collector holds back no other) and a :class:`FlowFilter` on
protocols, namespaces, flow types and denial. Every store is fed the same dump, batch by
batch, and the same conntrack events.

With conntrack events (``events``, a :class:`flowscope.agent.ctevents.ConntrackEvents`)
each cycle applies, after the dump and before the dump's end-of-flow decisions, every
DESTROY the kernel announced until then (see :mod:`flowscope.agent.store`).

The clock is injected (``clock`` returns epoch seconds) so that tests can drive the
export deadlines.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from flowscope.agent.conntrack import ConntrackError, ConntrackSource, DumpResult
from flowscope.agent.metadata import Enricher, Enrichment
from flowscope.agent.metrics import AgentMetrics
from flowscope.agent.records import build_record
from flowscope.agent.store import ConnectionStore, FlowExport

__all__ = ["FlowExporter", "RecordSink", "Destination", "FlowFilter", "EventSource"]

log = logging.getLogger(__name__)

SUBMIT_BATCH = 1000


class RecordSink(Protocol):
    """The part of flowscope.ipfix.exporting.ExportingProcess the agent uses."""

    def submit(self, template_id: int, records: Sequence[dict[str, Any]]) -> bool: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def stats(self) -> Any: ...


class EventSource(Protocol):
    """What the exporter needs of flowscope.agent.ctevents.ConntrackEvents."""

    def take(self) -> list[tuple[int, Any]]: ...

    def stats(self) -> Any: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """Which connections a destination receives; an empty set lets everything through.

    ``namespaces`` matches the Kubernetes namespace of either Pod end (as the record
    names it: a Pod of this node); ``denied_only`` keeps connections a NetworkPolicy
    dropped (rule action Drop or Reject).
    """

    protocols: frozenset[int] = frozenset()
    namespaces: frozenset[str] = frozenset()
    flow_types: frozenset[int] = frozenset()
    denied_only: bool = False

    def admits(self, fe: FlowExport, k8s: Enrichment) -> bool:
        if self.protocols and fe.entry.protocol not in self.protocols:
            return False
        if self.flow_types and k8s.flow_type not in self.flow_types:
            return False
        if self.namespaces and not (
            k8s.source_pod_namespace in self.namespaces or k8s.destination_pod_namespace in self.namespaces
        ):
            return False
        if self.denied_only and not (fe.denied or k8s.denied):
            return False
        return True


@dataclass(eq=False)
class Destination:
    """One collector: its sink, timeouts and filter, and what happened to its records."""

    name: str
    sink: RecordSink
    active_timeout: float
    idle_timeout: float
    filter: FlowFilter = field(default_factory=FlowFilter)
    store: ConnectionStore = field(init=False)
    records_submitted: int = 0
    records_refused: int = 0  # submit() answered False: this destination's backlog was full
    records_filtered: int = 0
    host_flows_skipped: int = 0
    carry: list[FlowExport] = field(default_factory=list)


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
        destinations: Sequence[Destination] = (),
        events: EventSource | None = None,
        table_statistics: Callable[[], dict[str, int] | None] | None = None,
        wait_for_destroy: bool = False,
    ) -> None:
        self.conntrack = conntrack
        self.events = events
        # conntrack's own counters (early drops when the table is full...), read in the
        # worker thread after each dump: flowscope.agent.ctevents.table_statistics
        self.table_statistics = table_statistics
        self._table_stats: dict[str, int] | None = None
        # the dump makes DESTROYs as it reaps expired entries: drained between its datagrams
        self._pump: Callable[[], None] | None = getattr(events, "pump", None)
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
        main = Destination("main", sink, active_timeout, idle_timeout)
        self.destinations = [main, *destinations]
        for d in self.destinations:
            d.store = ConnectionStore(
                active_timeout=d.active_timeout,
                idle_timeout=d.idle_timeout,
                max_connections=max_connections,
                is_denied=enricher.is_denied,
            )
            d.store.events_enabled = events is not None
            d.store.wait_for_destroy = events is not None and wait_for_destroy
        self.store = main.store
        self.records_failed = 0  # could not be built (a bug: logged with the connection)
        self.polls = 0
        self._interrupted = 0  # consecutive interrupted dumps
        self._event_stats_at = 0.0

    @property
    def records_submitted(self) -> int:
        return self.destinations[0].records_submitted

    @property
    def records_refused(self) -> int:
        return self.destinations[0].records_refused

    # --- one cycle ------------------------------------------------------------------
    async def poll_once(self) -> int:
        """Dump, update, export; returns how many records were handed to the sink."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            result, per_dest = await loop.run_in_executor(None, self.cycle_all, self.clock())
        except (ConntrackError, OSError) as exc:
            self.metrics.poll_errors.inc()
            log.error("conntrack dump failed (the agent keeps polling): %s", exc)
            return 0
        sent = 0
        for d, exports in zip(self.destinations, per_dest):
            n = await self._submit(d, exports)
            if d is self.destinations[0]:
                sent = n
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
        if self._table_stats is not None:
            m.conntrack_early_drops.set(self._table_stats.get("early_drop", 0))
            m.conntrack_insert_failed.set(self._table_stats.get("insert_failed", 0))
            m.conntrack_drops.set(self._table_stats.get("drop", 0))
        self._sink_metrics()
        self._event_metrics()
        return sent

    def cycle(self, now: float) -> tuple[DumpResult, list[FlowExport]]:
        """One cycle; the exports of the main destination (tests and benchmarks)."""
        result, per_dest = self.cycle_all(now)
        exports = [list(x) for x in per_dest]  # every destination's, as poll_once takes them
        return result, exports[0]

    def _feed(self, batch: list[Any]) -> None:
        for d in self.destinations:
            protocols = d.filter.protocols
            d.store.feed(batch if not protocols else [e for e in batch if e.protocol in protocols])
        if self._pump is not None:
            self._pump()

    def cycle_all(self, now: float) -> tuple[DumpResult, list[Iterable[FlowExport]]]:
        """Dump and merge into every destination's store (batch by batch, never two copies
        of the table), apply the conntrack events, then decide ends; per destination, the
        exports decided so far followed by the expiry's, taken one by one
        (ConnectionStore.expire_iter, at ``now``) by whoever consumes them, so that a mass
        expiry is never held as one list of exports. Consume every destination's before
        the next cycle.

        Runs in a worker thread; the event loop does not touch the stores meanwhile.
        The garbage collector is paused: a poll makes 100k short-lived tuples without
        reference cycles, and full collections over them cost more than the poll.
        """
        dests = self.destinations
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            for d in dests:
                d.store.begin(now)
            try:
                if len(dests) == 1 and self._pump is None:
                    store = dests[0].store
                    result = self.conntrack.dump(store.feed, held=store.held())
                else:
                    result = self.conntrack.dump(self._feed)
            except BaseException:
                # A partial dump says nothing about which connections are gone: close the
                # poll without end-of-flow decisions. Exports already decided (and the
                # exact ends the events announced) are kept for the next cycle.
                events = self.events.take() if self.events is not None else []
                for d in dests:
                    d.carry += d.store.finish(complete=False) + self._apply_events(d, events, now)
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
            # every ending the kernel announced until the end of the dump, before the
            # dump decides what vanished without an event
            events = self.events.take() if self.events is not None else []
            if self.table_statistics is not None:
                self._table_stats = self.table_statistics()
            per_dest: list[Iterable[FlowExport]] = []
            for d in dests:
                exports = d.carry + self._apply_events(d, events, now)
                exports += d.store.finish(complete=trusted)
                d.carry = []
                per_dest.append(itertools.chain(exports, d.store.expire_iter(now)))
        finally:
            if gc_was_on:
                gc.enable()
        return result, per_dest

    @staticmethod
    def _apply_events(d: Destination, events: list[tuple[int, Any]], now: float) -> list[FlowExport]:
        if not events:
            return []
        protocols = d.filter.protocols
        if protocols:
            events = [ev for ev in events if ev[1].protocol in protocols]
        return d.store.apply_events(events, now)

    async def _submit(self, d: Destination, exports: Iterable[FlowExport]) -> int:
        """Build and hand over records a slice at a time, yielding to the event loop in
        between: the exporting process encodes each slice to bytes (about 150 octets a
        record) before the next slice of dicts (about 2 KB each) is built, so exporting
        100k connections at once does not hold 100k record dicts (nor, taking the exports
        one slice at a time from the store, 100k exports)."""
        pending = iter(exports)
        enrich = self.enricher.enrich
        admits = d.filter.admits
        sent = 0
        main = d is self.destinations[0]
        while True:
            batch = list(itertools.islice(pending, SUBMIT_BATCH))
            if not batch:
                break
            by_template: dict[int, list[dict[str, Any]]] = {}
            for fe in batch:
                try:
                    k8s = enrich(fe.entry)
                    if k8s.host_only and not self.export_host_flows:
                        d.host_flows_skipped += 1
                        if main:
                            self.host_flows_skipped += 1
                        continue
                    if not admits(fe, k8s):
                        d.records_filtered += 1
                        continue
                    tid, rec = build_record(fe, k8s)
                except Exception:  # noqa: BLE001 - one odd connection must not cost the others
                    self.records_failed += 1
                    log.exception("could not build the record of %s", fe.entry)
                    continue
                by_template.setdefault(tid, []).append(rec)
            # a slice refused by a full backlog is counted; later slices may still fit
            for tid, recs in by_template.items():
                if d.sink.submit(tid, recs):
                    sent += len(recs)
                else:
                    d.records_refused += len(recs)
            await asyncio.sleep(0)
        d.records_submitted += sent
        m = self.metrics
        m.destination_records_exported.labels(d.name).inc(sent)
        if main:
            m.records_exported.inc(sent)
            m.host_flows_skipped.set(self.host_flows_skipped)
        return sent

    def _sink_metrics(self) -> None:
        m = self.metrics
        for d in self.destinations:
            stats = getattr(d.sink, "stats", None)
            if stats is None:
                continue
            get = stats.get if isinstance(stats, dict) else lambda k, dflt=0, s=stats: getattr(s, k, dflt)
            dropped = get("records_dropped", 0) or d.records_refused
            connected = 1 if get("connected", False) else 0
            m.destination_records_dropped.labels(d.name).set(dropped)
            m.destination_connected.labels(d.name).set(connected)
            if d is self.destinations[0]:
                m.reconnections.set(get("reconnects", 0))
                m.records_dropped.set(dropped)
                m.records_lost.set(get("records_lost", 0))
                m.exporter_connected.set(connected)

    def _event_metrics(self) -> None:
        if self.events is None:
            return
        m = self.metrics
        st = self.events.stats()
        m.events_received.set(st.events)
        m.events_overruns.set(st.overruns)
        lost = (st.kernel_drops or 0) + st.pending_dropped
        m.events_lost.set(lost)
        m.ended_by_event.set(self.store.ended_by_event)
        m.ended_without_event.set(self.store.ended_by_dump)

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
        """The last events' exact ends, then every live connection with flowEndReason 4
        (forced end); flush every destination at once (an absent one delays no other),
        close."""
        now = self.clock()
        events = self.events.take() if self.events is not None else []
        for d in self.destinations:
            await self._submit(d, itertools.chain(d.carry + self._apply_events(d, events, now), d.store.flush_iter(now)))
            d.carry = []

        async def drain(d: Destination) -> None:
            try:
                await asyncio.wait_for(d.sink.flush(), timeout=10.0)
            except (asyncio.TimeoutError, OSError) as exc:
                log.warning("could not flush the last records to destination %s: %s", d.name, exc)
            await d.sink.close()

        await asyncio.gather(*(drain(d) for d in self.destinations))
        self._sink_metrics()
        self._event_metrics()
        if self.events is not None:
            self.events.close()
        self.conntrack.close()
