"""What the aggregator's IPFIX sink puts on the wire, decoded by an independent peer: the
PyPI ``ipfix`` package, with the Antrea and aggregator elements declared from the design's
tables (not from flowscope's registry). The bytes are captured from a real TCP session."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress

import pytest
from agg_records import NODE_A, NODE_B, T0, destination_half, source_half
from design_ies import AGGREGATOR_SPECS, ANTREA_SPECS
from flowscope.aggregator.aggregation import AggregationProcess
from flowscope.aggregator.sinks import IPFIXSink
from flowscope.ipfix.address import Address

pytestmark = [pytest.mark.peer, pytest.mark.timeout(60)]

# The design's tables, written out independently of flowscope.ipfix's registry.
SPECS = ANTREA_SPECS + AGGREGATOR_SPECS


def pypi_decode(stream: bytes) -> list[dict]:
    import ipfix.ie
    import ipfix.message

    ipfix.ie.use_iana_default()
    ipfix.ie.use_5103_default()
    for spec in SPECS:
        ipfix.ie.for_spec(spec)
    buf = ipfix.message.MessageBuffer()
    out, pos = [], 0
    while pos + 4 <= len(stream):
        length = int.from_bytes(stream[pos + 2:pos + 4], "big")
        buf.from_bytes(stream[pos:pos + length])
        out.extend(dict(r) for r in buf.namedict_iterator())
        pos += length
    assert pos == len(stream), "a partial message on the wire"
    return out


def normalize(value):
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if isinstance(value, dt.datetime):
        return int(value.replace(tzinfo=dt.timezone.utc).timestamp())
    return value


async def test_ipfix_sink_output_decodes_in_an_independent_implementation():
    pytest.importorskip("ipfix.message")
    received = bytearray()
    got_data = asyncio.Event()

    async def on_client(reader, writer):
        while chunk := await reader.read(65536):
            received.extend(chunk)
            got_data.set()
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    agg = AggregationProcess(export_interval=60, correlation_timeout=30, inactive_timeout=90, max_flows=100)
    agg.ingest(source_half(sport=1, pkts=12, octets=1200, rpkts=3, roctets=300, destinationClusterIPv4="10.96.0.10",
                           destinationServicePort=80, destinationServicePortName="shop/backend:http"), NODE_A, 7, 0.0)
    agg.ingest(destination_half(sport=1, pkts=11, octets=1100, rpkts=3, roctets=300, end=T0 + 7), NODE_B, 8, 0.0)
    agg.ingest(source_half(src="fd00::1", dst="fd00::2", sport=2, pkts=5), "fd00:192::1", 9, 0.0)
    agg.ingest(destination_half(src="fd00::1", dst="fd00::2", sport=2, pkts=5), "fd00:192::2", 10, 0.0)
    exported = agg.tick(60.0)
    assert len(exported) == 2

    sink = IPFIXSink(Address("127.0.0.1", port, "tcp"), queue_size=100)
    await sink.start()
    try:
        await sink.write(exported)
        await sink.process.flush()
        await asyncio.wait_for(got_data.wait(), 10)
    finally:
        await sink.close()
        server.close()
        await server.wait_closed()

    decoded = pypi_decode(bytes(received))
    assert len(decoded) == 2
    for theirs, ours in zip(decoded, (e.record for e in exported)):
        assert {k: normalize(v) for k, v in theirs.items()} == ours
    v4 = decoded[0]
    assert (v4["sourcePodName"], v4["destinationPodName"], v4["destinationServicePortName"]) == (
        "frontend-1", "backend-1", "shop/backend:http")
    assert (v4["packetTotalCountFromSourceNode"], v4["packetTotalCountFromDestinationNode"]) == (12, 11)
    assert (str(v4["originalExporterIPv4Address"]), v4["originalObservationDomainId"]) == (NODE_A, 7)
    assert str(decoded[1]["originalExporterIPv6Address"]) == "fd00:192::1"
