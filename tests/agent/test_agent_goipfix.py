"""The real agent exporting to go-ipfix's real collector over TCP and UDP, and to our aggregator over gRPC.

`flowscope agent` runs in a node namespace of the netns lab with kernel conntrack; two
Pods talk over IPv4 and IPv6 (UDP and TCP), and the client also reaches an external host
through a masquerading node, so that conntrack's reply tuple shows source NAT. The agent
exports through a recording proxy to go-ipfix's collector (Antrea's IPFIX library): go-ipfix
must learn both templates whole and decode every record the agent sent with every field;
every message is checked for the shape go-ipfix reads (one set, one template a set). The
TCP run also exports the Pod labels (recordContents.podLabels).
"""

from __future__ import annotations

import json
import socket

import pytest
from agent_netns import in_netns, sh, topology
from conftest import require_root, require_tool
from goipfix_peer import GoIpfixCollector, RecordingProxy, check_readable_by_go_ipfix
from test_agent_e2e import start_agent, stop_agent, tcp_transfer, wait_for, write_config
from test_agent_netns import udp_exchange

from flowscope.agent.records import IPV4_TEMPLATE_ID, IPV6_TEMPLATE_ID
from flowscope.ipfix.antrea import agent_fields

pytestmark = [pytest.mark.netns, pytest.mark.peer, pytest.mark.slow]

EXT4, EXT6 = "198.51.100.7", "2001:db8::7"
MASQUERADE = """
table inet fsnat {
  chain post { type nat hook postrouting priority 100; ip daddr 198.51.100.7 masquerade; ip6 daddr 2001:db8::7 masquerade; }
}
"""


@pytest.fixture(scope="module")
def lab():
    require_root()
    require_tool("ip", "nft", "conntrack", "ss")
    with topology(("a", "b")) as t:
        t.add_pod("ext", 3, v4=EXT4, v6=EXT6)  # not in the inventory: an external host
        sh("nft", "-f", "-", ns=t.node, input=MASQUERADE)
        yield t


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
async def test_agent_to_go_ipfix_every_record_every_field(lab, tmp_path, protocol):
    topo = lab
    a_ns, a4, a6 = topo.pods["a"]
    b_ns, b4, b6 = topo.pods["b"]
    ext_ns = topo.pods["ext"][0]
    labels = protocol == "tcp"
    base = 7000 if labels else 7100
    cfg = write_config(tmp_path, 0, protocol, metrics=f"127.0.0.1:{9391 if labels else 9392}")
    with GoIpfixCollector(protocol) as collector:
        with in_netns(topo.node):  # the agent's collector address is its node's loopback
            proxy = await RecordingProxy(protocol, collector.port).start()
        text = cfg.read_text().replace("127.0.0.1:0:", f"127.0.0.1:{proxy.port}:")
        text = text.replace('metricsAddress: "127.0.0.1:9390"', f'metricsAddress: "127.0.0.1:{9391 if labels else 9392}"')
        cfg.write_text(text + ("recordContents: {podLabels: true}\n" if labels else ""))
        proc = await start_agent(topo.node, cfg)
        log = ""
        try:
            udp_exchange(a_ns, b_ns, b4, base + 1, count=3, size=100)
            udp_exchange(a_ns, b_ns, b6, base + 2, count=3, size=100, family=socket.AF_INET6)
            snat4 = udp_exchange(a_ns, ext_ns, EXT4, base + 3, count=2, size=60)
            snat6 = udp_exchange(a_ns, ext_ns, EXT6, base + 4, count=2, size=60, family=socket.AF_INET6)
            assert tcp_transfer(a_ns, b_ns, b4, base + 5, 20_000) == 20_000
            want = {base + p for p in range(1, 6)}

            def arrived() -> set[int]:
                return {r["destinationTransportPort"] for _, r in proxy.records()} & want

            ok = await wait_for(lambda: arrived() == want)
        finally:
            log = await stop_agent(proc)
        sent = proxy.records()
        await wait_for(lambda: collector.count() >= len(sent), 20)
        await proxy.close()
        collector.stop()
    assert ok, f"arrived {arrived()} of {want}\nagent log:\n{log}"
    assert "does not exist" not in collector.errors and "closing connection" not in collector.errors, collector.errors
    counts = check_readable_by_go_ipfix(proxy.messages())
    assert counts["records"] == len(sent) and counts["template_sets"] >= 2
    learned = collector.templates()
    assert learned[IPV4_TEMPLATE_ID] == list(agent_fields(4, labels=labels))
    assert learned[IPV6_TEMPLATE_ID] == list(agent_fields(6, labels=labels))
    got = collector.data()
    assert len(got) == len(sent)
    for (tid, mine), (gtid, theirs) in zip(sent, got):
        assert gtid == tid and theirs == mine, {k: (mine.get(k), theirs.get(k)) for k in mine if mine[k] != theirs.get(k)}
    by_port = {r["destinationTransportPort"]: r for _, r in sent}
    assert {by_port[base + 1]["sourceIPv4Address"], by_port[base + 2]["sourceIPv6Address"]} == {a4, a6}
    # the masquerade: conntrack's reply tuple goes back to the node's address on the way out
    gw4, gw6 = "169.254.3.1", "fd00:ffff:3::1"
    s4, s6 = by_port[base + 3], by_port[base + 4]
    assert (s4["flowType"], s4["proxySnatIPv4"], s4["proxySnatPort"]) == (3, gw4, snat4)
    assert (s6["flowType"], s6["proxySnatIPv6"], s6["proxySnatPort"]) == (3, gw6, snat6)
    assert by_port[base + 1]["proxySnatIPv4"] == "0.0.0.0" and by_port[base + 1]["proxySnatPort"] == 0
    if labels:
        r = by_port[base + 1]
        assert json.loads(r["sourcePodLabels"]) == {"app": "client"}
        assert json.loads(r["destinationPodLabels"]) == {"app": "server"}
        assert s4["destinationPodLabels"] == ""


async def test_agent_exports_over_grpc_to_the_aggregator(lab, tmp_path):
    """`flowCollectorAddr: HOST:PORT:grpc`: the real agent sends Antrea's Flow messages over
    mutual TLS to the aggregator's gRPC collecting process; the records it aggregates are
    the agent's connections, Pod names, Service and SNAT fields included."""
    from pki import make_pki

    from flowscope.aggregator.config import parse_config
    from flowscope.aggregator.service import FlowAggregator

    topo = lab
    a_ns, a4, a6 = topo.pods["a"]
    b_ns, b4, b6 = topo.pods["b"]
    ext_ns = topo.pods["ext"][0]
    pki = make_pki(tmp_path)
    config = parse_config({
        "aggregatorTransportProtocol": "grpc", "listenAddress": "127.0.0.1", "listenPort": 0, "apiAddress": "",
        "tls": {"caFile": pki["ca"], "certFile": pki["server_cert"], "keyFile": pki["server_key"]},
        "flowExportInterval": "1h", "inactiveFlowTimeout": "5m",
    })

    class Sink:
        name = "list"
        got: list = []

        async def start(self):
            pass

        async def write(self, batch):
            self.got.extend(batch)

        async def close(self):
            pass

    sink = Sink()
    agg = FlowAggregator(config, sinks=[(sink, 1000)])
    with in_netns(topo.node):  # the agent's aggregator is its node's loopback
        await agg.start(api=False, ticker=False)
    cfg = write_config(tmp_path, agg.collecting_port, "tls", pki, metrics="127.0.0.1:9393")
    cfg.write_text(cfg.read_text().replace(f":{agg.collecting_port}:tls", f":{agg.collecting_port}:grpc")
                   .replace('metricsAddress: "127.0.0.1:9390"', 'metricsAddress: "127.0.0.1:9393"'))
    proc = await start_agent(topo.node, cfg)
    try:
        udp_exchange(a_ns, b_ns, b4, 7201, count=3, size=100)
        udp_exchange(a_ns, b_ns, b6, 7202, count=3, size=100, family=socket.AF_INET6)
        snat = udp_exchange(a_ns, ext_ns, EXT4, 7203, count=2, size=60)
        ok = await wait_for(lambda: agg.process.stats.records_received >= 3
                            and {7201, 7202, 7203} <= {f.key[3] for f in agg.process.flows.values()})
    finally:
        log = await stop_agent(proc)
        grpc_stats = agg.collecting.stats
        await agg.close()
    assert ok, f"aggregator saw {agg.process.stats.records_received} records\nagent log:\n{log}"
    assert grpc_stats.malformed == 0 and grpc_stats.sessions_total >= 1
    by_port = {e.record["destinationTransportPort"]: e.record for e in sink.got}
    u4, u6, s4 = by_port[7201], by_port[7202], by_port[7203]
    assert (u4["sourceIPv4Address"], u4["sourcePodName"], u4["destinationPodName"], u4["flowType"]) == (
        a4, "client", "server", 1)
    assert (u4["packetTotalCount"], u4["octetTotalCount"]) == (3, 3 * 128)
    assert (u6["sourceIPv6Address"], u6["destinationIPv6Address"]) == (a6, b6)
    assert (s4["flowType"], s4["proxySnatIPv4"], s4["proxySnatPort"]) == (3, "169.254.3.1", snat)
