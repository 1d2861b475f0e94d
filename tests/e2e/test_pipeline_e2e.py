"""The whole pipeline against the kernel: two Node namespaces, real conntrack, two agents,
mutual TLS to the aggregator, the collector, and real traffic of known sizes.

Every assertion compares the collector's output with something outside flowscope: the
byte counts with what each Node's conntrack table says (``conntrack -L`` in that Node's
namespace) and with the payload the traffic programs sent, and the Kubernetes fields with
the inventory the lab was built from.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import require_root, require_tool
from flowscope.demo import SERVICE_IP, Pipeline, latest_per_connection
from flowscope.lab import Lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]

_ENTRY = re.compile(
    r"src=(?P<src>\S+) dst=(?P<dst>\S+) sport=(?P<sport>\d+) dport=(?P<dport>\d+) packets=(?P<pk>\d+) bytes=(?P<by>\d+)"
    r" .*?src=\S+ dst=\S+ sport=\d+ dport=\d+ packets=(?P<rpk>\d+) bytes=(?P<rby>\d+)"
)


def conntrack_counters(netns: str, src: str, sport: int) -> tuple[int, int, int, int]:
    """(packets, octets, reverse packets, reverse octets) of one connection in one Node."""
    out = subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-L"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        m = _ENTRY.search(line)
        if m and m["src"] == src and int(m["sport"]) == sport:
            return int(m["pk"]), int(m["by"]), int(m["rpk"]), int(m["rby"])
    raise AssertionError(f"no conntrack entry from {src}:{sport} in {netns}:\n{out}")


def retransmitted_segments(netns: str) -> int:
    """TCP segments the kernel retransmitted in ``netns`` since it was made (the namespace's
    own Tcp RetransSegs counter): a loaded machine retransmits now and then, and each resent
    segment is counted again by conntrack."""
    snmp = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/snmp"], capture_output=True,
                          text=True, check=True).stdout
    names, values = [line.split()[1:] for line in snmp.splitlines() if line.startswith("Tcp:")]
    return int(values[names.index("RetransSegs")])


MSS = 1460  # the lab's links keep the 1500-octet default MTU: at most this much payload per resent segment


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    require_root()
    require_tool("ip", "nft", "conntrack", "ss")
    workdir: Path = tmp_path_factory.mktemp("pipeline")
    with Lab() as lab:
        pipeline = Pipeline(lab, workdir)
        try:
            pipeline.start()
            plan = pipeline.plan()
            answers = pipeline.run_plan(plan)
            assert pipeline.wait_settled(plan) == []
            counters = {}
            for r in latest_per_connection(pipeline.records()).values():
                src, sport = r.get("sourceIPv4Address"), r.get("sourceTransportPort")
                if src in {p.ip for p in pipeline.pods.values()}:
                    for node in lab.nodes.values():
                        try:
                            counters[(node.name, src, sport)] = conntrack_counters(node.netns, src, sport)
                        except AssertionError:
                            pass
            retransmitted = {name: retransmitted_segments(pod.netns) for name, pod in pipeline.pods.items()
                             if not pod.host_network}
        finally:
            pipeline.stop()
        yield pipeline, answers, latest_per_connection(pipeline.records()), counters, retransmitted


def _one(records: dict, **match: object) -> dict:
    found = [r for r in records.values() if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"expected one record matching {match}, got {len(found)}: {found}"
    return found[0]


def test_traffic_was_answered_as_the_lab_says(run) -> None:
    _, answers, _, _, _ = run
    assert answers["Pod -> Service (ClusterIP, inter-Node)"] == "4000"
    assert answers["Pod -> Pod (same Node)"] == "200"
    assert answers["Pod -> external host"] == "30000"
    assert answers["Pod -> Pod, allowed by NetworkPolicy"] == "800"
    assert answers["Pod -> Pod, denied by NetworkPolicy"].startswith("refused")


def test_inter_node_service_flow_is_one_correlated_record_matching_both_nodes_conntrack(run) -> None:
    pipeline, _, records, counters, resent = run
    fe, be = pipeline.pods["frontend"], pipeline.pods["backend"]
    r = _one(records, sourceIPv4Address=fe.ip, destinationIPv4Address=be.ip, destinationTransportPort=8080)
    # correlated: both sides' Kubernetes fields in one record
    assert (r["sourcePodNamespace"], r["sourcePodName"], r["sourceNodeName"]) == ("shop", fe.name, "node-a")
    assert (r["destinationPodNamespace"], r["destinationPodName"], r["destinationNodeName"]) == ("shop", be.name, "node-b")
    assert r["flowType"] == 2
    assert r["destinationClusterIPv4"] == SERVICE_IP and r["destinationServicePort"] == 80
    assert r["destinationServicePortName"] == "shop/backend:http"
    sport = r["sourceTransportPort"]
    for node, side in (("node-a", "FromSourceNode"), ("node-b", "FromDestinationNode")):
        pk, by, rpk, rby = counters[(node, fe.ip, sport)]
        assert r[f"packetTotalCount{side}"] == pk, node
        assert r[f"octetTotalCount{side}"] == by, node
        assert r[f"reversePacketTotalCount{side}"] == rpk, node
        assert r[f"reverseOctetTotalCount{side}"] == rby, node
    # consistent with what was sent: 200000 payload octets plus TCP/IP headers, 4000 back, and
    # whatever either end resent (counted by its namespace's kernel, bounded by the frontend's
    # and the backend's retransmissions over the whole run)
    assert 200_000 < r["octetTotalCountFromSourceNode"] < (
        200_000 + 80 * r["packetTotalCountFromSourceNode"] + MSS * resent["frontend"])
    assert 4_000 < r["reverseOctetTotalCountFromSourceNode"] < (
        4_000 + 80 * r["reversePacketTotalCountFromSourceNode"] + MSS * resent["backend"])


def test_intra_node_and_to_external_flows(run) -> None:
    pipeline, _, records, counters, resent = run
    fe, cache = pipeline.pods["frontend"], pipeline.pods["cache"]
    intra = _one(records, sourceIPv4Address=fe.ip, destinationIPv4Address=cache.ip)
    assert intra["flowType"] == 1
    assert (intra["sourceNodeName"], intra["destinationNodeName"]) == ("node-a", "node-a")
    pk, by, rpk, rby = counters[("node-a", fe.ip, intra["sourceTransportPort"])]
    assert (intra["packetTotalCount"], intra["octetTotalCount"]) == (pk, by)
    assert (intra["reversePacketTotalCount"], intra["reverseOctetTotalCount"]) == (rpk, rby)
    assert 50_000 < by < 50_000 + 80 * pk + MSS * resent["frontend"]
    ext = _one(records, sourceIPv4Address=fe.ip, destinationIPv4Address=pipeline.ext.underlay_ip)
    assert ext["flowType"] == 3 and ext["destinationPodName"] == ""
    pk, by, _, rby = counters[("node-a", fe.ip, ext["sourceTransportPort"])]
    assert ext["octetTotalCount"] == by and ext["reverseOctetTotalCount"] == rby
    assert 30_000 < rby


def test_network_policy_attribution_allow_and_drop(run) -> None:
    pipeline, _, records, _, _ = run
    db = pipeline.pods["db"]
    allowed = _one(records, sourceIPv4Address=pipeline.pods["backend"].ip, destinationIPv4Address=db.ip)
    denied = _one(records, sourceIPv4Address=pipeline.pods["frontend"].ip, destinationIPv4Address=db.ip)
    for r, action in ((allowed, 1), (denied, 2)):
        assert r["ingressNetworkPolicyName"] == "db-from-backend-only"
        assert r["ingressNetworkPolicyNamespace"] == "data"
        assert r["ingressNetworkPolicyType"] == 1
        assert r["ingressNetworkPolicyRuleAction"] == action
    assert denied["reversePacketTotalCount"] == 0  # nothing ever came back


def test_only_pod_traffic_is_exported(run) -> None:
    # The agents' own TLS sessions to the aggregator cross the Nodes' conntrack too: with an
    # inventory they are Node traffic and never reach the collector.
    pipeline, _, records, _, _ = run
    pod_ips = {p.ip for p in pipeline.pods.values()}
    assert records and all(r["sourceIPv4Address"] in pod_ips or r["destinationIPv4Address"] in pod_ips for r in records.values())
    assert all(r.get("flowType") in (1, 2, 3, 4) for r in records.values())


def test_udp_inter_node_flow(run) -> None:
    pipeline, _, records, counters, resent = run
    fe, be = pipeline.pods["frontend"], pipeline.pods["backend"]
    r = _one(records, sourceIPv4Address=fe.ip, destinationIPv4Address=be.ip, protocolIdentifier=17)
    assert r["packetTotalCountFromSourceNode"] == 5 and r["packetTotalCountFromDestinationNode"] == 5
    assert r["octetTotalCountFromSourceNode"] == 5 * (512 + 28)  # payload + IPv4 + UDP headers
    pk, by, rpk, rby = counters[("node-b", fe.ip, r["sourceTransportPort"])]
    assert (r["octetTotalCountFromDestinationNode"], r["reverseOctetTotalCountFromDestinationNode"]) == (by, rby)
