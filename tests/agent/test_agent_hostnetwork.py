"""hostNetwork Pods in the lab are classified as what they are (Antrea issue #8260).

A hostNetwork Pod runs in its Node's namespace with the Node's address. Talking to a
Pod on another Node, to a hostNetwork Pod there, or (from the Node's gateway address,
inside its own Pod CIDR) to a Pod of its own Node, its connections are inter-node or
intra-node, seen alike by both Nodes' agents, never "from external" and never the
gateway taken for a Pod. Real conntrack of two lab Nodes, read by the agent's dump and
enriched with an inventory shaped as the API would give it.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import yaml
from conftest import require_root, require_tool
from flowscope.agent.conntrack import NetlinkConntrack, format_address
from flowscope.agent.metadata import FLOW_TYPE_INTER_NODE, FLOW_TYPE_INTRA_NODE, Enricher, StaticMetadata
from flowscope.lab import Lab

pytestmark = pytest.mark.netns

HOST_PORT = 10250  # the hostNetwork server's declared containerPort


def inventory(lab: Lab, host_pods: dict[str, tuple[str, int | None]]) -> str:
    items = []
    for name, node in lab.nodes.items():
        items.append({"kind": "Node", "metadata": {"name": name}, "spec": {"podCIDRs": [node.pod_cidr]},
                      "status": {"addresses": [{"type": "InternalIP", "address": node.underlay_ip}]}})
        for pod in node.pods:
            spec: dict = {"nodeName": name}
            if pod.host_network:
                spec["hostNetwork"] = True
                port = host_pods[pod.name][1]
                if port:
                    spec["containers"] = [{"name": "c", "ports": [{"containerPort": port}]}]
            items.append({"kind": "Pod", "metadata": {"name": pod.name, "namespace": pod.namespace},
                          "spec": spec, "status": {"podIPs": [{"ip": pod.ip}]}})
    return yaml.safe_dump({"kind": "List", "items": items})


def serve_once(lab: Lab, host, ip: str, port: int) -> threading.Thread:
    with lab.inside(host):
        srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, port))
    srv.listen()

    def run() -> None:
        conn, _ = srv.accept()
        while conn.recv(65536):
            pass
        conn.sendall(b"r" * 500)
        conn.close()
        srv.close()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def connect(lab: Lab, host, ip: str, port: int) -> None:
    with lab.inside(host):
        c = socket.socket()
    c.settimeout(30)
    c.connect((ip, port))
    c.sendall(b"q" * 300)
    c.shutdown(socket.SHUT_WR)
    while c.recv(65536):
        pass
    c.close()


def dump(lab: Lab, node) -> list:
    with lab.inside(node):
        ct = NetlinkConntrack()
    try:
        return ct.dump().entries
    finally:
        ct.close()


def find(entries, dst: str, dport: int):
    for e in entries:
        if format_address(e.reply_src) == dst and e.reply_sport == dport:
            return e
    raise AssertionError(f"no conntrack entry to {dst}:{dport}")


def test_host_network_pods_are_classified_as_what_they_are(tmp_path):
    require_root()
    require_tool("nft")
    with Lab() as lab:
        node_a, node_b = lab.add_node("node-a"), lab.add_node("node-b")
        web = lab.add_pod("node-b", "web-0", "shop")
        local = lab.add_pod("node-a", "cache-0", "shop")
        lab.add_host_network_pod("node-a", "agent-a", "kube-system")
        kubelet_b = lab.add_host_network_pod("node-b", "kubelet-proxy-b", "kube-system")
        inv = tmp_path / "inv.yaml"
        inv.write_text(inventory(lab, {"agent-a": ("node-a", None), "kubelet-proxy-b": ("node-b", HOST_PORT)}))
        meta = StaticMetadata(str(inv))
        on_a, on_b = Enricher("node-a", meta), Enricher("node-b", meta)

        servers = [
            serve_once(lab, web, web.ip, 8080),
            serve_once(lab, node_b, kubelet_b.ip, HOST_PORT),
            serve_once(lab, local, local.ip, 6379),
        ]
        connect(lab, node_a, web.ip, 8080)  # hostNetwork Pod -> Pod on another Node
        connect(lab, node_a, kubelet_b.ip, HOST_PORT)  # hostNetwork Pod -> hostNetwork Pod elsewhere
        connect(lab, node_a, local.ip, 6379)  # the Node (its gateway address) -> its own Pod
        for th in servers:
            th.join(30)
        deadline = time.monotonic() + 30
        while True:  # the kernel may account the last packets a little later
            table_a, table_b = dump(lab, node_a), dump(lab, node_b)
            try:
                pairs = {
                    "to-pod": (find(table_a, web.ip, 8080), find(table_b, web.ip, 8080)),
                    "to-host-pod": (find(table_a, kubelet_b.ip, HOST_PORT), find(table_b, kubelet_b.ip, HOST_PORT)),
                }
                gw = find(table_a, local.ip, 6379)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    # hostNetwork Pod -> Pod on node-b: inter-node on both Nodes, the Pod named where it lives
    a, b = (on_a.enrich(pairs["to-pod"][0]), on_b.enrich(pairs["to-pod"][1]))
    assert format_address(pairs["to-pod"][0].orig_src) == node_a.underlay_ip
    assert (a.flow_type, b.flow_type) == (FLOW_TYPE_INTER_NODE, FLOW_TYPE_INTER_NODE)
    assert not a.host_only and not b.host_only
    assert (a.source_node_name, b.destination_node_name, b.destination_pod_name) == ("node-a", "node-b", "web-0")
    # hostNetwork Pod -> hostNetwork Pod on node-b (its declared port names it)
    a, b = (on_a.enrich(pairs["to-host-pod"][0]), on_b.enrich(pairs["to-host-pod"][1]))
    assert (a.flow_type, b.flow_type) == (FLOW_TYPE_INTER_NODE, FLOW_TYPE_INTER_NODE)
    assert (b.destination_pod_namespace, b.destination_pod_name) == ("kube-system", "kubelet-proxy-b")
    assert a.destination_pod_name == "" and not a.host_only
    assert a.ingress is None and b.ingress is None  # NetworkPolicies do not apply to hostNetwork Pods
    # the Node's gateway address (inside its Pod CIDR) is the Node, not a Pod
    assert format_address(gw.orig_src) == node_a.gateway_ip
    g = on_a.enrich(gw)
    assert g.flow_type == FLOW_TYPE_INTRA_NODE and g.source_pod_name == "" and g.destination_pod_name == "cache-0"
