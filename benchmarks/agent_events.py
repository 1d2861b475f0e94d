"""Exact endings under a burst: is every short connection exported once, with the kernel's counters?

Runs ``flowscope.exactness.measure`` (root): a lab Node with a client and a server Pod,
``flowscope agent`` in the Node with conntrack DESTROY events on, ``conntrack -E``
beside it as the peer, and ``flowscope.burst`` sending ``--rate`` short connections a
second (half UDP with two datagrams each way, half TCP with 100 octets up and 200 down)
for ``--duration`` seconds. Prints one JSON document: for every rate of ``--rates``,
what the sender reached, how many connections were exported exactly once, how many
records equal conntrack -E's DESTROY counters and the sender's counts, the events the
agent lost, and the agent's CPU (share of one core from the burst's start to its last
record) and peak RSS; then the lowest rate at which the agent lost events.

    sudo .venv/bin/python benchmarks/agent_events.py                      # 10000/s for 30 s
    sudo .venv/bin/python benchmarks/agent_events.py --rates 2000,5000,10000,20000 --duration 10

conntrack -E (conntrack-tools 1.4.7) is an imperfect peer: its event socket keeps the
default receive buffer whatever ``-b`` says (the option sizes another socket of it), so
it loses events in the bursts of DESTROYs the kernel's garbage collector makes; the
comparison covers every connection it did report (``peer_destroys``), and the sender
covers them all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from flowscope.exactness import measure


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="10000", help="comma-separated connection rates (per second)")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=2, help="sender and server processes")
    ap.add_argument("--buffer-size", type=int, default=32 << 20, help="the agent's conntrackEvents.bufferSize")
    ap.add_argument("--udp", type=float, default=0.5, help="share of UDP connections")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, conntrack)", file=sys.stderr)
        return 2
    runs = []
    for rate in (float(r) for r in args.rates.split(",")):
        res = measure(
            rate=rate, duration=args.duration, workers=args.workers, buffer_size=args.buffer_size,
            udp_share=args.udp, log=lambda m: print(m, file=sys.stderr, flush=True),
        )
        runs.append(res.as_dict())
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    losing = [r["rate_reached"] for r in runs if r["events_lost"] > 0 or r["ended_without_event"] > 0]
    print(json.dumps({
        "benchmark": "agent_events",
        "duration_s": args.duration,
        "buffer_size": args.buffer_size,
        "runs": runs,
        "lowest_rate_losing_events": min(losing) if losing else None,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
