"""Hostile IPFIX peers against a real aggregator process (issue 10, cases 1 to 5).

Each case is a bounded loopback run that asserts on numbers: the aggregator's resident
memory stays within a stated bound, a legitimate exporter on 127.0.0.1 keeps delivering
every record while a hostile peer on 127.0.0.2 does its worst, and /healthz answers
within a stated time throughout. The measured numbers are printed (HOSTILE lines).
"""

from __future__ import annotations

import asyncio
import socket
import struct

import tempfile
import urllib.request
from pathlib import Path

import pytest
from hostile_peers import (GOOD, HOSTILE, Aggregator, HealthProbe, agent_record, good_exporter, raise_fd_limit, report,
                           settled, until)
from pki import make_pki

from flowscope.ipfix import ExportSession, Template
from flowscope.ipfix.address import Address
from flowscope.ipfix.antrea import agent_fields
from flowscope.ipfix.exporting import ExportingProcess

HEADER = struct.Struct("!HHIII")
HEALTH_BOUND = 2.0  # seconds: /healthz answers within this on a loaded 2-core machine

pytestmark = pytest.mark.slow  # real aggregator processes, seconds each


def template_message(template_id: int, n_fields: int, *, first_ie: int = 1, domain: int = 0, enterprise: bool = False) -> bytes:
    """One template of ``n_fields`` variable-length fields whose element ids start at
    ``first_ie``: a layout never seen before for each new ``first_ie``."""
    body = bytearray(struct.pack("!HH", template_id, n_fields))
    for i in range(n_fields):
        ie = 1 + (first_ie + i) % 32000
        if enterprise:
            body += struct.pack("!HHI", 0x8000 | ie, 65535, 56506)
        else:
            body += struct.pack("!HH", ie, 65535)
    sets = struct.pack("!HH", 2, 4 + len(body)) + bytes(body)
    return HEADER.pack(10, HEADER.size + len(sets), 0, 0, domain) + sets


def header_only(domain: int, seq: int = 0) -> bytes:
    return HEADER.pack(10, HEADER.size, 0, seq, domain)


async def hostile_stream(port: int, payload: bytes, *, wait_close: float = 10.0) -> bool:
    """Connect from 127.0.0.2, send ``payload``; True if the aggregator closed the session."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(HOSTILE, 0))
    try:
        writer.write(payload)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), wait_close) == b""
        except (asyncio.TimeoutError, ConnectionError):
            return False
    finally:
        writer.close()


def hostile_udp(port: int, payloads: list[bytes], *, ports: int = 1) -> None:
    socks = []
    try:
        for _ in range(ports):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((HOSTILE, 0))
            socks.append(s)
        for i, p in enumerate(payloads):
            socks[i % ports].sendto(p, ("127.0.0.1", port))
    finally:
        for s in socks:
            s.close()


async def test_1_large_templates_are_refused_or_paced_and_leave_no_memory_behind():
    agg = Aggregator("tcp").start()
    try:
        base = agg.rss_mb()
        async with HealthProbe(agg) as probe:
            # 30 sessions, each a 16,000-field template: over maxTemplateFields, refused unbuilt
            closed = [await hostile_stream(agg.port, template_message(300, 16000, first_ie=k * 7)) for k in range(30)]
            # one session of 12 new 1,000-field layouts (within the limit): compiled at the budget's pace
            stream = b"".join(template_message(300 + k, 1000, first_ie=1000 * (k + 1)) for k in range(12))
            reader, writer = await asyncio.open_connection("127.0.0.1", agg.port, local_addr=(HOSTILE, 0))
            writer.write(stream)
            await writer.drain()
            exporter = await good_exporter(agg, 2000)
            await until(lambda: agg.received_from(GOOD) == 2000, 60, "the good exporter's 2000 records")
            writer.close()
            await exporter.close()
        peak = agg.rss_mb()
        coll = agg.metrics()["collectingProcess"]
        report("large-templates", rss_before_mb=base, rss_after_mb=peak, delivered=agg.received_from(GOOD),
               health_worst_s=probe.worst, refused_sessions=sum(closed), malformed=coll["malformed"],
               deferred=coll["messages_deferred"])
        assert all(closed) and coll["malformed"] >= 30
        assert agg.received_from(GOOD) == 2000
        assert probe.failures == 0 and probe.worst < HEALTH_BOUND
        assert peak - base < 60, f"RSS grew {peak - base:.0f} MB"
        assert agg.alive
    finally:
        agg.stop()


async def test_1_large_udp_templates_are_skipped_and_counted():
    agg = Aggregator("udp").start()
    try:
        base = agg.rss_mb()
        async with HealthProbe(agg) as probe:
            hostile_udp(agg.port, [template_message(300, 16000, first_ie=k * 11) for k in range(15)])
            await until(lambda: agg.metrics()["collectingProcess"]["templates_refused"] >= 15, 20, "15 refusals")
            exporter = await good_exporter(agg, 300, batch=10)
            await until(lambda: agg.received_from(GOOD) == 300, 30, "the good exporter's 300 records")
            await exporter.close()
        after = agg.rss_mb()
        report("large-udp-templates", rss_before_mb=base, rss_after_mb=after, delivered=agg.received_from(GOOD),
               health_worst_s=probe.worst)
        assert probe.worst < HEALTH_BOUND and after - base < 40
    finally:
        agg.stop()


async def test_2_unauthenticated_connections_take_no_session_of_an_agent():
    raise_fd_limit()
    pki = make_pki(Path(tempfile.mkdtemp(prefix="hostile-pki-")))
    agg = Aggregator("tls", pki=pki).start()
    conns = []
    try:
        base = agg.rss_mb()
        async with HealthProbe(agg) as probe:
            for _ in range(1030):  # plain TCP to the TLS port, never a handshake
                try:
                    conns.append(await asyncio.open_connection("127.0.0.1", agg.port, local_addr=(HOSTILE, 0)))
                except OSError:
                    pass
            peak = agg.rss_mb()
            exporter = await good_exporter(agg, 17, pki=pki)
            await until(lambda: agg.received_from(GOOD) == 17, 30, "the agent's 17 records over TLS")
            await exporter.close()
        coll = agg.metrics()["collectingProcess"]
        report("tls-unauthenticated", rss_before_mb=base, rss_peak_mb=peak, delivered=agg.received_from(GOOD),
               health_worst_s=probe.worst, refused_source=coll["sessions_refused_source"],
               pending=coll["handshakes_pending"])
        assert coll["sessions_refused_source"] >= 1030 - 64
        assert probe.worst < HEALTH_BOUND and peak - base < 60
    finally:
        for _, w in conns:
            w.close()
        agg.stop()


async def test_2_idle_tcp_sessions_are_capped_per_source_and_timed_out():
    raise_fd_limit()
    agg = Aggregator("tcp", extra={"collectingProcess": {"streamIdleTimeout": "3s"}}).start()
    conns = []
    try:
        async with HealthProbe(agg) as probe:
            for _ in range(1030):
                try:
                    conns.append(await asyncio.open_connection("127.0.0.1", agg.port, local_addr=(HOSTILE, 0)))
                except OSError:
                    pass
            exporter = await good_exporter(agg, 10)
            await until(lambda: agg.received_from(GOOD) == 10, 30, "the exporter's 10 records")
            # the idle ones are closed by the idle timeout
            await until(lambda: agg.metrics()["collectingProcess"]["sessions"] <= 1, 30, "idle sessions closed")
            await exporter.close()
        coll = agg.metrics()["collectingProcess"]
        report("tcp-idle", delivered=agg.received_from(GOOD), health_worst_s=probe.worst,
               refused_source=coll["sessions_refused_source"], expired=coll["sessions_expired"])
        assert probe.worst < HEALTH_BOUND and coll["sessions_expired"] >= 64
    finally:
        for _, w in conns:
            w.close()
        agg.stop()


async def test_3_udp_source_ports_cannot_lock_out_a_new_exporter():
    agg = Aggregator("udp").start()
    try:
        # one header-only datagram from each of 1,024 source ports of one host
        hostile_udp(agg.port, [header_only(0)] * 1024, ports=1024)
        await until(lambda: agg.metrics()["collectingProcess"]["sessions_refused_source"] >= 1024 - 64, 20,
                    "the per-source limit")
        await settled(agg)
        exporter = await good_exporter(agg, 200, batch=10)
        await until(lambda: agg.received_from(GOOD) == 200, 30, "the new exporter's 200 records")
        await exporter.close()
        coll = agg.metrics()["collectingProcess"]
        report("udp-ports", delivered=agg.received_from(GOOD), sessions=coll["sessions"],
               refused_source=coll["sessions_refused_source"], health_s=agg.healthz())
    finally:
        agg.stop()


async def test_4_many_domains_cost_a_legitimate_exporter_nothing():
    agg = Aggregator("udp").start()
    tcp = Aggregator("tcp").start()
    try:
        # UDP: one session that used 10,000 domains, each with a template
        hostile_udp(agg.port, [template_message(300, 2, domain=d) for d in range(10_000)])
        await settled(agg)  # over UDP a burst overflows the socket: the exporter's template must not be lost in it
        exporter = await good_exporter(agg, 1000, batch=10)
        await until(lambda: agg.received_from(GOOD) == 1000, 30, "the exporter's 1000 records")
        await exporter.close()
        coll = agg.metrics()["collectingProcess"]
        # TCP: 200,000 header-only messages, each in a new domain, in one session
        base = tcp.rss_mb()
        async with HealthProbe(tcp) as probe:
            _, writer = await asyncio.open_connection("127.0.0.1", tcp.port, local_addr=(HOSTILE, 0))
            for lo in range(0, 200_000, 10_000):
                writer.write(b"".join(header_only(d) for d in range(lo, lo + 10_000)))
                await writer.drain()
            await until(lambda: tcp.metrics()["messagesReceived"] >= 200_000, 60, "200k messages decoded")
            writer.close()
        after = tcp.rss_mb()
        tcoll = tcp.metrics()["collectingProcess"]
        report("domains", udp_delivered=agg.received_from(GOOD), udp_domains_evicted=coll["domains_evicted"],
               tcp_rss_before_mb=base, tcp_rss_after_mb=after, tcp_domains_evicted=tcoll["domains_evicted"],
               health_worst_s=probe.worst)
        assert coll["domains_evicted"] >= 10_000 - 1024
        assert tcoll["domains_evicted"] >= 200_000 - 1024 and after - base < 40
        assert probe.worst < HEALTH_BOUND
    finally:
        agg.stop()
        tcp.stop()


async def test_5_peer_grown_memory_is_bounded():
    agg = Aggregator("tcp", extra={"maxFlowsMB": 64}).start()
    try:
        base = agg.rss_mb()
        # 3,000 records each with a distinct 60 KB, non-ASCII Pod name: the string cache keeps none,
        # and the flows' byte budget (64 MB) refuses the flows past it
        big = ExportingProcess(Address("127.0.0.1", agg.port, "tcp"), tls=None,
                               templates=[Template.build(256, agent_fields(4))])
        await big.start()
        for lo in range(0, 3000, 50):
            assert big.submit(256, [agent_record(100_000 + i, pod="é" + f"{i:06d}" * 10_000) for i in range(lo, lo + 50)])
            await big.flush()
        await big.flush()
        await until(lambda: agg.metrics()["numRecordsReceived"] >= 3000, 60, "3000 big records")
        await big.close()
        after = agg.rss_mb()
        m = agg.metrics()
        flows = m["numFlows"]
        # sequence numbers that claim billions lost are not believed
        _, writer = await asyncio.open_connection("127.0.0.1", agg.port, local_addr=(HOSTILE, 0))
        writer.write(header_only(5, seq=0) + header_only(5, seq=3_000_000_000) + header_only(5, seq=100))
        await writer.drain()
        await until(lambda: agg.metrics()["collectingProcess"]["sequence_jumps"] >= 2, 10, "sequence jumps")
        writer.close()
        lost = agg.metrics()["collectingProcess"]["lost_records"]
        report("peer-memory", rss_before_mb=base, rss_after_mb=after, flows_kept=flows,
               dropped_flow_bytes=m["aggregation"]["dropped_flow_bytes"], lost_records=lost)
        assert m["aggregation"]["dropped_flow_bytes"] > 0 and flows < 3000
        assert after - base < 64 + 60, f"RSS grew {after - base:.0f} MB with a 64 MB flow budget"
        assert lost < 1000
    finally:
        agg.stop()


@pytest.mark.parametrize("n_addresses", [600])
async def test_5_per_exporter_series_are_bounded(n_addresses):
    agg = Aggregator("udp").start()
    try:
        t = Template.build(256, agent_fields(4))
        for k in range(n_addresses):
            sess = ExportSession(0)
            sess.add_template(t)
            msgs = sess.encode_templates(0) + sess.encode_records(256, [agent_record(k)], 0)
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((f"127.3.{k // 250}.{k % 250 + 1}", 0))
            for m in msgs:
                s.sendto(m, ("127.0.0.1", agg.port))
            s.close()
        await until(lambda: agg.metrics()["numRecordsReceived"] >= n_addresses * 0.95, 30, "records from 600 hosts")
        by = agg.metrics()["receivedByExporter"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{agg.metrics_port}/metrics", timeout=10).read()
        report("exporter-series", series=len(by), metrics_bytes=len(text))
        assert len(by) <= 513 and by.get("other", 0) > 0
    finally:
        agg.stop()
