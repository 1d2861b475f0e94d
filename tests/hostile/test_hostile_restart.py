"""Bad days (issue 10, case 7): the aggregator goes away while an exporter keeps submitting.

The exporter must be back within a few seconds of the aggregator (a backlog caps its
backoff at 2 s), its backlog must reach the flow log without overrunning the sink (the
aggregator waits for the sink instead of dropping), and the books must balance: records
submitted = records stored in the flow log + records counted as lost or dropped. A
graceful stop (SIGTERM) half-closes the IPFIX sessions and reads what the exporter sent
before it saw the end, so nothing goes uncounted; a kill -9 loses what was in flight
(the test measures how much). The 10 s, 30 s and 2 min outages of the issue run in
benchmarks/restart.py; the suite runs 3 s and 10 s.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest
from hostile_peers import GOOD, Aggregator, agent_record, agent_templates, report, until

from flowscope.ipfix.address import Address
from flowscope.ipfix.exporting import ExportingProcess

pytestmark = pytest.mark.slow  # real aggregator processes, seconds each


async def restart_run(tmp: Path, down: float, *, kill: bool = False, rate: int = 1000, before: float = 2.0,
                      after: float = 2.0) -> dict[str, float]:
    """Submit ``rate`` records a second; stop the aggregator for ``down`` seconds; return the books."""
    flow_log = tmp / "flows.jsonl"
    agg = Aggregator("tcp", workdir=tmp, extra={"flowExportInterval": "1s", "sinks": {"flowLog": {
        "enabled": True, "path": str(flow_log), "queueSize": 1000}}})
    agg.start()
    exporter = ExportingProcess(Address(GOOD, agg.port, "tcp"), tls=None, templates=agent_templates(),
                                connect_timeout=2.0)
    await exporter.start()
    stop = asyncio.Event()
    counter = 0

    async def submit() -> None:
        nonlocal counter
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while not stop.is_set():
            due = int((loop.time() - t0) * rate)
            if due > counter:
                exporter.submit(256, [agent_record(i) for i in range(counter, due)])
                counter = due
            await asyncio.sleep(0.01)

    task = asyncio.create_task(submit())
    try:
        await asyncio.sleep(before)
        # in a thread: the exporter shares this event loop and must see the end of the stream
        code = await asyncio.to_thread(agg.stop, signal.SIGKILL if kill else signal.SIGTERM)
        await asyncio.sleep(down)
        connects = exporter.stats.connects  # before the start: the exporter may be back before it returns
        t_up = time.monotonic()
        await asyncio.to_thread(agg.start)
        await until(lambda: exporter.stats.connects > connects, 30, "the exporter back")
        back = time.monotonic() - t_up
        await asyncio.sleep(after)
        stop.set()
        await task
        assert await exporter.flush(30)
        sinks = agg.metrics()["sinks"]["flowLog"]
    finally:
        stop.set()
        await exporter.close()
        await asyncio.to_thread(agg.stop)
    keys = set()
    for path in [flow_log, *sorted(flow_log.parent.glob(flow_log.name + ".*"))]:  # rotated files too
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            keys.add((rec["sourceIPv4Address"], rec["sourceTransportPort"], rec["destinationTransportPort"]))
    stored = len(keys)  # every record is a flow of its own
    st = exporter.stats
    return {"down_s": down, "exit": code, "back_after_s": back, "submitted": st.records_submitted,
            "sent": st.records_sent, "stored": stored, "lost": st.records_lost, "dropped": st.records_dropped,
            "sink_dropped": sinks["dropped"], "reconnects": st.reconnects}


@pytest.mark.parametrize("down", [3.0, 10.0])
async def test_7_graceful_restart_the_exporter_is_back_within_seconds_and_the_books_balance(tmp_path, down):
    r = await restart_run(tmp_path, down)
    report(f"restart-{down:g}s", **r)
    assert r["back_after_s"] < 4.0
    assert r["dropped"] == 0 and r["sink_dropped"] == 0
    # every record submitted (accepted by the queue) is stored, or counted lost by the
    # exporter (an upper bound: the lost count may include records that made it)
    assert r["submitted"] == r["sent"] + r["lost"]
    assert r["sent"] <= r["stored"] <= r["sent"] + r["lost"]


async def test_7_kill_9_loses_only_what_was_in_flight(tmp_path):
    r = await restart_run(tmp_path, 3.0, kill=True)
    unaccounted = r["submitted"] - r["stored"] - r["lost"]  # submitted counts what the queue accepted
    report("restart-kill9", unaccounted=unaccounted, **r)
    assert r["back_after_s"] < 4.0
    # what a kill -9 loses: the records in flight and those received in the last export
    # interval (1 s here) before the kill; nothing else
    # interval (1 s here) before the kill; nothing else. The exporter's lost count is an
    # upper bound (records written in the peer_close_window before the collector vanished
    # count as lost though some were stored), so stored + lost may exceed what was submitted
    # by at most what it counted lost, never fall short of it by more than the bound.
    assert r["dropped"] == 0 and -r["lost"] <= unaccounted <= 2 * 1000
