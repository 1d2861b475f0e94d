"""Is every connection exported exactly once, with the kernel's counters? Measured in the lab.

Why: the agent's claim (docs/agent.md, "Exact endings") is checkable only against real
connections, many of them, short ones, and an independent account of each. This module
builds a lab (one Node, a client Pod and a server Pod), runs ``flowscope agent`` in the
Node's namespace exporting over TCP to a collecting process here, runs ``conntrack -E``
beside it as the peer (the same kernel events, read by conntrack-tools), and sends a
burst of ``flowscope.burst`` connections from the client Pod, which counts what it sent
and received for every connection. Then it compares, connection by connection:

- records per connection (exactly one is the claim),
- the record's totals against conntrack's DESTROY line (packets and octets, both ways),
- the record against the sender: UDP packet and octet counts follow from the datagrams
  (28 octets of IP and UDP header each); TCP's payload must fit in the octets counted.

It also reports the agent's CPU time and peak memory during the burst, and its own
count of events lost. ``benchmarks/agent_events.py`` runs it at 10,000 connections a
second; ``tests/agent/test_agent_events.py`` runs a small bounded version.

Conntrack's timeouts in the Node are shortened (TIME_WAIT, UDP) so that entries, and so
their DESTROY events, end within seconds of the burst rather than two minutes later.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from flowscope.ipfix import Address
from flowscope.ipfix.collecting import CollectingProcess
from flowscope.lab import Lab

__all__ = ["BurstResult", "measure"]

SHORT_TIMEOUTS = {
    "net.netfilter.nf_conntrack_tcp_timeout_time_wait": 1,
    "net.netfilter.nf_conntrack_tcp_timeout_close": 1,
    "net.netfilter.nf_conntrack_udp_timeout": 1,
    "net.netfilter.nf_conntrack_udp_timeout_stream": 1,
}
METRICS = "127.0.0.1:9391"
_CT_FIELD = re.compile(r"(\w+)=(\S+)")


@dataclass
class BurstResult:
    rate_asked: float
    rate_reached: float
    connections: int  # the sender's, answered
    failed: int  # connections the sender saw fail (not answered)
    peer_destroys: int  # conntrack -E DESTROY lines of the burst
    peer_lost: bool  # conntrack -E said it hit ENOBUFS
    exported: int  # connections of the burst with at least one record
    exactly_once: int
    duplicated: int  # connections with more than one record
    missing: int  # sender's connections without any record
    equal_to_peer: int  # records whose four totals equal conntrack -E's
    compared_to_peer: int
    equal_to_sender: int  # UDP: counts equal; TCP: the payload fits
    compared_to_sender: int
    # UDP connections whose sent side equals the sender's but whose replies the kernel
    # counted short of what the sender received (conntrack -E says the same): the kernel's
    # accounting (a reply taken by another entry), not the agent's
    kernel_reply_short: int
    reasons: dict[str, int]
    agent_cpu_seconds: float  # user + system, from the burst's start to the last record
    agent_cpu_share: float  # of one core over that time
    agent_cpu_share_burst: float  # of one core while the sender was sending
    agent_peak_rss_mb: float
    events_lost: float  # the agent's flowscope_agent_conntrack_events_lost
    event_overruns: float
    ended_by_event: float
    ended_without_event: float
    sender_cpu_seconds: float
    settle_seconds: float  # from the burst's end to the last record
    mismatches: list[Any]  # a few (connection, record, peer, sender) that differ, to look at
    node_conntrack_stats: dict[str, int] | None  # conntrack -S of the Node after the burst

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _agent_metrics(lab: Lab, node: Any) -> dict[str, float]:
    try:
        with lab.inside(node):
            body = urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _parse_peer(path: str, client: str, server: str) -> tuple[dict[tuple[str, int, int], tuple[int, int, int, int]], bool]:
    """conntrack -E DESTROY lines of client -> server: key -> (packets, bytes, reply packets, reply bytes)."""
    out = {}
    lost = False
    with open(path, errors="replace") as fh:
        for line in fh:
            if "ENOBUFS" in line:
                lost = True
            if "DESTROY" not in line:
                continue
            parts = line.split()
            proto = parts[1]
            fields: dict[str, list[str]] = {}
            for k, v in _CT_FIELD.findall(line):
                fields.setdefault(k, []).append(v)
            if fields.get("src", [""])[0] != client or fields.get("dst", [""])[0] != server:
                continue
            key = (proto, int(fields["sport"][0]), int(fields["dport"][0]))
            p, b = fields.get("packets", ["0", "0"]), fields.get("bytes", ["0", "0"])
            out[key] = (int(p[0]), int(b[0]), int(p[1]), int(b[1]))
    return out, lost


def measure(
    *,
    rate: float,
    duration: float,
    udp_share: float = 0.5,
    workers: int = 2,
    buffer_size: int = 32 << 20,
    poll_interval: str = "5s",
    datagrams: int = 2,
    request: int = 100,
    reply: int = 200,
    settle_timeout: float = 120.0,
    log: Any = None,
) -> BurstResult:
    """One burst in a fresh lab; see the module docstring. Needs root, conntrack, nft."""
    if shutil.which("conntrack") is None or shutil.which("nft") is None:
        raise RuntimeError("conntrack and nft are needed (scripts/setup.sh installs them)")
    return asyncio.run(_measure(
        rate, duration, udp_share, workers, buffer_size, poll_interval, datagrams, request, reply,
        settle_timeout, log or (lambda *_: None),
    ))


async def _measure(
    rate: float, duration: float, udp_share: float, workers: int, buffer_size: int, poll_interval: str,
    datagrams: int, request: int, reply: int, settle_timeout: float, log: Any,
) -> BurstResult:
    tmp = tempfile.mkdtemp(prefix="flowscope-burst-")
    records: list[tuple[str, int, int, int, int, int, int, int]] = []
    proto_names = {6: "tcp", 17: "udp"}
    with Lab() as lab:
        node = lab.add_node("node-a")
        client = lab.add_pod("node-a", "client", "burst")
        server = lab.add_pod("node-a", "server", "burst")
        for key, value in SHORT_TIMEOUTS.items():
            lab.set_sysctl(node, key, value)

        def on_message(peer: Any, msg: Any) -> None:
            for _, r in msg.data_records():
                if r.get("sourceIPv4Address") == client.ip and r.get("destinationIPv4Address") == server.ip:
                    records.append((
                        proto_names.get(r["protocolIdentifier"], str(r["protocolIdentifier"])),
                        r["sourceTransportPort"], r["destinationTransportPort"],
                        r["packetTotalCount"], r["octetTotalCount"],
                        r["reversePacketTotalCount"], r["reverseOctetTotalCount"], r["flowEndReason"],
                    ))

        with lab.inside(node):
            coll = CollectingProcess(Address("127.0.0.1", 0, "tcp"), tls=None, on_message=on_message)
            await coll.start()
        cfg = os.path.join(tmp, "agent.yaml")
        with open(cfg, "w") as fh:
            fh.write(
                f'flowCollectorAddr: "127.0.0.1:{coll.port}:tcp"\n'
                f"flowPollInterval: {poll_interval}\n"
                "activeFlowExportTimeout: 10m\nidleFlowExportTimeout: 10m\n"
                f'nodeName: node-a\nmetricsAddress: "{METRICS}"\nmetadata: {{source: none}}\n'
                "exportQueueSize: 2000000\nmaxConnections: 2000000\n"
                f"conntrackEvents: {{bufferSize: {buffer_size}}}\n"
            )
        peer_path = os.path.join(tmp, "conntrack-events.txt")
        peer_out = open(peer_path, "w")
        peer = subprocess.Popen(
            ["nice", "-n", "-10", *node.exec_args("conntrack", "-E", "-e", "DESTROY")],
            stdout=peer_out, stderr=subprocess.STDOUT,
        )
        agent = subprocess.Popen(
            node.exec_args(sys.executable, "-m", "flowscope", "agent", "--config", cfg, "--log-level", "warning"),
            stdout=open(os.path.join(tmp, "agent.log"), "w"), stderr=subprocess.STDOUT,
        )
        srv = subprocess.Popen(
            server.exec_args(sys.executable, "-m", "flowscope.burst", "serve", "--workers", str(workers),
                             "--request", str(request), "--reply", str(reply)),
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert srv.stdout is not None
            for _ in range(workers):
                await asyncio.to_thread(srv.stdout.readline)
            deadline = time.monotonic() + 60
            while _agent_metrics(lab, node).get("flowscope_agent_poll_duration_seconds_count", 0) < 1:
                if time.monotonic() > deadline or agent.poll() is not None:
                    raise RuntimeError(f"the agent did not start: {open(os.path.join(tmp, 'agent.log')).read()}")
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # conntrack -E subscribes within milliseconds; leave it room
            log(f"burst: {rate:g}/s for {duration:g}s")
            peak = [0.0]
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.is_set():
                    peak[0] = max(peak[0], _rss_mb(agent.pid))
                    sampling.wait(0.25)

            sampler = threading.Thread(target=sample, daemon=True)
            cpu0 = _cpu_seconds(agent.pid)
            t0 = time.monotonic()
            sampler.start()
            sent_csv = os.path.join(tmp, "sent.csv")
            sender = await asyncio.create_subprocess_exec(
                *client.exec_args(
                    sys.executable, "-m", "flowscope.burst", "send", server.ip, "--rate", str(rate),
                    "--duration", str(duration), "--udp", str(udp_share), "--workers", str(workers),
                    "--datagrams", str(datagrams), "--request", str(request), "--reply", str(reply),
                    "--out", sent_csv,
                ),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await sender.communicate()
            summary = json.loads(out.decode().strip().splitlines()[-1])
            t_sent = time.monotonic()
            cpu_sent = _cpu_seconds(agent.pid)
            sent: dict[tuple[str, int, int], tuple[int, int, int, int]] = {}
            failed = 0
            with open(sent_csv, newline="") as fh:
                for row in csv.DictReader(fh):
                    if row["answered"] != "1":
                        failed += 1
                        continue
                    sent[(row["proto"], int(row["sport"]), int(row["dport"]))] = (
                        int(row["sent_octets"]), int(row["sent_datagrams"]),
                        int(row["recv_octets"]), int(row["recv_datagrams"]),
                    )
            log(f"sent {len(sent)} connections ({summary['rate_reached']:.0f}/s reached); waiting for the records")
            # settled: every sent connection has a record, or nothing new came for a while
            last_n, last_change = -1, time.monotonic()
            deadline = time.monotonic() + settle_timeout
            while time.monotonic() < deadline:
                keys = {r[:3] for r in records}
                if all(k in keys for k in sent):
                    break
                if len(records) != last_n:
                    last_n, last_change = len(records), time.monotonic()
                elif time.monotonic() - last_change > 15:
                    break
                await asyncio.sleep(0.5)
            t_done = time.monotonic()
            cpu1 = _cpu_seconds(agent.pid)
            sampling.set()
            sampler.join()
            await asyncio.sleep(2.5)  # conntrack -E writes its last lines
            metrics = _agent_metrics(lab, node)

            def node_stats() -> dict[str, int] | None:
                from flowscope.agent.ctevents import table_statistics

                with lab.inside(node):
                    return table_statistics()

            ct_stats = await asyncio.to_thread(node_stats)
        finally:
            for p in (srv, agent):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            if peer.poll() is None:
                peer.send_signal(signal.SIGINT)
            for p in (srv, agent, peer):
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
            peer_out.close()
            await coll.close()
        peers, peer_lost = _parse_peer(peer_path, client.ip, server.ip)
    if os.environ.get("FLOWSCOPE_KEEP_BURST") is None:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        log(f"kept {tmp}")

    per_key = Counter(r[:3] for r in records)
    first: dict[tuple[str, int, int], tuple[int, ...]] = {}
    for r in records:
        first.setdefault(r[:3], r[3:7])
    exported = sum(1 for k in sent if k in per_key)
    once = sum(1 for k in sent if per_key.get(k) == 1)
    dup = sum(1 for k in sent if per_key.get(k, 0) > 1)
    eq_peer = cmp_peer = eq_sender = cmp_sender = reply_short = 0
    mismatches: list[Any] = []
    for k, (s_oct, s_dgr, r_oct, r_dgr) in sent.items():
        rec = first.get(k)
        if rec is None:
            continue
        ok_peer = ok_sender = True
        if k in peers:
            cmp_peer += 1
            ok_peer = tuple(rec) == peers[k]
            eq_peer += ok_peer
        cmp_sender += 1
        if k[0] == "udp":
            ok_sender = tuple(rec) == (s_dgr, s_oct + 28 * s_dgr, r_dgr, r_oct + 28 * r_dgr)
            if not ok_sender and tuple(rec[:2]) == (s_dgr, s_oct + 28 * s_dgr) and rec[2] < r_dgr and (
                peers.get(k) in (None, tuple(rec))
            ):
                reply_short += 1
        else:  # every TCP segment carries at least 40 octets of IP and TCP header
            ok_sender = rec[1] >= s_oct + 40 * rec[0] and rec[3] >= r_oct + 40 * rec[2]
        eq_sender += ok_sender
        if not (ok_peer and ok_sender) and len(mismatches) < 5:
            mismatches.append({"connection": k, "record": rec, "peer": peers.get(k), "sender": (s_oct, s_dgr, r_oct, r_dgr)})
    reasons = Counter(str(r[7]) for r in records)
    span = max(t_done - t0, 1e-9)
    return BurstResult(
        rate_asked=rate,
        rate_reached=round(summary["rate_reached"], 1),
        connections=len(sent),
        failed=failed,
        peer_destroys=len(peers),
        peer_lost=peer_lost,
        exported=exported,
        exactly_once=once,
        duplicated=dup,
        missing=len(sent) - exported,
        equal_to_peer=eq_peer,
        compared_to_peer=cmp_peer,
        equal_to_sender=eq_sender,
        compared_to_sender=cmp_sender,
        kernel_reply_short=reply_short,
        reasons=dict(reasons),
        agent_cpu_seconds=round(cpu1 - cpu0, 2),
        agent_cpu_share=round((cpu1 - cpu0) / span, 3),
        agent_cpu_share_burst=round((cpu_sent - cpu0) / max(t_sent - t0, 1e-9), 3),
        agent_peak_rss_mb=round(peak[0], 1),
        events_lost=metrics.get("flowscope_agent_conntrack_events_lost", -1),
        event_overruns=metrics.get("flowscope_agent_conntrack_event_overruns", -1),
        ended_by_event=metrics.get("flowscope_agent_connections_ended_by_event", -1),
        ended_without_event=metrics.get("flowscope_agent_connections_ended_without_event", -1),
        sender_cpu_seconds=round(summary.get("cpu_seconds", 0.0), 2),
        settle_seconds=round(t_done - t_sent, 1),
        mismatches=mismatches,
        node_conntrack_stats=ct_stats,
    )
