"""The collecting process's bounds on real loopback sockets: TLS sessions counted only after
the handshake, per-source limits for streams and UDP, and the UDP session that holds no
template giving way to a new exporter."""

from __future__ import annotations

import asyncio
import socket
import struct

from pki import make_pki

from flowscope.ipfix import Address
from flowscope.ipfix.collecting import CollectingProcess
from flowscope.ipfix.transport import TLSConfig


async def until(pred, timeout=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.01)


async def test_tls_connections_are_sessions_only_after_the_handshake(tmp_path):
    pki = make_pki(tmp_path)
    tls = TLSConfig(pki["server_cert"], pki["server_key"], pki["ca"])
    cp = CollectingProcess(Address("127.0.0.1", 0, "tls"), tls=tls, on_message=lambda p, m: None,
                           max_sessions=2, max_sessions_per_source=5, max_pending_handshakes=3,
                           tls_handshake_timeout=1.0)
    await cp.start()
    conns = []
    try:
        for _ in range(8):  # plain TCP: never a handshake
            conns.append(await asyncio.open_connection("127.0.0.1", cp.port))
        await until(lambda: cp.stats.handshakes_refused + cp.stats.sessions_refused_source >= 5)
        assert cp.stats.sessions == 0 and cp.stats.handshakes_pending == 3
        await until(lambda: cp.stats.handshakes_timed_out == 3, 10)
        assert cp.stats.handshakes_pending == 0 and cp.stats.sessions == 0 and not cp._per_source
    finally:
        for _, w in conns:
            w.close()
        await cp.close()


async def test_tcp_sessions_per_source_address():
    cp = CollectingProcess(Address("127.0.0.1", 0, "tcp"), tls=None, on_message=lambda p, m: None,
                           max_sessions=100, max_sessions_per_source=3)
    await cp.start()
    conns = []
    try:
        for host in ["127.0.0.2"] * 5 + ["127.0.0.1"]:
            conns.append(await asyncio.open_connection("127.0.0.1", cp.port, local_addr=(host, 0)))
        await until(lambda: cp.stats.sessions == 4 and cp.stats.sessions_refused_source == 2)
    finally:
        for _, w in conns:
            w.close()
        await cp.close()


async def test_udp_a_session_without_templates_gives_way_when_all_are_taken():
    cp = CollectingProcess(Address("127.0.0.1", 0, "udp"), tls=None, on_message=lambda p, m: None,
                           max_sessions=4)
    await cp.start()
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(6)]
    try:
        header = struct.pack("!HHIII", 10, 16, 0, 0, 0)
        for i, s in enumerate(socks):
            s.sendto(header, ("127.0.0.1", cp.port))
            await until(lambda: cp.stats.messages == i + 1)
        assert cp.stats.sessions == 4 and cp.stats.sessions_evicted == 2 and cp.stats.sessions_refused == 0
    finally:
        for s in socks:
            s.close()
        await cp.close()


async def test_messages_waiting_for_their_turn_are_decoded_when_the_session_ends(monkeypatch):
    """A stream decodes a turn's worth of messages at a time; when the session ends (here:
    the collector shuts down) with messages read but not yet decoded, they are decoded
    then (only what the compile budget refuses may be abandoned, and is counted)."""
    from flowscope.ipfix import ExportSession, Template
    from flowscope.ipfix import collecting as process_module

    monkeypatch.setattr(process_module, "MESSAGES_PER_TURN", 1)
    import time

    got = []

    def slow(peer, msg):  # a consumer that takes a millisecond a message
        time.sleep(0.001)
        got.extend(r for _, r in msg.data_records())

    cp = CollectingProcess(Address("127.0.0.1", 0, "tcp"), tls=None, on_message=slow)
    await cp.start()
    t = Template.build(256, ["sourceTransportPort"])
    ex = ExportSession(0, max_message_size=40)  # one record a message: 1,000 messages
    ex.add_template(t)
    data = b"".join(ex.encode_templates(0) + ex.encode_records(256, [{"sourceTransportPort": i % 65536}
                                                                      for i in range(1000)], 0))
    _, writer = await asyncio.open_connection("127.0.0.1", cp.port)
    writer.write(data)
    await writer.drain()
    await until(lambda: len(got) > 0)
    stream = next(iter(cp._streams))
    assert stream.backlog  # read, waiting for its turn
    await cp.close()
    writer.close()
    assert len(got) == 1000 and cp.stats.messages_abandoned == 0
