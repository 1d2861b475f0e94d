"""The small cluster the dashboards' tests store: four Pods on two Nodes, a Service, an
external host, three policies and one denied connection, ten minutes of records."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "collector"))
from store_records import flow  # noqa: E402  (tests/collector: the aggregated records of the store tests)

NOW = 1_796_000_000  # a fixed clock: 2026-12-01, a whole minute
PODS = {
    "fe": ("shop", "frontend-6d4f8", "10.244.1.10", "node-a"),
    "cache": ("shop", "cache-0", "10.244.1.11", "node-a"),
    "be": ("shop", "backend-5c7b9", "10.244.2.10", "node-b"),
    "db": ("data", "db-0", "10.244.2.11", "node-b"),
}
EXT = "172.31.250.13"


def _record(src: str, dst: str | None, t: int, octets: int, rev: int, port: int, flow_type: int, **extra):
    ns, name, ip, node = PODS[src]
    fields = dict(
        sourceIPv4Address=ip, sourceTransportPort=30000 + t % 20000, destinationTransportPort=port, protocolIdentifier=6,
        sourcePodName=name, sourcePodNamespace=ns, sourceNodeName=node, flowType=flow_type,
        octetDeltaCount=octets, reverseOctetDeltaCount=rev, packetDeltaCount=octets // 1000 + 1,
        reversePacketDeltaCount=rev // 1000 + 1, octetTotalCount=octets, reverseOctetTotalCount=rev,
        flowStartSeconds=t - 5, flowEndSeconds=t,
    )
    if dst is None:
        fields["destinationIPv4Address"] = EXT
    else:
        dns, dname, dip, dnode = PODS[dst]
        fields.update(destinationIPv4Address=dip, destinationPodName=dname, destinationPodNamespace=dns,
                      destinationNodeName=dnode)
    fields.update(extra)
    return flow(**fields)


def cluster() -> list:
    out = []
    for i in range(40):  # ten minutes, a round every 15 s
        t = NOW - 600 + i * 15
        out.append(_record("fe", "be", t, 200_000 + i, 4_000, 8080, 2, destinationServicePortName="shop/backend:http",
                           destinationClusterIPv4="10.96.0.10", destinationServicePort=80,
                           ingressNetworkPolicyName="backend-from-frontend", ingressNetworkPolicyNamespace="shop",
                           ingressNetworkPolicyRuleAction=1, egressNetworkPolicyName="frontend-egress",
                           egressNetworkPolicyNamespace="shop", egressNetworkPolicyRuleAction=1))
        out.append(_record("fe", "cache", t, 50_000, 200, 6379, 1))
        out.append(_record("fe", None, t, 20_000, 30_000, 443, 3))
        out.append(_record("be", "db", t, 10_000, 800, 5432, 1, ingressNetworkPolicyName="db-from-backend-only",
                           ingressNetworkPolicyNamespace="data", ingressNetworkPolicyRuleAction=1))
        out.append(_record("fe", "db", t, 60, 0, 5432, 2, ingressNetworkPolicyName="db-from-backend-only",
                           ingressNetworkPolicyNamespace="data", ingressNetworkPolicyRuleAction=2,
                           egressNetworkPolicyName="frontend-egress", egressNetworkPolicyNamespace="shop",
                           egressNetworkPolicyRuleAction=1))
    return out


FLOWS = cluster()
RECORDS = [f.record for f in FLOWS]


def filled_store():
    """A chDB store in memory holding :data:`FLOWS` (a generator for a module fixture)."""
    from flowscope.collector.rows import flows_to_columns
    from flowscope.collector.store import open_store

    s = open_store("chdb://")
    s.open()
    columns, bad = flows_to_columns(FLOWS, time_inserted=NOW, commit_id=1)
    assert bad == 0
    s.insert(columns)
    yield s
    s.close()


class BrokenStore:
    """A store named like ``like`` whose every query fails, as when the server went away."""

    def __init__(self, like) -> None:
        self.database, self.table = like.database, like.table

    def rows(self, sql, params):
        raise ConnectionError("the ClickHouse server went away")


async def ui_client(store, auth=None, *, api: bool = True):
    """aiohttp's test client on the dashboards' app over ``store``, its clock at :data:`NOW`
    (``api``: build_app's, the store's JSON API in the same application)."""
    from aiohttp.test_utils import TestClient, TestServer

    from flowscope.collector.ui.app import build_app

    client = TestClient(TestServer(build_app(store, auth, now=lambda: float(NOW), api=api)))
    await client.start_server()
    return client
