"""The real aggregator exporting to go-ipfix's real collector, over TCP and UDP.

`flowscope aggregator` runs as a process; two agents (one over IPv4, one over IPv6) send
both halves of an IPv4 and an IPv6 inter-node flow and one to-external flow each, so the
aggregated records use all four of its templates (flow family x exporter family). The
aggregator exports through a recording proxy to go-ipfix's collector (Antrea's IPFIX
library): go-ipfix must learn all four templates whole and decode every record with
every field; every message is checked for the shape go-ipfix reads.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import pytest
from agg_records import T0, agent_record, destination_half, source_half
from goipfix_peer import GoIpfixCollector, RecordingProxy, check_readable_by_go_ipfix
from test_aggregator_daemon import read_until, run_cli

from flowscope.aggregator.sinks import TEMPLATE_IDS, template_names
from flowscope.ipfix import Template
from flowscope.ipfix.address import Address
from flowscope.ipfix.antrea import agent_fields
from flowscope.ipfix.exporting import ExportingProcess

pytestmark = [pytest.mark.peer, pytest.mark.timeout(90)]


async def until(pred, timeout=30.0, what="condition"):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
async def test_aggregator_to_go_ipfix_four_templates_every_field(tmp_path, protocol):
    with GoIpfixCollector(protocol) as collector:
        proxy = await RecordingProxy(protocol, collector.port).start()
        cfg = tmp_path / "aggregator.yaml"
        cfg.write_text(
            "aggregatorTransportProtocol: tcp\nlistenAddress: '::'\nlistenPort: 0\napiAddress: '127.0.0.1:0'\n"
            "flowExportInterval: 1h\n"  # everything goes out at the drain on SIGTERM, at once
            f"externalFlowCollectorAddr: '127.0.0.1:{proxy.port}:{protocol}'\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flowscope", "aggregator", "--config", str(cfg),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        agents = []
        try:
            m = await read_until(proc.stderr, r"collecting tcp on port (\d+), sinks .*, API (\d+)")
            port, api = int(m.group(1)), int(m.group(2))
            t = [Template.build(256, agent_fields(4)), Template.build(257, agent_fields(6))]
            a = ExportingProcess(Address("127.0.0.1", port, "tcp"), tls=None, templates=t, observation_domain_id=1)
            b = ExportingProcess(Address("::1", port, "tcp"), tls=None, templates=t, observation_domain_id=2)
            agents = [a, b]
            for agent in agents:
                await agent.start()
            v6 = dict(src="fd00:10:1::5", dst="fd00:10:2::7")
            a.submit(256, [source_half(sport=1, pkts=10, octets=1000, end=T0 + 4)])
            a.submit(257, [source_half(sport=2, **v6)])
            b.submit(256, [destination_half(sport=1, pkts=10, octets=1000, end=T0 + 5),
                           agent_record(flow_type=3, sport=3, dst="198.51.100.7", sourcePodName="p",
                                        proxySnatIPv4="192.168.10.2", proxySnatPort=61000)])
            b.submit(257, [destination_half(sport=2, **v6),
                           agent_record(flow_type=3, sport=4, src="fd00:10:2::9", dst="2001:db8::7", sourcePodName="q")])
            for agent in agents:
                assert await agent.flush(timeout=10)
            for _ in range(200):  # the aggregator has read all six records: then drain it
                rc, out, err = await run_cli("recordmetrics", "--server", f"http://127.0.0.1:{api}", "-o", "json")
                if rc == 0 and json.loads(out)["numRecordsReceived"] == 6:
                    break
                await asyncio.sleep(0.05)
        finally:
            for agent in agents:
                await agent.close()
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
        await until(lambda: len(proxy.records()) >= 4 and collector.count() >= len(proxy.records()),
                    what="go-ipfix to decode the aggregated records")
        await proxy.close()
        collector.stop()
    sent = proxy.records()
    assert {tid for tid, _ in sent} == set(TEMPLATE_IDS.values()), sent
    counts = check_readable_by_go_ipfix(proxy.messages())
    assert counts["records"] == len(sent)
    learned = collector.templates()
    for (flow6, exp6), tid in TEMPLATE_IDS.items():
        assert learned[tid] == list(template_names(flow6, exp6)), tid
    got = collector.data()
    assert len(got) == len(sent)
    for (tid, mine), (gtid, theirs) in zip(sent, got):
        assert gtid == tid and theirs == mine, {k: (mine.get(k), theirs.get(k)) for k in mine if mine[k] != theirs.get(k)}
    merged = next(r for _, r in sent if r.get("sourceIPv4Address") == "10.0.1.5" and r["sourceTransportPort"] == 1)
    assert (merged["sourcePodName"], merged["destinationPodName"]) == ("frontend-1", "backend-1")
    assert (merged["flowEndSecondsFromSourceNode"], merged["flowEndSecondsFromDestinationNode"]) == (T0 + 4, T0 + 5)
    assert (merged["throughputFromSourceNode"], merged["throughputFromDestinationNode"]) == (8000 // 4, 8000 // 5)
    ext = next(r for _, r in sent if r["sourceTransportPort"] == 3)
    assert (ext["proxySnatIPv4"], ext["proxySnatPort"], ext["originalExporterIPv6Address"]) == ("192.168.10.2", 61000, "::1")
