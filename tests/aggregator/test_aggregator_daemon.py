"""``flowscope aggregator --config`` as a real process: it collects over TCP, answers the CLI
queries through its API, and on SIGTERM exports what changed to its flow log and exits 0."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys

import pytest
from agg_records import agent_record, destination_half, source_half

from flowscope.ipfix import Template
from flowscope.ipfix.address import Address
from flowscope.ipfix.antrea import agent_fields
from flowscope.ipfix.exporting import ExportingProcess

pytestmark = [pytest.mark.timeout(60)]


async def read_until(stream, pattern, timeout=20.0):
    seen = []
    async def scan():
        while True:
            line = await stream.readline()
            if not line:
                raise AssertionError("the aggregator exited:\n" + "".join(seen))
            text = line.decode(errors="replace")
            seen.append(text)
            if m := re.search(pattern, text):
                return m
    return await asyncio.wait_for(scan(), timeout)


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "flowscope", "aggregator", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def test_daemon_collects_answers_queries_and_drains_on_sigterm(tmp_path):
    log = tmp_path / "flows.jsonl"
    cfg = tmp_path / "aggregator.yaml"
    cfg.write_text(
        "aggregatorTransportProtocol: tcp\n"
        "listenAddress: 127.0.0.1\n"
        "listenPort: 0\n"
        'apiAddress: "127.0.0.1:0"\n'
        'metricsAddress: ""\n'
        "flowExportInterval: 1h\n"  # nothing is exported before SIGTERM but the denied flow
        "sinks:\n"
        f"  flowLog: {{enabled: true, path: {log}, maxSizeMB: 1, maxBackups: 1}}\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowscope", "aggregator", "--config", str(cfg),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    agent = None
    try:
        m = await read_until(proc.stderr, r"collecting tcp on port (\d+), sinks flowLog, API (\d+)")
        port, api = int(m.group(1)), int(m.group(2))
        agent = ExportingProcess(Address("127.0.0.1", port, "tcp"), tls=None,
                                 templates=[Template.build(256, agent_fields(4))], observation_domain_id=3)
        await agent.start()
        assert agent.submit(256, [
            source_half(sport=1, pkts=10, octets=1000), destination_half(sport=1, pkts=9, octets=900),
            agent_record(flow_type=3, sport=2, dst="198.51.100.7", pkts=4, octets=240, sourcePodName="p"),
            source_half(sport=3, egressNetworkPolicyRuleAction=3, pkts=1, octets=60, rpkts=0, roctets=0),
        ])
        await agent.flush()
        server = f"http://127.0.0.1:{api}"
        for _ in range(100):
            rc, out, err = await run_cli("recordmetrics", "--server", server, "-o", "json")
            assert rc == 0, err
            if json.loads(out)["numRecordsReceived"] == 4:
                break
            await asyncio.sleep(0.1)
        metrics = json.loads(out)
        assert (metrics["numRecordsReceived"], metrics["numFlows"], metrics["numConnToCollector"]) == (4, 3, 1)

        rc, out, err = await run_cli("flowrecords", "--server", server, "--srcport", "1", "-o", "json")
        assert rc == 0, err
        (rec,) = json.loads(out)
        assert (rec["correlation"], rec["packetTotalCountFromSourceNode"], rec["packetTotalCountFromDestinationNode"]) == (
            "correlated", 10, 9)
        rc, out, err = await run_cli("flowrecords", "--server", server, "--dstip", "not-an-ip")
        assert rc == 1 and "dstip: 'not-an-ip' is not an IPv4 or IPv6 address" in err

        # the denied flow reaches the log within a tick, long before the 1h interval
        for _ in range(50):
            if log.exists() and log.read_text().strip():
                break
            await asyncio.sleep(0.1)
        (denied,) = [json.loads(x) for x in log.read_text().splitlines()]
        assert (denied["sourceTransportPort"], denied["correlation"]) == (3, "denied")

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        final = {r["sourceTransportPort"]: r for r in lines[1:]}
        assert set(final) == {1, 2}  # the denied flow did not change: not exported again
        assert all(r["final"] for r in final.values())
        assert (final[1]["octetDeltaCountFromSourceNode"], final[1]["octetDeltaCountFromDestinationNode"]) == (1000, 900)
        assert final[2]["correlation"] == "external" and final[2]["octetTotalCount"] == 240
    finally:
        if agent is not None:
            await agent.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
