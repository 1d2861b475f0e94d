"""Reading the kernel's conntrack table: a raw ctnetlink dump and a fast entry parser.

Why not pyroute2's parser: it builds a Python object per attribute and reads 6-11k
entries a second, and the agent must read a table of 100k connections every poll
interval (5 s by default). This module speaks ctnetlink itself over a plain
``AF_NETLINK`` socket and parses only the attributes the agent uses.

Theory of operation
-------------------
A dump is one ``IPCTNL_MSG_CT_GET`` request with ``NLM_F_DUMP`` for ``AF_UNSPEC`` (IPv4
and IPv6 together); the kernel answers with a stream of netlink datagrams, each holding
many ``IPCTNL_MSG_CT_NEW`` messages, ended by ``NLMSG_DONE``.

Entries of the same shape (family, protocol, which attributes are present, the sizes of
variable ones) share one attribute layout byte for byte. The first time the parser meets
a message it walks its attributes recursively and *compiles a layout*: one big-endian
``struct.Struct`` that unpacks every leaf value the agent reads in a single call, a mask
covering the bytes of every attribute header (length and type, at every nesting level),
and a generated function that turns the unpacked tuple into a :class:`ConntrackEntry`.
Later messages of the same length try the layouts compiled for that length: the message
read as one big integer, ANDed with the mask, must equal the compiled-from message's
headers, so a layout is never applied to a message of another shape (one C-level
big-integer operation instead of a Python walk). Attributes the agent does not use
(helpers, NAT sequence adjustment, secmark, timeout, use count...) are part of the
headers that must match and are skipped as padding.

Everything here is synchronous and blocking on a netlink socket; the agent runs the
dump in a worker thread. :class:`ConntrackSource` is the small interface the rest of the
agent depends on, so that tests feed the connection store without a kernel.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from .ctfast import native_parser

__all__ = [
    "ConntrackEntry",
    "ConntrackSource",
    "ConntrackError",
    "DumpResult",
    "NetlinkConntrack",
    "StaticConntrack",
    "EntryParser",
    "enable_accounting",
    "read_conntrack_max",
    "TCP_STATES",
    "IPS_SEEN_REPLY",
    "IPS_ASSURED",
    "IPS_DYING",
]

log = logging.getLogger(__name__)

# --- ctnetlink constants (include/uapi/linux/netfilter/nfnetlink_conntrack.h) ---------
NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED and NLA_F_NET_BYTEORDER

IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_DYING = 1 << 9

# TCP conntrack states (enum tcp_conntrack), named the way conntrack(8) and Antrea print them.
TCP_STATES = (
    "NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT",
    "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2",
)
TCP_TIME_WAIT = 7
TCP_CLOSE = 8


class ConnKey(NamedTuple):
    """Identity of a conntrack entry: zone plus its original-direction tuple."""

    zone: int
    protocol: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    icmp_id: int


class ConntrackEntry(NamedTuple):
    """One conntrack entry, as the agent needs it. Addresses are packed bytes (4 or 16).

    ``orig_*`` is the tuple of the first packet (its destination may be a Service's
    ClusterIP); ``reply_*`` is the reply tuple, whose source is the real destination
    after DNAT. Counters are zero when ``nf_conntrack_acct`` is off; timestamps (ns since
    the epoch) are zero when ``nf_conntrack_timestamp`` is off, ``stop_ns`` until the
    connection is dead.

    The original tuple, the protocol, the zone and the ICMP id are the key's, read
    through properties rather than stored twice (the family follows from the address
    length): the store holds one entry per connection, and 18 fields instead of 26
    take an entry from 248 to 184 bytes (256 to 192 as allocated).
    """

    key: ConnKey
    reply_src: bytes
    reply_dst: bytes
    reply_sport: int
    reply_dport: int
    orig_packets: int
    orig_bytes: int
    reply_packets: int
    reply_bytes: int
    start_ns: int
    stop_ns: int
    status: int
    tcp_state: int  # -1 when not TCP
    mark: int
    labels: bytes
    ct_id: int
    icmp_type: int
    icmp_code: int

    @property
    def family(self) -> int:
        return socket.AF_INET6 if len(self.key.src) == 16 else socket.AF_INET

    @property
    def protocol(self) -> int:
        return self.key.protocol

    @property
    def orig_src(self) -> bytes:
        return self.key.src

    @property
    def orig_dst(self) -> bytes:
        return self.key.dst

    @property
    def orig_sport(self) -> int:
        return self.key.sport

    @property
    def orig_dport(self) -> int:
        return self.key.dport

    @property
    def zone(self) -> int:
        return self.key.zone

    @property
    def icmp_id(self) -> int:
        return self.key.icmp_id

    @property
    def ended(self) -> bool:
        """Dying, or a TCP connection that reached TIME_WAIT or CLOSE."""
        return bool(self.status & IPS_DYING) or self.tcp_state in (TCP_TIME_WAIT, TCP_CLOSE)

    @property
    def replied(self) -> bool:
        return bool(self.status & IPS_SEEN_REPLY)

    @property
    def tcp_state_name(self) -> str:
        return TCP_STATES[self.tcp_state] if 0 <= self.tcp_state < len(TCP_STATES) else ""


@dataclass(frozen=True, slots=True)
class DumpResult:
    entries: list[ConntrackEntry]  # those of the configured zones
    total: int  # every entry the kernel listed, all zones
    interrupted: bool = False  # NLM_F_DUMP_INTR: the table changed while it was dumped
    marked: int = 0  # unchanged entries marked seen in ``held`` instead of handed over


class ConntrackError(OSError):
    """The kernel refused the dump (no CAP_NET_ADMIN, no conntrack) or answered garbage."""


class ConntrackSource(Protocol):
    """What the agent needs from conntrack; tests implement it with a list."""

    def dump(
        self, consumer: Callable[[list[ConntrackEntry]], None] | None = None, held: Held | None = None
    ) -> DumpResult:
        """The table's entries of the configured zones. With ``consumer``, entries are
        handed over in batches as they arrive and ``DumpResult.entries`` stays empty.
        With ``held`` (the one store the consumer feeds), entries unchanged since the last
        dump may be marked seen there instead of handed over (EntryParser.parse)."""
        ...

    def max_entries(self) -> int | None: ...

    def close(self) -> None: ...


# --- the layout compiler ----------------------------------------------------------------

# Leaves the agent reads, by attribute path (types with the flag bits stripped), with the
# struct code and payload size they must have, and the entry field they fill.
_LEAVES: dict[tuple[int, ...], tuple[str, int, str]] = {}


def _leaf(path: tuple[int, ...], code: str, size: int, name: str) -> None:
    _LEAVES[path] = (code, size, name)


for _d, _p in ((1, "orig"), (2, "reply")):
    _leaf((_d, 1, 1), "4s", 4, f"{_p}_src")
    _leaf((_d, 1, 2), "4s", 4, f"{_p}_dst")
    _leaf((_d, 1, 3), "16s", 16, f"{_p}_src")
    _leaf((_d, 1, 4), "16s", 16, f"{_p}_dst")
    _leaf((_d, 2, 2), "H", 2, f"{_p}_sport")
    _leaf((_d, 2, 3), "H", 2, f"{_p}_dport")
for _pfx in ((1, 2, 4), (1, 2, 7)):
    _leaf(_pfx, "H", 2, "icmp_id")
for _pfx in ((1, 2, 5), (1, 2, 8)):
    _leaf(_pfx, "B", 1, "icmp_type")
for _pfx in ((1, 2, 6), (1, 2, 9)):
    _leaf(_pfx, "B", 1, "icmp_code")
_leaf((1, 2, 1), "B", 1, "protocol")
_leaf((3,), "I", 4, "status")
_leaf((4, 1, 1), "B", 1, "tcp_state")
_leaf((8,), "I", 4, "mark")
_leaf((12,), "I", 4, "ct_id")
_leaf((18,), "H", 2, "zone")
_leaf((20, 1), "Q", 8, "start_ns")
_leaf((20, 2), "Q", 8, "stop_ns")
_leaf((22,), "16s", 16, "labels")
for _d, _p in ((9, "orig"), (10, "reply")):
    _leaf((_d, 1), "Q", 8, f"{_p}_packets")
    _leaf((_d, 2), "Q", 8, f"{_p}_bytes")
    _leaf((_d, 3), "I", 4, f"{_p}_packets")
    _leaf((_d, 4), "I", 4, f"{_p}_bytes")

# Nested attributes the walker descends into; any other attribute is opaque.
_NESTED = {(1,), (2,), (1, 1), (1, 2), (2, 1), (2, 2), (4,), (4, 1), (9,), (10,), (20,)}

_DEFAULTS: dict[str, object] = {
    "orig_src": b"", "orig_dst": b"", "orig_sport": 0, "orig_dport": 0,
    "reply_src": b"", "reply_dst": b"", "reply_sport": 0, "reply_dport": 0,
    "zone": 0, "orig_packets": 0, "orig_bytes": 0, "reply_packets": 0, "reply_bytes": 0,
    "start_ns": 0, "stop_ns": 0, "status": 0, "tcp_state": -1, "mark": 0, "labels": b"",
    "ct_id": 0, "icmp_type": 0, "icmp_code": 0, "icmp_id": 0, "protocol": 0,
}


# What a dump may mark seen in place (ConnectionStore.held): connections by key, and the poll.
Held = tuple[dict[ConnKey, Any], int]


class MalformedEntry(ValueError):
    """A conntrack message whose attributes overrun it: skipped and counted."""


# A compiled layout: (unpack_from, header mask, expected masked value, build function).
# The headers are checked with one big-integer operation over the whole message: the
# message read as an integer, ANDed with a mask that keeps only the attribute header
# bytes, must equal the same for the message the layout was compiled from.
_Layout = tuple[Callable[..., tuple[Any, ...]], int, int, Callable[[tuple[Any, ...]], ConntrackEntry]]


def _compile(buf: bytes | bytearray | memoryview, off: int, length: int) -> _Layout:
    """Walk one IPCTNL_MSG_CT_NEW message and compile its layout."""
    fmt: list[str] = [">16x", "B3x"]  # nlmsghdr skipped (length/type checked by caller); nfgen family
    nvals = 1  # the family
    mask = bytearray(length)
    fields: dict[str, int] = {"family": 0}
    end = off + length
    hh = struct.Struct("=HH").unpack_from

    def walk(pos: int, stop: int, path: tuple[int, ...]) -> None:
        nonlocal nvals
        while pos + 4 <= stop:
            alen, atype = hh(buf, pos)
            if alen < 4 or pos + alen > stop:
                raise MalformedEntry(f"attribute {atype} of length {alen} overruns its message")
            fmt.append("4x")
            mask[pos - off : pos - off + 4] = b"\xff\xff\xff\xff"
            sub = path + (atype & NLA_TYPE_MASK,)
            payload = alen - 4
            padded = (alen + 3) & ~3
            tail = min(padded, stop - pos) - alen  # the last attribute may lack padding
            leaf = _LEAVES.get(sub)
            if sub in _NESTED:
                walk(pos + 4, pos + alen, sub)
            elif leaf is not None and leaf[1] == payload:
                fmt.append(leaf[0])
                fields.setdefault(leaf[2], nvals)
                nvals += 1
            elif payload:
                fmt.append(f"{payload}x")
            if tail:
                fmt.append(f"{tail}x")
            pos += alen + tail
        if pos != stop:
            fmt.append(f"{stop - pos}x")

    walk(off + 20, end, ())
    st = struct.Struct("".join(fmt))
    if st.size != length:  # cannot happen for a well-formed message; be defensive
        raise MalformedEntry(f"layout size {st.size} != message length {length}")
    mask_int = int.from_bytes(mask, "little")
    expected = int.from_bytes(bytes(buf[off:end]), "little") & mask_int

    def expr(name: str) -> str:
        if name in fields:
            return f"v[{fields[name]}]"
        return repr(_DEFAULTS[name])

    # ICMP has no ports; its id distinguishes flows and its type/code are kept apart.
    key = (
        f"_new(_Key, ({expr('zone')}, {expr('protocol')}, {expr('orig_src')}, {expr('orig_dst')}, "
        f"{expr('orig_sport')}, {expr('orig_dport')}, {expr('icmp_id')}))"
    )
    body = ", ".join(expr(n) for n in ConntrackEntry._fields[1:])
    src = f"def build(v):\n    return _new(_Entry, ({key}, {body}))\n"
    ns: dict[str, object] = {"_new": tuple.__new__, "_Entry": ConntrackEntry, "_Key": ConnKey}
    exec(compile(src, "<conntrack layout>", "exec"), ns)  # generated from the constants above only
    return (st.unpack_from, mask_int, expected, ns["build"])  # type: ignore[return-value]


class EntryParser:
    """Parses buffers of ctnetlink messages into entries, compiling layouts as it goes.

    ``zones``: keep only entries of these zones (empty: all). ``max_layouts`` bounds the
    cache; a table of pathological variety clears it rather than grow without end.
    """

    def __init__(self, zones: Iterable[int] = (), *, max_layouts: int = 4096) -> None:
        self.zones = frozenset(zones)
        self.max_layouts = max_layouts
        self._layouts: dict[int, list[_Layout]] = {}
        self._count = 0
        self.layouts_compiled = 0
        self.malformed = 0
        self.last_marked = 0
        self._hdr = struct.Struct("=IHH").unpack_from
        self._err = struct.Struct("=i").unpack_from
        # The per-message loop in C where it is built (agent/ctfast.py); layouts still compile here.
        self._native = native_parser(ConntrackEntry, ConnKey, self._learn, max_layouts)

    def _learn(self, buf: bytes | bytearray | memoryview, off: int, length: int) -> _Layout | None:
        """Compile the layout of a message no layout matched (None: malformed, counted)."""
        try:
            lay = _compile(buf, off, length)
        except MalformedEntry as exc:
            self.malformed += 1
            log.warning("skipping a malformed conntrack message: %s", exc)
            return None
        self.layouts_compiled += 1
        return lay

    def begin_dump(self) -> None:
        """A new dump starts (the C parser then returns entries unchanged since the last
        complete dump as the same objects; the pure parser builds each anew)."""
        if self._native is not None:
            self._native.begin()

    @property
    def reused(self) -> int:
        """Entries the C parser returned again unchanged (0 for the pure parser)."""
        return self._native.reused if self._native is not None else 0

    def parse(
        self, buf: bytes | bytearray | memoryview, n: int, out: list[ConntrackEntry], held: Held | None = None
    ) -> tuple[bool, int, bool]:
        """Parse ``buf[:n]``, appending entries to ``out``.

        Returns ``(done, total, interrupted)``: done when NLMSG_DONE was seen, total the
        number of conntrack messages read (all zones), interrupted if a message carried
        NLM_F_DUMP_INTR. Raises ConntrackError on an NLMSG_ERROR with a non-zero code.

        ``held`` (:meth:`flowscope.agent.store.ConnectionStore.held`): the C parser marks
        an entry unchanged since the last dump seen there, when its connection holds that
        very entry, instead of appending it (:attr:`last_marked` says how many); the pure
        parser appends everything and the store's feed does the same marking.
        """
        self.last_marked = 0
        if self._native is not None:
            conns, poll = held if held is not None else (None, 0)
            done, total, interrupted, self.last_marked = self._native.parse(
                buf, n, out, self.zones, ConntrackError, conns, poll
            )
            return done, total, interrupted
        off = 0
        total = 0
        interrupted = False
        layouts = self._layouts
        hdr = self._hdr
        append = out.append
        zones = self.zones
        mv = memoryview(buf)
        from_bytes = int.from_bytes
        while off + 16 <= n:
            length, mtype, flags = hdr(buf, off)
            if length < 16 or off + length > n:
                raise ConntrackError(errno.EBADMSG, f"netlink message of length {length} overruns the datagram")
            nxt = off + ((length + 3) & ~3)
            if mtype != 0x100:  # (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
                if mtype == NLMSG_DONE:
                    return True, total, interrupted
                if mtype == NLMSG_ERROR:
                    code = -self._err(buf, off + 16)[0]
                    if code:
                        raise ConntrackError(code, f"conntrack dump refused: {os.strerror(code)}")
                off = nxt
                continue
            if flags & 0x10:
                interrupted = True
            if length < 20:
                off = nxt
                continue
            total += 1
            entry = None
            candidates = layouts.get(length)
            if candidates is not None:
                whole = from_bytes(mv[off : off + length], "little")
                for unpack, mask, expected, build in candidates:
                    if whole & mask == expected:
                        entry = build(unpack(buf, off))
                        break
            if entry is None:
                try:
                    lay = _compile(buf, off, length)
                except MalformedEntry as exc:
                    self.malformed += 1
                    log.warning("skipping a malformed conntrack message: %s", exc)
                    off = nxt
                    continue
                if self._count >= self.max_layouts:
                    layouts.clear()
                    self._count = 0
                layouts.setdefault(length, []).append(lay)
                self._count += 1
                self.layouts_compiled += 1
                entry = lay[3](lay[0](buf, off))
            if not zones or entry[0][0] in zones:  # entry.key.zone
                append(entry)
            off = nxt
        return False, total, interrupted

    def entry_at(self, buf: bytes | bytearray | memoryview, off: int, length: int) -> ConntrackEntry | None:
        """The entry of the one conntrack message at ``buf[off:off+length]`` (a compiled
        layout when one matches, else compiled now); None when malformed (counted)."""
        candidates = self._layouts.get(length)
        if candidates is not None:
            whole = int.from_bytes(memoryview(buf)[off : off + length], "little")
            for unpack, mask, expected, build in candidates:
                if whole & mask == expected:
                    return build(unpack(buf, off))
        try:
            lay = _compile(buf, off, length)
        except MalformedEntry as exc:
            self.malformed += 1
            log.warning("skipping a malformed conntrack message: %s", exc)
            return None
        if self._count >= self.max_layouts:
            self._layouts.clear()
            self._count = 0
        self._layouts.setdefault(length, []).append(lay)
        self._count += 1
        self.layouts_compiled += 1
        return lay[3](lay[0](buf, off))

    def parse_events(self, buf: bytes | bytearray | memoryview, n: int, out: list[tuple[int, ConntrackEntry]]) -> None:
        """Parse a datagram of ctnetlink event messages (NEW 0x100, DESTROY 0x102),
        appending ``(message type, entry)`` for the configured zones."""
        off = 0
        hdr = self._hdr
        zones = self.zones
        while off + 16 <= n:
            length, mtype, _flags = hdr(buf, off)
            if length < 16 or off + length > n:
                self.malformed += 1
                return
            if (mtype == 0x100 or mtype == 0x102) and length >= 20:
                entry = self.entry_at(buf, off, length)
                if entry is not None and (not zones or entry[0][0] in zones):
                    out.append((mtype, entry))
            off += (length + 3) & ~3


# --- the kernel side ---------------------------------------------------------------------

def _dump_request(seq: int) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
    mtype = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return struct.pack("=IHHII", 16 + len(body), mtype, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


class NetlinkConntrack:
    """Dumps the conntrack table of the current network namespace over ctnetlink."""

    def __init__(self, zones: Sequence[int] = (), *, rcvbuf: int = 16 << 20, proc_root: str = "/proc/sys/net/netfilter") -> None:
        self.parser = EntryParser(zones)
        self.proc_root = proc_root
        self._seq = 0
        self._rcvbuf = rcvbuf
        # The kernel fills a dump datagram up to 32 KB (netlink caps its dump skbs there);
        # 64 KB leaves room and keeps a megabyte of zeroed buffer out of the agent's RSS.
        self._buf = bytearray(1 << 16)
        self._sock = self._open()

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            # SO_RCVBUFFORCE (root) ignores rmem_max; fall back to the capped SO_RCVBUF.
            sock.setsockopt(socket.SOL_SOCKET, 33, self._rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf)
        sock.bind((0, 0))
        return sock

    def dump(
        self, consumer: Callable[[list[ConntrackEntry]], None] | None = None, held: Held | None = None
    ) -> DumpResult:
        try:
            return self._dump(consumer, held if consumer is not None else None)
        except BaseException:
            # The rest of a broken dump may still be queued on the socket; a fresh socket
            # keeps it from being read as the next dump.
            self._sock.close()
            self._sock = self._open()
            raise

    def _dump(self, consumer: Callable[[list[ConntrackEntry]], None] | None, held: Held | None) -> DumpResult:
        self._seq += 1
        self.parser.begin_dump()
        self._sock.send(_dump_request(self._seq))
        out: list[ConntrackEntry] = []
        total = 0
        marked = 0
        interrupted = False
        buf = self._buf
        recv_into = self._sock.recv_into
        parser = self.parser
        parse = parser.parse
        # 100k fresh tuples would trigger several full collections for nothing: the
        # entries hold no reference cycles.
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            while True:
                n = recv_into(buf, 0, socket.MSG_TRUNC)  # MSG_TRUNC: the datagram's whole length
                if n == 0:
                    raise ConntrackError(errno.EIO, "netlink socket closed during the conntrack dump")
                if n > len(buf):  # never seen (the kernel caps dump datagrams at 32 KB); not parsed cut
                    self._buf = bytearray(n + 4096)
                    raise ConntrackError(errno.EMSGSIZE, f"a conntrack dump datagram of {n} bytes overran the receive buffer")
                done, count, intr = parse(buf, n, out, held)
                total += count
                marked += parser.last_marked
                interrupted = interrupted or intr
                if consumer is not None and out:
                    consumer(out)
                    out = []
                if done:
                    return DumpResult(out, total, interrupted, marked)
        finally:
            if gc_was_on:
                gc.enable()

    def max_entries(self) -> int | None:
        return read_conntrack_max(self.proc_root)

    def close(self) -> None:
        self._sock.close()


class StaticConntrack:
    """A ConntrackSource over a list that tests change between polls."""

    def __init__(self, entries: Iterable[ConntrackEntry] = (), max_entries: int | None = 262144) -> None:
        self.entries = list(entries)
        self._max = max_entries

    def dump(
        self, consumer: Callable[[list[ConntrackEntry]], None] | None = None, held: Held | None = None
    ) -> DumpResult:
        if consumer is not None:
            consumer(list(self.entries))
            return DumpResult([], len(self.entries))
        return DumpResult(list(self.entries), len(self.entries))

    def max_entries(self) -> int | None:
        return self._max

    def close(self) -> None:
        pass


def read_conntrack_max(proc_root: str = "/proc/sys/net/netfilter") -> int | None:
    try:
        with open(os.path.join(proc_root, "nf_conntrack_max")) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def enable_accounting(proc_root: str = "/proc/sys/net/netfilter") -> dict[str, bool]:
    """Set nf_conntrack_acct=1 and nf_conntrack_timestamp=1 in this network namespace.

    Returns which of the two are on afterwards; logs a clear warning for each one that
    could not be switched on (counters or timestamps will then be missing).
    """
    result = {}
    for name, what in (("nf_conntrack_acct", "byte and packet counters"), ("nf_conntrack_timestamp", "flow start/stop times")):
        path = os.path.join(proc_root, name)
        try:
            with open(path) as fh:
                if fh.read().strip() == "1":
                    result[name] = True
                    continue
            with open(path, "w") as fh:
                fh.write("1\n")
            result[name] = True
        except OSError as exc:
            result[name] = False
            log.warning(
                "cannot set %s=1 (%s: %s): records will lack %s; run the agent with CAP_NET_ADMIN "
                "and /proc/sys writable, or set the sysctl on the node",
                name, path, exc.strerror, what,
            )
    return result


def format_address(raw: bytes) -> str:
    """Packed 4- or 16-byte address to its text form ("10.0.0.1", "fd00::1")."""
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if len(raw) == 16:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return ""
