"""NetworkPolicy attribution and enrichment over a static inventory (a table of cases)."""

from __future__ import annotations

import textwrap

import pytest
from agent_entries import entry
from flowscope.agent.metadata import (
    FLOW_TYPE_FROM_EXTERNAL,
    FLOW_TYPE_INTER_NODE,
    FLOW_TYPE_INTRA_NODE,
    FLOW_TYPE_TO_EXTERNAL,
    FLOW_TYPE_UNKNOWN,
    Enricher,
    MetadataError,
    StaticMetadata,
    load_inventory_file,
)
from flowscope.agent.policy import PolicyError, parse_network_policy

INVENTORY = """
apiVersion: v1
kind: List
items:
- {kind: Node, metadata: {name: node-a}, spec: {podCIDRs: [10.244.0.0/24, "fd00:244::/64"]}}
- {kind: Node, metadata: {name: node-b}, spec: {podCIDRs: [10.244.1.0/24]}}
- {kind: Namespace, metadata: {name: shop, labels: {team: shop}}}
- {kind: Namespace, metadata: {name: ops, labels: {team: ops}}}
- {kind: Namespace, metadata: {name: dev, labels: {team: dev}}}
- kind: Pod
  metadata: {name: frontend, namespace: shop, labels: {app: frontend}}
  spec: {nodeName: node-a}
  status: {podIPs: [{ip: 10.244.0.11}, {ip: "fd00:244::b"}]}
- kind: Pod
  metadata: {name: backend, namespace: shop, labels: {app: backend, tier: api}}
  spec:
    nodeName: node-a
    containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]}]
  status: {podIPs: [{ip: 10.244.0.12}]}
- kind: Pod
  metadata: {name: monitor, namespace: ops, labels: {app: monitor}}
  spec: {nodeName: node-a}
  status: {podIP: 10.244.0.13}
- kind: Pod
  metadata: {name: tester, namespace: dev, labels: {app: tester}}
  spec: {nodeName: node-a}
  status: {podIP: 10.244.0.14}
- kind: Pod
  metadata: {name: remote, namespace: shop, labels: {app: frontend}}
  spec: {nodeName: node-b}
  status: {podIP: 10.244.1.20}
- kind: Service
  metadata: {name: backend, namespace: shop}
  spec: {clusterIPs: [10.96.0.10], ports: [{name: web, port: 80, protocol: TCP}]}
---
kind: NetworkPolicy
metadata: {name: backend-allow, namespace: shop}
spec:
  podSelector: {matchLabels: {app: backend}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: frontend}}}]
    ports: [{port: http}]
  - from: [{namespaceSelector: {matchLabels: {team: ops}}}]
  - from: [{ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.128/25]}}]
    ports: [{port: 8080}]
  - ports: [{protocol: UDP, port: dns}]
---
kind: NetworkPolicy
metadata: {name: frontend-egress, namespace: shop}
spec:
  podSelector: {matchExpressions: [{key: app, operator: In, values: [frontend]}]}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {tier: api}}}]
    ports: [{port: 8080, endPort: 8090}]
  - to: [{ipBlock: {cidr: 198.51.100.0/24, except: [198.51.100.128/25]}}]
---
kind: NetworkPolicy
metadata: {name: default-deny, namespace: dev}
spec: {podSelector: {}}
"""


@pytest.fixture
def enricher(tmp_path):
    path = tmp_path / "inventory.yaml"
    path.write_text(INVENTORY)
    return Enricher("node-a", StaticMetadata(str(path)))


def v(verdict):
    return None if verdict is None else (verdict.policy_namespace, verdict.policy_name, verdict.rule_name, verdict.action)


CASES = [
    # (id, src, dst, dport, proto, expected ingress, expected egress)
    ("pod selector + named port", "10.244.0.11", "10.244.0.12", 8080, 6,
     ("shop", "backend-allow", "ingress-0", 1), ("shop", "frontend-egress", "egress-0", 1)),
    ("named port does not cover another port", "10.244.0.11", "10.244.0.12", 9090, 6,
     ("shop", "backend-allow", "", 2), ("shop", "frontend-egress", "", 2)),
    ("namespace selector admits ops", "10.244.0.13", "10.244.0.12", 9999, 6,
     ("shop", "backend-allow", "ingress-1", 1), None),
    ("namespace selector rejects dev", "10.244.0.14", "10.244.0.12", 9999, 6,
     ("shop", "backend-allow", "", 2), None),  # default-deny isolates ingress only
    ("ipBlock inside cidr", "192.0.2.10", "10.244.0.12", 8080, 6, ("shop", "backend-allow", "ingress-2", 1), None),
    ("ipBlock except", "192.0.2.200", "10.244.0.12", 8080, 6, ("shop", "backend-allow", "", 2), None),
    ("named UDP port, any peer", "192.0.2.200", "10.244.0.12", 5353, 17, ("shop", "backend-allow", "ingress-3", 1), None),
    ("protocol must match", "192.0.2.10", "10.244.0.12", 8080, 17, ("shop", "backend-allow", "", 2), None),
    ("egress ipBlock", "10.244.0.11", "198.51.100.7", 443, 6, None, ("shop", "frontend-egress", "egress-1", 1)),
    ("egress ipBlock except", "10.244.0.11", "198.51.100.200", 443, 6, None, ("shop", "frontend-egress", "", 2)),
    ("default deny ingress", "10.244.0.13", "10.244.0.14", 80, 6, ("dev", "default-deny", "", 2), None),
    ("default deny is ingress only", "10.244.0.14", "198.51.100.7", 80, 6, None, None),
    ("no policy selects ops", "10.244.0.12", "10.244.0.13", 80, 6, None, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_policy_attribution_table(enricher, case):
    _, src, dst, dport, proto, want_in, want_eg = case
    got = enricher.enrich(entry(src, dst, 40000, dport, proto=proto))
    assert (v(got.ingress), v(got.egress)) == (want_in, want_eg)


def test_enrichment_of_a_clusterip_connection_uses_the_dnat_destination(enricher):
    e = entry("10.244.0.11", "10.96.0.10", 40000, 80, reply_src="10.244.0.12", reply_sport=8080)
    got = enricher.enrich(e)
    assert got.destination_cluster_ip == "10.96.0.10"
    assert got.destination_service_port == 80
    assert got.destination_service_port_name == "shop/backend:web"
    assert (got.destination_pod_namespace, got.destination_pod_name) == ("shop", "backend")
    assert (got.source_pod_namespace, got.source_pod_name) == ("shop", "frontend")
    assert got.source_node_name == got.destination_node_name == "node-a"
    assert got.flow_type == FLOW_TYPE_INTRA_NODE
    assert v(got.ingress) == ("shop", "backend-allow", "ingress-0", 1)  # port 8080 after DNAT is "http"


@pytest.mark.parametrize(
    "src,dst,flow_type,names",
    [
        ("10.244.0.11", "10.244.1.20", FLOW_TYPE_INTER_NODE, ("frontend", "")),  # remote Pod: no names
        ("10.244.0.11", "10.244.1.99", FLOW_TYPE_INTER_NODE, ("frontend", "")),  # unknown Pod in node-b's podCIDR
        ("10.244.0.11", "203.0.113.5", FLOW_TYPE_TO_EXTERNAL, ("frontend", "")),
        ("203.0.113.5", "10.244.0.12", FLOW_TYPE_FROM_EXTERNAL, ("", "backend")),
        ("fd00:244::b", "2001:db8::1", FLOW_TYPE_TO_EXTERNAL, ("frontend", "")),
        ("203.0.113.5", "203.0.113.6", FLOW_TYPE_UNKNOWN, ("", "")),
    ],
)
def test_flow_type_and_local_names(enricher, src, dst, flow_type, names):
    got = enricher.enrich(entry(src, dst, 40000, 80))
    assert got.flow_type == flow_type
    assert (got.source_pod_name, got.destination_pod_name) == names


def test_denied_is_a_drop_in_either_direction(enricher):
    assert enricher.is_denied(entry("10.244.0.14", "10.244.0.12", 40000, 9999))
    assert not enricher.is_denied(entry("10.244.0.11", "10.244.0.12", 40000, 8080))


def test_without_metadata_every_field_is_empty():
    got = Enricher("node-a").enrich(entry())
    assert got.flow_type == FLOW_TYPE_UNKNOWN and got.source_pod_name == "" and got.ingress is None


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"podSelector": {}, "policyTypes": ["Sideways"]}, "policyTypes: 'Sideways' is not Ingress or Egress"),
        ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]}, "ingress[0].from[0].ipBlock.cidr"),
        ({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}, "ingress[0].ports[0].protocol: 'ICMP'"),
        ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}, "matchExpressions[0].operator"),
    ],
)
def test_bad_policies_are_refused_naming_the_field(spec, message):
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_network_policy({"metadata": {"name": "p", "namespace": "n"}, "spec": spec})


def test_bad_inventory_names_the_file_and_object(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""
        kind: Pod
        metadata: {name: x, namespace: y}
        status: {podIP: 10.1.2.300}
    """))
    with pytest.raises(MetadataError, match=r"bad.yaml.*Pod y/x: status.podIPs: '10.1.2.300'"):
        load_inventory_file(str(path))
