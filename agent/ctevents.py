"""Conntrack events: the kernel's announcement of every connection that ends.

Why: a poll every ``flowPollInterval`` misses what happens between two dumps. A
connection that ends after the last dump would be exported with that dump's counters,
and a short one whose entry is gone before the next dump would never be seen at all.
The kernel multicasts a DESTROY event for every entry it deletes, carrying the final
packet and octet counters of both directions (``nf_conntrack_acct``) and the start and
stop times (``nf_conntrack_timestamp``); this module subscribes to those events, beside
the dump, which stays the source of truth for long-lived connections and for whatever
the events lost.

Theory of operation
-------------------
One ``AF_NETLINK``/``NETLINK_NETFILTER`` socket joins the ctnetlink multicast group
``NFNLGRP_CONNTRACK_DESTROY`` (and ``NFNLGRP_CONNTRACK_NEW`` when asked). Each event is
one netlink datagram holding one conntrack message of the same attribute layout as a
dump's, so :class:`~flowscope.agent.conntrack.EntryParser`'s compiled layouts parse it.

A reader thread waits for the socket (``select``, outside any lock), then under a lock
drains it without blocking and appends the parsed events to a pending list. The poll
cycle calls :meth:`ConntrackEvents.take` *after* its dump: under the same lock it first
drains what the socket still holds, then takes the list. Every entry the dump did not
list was deleted before the dump read its bucket, and its DESTROY event was queued on
the socket at deletion time, so after ``take`` the store knows of every ending the
kernel announced up to the end of the dump, and only a *lost* event can leave a
connection that vanished without one (the store then falls back to the dump's counters;
see :mod:`flowscope.agent.store`).

Loss is a fact of netlink: when the receive buffer overflows the kernel drops the event
and the next ``recv`` fails with ``ENOBUFS``. Each such failure is counted
(:attr:`ConntrackEvents.overruns`), and the exact number of datagrams the kernel dropped
is read from the socket's ``Drops`` column of ``/proc/self/net/netlink``
(:meth:`ConntrackEvents.kernel_drops`). The buffer's size comes from the agent's
configuration (``conntrackEvents.bufferSize``) and is forced past ``rmem_max``
(``SO_RCVBUFFORCE``, which needs ``CAP_NET_ADMIN``).

The socket is a plain one from the standard library, as the dump's is: pyroute2's
``NFCTSocket`` would parse each event into an object per attribute, the cost measured
for the dump (80-170 µs an entry) that the burst of ``benchmarks/agent_events.py``
cannot afford; the table statistics (:func:`table_statistics`) are read the same way.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flowscope.agent.conntrack import NETLINK_NETFILTER, ConntrackEntry, EntryParser

__all__ = [
    "ConntrackEvents", "ConntrackEvent", "EVENT_NEW", "EVENT_DESTROY", "enable_events",
    "table_statistics", "EventStats",
]

log = logging.getLogger(__name__)

# include/uapi/linux/netfilter/nfnetlink.h: enum nfnetlink_groups
NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_DESTROY = 3
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33

# Message types as they arrive: (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW / _DELETE.
EVENT_NEW = 0x100
EVENT_DESTROY = 0x102

ConntrackEvent = tuple[int, ConntrackEntry]  # (EVENT_NEW or EVENT_DESTROY, the entry)


@dataclass(frozen=True, slots=True)
class EventStats:
    events: int  # events parsed since the start
    overruns: int  # recv() failures with ENOBUFS: the kernel dropped events
    kernel_drops: int | None  # datagrams the kernel dropped for this socket (None: unknown)
    pending_dropped: int  # events parsed but not kept: the pending list was at its cap


class ConntrackEvents:
    """A DESTROY (and optionally NEW) event subscription in the current network namespace.

    ``buffer_size`` is the socket's receive buffer in bytes; ``max_pending`` bounds the
    events held between two :meth:`take` calls (beyond it they are counted and dropped,
    and the dump covers for them like for any lost event). :meth:`start` runs the reader
    thread; without it, :meth:`take` alone drains the socket (tests do that).
    """

    def __init__(
        self,
        zones: Iterable[int] = (),
        *,
        buffer_size: int = 32 << 20,
        new: bool = False,
        max_pending: int = 1_000_000,
    ) -> None:
        self.parser = EntryParser(zones)
        self.buffer_size = buffer_size
        self.max_pending = max_pending
        self.overruns = 0
        self.events = 0
        self.pending_dropped = 0
        self._pending: list[ConntrackEvent] = []
        self._lock = threading.Lock()
        self._buf = bytearray(1 << 16)
        self._closed = False
        self._thread: threading.Thread | None = None
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, buffer_size)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
                got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
                if got < buffer_size:
                    log.warning(
                        "conntrack events: receive buffer capped at %d bytes (net.core.rmem_max) instead of %d; "
                        "run the agent with CAP_NET_ADMIN to force it", got, buffer_size,
                    )
            sock.bind((0, 0))
            groups = [NFNLGRP_CONNTRACK_DESTROY] + ([NFNLGRP_CONNTRACK_NEW] if new else [])
            for group in groups:
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._inode = os.fstat(sock.fileno()).st_ino
        # /proc/net/netlink lists the sockets of the namespace it was opened in: opened
        # now, by the thread that made the socket, it keeps showing that namespace.
        try:
            self._netlink_table: Any = open("/proc/thread-self/net/netlink")
        except OSError:
            self._netlink_table = None

    # --- reading ------------------------------------------------------------------------
    def _drain_locked(self) -> None:
        """Read every datagram queued now, without blocking (the caller holds the lock)."""
        sock, buf, parser = self._sock, self._buf, self.parser
        recv_into = sock.recv_into
        pending = self._pending
        flags = socket.MSG_DONTWAIT
        while True:
            try:
                n = recv_into(buf, 0, flags)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # The kernel dropped events; the socket goes on with the next ones.
                    self.overruns += 1
                    continue
                if self._closed:
                    return
                raise
            if n == 0:
                return
            before = len(pending)
            parser.parse_events(buf, n, pending)
            got = len(pending) - before
            self.events += got
            if len(pending) > self.max_pending:
                extra = len(pending) - self.max_pending
                del pending[self.max_pending :]
                self.pending_dropped += extra

    def pump(self) -> None:
        """Drain the socket now if no one else is (the dump calls this between its
        datagrams: walking the table, the kernel reaps expired entries, and their DESTROYs
        arrive while the dump runs)."""
        if self._closed or not self._lock.acquire(blocking=False):
            return
        try:
            self._drain_locked()
        finally:
            self._lock.release()

    def take(self) -> list[ConntrackEvent]:
        """Every event announced until now (the socket drained first), in arrival order."""
        with self._lock:
            if not self._closed:
                self._drain_locked()
            out, self._pending = self._pending, []
        return out

    def _run(self) -> None:
        sock = self._sock
        while not self._closed:
            try:
                ready, _, _ = select.select([sock], [], [], 0.5)
            except (OSError, ValueError):
                return  # closed under us
            if ready and not self._closed:
                try:
                    with self._lock:
                        self._drain_locked()
                except Exception:  # noqa: BLE001 - the reader must not die silently
                    log.exception("conntrack event reader: unexpected error; reading on")

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="conntrack-events", daemon=True)
            self._thread.start()

    def fileno(self) -> int:
        return self._sock.fileno()

    # --- loss accounting ----------------------------------------------------------------
    def kernel_drops(self) -> int | None:
        """The ``Drops`` column of this socket's line in ``/proc/net/netlink``."""
        fh = self._netlink_table
        if fh is None:
            return None
        try:
            fh.seek(0)
            header = fh.readline().split()
            idx_drops, idx_inode = header.index("Drops"), header.index("Inode")
            for line in fh:
                cols = line.split()
                if len(cols) > max(idx_drops, idx_inode) and int(cols[idx_inode]) == self._inode:
                    return int(cols[idx_drops])
        except (OSError, ValueError):
            return None
        return None

    def stats(self) -> EventStats:
        return EventStats(self.events, self.overruns, self.kernel_drops(), self.pending_dropped)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            self._sock.close()
        if self._netlink_table is not None:
            self._netlink_table.close()
            self._netlink_table = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)


# --- the node side: sysctls and statistics --------------------------------------------

def enable_events(proc_root: str = "/proc/sys/net/netfilter") -> bool:
    """Make sure conntrack sends events in this network namespace.

    ``nf_conntrack_events``: 0 sends none, 1 always, 2 (the kernel's default since 5.19)
    only while some socket listens, which the agent's does. 0 is switched to 1; when that
    is not permitted a warning says what the agent loses and how to fix it. Returns True
    when events are on afterwards.
    """
    path = os.path.join(proc_root, "nf_conntrack_events")
    try:
        with open(path) as fh:
            if fh.read().strip() in ("1", "2"):
                return True
        with open(path, "w") as fh:
            fh.write("1\n")
        return True
    except OSError as exc:
        log.warning(
            "cannot set nf_conntrack_events=1 (%s: %s): connections that end between two polls are "
            "exported with the last poll's counters or not at all; run the agent with CAP_NET_ADMIN "
            "and /proc/sys writable, or set the sysctl on the node",
            path, exc.strerror,
        )
        return False


# The per-CPU statistics of IPCTNL_MSG_CT_GET_STATS_CPU the agent exposes as metrics.
STAT_FIELDS = (
    "found", "invalid", "insert", "insert_failed", "drop", "early_drop", "error", "search_restart", "clash_resolve",
)


# enum ctattr_stats_cpu (nfnetlink_conntrack.h): the counters conntrack -S prints
_STAT_ATTRS = {
    2: "found", 4: "invalid", 8: "insert", 9: "insert_failed", 10: "drop", 11: "early_drop", 12: "error",
    13: "search_restart", 14: "clash_resolve",
}
IPCTNL_MSG_CT_GET_STATS_CPU = 4


def table_statistics() -> dict[str, int] | None:
    """Conntrack's own counters of this namespace, summed over CPUs (``conntrack -S``):
    one ``IPCTNL_MSG_CT_GET_STATS_CPU`` dump on a plain netlink socket (pyroute2's
    ``NFCTSocket.stat()`` answers the same, but importing pyroute2 costs the agent about
    10 MB of its memory budget, and each call ran an event loop of its own); None when
    the kernel cannot answer. ``early_drop`` counts entries evicted because the table was
    full, ``drop`` packets dropped for lack of an entry."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as exc:
        log.debug("conntrack statistics unavailable: %s", exc)
        return None
    totals = dict.fromkeys(STAT_FIELDS, 0)
    try:
        sock.settimeout(2.0)
        sock.bind((0, 0))
        body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
        mtype = (1 << 8) | IPCTNL_MSG_CT_GET_STATS_CPU  # NFNL_SUBSYS_CTNETLINK
        sock.send(struct.pack("=IHHII", 16 + len(body), mtype, 0x1 | 0x300, 1, 0) + body)  # REQUEST | DUMP
        while True:
            data = sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, t = struct.unpack_from("=IH", data, off)
                if length < 16 or off + length > len(data):
                    return None
                if t == 3:  # NLMSG_DONE
                    return totals
                if t == 2:  # NLMSG_ERROR
                    (code,) = struct.unpack_from("=i", data, off + 16)
                    if code:
                        log.debug("conntrack statistics refused: %s", os.strerror(-code))
                        return None
                elif t == mtype:
                    pos, end = off + 20, off + length
                    while pos + 4 <= end:
                        alen, atype = struct.unpack_from("=HH", data, pos)
                        if alen < 4 or pos + alen > end:
                            return None
                        name = _STAT_ATTRS.get(atype & 0x3FFF)
                        if name is not None and alen == 8:
                            totals[name] += struct.unpack_from("!I", data, pos + 4)[0]
                        pos += (alen + 3) & ~3
                off += (length + 3) & ~3
    except OSError as exc:  # statistics must never stop the agent
        log.debug("conntrack statistics unavailable: %s", exc)
        return None
    finally:
        sock.close()
