"""The IPFIX collecting process over UDP, TCP and TLS (RFC 7011 section 10), asyncio.

It is deliberately thin: each transport session owns one
:class:`~flowscope.ipfix.codec.Decoder`, and everything else here is about which session a
byte belongs to, when templates expire, and how the process survives peers that misbehave
or vanish. Its sending counterpart is :mod:`.exporting`; what both share is in
:mod:`.transport`.

Theory of operation, collecting side. One :class:`CollectingProcess` listens on one
address with one protocol. A *transport session* is a TCP or TLS connection, or, for
UDP, the stream of datagrams from one (address, port) of a peer (RFC 7011 section 10.3.3).
Each session gets its own :class:`Decoder`, so templates are scoped per (session,
observation domain) as section 8 wants. Every decoded message goes to ``on_message``
with the :class:`Peer` it came from. Limits keep a peer from exhausting memory: a message
is at most 65535 octets, a session holds at most ``max_templates`` templates, and at most
``max_sessions`` sessions exist at once (new ones past the cap are refused and counted).
A malformed message is counted and logged with the peer's address; over TCP and TLS the
session is closed (the stream cannot be trusted to resynchronise), over UDP only the
datagram is lost. Everyone else keeps being served. UDP templates expire after
``template_lifetime`` seconds and idle UDP sessions after ``udp_session_timeout``, both
judged by the injected ``clock``, so tests expire them without sleeping; so are TCP/TLS
sessions that stay silent past ``stream_idle_timeout`` (off unless set). TLS is 1.2 or
newer with mutual authentication: a client without a certificate signed by the
configured CA is refused (and counted) during the handshake, which must finish within
``tls_handshake_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .address import Address
from .codec import MAX_MESSAGE_SIZE, Decoder, Message, MessageFramer, Transport
from .errors import Deferred, MalformedMessage, UsageError
from .registry import Registry
from .template import CompileBudget
from .transport import Counters, LogLimiter, Peer, TLSConfig, dual_stack_socket, unmapped

__all__ = ["CollectorStats", "CollectingProcess"]

log = logging.getLogger("flowscope.ipfix.collecting")

# Messages one stream session decodes before the event loop serves others (a 256 KB read
# of header-only messages is 16k of them, a third of a second of work)
MESSAGES_PER_TURN = 256


@dataclass(slots=True)
class CollectorStats(Counters):
    messages: int = 0  # messages decoded
    records: int = 0  # data records decoded
    octets: int = 0  # octets of decoded messages
    malformed: int = 0  # messages (or stream tails) refused as malformed
    sessions: int = 0  # transport sessions open now
    sessions_total: int = 0  # transport sessions ever accepted
    sessions_refused: int = 0  # refused because max_sessions were open
    sessions_refused_source: int = 0  # refused because one source address held max_sessions_per_source
    sessions_evicted: int = 0  # UDP sessions without templates forgotten to make room for a new one
    handshakes_pending: int = 0  # TLS handshakes in progress now (not yet sessions)
    handshakes_refused: int = 0  # connections closed at once: max_pending_handshakes in progress
    handshakes_timed_out: int = 0  # TLS handshakes not finished within tls_handshake_timeout
    sessions_expired: int = 0  # idle UDP sessions dropped
    tls_refused: int = 0  # TLS handshakes that failed (bad or missing client certificate, ...)
    templates_expired: int = 0  # UDP templates not refreshed within their lifetime
    unknown_template_sets: int = 0  # UDP data sets skipped: template not (yet) known
    ignored_withdrawals: int = 0  # withdrawals received over UDP (RFC 7011 8.4)
    lost_records: int = 0  # data records the peers' sequence numbers say never arrived
    sequence_jumps: int = 0  # implausible sequence numbers (far ahead or behind): resynchronised, not counted as loss
    templates_refused: int = 0  # UDP templates over a size limit or the compile budget, skipped
    domains_evicted: int = 0  # observation domains forgotten past max_domains in one session
    messages_deferred: int = 0  # stream messages held back until the template compile budget refilled
    messages_abandoned: int = 0  # ...whose session ended before the budget allowed them (not decoded)
    callback_errors: int = 0  # on_message raised
    decoder_errors: int = 0  # the decoder raised something else than MalformedMessage (a bug; counted as malformed too)


class _Session:
    """One transport session of the collecting process."""

    __slots__ = ("peer", "decoder", "last_seen", "delivered")

    def __init__(self, peer: Peer, decoder: Decoder, now: float) -> None:
        self.peer = peer
        self.decoder = decoder
        self.last_seen = now
        self.delivered = False  # a message decoded: the peer speaks IPFIX


class CollectingProcess:
    """Receives IPFIX messages on one address (UDP, TCP or TLS) from many exporters."""

    def __init__(
        self,
        address: Address,
        *,
        tls: TLSConfig | None,
        on_message: Callable[[Peer, Message], None],
        registry: Registry | None = None,
        template_lifetime: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
        max_sessions: int = 1024,
        max_templates: int = 4096,
        max_message_size: int = MAX_MESSAGE_SIZE,
        udp_session_timeout: float | None = None,
        stream_idle_timeout: float | None = None,
        tls_handshake_timeout: float = 10.0,
        on_session_closed: Callable[[Peer], None] | None = None,
        max_sessions_per_source: int | None = None,
        max_pending_handshakes: int = 128,
        max_template_fields: int = 1024,
        max_session_fields: int = 65536,
        max_domains: int = 1024,
        compile_budget: CompileBudget | None = None,
        decoder_class: type[Decoder] = Decoder,
    ) -> None:
        if address.protocol == "tls" and tls is None:
            raise UsageError(f"listening on {address} needs a TLS configuration (certificate, key and CA)")
        if address.protocol != "tls" and tls is not None:
            raise UsageError(f"a TLS configuration was given but {address} is not a tls address; use HOST:PORT:tls")
        if template_lifetime <= 0:
            raise UsageError(f"template lifetime {template_lifetime!r} must be a positive number of seconds")
        if max_sessions < 1 or max_templates < 1:
            raise UsageError("max_sessions and max_templates must be at least 1")
        if max_sessions_per_source is not None and max_sessions_per_source < 1:
            raise UsageError("max_sessions_per_source must be at least 1 (or None: max_sessions)")
        if max_pending_handshakes < 1 or max_template_fields < 1 or max_session_fields < 1 or max_domains < 1:
            raise UsageError("max_pending_handshakes, max_template_fields, max_session_fields and max_domains must be at least 1")
        if not 16 <= max_message_size <= MAX_MESSAGE_SIZE:
            raise UsageError(f"max message size {max_message_size} is outside 16..{MAX_MESSAGE_SIZE}")
        self.address = address
        # a session's Decoder: the codec's, or a subclass with the same rules (columnar.ColumnarDecoder)
        self.decoder_class = decoder_class
        self.protocol: Transport = address.protocol
        self.on_message = on_message
        self.on_session_closed = on_session_closed
        self.registry = registry
        self.template_lifetime = float(template_lifetime)
        self.udp_session_timeout = float(udp_session_timeout if udp_session_timeout is not None else template_lifetime)
        if stream_idle_timeout is not None and stream_idle_timeout <= 0:
            raise UsageError(f"stream idle timeout {stream_idle_timeout!r} must be a positive number of seconds or None")
        # TCP/TLS sessions that send nothing for this long are closed (None: never), so
        # that silent or half-open peers cannot hold sessions forever
        self.stream_idle_timeout = stream_idle_timeout
        self.clock = clock
        self.max_sessions = max_sessions
        self.max_templates = max_templates
        self.max_message_size = max_message_size
        self.tls_handshake_timeout = tls_handshake_timeout
        self.max_sessions_per_source = max_sessions_per_source or max_sessions
        self.max_pending_handshakes = max_pending_handshakes
        self.max_template_fields = max_template_fields
        self.max_session_fields = max_session_fields
        self.max_domains = max_domains
        # one budget for every session: compiling new template layouts is the costliest
        # thing a peer can make us do on the event loop
        self.compile_budget = compile_budget if compile_budget is not None else CompileBudget()
        self._per_source: dict[str, int] = {}  # sessions and pending handshakes by source address
        self.stats = CollectorStats()
        self._ssl = tls.server_context() if tls is not None else None
        self._limiter = LogLimiter(clock)
        self._server: asyncio.AbstractServer | None = None
        self._udp: asyncio.DatagramTransport | None = None
        # least recently heard first, so that expiry pops from the front instead of scanning
        self._udp_sessions: collections.OrderedDict[tuple[str, int], _Session] = collections.OrderedDict()
        self._streams: set[_StreamSession] = set()
        self._handshaking: set[_StreamSession] = set()  # TLS handshakes in progress
        self._sweeper: asyncio.Task[None] | None = None
        self._port = 0

    # -- life cycle

    async def start(self) -> None:
        if self._server is not None or self._udp is not None:
            raise UsageError("this collecting process is already started")
        loop = asyncio.get_running_loop()
        host = self.address.host
        try:
            dual = dual_stack_socket(self.address.port, udp=self.protocol == "udp") if host == "::" else None
            if dual is None and host == "::":
                log.warning("IPv6 is not available here: listening on 0.0.0.0 (IPv4 only) instead of ::")
                host = "0.0.0.0"
            if self.protocol == "udp":
                if dual is not None:
                    transport, _ = await loop.create_datagram_endpoint(lambda: _DatagramListener(self), sock=dual)
                else:
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda: _DatagramListener(self), local_addr=(host, self.address.port)
                    )
                self._udp = transport
                sock = transport.get_extra_info("socket")
                try:  # bursts from many exporters: a roomier receive buffer loses less
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
                except OSError:
                    pass
                self._port = sock.getsockname()[1]
                self._sweeper = asyncio.create_task(self._sweep(), name="ipfix-session-sweeper")
            else:
                if dual is not None:
                    server = await loop.create_server(lambda: _StreamSession(self), sock=dual)
                else:
                    server = await loop.create_server(lambda: _StreamSession(self), host, self.address.port)
                self._server = server
                self._port = server.sockets[0].getsockname()[1]
                if self.stream_idle_timeout is not None:
                    self._sweeper = asyncio.create_task(self._sweep(), name="ipfix-session-sweeper")
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {self.address}: {exc.strerror or exc}") from None
        log.info("IPFIX collecting process listening on %s (port %d)", self.address, self._port)

    @property
    def port(self) -> int:
        """The bound port (useful when listening on port 0)."""
        return self._port

    async def close(self, drain: float = 0.0) -> None:
        """Stop listening and close every session. With ``drain`` (seconds), TCP sessions
        are half-closed first and read until the exporter closes its side (at most that
        long): an exporter sees the end of the stream and stops writing, and what it wrote
        before is still read, so a graceful restart loses nothing it did not count."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None
        if self._server is not None:
            self._server.close()
            if drain > 0 and self._streams:
                for stream in list(self._streams):
                    transport = stream.transport
                    if isinstance(transport, asyncio.WriteTransport) and transport.can_write_eof():
                        try:
                            transport.write_eof()
                        except (OSError, RuntimeError):
                            pass
                loop = asyncio.get_running_loop()
                end = loop.time() + drain
                while any(not s.ended for s in self._streams) and loop.time() < end:
                    await asyncio.sleep(0.01)
                still = sum(1 for s in self._streams if not s.ended)
                if still:
                    log.warning("%d IPFIX sessions still open %.0fs after the end of the stream was sent: "
                                "closing them (what their exporters send now is lost)", still, drain)
            for stream in list(self._streams) + list(self._handshaking):
                stream.shutdown()
            await self._server.wait_closed()
            self._server = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
            for key in list(self._udp_sessions):
                self._end_udp_session(key)
        # let transports run their connection_lost callbacks
        await asyncio.sleep(0)

    async def __aenter__(self) -> CollectingProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def peers(self) -> list[Peer]:
        """Peers with a session open now."""
        return [s.peer for s in self._udp_sessions.values()] + [
            s.session.peer for s in self._streams if s.session is not None
        ]

    # -- shared by the transports

    def _new_decoder(self) -> Decoder:
        return self.decoder_class(
            self.registry,
            transport=self.protocol,
            template_lifetime=self.template_lifetime if self.protocol == "udp" else None,
            max_templates=self.max_templates,
            max_message_size=self.max_message_size,
            max_template_fields=self.max_template_fields,
            max_session_fields=self.max_session_fields,
            max_domains=self.max_domains,
            compile_budget=self.compile_budget,
        )

    def _decode(self, session: _Session, data: bytes, now: float) -> Message:
        decoder = session.decoder
        lost = decoder.lost_records
        jumps, refused, evicted = decoder.sequence_jumps, decoder.templates_refused, decoder.domains_evicted
        if decoder.template_lifetime is not None:
            expired = decoder.expire(now)
            if expired:
                self.stats.templates_expired += expired
        try:
            msg = decoder.decode(data, now)
        finally:
            if decoder.templates_refused != refused:
                self.stats.templates_refused += decoder.templates_refused - refused
            if decoder.domains_evicted != evicted:
                self.stats.domains_evicted += decoder.domains_evicted - evicted
        session.delivered = True
        stats = self.stats
        if decoder.sequence_jumps != jumps:
            stats.sequence_jumps += decoder.sequence_jumps - jumps
        stats.messages += 1
        stats.records += msg.record_count
        stats.octets += msg.length
        if msg.unknown_template_sets:
            stats.unknown_template_sets += msg.unknown_template_sets
        if msg.ignored_withdrawals:
            stats.ignored_withdrawals += msg.ignored_withdrawals
        if decoder.lost_records != lost:
            stats.lost_records += decoder.lost_records - lost
        return msg

    def _deliver(self, peer: Peer, msg: Message) -> None:
        try:
            self.on_message(peer, msg)
        except Exception:  # noqa: BLE001 - a bug in the consumer must not kill the listener
            self.stats.callback_errors += 1
            log.exception("on_message failed for a message from %s", peer)

    def _unexpected(self, peer: Peer, exc: Exception) -> None:
        """A decoder bug a peer's bytes found: the first few with their traceback, the rest
        through the log limiter (a peer must not be able to flood the log with them)."""
        self.stats.decoder_errors += 1
        if self.stats.decoder_errors <= 5:
            log.error("unexpected error decoding a message from %s", peer, exc_info=exc)

    def _malformed(self, peer: Peer, exc: Exception, closing: bool) -> None:
        self.stats.malformed += 1
        what = "; closing the session" if closing else "; datagram dropped"
        self._limiter.warn("malformed IPFIX from %s (%s): %s%s", peer, peer.protocol, exc, what)

    def _source_ok(self, host: str, what: str) -> bool:
        """Whether ``host`` may open one more session or handshake; counts it if so."""
        n = self._per_source.get(host, 0)
        if n >= self.max_sessions_per_source:
            self.stats.sessions_refused_source += 1
            self._limiter.warn(
                "refusing IPFIX %s from %s: it holds %d sessions (max per source address)", what, host, n
            )
            return False
        self._per_source[host] = n + 1
        return True

    def _source_done(self, host: str) -> None:
        n = self._per_source.get(host, 0) - 1
        if n > 0:
            self._per_source[host] = n
        else:
            self._per_source.pop(host, None)

    def _session_ended(self, peer: Peer) -> None:
        self.stats.sessions -= 1
        if self.on_session_closed is not None:
            try:
                self.on_session_closed(peer)
            except Exception:  # noqa: BLE001
                self.stats.callback_errors += 1
                log.exception("on_session_closed failed for %s", peer)

    # -- UDP

    def _datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        now = self.clock()
        key = (unmapped(str(addr[0])), int(addr[1]))
        sessions = self._udp_sessions
        session = sessions.get(key)
        if session is None:
            if len(sessions) >= self.max_sessions:
                self.stats.sessions_expired += self._expire_udp_sessions(now)  # the idle ones, from the front
            if len(sessions) >= self.max_sessions:
                # The least recently heard session, if it holds no template, is of no use
                # to anyone (its data sets would be skipped): it makes room.
                oldest_key, oldest = next(iter(sessions.items()))
                if oldest.decoder.template_count == 0:
                    self._end_udp_session(oldest_key)
                    self.stats.sessions_evicted += 1
            if len(sessions) >= self.max_sessions:
                self.stats.sessions_refused += 1
                self._limiter.warn(
                    "refusing IPFIX over UDP from %s:%d: %d sessions open (the limit)", key[0], key[1], self.max_sessions
                )
                return
            if not self._source_ok(key[0], "over UDP"):
                return
            session = _Session(Peer(key[0], key[1], "udp"), self._new_decoder(), now)
            sessions[key] = session
            self.stats.sessions += 1
            self.stats.sessions_total += 1
        else:
            sessions.move_to_end(key)
        session.last_seen = now
        try:
            msg = self._decode(session, data, now)
        except MalformedMessage as exc:
            self._malformed(session.peer, exc, closing=False)
            return
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the listener
            self._unexpected(session.peer, exc)
            self._malformed(session.peer, exc, closing=False)
            return
        self._deliver(session.peer, msg)

    def _end_udp_session(self, key: tuple[str, int]) -> None:
        session = self._udp_sessions.pop(key, None)
        if session is not None:
            self._source_done(key[0])
            self._session_ended(session.peer)

    def expire(self, now: float | None = None) -> int:
        """Expire idle UDP sessions and stale UDP templates, and close TCP/TLS sessions
        idle past ``stream_idle_timeout``, as of ``now`` (default: the clock); returns how
        many sessions were ended. Runs periodically by itself."""
        if now is None:
            now = self.clock()
        dropped = 0
        if self.stream_idle_timeout is not None:
            for stream in list(self._streams):
                session = stream.session
                if session is not None and now - session.last_seen >= self.stream_idle_timeout:
                    log.debug("closing the IPFIX session of %s: idle for %.0fs", session.peer, now - session.last_seen)
                    stream.shutdown()
                    dropped += 1
            if dropped:  # one line, however many: a peer's thousand idle sessions are not a thousand lines
                log.info("closed %d IPFIX sessions idle for %.0fs or more", dropped, self.stream_idle_timeout)
        dropped += self._expire_udp_sessions(now)
        for session in self._udp_sessions.values():
            self.stats.templates_expired += session.decoder.expire(now)
        self.stats.sessions_expired += dropped
        return dropped

    def _expire_udp_sessions(self, now: float) -> int:
        """End the UDP sessions idle past their timeout: they are at the front, least
        recently heard first, so this costs what expires."""
        sessions = self._udp_sessions
        dropped = 0
        while sessions:
            key, session = next(iter(sessions.items()))
            if now - session.last_seen < self.udp_session_timeout:
                break
            self._end_udp_session(key)
            dropped += 1
        return dropped

    async def _sweep(self) -> None:
        limits = [self.udp_session_timeout, self.template_lifetime] if self.protocol == "udp" else []
        if self.stream_idle_timeout is not None:
            limits.append(self.stream_idle_timeout)
        interval = max(0.05, min([60.0] + [x / 4 for x in limits]))
        while True:
            await asyncio.sleep(interval)
            self.expire()

    # -- TCP and TLS

    def _admit(self, peer: Peer) -> bool:
        """A new connection: within the per-source limit (and, for TLS, the limit on
        handshakes in progress)? Counts it against its source address if so."""
        if self._ssl is not None and self.stats.handshakes_pending >= self.max_pending_handshakes:
            self.stats.handshakes_refused += 1
            self._limiter.warn(
                "refusing a TLS connection from %s: %d handshakes in progress (the limit)", peer, self.max_pending_handshakes
            )
            return False
        if self._ssl is None and len(self._streams) >= self.max_sessions:
            self.stats.sessions_refused += 1
            self._limiter.warn(
                "refusing IPFIX over %s from %s: %d sessions open (the limit)", peer.protocol, peer, self.max_sessions
            )
            return False
        return self._source_ok(peer.host, f"over {peer.protocol}")

    def _accept(self, stream: _StreamSession, peer: Peer) -> bool:
        """A session starts: over TLS only once the handshake authenticated the peer, so
        that connections that never authenticate cannot take the sessions of those that do."""
        if len(self._streams) >= self.max_sessions:
            self.stats.sessions_refused += 1
            self._limiter.warn(
                "refusing IPFIX over %s from %s: %d sessions open (the limit)", peer.protocol, peer, self.max_sessions
            )
            return False
        self._streams.add(stream)
        self.stats.sessions += 1
        self.stats.sessions_total += 1
        return True


class _DatagramListener(asyncio.DatagramProtocol):
    def __init__(self, process: CollectingProcess) -> None:
        self.process = process

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.process._datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP socket error on the collecting process: %s", exc)


#: At most this much TLS application data is kept while the handshake completes (what one
#: read of asyncio's TLS layer can hand over with it: 256 KiB); more fails the session.
EARLY_DATA_MAX = 1 << 20


class _StreamSession(asyncio.Protocol):
    """One TCP or TLS connection of the collecting process.

    A connection first takes a slot of its source address (``max_sessions_per_source``)
    and, over TLS, of the handshakes in progress (``max_pending_handshakes``); it becomes a
    session, counted against ``max_sessions``, only once the handshake authenticated the
    peer. Messages the compile budget defers wait in ``backlog`` while reading is paused.
    """

    def __init__(self, process: CollectingProcess) -> None:
        self.process = process
        self.peer: Peer | None = None
        self.session: _Session | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.framer = MessageFramer(process.max_message_size)
        self.backlog: collections.deque[bytes] = collections.deque()
        self.admitted = False  # holds a slot of its source address
        self.pending = False  # a TLS handshake in progress
        self.accepted = False  # a session
        self.ended = False
        self.failed = False
        self.paused = False
        self.handshake: asyncio.Future[None] | None = None  # referenced, so it is not collected mid-flight
        # TLS: what arrived right behind the client's Finished, which asyncio's TLS layer hands
        # over as it completes the handshake, before start_tls returns and the session exists
        self.early: list[bytes] = []
        self.early_octets = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        process = self.process
        self.transport = transport
        peername = transport.get_extra_info("peername") or ("?", 0)
        peer = self.peer = Peer(unmapped(str(peername[0])), int(peername[1]), process.protocol)
        if not process._admit(peer):
            transport.abort()  # type: ignore[attr-defined]
            self.ended = True
            return
        self.admitted = True
        if process._ssl is not None:
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()  # nothing may reach us before the TLS layer is in place
            self.pending = True
            process.stats.handshakes_pending += 1
            process._handshaking.add(self)
            self.handshake = asyncio.ensure_future(self._handshake(transport, process._ssl))
        elif not self._begin():
            transport.close()

    def _begin(self) -> bool:
        process = self.process
        assert self.peer is not None
        if not process._accept(self, self.peer):
            return False
        self.accepted = True
        self.session = _Session(self.peer, process._new_decoder(), process.clock())
        return True

    def _handshake_over(self) -> None:
        if self.pending:
            self.pending = False
            self.process.stats.handshakes_pending -= 1
            self.process._handshaking.discard(self)

    async def _handshake(self, raw: asyncio.Transport, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        process = self.process
        try:
            tls = await loop.start_tls(
                raw, self, ctx, server_side=True, ssl_handshake_timeout=process.tls_handshake_timeout
            )
        except Exception as exc:  # noqa: BLE001 - any failure of the handshake refuses this peer only
            self._handshake_over()
            process.stats.tls_refused += 1
            if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or "longer than" in str(exc) or "timed out" in str(exc):
                process.stats.handshakes_timed_out += 1
            reason = getattr(exc, "reason", None) or exc
            process._limiter.warn("TLS handshake with %s refused: %s", self.peer, reason)
            raw.abort()
            self._end()
            return
        self._handshake_over()
        if tls is None:  # the peer went away during the handshake
            self._end()
            return
        self.transport = tls
        if self.ended:
            tls.abort()
            return
        if not self._begin():
            tls.abort()
            self._end()
            return
        early, self.early = self.early, []
        if self.early_octets > EARLY_DATA_MAX:
            self._fail(MalformedMessage(f"more than {EARLY_DATA_MAX} octets arrived with the TLS handshake"))
        elif early:
            self.data_received(b"".join(early))

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None:
            if self.pending and not self.ended:  # TLS data behind the client's Finished: kept for the session
                self.early_octets += len(data)
                if self.early_octets <= EARLY_DATA_MAX:
                    self.early.append(data)
            return
        if self.failed:
            return
        session.last_seen = self.process.clock()
        try:
            messages = self.framer.feed(data)
        except MalformedMessage as exc:
            self._fail(exc)
            return
        if messages:
            self.backlog.extend(messages)
            if not self.paused:
                self._pump()

    def _pump(self, final: bool = False) -> None:
        """Decode what waits in ``backlog``: a turn's worth at a time, and no faster than the
        compile budget allows. ``final`` (the session is ending): everything now, but what
        the budget still refuses is counted as abandoned, not decoded for free."""
        session = self.session
        process = self.process
        backlog = self.backlog
        assert session is not None
        budget = MESSAGES_PER_TURN
        try:
            while backlog:
                if budget == 0 and not final:  # a turn's worth: let the other sessions (and the API) run first
                    self._pause(0.0)
                    return
                budget -= 1
                now = process.clock()
                try:
                    msg = process._decode(session, backlog[0], now)
                except Deferred as exc:
                    process.stats.messages_deferred += 1
                    if final:
                        # Decoding it anyway would let anyone skip the budget by closing.
                        process.stats.messages_abandoned += len(backlog)
                        backlog.clear()
                        return
                    self._pause(exc.retry_after)
                    return
                backlog.popleft()
                process._deliver(session.peer, msg)
        except Exception as exc:  # noqa: BLE001 - MalformedMessage, or a decoder bug: this session only
            self._fail(exc)

    def _pause(self, delay: float) -> None:
        transport = self.transport
        if not self.paused and isinstance(transport, asyncio.Transport):
            transport.pause_reading()
        self.paused = True
        loop = asyncio.get_running_loop()
        if delay > 0:
            loop.call_later(delay, self._resume)
        else:
            loop.call_soon(self._resume)

    def _resume(self) -> None:
        if self.ended or self.failed or self.session is None:
            return
        self.paused = False
        self.session.last_seen = self.process.clock()
        self._pump()
        transport = self.transport
        if not self.paused and not self.ended and isinstance(transport, asyncio.Transport):
            try:
                transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def _fail(self, exc: Exception) -> None:
        assert self.session is not None
        self.failed = True
        self.backlog.clear()
        if not isinstance(exc, MalformedMessage):
            self.process._unexpected(self.session.peer, exc)
        self.process._malformed(self.session.peer, exc, closing=True)
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None and not self.failed and (self.framer.pending or self.backlog):
            if self.backlog:  # the peer left while messages waited for their turn
                self._pump(final=True)
            if self.framer.pending and not self.failed:
                self.process._malformed(
                    self.session.peer,
                    MalformedMessage(f"stream ended inside a message ({self.framer.pending} octets of it received)"),
                    closing=True,
                )
        self._end()

    def shutdown(self) -> None:
        if self.backlog and self.session is not None and not self.failed and not self.ended:
            self._pump(final=True)  # what was read is decoded before the session ends
        if self.handshake is not None and not self.handshake.done():
            self.handshake.cancel()
        if self.transport is not None:
            self.transport.close()
        self._end()

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self._handshake_over()
        if self.admitted:
            self.admitted = False
            assert self.peer is not None
            self.process._source_done(self.peer.host)
        if self.accepted:
            self.process._streams.discard(self)
            assert self.peer is not None
            self.process._session_ended(self.peer)
