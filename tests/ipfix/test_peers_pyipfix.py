"""Conformance with the PyPI ``ipfix`` package (python-ipfix 0.9.7, an independent
RFC 7011 implementation), both ways, over loopback TCP and UDP:

* what our exporting process sends (every element of the design's agent tables: IANA,
  RFC 5103 reverse and Antrea enterprise ones, IPv4 and IPv6) is captured off the socket
  and decoded by python-ipfix, field for field equal to what was submitted;
* what python-ipfix encodes (enterprise strings included) and sends to our collecting
  process is decoded field for field;
* the aggregator's records (every field it adds, PEN 56506 ids 120-135, IANA 403 and
  405) go through python-ipfix both ways as well.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime
import io
import ipaddress
from typing import Any

import ipfix.ie
import ipfix.message
import ipfix.reader
import ipfix.template
import ipfix.writer
import pytest
from ipfix_samples import agent_record, aggregator_record

from flowscope.ipfix import Address, Template, default_registry
from flowscope.ipfix.antrea import AGENT_IPV4_FIELDS, AGENT_IPV6_FIELDS, AGGREGATOR_IPV4_FIELDS, AGGREGATOR_IPV6_FIELDS
from flowscope.ipfix.collecting import CollectingProcess
from flowscope.ipfix.exporting import ExportingProcess

pytestmark = pytest.mark.peer

FIELDS = {4: AGENT_IPV4_FIELDS, 6: AGENT_IPV6_FIELDS}


@pytest.fixture(scope="module", autouse=True)
def python_ipfix_model() -> None:
    """Teach python-ipfix the IANA, RFC 5103 and Antrea elements (its model is global)."""
    ipfix.ie.use_iana_default()
    ipfix.ie.use_5103_default()
    reg = default_registry()
    for name in set(AGGREGATOR_IPV4_FIELDS) | set(AGGREGATOR_IPV6_FIELDS):
        ie = reg.get(name)
        if ie.pen == 56506:
            length = 65535 if ie.data_type.name == "string" else ie.data_type.default_length
            ipfix.ie.for_spec(f"{name}({ie.pen}/{ie.element_id})<{ie.data_type.name}>[{length}]")


def from_pyipfix(value: Any) -> Any:
    """python-ipfix values in our record forms."""
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value.compressed
    if isinstance(value, datetime.datetime):
        return calendar.timegm(value.utctimetuple())
    return value


def to_pyipfix(name: str, value: Any) -> Any:
    dt = default_registry().get(name).data_type.name
    if dt in ("ipv4Address", "ipv6Address"):
        return ipaddress.ip_address(value)
    if dt == "dateTimeSeconds":
        return datetime.datetime.fromtimestamp(value, datetime.timezone.utc).replace(tzinfo=None)
    return value


class Capture(asyncio.Protocol, asyncio.DatagramProtocol):
    """A dumb socket peer: keeps the bytes (TCP) or datagrams (UDP) it receives."""

    def __init__(self) -> None:
        self.stream = bytearray()
        self.datagrams: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.stream += data

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams.append(data)


async def until(pred: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
@pytest.mark.parametrize("family", [4, 6])
async def test_python_ipfix_decodes_what_we_export_field_for_field(protocol: str, family: int) -> None:
    loop = asyncio.get_running_loop()
    cap = Capture()
    if protocol == "tcp":
        server = await loop.create_server(lambda: cap, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    else:
        transport, _ = await loop.create_datagram_endpoint(lambda: cap, local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
    template = Template.build(300 + family, FIELDS[family])
    sent = [agent_record(i, family, unicode_names=(i % 7 == 0)) for i in range(120)]
    e = ExportingProcess(Address("127.0.0.1", port, protocol), tls=None, templates=[template], observation_domain_id=77)  # type: ignore[arg-type]
    await e.start()
    e.submit(template.template_id, sent)
    assert await e.flush(timeout=5)
    await e.close()

    decoded: list[dict[str, Any]] = []
    if protocol == "tcp":
        await until(lambda: len(cap.stream) >= e.stats.octets_sent)
        server.close()
        reader = ipfix.reader.from_stream(io.BytesIO(bytes(cap.stream)))
        decoded = list(reader.namedict_iterator())
    else:
        await until(lambda: sum(map(len, cap.datagrams)) >= e.stats.octets_sent)
        transport.close()
        buf = ipfix.message.MessageBuffer()
        for datagram in cap.datagrams:
            assert len(datagram) <= 512 - 28  # path MTU minus IPv4 and UDP headers
            buf.from_bytes(datagram)
            assert buf.odid == 77
            decoded += list(buf.namedict_iterator())

    assert len(decoded) == len(sent)
    for mine, theirs in zip(sent, decoded):
        got = {k: from_pyipfix(v) for k, v in theirs.items()}
        assert set(got) == set(mine), set(got) ^ set(mine)
        for name, value in mine.items():
            assert got[name] == value, (name, value, got[name])


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
@pytest.mark.parametrize("family", [4, 6])
async def test_we_decode_what_python_ipfix_exports(protocol: str, family: int) -> None:
    got: list[tuple[int, int, dict[str, Any]]] = []

    def on_message(peer: Any, msg: Any) -> None:
        got.extend((msg.observation_domain_id, t.template_id, r) for t, r in msg.data_records())

    records = [agent_record(i, family, unicode_names=(i % 5 == 0)) for i in range(200)]
    # python-ipfix picks the lengths from its own model: strings variable, the rest full size
    tmpl = ipfix.template.from_ielist(400, ipfix.ie.spec_list(list(FIELDS[family])))
    async with CollectingProcess(Address("127.0.0.1", 0, protocol), tls=None, on_message=on_message) as collector:  # type: ignore[arg-type]
        if protocol == "tcp":
            reader, writer = await asyncio.open_connection("127.0.0.1", collector.port)
            out = io.BytesIO()
            w = ipfix.writer.to_stream(out)
            w.set_domain(4242)
            w.add_template(tmpl)
            w.set_export_template(400)
            for i, r in enumerate(records):
                w.export_namedict({k: to_pyipfix(k, v) for k, v in r.items()})
                if i % 100 == 99:  # python-ipfix fails to roll over a record at the 65535-octet edge
                    w.flush()
            w.flush()
            writer.write(out.getvalue())
            await writer.drain()
            await until(lambda: len(got) == len(records))
            writer.close()
        else:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, remote_addr=("127.0.0.1", collector.port)
            )
            msg = ipfix.message.MessageBuffer()
            msg.mtu = 1400
            msg.begin_export(4242)
            msg.add_template(tmpl)
            transport.sendto(msg.to_bytes())  # the template in a message of its own
            msg.begin_export(4242)
            msg.export_ensure_set(400)
            for r in records:
                rec = {k: to_pyipfix(k, v) for k, v in r.items()}
                try:
                    msg.export_namedict(rec)
                except ipfix.message.EndOfMessage:
                    transport.sendto(msg.to_bytes())
                    msg.begin_export(4242)
                    msg.export_ensure_set(400)
                    msg.export_namedict(rec)
            transport.sendto(msg.to_bytes())
            await until(lambda: len(got) == len(records))
            transport.close()
        assert collector.stats.malformed == 0 and collector.stats.lost_records == 0
    assert [r for _, _, r in got] == records
    assert {(d, t) for d, t, _ in got} == {(4242, 400)}


@pytest.mark.parametrize("family", [4, 6])
async def test_aggregated_records_both_ways(family: int) -> None:
    fields = AGGREGATOR_IPV4_FIELDS if family == 4 else AGGREGATOR_IPV6_FIELDS
    sent = [aggregator_record(i, family) for i in range(50)]
    # ours -> python-ipfix
    loop = asyncio.get_running_loop()
    cap = Capture()
    server = await loop.create_server(lambda: cap, "127.0.0.1", 0)
    t = Template.build(500, fields)
    e = ExportingProcess(Address("127.0.0.1", server.sockets[0].getsockname()[1], "tcp"), tls=None, templates=[t])
    await e.start()
    e.submit(500, sent)
    assert await e.flush(timeout=5)
    await e.close()
    await until(lambda: len(cap.stream) >= e.stats.octets_sent)
    server.close()
    theirs = [{k: from_pyipfix(v) for k, v in r.items()} for r in ipfix.reader.from_stream(io.BytesIO(bytes(cap.stream))).namedict_iterator()]
    assert theirs == sent
    # python-ipfix -> ours
    got: list[dict[str, Any]] = []
    async with CollectingProcess(
        Address("127.0.0.1", 0, "tcp"), tls=None, on_message=lambda p, m: got.extend(r for _, r in m.data_records())
    ) as collector:
        out = io.BytesIO()
        w = ipfix.writer.to_stream(out)
        w.set_domain(5)
        w.add_template(ipfix.template.from_ielist(501, ipfix.ie.spec_list(list(fields))))
        w.set_export_template(501)
        for r in sent:
            w.export_namedict({k: to_pyipfix(k, v) for k, v in r.items()})
        w.flush()
        reader, writer = await asyncio.open_connection("127.0.0.1", collector.port)
        writer.write(out.getvalue())
        await writer.drain()
        await until(lambda: len(got) == len(sent))
        writer.close()
    assert got == sent
