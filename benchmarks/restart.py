"""The aggregator down for 10 s, 30 s and 2 min while an exporter submits 1,000 records/s.

What it measures, per outage: how long after the aggregator is back the exporter has
reconnected (its backoff is capped at 2 s while records wait), and the books: records
offered, submitted (accepted by the exporter's queue), dropped (refused by it, counted),
sent, stored in the flow log and its rotated files (one flow per record), counted lost.
Over a graceful stop (SIGTERM) submitted = stored + lost exactly; a kill -9 run
reports what went unaccounted (what was in flight and the last export interval). The peer
measured in the same run is the exporter's previous behaviour, computed from the same
outage: retries at 1, 2, 4 s and then every 60 s, so its expected reconnect delay is the
wait from the aggregator's return to the next such retry. Prints one JSON object;
``--downs 10,30,120`` and ``--kill`` change what runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "hostile"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_hostile_restart import restart_run  # noqa: E402


def old_backoff_delay(down: float) -> float:
    """Seconds from the aggregator's return to the next retry of the old schedule (1, 2, 4, then 60 s)."""
    t, waits = 0.0, [1.0, 2.0, 4.0]
    while True:
        t += waits.pop(0) if waits else 60.0
        if t >= down:
            return t - down


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--downs", default="10,30,120")
    p.add_argument("--kill", action="store_true", help="also a kill -9 run per outage")
    a = p.parse_args()
    results = []
    for down in (float(x) for x in a.downs.split(",")):
        for kill in (False, True) if a.kill else (False,):
            with tempfile.TemporaryDirectory(prefix="restart-bench-") as work:
                r = asyncio.run(restart_run(Path(work), down, kill=kill))
            r["kill9"] = kill
            r["old_schedule_back_after_s"] = old_backoff_delay(down)
            # records_submitted counts what the queue accepted; "dropped" (refused by a full
            # queue while the collector was away) were never accepted, and are counted
            r["offered"] = r["submitted"] + r["dropped"]
            r["unaccounted"] = r["submitted"] - r["stored"] - r["lost"]
            results.append(r)
    print(json.dumps({"benchmark": "restart", "results": results}, indent=2))


if __name__ == "__main__":
    main()
