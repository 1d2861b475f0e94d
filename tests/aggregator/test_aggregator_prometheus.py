"""The aggregator's /metrics against the real Prometheus tools: promtool's linter, and a
Prometheus server on loopback that scrapes the running aggregator and answers queries."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import urllib.parse
import urllib.request

import pytest
from agg_records import NODE_A, NODE_B, agent_record, destination_half, source_half
from conftest import require_tool

from flowscope.aggregator.config import parse_config
from flowscope.aggregator.service import FlowAggregator
from fakes import ManualClock

pytestmark = [pytest.mark.timeout(90)]


async def started_aggregator() -> FlowAggregator:
    agg = FlowAggregator(parse_config({"aggregatorTransportProtocol": "tcp", "metricsAddress": "", "apiAddress": "127.0.0.1:0",
                                       "maxFlows": 3}), sinks=[], clock=ManualClock(100.0))
    await agg.start(collect=False, api=True, ticker=False)
    agg.ingest_records([source_half(sport=1), source_half(sport=2), agent_record(flow_type=3, sport=3,
                                                                                 sourcePodName="p")], NODE_A, 1)
    agg.ingest_records([destination_half(sport=1), destination_half(sport=4)], NODE_B, 2)  # sport 4: over the cap
    return agg


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


async def test_promtool_finds_nothing_to_lint(tmp_path):
    require_tool("promtool")
    agg = await started_aggregator()
    try:
        text = await asyncio.to_thread(fetch, f"http://127.0.0.1:{agg.api_port}/metrics")
    finally:
        await agg.close()
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert b"flowscope_aggregator_records_dropped_total{reason=\"flow_cap\"} 1.0" in text


@pytest.mark.slow
async def test_prometheus_scrapes_the_aggregator(tmp_path):
    require_tool("prometheus")
    agg = await started_aggregator()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        prom_port = s.getsockname()[1]
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: flowscope-aggregator\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{agg.api_port}']}}]\n"
    )
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    try:
        def query(expr: str):
            url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            try:
                doc = json.loads(fetch(url))
            except OSError:
                return None
            return doc["data"]["result"] if doc.get("status") == "success" else None

        result = None
        for _ in range(150):
            result = await asyncio.to_thread(query, "flowscope_aggregator_records_received_total")
            if result:
                break
            await asyncio.sleep(0.2)
        assert result, (tmp_path / "prometheus.log").read_text()[-2000:]
        per_exporter = {r["metric"]["exporter"]: float(r["value"][1]) for r in result}
        assert per_exporter == {NODE_A: 3.0, NODE_B: 2.0}
        (flows,) = await asyncio.to_thread(query, "flowscope_aggregator_flows")
        assert float(flows["value"][1]) == 3.0
        corr = await asyncio.to_thread(query, 'flowscope_aggregator_flows_correlation_total{outcome="correlated"}')
        assert float(corr[0]["value"][1]) == 1.0
        dropped = await asyncio.to_thread(query, 'flowscope_aggregator_records_dropped_total{reason="flow_cap"}')
        assert float(dropped[0]["value"][1]) == 1.0
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        await agg.close()
