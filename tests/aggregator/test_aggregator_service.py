"""The aggregator service fed by two simulated agents through real IPFIX messages (codec level),
its sinks, its HTTP API over a real loopback socket, its metrics and its CLI."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from dataclasses import dataclass

import pytest
from agg_records import NODE_A, NODE_B, T0, agent_record, destination_half, source_half

from flowscope.aggregator.config import parse_config
from flowscope.aggregator.service import FlowAggregator, exporter_address
from flowscope.aggregator.sinks import TEMPLATE_IDS, template_names
from flowscope.ipfix import Decoder, ExportSession, Template
from flowscope.ipfix.antrea import agent_fields
from fakes import ListSink, ManualClock


@dataclass
class Peer:
    host: str
    port: int = 40000
    protocol: str = "tcp"


class Agent:
    """A simulated agent: its own export session; messages go through the aggregator's decoder."""

    def __init__(self, host: str, domain: int) -> None:
        self.peer = Peer(host)
        self.session = ExportSession(domain)
        self.session.add_template(Template.build(256, agent_fields(4)))
        self.session.add_template(Template.build(257, agent_fields(6)))
        self.decoder = Decoder()  # the aggregator's per-session decoder
        for msg in self.session.encode_templates(export_time=T0):
            self.decoder.decode(msg)

    def send(self, agg: FlowAggregator, records: list[dict]) -> int:
        n = 0
        for fam, tid in ((4, 256), (6, 257)):
            batch = [r for r in records if ("sourceIPv6Address" in r) == (fam == 6)]
            if not batch:
                continue
            for data in self.session.encode_records(tid, batch, export_time=T0):
                msg = self.decoder.decode(data)
                n += msg.record_count
                agg.on_message(self.peer, msg)
        return n


def make_service(clock, **cfg) -> tuple[FlowAggregator, ListSink]:
    raw = {"aggregatorTransportProtocol": "tcp", "metricsAddress": "", "apiAddress": "127.0.0.1:0", "flowExportInterval": "60s",
           "correlationTimeout": "30s", "inactiveFlowTimeout": "90s"}
    raw.update(cfg)
    sink = ListSink()
    return FlowAggregator(parse_config(raw), sinks=[(sink, 1000)], clock=clock), sink


async def test_two_agents_through_the_codec_to_one_merged_record_and_back_over_ipfix():
    clock = ManualClock(1000.0)
    agg, sink = make_service(clock)
    await agg.start(collect=False, api=False, ticker=False)
    a, b = Agent(NODE_A, 11), Agent(NODE_B, 22)
    # inter-node (both orders), intra-node on B, to-external from A, IPv6 inter-node
    a.send(agg, [source_half(sport=1, pkts=5, octets=500), source_half(sport=3, flow_type=3, dst="8.8.8.8",
                                                                        dport=53, proto=17)])
    b.send(agg, [destination_half(sport=2, pkts=6, octets=600),
                 destination_half(sport=1, pkts=4, octets=400),
                 agent_record(flow_type=1, sport=4, src="10.0.2.3", sourcePodName="x", destinationPodName="y",
                              sourceNodeName="node-b", destinationNodeName="node-b"),
                 destination_half(src="fd00::1", dst="fd00::2")])
    a.send(agg, [source_half(sport=2, pkts=7, octets=700), source_half(src="fd00::1", dst="fd00::2", pkts=3)])
    assert len(agg.process) == 5
    clock.t += 60
    agg.tick()
    await agg.sinks[0].flush(2.0)
    by_port = {(e.record["sourceTransportPort"], "sourceIPv6Address" in e.record): e for e in sink.got}
    assert len(sink.got) == 5
    e1 = by_port[(1, False)]
    assert e1.correlation == "correlated"
    assert (e1.record["packetTotalCountFromSourceNode"], e1.record["packetTotalCountFromDestinationNode"]) == (5, 4)
    assert (e1.record["originalExporterIPv4Address"], e1.record["originalObservationDomainId"]) == (NODE_A, 11)
    e2 = by_port[(2, False)]
    assert (e2.record["sourcePodName"], e2.record["destinationPodName"]) == ("frontend-1", "backend-1")
    assert (e2.record["octetTotalCountFromSourceNode"], e2.record["octetTotalCountFromDestinationNode"]) == (700, 600)
    assert by_port[(3, False)].correlation == "external"
    assert by_port[(4, False)].correlation == "intra-node"
    assert by_port[(4, False)].record["originalObservationDomainId"] == 22
    e6 = by_port[(40000, True)]
    assert e6.correlation == "correlated" and e6.record["destinationIPv6Address"] == "fd00::2"
    assert (e6.record["packetTotalCountFromSourceNode"], e6.record["packetTotalCountFromDestinationNode"]) == (3, 10)

    # The aggregated records encode with the IPFIX sink's templates and decode back equal.
    out = ExportSession(0)
    for (v6, e6_), tid in TEMPLATE_IDS.items():
        out.add_template(Template.build(tid, template_names(v6, e6_)))
    dec = Decoder()
    for data in out.encode_templates(export_time=T0):
        dec.decode(data)
    for e in sink.got:
        tid = TEMPLATE_IDS[("sourceIPv6Address" in e.record, False)]
        (data,) = out.encode_records(tid, [e.record], export_time=T0)
        ((_, back),) = list(dec.decode(data).data_records())
        assert back == e.record
    assert agg.received_by_exporter == {NODE_A: 4, NODE_B: 4}
    await agg.close()


async def test_close_exports_unexported_changes():
    clock = ManualClock(1000.0)
    agg, sink = make_service(clock)
    await agg.start(collect=False, api=False, ticker=False)
    agg.ingest_records([agent_record(flow_type=3, sourcePodName="p")], NODE_A)
    await agg.close()
    assert len(sink.got) == 1 and sink.got[0].final


async def test_http_api_and_metrics_and_cli(capsys):
    clock = ManualClock(1000.0)
    agg, _ = make_service(clock)
    await agg.start(collect=False, api=True, ticker=False)
    try:
        agg.ingest_records([source_half(sport=1), source_half(sport=2, proto=17)], NODE_A, 3)
        agg.ingest_records([destination_half(sport=1)], NODE_B, 4)
        base = f"http://127.0.0.1:{agg.api_port}"

        def get(path):
            with urllib.request.urlopen(base + path, timeout=5) as r:
                return r.status, r.headers.get("Content-Type"), r.read()

        status, ctype, body = await asyncio.to_thread(get, "/flowrecords?proto=udp")
        assert status == 200 and ctype == "application/json"
        recs = json.loads(body)["flowRecords"]
        assert [(r["sourceTransportPort"], r["protocolIdentifier"]) for r in recs] == [(2, 17)]
        status, _, body = await asyncio.to_thread(get, "/flowrecords?srcport=1&dstip=10.0.2.7")
        (r,) = json.loads(body)["flowRecords"]
        assert (r["correlation"], r["sourcePodName"], r["destinationPodName"]) == ("correlated", "frontend-1",
                                                                                   "backend-1")
        status, _, body = await asyncio.to_thread(get, "/recordmetrics")
        m = json.loads(body)
        assert (m["numRecordsReceived"], m["numFlows"], m["numRecordsExported"]) == (3, 2, 0)
        assert m["receivedByExporter"] == {NODE_A: 2, NODE_B: 1}
        assert m["numConnToCollector"] == 2

        def get_error(path):
            try:
                urllib.request.urlopen(base + path, timeout=5)
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())["error"]

        assert await asyncio.to_thread(get_error, "/flowrecords?srcport=99999") == (
            400, "srcport: '99999' must be a port number from 0 to 65535")
        assert (await asyncio.to_thread(get_error, "/flowrecords?bogus=1"))[0] == 400
        assert (await asyncio.to_thread(get_error, "/nothing"))[0] == 404

        status, ctype, body = await asyncio.to_thread(get, "/metrics")
        text = body.decode()
        assert ctype.startswith("text/plain")
        assert f'flowscope_aggregator_records_received_total{{exporter="{NODE_A}"}} 2.0' in text
        assert "flowscope_aggregator_flows 2.0" in text
        assert 'flowscope_aggregator_flows_correlation_total{outcome="correlated"} 1.0' in text
        assert 'flowscope_aggregator_records_dropped_total{reason="flow_cap"} 0.0' in text
        assert "flowscope_aggregator_exporters_connected 2.0" in text

        # the CLI, against the same API
        from flowscope.cli import main

        rc = await asyncio.to_thread(main, ["aggregator", "flowrecords", "--server", base, "--srcport", "1",
                                            "-o", "json"])
        assert rc == 0
        printed = json.loads(capsys.readouterr().out)
        assert [p["sourceTransportPort"] for p in printed] == [1]
        rc = await asyncio.to_thread(main, ["aggregator", "flowrecords", "--server", base])
        table = capsys.readouterr().out.splitlines()
        assert rc == 0 and table[0].split()[:3] == ["SRC", "DST", "PROTO"] and len(table) == 3
        assert any("shop/frontend-1" in ln and "shop/backend-1" in ln and "correlated" in ln for ln in table)
        rc = await asyncio.to_thread(main, ["aggregator", "recordmetrics", "--server", base, "-o", "yaml"])
        import yaml

        assert rc == 0 and yaml.safe_load(capsys.readouterr().out)["numFlows"] == 2
        with pytest.raises(SystemExit, match="proto: 'bogus' is not a protocol"):
            await asyncio.to_thread(main, ["aggregator", "flowrecords", "--server", base, "--proto", "bogus"])
    finally:
        await agg.close()


def test_cli_refuses_a_bad_config_naming_the_key(tmp_path, capsys):
    from flowscope.cli import main

    path = tmp_path / "a.yaml"
    path.write_text("flowExportInterval: 100ms\n")
    assert main(["aggregator", "--config", str(path)]) == 2
    assert "flowExportInterval: '100ms' is below the 1s minimum" in capsys.readouterr().err


async def test_missing_tls_files_name_the_key(tmp_path):
    cfg = parse_config({"tls": {"caFile": str(tmp_path / "nope.crt")}, "metricsAddress": "", "apiAddress": ""})
    agg = FlowAggregator(cfg, sinks=[])
    from flowscope.aggregator.config import ConfigError

    with pytest.raises(ConfigError, match=r"tls.caFile: cannot read .*nope.crt"):
        await agg.start()
    assert agg.collecting is None and agg.api_server is None and agg.metrics_server is None


def test_exporter_address_unmaps_ipv4_in_ipv6():
    assert exporter_address("::ffff:192.168.10.1") == "192.168.10.1"
    assert exporter_address("fd00::0001") == "fd00::1"
    assert exporter_address("10.0.0.1") == "10.0.0.1"


def test_an_odd_record_costs_only_itself():
    clock = ManualClock(1000.0)
    agg, _ = make_service(clock)

    class Msg:
        observation_domain_id = 1

        def data_records(self):
            bad = agent_record(flow_type=3, sport=1, sourcePodName="p")
            bad["flowEndSeconds"] = "tomorrow"  # a type no registry would decode
            yield None, bad
            yield None, agent_record(flow_type=3, sport=2, sourcePodName="p")

    agg.on_message(Peer(NODE_A), Msg())
    assert agg.received_by_exporter == {NODE_A: 2}
    assert agg.process.stats.dropped_invalid == 1 and agg.process.stats.flows_created == 1
    assert [f.key[2] for f in agg.process.flows.values()] == [2]


async def test_flowrecords_are_capped_and_say_so():
    from aiohttp.test_utils import TestClient, TestServer

    from flowscope.aggregator.api import ApiServer

    clock = ManualClock(1000.0)
    agg, _ = make_service(clock)
    agg.ingest_records([agent_record(flow_type=3, sport=p, sourcePodName="p") for p in range(1, 6)], NODE_A)
    async with TestClient(TestServer(ApiServer(agg).app())) as client:
        doc = await (await client.get("/flowrecords?limit=3")).json()
        assert len(doc["flowRecords"]) == 3 and doc["truncated"] is True
        doc = await (await client.get("/flowrecords?limit=5")).json()
        assert len(doc["flowRecords"]) == 5 and doc["truncated"] is False
        assert (await client.post("/flowrecords")).status == 405
        bad = await client.get("/flowrecords?limit=0")
        assert bad.status == 400 and "limit" in (await bad.json())["error"]


def test_cli_check(tmp_path, capsys):
    from flowscope.cli import main

    path = tmp_path / "a.yaml"
    path.write_text("aggregatorTransportProtocol: tcp\nsinks: {flowLog: {enabled: true, path: /tmp/x.jsonl}}\n")
    assert main(["aggregator", "--config", str(path), "--check"]) == 0
    assert "OK; collecting tcp on [::]:4739, sinks: flowLog" in capsys.readouterr().out
    path.write_text(f"tls: {{caFile: {tmp_path}/ca.crt}}\n")
    assert main(["aggregator", "--config", str(path), "--check"]) == 2
    assert "tls.caFile: cannot read" in capsys.readouterr().err
    path.write_text("aggregatorTransportProtocol: tcp\nsinks: {clickhouse: {enabled: true}}\n")
    rc = main(["aggregator", "--config", str(path), "--check"])
    capsys.readouterr()
    assert rc == 0  # the sink is the aggregator's own (aggregator/clickhouse_sink.py)


async def test_a_large_periodic_export_is_paced_to_the_sinks_not_dropped():
    """20k flows due at once, sink queues of 3000: the scan waits for room between slices."""
    class SlowishSink(ListSink):
        name = "slowish"

        async def write(self, batch):
            await asyncio.sleep(0.002)  # ~500k records/s at most, but in small steps
            self.got.extend(batch)

    clock = ManualClock(1000.0)
    fast, slow = ListSink(), SlowishSink()
    agg = FlowAggregator(parse_config({"aggregatorTransportProtocol": "tcp", "metricsAddress": "", "apiAddress": "",
                                       "flowExportInterval": "60s"}),
                         sinks=[(fast, 3000), (slow, 3000)], clock=clock, tick_interval=0.01)
    await agg.start(collect=False, api=False, ticker=True)
    try:
        agg.ingest_records([agent_record(flow_type=3, sport=p % 60000, src=f"10.1.{p // 60000}.{p % 200}",
                                         sourcePodName="p") for p in range(20_000)], NODE_A)
        assert len(agg.process) == 20_000
        clock.t += 60
        for _ in range(500):
            await asyncio.sleep(0.02)
            if len(slow.got) == 20_000 and not agg.process.scan_pending:
                break
        assert len(fast.got) == len(slow.got) == 20_000
        assert all(s.dropped == 0 for s in agg.sinks)
    finally:
        await agg.close()


def test_clickhouse_sink_is_built_from_its_config(monkeypatch):
    """build_sinks hands sinks.clickhouse to aggregator/clickhouse_sink.py's make_sink."""
    from flowscope.aggregator import clickhouse_sink
    from flowscope.aggregator.service import build_sinks

    made = []

    def make_sink(cfg):
        made.append(cfg)
        sink = ListSink()
        sink.name = "clickhouse"
        return sink

    monkeypatch.setattr(clickhouse_sink, "make_sink", make_sink)
    cfg = parse_config({"sinks": {"clickhouse": {"enabled": True, "table": "f2", "commitInterval": "2s",
                                                 "queueSize": 77}}})
    ((sink, size),) = build_sinks(cfg)
    assert (sink.name, size) == ("clickhouse", 77)
    assert (made[0].table, made[0].commit_interval, made[0].address) == ("f2", 2.0, "tcp://clickhouse:9000")
