"""Conntrack entries and an inventory for the agent's tests, built without a kernel."""

from __future__ import annotations

import socket

from flowscope.agent.conntrack import IPS_SEEN_REPLY, ConnKey, ConntrackEntry


def ip(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


def entry(
    src: str = "10.244.0.11",
    dst: str = "10.244.0.12",
    sport: int = 40000,
    dport: int = 80,
    *,
    proto: int = 6,
    reply_src: str | None = None,
    reply_sport: int | None = None,
    packets: int = 0,
    octets: int = 0,
    rpackets: int = 0,
    roctets: int = 0,
    status: int = IPS_SEEN_REPLY,
    tcp_state: int | None = None,
    ct_id: int = 1,
    start_ns: int = 1_700_000_000_000_000_000,
    stop_ns: int = 0,
    zone: int = 0,
    mark: int = 0,
) -> ConntrackEntry:
    if tcp_state is None:
        tcp_state = 3 if proto == 6 else -1
    rs = reply_src or dst
    rsp = reply_sport if reply_sport is not None else dport
    key = ConnKey(zone, proto, ip(src), ip(dst), sport, dport, 0)
    return ConntrackEntry(
        key, ip(rs), ip(src), rsp, sport, packets, octets, rpackets, roctets, start_ns, stop_ns, status, tcp_state,
        mark, b"", ct_id, 0, 0,
    )


# One node, a client and a server Pod, a Service and a policy admitting the client on 8080:
# the inventory of the exporter tests and of the netns tests (whose Pods have these addresses).
INVENTORY = """
kind: List
items:
- {kind: Node, metadata: {name: node-a}, spec: {podCIDRs: [10.244.0.0/24, "fd00:244::/64"]}}
- {kind: Namespace, metadata: {name: shop}}
- {kind: Pod, metadata: {name: client, namespace: shop, labels: {app: client}}, spec: {nodeName: node-a},
   status: {podIPs: [{ip: 10.244.0.11}, {ip: "fd00:244::b"}]}}
- {kind: Pod, metadata: {name: server, namespace: shop, labels: {app: server}}, spec: {nodeName: node-a},
   status: {podIPs: [{ip: 10.244.0.12}, {ip: "fd00:244::c"}]}}
- {kind: Service, metadata: {name: server, namespace: shop}, spec: {clusterIPs: [10.96.0.10], ports: [{name: web, port: 80}]}}
- kind: NetworkPolicy
  metadata: {name: server-web, namespace: shop}
  spec:
    podSelector: {matchLabels: {app: server}}
    ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]
"""
