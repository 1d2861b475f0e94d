"""The connection store: which connections to export, when, and with which counters.

Theory of operation
-------------------
Each poll merges one conntrack dump, either whole (:meth:`ConnectionStore.update`) or
as it arrives (:meth:`begin`, :meth:`feed` per netlink datagram, :meth:`finish`), which
is what the agent does so as never to hold two copies of a large table. Every entry
fed marks its connection seen in this poll; :meth:`finish` ends those not seen. The
store keeps one :class:`Connection` per conntrack entry (keyed by zone and original
tuple) and a priority queue of deadlines; nothing here reads a clock or a socket: the
caller passes ``now`` (seconds since the epoch) to every call, so tests drive time.

A connection's deadline is the earlier of
- its *active* deadline, ``last_export + activeFlowExportTimeout``: a connection whose
  counters moved since its last export is exported with flowEndReason 2 (active timeout);
- its *idle* deadline, ``last_activity + idleFlowExportTimeout``: a connection without
  new packets for that long is exported once with flowEndReason 1 (idle timeout) and
  then waits, out of the queue, until it moves again or ends.

:meth:`expire` pops only the deadlines that are due, so a poll costs one dictionary
pass over the dump plus work proportional to the exports, not to the table. The queue
is lazy: a deadline that moved is re-pushed when popped, stale items are skipped. It
holds one list per distinct deadline (connections first seen or exported in the same
poll share theirs) and a heap of those deadlines, so a queued connection costs a list
slot and shares its deadline's float, not a heap tuple with its own float and sequence
number (about 120 bytes: 12 MB at 100k connections).

A connection *ends* when it leaves the table, is dying, or is a TCP connection in
TIME_WAIT or CLOSE: it gets a final export with flowEndReason 3 (end of flow). An
ended connection still in the table stays as a tombstone (no more exports) until the
kernel forgets it, so that a TIME_WAIT entry is not mistaken for a new connection.
When conntrack reuses a tuple for a new connection (another conntrack id or start
time), the old one gets its final export and the new one starts from zero. On shutdown
:meth:`flush` exports every live connection with flowEndReason 4 (forced end).

Delta counters are the conntrack totals minus the totals at the last export; they are
never negative: totals that went down mean a new connection, whose delta is its total.

The store holds at most ``max_connections``. Entries beyond the cap are not held; each
one is counted once in :attr:`dropped_total` (the previous poll's overflow keys are kept
to tell a new overflow from one counted already), so nothing is lost silently and
memory stays bounded by the cap. Room freed by connections that ended in this poll is
available from the next poll on.

Conntrack events (:mod:`flowscope.agent.ctevents`) make endings exact. After each dump
the caller hands the DESTROY events announced until then to :meth:`apply_events`,
before :meth:`finish`. A DESTROY carries the kernel's final counters and stop time:
- for a connection the store holds (same conntrack id), it is the final export
  (flowEndReason 3) with those counters, and the connection leaves the store; for a
  tombstone (already exported as ended) it only removes the tombstone;
- for a connection the store never held (it began and ended between two dumps), it is
  the one and only export, from the event alone;
- by default a connection the dump finds in TIME_WAIT or CLOSE is exported then (the
  kernel enters TIME_WAIT on the last ACK, so its counters are final; measured equal to
  the DESTROY's) and its DESTROY only removes the tombstone; with ``wait_for_destroy``
  it is not exported from the dump but by its DESTROY (when the kernel forgets it,
  nf_conntrack_tcp_timeout_time_wait later), with no idle or active export meanwhile;
- with events on, a tuple reused by a new connection does not end the old one at once:
  the old one waits, keyed by its conntrack id, for its DESTROY (already queued, since
  the kernel deleted it before the new one could take the tuple).
Only what the events lost (``ENOBUFS``) is left for :meth:`finish`: a connection that
vanished without an event, or an old one still waiting, is exported from the last
dump's counters, as without events. Each connection is exported once either way: an
event and the dump never both end the same connection, because the dump decides only
after the events announced before its end were applied.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum

from flowscope.agent.conntrack import ConnKey, ConntrackEntry

EVENT_DESTROY = 0x102  # flowscope.agent.ctevents.EVENT_DESTROY (the ctnetlink message type)
GONE = -1  # Connection.seen of a connection the store let go (the C parser checks it; see held)

__all__ = ["ConnectionStore", "FlowExport", "FlowEndReason", "Connection"]


class FlowEndReason(IntEnum):
    """RFC 5102 flowEndReason values."""

    IDLE_TIMEOUT = 1
    ACTIVE_TIMEOUT = 2
    END_OF_FLOW = 3
    FORCED_END = 4
    LACK_OF_RESOURCES = 5


@dataclass(frozen=True, slots=True)
class FlowExport:
    """One record to export: the connection as last seen, the reason, the deltas."""

    entry: ConntrackEntry
    reason: FlowEndReason
    packet_delta: int
    octet_delta: int
    reverse_packet_delta: int
    reverse_octet_delta: int
    start_time: float  # epoch seconds
    end_time: float  # epoch seconds
    denied: bool = False


_NOTHING = (0, 0, 0, 0)  # counters of a connection with no packets counted (or nf_conntrack_acct off)


def _flag(bit: int, doc: str) -> property:
    def get(self: Connection) -> bool:
        return bool(self.flags & bit)

    def put(self: Connection, value: bool) -> None:
        self.flags = self.flags | bit if value else self.flags & ~bit

    return property(get, put, doc=doc)


class Connection:
    """The store's mutable state for one conntrack entry.

    Eight slots (96 bytes; the store holds one per connection): the four yes/no states
    share one ``flags`` int, each read and set through its own property.
    """

    __slots__ = ("entry", "first_seen", "last_activity", "last_export", "exported", "flags", "queued_at", "seen")

    def __init__(self, entry: ConntrackEntry, now: float) -> None:
        self.entry = entry
        self.first_seen = now
        self.last_activity = now
        self.last_export = now
        self.exported = _NOTHING  # totals at the last export
        self.flags = 0  # idle_exported, ended, denied, closing: all False
        self.queued_at: float | None = None  # the deadline this connection is queued with
        self.seen = 0  # the last poll whose dump listed it; GONE once out of the store

    idle_exported = _flag(1, "exported for its idle timeout; waits until it moves again or ends")
    ended = _flag(2, "its final record went out (a tombstone while the kernel still lists it)")
    denied = _flag(4, "exported as denied by a NetworkPolicy")
    closing = _flag(8, "ended in the table (TIME_WAIT, dying): its DESTROY will say how it ended")


def _same_connection(old: ConntrackEntry, new: ConntrackEntry) -> bool:
    if old.ct_id and new.ct_id and old.ct_id != new.ct_id:
        return False
    if old.start_ns and new.start_ns and old.start_ns != new.start_ns:
        return False
    return not (
        new.orig_packets < old.orig_packets
        or new.orig_bytes < old.orig_bytes
        or new.reply_packets < old.reply_packets
        or new.reply_bytes < old.reply_bytes
    )


class ConnectionStore:
    """Connections of the conntrack table and their export schedule (see the module docstring).

    ``is_denied(entry)`` is asked about each new connection that has seen no reply; when
    it answers True the connection is exported once at once (flowEndReason 3, marked
    denied). A denied connection whose entry later shows a reply (the policy changed, or
    the denial was wrong) is revisited: it becomes a live connection again and is
    exported as usual, so its next record carries the verdict that holds then.
    """

    def __init__(
        self,
        *,
        active_timeout: float,
        idle_timeout: float,
        max_connections: int,
        is_denied: Callable[[ConntrackEntry], bool] | None = None,
    ) -> None:
        if active_timeout <= 0 or idle_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.active_timeout = active_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.is_denied = is_denied
        self._conns: dict[ConnKey, Connection] = {}
        # the export queue: deadline -> (that deadline, its connections in queueing order),
        # and a heap of the deadlines (each pushed once, when its list is made)
        self._queue: dict[float, tuple[float, list[Connection]]] = {}
        self._deadlines: list[float] = []
        self._overflow: set[ConnKey] = set()
        self.dropped_total = 0
        self.denied_total = 0
        self.revived_total = 0  # connections exported as denied that later got an answer
        self.overflow_now = 0  # entries of the last dump not held because of the cap
        self._poll = 0
        self._now = 0.0
        self._out: list[FlowExport] = []
        self._new_overflow: set[ConnKey] = set()
        # conntrack events (see the module docstring)
        self.events_enabled = False
        # with events: a connection that reached TIME_WAIT or CLOSE (or is dying) is not
        # exported from the dump but by its DESTROY, whose counters include the last ACKs
        self.wait_for_destroy = False
        self._awaiting_destroy: dict[int, Connection] = {}  # conntrack id -> replaced connection
        self.ended_by_event = 0  # final exports with the kernel's final counters
        self.ended_by_dump = 0  # connections that vanished without an event (events lost or off)
        self.event_only = 0  # of ended_by_event: connections no dump ever saw

    def __len__(self) -> int:
        return len(self._conns)

    def get(self, key: ConnKey) -> Connection | None:
        return self._conns.get(key)

    # --- scheduling -------------------------------------------------------------------
    def _deadline(self, c: Connection) -> float | None:
        if c.ended or c.closing:
            return None
        idle_at = c.last_activity + self.idle_timeout
        if c.idle_exported:
            return None
        return min(c.last_export + self.active_timeout, idle_at)

    def _schedule(self, c: Connection) -> None:
        at = self._deadline(c)
        if at is None or c.queued_at == at:
            return
        if c.queued_at is not None and c.queued_at < at:
            return  # the earlier queue item will re-schedule when it pops
        slot = self._queue.get(at)
        if slot is None:
            slot = self._queue[at] = (at, [])
            heapq.heappush(self._deadlines, at)
        c.queued_at = slot[0]  # the deadline's one float
        slot[1].append(c)

    def _export(self, c: Connection, reason: FlowEndReason, now: float, *, end_time: float | None = None) -> FlowExport:
        e = c.entry
        totals = (e.orig_packets, e.orig_bytes, e.reply_packets, e.reply_bytes)
        last = c.exported
        deltas = [t - p if t >= p else t for t, p in zip(totals, last)]
        c.exported = totals if totals != _NOTHING else _NOTHING  # one shared tuple where acct is off
        c.last_export = now
        start = e.start_ns / 1e9 if e.start_ns else c.first_seen
        if end_time is None:
            end_time = e.stop_ns / 1e9 if (e.stop_ns and reason == FlowEndReason.END_OF_FLOW) else now
        return FlowExport(e, reason, deltas[0], deltas[1], deltas[2], deltas[3], start, max(start, end_time), c.denied)

    # --- the three entry points -------------------------------------------------------
    def update(self, entries: Iterable[ConntrackEntry], now: float) -> list[FlowExport]:
        """Merge one whole dump; returns the exports it causes (ends, reuses, denials)."""
        self.begin(now)
        self.feed(entries)
        return self.finish()

    # A dump can also be merged as it arrives, one netlink datagram at a time, so that
    # the agent never holds a second copy of a large table: begin(), feed()..., finish().
    def begin(self, now: float) -> None:
        self._poll += 1
        self._now = now
        self._out = []
        self._new_overflow = set()

    def held(self) -> tuple[dict[ConnKey, Connection], int]:
        """For a dump whose parser returns an entry unchanged since the last dump as the
        very same object (the C parser): the connections by key and this poll, so that it
        may do :meth:`feed`'s first case itself (``connection.seen = poll`` for an entry
        that is the one its connection holds) instead of handing the entry over. The
        parser may remember which connection held an entry: every connection the store
        lets go has ``seen = GONE``, so one that still holds the entry and is not GONE is
        the one the dict maps its key to."""
        return self._conns, self._poll

    def feed(self, entries: Iterable[ConntrackEntry]) -> None:
        conns = self._conns
        out = self._out
        now = self._now
        poll = self._poll
        cap = self.max_connections
        prev_overflow = self._overflow
        for e in entries:
            key = e.key
            c = conns.get(key)
            if c is not None:
                old = c.entry
                if old is e or old == e:  # the C parser returns an unchanged entry as the same object
                    c.seen = poll
                    continue
                if not _same_connection(old, e):
                    if self.events_enabled and old.ct_id and not c.ended:
                        # its DESTROY event is on its way with the final counters
                        c.queued_at = None
                        self._awaiting_destroy[old.ct_id] = c
                    elif not c.ended:
                        self.ended_by_dump += 1
                        out.append(self._export(c, FlowEndReason.END_OF_FLOW, now))
                    c.ended = True
                    c.seen = GONE
                    del conns[key]
                else:
                    c.seen = poll
                    if c.ended:
                        if c.denied and e.replied:
                            self._revive(c, e, now)
                        else:
                            c.entry = e
                        continue
                    if (
                        e.orig_packets != old.orig_packets
                        or e.reply_packets != old.reply_packets
                        or e.orig_bytes != old.orig_bytes
                        or e.reply_bytes != old.reply_bytes
                    ):
                        c.last_activity = now
                        c.idle_exported = False
                    c.entry = e
                    if e.ended:
                        if self.wait_for_destroy:
                            c.closing = True  # the last ACKs may still come: the DESTROY counts them
                            c.queued_at = None
                        else:
                            c.ended = True
                            out.append(self._export(c, FlowEndReason.END_OF_FLOW, now))
                    else:
                        self._schedule(c)
                    continue
            # a connection the store does not hold yet
            if len(conns) >= cap:
                self._new_overflow.add(key)
                if key not in prev_overflow:
                    self.dropped_total += 1
                continue
            c = Connection(e, now)
            c.seen = poll
            conns[key] = c
            if e.ended and self.wait_for_destroy:
                c.closing = True
            elif e.ended:
                c.ended = True
                out.append(self._export(c, FlowEndReason.END_OF_FLOW, now))
            elif not e.replied and self.is_denied is not None and self.is_denied(e):
                c.denied = True
                c.ended = True
                self.denied_total += 1
                out.append(self._export(c, FlowEndReason.END_OF_FLOW, now, end_time=now))
            else:
                self._schedule(c)

    def _revive(self, c: Connection, e: ConntrackEntry, now: float) -> None:
        """A connection exported as denied got an answer: the policy (or the dataplane) lets it
        through after all, so it is a live connection again, exported on its usual schedule
        with the verdict it has then; its counters continue from the denied export."""
        c.denied = False
        c.ended = False
        c.entry = e
        c.last_activity = now
        c.idle_exported = False
        self.revived_total += 1
        if e.ended:
            c.ended = True
            self._out.append(self._export(c, FlowEndReason.END_OF_FLOW, now))
        else:
            self._schedule(c)

    def finish(self, *, complete: bool = True) -> list[FlowExport]:
        """Connections not seen in this dump are gone: their final exports, and all of the poll's.

        ``complete=False`` (the dump failed or was interrupted) closes the poll without
        deciding that anything is gone.
        """
        conns = self._conns
        poll = self._poll
        out = self._out
        now = self._now
        if not complete:
            self._overflow |= self._new_overflow
            self._new_overflow = set()
            self._out = []
            return out
        # replaced connections whose DESTROY never came: the event was lost
        for c in self._awaiting_destroy.values():
            self.ended_by_dump += 1
            out.append(self._export(c, FlowEndReason.END_OF_FLOW, now))
        self._awaiting_destroy.clear()
        for key in [k for k, c in conns.items() if c.seen != poll]:
            c = conns.pop(key)
            c.seen = GONE
            c.queued_at = None
            if not c.ended:
                c.ended = True
                self.ended_by_dump += 1
                out.append(self._export(c, FlowEndReason.END_OF_FLOW, now))
        self._overflow = self._new_overflow
        self._new_overflow = set()
        self.overflow_now = len(self._overflow)
        self._out = []
        return out

    def apply_events(self, events: Iterable[tuple[int, ConntrackEntry]], now: float) -> list[FlowExport]:
        """Final exports for the DESTROY events among ``events`` (NEW events are ignored
        here: the next dump brings those connections in with fresher counters)."""
        conns = self._conns
        awaiting = self._awaiting_destroy
        out: list[FlowExport] = []
        for mtype, e in events:
            if mtype != EVENT_DESTROY:
                continue
            c = awaiting.pop(e.ct_id, None) if e.ct_id else None
            if c is None:
                held = conns.get(e.key)
                if held is not None and (not e.ct_id or not held.entry.ct_id or held.entry.ct_id == e.ct_id):
                    del conns[e.key]
                    held.seen = GONE
                    held.queued_at = None
                    if held.ended:
                        continue  # a tombstone: exported when it reached TIME_WAIT or CLOSE
                    c = held
            if c is None:
                # born and gone between two dumps: this event is all there is of it
                c = Connection(e, now)
                if not e.replied and self.is_denied is not None and self.is_denied(e):
                    c.denied = True
                    self.denied_total += 1
                self.event_only += 1
            c.entry = e
            c.ended = True
            self.ended_by_event += 1
            out.append(self._export(c, FlowEndReason.END_OF_FLOW, now))
        return out

    def expire(self, now: float) -> list[FlowExport]:
        """Exports whose active or idle deadline is due at ``now`` (deadline by deadline,
        and in queueing order within one)."""
        return list(self.expire_iter(now))

    def expire_iter(self, now: float) -> Iterator[FlowExport]:
        """:meth:`expire`, one export at a time, so that a caller turning 100k due
        connections into records slice by slice never holds 100k exports at once (about
        11 MB). Each export is decided as it is taken; a caller that stops early leaves
        the rest queued as they were, for the next call. Nothing else may use the store
        until the iterator is exhausted or closed."""
        deadlines = self._deadlines
        queue = self._queue
        while deadlines and deadlines[0] <= now:
            at = heapq.heappop(deadlines)
            conns = queue.pop(at)[1]
            i = 0
            try:
                while i < len(conns):
                    c = conns[i]
                    i += 1
                    if c.queued_at != at or c.ended or c.closing:
                        continue  # stale: re-queued later, or ended meanwhile
                    c.queued_at = None
                    if c.idle_exported:
                        continue
                    if c.last_activity + self.idle_timeout <= now:
                        c.idle_exported = True
                        yield self._export(c, FlowEndReason.IDLE_TIMEOUT, now)
                        continue
                    if c.last_export + self.active_timeout <= now:
                        e = c.entry
                        if (e.orig_packets, e.orig_bytes, e.reply_packets, e.reply_bytes) != c.exported:
                            fe = self._export(c, FlowEndReason.ACTIVE_TIMEOUT, now)
                            self._schedule(c)
                            yield fe
                            continue
                        c.last_export = now  # nothing new: wait for the idle deadline
                    self._schedule(c)
            finally:
                if i < len(conns):  # stopped early: the rest stay due at this deadline
                    rest = conns[i:]
                    slot = queue.get(at)
                    if slot is None:
                        queue[at] = (at, rest)
                        heapq.heappush(deadlines, at)
                    else:
                        slot[1][:0] = rest

    def flush(self, now: float) -> list[FlowExport]:
        """Final exports (flowEndReason 4, forced end) of every live connection; empties the store."""
        return list(self.flush_iter(now))

    def flush_iter(self, now: float) -> Iterator[FlowExport]:
        """:meth:`flush`, one export at a time: the store is emptied when the first export
        is taken (a generator runs nothing before), the exports are made as they are taken."""
        live = [c for c in self._conns.values() if not c.ended]
        awaiting = list(self._awaiting_destroy.values())
        self._awaiting_destroy.clear()
        for c in self._conns.values():
            c.seen = GONE
        self._conns.clear()
        self._queue.clear()
        self._deadlines.clear()
        self._overflow.clear()
        for c in live:
            yield self._export(c, FlowEndReason.END_OF_FLOW if c.closing else FlowEndReason.FORCED_END, now)
        for c in awaiting:
            yield self._export(c, FlowEndReason.END_OF_FLOW, now)
