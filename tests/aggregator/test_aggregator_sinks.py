"""Sinks: the bounded per-sink queue, the JSON-lines flow log and its rotation."""

from __future__ import annotations

import asyncio
import json

import pytest
from agg_records import NODE_A, NODE_B, destination_half, source_half

from flowscope.aggregator.aggregation import AggregationProcess, ExportedFlow
from flowscope.aggregator.sinks import FlowLogSink, FlowLogWriter, QueuedSink, Sink, record_to_json


def flows(n: int) -> list[ExportedFlow]:
    return [ExportedFlow({"sourceTransportPort": i, "payload": b"\x01\x02"}, "external", False) for i in range(n)]


class SlowSink:
    name = "slow"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.got: list[ExportedFlow] = []

    async def start(self) -> None:
        pass

    async def write(self, batch):
        await self.gate.wait()
        self.got.extend(batch)

    async def close(self) -> None:
        pass


class BrokenSink(SlowSink):
    name = "broken"

    async def write(self, batch):
        raise OSError("disk full")


class ListSink(SlowSink):
    name = "list"

    async def write(self, batch):
        self.got.extend(batch)


async def test_slow_sink_overflows_its_own_queue_only():
    slow, fast = SlowSink(), ListSink()
    assert isinstance(slow, Sink)
    q_slow, q_fast = QueuedSink(slow, queue_size=100, batch_size=10), QueuedSink(fast, queue_size=1000)
    await q_slow.start()
    await q_fast.start()
    for _ in range(5):
        batch = flows(50)
        assert q_fast.offer(batch) == 50  # never blocks, never drops
        q_slow.offer(batch)
        await asyncio.sleep(0)
    assert await q_fast.flush(1.0)
    assert len(fast.got) == 250
    # the slow sink holds one batch of 10 in flight and 100 queued: the rest is counted
    assert q_slow.dropped == 250 - 100 - 10
    assert q_slow.queued == 100
    slow.gate.set()
    assert await q_slow.flush(1.0)
    assert len(slow.got) == 110 == q_slow.written
    st = q_slow.stats()
    assert (st["offered"], st["written"], st["dropped"], st["failed"], st["queued"]) == (250, 110, 140, 0, 0)
    await q_slow.close()
    await q_fast.close()


async def test_failing_sink_counts_failures_and_keeps_going():
    q = QueuedSink(BrokenSink(), queue_size=100, batch_size=7)
    await q.start()
    q.offer(flows(20))
    assert await q.flush(1.0)
    assert (q.failed, q.written, q.dropped) == (20, 0, 0)
    assert q.last_error == "disk full"
    q.offer(flows(3))
    assert await q.flush(1.0)
    assert q.failed == 23
    await q.close()


async def test_close_drains_the_queue():
    sink = ListSink()
    q = QueuedSink(sink, queue_size=10_000, batch_size=100)
    await q.start()
    q.offer(flows(1234))
    await q.close()
    assert len(sink.got) == 1234


def test_flow_log_writer_rotates_by_size_and_keeps_backups(tmp_path):
    path = str(tmp_path / "logs" / "flows.jsonl")
    w = FlowLogWriter(path, max_bytes=100, max_backups=2)
    line = "x" * 39  # 40 bytes with the newline
    for i in range(7):
        w.write_lines([f"{i}" + line[1:]])
    w.close()
    # 2 lines fit in 100 bytes: files hold [6], [4,5], [2,3]; [0,1] rotated out
    def firsts(p):
        return [ln[0] for ln in open(p).read().splitlines()]
    assert firsts(path) == ["6"]
    assert firsts(path + ".1") == ["4", "5"]
    assert firsts(path + ".2") == ["2", "3"]
    assert not (tmp_path / "logs" / "flows.jsonl.3").exists()
    assert w.rotations == 3


@pytest.mark.parametrize("before", [b"", b'{"a": 1}\n', b'{"a": 1}\n{"b": 2}\n{"c": 3, "d', b'{"torn', b"x" * 70_000])
def test_a_line_a_crash_cut_short_is_removed_before_the_next_record_is_appended(tmp_path, caplog, before):
    """kill -9 in the middle of a write leaves a last line without its newline; a restarted
    aggregator appending to it would glue its first record onto the fragment (seen in the
    hostile kill -9 test: one unreadable line). The fragment is cut, the whole lines kept."""
    path = tmp_path / "flows.jsonl"
    path.write_bytes(before)
    whole = before[:before.rfind(b"\n") + 1]
    w = FlowLogWriter(str(path), max_bytes=10_000_000, max_backups=1)
    w.write_lines(['{"e": 5}'])
    w.close()
    assert path.read_bytes() == whole + b'{"e": 5}\n'
    assert [json.loads(line) for line in path.read_text().splitlines()][-1] == {"e": 5}
    assert ("cut short" in caplog.text) == (before != whole)


def test_flow_log_writer_without_backups_restarts_the_file(tmp_path):
    path = str(tmp_path / "flows.jsonl")
    w = FlowLogWriter(path, max_bytes=50, max_backups=0)
    w.write_lines(["a" * 30])
    w.write_lines(["b" * 30])
    w.close()
    assert open(path).read() == "b" * 30 + "\n"
    assert not (tmp_path / "flows.jsonl.1").exists()


def test_flow_log_writer_appends_across_restarts(tmp_path):
    path = str(tmp_path / "flows.jsonl")
    for word in ("one", "two"):
        w = FlowLogWriter(path, max_bytes=1000, max_backups=1)
        w.write_lines([word])
        w.close()
    assert open(path).read() == "one\ntwo\n"


async def test_flow_log_sink_writes_the_merged_record(tmp_path):
    agg = AggregationProcess(export_interval=60, correlation_timeout=30, inactive_timeout=90, max_flows=10)
    agg.ingest(source_half(pkts=12), NODE_A, 5, now=0.0)
    agg.ingest(destination_half(pkts=11), NODE_B, 6, now=0.0)
    exported = agg.tick(60.0)
    sink = FlowLogSink(str(tmp_path / "flows.jsonl"), max_size_mb=1, max_backups=1)
    q = QueuedSink(sink, queue_size=10)
    await q.start()
    q.offer(exported)
    await q.close()
    lines = (tmp_path / "flows.jsonl").read_text().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc == record_to_json(exported[0])
    assert (doc["sourcePodName"], doc["destinationPodName"], doc["correlation"], doc["final"]) == (
        "frontend-1", "backend-1", "correlated", False)
    assert (doc["packetTotalCountFromSourceNode"], doc["packetTotalCountFromDestinationNode"]) == (12, 11)
    assert doc["originalExporterIPv4Address"] == NODE_A


def test_record_to_json_renders_bytes_as_hex():
    assert record_to_json(flows(1)[0])["payload"] == "0102"


def test_flow_log_writer_refuses_nonsense():
    with pytest.raises(ValueError):
        FlowLogWriter("/tmp/x", max_bytes=0, max_backups=1)
