"""The collecting and exporting processes over real loopback sockets (UDP and TCP):
many exporters at once, malformed input from a peer, limits, UDP template refresh and
expiry driven by an injected clock, reconnects, and a bounded queue whose overflow is
counted. Every count is compared with what was actually sent."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from ipfix_samples import agent_record

from flowscope.ipfix import Address, ExportSession, Template, UsageError
from flowscope.ipfix.antrea import AGENT_IPV4_FIELDS, AGENT_IPV6_FIELDS
from flowscope.ipfix.collecting import CollectingProcess
from flowscope.ipfix.exporting import ExportingProcess
from flowscope.ipfix.transport import Peer

T4 = Template.build(256, AGENT_IPV4_FIELDS)
T6 = Template.build(257, AGENT_IPV6_FIELDS)


class FakeClock:
    def __init__(self, now: float = 1_795_716_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Wait for an event on real sockets (not for a timeout a clock could drive)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class Sink:
    """Collects (peer, template id, record) and the messages' lengths."""

    def __init__(self) -> None:
        self.records: list[tuple[Peer, int, dict[str, Any]]] = []
        self.lengths: list[int] = []
        self.domains: set[int] = set()

    def __call__(self, peer: Peer, msg: Any) -> None:
        self.lengths.append(msg.length)
        self.domains.add(msg.observation_domain_id)
        for t, r in msg.data_records():
            self.records.append((peer, t.template_id, r))

    def by_peer(self) -> dict[Peer, list[dict[str, Any]]]:
        out: dict[Peer, list[dict[str, Any]]] = defaultdict(list)
        for peer, _, r in self.records:
            out[peer].append(r)
        return out


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def messages(records: list[dict[str, Any]], template: Template = T4, domain: int = 0) -> bytes:
    s = ExportSession(domain)
    s.add_template(template)
    return b"".join(s.encode_templates(1) + s.encode_records(template.template_id, records, 1))


# --------------------------------------------------------------------------- TCP


async def test_tcp_many_exporters_at_once_every_record_arrives_intact() -> None:
    sink = Sink()
    async with CollectingProcess(Address("127.0.0.1", 0, "tcp"), tls=None, on_message=sink) as collector:
        exporters = [
            ExportingProcess(Address("127.0.0.1", collector.port, "tcp"), tls=None, templates=[T4, T6], observation_domain_id=n)
            for n in range(8)
        ]
        sent: dict[int, list[dict[str, Any]]] = {}
        for n, e in enumerate(exporters):
            await e.start()
            v4 = [agent_record(n * 10000 + i, 4, unicode_names=(i % 50 == 0)) for i in range(1500)]
            v6 = [agent_record(n * 10000 + i, 6) for i in range(500)]
            for chunk in range(0, 1500, 100):  # many small submits, interleaved with v6
                assert e.submit(256, v4[chunk : chunk + 100])
                if chunk < 500:
                    assert e.submit(257, v6[chunk : chunk + 100])
            sent[n] = v4 + v6
        await asyncio.gather(*(e.flush(timeout=10) for e in exporters))
        await until(lambda: len(sink.records) == 8 * 2000, what="16000 records")
        assert collector.stats.sessions == 8
        assert collector.stats.malformed == 0 and collector.stats.lost_records == 0
        by_domain: dict[int, list[dict[str, Any]]] = defaultdict(list)
        port_domain: dict[int, int] = {}
        for e in exporters:
            assert e.stats.records_sent == 2000 and e.stats.records_dropped == 0 and e.stats.connects == 1
        for peer, _, r in sink.records:
            by_domain[peer.port].append(r)
        assert len(by_domain) == 8  # one transport session per exporter
        for port, recs in by_domain.items():
            n = (recs[0]["flowStartSeconds"] - 1795716000) // 10000
            port_domain[port] = n
            key = lambda r: (r["flowStartSeconds"], "sourceIPv4Address" in r)  # noqa: E731
            assert sorted(recs, key=key) == sorted(sent[n], key=key)
        assert sink.domains == set(range(8))
        for e in exporters:
            await e.close()
    assert collector.stats.sessions == 0


async def test_invalid_record_is_counted_and_the_good_ones_of_its_batch_still_go() -> None:
    sink = Sink()
    async with CollectingProcess(Address("127.0.0.1", 0, "tcp"), tls=None, on_message=sink) as collector:
        e = ExportingProcess(Address("127.0.0.1", collector.port, "tcp"), tls=None, templates=[T4])
        await e.start()
        good = [agent_record(i) for i in range(3)]
        bad = dict(agent_record(99), sourceTransportPort=70000)
        assert e.submit(256, [good[0], bad, good[1], good[2]])
        with pytest.raises(UsageError, match="template 999"):
            e.submit(999, good)
        assert await e.flush(timeout=5)
        await until(lambda: len(sink.records) == 3)
        assert [r for _, _, r in sink.records] == good
        assert e.stats.records_invalid == 1 and e.stats.records_sent == 3
        await e.close()


async def raw_session(port: int, payload: bytes, close: bool = False) -> bytes:
    """Send bytes as a misbehaving exporter; return what is read until the collector closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    if close:
        writer.close()
        await writer.wait_closed()
        return b""
    try:
        return await asyncio.wait_for(reader.read(), 5)  # EOF when the collector closes the session
    finally:
        writer.close()


def _bad_version() -> bytes:
    m = bytearray(messages([agent_record(1)]))
    m[0:2] = struct.pack("!H", 9)
    return bytes(m)


def _bad_set_length() -> bytes:
    s = ExportSession()
    s.add_template(T4)
    tmpl = s.encode_templates(1)[0]
    data = bytearray(s.encode_records(256, [agent_record(1)], 1)[0])
    data[18:20] = struct.pack("!H", len(data))  # the set claims more than the message holds
    return tmpl + bytes(data)


def _unknown_template() -> bytes:
    s = ExportSession()
    s.add_template(T4)
    return s.encode_records(256, [agent_record(1)], 1)[0]  # data, never a template


def _garbage() -> bytes:
    return bytes(range(256)) * 4


@pytest.mark.parametrize(
    "name,payload,close",
    [
        ("bad version", _bad_version(), False),
        ("set length past the message", _bad_set_length(), False),
        ("data set for an unknown template", _unknown_template(), False),
        ("garbage", _garbage(), False),
        ("truncated stream", messages([agent_record(1)])[:-7], True),
    ],
)
async def test_tcp_malformed_input_is_counted_session_closed_others_served(name: str, payload: bytes, close: bool) -> None:
    sink = Sink()
    async with CollectingProcess(Address("127.0.0.1", 0, "tcp"), tls=None, on_message=sink) as collector:
        good = ExportingProcess(Address("127.0.0.1", collector.port, "tcp"), tls=None, templates=[T4])
        await good.start()
        before = [agent_record(i) for i in range(50)]
        good.submit(256, before)
        await good.flush(timeout=5)
        await until(lambda: len(sink.records) == 50)

        leftover = await raw_session(collector.port, payload, close=close)
        assert leftover == b""  # nothing but EOF: the collector closed the bad session
        await until(lambda: collector.stats.malformed == 1, what=f"{name} counted")
        await until(lambda: collector.stats.sessions == 1, what="bad session gone")

        after = [agent_record(i) for i in range(50, 120)]
        good.submit(256, after)
        await good.flush(timeout=5)
        await until(lambda: len(sink.records) == 120)
        assert [r for _, _, r in sink.records] == before + after
        assert collector.stats.malformed == 1
        await good.close()


async def test_tcp_session_cap_refuses_and_counts_then_admits_again() -> None:
    sink = Sink()
    async with CollectingProcess(Address("127.0.0.1", 0, "tcp"), tls=None, on_message=sink, max_sessions=2) as collector:
        conns = [await asyncio.open_connection("127.0.0.1", collector.port) for _ in range(2)]
        await until(lambda: collector.stats.sessions == 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", collector.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # refused: closed at once
        writer.close()
        assert collector.stats.sessions_refused == 1
        for _, w in conns:
            w.close()
        await until(lambda: collector.stats.sessions == 0)
        e = ExportingProcess(Address("127.0.0.1", collector.port, "tcp"), tls=None, templates=[T4])
        await e.start()
        e.submit(256, [agent_record(7)])
        await e.flush(timeout=5)
        await until(lambda: len(sink.records) == 1)
        await e.close()


async def test_tcp_template_cap_per_session_closes_the_session() -> None:
    sink = Sink()
    async with CollectingProcess(Address("127.0.0.1", 0, "tcp"), tls=None, on_message=sink, max_templates=2) as collector:
        s = ExportSession()
        for tid in (256, 257, 258):
            s.add_template(Template.build(tid, ["sourceIPv4Address", ("octetDeltaCount", tid - 250)]))
        assert await raw_session(collector.port, b"".join(s.encode_templates(1))) == b""
        await until(lambda: collector.stats.malformed == 1)


async def test_exporter_reconnects_after_collector_restart_and_resends_templates() -> None:
    port = free_port()
    first, second = Sink(), Sink()
    c1 = CollectingProcess(Address("127.0.0.1", port, "tcp"), tls=None, on_message=first)
    await c1.start()
    e = ExportingProcess(
        Address("127.0.0.1", port, "tcp"), tls=None, templates=[T4, T6], backoff_initial=0.02, backoff_max=0.1
    )
    await e.start()
    a = [agent_record(i) for i in range(300)]
    e.submit(256, a)
    await e.flush(timeout=5)
    await until(lambda: len(first.records) == 300)
    await c1.close()
    await until(lambda: not e.stats.connected, what="the exporter to notice")

    b4 = [agent_record(i) for i in range(300, 700)]
    b6 = [agent_record(i, 6) for i in range(100)]
    assert e.submit(256, b4) and e.submit(257, b6)  # queued while the collector is away
    c2 = CollectingProcess(Address("127.0.0.1", port, "tcp"), tls=None, on_message=second)
    await c2.start()
    assert await e.flush(timeout=10)
    await until(lambda: len(second.records) == 500)
    # over TCP data for an unknown template is malformed: none means templates came first
    assert c2.stats.malformed == 0 and c2.stats.lost_records == 0
    assert [r for _, tid, r in second.records if tid == 256] == b4
    assert [r for _, tid, r in second.records if tid == 257] == b6
    assert e.stats.reconnects == 1 and e.stats.connects == 2
    # nothing lost beyond what is counted: every submitted record arrived or is counted, and
    # none counted as sent that did not arrive (records written just before the collector
    # closed the session are counted as lost: the exporter cannot know it read them)
    s = e.stats
    assert s.records_submitted == 800
    assert s.records_sent + s.records_lost + s.records_dropped == 800
    assert s.records_sent <= len(first.records) + len(second.records)
    assert len(first.records) + len(second.records) + s.records_lost + s.records_dropped >= 800
    await e.close()
    await c2.close()


async def test_queue_overflow_is_counted_never_silent_and_close_counts_the_rest() -> None:
    port = free_port()  # nothing listens: the exporter keeps retrying
    e = ExportingProcess(
        Address("127.0.0.1", port, "tcp"), tls=None, templates=[T4], queue_size=100, backoff_initial=5, backoff_max=5
    )
    await e.start()
    assert not e.stats.connected and e.stats.connect_failures == 1
    assert e.submit(256, [agent_record(i) for i in range(60)])
    assert not e.submit(256, [agent_record(i) for i in range(60)])  # would exceed 100
    assert e.submit(256, [agent_record(i) for i in range(40)])  # exactly fills it
    assert e.stats.records_dropped == 60 and e.stats.queued == 100
    assert not await e.flush(timeout=0.05)
    await e.close()
    assert e.stats.records_dropped == 160 and e.stats.queued == 0
    assert not e.submit(256, [agent_record(1)])  # after close: refused, counted
    assert e.stats.records_dropped == 161


def test_backoff_is_quick_at_first_then_at_most_once_a_minute_but_low_while_records_wait() -> None:
    e = ExportingProcess(Address("127.0.0.1", 9, "tcp"), tls=None, templates=[T4], rng=lambda: 1.0)
    delays = []
    for failures in range(1, 8):
        e._failures = failures
        delays.append(e._backoff())
    assert delays == [1.0, 2.0, 4.0, 60.0, 60.0, 60.0, 60.0]
    e.stats.queued = 10  # a backlog: the collector must be found again within seconds
    assert e._backoff() == 2.0
    e._jitter = 0.5  # the jitter draws each wait between half and all of it
    assert e._backoff() == 1.0


async def test_a_backlog_cuts_a_long_backoff_short() -> None:
    port = free_port()
    e = ExportingProcess(Address("127.0.0.1", port, "tcp"), tls=None, templates=[T4], rng=lambda: 1.0,
                         connect_timeout=1.0)
    await e.start()  # refused: nothing listens
    e._failures = 10  # as if it had failed for minutes: the next wait is 60 s
    waiting = asyncio.create_task(e._wait_backoff())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert e.submit(256, [agent_record(1)])
    await asyncio.wait_for(waiting, 5.0)
    assert loop.time() - t0 < 2.5  # the busy cap (2 s) from the wait's start, not 60 s
    await e.close()


def test_configuration_mistakes_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="needs a TLS configuration"):
        ExportingProcess(Address("127.0.0.1", 9, "tls"), tls=None, templates=[T4])
    with pytest.raises(UsageError, match="needs a TLS configuration"):
        CollectingProcess(Address("127.0.0.1", 9, "tls"), tls=None, on_message=lambda p, m: None)
    with pytest.raises(UsageError, match="at least one template"):
        ExportingProcess(Address("127.0.0.1", 9, "tcp"), tls=None, templates=[])
    with pytest.raises(UsageError, match="path MTU"):
        ExportingProcess(Address("127.0.0.1", 9, "udp"), tls=None, templates=[T4], path_mtu=20)


# --------------------------------------------------------------------------- UDP


async def test_udp_messages_fit_the_path_mtu_and_templates_come_first() -> None:
    sink = Sink()
    async with CollectingProcess(Address("127.0.0.1", 0, "udp"), tls=None, on_message=sink) as collector:
        e = ExportingProcess(Address("127.0.0.1", collector.port, "udp"), tls=None, templates=[T4, T6])
        await e.start()
        v4 = [agent_record(i) for i in range(200)]
        v6 = [agent_record(i, 6) for i in range(50)]
        e.submit(256, v4)
        e.submit(257, v6)
        await e.flush(timeout=5)
        await until(lambda: len(sink.records) == 250)
        assert max(sink.lengths) <= 512 - 28
        assert collector.stats.unknown_template_sets == 0  # templates before the first data
        assert [r for _, tid, r in sink.records if tid == 256] == v4
        assert [r for _, tid, r in sink.records if tid == 257] == v6
        assert e.stats.messages_sent == len(sink.lengths) - e.stats.template_messages_sent
        await e.close()


async def test_udp_record_larger_than_the_mtu_is_sent_alone_and_counted() -> None:
    sink = Sink()
    async with CollectingProcess(Address("127.0.0.1", 0, "udp"), tls=None, on_message=sink) as collector:
        e = ExportingProcess(Address("127.0.0.1", collector.port, "udp"), tls=None, templates=[T4])
        await e.start()
        big = dict(agent_record(1), sourcePodName="p" * 600)
        e.submit(256, [agent_record(0), big, agent_record(2)])
        await e.flush(timeout=5)
        await until(lambda: len(sink.records) == 3)
        assert [r for _, _, r in sink.records] == [agent_record(0), big, agent_record(2)]
        assert e.stats.oversize_messages == 1 and e.stats.records_invalid == 0
        await e.close()


async def test_udp_templates_are_refreshed_by_the_injected_clock() -> None:
    sink = Sink()
    clock = FakeClock()
    async with CollectingProcess(Address("127.0.0.1", 0, "udp"), tls=None, on_message=sink) as collector:
        e = ExportingProcess(
            Address("127.0.0.1", collector.port, "udp"), tls=None, templates=[T4], template_refresh=600, clock=clock
        )
        await e.start()
        e.submit(256, [agent_record(0)])
        await e.flush()
        assert e.stats.template_messages_sent == 1
        clock.now += 599
        e.submit(256, [agent_record(1)])
        await e.flush()
        assert e.stats.template_messages_sent == 1
        clock.now += 1
        e.submit(256, [agent_record(2)])
        await e.flush()
        assert e.stats.template_messages_sent == 2
        await until(lambda: len(sink.records) == 3)
        # export time comes from the injected clock too
        await e.close()


async def test_udp_templates_expire_by_the_injected_clock_and_idle_sessions_end() -> None:
    sink = Sink()
    clock = FakeClock(1000.0)
    collector = CollectingProcess(
        Address("127.0.0.1", 0, "udp"), tls=None, on_message=sink, template_lifetime=100, udp_session_timeout=300, clock=clock
    )
    await collector.start()
    s = ExportSession()
    s.add_template(T4)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", collector.port))
    try:
        for m in s.encode_templates(1) + s.encode_records(256, [agent_record(0)], 1):
            sock.send(m)
        await until(lambda: len(sink.records) == 1)

        clock.now += 99  # still alive
        sock.send(s.encode_records(256, [agent_record(1)], 1)[0])
        await until(lambda: len(sink.records) == 2)

        clock.now += 2  # 101 s after the template: gone
        sock.send(s.encode_records(256, [agent_record(2)], 1)[0])
        await until(lambda: collector.stats.unknown_template_sets == 1)
        assert collector.stats.templates_expired == 1 and len(sink.records) == 2

        for m in s.encode_templates(1) + s.encode_records(256, [agent_record(3)], 1):  # refreshed
            sock.send(m)
        await until(lambda: len(sink.records) == 3)
        assert collector.stats.sessions == 1

        clock.now += 299
        assert collector.expire() == 0
        clock.now += 1
        assert collector.expire() == 1
        assert collector.stats.sessions == 0 and collector.stats.sessions_expired == 1
    finally:
        sock.close()
        await collector.close()


async def test_udp_garbage_is_counted_and_the_session_keeps_working() -> None:
    sink = Sink()
    async with CollectingProcess(Address("127.0.0.1", 0, "udp"), tls=None, on_message=sink) as collector:
        s = ExportSession()
        s.add_template(T4)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", collector.port))
        try:
            sock.send(s.encode_templates(1)[0])
            sock.send(_garbage())
            sock.send(b"\x00\x0a\x00")  # shorter than a header
            sock.send(s.encode_records(256, [agent_record(5)], 1)[0])
            await until(lambda: len(sink.records) == 1)
            assert collector.stats.malformed == 2 and collector.stats.sessions == 1
            assert sink.records[0][2] == agent_record(5)
        finally:
            sock.close()


async def test_udp_session_cap_refuses_new_peers() -> None:
    sink = Sink()
    async with CollectingProcess(Address("127.0.0.1", 0, "udp"), tls=None, on_message=sink, max_sessions=1) as collector:
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        try:
            es = ExportSession()
            es.add_template(T4)
            payload = es.encode_templates(1) + es.encode_records(256, [agent_record(1)], 1)
            for s in socks:
                for m in payload:  # one message per datagram
                    s.sendto(m, ("127.0.0.1", collector.port))
            # over UDP every datagram of a refused peer is counted (no connection to refuse once)
            await until(lambda: collector.stats.sessions_refused == 2)
            await until(lambda: len(sink.records) == 1)
            assert collector.stats.sessions == 1 and sink.records[0][0].port == socks[0].getsockname()[1]
        finally:
            for s in socks:
                s.close()


async def test_records_stuck_in_the_send_buffer_of_a_broken_connection_are_counted_lost() -> None:
    """A collector that stops reading and then resets the connection: whatever was still in
    our own send buffer is counted in records_lost, never reported as sent."""
    loop = asyncio.get_running_loop()
    peers: list[asyncio.Transport] = []

    class Stalled(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()  # never reads: the kernel buffers fill, then ours
            peers.append(transport)

    server = await loop.create_server(Stalled, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    e = ExportingProcess(
        Address("127.0.0.1", port, "tcp"), tls=None, templates=[T4], queue_size=200_000, backoff_initial=30, backoff_max=30
    )
    await e.start()
    records = [agent_record(i) for i in range(1000)]
    for _ in range(100):
        e.submit(256, records)
    stream = e._stream
    assert stream is not None and stream.transport is not None
    await until(lambda: stream.transport is not None and stream.transport.get_write_buffer_size() > 0, 10, "our buffer to fill")
    await until(lambda: not stream.can_write.is_set(), 10, "flow control to pause the sender")
    server.close()  # no reconnect: the next attempt is 30 s away and would be refused
    peers[0].abort()  # RST
    await until(lambda: not e.stats.connected, 5, "the exporter to notice")
    s = e.stats
    assert s.records_lost > 0 and s.connects == 1
    assert s.records_sent + s.records_lost + s.queued == s.records_submitted == 100_000
    await e.close()
    assert e.stats.records_sent + e.stats.records_lost + e.stats.records_dropped == 100_000


async def test_udp_sequence_gaps_count_lost_records_and_withdrawals_are_ignored() -> None:
    sink = Sink()
    async with CollectingProcess(Address("127.0.0.1", 0, "udp"), tls=None, on_message=sink) as collector:
        s = ExportSession()
        s.add_template(T4)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", collector.port))
        try:
            sock.send(s.encode_templates(1)[0])
            sock.send(s.encode_records(256, [agent_record(i) for i in range(2)], 1)[0])
            s.encode_records(256, [agent_record(i) for i in range(3)], 1)  # "lost in the network"
            sock.send(s.encode_records(256, [agent_record(9)], 1)[0])
            sock.send(s.encode_withdrawal([256], 1)[0])  # never valid over UDP: ignored
            s.add_template(T4)
            sock.send(s.encode_records(256, [agent_record(10)], 1)[0])  # the template still holds
            await until(lambda: len(sink.records) == 4)
            assert collector.stats.lost_records == 3
            assert collector.stats.ignored_withdrawals == 1 and collector.stats.unknown_template_sets == 0
        finally:
            sock.close()


async def test_udp_over_ipv6_fits_the_ipv6_path_mtu() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    sink = Sink()
    async with CollectingProcess(Address("::1", 0, "udp"), tls=None, on_message=sink) as collector:
        e = ExportingProcess(Address("::1", collector.port, "udp"), tls=None, templates=[T6])
        await e.start()
        sent = [agent_record(i, 6) for i in range(60)]
        e.submit(257, sent)
        await e.flush()
        await until(lambda: len(sink.records) == 60)
        assert max(sink.lengths) <= 512 - 48  # IPv6 and UDP headers
        assert [r for _, _, r in sink.records] == sent and sink.records[0][0].host == "::1"
        await e.close()


async def test_a_failing_on_message_is_counted_and_the_session_goes_on() -> None:
    seen: list[int] = []

    def on_message(peer: Peer, msg: Any) -> None:
        seen.append(msg.record_count)
        if len(seen) == 2:
            raise RuntimeError("consumer bug")

    async with CollectingProcess(Address("127.0.0.1", 0, "tcp"), tls=None, on_message=on_message) as collector:
        e = ExportingProcess(Address("127.0.0.1", collector.port, "tcp"), tls=None, templates=[T4])
        await e.start()
        for i in range(3):
            e.submit(256, [agent_record(i)])
            await e.flush()
            await until(lambda: sum(seen) == i + 1)
        assert collector.stats.callback_errors == 1 and collector.stats.sessions == 1
        assert collector.stats.records == 3
        await e.close()
    assert collector.stats.sessions == 0


async def test_silent_tcp_sessions_are_closed_after_the_idle_timeout_by_the_clock() -> None:
    clock = FakeClock(100.0)
    sink = Sink()
    async with CollectingProcess(
        Address("127.0.0.1", 0, "tcp"), tls=None, on_message=sink, stream_idle_timeout=300, clock=clock
    ) as collector:
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", collector.port)
        e = ExportingProcess(Address("127.0.0.1", collector.port, "tcp"), tls=None, templates=[T4])
        await e.start()
        await until(lambda: collector.stats.sessions == 2)
        clock.now += 200
        e.submit(256, [agent_record(1)])  # the exporter speaks, the other peer does not
        await e.flush()
        await until(lambda: len(sink.records) == 1)
        clock.now += 100  # 300 s after the silent one connected, 100 s after the exporter spoke
        assert collector.expire() == 1
        assert await asyncio.wait_for(silent_r.read(), 5) == b""  # closed
        silent_w.close()
        assert collector.stats.sessions == 1 and collector.stats.sessions_expired == 1
        await e.close()
