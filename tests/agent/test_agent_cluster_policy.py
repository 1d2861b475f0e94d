"""Cluster-scoped policies (AdminNetworkPolicy, BaselineAdminNetworkPolicy v1alpha1) in
their tiers around NetworkPolicies, table-driven against the spec's own examples: the
conformance suite's priority and ANP/NP/BANP integration manifests (release v0.1.7) and
the user stories of the API's documentation, and the agent record that names them.
Also: a denied connection that later gets an answer is revisited by the store."""

from __future__ import annotations

import ipaddress

import pytest
import yaml
from agent_entries import entry
from flowscope.agent.metadata import Enricher, Inventory
from flowscope.agent.policy import (
    ACTION_ALLOW,
    ACTION_DROP,
    POLICY_TYPE_K8S,
    POLICY_TYPE_K8S_CLUSTER,
    PeerInfo,
    PolicyError,
    PolicySet,
    evaluate_tiers,
    parse_policy,
)
from flowscope.agent.store import ConnectionStore, FlowEndReason

GRYF, SLYTH = "network-policy-conformance-gryffindor", "network-policy-conformance-slytherin"
HARRY = PeerInfo(ipaddress.ip_address("10.0.1.10"), GRYF, {"conformance-house": "gryffindor"},
                 {"conformance-house": "gryffindor", "kubernetes.io/metadata.name": GRYF})
DRACO = PeerInfo(ipaddress.ip_address("10.0.2.10"), SLYTH, {"conformance-house": "slytherin"},
                 {"conformance-house": "slytherin", "kubernetes.io/metadata.name": SLYTH})


def _pods_peer(house: str) -> dict:
    return {"pods": {"namespaceSelector": {"matchLabels": {"conformance-house": house}},
                     "podSelector": {"matchLabels": {"conformance-house": house}}}}


def _anp(name: str, priority: int, subject: dict, ingress: list, egress: list) -> dict:
    return {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
            "metadata": {"name": name}, "spec": {"priority": priority, "subject": subject,
                                                 "ingress": ingress, "egress": egress}}


def _banp(subject: dict, ingress: list, egress: list) -> dict:
    return {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "BaselineAdminNetworkPolicy",
            "metadata": {"name": "default"}, "spec": {"subject": subject, "ingress": ingress, "egress": egress}}


def priority_field(pass_priority: int) -> list[dict]:
    """conformance/base/admin_network_policy/standard-priority-field.yaml (v0.1.7); the test
    there moves the Pass policy from priority 60 to 40."""
    subject = {"pods": {"namespaceSelector": {"matchLabels": {"conformance-house": "gryffindor"}},
                        "podSelector": {"matchLabels": {"conformance-house": "gryffindor"}}}}
    return [
        _anp("priority-50-example", 50, subject,
             [{"name": "deny-all-ingress-from-slytherin", "action": "Deny", "from": [_pods_peer("slytherin")]}],
             [{"name": "deny-all-egress-to-slytherin", "action": "Deny", "to": [_pods_peer("slytherin")]}]),
        _anp("old-priority-60-new-priority-40-example", pass_priority, subject,
             [{"name": "pass-all-ingress-from-slytherin", "action": "Pass", "from": [_pods_peer("slytherin")]}],
             [{"name": "pass-all-egress-to-slytherin", "action": "Pass", "to": [_pods_peer("slytherin")]}]),
        _banp(subject,
              [{"name": "allow-all-ingress-from-slytherin", "action": "Allow", "from": [_pods_peer("slytherin")]}],
              [{"name": "allow-all-egress-to-slytherin", "action": "Allow", "to": [_pods_peer("slytherin")]}]),
    ]


def anp_np_banp(action: str, with_np: bool = True) -> list[dict]:
    """conformance/base/api_integration/standard-anp-np-banp.yaml (v0.1.7); the tests there
    change the ANP's actions from Deny to Pass, then delete the NetworkPolicy."""
    ns = {"namespaces": {"matchLabels": {"conformance-house": "gryffindor"}}}
    slyth_ns = {"namespaces": {"matchLabels": {"conformance-house": "slytherin"}}}
    objs = [
        _anp("pass-example", 10, ns,
             [{"name": "deny-all-ingress-from-slytherin", "action": action, "from": [slyth_ns]}],
             [{"name": "deny-all-egress-to-slytherin", "action": action, "to": [slyth_ns]}]),
        _banp(ns, [{"name": "deny-all-ingress-from-slytherin", "action": "Deny", "from": [slyth_ns]}],
              [{"name": "deny-all-egress-to-slytherin", "action": "Deny", "to": [slyth_ns]}]),
    ]
    if with_np:
        objs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": "allow-gress-from-to-slytherin-to-gryffindor", "namespace": GRYF},
                     "spec": {"podSelector": None, "policyTypes": ["Ingress", "Egress"],
                              "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"conformance-house": "slytherin"}}}]}],
                              "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"conformance-house": "slytherin"}}}]}]}})
    return objs


def _decide(objs: list[dict], *, ingress: bool, port: int = 80, protocol: int = 6):
    ps = PolicySet.of([parse_policy(o) for o in objs])
    if ingress:  # draco -> harry, decided at harry
        return evaluate_tiers(ps, ingress=True, pod=HARRY, other=DRACO, dest=HARRY, port=port, protocol=protocol)
    return evaluate_tiers(ps, ingress=False, pod=HARRY, other=DRACO, dest=DRACO, port=port, protocol=protocol)


# (case, objects, direction) -> (action, policy name, policy namespace, rule name, policy type)
CONFORMANCE = [
    ("priority 50 Deny wins over priority 60 Pass (ingress)", priority_field(60), True,
     (ACTION_DROP, "priority-50-example", "", "deny-all-ingress-from-slytherin", POLICY_TYPE_K8S_CLUSTER)),
    ("priority 50 Deny wins over priority 60 Pass (egress)", priority_field(60), False,
     (ACTION_DROP, "priority-50-example", "", "deny-all-egress-to-slytherin", POLICY_TYPE_K8S_CLUSTER)),
    ("Pass at priority 40 skips the priority 50 Deny; the baseline allows (ingress)", priority_field(40), True,
     (ACTION_ALLOW, "default", "", "allow-all-ingress-from-slytherin", POLICY_TYPE_K8S_CLUSTER)),
    ("Pass at priority 40 skips the priority 50 Deny; the baseline allows (egress)", priority_field(40), False,
     (ACTION_ALLOW, "default", "", "allow-all-egress-to-slytherin", POLICY_TYPE_K8S_CLUSTER)),
    ("admin Deny wins over a namespaced Allow (ingress)", anp_np_banp("Deny"), True,
     (ACTION_DROP, "pass-example", "", "deny-all-ingress-from-slytherin", POLICY_TYPE_K8S_CLUSTER)),
    ("admin Deny wins over a namespaced Allow (egress)", anp_np_banp("Deny"), False,
     (ACTION_DROP, "pass-example", "", "deny-all-egress-to-slytherin", POLICY_TYPE_K8S_CLUSTER)),
    ("Pass hands over to the NetworkPolicy, which allows (ingress)", anp_np_banp("Pass"), True,
     (ACTION_ALLOW, "allow-gress-from-to-slytherin-to-gryffindor", GRYF, "ingress-0", POLICY_TYPE_K8S)),
    ("Pass hands over to the NetworkPolicy, which allows (egress)", anp_np_banp("Pass"), False,
     (ACTION_ALLOW, "allow-gress-from-to-slytherin-to-gryffindor", GRYF, "egress-0", POLICY_TYPE_K8S)),
    ("Pass with no NetworkPolicy reaches the baseline Deny (ingress)", anp_np_banp("Pass", with_np=False), True,
     (ACTION_DROP, "default", "", "deny-all-ingress-from-slytherin", POLICY_TYPE_K8S_CLUSTER)),
    ("Pass with no NetworkPolicy reaches the baseline Deny (egress)", anp_np_banp("Pass", with_np=False), False,
     (ACTION_DROP, "default", "", "deny-all-egress-to-slytherin", POLICY_TYPE_K8S_CLUSTER)),
]


@pytest.mark.parametrize(("objs", "ingress", "want"), [c[1:] for c in CONFORMANCE], ids=[c[0] for c in CONFORMANCE])
def test_tiers_and_priorities_follow_the_conformance_examples(objs, ingress, want):
    v = _decide(objs, ingress=ingress)
    assert v is not None
    assert (v.action, v.policy_name, v.policy_namespace, v.rule_name, v.policy_type) == want


def test_the_subject_limits_where_an_admin_policy_applies():
    # the same Deny policies say nothing about a connection decided at draco (not their subject)
    ps = PolicySet.of([parse_policy(o) for o in priority_field(60)])
    assert evaluate_tiers(ps, ingress=True, pod=DRACO, other=HARRY, dest=DRACO, port=80, protocol=6) is None


# --- the user stories of the API documentation (in the v0.1.7 field shapes) -----------------

SENSITIVE = PeerInfo(ipaddress.ip_address("10.0.3.10"), "sensitive-ns", {"app": "vault"},
                     {"kubernetes.io/metadata.name": "sensitive-ns"})
FOO = PeerInfo(ipaddress.ip_address("10.0.4.10"), "foo-ns-1", {"app": "client"}, {"kubernetes.io/metadata.name": "foo-ns-1"})
PUB = PeerInfo(ipaddress.ip_address("10.0.5.10"), "bar-ns-1", {"app": "svc-pub"}, {"kubernetes.io/metadata.name": "bar-ns-1"})
MON = PeerInfo(ipaddress.ip_address("10.0.6.10"), "monitoring-ns", {"app": "prom"},
               {"kubernetes.io/metadata.name": "monitoring-ns"})

STORIES = yaml.safe_load_all("""
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: cluster-wide-deny-example}
spec:
  priority: 10
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: sensitive-ns}}}
  ingress:
  - {name: select-all-deny-all, action: Deny, from: [{namespaces: {}}]}
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: cluster-wide-allow-example}
spec:
  priority: 30
  subject: {namespaces: {}}
  ingress:
  - {action: Allow, from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: monitoring-ns}}}]}
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: pub-svc-delegate-example}
spec:
  priority: 20
  subject: {namespaces: {}}
  egress:
  - action: Pass
    to: [{pods: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: bar-ns-1}},
                 podSelector: {matchLabels: {app: svc-pub}}}}]
    ports: [{portNumber: {protocol: TCP, port: 8080}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-everything, namespace: sensitive-ns}
spec: {podSelector: {}, ingress: [{}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: foo-egress-lockdown, namespace: foo-ns-1}
spec: {podSelector: {}, policyTypes: [Egress]}
""")
STORY_SET = PolicySet.of([parse_policy(o) for o in STORIES])


@pytest.mark.parametrize(("case", "ingress", "pod", "other", "port", "want"), [
    ("story 1: the admin Deny wins over the namespace's allow-everything", True, SENSITIVE, FOO, 443,
     (ACTION_DROP, "cluster-wide-deny-example", "select-all-deny-all")),
    ("story 1 before story 2: priority 10 is checked before 30, monitoring is denied too", True, SENSITIVE, MON, 9090,
     (ACTION_DROP, "cluster-wide-deny-example", "select-all-deny-all")),
    ("story 2: monitoring may reach every other namespace; a rule without a name is ingress-<i>", True, PUB, MON, 9090,
     (ACTION_ALLOW, "cluster-wide-allow-example", "ingress-0")),
    ("story 3: Pass to svc-pub:8080 hands over to foo's NetworkPolicy, which isolates egress", False, FOO, PUB, 8080,
     (ACTION_DROP, "foo-egress-lockdown", "")),
    ("story 3: another port is not passed, and foo's NetworkPolicy still decides", False, FOO, PUB, 9090,
     (ACTION_DROP, "foo-egress-lockdown", "")),
])
def test_user_stories(case, ingress, pod, other, port, want):
    dest = pod if ingress else other
    v = evaluate_tiers(STORY_SET, ingress=ingress, pod=pod, other=other, dest=dest, port=port, protocol=6)
    assert v is not None and (v.action, v.policy_name, v.rule_name) == want, case


def test_story_5_baseline_default_deny_yields_to_namespaced_policies():
    banp = _banp({"namespaces": {}}, [{"name": "zero-trust", "action": "Deny", "from": [{"namespaces": {}}]}], [])
    allow_pub = {"kind": "NetworkPolicy", "metadata": {"name": "pub", "namespace": "bar-ns-1"},
                 "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 8080}]}]}}
    ps = PolicySet.of([parse_policy(banp), parse_policy(allow_pub)])
    to_pub = evaluate_tiers(ps, ingress=True, pod=PUB, other=FOO, dest=PUB, port=8080, protocol=6)
    to_foo = evaluate_tiers(ps, ingress=True, pod=FOO, other=PUB, dest=FOO, port=8080, protocol=6)
    assert (to_pub.action, to_pub.policy_name, to_pub.policy_type) == (ACTION_ALLOW, "pub", POLICY_TYPE_K8S)
    assert (to_foo.action, to_foo.policy_name, to_foo.rule_name, to_foo.policy_type) == (
        ACTION_DROP, "default", "zero-trust", POLICY_TYPE_K8S_CLUSTER)
    # the baseline's namespaces peers select Pods only: an external client is not matched by it
    ext = PeerInfo(ipaddress.ip_address("192.0.2.7"))
    assert evaluate_tiers(ps, ingress=True, pod=FOO, other=ext, dest=FOO, port=8080, protocol=6) is None


def test_equal_priorities_are_ordered_by_name_and_networks_match_external_addresses():
    subject = {"namespaces": {}}
    objs = [
        _anp("b-allow", 5, subject, [], [{"name": "b", "action": "Allow", "to": [{"networks": ["192.0.2.0/24"]}]}]),
        _anp("a-deny", 5, subject, [], [{"name": "a", "action": "Deny", "to": [{"networks": ["192.0.2.0/24"]}],
                                         "ports": [{"portRange": {"protocol": "TCP", "start": 400, "end": 500}}]}]),
    ]
    ps = PolicySet.of([parse_policy(o) for o in objs])
    ext = PeerInfo(ipaddress.ip_address("192.0.2.7"))
    v443 = evaluate_tiers(ps, ingress=False, pod=FOO, other=ext, dest=ext, port=443, protocol=6)
    v80 = evaluate_tiers(ps, ingress=False, pod=FOO, other=ext, dest=ext, port=80, protocol=6)
    assert (v443.policy_name, v443.action) == ("a-deny", ACTION_DROP)
    assert (v80.policy_name, v80.action) == ("b-allow", ACTION_ALLOW)


@pytest.mark.parametrize(("obj", "message"), [
    (_anp("x", 1001, {"namespaces": {}}, [], []), "priority: 1001 must be an integer 0-1000"),
    (_anp("x", 1, {"namespaces": {}}, [{"action": "Reject", "from": [{"namespaces": {}}]}], []),
     "ingress[0].action: 'Reject' is not one of Allow, Deny, Pass"),
    (_banp({"namespaces": {}}, [{"action": "Pass", "from": [{"namespaces": {}}]}], []),
     "ingress[0].action: 'Pass' is not one of Allow, Deny"),
    (_anp("x", 1, {"namespaces": {}}, [], [{"action": "Deny", "to": [{"nodes": {}}]}]), "nodes peers (experimental)"),
    (_anp("x", 1, {"namespaces": {}}, [{"action": "Deny", "from": [{"namespaces": {"namespaceSelector": {}}}]}], []),
     "['namespaceSelector'] is not part of a label selector"),
    (_anp("x", 1, {"namespaces": {}}, [{"action": "Deny", "from": []}], []), "ingress[0].from: a rule needs at least one peer"),
    (_anp("x", 1, {}, [], []), "subject: {} sets exactly one of namespaces, pods"),
    ({**_banp({"namespaces": {}}, [], []), "metadata": {"name": "strict"}}, "metadata.name must be 'default'"),
    ({**_anp("x", 1, {"namespaces": {}}, [], []), "apiVersion": "policy.networking.k8s.io/v1alpha2"},
     "is not policy.networking.k8s.io/v1alpha1"),
])
def test_bad_cluster_policies_are_refused_with_the_field_named(obj, message):
    with pytest.raises(PolicyError, match=None) as err:
        parse_policy(obj)
    assert message in str(err.value)


def test_the_agent_record_names_the_admin_policy():
    inv = Inventory()
    for obj in [
        {"kind": "Namespace", "metadata": {"name": GRYF, "labels": {"conformance-house": "gryffindor"}}},
        {"kind": "Namespace", "metadata": {"name": SLYTH, "labels": {"conformance-house": "slytherin"}}},
        {"kind": "Pod", "metadata": {"name": "harry-potter-0", "namespace": GRYF, "labels": {"conformance-house": "gryffindor"}},
         "spec": {"nodeName": "node-a"}, "status": {"podIP": "10.0.1.10"}},
        {"kind": "Pod", "metadata": {"name": "draco-malfoy-0", "namespace": SLYTH, "labels": {"conformance-house": "slytherin"}},
         "spec": {"nodeName": "node-a"}, "status": {"podIP": "10.0.2.10"}},
        *anp_np_banp("Deny"),
    ]:
        inv.apply(obj)

    class Source:
        def inventory(self):
            return inv

    enricher = Enricher("node-a", Source())  # type: ignore[arg-type]
    e = entry(src="10.0.2.10", dst="10.0.1.10", sport=40000, dport=80, packets=1, octets=60, status=0)
    k8s = enricher.enrich(e)
    assert k8s.ingress is not None and k8s.egress is None  # draco's namespace has no egress policy
    assert (k8s.ingress.policy_name, k8s.ingress.policy_namespace, k8s.ingress.rule_name, k8s.ingress.action,
            k8s.ingress.policy_type) == ("pass-example", "", "deny-all-ingress-from-slytherin", ACTION_DROP, 4)
    assert enricher.is_denied(e)
    inv.delete("AdminNetworkPolicy", ("AdminNetworkPolicy", "pass-example"))
    assert enricher.enrich(e).ingress.policy_name == "allow-gress-from-to-slytherin-to-gryffindor"
    assert not enricher.is_denied(e)


def test_a_denied_connection_that_gets_an_answer_is_revisited():
    denied = {"yes": True}
    store = ConnectionStore(active_timeout=60, idle_timeout=15, max_connections=100,
                            is_denied=lambda e: denied["yes"])
    syn = entry(src="10.0.2.10", dst="10.0.1.10", sport=40000, dport=80, packets=1, octets=60, status=0, tcp_state=1)
    out = store.update([syn], now=100.0)
    assert [(x.reason, x.denied) for x in out] == [(FlowEndReason.END_OF_FLOW, True)]
    # the policy is lifted; a retransmitted SYN gets its answer: the same conntrack entry, replied
    denied["yes"] = False
    answered = entry(src="10.0.2.10", dst="10.0.1.10", sport=40000, dport=80, packets=3, octets=180, rpackets=2,
                     roctets=120, tcp_state=3)
    assert store.update([answered], now=103.0) == []
    assert store.revived_total == 1
    assert store.expire(now=110.0) == []  # live again: exported on its schedule, not at once
    later = store.expire(now=103.0 + 15)
    assert [(x.reason, x.denied, x.packet_delta, x.reverse_octet_delta) for x in later] == [
        (FlowEndReason.IDLE_TIMEOUT, False, 2, 120)]
    # and when it ends, its final export follows as for any connection
    assert [x.reason for x in store.update([], now=170.0)] == [FlowEndReason.END_OF_FLOW]
