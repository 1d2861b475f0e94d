"""A real pipeline fills the store: the netns lab (two Nodes, real conntrack), two real
agents, the aggregator over mutual TLS, and ``flowscope collector --store chdb://...``.
``flowscope flows --store`` then shows each connection the lab made with its Pods, its
Service, its policy and action, and byte counts equal to what the collector received and
consistent with the payload the traffic programs sent (payload plus at most 80 octets of
headers per packet); the sum of a connection's stored deltas is its final total.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import require_root, require_tool
from flowscope.demo import SERVICE_IP, Pipeline, latest_per_connection
from flowscope.lab import Lab
from test_collector_cli import FLOWSCOPE

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(240)]


def flows(store: Path, *args: str) -> str:
    p = subprocess.run([FLOWSCOPE, "flows", "--store", f"chdb://{store}", *args], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    require_root()
    require_tool("ip", "nft", "conntrack", "ss")
    workdir: Path = tmp_path_factory.mktemp("store-pipeline")
    store = workdir / "store"
    with Lab() as lab:
        pipeline = Pipeline(lab, workdir, store=store)
        try:
            pipeline.start()
            plan = pipeline.plan()
            pipeline.run_plan(plan)
            assert pipeline.wait_settled(plan) == []
        finally:
            pipeline.stop()  # SIGTERM: the collector commits what it holds
        yield pipeline, store, pipeline.records()


def _conn(r: dict) -> tuple:
    return (r["sourceIP"], r["sourceTransportPort"], r["destinationIP"], r["destinationTransportPort"],
            r["protocolIdentifier"])


def test_the_store_holds_every_record_the_collector_received(run) -> None:
    _, store, received = run
    rows = [json.loads(x) for x in flows(store, "-o", "json", "--limit", "10000").splitlines()]
    assert len(rows) == len(received) > 0
    got = sorted((r["sourceIP"], r["sourceTransportPort"], r["octetDeltaCount"], r["reverseOctetDeltaCount"],
                  r["octetTotalCount"]) for r in rows)
    want = sorted((r["sourceIPv4Address"], r["sourceTransportPort"], r["octetDeltaCount"], r["reverseOctetDeltaCount"],
                   r["octetTotalCount"]) for r in received)
    assert got == want
    # a connection's deltas add up to its final totals (what --top and the roll-ups sum),
    # the denied inter-Node one included (its destination Node's record is exported first,
    # then the source Node's takes over without counting again)
    by_conn: dict = {}
    for r in rows:
        acc = by_conn.setdefault(_conn(r), [0, 0, 0, 0, False])
        acc[0] += r["octetDeltaCount"]
        acc[1] = max(acc[1], r["octetTotalCount"])
        acc[2] += r["reverseOctetDeltaCount"]
        acc[3] = max(acc[3], r["reverseOctetTotalCount"])
        acc[4] = acc[4] or 2 in (r["ingressNetworkPolicyRuleAction"], r["egressNetworkPolicyRuleAction"])
    checked = by_conn
    assert len(checked) >= 6 and any(a[4] for a in checked.values())
    assert all(a[0] == a[1] and a[2] == a[3] for a in checked.values()), checked


def test_flows_shows_each_connection_with_pods_service_policy_action_and_bytes(run) -> None:
    pipeline, store, received = run
    latest = latest_per_connection(received)
    pods = pipeline.pods
    fe, be, db, cache = pods["frontend"], pods["backend"], pods["db"], pods["cache"]
    table = flows(store, "--limit", "10000", "-o", "wide").splitlines()

    def lines(src: str, dst: str, port: int) -> list[list[str]]:
        return [x.split() for x in table[1:] if x.split()[1] == src and x.split()[2] == dst
                and x.split()[-6].endswith(f":{port}")]

    def total(src_ip: str, dst_ip: str, port: int, proto: int = 6) -> tuple[int, int, int]:
        r = next(r for r in latest.values() if r["sourceIPv4Address"] == src_ip
                 and r["destinationIPv4Address"] == dst_ip and r["destinationTransportPort"] == port
                 and r["protocolIdentifier"] == proto)
        return r["octetTotalCount"], r["reverseOctetTotalCount"], r["packetTotalCount"]

    def summed(ls: list[list[str]]) -> tuple[int, int]:
        fwd = rev = 0
        for x in ls:
            f, r = x[-4].split("/")
            fwd, rev = fwd + int(f), rev + int(r)
        return fwd, rev

    # Pod -> Service across Nodes: both Pods, the Service, TCP inter-node, 200000 octets sent
    svc = lines(f"shop/{fe.name}", f"shop/{be.name}", 8080)
    assert svc and all(x[3] == "shop/backend:http" and x[4] == "tcp" and x[5] == "inter-node" for x in svc)
    octets, rocts, pk = total(fe.ip, be.ip, 8080)
    assert summed(svc) == (octets, rocts) and 200_000 < octets < 200_000 + 80 * pk and 4_000 < rocts
    # Pod -> Pod on one Node
    intra = lines(f"shop/{fe.name}", f"{cache.namespace}/{cache.name}", 6379)
    assert intra and all(x[5] == "intra-node" for x in intra)
    octets, _, pk = total(fe.ip, cache.ip, 6379)
    assert summed(intra)[0] == octets and 50_000 < octets < 50_000 + 80 * pk
    # allowed and denied by the NetworkPolicy: policy and action named
    allowed = lines(f"{be.namespace}/{be.name}", f"{db.namespace}/{db.name}", 5432)
    denied = lines(f"shop/{fe.name}", f"{db.namespace}/{db.name}", 5432)
    assert allowed and all("data/db-from-backend-only:Allow" in x for x in allowed)
    assert denied and all("data/db-from-backend-only:Drop" in x for x in denied)
    # to an external host: the address, not a Pod
    ext = [x.split() for x in table[1:] if x.split()[2] == f"{pipeline.ext.underlay_ip}:443"]
    assert ext and all(x[5] == "to-external" for x in ext)
    # the filters find the same connections
    drop = [json.loads(x) for x in flows(store, "--action", "drop", "-o", "json", "--limit", "1000").splitlines()]
    # (the destination Node's half of the denied connection arrives without the source Pod: the
    # aggregator exports it uncorrelated; its addresses are the frontend's)
    assert (fe.name, db.name) in {(r["sourcePodName"], r["destinationPodName"]) for r in drop}
    assert all(r["destinationPodName"] == db.name and r["sourceIP"] == fe.ip for r in drop)
    by_svc = [json.loads(x) for x in flows(store, "--service", "shop/backend:http", "-o", "json").splitlines()]
    assert by_svc and all(r["destinationClusterIP"] == SERVICE_IP for r in by_svc)
    # --top: the Service flow is the largest talker by bytes from the frontend Pod
    top = json.loads(flows(store, "--top", "1", "--group", "pod", "--side", "destination", "-o", "json"))
    assert top["entries"][0]["key"] == f"shop/{be.name}"
    assert top["total"]["bytes"] == sum(r["octetDeltaCount"] + r["reverseOctetDeltaCount"] for r in received)
