"""`flowscope agent` with several destinations in a node namespace: the main collector
over TCP, a UDP one that only wants UDP, and one that is absent (nothing listens). The
two present ones get what their filters admit, with conntrack's counters, while the
absent one retries in the background and holds back neither."""

from __future__ import annotations

import socket

import urllib.request

import pytest
from agent_netns import in_netns, topology
from conftest import require_root, require_tool
from flowscope.ipfix import Address
from flowscope.ipfix.collecting import CollectingProcess
from test_agent_e2e import start_agent, stop_agent, tcp_transfer, wait_for, wait_metric
from test_agent_netns import udp_exchange

pytestmark = [pytest.mark.netns, pytest.mark.slow]

METRICS = "127.0.0.1:9390"  # the default of wait_metric; the namespace is this test's


def free_port(ns: str) -> int:
    with in_netns(ns):
        s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def test_each_destination_gets_what_its_filter_admits_and_an_absent_one_blocks_none(tmp_path):
    require_root()
    require_tool("ip", "nft", "conntrack")
    with topology(("a", "b")) as topo:
        a_ns, _, _ = topo.pods["a"]
        b_ns, b4, _ = topo.pods["b"]
        got: dict[str, list[dict]] = {"main": [], "udp": []}

        def collector(name):
            return lambda peer, msg: got[name].extend(rec for _, rec in msg.data_records())

        with in_netns(topo.node):
            main = CollectingProcess(Address("127.0.0.1", 0, "tcp"), tls=None, on_message=collector("main"))
            await main.start()
            udp = CollectingProcess(Address("127.0.0.1", 0, "udp"), tls=None, on_message=collector("udp"))
            await udp.start()
        absent = free_port(topo.node)
        cfg = tmp_path / "agent.yaml"
        cfg.write_text(
            f'flowCollectorAddr: "127.0.0.1:{main.port}:tcp"\n'
            "flowPollInterval: 1s\nactiveFlowExportTimeout: 60s\nidleFlowExportTimeout: 60s\n"
            f'nodeName: node-a\nmetricsAddress: "{METRICS}"\nmetadata: {{source: none}}\n'
            "destinations:\n"
            f'- {{name: away, address: "127.0.0.1:{absent}:tcp", queueSize: 10}}\n'
            f'- {{name: udp-only, address: "127.0.0.1:{udp.port}:udp", filter: {{protocols: [UDP]}}}}\n'
        )
        proc = await start_agent(topo.node, cfg)
        log = ""
        try:
            assert await wait_metric(topo.node, "flowscope_agent_poll_duration_seconds_count", 1, 60)
            sport = udp_exchange(a_ns, b_ns, b4, 5353, count=3, size=100)
            assert tcp_transfer(a_ns, b_ns, b4, 8080, 20_000) == 20_000
            # the UDP entry ends now: its DESTROY carries the final counters
            import subprocess

            subprocess.run(["ip", "netns", "exec", topo.node, "conntrack", "-D", "-p", "udp", "--dport", "5353"],
                           capture_output=True)

            def mine(name):
                return [r for r in got[name] if r.get("destinationIPv4Address") == b4]

            ok = await wait_for(lambda: {5353, 8080} <= {r["destinationTransportPort"] for r in mine("main")}
                                and any(r["destinationTransportPort"] == 5353 for r in mine("udp")), 60)
            with in_netns(topo.node):
                metrics = urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5).read().decode()
        finally:
            log = await stop_agent(proc)
            await main.close()
            await udp.close()
    assert ok, f"main: {got['main']}\nudp: {got['udp']}\nagent log:\n{log}"
    u = next(r for r in mine("main") if r["destinationTransportPort"] == 5353)
    assert (u["sourceTransportPort"], u["packetTotalCount"], u["octetTotalCount"]) == (sport, 3, 3 * 128)
    assert (u["reversePacketTotalCount"], u["reverseOctetTotalCount"], u["flowEndReason"]) == (3, 3 * 78, 3)
    assert {r["protocolIdentifier"] for r in mine("udp")} == {17}
    assert next(r for r in mine("udp") if r["destinationTransportPort"] == 5353)["packetTotalCount"] == 3
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
             if line and not line.startswith("#")}
    assert lines['flowscope_agent_destination_connected{destination="away"}'] == 0
    assert lines['flowscope_agent_destination_connected{destination="main"}'] == 1
    assert lines['flowscope_agent_destination_records_exported_total{destination="udp-only"}'] >= 1
    assert lines["flowscope_agent_connections_ended_by_event"] >= 1
    assert proc.returncode == 0, log

