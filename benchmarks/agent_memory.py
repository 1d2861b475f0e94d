#!/usr/bin/env python3
"""Benchmark: peak memory of a real ``flowscope agent`` process holding 100k connections.

Fills a fresh network namespace's conntrack with ``--entries`` entries (the same mixed
table as agent_poll.py), runs ``flowscope agent`` there with short timeouts so that
every connection is exported at least once (idle) while it is held, collects the
records with flowscope.ipfix's collecting process over TCP on that namespace's
loopback, and prints JSON with the agent's VmHWM (peak RSS, read while it still runs
with the store full, before its shutdown flush) and the records received; with
``--rounds R`` it does so R times (a fresh namespace and agent each) and reports the
median. ``idle_rss_mb`` is the same agent's peak with an empty table (its start-up:
interpreter, imports, buffers), so that the rest is what 100k connections cost.
Needs root. Usage: ``.venv/bin/python benchmarks/agent_memory.py [--entries N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import agent_poll  # noqa: E402  (the table filler)


def vm(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM", "VmRSS")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) // 1024
    return out


async def run(entries: int) -> dict:
    from flowscope.ipfix import Address
    from flowscope.ipfix.collecting import CollectingProcess

    ns = f"fs-mem-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        uniform = int(entries * 0.7)
        subprocess.run(["ip", "netns", "exec", ns, sys.executable, agent_poll.CTFILL, str(uniform)], check=True,
                       capture_output=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        received = [0]
        agent_poll.setns(f"/run/netns/{ns}")
        try:
            agent_poll.fill_mixed(entries - uniform)
            coll = CollectingProcess(Address("127.0.0.1", 0, "tcp"), tls=None,
                                     on_message=lambda p, m: received.__setitem__(0, received[0] + m.record_count))
            await coll.start()
        finally:
            agent_poll._libc.setns(own, 0x40000000)
            os.close(own)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as cfg:
            cfg.write(f"flowCollectorAddr: 127.0.0.1:{coll.port}:tcp\nflowPollInterval: 2s\n"
                      "activeFlowExportTimeout: 5s\nidleFlowExportTimeout: 3s\nmetricsAddress: ''\n"
                      "nodeName: bench\nmetadata: {source: none}\n")
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, sys.executable, "-m", "flowscope", "agent", "--config", cfg.name,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            await asyncio.sleep(0.1)
            if received[0] >= entries:
                break
        await asyncio.sleep(2.5)  # one more poll with the store full
        pids = subprocess.run(["pgrep", "-f", cfg.name], capture_output=True, text=True).stdout.split()
        mem = max((vm(int(p)) for p in pids), key=lambda d: d.get("VmHWM", 0))
        while_running = received[0]
        proc.terminate()
        await proc.wait()
        await coll.close()
        os.unlink(cfg.name)
        return {"benchmark": "agent_memory", "entries": entries, "records_while_running": while_running,
                "records_after_stop": received[0],  # + forced-end (4) records at SIGTERM
                "agent_peak_rss_mb": mem.get("VmHWM"), "agent_rss_mb": mem.get("VmRSS")}
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print(json.dumps({"error": "needs root for a network namespace"}))
        return 1
    import statistics

    runs = [asyncio.run(run(args.entries)) for _ in range(args.rounds)]
    idle = asyncio.run(run(10))
    peaks = [r["agent_peak_rss_mb"] for r in runs]
    med = statistics.median(peaks)
    print(json.dumps({
        **runs[-1], "rounds": args.rounds, "agent_peak_rss_mb": med, "agent_peak_rss_rounds_mb": peaks,
        "idle_rss_mb": idle["agent_peak_rss_mb"],
        "bytes_per_connection": round((med - idle["agent_peak_rss_mb"]) * 2**20 / args.entries),
        "target_rss_mb_max": 100,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
