"""End to end with real agents: two namespace Nodes, each with its own kernel conntrack and a
real ``flowscope agent`` reading it, real traffic between Pods on different Nodes (direct,
through a ClusterIP Service DNAT, and UDP), the aggregator correlating over mutual TLS and
exporting over IPFIX to the collector. Each connection must come out as one correlated
flow, with each Node's counters equal to that Node's own conntrack entry."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from conftest import require_root, require_tool

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(180)]

_ENTRY = re.compile(
    r"src=(?P<src>\S+) dst=(?P<dst>\S+) sport=(?P<sport>\d+) dport=(?P<dport>\d+) "
    r"(?:\[UNREPLIED\] )?packets=(?P<pkts>\d+) bytes=(?P<bytes>\d+) (?:\[UNREPLIED\] )?"
    r"src=(?P<rsrc>\S+) dst=(?P<rdst>\S+) sport=(?P<rsport>\d+) dport=(?P<rdport>\d+) "
    r"packets=(?P<rpkts>\d+) bytes=(?P<rbytes>\d+)"
)


def conntrack(netns: str) -> list[dict[str, str | int]]:
    """Every entry of a Node's conntrack table, as ``conntrack -L`` prints it."""
    out = subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-L"], capture_output=True, text=True,
                         check=True).stdout
    entries = []
    for line in out.splitlines():
        m = _ENTRY.search(line)
        if m:
            d: dict[str, str | int] = {k: (int(v) if v.isdigit() else v) for k, v in m.groupdict().items()}
            d["proto"] = line.split()[0]
            entries.append(d)
    return entries


def entry_for(entries, rec):
    """The conntrack entry of a flow record: its source end, and the reply's source (post-DNAT)."""
    proto = {6: "tcp", 17: "udp"}[rec["protocolIdentifier"]]
    found = [e for e in entries if e["proto"] == proto and e["src"] == rec["sourceIPv4Address"]
             and e["sport"] == rec["sourceTransportPort"] and e["rsrc"] == rec["destinationIPv4Address"]
             and e["rsport"] == rec["destinationTransportPort"]]
    assert len(found) == 1, (rec, entries)
    return found[0]


def test_real_agents_one_correlated_flow_per_connection_counters_match_each_nodes_conntrack(tmp_path):
    require_root()
    require_tool("ip", "nft", "ss", "conntrack")
    import json

    from flowscope.demo import SERVICE_IP, Pipeline
    from flowscope.lab import Lab

    with Lab() as lab:
        pipe = Pipeline(lab, tmp_path, active_timeout="30s", idle_timeout="2s")
        try:
            pipe.start()
            pods = pipe.pods
            sent = [
                ("frontend", f"{pods['backend'].ip}:8080", "tcp", 150_000, 1),  # Pod -> Pod, inter-Node
                ("frontend", f"{SERVICE_IP}:80", "tcp", 60_000, 1),  # Pod -> Service -> Pod on the other Node
                ("frontend", f"{pods['backend'].ip}:5353", "udp", 700, 4),  # UDP, inter-Node
            ]
            for src, target, proto, size, packets in sent:
                answer = pipe.send(src, target, proto, size, packets)
                assert answer and not answer.startswith("refused"), (target, answer)
            # The agents' idle export (2s after the last packet, 1s polls), then the aggregator's 2s interval.
            flow_log = tmp_path / "flows.jsonl"
            frontend, backend = pods["frontend"].ip, pods["backend"].ip

            def ours():
                if not flow_log.exists():
                    return []
                return [json.loads(x) for x in flow_log.read_text().splitlines()
                        if x.strip() and json.loads(x).get("sourceIPv4Address") == frontend
                        and json.loads(x).get("destinationIPv4Address") == backend]

            def counted(r):
                """Both Nodes have counted all the payload the connection moved."""
                if r["protocolIdentifier"] == 17:
                    return all(r.get(f"packetTotalCount{s}", 0) >= 4 for s in ("FromSourceNode", "FromDestinationNode"))
                size = 150_000 if r.get("destinationClusterIPv4") != SERVICE_IP else 60_000
                return all(r.get(f"octetTotalCount{s}", 0) >= size for s in ("FromSourceNode", "FromDestinationNode"))

            # Settled: three correlated connections, each fully counted by both Nodes, and
            # then one more idle export + interval without news, so that the last record
            # holds the final counters. 60 s only matter when something is broken.
            deadline, size, changed = time.monotonic() + 60, -1, time.monotonic()
            while time.monotonic() < deadline:
                now_size = flow_log.stat().st_size if flow_log.exists() else 0
                if now_size != size:
                    size, changed = now_size, time.monotonic()
                    latest = {}
                    for r in ours():
                        if r["correlation"] == "correlated":
                            latest[(r["sourceTransportPort"], r["destinationTransportPort"], r["protocolIdentifier"])] = r
                    settled = len(latest) == 3 and all(counted(r) for r in latest.values())
                if settled and time.monotonic() - changed >= 4:
                    break
                pipe.procs.check_alive()
                time.sleep(0.2)
            tables = {name: conntrack(node.netns) for name, node in lab.nodes.items()}
        finally:
            pipe.stop()

        records = ours()
        by_conn: dict[tuple, list[dict]] = {}
        for r in records:
            key = (r["sourceIPv4Address"], r["destinationIPv4Address"], r["sourceTransportPort"],
                   r["destinationTransportPort"], r["protocolIdentifier"])
            by_conn.setdefault(key, []).append(r)
        # one flow per connection: three 5-tuples, every record of each a correlated merge
        assert sorted((k[3], k[4]) for k in by_conn) == [(5353, 17), (8080, 6), (8080, 6)], by_conn.keys()
        for key, recs in by_conn.items():
            assert {r["correlation"] for r in recs} == {"correlated"}, recs
            last = recs[-1]
            assert (last["sourcePodName"], last["sourceNodeName"]) == ("frontend-6d4f8", "node-a")
            assert (last["destinationPodName"], last["destinationNodeName"]) == ("backend-5c7b9", "node-b")
            assert last["flowType"] == 2
            for node, suffix in (("node-a", "FromSourceNode"), ("node-b", "FromDestinationNode")):
                e = entry_for(tables[node], last)
                assert (last[f"packetTotalCount{suffix}"], last[f"octetTotalCount{suffix}"],
                        last[f"reversePacketTotalCount{suffix}"], last[f"reverseOctetTotalCount{suffix}"]) == (
                    e["pkts"], e["bytes"], e["rpkts"], e["rbytes"]), (node, key)
            # the deltas exported for the connection add up to its totals, per node
            for suffix in ("FromSourceNode", "FromDestinationNode"):
                assert sum(r[f"octetDeltaCount{suffix}"] for r in recs) == last[f"octetTotalCount{suffix}"]
                assert sum(r[f"reverseOctetDeltaCount{suffix}"] for r in recs) == last[f"reverseOctetTotalCount{suffix}"]
        # the payload each program moved is inside the counted octets
        svc = [r for k, rs in by_conn.items() for r in rs[-1:] if rs[-1]["destinationClusterIPv4"] == SERVICE_IP]
        assert len(svc) == 1 and svc[0]["destinationServicePortName"] == "shop/backend:http"
        assert svc[0]["octetTotalCountFromSourceNode"] >= 60_000
        udp = by_conn[next(k for k in by_conn if k[4] == 17)][-1]
        assert udp["packetTotalCountFromSourceNode"] == 4 and udp["octetTotalCountFromSourceNode"] == 4 * (700 + 28)

        # the same records reached the external collector over IPFIX
        exported = [r for r in pipe.records() if r.get("sourceIPv4Address") == frontend
                    and r.get("destinationIPv4Address") == backend]
        assert exported, "the collector received nothing"
        assert {(r["sourceTransportPort"], r["destinationTransportPort"]) for r in exported} == {
            (k[2], k[3]) for k in by_conn}
