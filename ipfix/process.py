"""IPFIX collecting and exporting processes over UDP, TCP and TLS (RFC 7011 section 10), asyncio.

The codec (``codec.py``) knows bytes and messages; this module knows sockets, time and
failure. It is deliberately thin: each transport session owns one codec object
(:class:`~flowscope.ipfix.codec.Decoder` on the collecting side,
:class:`~flowscope.ipfix.codec.ExportSession` on the exporting side), and everything
else here is about which session a byte belongs to, when templates are (re)sent or
expire, and how the process survives peers that misbehave or vanish.

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
import errno
import collections
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .address import Address
from .codec import MAX_MESSAGE_SIZE, Decoder, ExportSession, Message, MessageFramer, Transport
from .errors import Deferred, MalformedMessage, RecordTooLarge, UsageError
from .registry import Registry
from .template import CompileBudget, Record, Template

__all__ = [
    "TLSConfig",
    "Peer",
    "CollectorStats",
    "ExporterStats",
    "CollectingProcess",
    "ExportingProcess",
]

log = logging.getLogger("flowscope.ipfix.process")

IPV4_UDP_OVERHEAD = 20 + 8
IPV6_UDP_OVERHEAD = 40 + 8
# Messages one stream session decodes before the event loop serves others (a 256 KB read
# of header-only messages is 16k of them, a third of a second of work)
MESSAGES_PER_TURN = 256


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """Paths of a PEM certificate, its private key and the CA that signs the peers.

    Both ends authenticate each other: the collector requires a client certificate signed
    by ``ca``, the exporter verifies the collector's certificate against ``ca`` and its
    name against ``server_name`` (by default the host of the collector's address).
    """

    cert: str
    key: str
    ca: str
    server_name: str | None = None

    def _load(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"tls ca: cannot load CA certificates from {self.ca!r}: {exc}") from None
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(
                f"tls cert/key: cannot load certificate {self.cert!r} with key {self.key!r}: {exc} "
                "(both must be PEM files and the key must match the certificate)"
            ) from None
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """Server side: TLS 1.2+, client certificate required and verified against ``ca``."""
        ctx = self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Client side: TLS 1.2+, server certificate and name verified against ``ca``."""
        ctx = self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
        return ctx


# --------------------------------------------------------------------------- collecting


@dataclass(frozen=True, slots=True)
class Peer:
    """The remote end of one transport session."""

    host: str
    port: int
    protocol: Transport

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class _Counters:
    """Counters readable as attributes or, for callers that prefer it, by key."""

    __slots__ = ()

    def __getitem__(self, name: str) -> Any:
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload, no-any-return]


@dataclass(slots=True)
class CollectorStats(_Counters):
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


class _LogLimiter:
    """At most ``burst`` warnings per ``window`` seconds: a flood of garbage must not
    turn into a flood of log lines. Suppressed lines are still counted in the stats."""

    __slots__ = ("clock", "burst", "window", "start", "count", "suppressed")

    def __init__(self, clock: Callable[[], float], burst: int = 20, window: float = 10.0) -> None:
        self.clock, self.burst, self.window = clock, burst, window
        self.start, self.count, self.suppressed = -window, 0, 0

    def warn(self, msg: str, *args: object) -> None:
        now = self.clock()
        if now - self.start >= self.window:
            if self.suppressed:
                log.warning("%d similar warnings suppressed in the last %.0fs", self.suppressed, self.window)
            self.start, self.count, self.suppressed = now, 0, 0
        if self.count < self.burst:
            self.count += 1
            log.warning(msg, *args)
        else:
            self.suppressed += 1


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
        self._limiter = _LogLimiter(clock)
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
            dual = _dual_stack_socket(self.address.port, udp=self.protocol == "udp") if host == "::" else None
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
        return Decoder(
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
        key = (_unmapped(str(addr[0])), int(addr[1]))
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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        process = self.process
        self.transport = transport
        peername = transport.get_extra_info("peername") or ("?", 0)
        peer = self.peer = Peer(_unmapped(str(peername[0])), int(peername[1]), process.protocol)
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

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None or self.failed:
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


# --------------------------------------------------------------------------- exporting


@dataclass(slots=True)
class ExporterStats(_Counters):
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


def _unmapped(host: str) -> str:
    """An IPv4 peer of a dual-stack socket shows as ``::ffff:a.b.c.d``: name it by its IPv4 address."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def _dual_stack_socket(port: int, *, udp: bool) -> socket.socket | None:
    """A socket bound to ``[::]:port`` that takes IPv4 too (IPV6_V6ONLY off), so that one
    listener serves IPv4, IPv6 and dual-stack clusters alike; None where the host has no
    IPv6 (the caller falls back to 0.0.0.0)."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if not udp:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            return None
        raise
    sock.setblocking(False)
    return sock


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
        self._limiter = _LogLimiter(time.monotonic)
        self._queue: collections.deque[tuple[int, list[Record]]] = collections.deque()
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
        n = len(records)
        if n == 0:
            return True
        if self._closing or self.stats.queued + n > self.queue_size:
            self.stats.records_dropped += n
            if not self._closing:
                self._limiter.warn(
                    "export queue to %s is full (%d records): %d records dropped", self.address, self.queue_size, n
                )
            return False
        self._queue.append((template_id, list(records)))
        self.stats.queued += n
        self.stats.records_submitted += n
        self._idle.clear()
        self._wake.set()
        return True

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

    def _take(self) -> Iterator[tuple[int, list[Record]]]:
        """Queued batches, merged by template, up to max_batch records."""
        taken = 0
        queue = self._queue
        while queue and taken < self.max_batch:
            tid, records = queue.popleft()
            while queue and queue[0][0] == tid and taken + len(records) < self.max_batch:
                records.extend(queue.popleft()[1])  # our own copy, made by submit()
            taken += len(records)
            self.stats.queued -= len(records)
            yield tid, records

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
        for tid, records in list(self._take()):
            encoded, n = self._encode(session, tid, records, export_time)
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
