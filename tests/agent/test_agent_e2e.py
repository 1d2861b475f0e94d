"""End to end: `flowscope agent` in a node namespace, real conntrack, mutual TLS to our
collecting process, Prometheus metrics, tshark as an independent decoder over TCP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from agent_entries import INVENTORY
from agent_netns import in_netns, topology
from conftest import require_root, require_tool
from flowscope.ipfix import Address
from flowscope.ipfix.collecting import CollectingProcess
from flowscope.ipfix.transport import TLSConfig
from pki import make_pki
from test_agent_netns import conntrack_cli, find, udp_exchange

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture
def topo():
    require_root()
    require_tool("ip", "nft", "conntrack")
    with topology(("a", "b")) as t:
        yield t


def write_config(tmp_path, port, proto, pki=None, metrics="127.0.0.1:9390"):
    inv = tmp_path / "inv.yaml"
    inv.write_text(INVENTORY)
    lines = [
        f'flowCollectorAddr: "127.0.0.1:{port}:{proto}"',
        "flowPollInterval: 1s",
        "activeFlowExportTimeout: 30s",
        "idleFlowExportTimeout: 1s",
        "nodeName: node-a",
        f'metricsAddress: "{metrics}"',
        f"metadata: {{source: static, staticFile: {inv}}}",
    ]
    if pki:
        lines.append(f"tls: {{caFile: {pki['ca']}, certFile: {pki['client_cert']}, keyFile: {pki['client_key']}}}")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


async def start_agent(node: str, cfg) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", node, sys.executable, "-m", "flowscope", "agent", "--config", str(cfg),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


async def wait_for(cond, timeout=60.0):
    """Poll ``cond`` until it holds; False after ``timeout`` seconds, a bound that only
    matters when something is broken (a loaded 2-core CI machine is slow, not broken)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.1)
    return False


def agent_metrics(node: str, address: str = "127.0.0.1:9390") -> dict[str, float]:
    """The agent's /metrics in namespace ``node`` as {name: value}; {} while nothing answers."""
    try:
        with in_netns(node):
            body = urllib.request.urlopen(f"http://{address}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    return {line.split()[0]: float(line.split()[1]) for line in body.splitlines() if line and not line.startswith("#")}


async def wait_metric(node: str, name: str, at_least: float, timeout: float = 60.0) -> bool:
    """Wait until the agent in ``node`` reports ``name`` >= ``at_least``: how the tests
    know the agent is up (``poll_duration_seconds_count`` >= 1: it polls, its signal
    handlers are in place) or has decided an export (``records_exported_total``)."""
    return await wait_for(lambda: agent_metrics(node).get(name, -1.0) >= at_least, timeout)


async def wait_log(proc: asyncio.subprocess.Process, text: str, timeout: float = 60.0) -> tuple[bool, str]:
    """Read the agent's output until a line holds ``text``; returns (seen, what was read)
    so that the caller keeps it for the log it prints on failure."""
    assert proc.stdout is not None
    read = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), left)
        except TimeoutError:
            break
        if not line:
            break
        read.append(line.decode(errors="replace"))
        if text in read[-1]:
            return True, "".join(read)
    return False, "".join(read)


POLLS = "flowscope_agent_poll_duration_seconds_count"
EXPORTED = "flowscope_agent_records_exported_total"


async def stop_agent(proc) -> str:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
    return out.decode(errors="replace")


def tcp_transfer(a_ns, b_ns, host, port, send):
    with in_netns(b_ns):
        srv = socket.socket()
    srv.bind((host, port))
    srv.listen()
    with in_netns(a_ns):
        cli = socket.socket()
    cli.connect((host, port))
    conn, _ = srv.accept()
    cli.sendall(b"t" * send)
    cli.shutdown(socket.SHUT_WR)
    got = 0
    while True:
        d = conn.recv(65536)
        if not d:
            break
        got += len(d)
    conn.close()
    cli.close()
    srv.close()
    return got


async def test_flowscope_agent_exports_over_mutual_tls_with_metrics(topo, tmp_path):
    a_ns, a4, a6 = topo.pods["a"]
    b_ns, b4, b6 = topo.pods["b"]
    pki = make_pki(tmp_path)
    received = []

    def on_message(peer, msg):
        received.extend(rec for _, rec in msg.data_records())

    with in_netns(topo.node):  # the collector listens on the node namespace's loopback
        coll = CollectingProcess(
            Address("127.0.0.1", 0, "tls"), tls=TLSConfig(pki["server_cert"], pki["server_key"], pki["ca"]),
            on_message=on_message,
        )
        await coll.start()
    proc = await start_agent(topo.node, write_config(tmp_path, coll.port, "tls", pki))
    log = ""
    try:
        udp_exchange(a_ns, b_ns, b4, 5353, count=6, size=200)
        udp_exchange(a_ns, b_ns, b6, 5354, count=4, size=100, family=socket.AF_INET6)
        assert tcp_transfer(a_ns, b_ns, b4, 8080, 50_000) == 50_000

        def have():
            ports = {(r["destinationTransportPort"], r["flowEndReason"]) for r in received}
            return {(5353, 1), (5354, 1), (8080, 3)} <= ports

        ok = await wait_for(have)
        rows = conntrack_cli(topo.node)
        with in_netns(topo.node):
            metrics = urllib.request.urlopen("http://127.0.0.1:9390/metrics", timeout=5).read().decode()
    finally:
        log = await stop_agent(proc)
        # the agent flushed its forced-end records before exiting: wait until the
        # collector (this event loop) has read them off the socket
        await wait_for(lambda: {5353, 5354} <= {r["destinationTransportPort"] for r in received
                                                if r["flowEndReason"] == 4}, 10)
        await coll.close()
    assert ok, f"records: {received}\nagent log:\n{log}"
    assert proc.returncode == 0, log

    def rec(port, reason):
        return next(r for r in received if r["destinationTransportPort"] == port and r["flowEndReason"] == reason)

    u = rec(5353, 1)
    assert (u["packetDeltaCount"], u["octetDeltaCount"]) == (6, 6 * 228)
    assert (u["reversePacketDeltaCount"], u["reverseOctetDeltaCount"]) == (6, 6 * 128)
    f = find(rows, a4, b4, 5353)["fields"]
    assert (u["packetTotalCount"], u["octetTotalCount"]) == (int(f["packets"][0]), int(f["bytes"][0]))
    assert (u["sourcePodName"], u["destinationPodName"], u["flowType"]) == ("client", "server", 1)
    u6 = rec(5354, 1)
    assert u6["sourceIPv6Address"] == a6 and (u6["packetDeltaCount"], u6["octetDeltaCount"]) == (4, 4 * 148)
    t = rec(8080, 3)
    f = find(rows, a4, b4, 8080)["fields"]
    assert (t["packetTotalCount"], t["octetTotalCount"]) == (int(f["packets"][0]), int(f["bytes"][0]))
    assert (t["reversePacketTotalCount"], t["reverseOctetTotalCount"]) == (int(f["packets"][1]), int(f["bytes"][1]))
    assert t["ingressNetworkPolicyRuleAction"] == 1 and t["ingressNetworkPolicyName"] == "server-web"
    # SIGTERM: the live UDP connections got a final forced-end record (nothing new since their idle export)
    forced = [r for r in received if r["flowEndReason"] == 4]
    assert {r["destinationTransportPort"] for r in forced} >= {5353, 5354}
    assert all(r["packetDeltaCount"] == 0 for r in forced if r["destinationTransportPort"] in (5353, 5354))
    # metrics: the design's four and the exporter's
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line and not line.startswith("#")}
    assert values["flowscope_agent_conntrack_total_connection_count"] == len(rows)
    assert values["flowscope_agent_conntrack_connection_count"] == len(rows)
    assert values["flowscope_agent_conntrack_max_connection_count"] > 0
    assert values["flowscope_agent_denied_connection_count"] == 0
    assert values["flowscope_agent_records_exported_total"] >= 3
    assert values["flowscope_agent_exporter_connected"] == 1
    assert values["flowscope_agent_poll_duration_seconds_count"] >= 2


async def wait_capturing(cap: subprocess.Popen, timeout: float = 60.0) -> None:
    """Return once tshark says it captures (its start takes seconds on a loaded machine);
    the packets the test reads come seconds after that."""
    assert cap.stderr is not None
    deadline = time.monotonic() + timeout
    seen = b""
    while b"Capturing on" not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"tshark did not start capturing within {timeout:g}s: {seen.decode(errors='replace')}"
        line = await asyncio.wait_for(asyncio.to_thread(cap.stderr.readline), left)
        assert line, f"tshark exited ({cap.wait()}): {seen.decode(errors='replace')}"
        seen += line


async def test_backlog_and_reconnect_while_the_collector_is_away_seen_by_tshark(topo, tmp_path):
    """Collector down at start: the agent polls on, keeps its records, reconnects when the
    collector comes up, and counts the reconnection. tshark decodes the TCP stream."""
    require_tool("tshark")
    a_ns, a4, _ = topo.pods["a"]
    b_ns, b4, _ = topo.pods["b"]
    with in_netns(topo.node):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
    pcap = tmp_path / "ipfix.pcap"
    cap = subprocess.Popen(
        ["ip", "netns", "exec", topo.node, "tshark", "-q", "-i", "lo", "-f", f"tcp port {port}", "-w", str(pcap)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        await wait_capturing(cap)
    except BaseException:
        cap.kill()
        cap.wait()
        raise
    proc = await start_agent(topo.node, write_config(tmp_path, port, "tcp"))
    received = []
    coll = None
    try:
        assert await wait_metric(topo.node, POLLS, 1), "the agent never polled"
        udp_exchange(a_ns, b_ns, b4, 6000, count=9, size=300)
        # idle export decided while nobody listens: it waits in the backlog
        assert await wait_metric(topo.node, EXPORTED, 1), "the agent never decided the idle export"
        with in_netns(topo.node):
            coll = CollectingProcess(
                Address("127.0.0.1", port, "tcp"), tls=None,
                on_message=lambda peer, msg: received.extend(r for _, r in msg.data_records()),
            )
            await coll.start()
        # The agent's reconnect backoff (1, 2, 4 s, then 60 s) may have passed its quick
        # retries on a loaded machine: the overall wait covers the long one.
        ok = await wait_for(lambda: any(r["destinationTransportPort"] == 6000 for r in received), 90)
        row = find(conntrack_cli(topo.node), a4, b4, 6000)["fields"]
        # the collector restarts: the agent reconnects and counts it
        await coll.close()
        udp_exchange(a_ns, b_ns, b4, 6001, count=2, size=10)
        # the record of 6001 is decided while the collector is away
        assert await wait_metric(topo.node, EXPORTED, 2), "the agent never decided the export of 6001"
        with in_netns(topo.node):
            coll = CollectingProcess(
                Address("127.0.0.1", port, "tcp"), tls=None,
                on_message=lambda peer, msg: received.extend(r for _, r in msg.data_records()),
            )
            await coll.start()
        ok2 = await wait_for(lambda: any(r["destinationTransportPort"] == 6001 for r in received), 90)
        # a poll that began after the reconnection refreshes the exporter gauges
        # (two more completed polls: the one running now may have begun before)
        polls = agent_metrics(topo.node).get(POLLS, 0.0)
        await wait_metric(topo.node, POLLS, polls + 2)
        with in_netns(topo.node):
            metrics = urllib.request.urlopen("http://127.0.0.1:9390/metrics", timeout=5).read().decode()
    finally:
        log = await stop_agent(proc)
        if coll is not None:
            await coll.close()
        cap.send_signal(signal.SIGINT)
        cap.wait(10)
    assert ok and ok2, log
    r = next(r for r in received if r["destinationTransportPort"] == 6000)
    assert (r["packetDeltaCount"], r["octetDeltaCount"]) == (9, 9 * 328) == (int(row["packets"][0]), int(row["bytes"][0]))
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line and not line.startswith("#")}
    assert values["flowscope_agent_poll_duration_seconds_count"] >= 4  # it kept polling meanwhile
    assert values["flowscope_agent_exporter_connected"] == 1
    assert values["flowscope_agent_exporter_reconnections"] >= 1
    # tshark, an independent decoder, reads the same record from the wire
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", f"tcp.port=={port},cflow", "-Y", "cflow.dstport == 6000",
         "-T", "fields", "-e", "cflow.srcaddr", "-e", "cflow.dstaddr", "-e", "cflow.dstport",
         "-e", "cflow.packets", "-e", "cflow.octets"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert out.strip(), f"tshark saw no IPFIX record for port 6000; agent log:\n{log}"
    src, dst, dport, packets, octets = (x.split(",") for x in out.strip().splitlines()[0].split("\t"))
    # the first record of that message: forward then reverse delta counts (RFC 5103)
    assert (src[0], dst[0], dport[0]) == (a4, b4, "6000")
    assert [int(x) for x in packets[:2]] == [9, 9]
    assert [int(x) for x in octets[:2]] == [9 * 328, 9 * 178]


async def test_pipeline_agent_to_flowscope_aggregator_over_tls(topo, tmp_path):
    """The whole data plane: `flowscope agent` -> mutual TLS -> `flowscope aggregator`,
    whose /flowrecords API shows the connection with conntrack's counters."""
    a_ns, a4, _ = topo.pods["a"]
    b_ns, b4, _ = topo.pods["b"]
    pki = make_pki(tmp_path)
    with in_netns(topo.node):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
    agg_cfg = tmp_path / "aggregator.yaml"
    agg_cfg.write_text(
        "aggregatorTransportProtocol: tls\nlistenAddress: 127.0.0.1\n"
        f"listenPort: {port}\nflowAggregatorAddress: 127.0.0.1\napiAddress: 127.0.0.1:10348\n"
        f"tls: {{caFile: {pki['ca']}, certFile: {pki['server_cert']}, keyFile: {pki['server_key']}}}\n"
    )
    agg = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", topo.node, sys.executable, "-m", "flowscope", "aggregator", "--config", str(agg_cfg),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    agent = None
    records = []
    try:
        def api_up():
            try:
                with in_netns(topo.node):
                    urllib.request.urlopen("http://127.0.0.1:10348/healthz", timeout=1).read()
                return True
            except OSError:
                return False

        assert await wait_for(api_up), "the aggregator did not come up"
        agent = await start_agent(topo.node, write_config(tmp_path, port, "tls", pki))
        assert await wait_metric(topo.node, POLLS, 1), "the agent never polled"
        udp_exchange(a_ns, b_ns, b4, 5353, count=5, size=400)

        def fetch():
            try:
                with in_netns(topo.node):
                    body = urllib.request.urlopen("http://127.0.0.1:10348/flowrecords?dstport=5353", timeout=5).read()
            except OSError:  # a slow answer on a loaded machine: ask again
                return False
            records[:] = json.loads(body)["flowRecords"]
            return any(r.get("packetTotalCount") == 5 for r in records)

        ok = await wait_for(fetch)
        row = find(conntrack_cli(topo.node), a4, b4, 5353)["fields"]
    finally:
        agent_log = await stop_agent(agent) if agent is not None else ""
        agg_log = await stop_agent(agg)
    assert ok, f"records {records}\nagent:\n{agent_log}\naggregator:\n{agg_log}"
    r = next(r for r in records if r.get("packetTotalCount") == 5)
    assert (r["sourceIPv4Address"], r["destinationIPv4Address"]) == (a4, b4)
    assert (r["packetTotalCount"], r["octetTotalCount"]) == (int(row["packets"][0]), int(row["bytes"][0])) == (5, 5 * 428)
    assert (r["reversePacketTotalCount"], r["reverseOctetTotalCount"]) == (int(row["packets"][1]), int(row["bytes"][1]))
    assert (r["sourcePodName"], r["destinationPodName"]) == ("client", "server")


INVENTORY_TWO_NODES = """
kind: List
items:
- {kind: Node, metadata: {name: node-a}, spec: {podCIDRs: [10.244.0.0/24]}}
- {kind: Node, metadata: {name: node-b}, spec: {podCIDRs: [10.244.1.0/24]}}
- {kind: Namespace, metadata: {name: shop}}
- {kind: Pod, metadata: {name: client, namespace: shop, labels: {app: client}}, spec: {nodeName: node-a},
   status: {podIP: 10.244.0.11}}
- {kind: Pod, metadata: {name: server, namespace: shop, labels: {app: server}}, spec: {nodeName: node-b},
   status: {podIP: 10.244.1.12}}
- kind: NetworkPolicy
  metadata: {name: server-dns, namespace: shop}
  spec:
    podSelector: {matchLabels: {app: server}}
    ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{protocol: UDP, port: 5353}]}]
"""


async def test_two_nodes_two_agents_one_correlated_record_at_the_aggregator(tmp_path):
    """An inter-node flow: each node's agent sees its half (names of its own Pod only);
    `flowscope aggregator` joins them into one record with both names and both counts."""
    require_root()
    require_tool("ip", "nft", "conntrack")
    from agent_netns import two_nodes

    with two_nodes() as topo:
        a_ns, a4, _ = topo.pods["a"]
        b_ns, b4, _ = topo.pods["b"]
        pki = make_pki(tmp_path, server_names=("192.168.77.1",))
        inv = tmp_path / "inv.yaml"
        inv.write_text(INVENTORY_TWO_NODES)
        agg_cfg = tmp_path / "aggregator.yaml"
        agg_cfg.write_text(
            "aggregatorTransportProtocol: tls\nlistenAddress: 192.168.77.1\nlistenPort: 4739\n"
            "flowAggregatorAddress: 192.168.77.1\napiAddress: 127.0.0.1:10348\n"
            f"tls: {{caFile: {pki['ca']}, certFile: {pki['server_cert']}, keyFile: {pki['server_key']}}}\n"
        )
        procs = [await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", topo.node, sys.executable, "-m", "flowscope", "aggregator", "--config", str(agg_cfg),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
        records: list = []
        ok = False
        try:
            for node, name in ((topo.node, "node-a"), (topo.node2, "node-b")):
                cfg = tmp_path / f"{name}.yaml"
                cfg.write_text(
                    'flowCollectorAddr: "192.168.77.1:4739:tls"\nflowPollInterval: 1s\nidleFlowExportTimeout: 1s\n'
                    f"nodeName: {name}\nmetricsAddress: 127.0.0.1:9390\n"
                    f"metadata: {{source: static, staticFile: {inv}}}\n"
                    f"tls: {{caFile: {pki['ca']}, certFile: {pki['client_cert']}, keyFile: {pki['client_key']}}}\n"
                )
                procs.append(await start_agent(node, cfg))
            for node in (topo.node, topo.node2):
                assert await wait_metric(node, POLLS, 1), f"the agent in {node} never polled"
            udp_exchange(a_ns, b_ns, b4, 5353, count=5, size=400)

            def fetch():
                try:
                    with in_netns(topo.node):
                        body = urllib.request.urlopen("http://127.0.0.1:10348/flowrecords?dstport=5353", timeout=5).read()
                except OSError:
                    return False
                records[:] = json.loads(body)["flowRecords"]
                return any(r.get("sourcePodName") and r.get("destinationPodName") for r in records)

            ok = await wait_for(fetch)
            row_a = find(conntrack_cli(topo.node), a4, b4, 5353)["fields"]
            row_b = find(conntrack_cli(topo.node2), a4, b4, 5353)["fields"]
        finally:
            logs = [await stop_agent(p) for p in reversed(procs)]
        assert ok, f"records: {records}\n" + "\n----\n".join(logs)
        r = next(r for r in records if r.get("sourcePodName") and r.get("destinationPodName"))
        assert (r["sourcePodName"], r["destinationPodName"]) == ("client", "server")
        assert (r["sourceNodeName"], r["destinationNodeName"]) == ("node-a", "node-b")
        assert r["flowType"] == 2
        assert (r["ingressNetworkPolicyName"], r["ingressNetworkPolicyRuleAction"]) == ("server-dns", 1)
        # each node's conntrack counted the same 5 packets; the aggregator keeps both
        assert int(row_a["packets"][0]) == int(row_b["packets"][0]) == 5
        assert r["packetTotalCountFromSourceNode"] == int(row_a["packets"][0])
        assert r["packetTotalCountFromDestinationNode"] == int(row_b["packets"][0])
        assert r["octetTotalCountFromSourceNode"] == int(row_a["bytes"][0]) == 5 * 428
        assert r["reverseOctetTotalCountFromDestinationNode"] == int(row_b["bytes"][1]) == 5 * 228


async def test_flowscope_agent_with_the_kubernetes_source(topo, tmp_path):
    """`metadata.source: kubernetes` end to end: the agent reads Pods, Services and
    NetworkPolicies from an API server (kmock's emulator, listening in the node
    namespace, reached through a kubeconfig) and names them in its records."""
    import contextlib

    kmock = pytest.importorskip("kmock")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "operator"))
    from kmock_compat import CompatEmulator
    from test_agent_kube import OBJECTS, api_client, call

    a_ns, a4, _ = topo.pods["a"]
    b_ns, b4, _ = topo.pods["b"]
    objects = [
        (path, obj) for path, obj in OBJECTS if obj["kind"] in ("Namespace", "Service", "NetworkPolicy")
    ] + [
        ("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}, "spec": {"podCIDRs": ["10.244.0.0/24"]}}),
        ("/api/v1/namespaces/shop/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "namespace": "shop", "labels": {"app": "client"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "x"}]}, "status": {"podIPs": [{"ip": a4}]}}),
        ("/api/v1/namespaces/shop/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "server", "namespace": "shop", "labels": {"app": "server"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIPs": [{"ip": b4}]}}),
    ]
    received = []
    async with contextlib.AsyncExitStack() as stack:
        emu = await stack.enter_async_context(CompatEmulator())
        with in_netns(topo.node):  # the API server and the collector listen in the node namespace
            srv = await stack.enter_async_context(kmock.Server(emu))
            coll = CollectingProcess(Address("127.0.0.1", 0, "tcp"), tls=None,
                                     on_message=lambda peer, msg: received.extend(r for _, r in msg.data_records()))
            await coll.start()
        stack.push_async_callback(coll.close)

        def populate():
            with in_netns(topo.node):
                api = api_client(srv.url)
                for path, obj in objects:
                    assert call(api, "POST", path, obj) in (200, 201)

        await asyncio.to_thread(populate)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
            f"clusters: [{{name: k, cluster: {{server: '{str(srv.url).rstrip('/')}'}}}}]\n"
            "users: [{name: u, user: {token: test}}]\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
        )
        cfg = tmp_path / "agent.yaml"
        cfg.write_text(
            f'flowCollectorAddr: "127.0.0.1:{coll.port}:tcp"\nflowPollInterval: 1s\nidleFlowExportTimeout: 1s\n'
            "nodeName: node-a\nmetricsAddress: ''\nmetadata: {source: kubernetes}\n"
        )
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", topo.node, "env", f"KUBECONFIG={kubeconfig}", sys.executable, "-m", "flowscope",
            "agent", "--config", str(cfg), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        started = ""
        try:
            # the agent lists the API before it polls: its records name what it listed
            up, started = await wait_log(proc, "flow exporter on node")
            assert up, f"the agent did not start:\n{started}"
            assert tcp_transfer(a_ns, b_ns, b4, 8080, 10_000) == 10_000
            ok = await wait_for(lambda: any(r["destinationTransportPort"] == 8080 for r in received))
        finally:
            log = started + await stop_agent(proc)
    assert ok, log
    r = next(r for r in received if r["destinationTransportPort"] == 8080)
    assert (r["sourcePodName"], r["destinationPodName"], r["sourcePodNamespace"]) == ("client", "server", "shop")
    assert (r["ingressNetworkPolicyName"], r["ingressNetworkPolicyRuleName"], r["ingressNetworkPolicyRuleAction"]) == (
        "server-web", "ingress-0", 1)
    assert r["flowType"] == 1 and r["flowEndReason"] == 3
