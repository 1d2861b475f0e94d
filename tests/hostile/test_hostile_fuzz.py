"""Message-level fuzzing of a real aggregator over TCP and UDP (issue 10): mutated messages
from a hostile peer, a legitimate exporter beside it. No crash, every valid record of the
exporter decoded, the log rate-limited, memory flat. The suite sends 5,000 a transport;
benchmarks/hostile_fuzz.py sends the issue's 100,000 over TCP and 120,000 over UDP."""

from __future__ import annotations

import asyncio

import pytest
from hostile_peers import (GOOD, Aggregator, HealthProbe, fuzz_tcp, fuzz_udp, good_exporter, mutations, report,
                           settled, until)

N = 5000

pytestmark = pytest.mark.slow  # real aggregator processes, seconds each


async def _fuzz(transport: str) -> None:
    agg = Aggregator(transport).start()
    try:
        base = agg.rss_mb()
        lines = agg.log_lines()
        messages = mutations(N, seed=10 if transport == "tcp" else 11)
        async with HealthProbe(agg) as probe:
            if transport == "tcp":
                await fuzz_tcp(agg.port, messages)
            else:
                await asyncio.to_thread(fuzz_udp, agg.port, messages)
                await settled(agg)
            exporter = await good_exporter(agg, 500, batch=10)
            await until(lambda: agg.received_from(GOOD) == 500, 30, "the exporter's 500 records")
            await exporter.close()
        coll = agg.metrics()["collectingProcess"]
        after = agg.rss_mb()
        logged = agg.log_lines() - lines
        report(f"fuzz-{transport}", sent=N, malformed=coll["malformed"], decoded=coll["messages"],
               delivered=agg.received_from(GOOD), rss_before_mb=base, rss_after_mb=after, log_lines=logged,
               health_worst_s=probe.worst)
        assert agg.alive and coll["malformed"] > 0
        assert after - base < 40 and probe.worst < 2.0
        assert logged < 100, f"{logged} log lines for {N} mutated messages"
    finally:
        agg.stop()


async def test_fuzzed_tcp_messages_crash_nothing_and_the_exporter_is_served():
    await _fuzz("tcp")


async def test_fuzzed_udp_datagrams_crash_nothing_and_the_exporter_is_served():
    await _fuzz("udp")
