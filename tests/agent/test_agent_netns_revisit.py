"""A denied connection revisited, against the real kernel: the agent exports a SYN that the
policy drops (the Pod's nftables drop it, the node's conntrack sees no answer), then the
policy changes (the inventory admits the port, the drop rule goes, as a watch and a CNI
would do it), the client's retransmitted SYN is answered on the same conntrack entry, and
the agent exports that connection again, now allowed, with the octets it really moved."""

from __future__ import annotations

import socket
import time

import pytest
from agent_entries import INVENTORY
from agent_netns import in_netns, sh
from agent_peers import decode_ours, encode
from flowscope.agent.conntrack import NetlinkConntrack
from flowscope.agent.exporter import FlowExporter
from flowscope.agent.metadata import Enricher, StaticMetadata
from test_agent_exporter import ListSink
from test_agent_netns import topo, wait_conntrack  # noqa: F401 - topo is the fixture

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

ALLOW_9090 = {"kind": "NetworkPolicy", "metadata": {"name": "server-9090", "namespace": "shop"},
              "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": 9090}]}]}}


async def test_a_denied_connection_that_is_answered_later_is_exported_again_as_allowed(topo, tmp_path):  # noqa: F811
    a_ns, _, _ = topo.pods["a"]
    b_ns, b4, _ = topo.pods["b"]
    sh("nft", "-f", "-", ns=b_ns, input="table ip fs_policy { chain c_in { type filter hook input priority 0; "
                                          "tcp dport 9090 drop; }; }\n")
    inv = tmp_path / "inv.yaml"
    inv.write_text(INVENTORY)
    metadata = StaticMetadata(str(inv))
    now = [time.time()]
    with in_netns(topo.node):
        ct = NetlinkConntrack()
    sink = ListSink()
    fx = FlowExporter(conntrack=ct, sink=sink, enricher=Enricher("node-a", metadata), active_timeout=60,
                      idle_timeout=15, poll_interval=5, max_connections=1000, clock=lambda: now[0])
    with in_netns(b_ns):
        srv = socket.socket()
    srv.bind((b4, 9090))
    srv.listen()
    with in_netns(a_ns):
        cli = socket.socket()
    cli.setblocking(False)
    cli.connect_ex((b4, 9090))
    try:
        wait_conntrack(topo.node, "the dropped SYN", lambda r: r["fields"].get("dport", [""])[0] == "9090")
        assert await fx.poll_once() == 1  # denied, at once
        # the policy changes: the watch brings the new NetworkPolicy, the CNI stops dropping
        inventory = metadata.inventory()
        assert inventory is not None
        inventory.apply(ALLOW_9090)
        sh("nft", "delete", "table", "ip", "fs_policy", ns=b_ns)
        # the client's next SYN retransmission is answered, on the same conntrack entry
        wait_conntrack(topo.node, "the answered connection", lambda r: r["fields"].get("dport", [""])[0] == "9090"
                       and r["state"] == "ESTABLISHED", timeout=30)
        cli.setblocking(True)
        conn, _ = srv.accept()
        cli.sendall(b"x" * 4000)
        got = 0
        while got < 4000:
            got += len(conn.recv(65536))
        conn.sendall(b"r" * 1000)
        got = 0
        while got < 1000:
            got += len(cli.recv(65536))
        assert await fx.poll_once() == 0  # live again: exported on its schedule
        assert fx.store.revived_total == 1
        now[0] += 61
        assert await fx.poll_once() == 1
    finally:
        cli.close()
        srv.close()
        await fx.shutdown()
    denied, revived = decode_ours(encode(sink.batches))[:2]
    assert (denied["ingressNetworkPolicyName"], denied["ingressNetworkPolicyRuleAction"]) == ("server-web", 2)
    assert denied["reversePacketTotalCount"] == 0
    assert revived["sourceTransportPort"] == denied["sourceTransportPort"]  # the same connection
    assert (revived["ingressNetworkPolicyName"], revived["ingressNetworkPolicyRuleName"],
            revived["ingressNetworkPolicyRuleAction"]) == ("server-9090", "ingress-0", 1)
    assert revived["octetDeltaCount"] >= 4000 and revived["reverseOctetDeltaCount"] >= 1000
    assert revived["octetDeltaCount"] + denied["octetDeltaCount"] == revived["octetTotalCount"]
