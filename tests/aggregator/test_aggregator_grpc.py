"""Antrea's gRPC transport: the aggregator takes Flow messages over mutual TLS, our agent
can send them, and both transports yield the same aggregated records.

Three aggregators run side by side, each fed the same connections by two "nodes":
over IPFIX (as an Antrea agent's IPFIX records, through our IPFIX exporting process),
over gRPC from a client made only of the generated stub and Flow messages filled the way
Antrea's agent fills them (empty bytes where there is no Service or SNAT, TCP state
only for TCP), and over gRPC from our agent's :class:`GrpcExportingProcess`. Drained at
the same clock, the three must give identical aggregated records, field for field.
"""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from pki import CA
from test_aggregator_antrea import ANTREA_AGENT_IPV4, ANTREA_AGENT_IPV6

from flowscope.agent.grpc_exporter import GrpcExportingProcess
from flowscope.aggregator.config import parse_config
from flowscope.aggregator.service import FlowAggregator
from flowscope.flowpb import flow_pb2, flow_pb2_grpc
from flowscope.ipfix import Template
from flowscope.ipfix.address import Address
from flowscope.ipfix.exporting import ExportingProcess
from flowscope.ipfix.transport import TLSConfig
from fakes import ListSink, ManualClock

pytestmark = pytest.mark.timeout(60)

T0 = 1_790_000_000


async def until(pred, timeout=15.0, what="condition"):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.fixture
def pki(tmp_path):
    ca = CA(tmp_path, "flowscope-ca")
    server = ca.issue("aggregator", cn="flow-aggregator", names=("127.0.0.1", "flow-aggregator.flow-aggregator.svc"),
                      server=True)
    node = ca.issue("node-a", names=("node-a",), server=False)
    rogue = CA(tmp_path, "rogue-ca").issue("rogue", cn="node-a", names=("node-a",), server=False)
    return {"ca": ca.path, "server": server, "node": node, "rogue": rogue}


# The connections, as (node, IPFIX record in Antrea's template). Node "a" sees the sources,
# node "b" the destinations; one flow each: IPv4 TCP via a Service, IPv6 UDP, IPv4 to-external
# with SNAT, and a second report of the first (totals grown: deltas, throughput).
def connections() -> list[tuple[str, dict]]:
    def rec(v6, side, sport, proto=6, end=T0 + 5, octets=1000, ft=2, **over):
        r = dict.fromkeys(ANTREA_AGENT_IPV6 if v6 else ANTREA_AGENT_IPV4, "")
        src = side == "a"
        r.update(flowStartSeconds=T0, flowEndSeconds=end, flowEndReason=2, sourceTransportPort=sport,
                 destinationTransportPort=8080, protocolIdentifier=proto, packetTotalCount=octets // 100,
                 octetTotalCount=octets, packetDeltaCount=octets // 100, octetDeltaCount=octets,
                 reversePacketTotalCount=5, reverseOctetTotalCount=500, reversePacketDeltaCount=5,
                 reverseOctetDeltaCount=500, destinationServicePort=0, ingressNetworkPolicyType=0,
                 ingressNetworkPolicyRuleAction=0, egressNetworkPolicyType=0, egressNetworkPolicyRuleAction=0,
                 flowType=ft, tcpState="ESTABLISHED" if proto == 6 else "", proxySnatPort=0)
        fam = "v6" if v6 else "v4"
        r[f"destinationClusterIP{fam}"] = r[f"destinationServiceIP{fam}"] = r[f"proxySnatIP{fam}"] = (
            "::" if v6 else "0.0.0.0")
        if v6:
            r.update(sourceIPv6Address="fd00:10:1::5", destinationIPv6Address="fd00:10:2::7")
        else:
            r.update(sourceIPv4Address="10.10.1.5", destinationIPv4Address="10.10.2.7")
        if src:
            r.update(sourcePodName="web-0", sourcePodNamespace="shop", sourceNodeName="node-a",
                     egressNetworkPolicyName="web-out", egressNetworkPolicyNamespace="shop", egressNetworkPolicyType=2,
                     egressNetworkPolicyRuleName="r1", egressNetworkPolicyRuleAction=1)
        else:
            r.update(destinationPodName="api-0", destinationPodNamespace="shop", destinationNodeName="node-b",
                     ingressNetworkPolicyName="api-in", ingressNetworkPolicyNamespace="shop",
                     ingressNetworkPolicyType=1, ingressNetworkPolicyRuleName="r2", ingressNetworkPolicyRuleAction=1)
        r.update(over)
        return r

    svc = dict(destinationServicePort=80, destinationServicePortName="shop/api:http",
               destinationClusterIPv4="10.96.0.10", destinationServiceIPv4="10.96.0.10")
    return [
        ("a", rec(False, "a", 1001, **svc)),
        ("b", rec(False, "b", 1001, end=T0 + 4)),
        ("a", rec(True, "a", 1002, proto=17)),
        ("b", rec(True, "b", 1002, proto=17)),
        ("a", rec(False, "a", 1003, ft=3, destinationIPv4Address="198.51.100.7", proxySnatIPv4="192.168.10.1",
                  proxySnatPort=61000, egressName="eg", egressIP="172.18.0.9", egressNodeName="node-e")),
        ("a", rec(False, "a", 1001, end=T0 + 10, octets=3000, **svc)),
    ]


def antrea_flow(r: dict, domain: int) -> flow_pb2.Flow:
    """A Flow message filled field by field the way Antrea's agent fills it (exporter/grpc.go)."""
    v6 = "sourceIPv6Address" in r
    fam = "IPv6" if v6 else "IPv4"
    pack = lambda t: socket.inet_pton(socket.AF_INET6 if ":" in t else socket.AF_INET, t)  # noqa: E731
    f = flow_pb2.Flow(
        ipfix=flow_pb2.IPFIX(observation_domain_id=domain),
        end_reason=flow_pb2.FLOW_END_REASON_ACTIVE_TIMEOUT,
        ip=flow_pb2.IP(version=flow_pb2.IP_VERSION_6 if v6 else flow_pb2.IP_VERSION_4,
                       source=pack(r[f"source{fam}Address"]), destination=pack(r[f"destination{fam}Address"])),
        transport=flow_pb2.Transport(protocol_number=r["protocolIdentifier"], source_port=r["sourceTransportPort"],
                                     destination_port=r["destinationTransportPort"]),
        k8s=flow_pb2.Kubernetes(
            flow_type=r["flowType"], source_pod_namespace=r["sourcePodNamespace"], source_pod_name=r["sourcePodName"],
            destination_pod_namespace=r["destinationPodNamespace"], destination_pod_name=r["destinationPodName"],
            source_node_name=r["sourceNodeName"], destination_node_name=r["destinationNodeName"],
            ingress_network_policy_namespace=r["ingressNetworkPolicyNamespace"],
            ingress_network_policy_name=r["ingressNetworkPolicyName"],
            ingress_network_policy_type=r["ingressNetworkPolicyType"],
            ingress_network_policy_rule_name=r["ingressNetworkPolicyRuleName"],
            ingress_network_policy_rule_action=r["ingressNetworkPolicyRuleAction"],
            egress_network_policy_namespace=r["egressNetworkPolicyNamespace"],
            egress_network_policy_name=r["egressNetworkPolicyName"],
            egress_network_policy_type=r["egressNetworkPolicyType"],
            egress_network_policy_rule_name=r["egressNetworkPolicyRuleName"],
            egress_network_policy_rule_action=r["egressNetworkPolicyRuleAction"],
            egress_name=r["egressName"], egress_node_name=r["egressNodeName"]),
        stats=flow_pb2.Stats(packet_total_count=r["packetTotalCount"], octet_total_count=r["octetTotalCount"],
                             packet_delta_count=r["packetDeltaCount"], octet_delta_count=r["octetDeltaCount"]),
        reverse_stats=flow_pb2.Stats(packet_total_count=r["reversePacketTotalCount"],
                                     octet_total_count=r["reverseOctetTotalCount"],
                                     packet_delta_count=r["reversePacketDeltaCount"],
                                     octet_delta_count=r["reverseOctetDeltaCount"]),
        proxy_snat_port=r["proxySnatPort"],
    )
    f.start_ts.seconds, f.end_ts.seconds = r["flowStartSeconds"], r["flowEndSeconds"]
    if r["proxySnatPort"]:
        f.proxy_snat_ip = pack(r[f"proxySnatIP{'v6' if v6 else 'v4'}"])
    if r["destinationServicePortName"]:
        f.k8s.destination_service_port = r["destinationServicePort"]
        f.k8s.destination_service_port_name = r["destinationServicePortName"]
        f.k8s.destination_cluster_ip = f.k8s.destination_service_ip = pack(r[f"destinationClusterIP{'v6' if v6 else 'v4'}"])
    if r["tcpState"]:
        f.transport.TCP.state_name = r["tcpState"]
    if r["egressIP"]:
        f.k8s.egress_ip = pack(r["egressIP"])
    return f


async def aggregator(pki, transport: str, clock: Clock) -> tuple[FlowAggregator, ListSink]:
    cert, key = pki["server"]
    config = parse_config({
        "aggregatorTransportProtocol": transport, "listenAddress": "127.0.0.1", "listenPort": 0, "apiAddress": "",
        "tls": {"caFile": pki["ca"], "certFile": cert, "keyFile": key},
        "flowExportInterval": "60s", "correlationTimeout": "30s", "inactiveFlowTimeout": "5m",
    })
    sink = ListSink()
    agg = FlowAggregator(config, sinks=[(sink, 1000)], clock=clock)
    await agg.start(api=False, ticker=False)
    return agg, sink


def credentials(pki, who="node"):
    cert, key = pki[who]
    with open(pki["ca"], "rb") as a, open(key, "rb") as k, open(cert, "rb") as c:
        return grpc.ssl_channel_credentials(root_certificates=a.read(), private_key=k.read(),
                                            certificate_chain=c.read())


async def test_grpc_and_ipfix_give_the_same_aggregated_records(pki):
    clock = ManualClock(7000.0)
    conns = connections()
    n = len(conns)
    via_ipfix, s1 = await aggregator(pki, "tls", clock)
    via_stub, s2 = await aggregator(pki, "grpc", clock)
    via_agent, s3 = await aggregator(pki, "grpc", clock)
    cert, key = pki["node"]
    ipfix: dict[str, ExportingProcess] = {}
    ours: dict[str, GrpcExportingProcess] = {}
    try:
        # 1. IPFIX, Antrea's templates, one exporting process per node
        templates = [Template.build(256, ANTREA_AGENT_IPV4), Template.build(257, ANTREA_AGENT_IPV6)]
        for node, domain in (("a", 1), ("b", 2)):
            ipfix[node] = ExportingProcess(
                Address("127.0.0.1", via_ipfix.collecting_port, "tls"), tls=TLSConfig(cert, key, pki["ca"]),
                templates=templates, observation_domain_id=domain)
            await ipfix[node].start()
        for node, r in conns:
            assert ipfix[node].submit(257 if "sourceIPv6Address" in r else 256, [r])
            await ipfix[node].flush()
        await until(lambda: via_ipfix.process.stats.records_received == n, what="IPFIX records")

        # 2. a client made of the generated stub alone: one Export stream per node
        async with grpc.aio.secure_channel(f"127.0.0.1:{via_stub.collecting_port}", credentials(pki)) as channel:
            stub = flow_pb2_grpc.FlowExportServiceStub(channel)
            for node, domain in (("a", 1), ("b", 2)):
                flows = [antrea_flow(r, domain) for nd, r in conns if nd == node]
                await stub.Export(iter([flow_pb2.ExportRequest(flows=flows[:1]), flow_pb2.ExportRequest(flows=flows[1:])]))
        await until(lambda: via_stub.process.stats.records_received == n, what="gRPC records")

        # 3. our agent's gRPC exporting process
        for node, domain in (("a", 1), ("b", 2)):
            ours[node] = GrpcExportingProcess("127.0.0.1", via_agent.collecting_port, cert=cert, key=key,
                                              ca=pki["ca"], observation_domain_id=domain)
            await ours[node].start()
        for node, r in conns:
            assert ours[node].submit(0, [r])
        for e in ours.values():
            assert await e.flush(timeout=15)
        await until(lambda: via_agent.process.stats.records_received == n, what="our agent's gRPC records")
        assert sum(e.stats.records_sent for e in ours.values()) == n
        assert all(e.stats.records_lost == 0 for e in ours.values())
    finally:
        for e in [*ipfix.values(), *ours.values()]:
            await e.close()
        for agg in (via_ipfix, via_stub, via_agent):
            await agg.close()  # drains every flow to its sink

    def records(sink):
        return sorted((e.record for e in sink.got), key=lambda r: (r["sourceTransportPort"], r["flowEndSeconds"]))
    a, b, c = records(s1), records(s2), records(s3)
    assert len(a) == 3
    assert a == b == c
    merged = a[0]
    assert (merged["sourcePodName"], merged["destinationPodName"], merged["destinationServiceIPv4"]) == (
        "web-0", "api-0", "10.96.0.10")
    assert (merged["throughputFromSourceNode"], merged["throughputFromDestinationNode"]) == (2000 * 8 // 5, 1000 * 8 // 4)
    ext = a[2]
    assert (ext["proxySnatIPv4"], ext["proxySnatPort"], ext["egressIP"]) == ("192.168.10.1", 61000, "172.18.0.9")


async def test_grpc_collector_wants_a_client_certificate_from_its_ca(pki):
    clock = ManualClock(7000.0)
    agg, _ = await aggregator(pki, "grpc", clock)
    try:
        flow = antrea_flow(connections()[0][1], 1)
        for creds in (credentials(pki, "rogue"), grpc.ssl_channel_credentials(root_certificates=open(pki["ca"], "rb").read())):
            async with grpc.aio.secure_channel(f"127.0.0.1:{agg.collecting_port}", creds) as channel:
                with pytest.raises(grpc.aio.AioRpcError):
                    await flow_pb2_grpc.FlowExportServiceStub(channel).Export(
                        iter([flow_pb2.ExportRequest(flows=[flow])]), timeout=10)
        assert agg.process.stats.records_received == 0
        # and a message that is no flow is counted, not fatal
        async with grpc.aio.secure_channel(f"127.0.0.1:{agg.collecting_port}", credentials(pki)) as channel:
            await flow_pb2_grpc.FlowExportServiceStub(channel).Export(
                iter([flow_pb2.ExportRequest(flows=[flow_pb2.Flow(), flow])]), timeout=10)
        assert agg.collecting.stats.malformed == 1 and agg.process.stats.records_received == 1
    finally:
        await agg.close()


async def test_grpc_export_counts_a_broken_stream_as_lost_and_reconnects(pki):
    """Records written to an Export stream the aggregator never answered are counted as lost,
    never as sent; the exporter reconnects with backoff and delivers what waited."""
    clock = ManualClock(7000.0)
    conns = [r for _, r in connections()]
    first, _ = await aggregator(pki, "grpc", clock)
    port = first.collecting_port
    cert, key = pki["node"]
    e = GrpcExportingProcess("127.0.0.1", port, cert=cert, key=key, ca=pki["ca"], backoff_initial=0.05,
                             backoff_max=0.2)
    await e.start()
    second = None
    try:
        assert e.submit(0, conns[:2]) and await e.flush(timeout=10)
        assert (e.stats.records_sent, e.stats.records_lost) == (2, 0)
        assert e.submit(0, conns[2:4])
        await until(lambda: e.stats.records_sent == 4, what="the records written to the open stream")
        await first.close()  # the stream breaks before it was answered
        await until(lambda: e.stats.records_lost == 2, what="the loss to be counted")
        assert e.stats.records_sent == 2
        cert_s, key_s = pki["server"]
        config = parse_config({
            "aggregatorTransportProtocol": "grpc", "listenAddress": "127.0.0.1", "listenPort": port, "apiAddress": "",
            "tls": {"caFile": pki["ca"], "certFile": cert_s, "keyFile": key_s}})
        second = FlowAggregator(config, sinks=[(ListSink(), 100)], clock=clock)
        await second.start(api=False, ticker=False)
        assert e.submit(0, conns[4:])
        assert await e.flush(timeout=15)
        await until(lambda: second.process.stats.records_received == 2, what="the reconnect")
        s = e.stats
        assert (s.records_sent, s.records_lost, s.records_submitted) == (4, 2, 6) and s.reconnects >= 1
    finally:
        await e.close()
        if second is not None:
            await second.close()
