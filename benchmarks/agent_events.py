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

It also times the parsing of DESTROY events, ours (the dump's compiled layouts) against
pyroute2's ``nfct_msg`` decoder, on the same datagrams (``--parse N`` of them, made with
shared/tools/ctfill.py and one bulk ``conntrack -D``): the issue asked for pyroute2's
event subscription if its speed holds at the burst.

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
import socket
import statistics
import subprocess
import sys
import time

from flowscope.exactness import measure

CTFILL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tools", "ctfill.py")


def parser_rates(n: int, rounds: int = 5) -> dict[str, float]:
    """DESTROY events parsed a second: ours and pyroute2's, medians of ``rounds``."""
    from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

    from flowscope.agent.conntrack import NETLINK_NETFILTER, EntryParser
    from flowscope.lab import Lab

    fill = CTFILL if os.path.exists(CTFILL) else "/work/shared/tools/ctfill.py"
    with Lab() as lab:
        node = lab.add_node("node-a")
        with lab.inside(node):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE: keep every event
        sock.bind((0, 0))
        sock.setsockopt(270, 1, 3)  # NETLINK_ADD_MEMBERSHIP NFNLGRP_CONNTRACK_DESTROY
        subprocess.run(node.exec_args("python3", fill, str(n)), check=True, capture_output=True)
        subprocess.run(node.exec_args("conntrack", "-D", "-p", "udp"), capture_output=True)
        dgrams = []
        while True:
            try:
                dgrams.append(sock.recv(65536, socket.MSG_DONTWAIT))
            except BlockingIOError:
                break
        sock.close()
    ours, theirs = [], []
    for _ in range(rounds):
        parser, out = EntryParser(), []
        t = time.perf_counter()
        for d in dgrams:
            parser.parse_events(d, len(d), out)
        ours.append(len(dgrams) / (time.perf_counter() - t))
        t = time.perf_counter()
        for d in dgrams:
            m = nfct_msg(d)
            m.decode()
            m.get_attr("CTA_COUNTERS_ORIG")
        theirs.append(len(dgrams) / (time.perf_counter() - t))
    return {
        "events": len(dgrams),
        "ours_per_s": round(statistics.median(ours)),
        "pyroute2_per_s": round(statistics.median(theirs)),
        "ratio": round(statistics.median(ours) / statistics.median(theirs), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="10000", help="comma-separated connection rates (per second)")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=2, help="sender and server processes")
    ap.add_argument("--buffer-size", type=int, default=32 << 20, help="the agent's conntrackEvents.bufferSize")
    ap.add_argument("--udp", type=float, default=0.5, help="share of UDP connections")
    ap.add_argument("--parse", type=int, default=20000, help="DESTROY events for the parser comparison (0: skip)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, conntrack)", file=sys.stderr)
        return 2
    parsers = parser_rates(args.parse) if args.parse else None
    print(json.dumps({"parsers": parsers}), file=sys.stderr, flush=True)
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
        "parsers": parsers,
        "runs": runs,
        "lowest_rate_losing_events": min(losing) if losing else None,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
