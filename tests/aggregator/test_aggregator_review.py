"""Acceptance-review checks of the aggregator against issue 4 (semantics shared with the agent)."""

from __future__ import annotations

from agg_records import NODE_A, T0, agent_record, destination_half, source_half
from flowscope.aggregator.aggregation import AggregationProcess


def _process() -> AggregationProcess:
    return AggregationProcess(export_interval=10, correlation_timeout=5, inactive_timeout=30, start=T0)


def test_host_traffic_keeps_the_agents_flow_type_zero_and_waits_for_no_twin() -> None:
    p = _process()
    rec = agent_record(flow_type=0, src="192.168.10.1", dst="192.168.10.9", pkts=7, octets=700)
    assert p.ingest(rec, NODE_A, 0, T0)
    out = p.tick(T0 + 10)
    assert [e.correlation for e in out] == ["unattributed"]
    r = out[0].record
    assert r["flowType"] == 0  # the agent's "unknown", not re-labelled inter-node (2)
    assert (r["packetTotalCount"], r["octetTotalCount"]) == (7, 700)
    assert (r["packetDeltaCountFromSourceNode"], r["octetDeltaCountFromSourceNode"]) == (7, 700)
    assert p.stats.flows_uncorrelated == 0


def test_a_record_that_says_inter_node_keeps_its_type_even_without_names() -> None:
    p = _process()
    p.ingest(agent_record(flow_type=2, src="fd00::1", dst="fd00::2"), NODE_A, 0, T0)
    out = p.tick(T0 + 10)
    assert [(e.correlation, e.record["flowType"]) for e in out] == [("unattributed", 2)]
    assert out[0].record["sourceIPv6Address"] == "fd00::1"


def test_a_correlated_inter_node_flow_still_exports_flow_type_two() -> None:
    p = _process()
    p.ingest(source_half(), NODE_A, 1, T0)
    p.ingest(destination_half(), "192.168.10.2", 2, T0 + 1)
    out = p.tick(T0 + 10)
    assert [(e.correlation, e.record["flowType"]) for e in out] == [("correlated", 2)]
    assert out[0].record["sourcePodName"] == "frontend-1"


def test_flowrecords_table_names_every_flow_type_the_agent_sends(monkeypatch, capsys) -> None:
    import argparse

    from flowscope.aggregator import cli
    from flowscope.aggregator.sinks import record_to_json

    p = _process()
    p.ingest(agent_record(flow_type=0, src="192.168.10.1", dst="192.168.10.9", sport=1), NODE_A, 0, T0)
    p.ingest(source_half(sport=2), NODE_A, 0, T0)
    docs = {"flowRecords": [record_to_json(e) for e in p.snapshot()], "truncated": False}
    monkeypatch.setattr(cli, "_get", lambda args, path, params=None: docs)
    args = argparse.Namespace(srcip=None, dstip=None, proto=None, srcport=None, dstport=None, limit=None,
                              output="table", server="http://unused", timeout=1.0)
    assert cli._flowrecords(args) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    types = {row.split()[0]: row.split()[-2] for row in rows}
    assert types == {"192.168.10.1:1": "host", "10.0.1.5:2": "inter-node"}
