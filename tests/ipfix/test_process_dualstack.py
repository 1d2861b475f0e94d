"""A collecting process on ``::`` serves IPv4 and IPv6 exporters on one port (IPv4, IPv6
and dual-stack clusters alike), naming IPv4 peers by their IPv4 address, over TCP and UDP."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ipfix_samples import agent_record

from flowscope.ipfix import Address, Template
from flowscope.ipfix.antrea import AGENT_IPV4_FIELDS
from flowscope.ipfix.collecting import CollectingProcess
from flowscope.ipfix.exporting import ExportingProcess
from flowscope.ipfix.transport import Peer

T4 = Template.build(256, AGENT_IPV4_FIELDS)


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
async def test_one_listener_on_the_ipv6_wildcard_takes_both_families(protocol: str) -> None:
    got: list[tuple[Peer, dict[str, Any]]] = []
    collector = CollectingProcess(
        Address("::", 0, protocol), tls=None, on_message=lambda p, m: got.extend((p, r) for _, r in m.data_records())
    )
    await collector.start()
    try:
        exporters = [
            ExportingProcess(Address(host, collector.port, protocol), tls=None, templates=[T4], path_mtu=1500)
            for host in ("127.0.0.1", "::1")
        ]
        for n, exporter in enumerate(exporters):
            await exporter.start()
            assert exporter.submit(256, [agent_record(n * 10 + i) for i in range(10)])
            assert await exporter.flush(timeout=5)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(got) < 20 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for exporter in exporters:
            await exporter.close()
    finally:
        await collector.close()
    assert sorted({p.host for p, _ in got}) == ["127.0.0.1", "::1"]
    for host, first in (("127.0.0.1", 0), ("::1", 10)):
        assert [r for p, r in got if p.host == host] == [agent_record(first + i) for i in range(10)]
