"""The agent against the real kernel: namespaces as node and Pods, veth links, nftables.

A "node" namespace routes between Pod namespaces; conntrack runs in the node namespace
(nftables rules that match on ct state switch it on) and the agent dumps it there, as
it would on a real node. Traffic of known sizes flows between the Pods; what the agent
reads is compared with ``conntrack -L`` in the same namespace and with what was sent.
"""

from __future__ import annotations

import errno
import re
import socket
import threading
import time

import pytest
from agent_entries import INVENTORY
from agent_netns import in_netns, sh, topology
from agent_peers import decode_ours, decode_pypi, encode
from conftest import require_root, require_tool
from flowscope.agent.conntrack import ConntrackError, NetlinkConntrack, format_address
from flowscope.agent.exporter import FlowExporter
from flowscope.agent.metadata import Enricher, StaticMetadata

pytestmark = pytest.mark.netns


@pytest.fixture
def topo():
    require_root()
    require_tool("ip", "nft", "conntrack")
    with topology(("a", "b")) as t:
        yield t


def tcp_server(ns: str, host: str, port: int, reply: int, family=socket.AF_INET):
    with in_netns(ns):
        srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen()
    got = []

    def serve():
        conn, _ = srv.accept()
        total = 0
        while True:
            data = conn.recv(65536)
            if not data:
                break
            total += len(data)
        got.append(total)
        conn.sendall(b"r" * reply)
        conn.close()
        srv.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return th, got


def tcp_client(ns: str, host: str, port: int, send: int, family=socket.AF_INET) -> int:
    with in_netns(ns):
        c = socket.socket(family, socket.SOCK_STREAM)
    c.connect((host, port))
    c.sendall(b"s" * send)
    c.shutdown(socket.SHUT_WR)
    received = 0
    while True:
        data = c.recv(65536)
        if not data:
            break
        received += len(data)
    c.close()
    return received


def udp_exchange(a: str, b: str, dst: str, port: int, count: int, size: int, family=socket.AF_INET):
    with in_netns(b):
        srv = socket.socket(family, socket.SOCK_DGRAM)
    with in_netns(a):
        cli = socket.socket(family, socket.SOCK_DGRAM)
    srv.bind((dst, port))
    cli.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    srv.settimeout(2)
    cli.settimeout(2)
    for _ in range(count):
        cli.sendto(b"u" * size, (dst, port))
        data, peer = srv.recvfrom(65536)
        srv.sendto(data[: size // 2], peer)
        cli.recvfrom(65536)
    sport = cli.getsockname()[1]
    cli.close()
    srv.close()
    return sport


_CT_LINE = re.compile(r"(\w+)=(\S+)")


def conntrack_cli(ns: str) -> list[dict]:
    """`conntrack -L` (both families) parsed: each field twice (original, then reply)."""
    out = sh("conntrack", "-L", "-f", "ipv4", ns=ns) + sh("conntrack", "-L", "-f", "ipv6", ns=ns)
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        fields: dict[str, list[str]] = {}
        for k, v in _CT_LINE.findall(line):
            fields.setdefault(k, []).append(v)
        row = {"proto": parts[0], "fields": fields, "state": parts[3] if parts[0] == "tcp" else ""}
        rows.append(row)
    return rows


def find(rows, src, dst, dport=None):
    for r in rows:
        f = r["fields"]
        if f["src"][0] == src and f["dst"][0] == dst and (dport is None or f.get("dport", [None])[0] == str(dport)):
            return r
    raise AssertionError(f"no conntrack entry {src} -> {dst}:{dport} in {rows}")


def wait_conntrack(ns: str, what: str, match, timeout: float = 30.0) -> dict:
    """The first row of ``conntrack -L`` in ``ns`` that ``match`` accepts, polled for until
    it appears: the kernel may defer the packets of a veth to its softirq thread, which a
    loaded machine runs late. ``timeout`` only matters when the packet never comes."""
    deadline = time.monotonic() + timeout
    while True:
        rows = conntrack_cli(ns)
        for r in rows:
            if match(r):
                return r
        if time.monotonic() > deadline:
            raise AssertionError(f"no conntrack entry for {what} in {ns} after {timeout:g}s: {rows}")
        time.sleep(0.02)


def test_dump_equals_conntrack_cli_and_what_was_sent(topo):
    a_ns, a4, a6 = topo.pods["a"]
    b_ns, b4, b6 = topo.pods["b"]
    th, got = tcp_server(b_ns, b4, 8080, reply=30000)
    assert tcp_client(a_ns, b4, 8080, send=100000) == 30000
    th.join(5)
    assert got == [100000]
    th6, got6 = tcp_server(b_ns, b6, 8081, reply=5000, family=socket.AF_INET6)
    assert tcp_client(a_ns, b6, 8081, send=20000, family=socket.AF_INET6) == 5000
    th6.join(5)
    udp_sport = udp_exchange(a_ns, b_ns, b4, 5353, count=7, size=200)
    udp6_sport = udp_exchange(a_ns, b_ns, b6, 5354, count=5, size=300, family=socket.AF_INET6)
    sh("ping", "-c", "3", "-i", "0.05", "-s", "100", b4, ns=a_ns)
    # the last ACKs of both TCP connections crossed the node: nothing is still in flight
    for port in (8080, 8081):
        wait_conntrack(topo.node, f"TIME_WAIT of port {port}", lambda r, p=str(port): r["proto"] == "tcp"
                       and r["fields"]["dport"][0] == p and r["state"] == "TIME_WAIT")

    with in_netns(topo.node):
        src = NetlinkConntrack()
    try:
        result = src.dump()
    finally:
        src.close()
    rows = conntrack_cli(topo.node)
    assert result.total == len(rows) == len(result.entries)
    ours = {(format_address(e.orig_src), format_address(e.orig_dst), e.orig_dport, e.protocol): e for e in result.entries}

    # every entry equals conntrack -L, field by field
    for r in rows:
        f = r["fields"]
        proto = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}[r["proto"]]
        e = ours[(f["src"][0], f["dst"][0], int(f["dport"][0]) if "dport" in f else 0, proto)]
        assert (e.orig_packets, e.reply_packets) == (int(f["packets"][0]), int(f["packets"][1]))
        assert (e.orig_bytes, e.reply_bytes) == (int(f["bytes"][0]), int(f["bytes"][1]))
        assert format_address(e.reply_src) == f["src"][1]
        if proto == 6:
            assert e.tcp_state_name == r["state"]

    # and with what was sent: UDP and ICMP exactly (IPv4 header 20 + UDP 8, IPv6 40 + 8)
    u = ours[(a4, b4, 5353, 17)]
    assert (u.orig_packets, u.orig_bytes, u.reply_packets, u.reply_bytes) == (7, 7 * 228, 7, 7 * 128)
    assert u.orig_sport == udp_sport
    u6 = ours[(a6, b6, 5354, 17)]
    assert (u6.orig_packets, u6.orig_bytes, u6.reply_packets, u6.reply_bytes) == (5, 5 * 348, 5, 5 * 198)
    assert u6.orig_sport == udp6_sport
    icmp = next(e for e in result.entries if e.protocol == 1)
    assert (icmp.orig_packets, icmp.orig_bytes, icmp.reply_bytes) == (3, 3 * 128, 3 * 128)
    assert icmp.icmp_type == 8
    # TCP: payload plus 40 to 60 octets of headers a packet
    t = ours[(a4, b4, 8080, 6)]
    assert 100000 + 40 * t.orig_packets <= t.orig_bytes <= 100000 + 60 * t.orig_packets
    assert 30000 + 40 * t.reply_packets <= t.reply_bytes <= 30000 + 60 * t.reply_packets
    assert t.tcp_state_name == "TIME_WAIT" and t.ended and t.replied
    assert t.start_ns > 0  # nf_conntrack_timestamp is on
    t6 = ours[(a6, b6, 8081, 6)]
    assert 20000 + 60 * t6.orig_packets <= t6.orig_bytes <= 20000 + 80 * t6.orig_packets


def test_zone_filter(topo):
    a_ns, a4, _ = topo.pods["a"]
    b_ns, b4, _ = topo.pods["b"]
    # put the node's forwarded UDP to port 7000 in conntrack zone 7
    sh("nft", "-f", "-", ns=topo.node, input="""
table inet fs_zone { chain pre { type filter hook prerouting priority -300; udp dport 7000 ct zone set 7; udp sport 7000 ct zone set 7; }; }
""")
    udp_exchange(a_ns, b_ns, b4, 7000, count=2, size=50)
    udp_exchange(a_ns, b_ns, b4, 7001, count=2, size=50)
    with in_netns(topo.node):
        only7, every = NetlinkConntrack([7]), NetlinkConntrack()
    try:
        r7, rall = only7.dump(), every.dump()
    finally:
        only7.close()
        every.close()
    assert [(e.orig_dport, e.zone) for e in r7.entries] == [(7000, 7)]
    assert sorted(e.orig_dport for e in rall.entries) == [7000, 7001]
    assert r7.total == rall.total == 2


class ListSink:
    def __init__(self):
        self.batches = []
        self.times = []
        self.stats = {"reconnects": 0, "records_dropped": 0, "connected": True}

    def submit(self, tid, records):
        self.batches.append((tid, list(records)))
        self.times.extend([time.monotonic()] * len(records))
        return True

    async def flush(self):
        pass

    async def close(self):
        pass


async def test_agent_records_from_real_conntrack_with_service_dnat_and_denial(topo, tmp_path):
    a_ns, a4, _ = topo.pods["a"]
    b_ns, b4, _ = topo.pods["b"]
    # kube-proxy's part: the ClusterIP 10.96.0.10:80 is DNATed to the server Pod's 8080;
    # the CNI's part: the isolated server Pod drops what the policy does not admit.
    sh("nft", "-f", "-", ns=topo.node, input=f"""
table ip fs_nat {{ chain pre {{ type nat hook prerouting priority -100; ip daddr 10.96.0.10 tcp dport 80 dnat to {b4}:8080; }}; }}
""")
    # (dropped at the Pod, after the node confirmed the conntrack entry, as a CNI does)
    sh("nft", "-f", "-", ns=b_ns, input="""
table ip fs_policy { chain c_in { type filter hook input priority 0; tcp dport 9090 drop; }; }
""")
    inv = tmp_path / "inv.yaml"
    inv.write_text(INVENTORY)
    now = [time.time()]
    with in_netns(topo.node):
        ct = NetlinkConntrack()
    sink = ListSink()
    fx = FlowExporter(
        conntrack=ct, sink=sink, enricher=Enricher("node-a", StaticMetadata(str(inv))),
        active_timeout=60, idle_timeout=15, poll_interval=5, max_connections=1000, clock=lambda: now[0],
    )
    # a long-lived connection through the Service
    with in_netns(b_ns):
        srv = socket.socket()
    srv.bind((b4, 8080))
    srv.listen()
    with in_netns(a_ns):
        cli = socket.socket()
    cli.connect(("10.96.0.10", 80))
    conn, _ = srv.accept()
    cli.sendall(b"x" * 5000)
    got = 0
    while got < 5000:
        got += len(conn.recv(65536))
    # a connection the policy drops: SYNs without reply
    with in_netns(a_ns):
        denied = socket.socket()
    denied.setblocking(False)
    denied.connect_ex((b4, 9090))
    # the SYN crossed the node namespace before the dump
    wait_conntrack(topo.node, "the denied SYN", lambda r: r["fields"].get("dport", [""])[0] == "9090")
    try:
        assert await fx.poll_once() == 1  # the denied connection, at once
        cli.sendall(b"y" * 3000)
        got = 0
        while got < 3000:
            got += len(conn.recv(65536))
        now[0] += 61
        assert await fx.poll_once() == 1  # active timeout of the Service connection
        cli.close()
        conn.close()
        # both FINs and the last ACK crossed the node: conntrack says the connection ended
        wait_conntrack(topo.node, "the closed Service connection", lambda r: r["fields"]["dst"][0] == "10.96.0.10"
                       and r["state"] in ("TIME_WAIT", "CLOSE"))
        now[0] += 5
        assert await fx.poll_once() == 1  # TIME_WAIT: end of flow
    finally:
        denied.close()
        srv.close()
        await fx.shutdown()
    rows = conntrack_cli(topo.node)
    svc_row = find(rows, a4, "10.96.0.10", 80)
    records = decode_ours(encode(sink.batches))
    assert records == [
        {**r, "flowStartSeconds": r["flowStartSeconds"], "flowEndSeconds": r["flowEndSeconds"]}
        for r in decode_pypi_normalised(encode(sink.batches))
    ]
    deny, active, end = records
    assert deny["destinationTransportPort"] == 9090 and deny["ingressNetworkPolicyRuleAction"] == 2
    assert deny["ingressNetworkPolicyName"] == "server-web" and deny["reversePacketTotalCount"] == 0
    assert deny["packetTotalCount"] >= 1 and fx.metrics.denied._value.get() == 1
    for r in (active, end):
        assert r["destinationIPv4Address"] == b4 and r["destinationTransportPort"] == 8080
        assert r["destinationClusterIPv4"] == "10.96.0.10" and r["destinationServicePort"] == 80
        assert r["destinationServicePortName"] == "shop/server:web"
        assert r["ingressNetworkPolicyRuleName"] == "ingress-0" and r["ingressNetworkPolicyRuleAction"] == 1
        assert r["flowType"] == 1 and r["sourcePodName"] == "client" and r["destinationPodName"] == "server"
    assert (active["flowEndReason"], end["flowEndReason"]) == (2, 3)
    assert end["tcpState"] in ("TIME_WAIT", "CLOSE")
    # totals equal what conntrack -L reports now; the deltas add up to them
    f = svc_row["fields"]
    assert end["packetTotalCount"] == int(f["packets"][0]) and end["octetTotalCount"] == int(f["bytes"][0])
    assert end["reversePacketTotalCount"] == int(f["packets"][1])
    assert end["reverseOctetTotalCount"] == int(f["bytes"][1])
    assert active["octetDeltaCount"] + end["octetDeltaCount"] == end["octetTotalCount"]
    assert active["packetDeltaCount"] + end["packetDeltaCount"] == end["packetTotalCount"]
    assert active["reverseOctetDeltaCount"] + end["reverseOctetDeltaCount"] == end["reverseOctetTotalCount"]
    assert end["octetTotalCount"] >= 8000 + 40 * end["packetTotalCount"]  # the payload sent, plus headers


def decode_pypi_normalised(messages):
    import datetime
    import ipaddress

    out = []
    for r in decode_pypi(messages):
        n = {}
        for k, v in r.items():
            if isinstance(v, datetime.datetime):
                v = int(v.replace(tzinfo=datetime.timezone.utc).timestamp())
            elif isinstance(v, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                v = str(v)
            n[k] = v
        out.append(n)
    return out


@pytest.mark.slow
async def test_active_and_idle_exports_happen_on_time_with_real_timeouts(topo):
    """Real clock, short timeouts: a UDP stream is exported every active timeout while it
    runs and once more, idle, after it stops; the deltas add up to conntrack's totals."""
    a_ns, _, _ = topo.pods["a"]
    b_ns, b4, _ = topo.pods["b"]
    with in_netns(topo.node):
        ct = NetlinkConntrack()
    sink = ListSink()
    active, idle, poll = 1.0, 0.8, 0.1
    fx = FlowExporter(
        conntrack=ct, sink=sink, enricher=Enricher("node-a"),
        active_timeout=active, idle_timeout=idle, poll_interval=poll, max_connections=1000,
    )
    import asyncio

    stop = asyncio.Event()
    task = asyncio.create_task(fx.run(stop))
    with in_netns(b_ns):
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with in_netns(a_ns):
        cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind((b4, 6000))
    t_start = time.monotonic()
    sent = 0
    while time.monotonic() - t_start < 3.2:
        cli.sendto(b"z" * 100, (b4, 6000))
        sent += 1
        await asyncio.sleep(0.05)
    t_stop = time.monotonic()
    await asyncio.sleep(idle + 4 * poll + 0.5)
    row = find(conntrack_cli(topo.node), topo.pods["a"][1], b4, 6000)
    stop.set()
    await task
    cli.close()
    srv.close()
    recs = [(t, r) for (t, r) in zip(sink.times, [r for _, rs in sink.batches for r in rs]) if r["destinationTransportPort"] == 6000]
    reasons = [r["flowEndReason"] for _, r in recs]
    assert reasons[:-1].count(2) >= 2 and 1 in reasons, reasons
    actives = [t for t, r in recs if r["flowEndReason"] == 2]
    gaps = [b - a for a, b in zip(actives, actives[1:])]
    assert all(active - 0.05 <= g <= active + 2 * poll + 0.3 for g in gaps), gaps
    idle_t = next(t for t, r in recs if r["flowEndReason"] == 1)
    assert t_stop + idle - 0.3 <= idle_t <= t_stop + idle + 2 * poll + 0.5
    assert sum(r["packetDeltaCount"] for _, r in recs) == int(row["fields"]["packets"][0]) == sent
    assert sum(r["octetDeltaCount"] for _, r in recs) == int(row["fields"]["bytes"][0]) == sent * 128


def test_parser_on_a_mixed_kernel_table_equals_conntrack_cli(topo):
    """Five entry shapes the kernel lays out itself (TCP with protocol info, UDP, IPv6,
    marks, zones), 5000 entries: every one parsed as `conntrack -L` prints it."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks"))
    import agent_poll

    sh(sys.executable, agent_poll.CTFILL, "2000", ns=topo.node)
    with in_netns(topo.node):
        agent_poll.fill_mixed(3000)
        src = NetlinkConntrack()
        small = NetlinkConntrack()
    small._buf = bytearray(512)  # a receive buffer shorter than the kernel's datagrams
    try:
        result = src.dump()
        again = src.dump()  # the C parser hands back the unchanged entries themselves
        with in_netns(topo.node):  # the fresh socket after a failed dump opens where the agent runs
            with pytest.raises(ConntrackError) as cut:
                small.dump()
            assert cut.value.errno == errno.EMSGSIZE  # refused whole, not parsed cut short
            after = small.dump()  # the buffer grew
    finally:
        src.close()
        small.close()
    assert sorted(again.entries) == sorted(result.entries) == sorted(after.entries)
    if src.parser._native is not None:
        assert src.parser.reused == 5000 and all(a is b for a, b in zip(sorted(again.entries), sorted(result.entries)))
    out = sh("conntrack", "-L", "-f", "ipv4", ns=topo.node) + sh("conntrack", "-L", "-f", "ipv6", ns=topo.node)
    cli = set()
    for line in out.splitlines():
        f: dict[str, list[str]] = {}
        for k, v in _CT_LINE.findall(line):
            f.setdefault(k, []).append(v)
        if "src" not in f:
            continue
        state = line.split()[3] if line.startswith("tcp") else ""
        cli.add((f["src"][0], f["dst"][0], int(f["sport"][0]), int(f["dport"][0]), line.split()[0],
                 int(f.get("mark", ["0"])[0]), int(f.get("zone", ["0"])[0]), state))
    names = {6: "tcp", 17: "udp"}
    ours = {
        (format_address(e.orig_src), format_address(e.orig_dst), e.orig_sport, e.orig_dport, names[e.protocol],
         e.mark, e.zone, e.tcp_state_name if e.protocol == 6 else "")
        for e in result.entries
    }
    assert len(result.entries) == result.total == 5000
    assert ours == cli
    assert src.parser.layouts_compiled >= 5
    assert {e.zone for e in result.entries} == {0, 3} and 0x1234 in {e.mark for e in result.entries}
