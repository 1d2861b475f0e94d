"""Message-level fuzzing at the issue's size: 100,000 mutated messages over TCP and 120,000
datagrams over UDP from a hostile peer, against a real aggregator process.

What it measures, per transport: that the aggregator survives (exit status), the mutated
messages it refused as malformed and the ones it still decoded, its resident memory
before and after, the log lines the flood produced (rate-limited), the worst /healthz
latency during the flood, and a legitimate exporter's delivery. The peer measured in the
same run is that exporter without the flood: its records/s delivered alone and during the
flood, and the ratio. Over UDP the flood is paced at 5,000 datagrams/s (faster, the kernel
drops most of it unread) and the exporter's records lost in the kernel are reported, not
waited for. Prints one JSON object. ``--tcp N`` and ``--udp N`` change the sizes (0 skips).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "hostile"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hostile_peers import (GOOD, Aggregator, HealthProbe, fuzz_tcp, fuzz_udp, good_exporter, mutations,  # noqa: E402
                           settled, until)

RECORDS = 20_000


async def _deliver(agg: Aggregator, start: int) -> tuple[float, int]:
    """The exporter's records/s (delivered over the time until the count stood still) and
    how many arrived. Over UDP some may be lost in the kernel under a flood: counted, not waited for."""
    t0 = time.perf_counter()
    exporter = await good_exporter(agg, RECORDS, start=start, batch=50 if agg.transport == "udp" else 500)
    await exporter.flush(300)
    if agg.transport == "udp":
        await settled(agg)
    else:
        await until(lambda: agg.received_from(GOOD) >= start + RECORDS, 300, "the exporter's records", step=0.2)
    elapsed = time.perf_counter() - t0
    await exporter.close()
    got = agg.received_from(GOOD) - start
    return got / elapsed, got


async def run(transport: str, n: int) -> dict[str, object]:
    agg = Aggregator(transport).start()
    try:
        alone, _ = await _deliver(agg, 0)
        base = agg.rss_mb()
        lines = agg.log_lines()
        messages = mutations(n, seed=100 if transport == "tcp" else 101)
        async with HealthProbe(agg) as probe:
            t0 = time.perf_counter()
            if transport == "tcp":
                flood = asyncio.create_task(fuzz_tcp(agg.port, messages))
            else:
                # paced at 5,000 datagrams/s: faster, the kernel drops most of them unread, which
                # tests the socket buffer rather than the decoder
                flood = asyncio.create_task(asyncio.to_thread(fuzz_udp, agg.port, messages, pace_every=50,
                                                              pause=0.01))
            during, delivered = await _deliver(agg, RECORDS)
            await flood
            flood_s = time.perf_counter() - t0
            if transport == "udp":
                await settled(agg)
        coll = agg.metrics()["collectingProcess"]
        out = {
            "transport": transport, "mutated_messages": n, "flood_seconds": round(flood_s, 1),
            "malformed": coll["malformed"], "decoded_messages": coll["messages"],
            "exporter_records_per_s_alone": round(alone), "exporter_records_per_s_during_flood": round(during),
            "ratio_during_to_alone": round(during / alone, 2),
            "exporter_records_sent_during_flood": RECORDS, "exporter_records_delivered_during_flood": delivered,
            "rss_before_mb": round(base, 1), "rss_after_mb": round(agg.rss_mb(), 1),
            "log_lines": agg.log_lines() - lines, "health_worst_s": round(probe.worst, 3),
            "health_failures": probe.failures, "alive": agg.alive,
        }
    finally:
        agg.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tcp", type=int, default=100_000)
    p.add_argument("--udp", type=int, default=120_000)
    a = p.parse_args()
    results = []
    for transport, n in (("udp", a.udp), ("tcp", a.tcp)):
        if n:
            results.append(asyncio.run(run(transport, n)))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "hostile_fuzz", "results": results}, indent=2))


if __name__ == "__main__":
    main()
