"""Mutual TLS between the exporting and collecting processes, over loopback, with
certificates from two CAs made in the test: an exporter whose certificate the
collector's CA signed gets through; one from another CA, one without a certificate and
a plain TCP client are refused during the handshake and counted; and an exporter refuses
a collector whose certificate it cannot verify. Records arrive only from the good one."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
from ipfix_samples import agent_record
from pki import CA

from flowscope.ipfix import Address, ExportSession, Template, UsageError
from flowscope.ipfix.antrea import AGENT_IPV4_FIELDS
from flowscope.ipfix.collecting import CollectingProcess
from flowscope.ipfix.exporting import ExportingProcess
from flowscope.ipfix.transport import Peer, TLSConfig

T4 = Template.build(256, AGENT_IPV4_FIELDS)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    good, other = CA(d, "good"), CA(d, "other")
    return {
        "good": good,
        "other": other,
        "server": good.issue("collector", server=True),
        "client": good.issue("agent-1", server=False),
        "stranger": other.issue("agent-x", server=False),
        "fake_server": other.issue("collector", server=True),
    }


async def until(pred: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.005)


class Sink(list):  # type: ignore[type-arg]
    def __call__(self, peer: Peer, msg: Any) -> None:
        self.extend((peer, r) for _, r in msg.data_records())


async def test_right_ca_gets_through_other_ca_and_no_certificate_are_refused(pki: dict[str, Any]) -> None:
    sink = Sink()
    server_tls = TLSConfig(pki["server"].cert, pki["server"].key, pki["good"].path)
    async with CollectingProcess(Address("127.0.0.1", 0, "tls"), tls=server_tls, on_message=sink) as collector:
        addr = Address("127.0.0.1", collector.port, "tls")

        # a certificate from another CA: refused in the handshake, nothing decoded
        stranger = ExportingProcess(
            addr, tls=TLSConfig(pki["stranger"].cert, pki["stranger"].key, pki["good"].path),
            templates=[T4], backoff_initial=0.05, backoff_max=0.05,
        )
        await stranger.start()
        stranger.submit(256, [agent_record(i) for i in range(10)])
        await until(lambda: collector.stats.tls_refused >= 1)

        # no client certificate at all
        ctx = ssl.create_default_context(cafile=pki["good"].path)
        s = ExportSession()
        s.add_template(T4)
        reader, writer = await asyncio.open_connection("127.0.0.1", collector.port, ssl=ctx, server_hostname="collector")
        refused_before = collector.stats.tls_refused
        try:
            writer.write(b"".join(s.encode_templates(1) + s.encode_records(256, [agent_record(50)], 1)))
            with pytest.raises((ssl.SSLError, ConnectionError)):
                data = await asyncio.wait_for(reader.read(), 5)
                if not data:  # closed without an alert: as good as refused
                    raise ConnectionResetError("closed")
        finally:
            writer.close()
        await until(lambda: collector.stats.tls_refused > refused_before)

        # plain TCP to the TLS port
        reader, writer = await asyncio.open_connection("127.0.0.1", collector.port)
        writer.write(b"".join(s.encode_templates(1)))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

        # the right CA: every record arrives
        good = ExportingProcess(
            addr, tls=TLSConfig(pki["client"].cert, pki["client"].key, pki["good"].path, server_name="collector"),
            templates=[T4],
        )
        await good.start()
        assert good.stats.connected
        sent = [agent_record(i, unicode_names=True) for i in range(100, 400)]
        good.submit(256, sent)
        assert await good.flush(timeout=5)
        await until(lambda: len(sink) == 300)
        assert [r for _, r in sink] == sent
        assert all(p.protocol == "tls" for p, _ in sink)
        assert collector.stats.malformed == 0
        assert not any(r["sourcePodName"].startswith("frontend") for _, r in sink)  # none of the stranger's
        # TLS 1.3 ends the client's handshake before the server checks its certificate: the
        # exporter waits for the server's verdict, so it never counts a record as sent
        assert stranger.stats.records_sent == 0 and stranger.stats.connects == 0
        assert stranger.stats.connect_failures >= 1 and not stranger.stats.connected
        await stranger.close()
        assert stranger.stats.records_dropped == 10  # still queued at close: counted
        await good.close()
    assert collector.stats.tls_refused >= 3


async def test_exporter_refuses_a_collector_signed_by_another_ca(pki: dict[str, Any]) -> None:
    fake = TLSConfig(pki["fake_server"].cert, pki["fake_server"].key, pki["other"].path)
    sink = Sink()
    async with CollectingProcess(Address("127.0.0.1", 0, "tls"), tls=fake, on_message=sink) as collector:
        e = ExportingProcess(
            Address("127.0.0.1", collector.port, "tls"),
            tls=TLSConfig(pki["client"].cert, pki["client"].key, pki["good"].path),
            templates=[T4], backoff_initial=5, backoff_max=5,
        )
        await e.start()
        assert not e.stats.connected and e.stats.connect_failures == 1
        e.submit(256, [agent_record(1)])
        await e.close()
        assert e.stats.records_dropped == 1 and sink == []


def test_unreadable_tls_files_name_the_file(tmp_path: Path, pki: dict[str, Any]) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(UsageError, match="nope.pem"):
        TLSConfig(pki["server"].cert, pki["server"].key, missing).server_context()
    with pytest.raises(UsageError, match="key must match"):
        TLSConfig(pki["server"].cert, pki["client"].key, pki["good"].path).client_context()


async def test_a_silent_client_is_dropped_after_the_handshake_timeout(pki: dict[str, Any]) -> None:
    server_tls = TLSConfig(pki["server"].cert, pki["server"].key, pki["good"].path)
    async with CollectingProcess(
        Address("127.0.0.1", 0, "tls"), tls=server_tls, on_message=lambda p, m: None, tls_handshake_timeout=0.2
    ) as collector:
        reader, writer = await asyncio.open_connection("127.0.0.1", collector.port)  # says nothing
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert collector.stats.tls_refused == 1 and collector.stats.sessions == 0


async def test_tls_export_keeps_flowing_over_many_submit_and_flush_rounds(pki: dict[str, Any]) -> None:
    """Regression: the TLS transport's flow control must resume the sender after every
    write, small or large (it once paused for good after the first one)."""
    sink = Sink()
    server_tls = TLSConfig(pki["server"].cert, pki["server"].key, pki["good"].path)
    async with CollectingProcess(Address("127.0.0.1", 0, "tls"), tls=server_tls, on_message=sink) as collector:
        e = ExportingProcess(
            Address("127.0.0.1", collector.port, "tls"),
            tls=TLSConfig(pki["client"].cert, pki["client"].key, pki["good"].path), templates=[T4],
        )
        await e.start()
        sent: list[dict[str, Any]] = []
        for n in (1, 1, 3, 5000, 1, 20000, 2):
            batch = [agent_record(len(sent) + i) for i in range(n)]
            sent += batch
            assert e.submit(256, batch)
            assert await e.flush(timeout=10)
            await until(lambda: len(sink) == len(sent))
        assert [r for _, r in sink] == sent
        assert e.stats.records_sent == len(sent) and e.stats.records_lost == 0
        await e.close()


async def test_messages_sent_in_the_same_write_as_the_clients_finished_are_all_decoded(pki: dict[str, Any]) -> None:
    """TLS 1.3 lets a client send application data right behind its Finished message, and
    agents do: their templates and first records go out as soon as the handshake is done.
    asyncio's TLS layer hands such data to the protocol as it completes the handshake,
    before ``start_tls`` returns: none of it may be lost (a lost first octet threw the
    stream out of sync: "version 0 where an IPFIX header should start", the session
    closed). The client here writes its Finished and three messages in one send."""
    sink = Sink()
    server_tls = TLSConfig(pki["server"].cert, pki["server"].key, pki["good"].path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(pki["client"].cert, pki["client"].key)
    ctx.load_verify_locations(pki["good"].path)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    s = ExportSession()
    s.add_template(T4)
    payload = b"".join(s.encode_templates(1) + s.encode_records(256, [agent_record(i) for i in range(30)], 1)
                       + s.encode_records(256, [agent_record(i) for i in range(30, 60)], 1))
    async with CollectingProcess(Address("127.0.0.1", 0, "tls"), tls=server_tls, on_message=sink) as collector:
        reader, writer = await asyncio.open_connection("127.0.0.1", collector.port)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="collector")
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    writer.write(outgoing.read())
                    await writer.drain()
                    data = await asyncio.wait_for(reader.read(65536), 5)
                    assert data, "the collector closed the connection during the handshake"
                    incoming.write(data)
            tls.write(payload)  # behind the client's Finished, still in the outgoing buffer
            writer.write(outgoing.read())  # one write: Finished and the messages together
            await writer.drain()
            await until(lambda: len(sink) == 60)
            assert collector.stats.malformed == 0 and collector.stats.records == 60
            assert [r["sourceTransportPort"] for _, r in sink] == [agent_record(i)["sourceTransportPort"] for i in range(60)]
        finally:
            writer.close()
