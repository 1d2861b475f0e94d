"""The IPFIX exporting process over UDP, TCP and TLS (RFC 7011 section 10), asyncio.

Each transport session owns one :class:`~flowscope.ipfix.codec.ExportSession`; everything
else here is about when templates are (re)sent, how a bounded queue is drained, and what
is counted as sent, dropped or lost when the collector is slow or goes away. Its receiving
counterpart is :mod:`.collecting`; what both share is in :mod:`.transport`.

Theory of operation, exporting side. One :class:`ExportingProcess` sends to one
collector. ``submit`` only appends a batch to a bounded queue, in records, and never
blocks; a batch that does not fit is refused whole, counted in ``records_dropped``, and
``submit`` returns False. A single sender task drains the queue: it groups what is
queued by template, encodes with the session's :class:`ExportSession` (so sequence
numbers count data records per session and domain) and writes. Over TCP and TLS every
new connection is a new session that starts with all templates; a lost connection is
retried with jittered exponential backoff (RFC 7011 section 10.4.4): up to ``backoff_max``
seconds (60 by default) between attempts while nothing waits to be sent, but at most
``backoff_busy_max`` (2 s) while records wait in the queue, so that an exporter is back
within seconds of its collector and its backlog does not outgrow the queue; the jitter
(each wait drawn between half and all of its nominal length) keeps a node's worth of
exporters from reconnecting in lockstep. Records whose bytes were still in our write
buffer when a connection broke are counted in ``records_lost`` (see
:class:`_ExportProtocol`); so are the records written in the last ``peer_close_window``
seconds before the *peer* closed or reset the session: a collector that closes a session
has usually given up on what it was reading (go-ipfix does so at data for a template it
does not know), and TCP itself acknowledges nothing to the application, so a record
written to a session the peer then closed is counted as lost, never as sent (an
over-count, never an under-count, when the peer closed for another reason). Messages are
packed for every peer to read: one set per message and, unless ``dense_templates``, one
template per template set (see :class:`~flowscope.ipfix.codec.ExportSession`). Under
TLS 1.3 the client's handshake ends before the server has judged the client's
certificate, so a new session sends nothing until the server has shown it accepted us. Over UDP messages are cut to the path
MTU (512 octets unless told) minus the IP and UDP headers, templates go out before the
first data and again every ``template_refresh`` seconds of the injected clock, and no
withdrawal is ever sent (section 8.4). ``flush`` waits until what was submitted has been
written or dropped; ``close`` sends nothing more, counts what was still queued as
dropped, and closes the socket.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .address import Address
from .codec import HEADER, MAX_MESSAGE_SIZE, SET_HEADER, ExportSession, Transport
from .errors import RecordTooLarge, UsageError
from .registry import Registry
from .template import Record, Template
from .transport import Counters, LogLimiter, TLSConfig

__all__ = ["ExporterStats", "ExportingProcess"]

log = logging.getLogger("flowscope.ipfix.exporting")

IPV4_UDP_OVERHEAD = 20 + 8
IPV6_UDP_OVERHEAD = 40 + 8


@dataclass(slots=True)
class ExporterStats(Counters):
    records_submitted: int = 0  # accepted by submit()
    records_sent: int = 0  # handed to the socket
    records_dropped: int = 0  # refused by a full queue, or still queued at close()
    records_invalid: int = 0  # could not be encoded with their template (logged)
    records_lost: int = 0  # in our write buffer when a connection broke, or written just before the peer closed it
    messages_sent: int = 0  # data messages
    template_messages_sent: int = 0
    octets_sent: int = 0
    oversize_messages: int = 0  # UDP: a single record larger than the path MTU allows
    send_errors: int = 0  # UDP send errors (e.g. ICMP port unreachable)
    connects: int = 0  # transport sessions established
    reconnects: int = 0  # sessions established after the first
    connect_failures: int = 0
    connected: bool = False
    queued: int = 0  # records waiting in the queue now


class _ExportProtocol(asyncio.Protocol):
    """The socket side of one exporting transport session: flow control and loss.

    asyncio's transport buffers whatever the kernel does not take at once and, when the
    connection breaks, silently discards that buffer. So the write buffer's high-water
    mark is (nearly) zero: the sender writes only into an empty buffer and waits for it
    to drain before writing again. After each write we note which data messages the kernel did
    not take in full (their record counts come from the header sequence numbers); if
    the connection breaks before the buffer drained, those records are counted as lost.
    It is an upper bound: part of them may have reached the kernel meanwhile. Over TLS
    the count covers the TLS layer's buffer, not the one beneath it. What the kernel
    accepted and the peer never read, TCP does not tell; the collector sees those as
    sequence-number gaps.
    """

    def __init__(self, owner: ExportingProcess) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.unsent = 0  # records in data messages still (partly) in our write buffer
        # (loop time, records) of recent writes: what a peer that closes now may not have read
        self.recent: collections.deque[tuple[float, int]] = collections.deque()
        self.peer_closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Pause as soon as anything stays buffered. Not high=0: the TLS transport pauses
        # when its buffer is >= high, i.e. always at 0, and would never resume.
        transport.set_write_buffer_limits(high=1, low=0)

    def data_received(self, data: bytes) -> None:
        pass  # collectors send nothing on an IPFIX session

    def eof_received(self) -> bool | None:
        self.peer_closed = True  # the collector closed its side: nothing more is written here
        return None

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.unsent = 0  # the buffer drained: the kernel took everything
        self.can_write.set()

    def write(self, messages: list[bytes], records: int) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(messages))
        pending = self.transport.get_write_buffer_size()
        if not pending:
            self.unsent = 0
        elif records:
            self.unsent += _records_in_tail(messages, records, pending)
        if records:
            now = asyncio.get_running_loop().time()
            recent = self.recent
            recent.append((now, records))
            horizon = now - self.owner.peer_close_window
            while recent[0][0] < horizon:
                recent.popleft()

    def unread(self) -> int:
        """Records the peer may not have read when it closes the session now: those still
        in our buffer, or written within the last ``peer_close_window`` seconds."""
        horizon = asyncio.get_running_loop().time() - self.owner.peer_close_window
        return max(self.unsent, sum(n for t, n in self.recent if t >= horizon))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost:
            self.lost = True
            if exc is not None:
                self.peer_closed = True  # a reset or a broken pipe: the peer is gone
            self.can_write.set()
            self.owner._connection_lost(self, exc)


def _records_in_tail(messages: list[bytes], records: int, pending: int) -> int:
    """Data records of the messages that end inside the last ``pending`` octets written.
    Each message's header holds the sequence number, the count of records before it."""
    seqs = [int.from_bytes(m[8:12], "big") for m in messages]
    counts = [(seqs[i + 1] - seqs[i]) & 0xFFFFFFFF for i in range(len(messages) - 1)]
    counts.append(records - sum(counts))
    unsent = 0
    tail = 0
    for m, n in zip(reversed(messages), reversed(counts)):
        if tail >= pending:
            break
        unsent += n
        tail += len(m)
    return unsent


class _DatagramExportProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: ExportingProcess) -> None:
        self.owner = owner

    def error_received(self, exc: Exception) -> None:
        self.owner.stats.send_errors += 1
        self.owner._limiter.warn("sending IPFIX to %s: %s", self.owner.address, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class ExportingProcess:
    """Sends data records to one collector as IPFIX over UDP, TCP or TLS."""

    def __init__(
        self,
        address: Address,
        *,
        tls: TLSConfig | None,
        templates: Sequence[Template],
        observation_domain_id: int = 0,
        queue_size: int = 65536,
        template_refresh: float = 600.0,
        path_mtu: int = 512,
        clock: Callable[[], float] = time.time,
        registry: Registry | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        quick_retries: int = 3,
        backoff_busy_max: float = 2.0,
        rng: Callable[[], float] | None = None,
        connect_timeout: float = 10.0,
        max_batch: int = 8192,
        tls_accept_wait: float = 2.0,
        dense_templates: bool = False,
        peer_close_window: float = 1.0,
    ) -> None:
        if address.protocol == "tls" and tls is None:
            raise UsageError(f"exporting to {address} needs a TLS configuration (certificate, key and CA)")
        if address.protocol != "tls" and tls is not None:
            raise UsageError(f"a TLS configuration was given but {address} is not a tls address; use HOST:PORT:tls")
        if not templates:
            raise UsageError("an exporting process needs at least one template")
        if queue_size < 1:
            raise UsageError(f"queue size {queue_size} must be at least 1 record")
        if template_refresh <= 0:
            raise UsageError(f"template refresh interval {template_refresh!r} must be a positive number of seconds")
        if not 68 <= path_mtu <= 65535:
            raise UsageError(f"path MTU {path_mtu} is outside 68..65535")
        if backoff_initial <= 0 or backoff_max < backoff_initial or backoff_busy_max <= 0:
            raise UsageError("reconnect backoff: need 0 < backoff_initial <= backoff_max and backoff_busy_max > 0")
        ids = [t.template_id for t in templates]
        if len(set(ids)) != len(ids):
            raise UsageError(f"template ids must be unique, got {ids}")
        if not 0 <= observation_domain_id <= 0xFFFFFFFF:
            raise UsageError(f"observation domain id {observation_domain_id} is outside 0..4294967295")
        self.address = address
        self.templates: dict[int, Template] = {t.template_id: t for t in templates}
        self.observation_domain_id = observation_domain_id
        self.queue_size = queue_size
        self.template_refresh = float(template_refresh)
        self.path_mtu = path_mtu
        self.clock = clock
        self.registry = registry
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.quick_retries = quick_retries
        self.backoff_busy_max = min(backoff_busy_max, backoff_max)
        self._rng = rng if rng is not None else random.random
        self._jitter = 1.0
        self.connect_timeout = connect_timeout
        self.max_batch = max_batch
        self.tls_accept_wait = tls_accept_wait
        self.dense_templates = dense_templates  # several templates per set: only for peers that read them
        if peer_close_window < 0:
            raise UsageError(f"peer close window {peer_close_window!r} must be >= 0 seconds")
        self.peer_close_window = peer_close_window
        self.stats = ExporterStats()
        self._ssl = tls.client_context() if tls is not None else None
        self._server_name = (tls.server_name if tls is not None else None) or address.host
        self._limiter = LogLimiter(time.monotonic)
        # (template id, records or data sets (submit_data_sets: (payload, records) pairs), data sets or not)
        self._queue: collections.deque[tuple[int, list[Any], bool]] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._stream: _ExportProtocol | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._session: ExportSession | None = None
        self._next_templates = 0.0
        self._pending_templates: list[int] = []  # added since the session announced its templates
        self._failures = 0
        self._connected_once = False

    # -- API

    async def start(self) -> None:
        """Connect (one attempt; on failure the sender keeps retrying with backoff)."""
        if self._task is not None:
            raise UsageError("this exporting process is already started")
        await self._open()
        self._task = asyncio.create_task(self._run(), name=f"ipfix-export-{self.address}")

    def submit(self, template_id: int, records: Sequence[Record]) -> bool:
        """Queue records for export without blocking; False (and counted) if they do not fit."""
        if template_id not in self.templates:
            raise UsageError(f"template {template_id} is not one of this exporting process's templates {sorted(self.templates)}")
        return self._enqueue(template_id, list(records), len(records), False)

    def _enqueue(self, template_id: int, entry: list[Any], n: int, encoded: bool) -> bool:
        """Queue ``entry`` (``n`` records: the records, or their encoded data sets) unless
        the queue is full or the process closing, which drops and counts all ``n``."""
        if n == 0:
            return True
        if self._closing or self.stats.queued + n > self.queue_size:
            self.stats.records_dropped += n
            if not self._closing:
                self._limiter.warn(
                    "export queue to %s is full (%d records): %d records dropped", self.address, self.queue_size, n
                )
            return False
        self._queue.append((template_id, entry, encoded))
        self.stats.queued += n
        self.stats.records_submitted += n
        self._idle.clear()
        self._wake.set()
        return True

    @property
    def data_set_limit(self) -> int:
        """The most octets of data records a message to this collector carries, on any
        session (for UDP the path MTU less the larger of the IPv4 and IPv6 headers): the
        size :meth:`submit_data_sets` takes a set of."""
        size = self.path_mtu - max(IPV4_UDP_OVERHEAD, IPV6_UDP_OVERHEAD) if self.address.protocol == "udp" \
            else MAX_MESSAGE_SIZE
        return size - HEADER.size - SET_HEADER.size

    def submit_data_sets(self, template_id: int, sets: Sequence[tuple[bytes, int]]) -> bool:
        """Queue data sets already encoded, ``(payload, records)`` of at most
        :attr:`data_set_limit` octets each (see ExportSession.encode_data_sets), as
        :meth:`submit` queues records: each set goes in a message of its own; False (and
        its records counted as dropped) if they do not fit the queue."""
        if template_id not in self.templates:
            raise UsageError(f"template {template_id} is not one of this exporting process's templates {sorted(self.templates)}")
        sets = list(sets)
        limit = self.data_set_limit
        for payload, count in sets:
            if type(payload) is not bytes or type(count) is not int or count < 1 or len(payload) > limit:
                raise UsageError(f"a data set is (payload bytes of at most {limit} octets, number of records >= 1)")
        return self._enqueue(template_id, sets, sum(count for _payload, count in sets), True)

    def add_template(self, template: Template) -> None:
        """Add a template after start; it is announced before the next data that uses it."""
        old = self.templates.get(template.template_id)
        if old is not None:
            if old == template:
                return
            raise UsageError(f"template id {template.template_id} is already in use with other fields")
        self.templates[template.template_id] = template
        if self._session is not None:
            self._session.add_template(template)
            self._pending_templates.append(template.template_id)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far was written to the socket or dropped.
        Returns False if ``timeout`` (seconds) passed first."""
        try:
            await asyncio.wait_for(self._drained(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _drained(self) -> None:
        await self._idle.wait()
        stream = self._stream
        # Polled, not awaited on can_write: a TLS transport counts octets in its buffer
        # that do not always pause the protocol, and can_write belongs to the sender.
        while stream is not None and stream.transport is not None and not stream.lost:
            if stream.transport.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.001)

    async def close(self) -> None:
        """Send nothing more, count what was still queued as dropped, close the socket."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self.stats.queued:
            log.warning("closing the export to %s with %d records unsent: counted as dropped", self.address, self.stats.queued)
            self.stats.records_dropped += self.stats.queued
            self.stats.queued = 0
            self._queue.clear()
        self._idle.set()
        if self._stream is not None and self._stream.transport is not None:
            self._stream.transport.close()
        if self._udp is not None:
            self._udp.close()
        self._stream = None
        self._udp = None
        self.stats.connected = False
        await asyncio.sleep(0)

    async def __aenter__(self) -> ExportingProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.flush(timeout=self.connect_timeout)
        await self.close()

    # -- connections

    def _new_session(self, max_message_size: int) -> ExportSession:
        session = ExportSession(
            self.observation_domain_id,
            max_message_size=max_message_size,
            registry=self.registry,
            dense_templates=self.dense_templates,
        )
        for t in self.templates.values():
            session.add_template(t)
        self._pending_templates.clear()  # a new session announces all of them
        return session

    async def _open(self) -> bool:
        return await (self._open_udp() if self.address.protocol == "udp" else self._connect())

    async def _open_udp(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _DatagramExportProtocol(self), remote_addr=(self.address.host, self.address.port)
            )
        except OSError as exc:  # e.g. the name does not resolve (yet): retried with backoff
            self._failures += 1
            self.stats.connect_failures += 1
            self._limiter.warn("cannot open UDP export to %s: %s", self.address, exc)
            return False
        self._failures = 0
        self._udp = transport
        family = transport.get_extra_info("socket").family
        overhead = IPV6_UDP_OVERHEAD if family == socket.AF_INET6 else IPV4_UDP_OVERHEAD
        self._session = self._new_session(self.path_mtu - overhead)
        self._next_templates = float("-inf")  # templates go before the first data
        self.stats.connected = True
        self.stats.connects += 1
        return True

    async def _connect(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _ExportProtocol(self),
                    self.address.host,
                    self.address.port,
                    ssl=self._ssl,
                    server_hostname=self._server_name if self._ssl is not None else None,
                ),
                self.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            self._failures += 1
            self.stats.connect_failures += 1
            self._limiter.warn("cannot connect to the IPFIX collector %s: %s", self.address, exc)
            return False
        if self._ssl is not None and not await self._tls_accepted(proto):
            self._failures += 1
            self.stats.connect_failures += 1
            self._limiter.warn(
                "the IPFIX collector %s closed the TLS session right after the handshake: it does not accept "
                "our client certificate (is it signed by the collector's CA?)",
                self.address,
            )
            if proto.transport is not None:
                proto.transport.abort()
            return False
        sock = proto.transport.get_extra_info("socket") if proto.transport is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._stream = proto
        self._session = self._new_session(MAX_MESSAGE_SIZE)
        self._failures = 0
        self.stats.connected = True
        self.stats.connects += 1
        if self._connected_once:
            self.stats.reconnects += 1
            log.info("reconnected to the IPFIX collector %s", self.address)
        self._connected_once = True
        # every new stream session starts with all templates
        templates = self._session.encode_templates(int(self.clock()))
        proto.write(templates, 0)
        self.stats.template_messages_sent += len(templates)
        self.stats.octets_sent += sum(map(len, templates))
        return True

    async def _tls_accepted(self, proto: _ExportProtocol) -> bool:
        """In TLS 1.3 the client finishes its handshake before the server has checked the
        client's certificate; a refusal arrives as an alert just after. Wait for the
        server's first session ticket (sent once it accepted us) or for the connection to
        drop, so that no record is counted as sent into a session that was refused. A
        server that sends no tickets costs ``tls_accept_wait`` seconds once per connection."""
        transport = proto.transport
        if transport is None:
            return False
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.version() != "TLSv1.3":
            return not proto.lost  # TLS 1.2 verified the client inside the handshake
        loop = asyncio.get_running_loop()
        end = loop.time() + self.tls_accept_wait
        while not proto.lost and loop.time() < end:
            session = ssl_object.session
            if session is not None and session.has_ticket:
                return True
            await asyncio.sleep(0.005)
        return not proto.lost

    def _connection_lost(self, proto: _ExportProtocol, exc: Exception | None) -> None:
        if proto is not self._stream:
            return
        lost = proto.unread() if proto.peer_closed else proto.unsent
        if lost:
            self.stats.records_lost += lost
            self.stats.records_sent -= lost
        self.stats.connected = False
        self._stream = None
        self._session = None
        if not self._closing:
            self._limiter.warn(
                "connection to the IPFIX collector %s lost (%s)%s",
                self.address,
                exc or "closed by the collector",
                f"; {lost} records {'it may not have read' if proto.peer_closed else 'still in the send buffer'} "
                "are counted as lost" if lost else "",
            )
        self._wake.set()

    def _backoff(self) -> float:
        """The wait before the next attempt: exponential in the failures so far, capped low
        while records wait (``backoff_busy_max``), times this attempt's jitter."""
        cap = self.backoff_busy_max if self.stats.queued else self.backoff_max
        if self._failures <= self.quick_retries:
            nominal = self.backoff_initial * 2.0 ** max(0, self._failures - 1)
        else:
            nominal = self.backoff_max
        return min(cap, nominal) * self._jitter

    async def _wait_backoff(self) -> None:
        """Sleep the backoff, shortened if records arrive meanwhile (the cap drops)."""
        self._jitter = 0.5 + 0.5 * self._rng()
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not self._closing:
            left = start + self._backoff() - loop.time()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    # -- the sender

    async def _run(self) -> None:
        while not self._closing:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the sender must outlive any bug: log, count, go on
                self.stats.send_errors += 1
                log.exception("IPFIX exporting process to %s: unexpected error in the sender", self.address)
                await asyncio.sleep(1.0)

    async def _step(self) -> None:
        if not self._queue:
            self._idle.set()
        if self._session is None:  # no transport session: (re)connect, or open the UDP socket
            if self._failures:
                await self._wait_backoff()
                if self._closing:
                    return
            await self._open()
            return
        if not self._queue:
            self._idle.set()
            self._wake.clear()
            await self._wake.wait()
            return
        stream = self._stream
        if stream is not None:
            if stream.transport is None or stream.transport.is_closing():
                # broken or closing: connection_lost is on its way; take nothing from the queue
                await asyncio.sleep(0.01)
                return
            if not stream.can_write.is_set():
                await stream.can_write.wait()
                return
        self._send_batch()
        await asyncio.sleep(0)  # let submitters and the socket run

    def _take(self) -> Iterator[tuple[int, list[Any], bool]]:
        """Queued batches, merged by template, up to max_batch records (data sets whole)."""
        taken = 0
        queue = self._queue
        while queue and taken < self.max_batch:
            tid, records, sets = queue.popleft()
            if sets:
                n = sum(count for _payload, count in records)
                taken += n
                self.stats.queued -= n
                yield tid, records, True
                continue
            while queue and queue[0][0] == tid and not queue[0][2] and taken + len(records) < self.max_batch:
                records.extend(queue.popleft()[1])  # our own copy, made by submit()
            taken += len(records)
            self.stats.queued -= len(records)
            yield tid, records, False

    def _send_batch(self) -> None:
        session = self._session
        assert session is not None
        now = self.clock()
        export_time = int(now) & 0xFFFFFFFF
        messages: list[bytes] = []
        if self._udp is not None and now >= self._next_templates:
            templates = session.encode_templates(export_time)
            self._udp_send(templates, 0)
            self.stats.template_messages_sent += len(templates)
            self._next_templates = now + self.template_refresh
            self._pending_templates.clear()
        if self._pending_templates:
            templates = session.encode_templates(export_time, self._pending_templates)
            self._pending_templates.clear()
            self.stats.template_messages_sent += len(templates)
            if self._udp is not None:
                self._udp_send(templates, 0)
            else:
                assert self._stream is not None
                self._stream.write(templates, 0)
                self.stats.octets_sent += sum(map(len, templates))
        count = 0
        for tid, records, sets in list(self._take()):
            encoded, n = self._encode_sets(session, tid, records, export_time) if sets else \
                self._encode(session, tid, records, export_time)
            messages += encoded
            count += n
        if not messages:
            return
        if self._udp is not None:
            self._udp_send(messages, count)
        else:
            assert self._stream is not None
            self._stream.write(messages, count)
            self.stats.messages_sent += len(messages)
            self.stats.octets_sent += sum(map(len, messages))
            self.stats.records_sent += count

    def _udp_send(self, messages: list[bytes], records: int) -> None:
        assert self._udp is not None
        for m in messages:
            self._udp.sendto(m)
        self.stats.octets_sent += sum(map(len, messages))
        if records:
            self.stats.messages_sent += len(messages)
            self.stats.records_sent += records

    def _encode_sets(self, session: ExportSession, tid: int, sets: list[tuple[bytes, int]],
                     export_time: int) -> tuple[list[bytes], int]:
        try:
            return session.encode_data_sets(tid, sets, export_time), sum(count for _payload, count in sets)
        except UsageError as exc:  # submit_data_sets checked them against any session's limit: not expected
            lost = sum(count for _payload, count in sets)
            self.stats.records_invalid += lost
            self._limiter.warn("%d records in data sets not exported to %s: %s", lost, self.address, exc)
            return [], 0

    def _encode(self, session: ExportSession, tid: int, records: list[Record], export_time: int) -> tuple[list[bytes], int]:
        try:
            return session.encode_records(tid, records, export_time), len(records)
        except UsageError:
            pass
        # One record at a time: keep the good ones, count and log the bad ones (the error
        # names the element and the value), and send an oversize record alone.
        out: list[bytes] = []
        good = 0
        for record in records:
            try:
                out += session.encode_records(tid, [record], export_time)
                good += 1
                continue
            except RecordTooLarge:
                try:  # alone, in a message as large as IPFIX allows (IP fragments it)
                    out += session.encode_records(tid, [record], export_time, max_message_size=MAX_MESSAGE_SIZE)
                    good += 1
                    self.stats.oversize_messages += 1
                    continue
                except UsageError as exc:
                    error = exc
            except UsageError as exc:
                error = exc
            self.stats.records_invalid += 1
            self._limiter.warn("record not exported to %s: %s", self.address, error)
        return out, good
