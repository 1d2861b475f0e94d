"""The policy-insight engine without a store: what-if over flow keys (added, replacing,
cluster-scoped proposals, unresolved Pods) and recommendations (cross-namespace and
external peers), checked by evaluating the recommendation with the agent's evaluator."""

from __future__ import annotations

import pytest
from flowscope.agent.policy import PolicySet, parse_policy
from flowscope.agent.policy_insight import Endpoint, FlowKey, decide, recommend, what_if, workload_of

FE = Endpoint("10.0.0.1", "shop", "frontend-7d9f8b6c4-x2x5z", {"app": "frontend", "pod-template-hash": "7d9f8b6c4"})
BE = Endpoint("10.0.0.2", "shop", "backend-0", {"app": "backend"})
MON = Endpoint("10.0.1.1", "ops", "prometheus-0", {"app": "prometheus"})
EXT = Endpoint("198.51.100.7")
GONE = Endpoint("10.0.0.9", "shop", "old-1", None)

KEYS = [
    FlowKey(FE, BE, 8080, 6, octets=5000, records=3, last_seen=100),
    FlowKey(MON, BE, 9090, 6, octets=700, records=1, last_seen=90),
    FlowKey(EXT, FE, 443, 6, octets=900, records=2, last_seen=80),
    FlowKey(FE, EXT, 53, 17, octets=100, records=1, last_seen=70),
    FlowKey(BE, FE, 8080, 6, octets=60, records=1, last_seen=60, denied=True),
    FlowKey(GONE, BE, 8080, 6, octets=10, records=1, last_seen=50),
]


def np(name: str, ns: str, spec: dict):
    return parse_policy({"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec})


def test_what_if_adds_to_the_current_policies_and_counts_breaks():
    current = [np("be-from-fe", "shop", {"podSelector": {"matchLabels": {"app": "backend"}},
                                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}]}]})]
    # the current policy already denies ops -> backend; a default-deny adds the external -> frontend
    deny = np("deny", "shop", {"podSelector": {}, "policyTypes": ["Ingress"]})
    result = what_if(KEYS, current, [deny])
    # backend -> frontend changes too, but its stored record was a denial: it never flowed, so it breaks nothing
    assert [(c.key.source.ip, c.key.destination.ip, c.key.port) for c in result.changes] == [
        ("198.51.100.7", "10.0.0.1", 443), ("10.0.0.2", "10.0.0.1", 8080)]
    assert [c.key.port for c in result.breaks] == [443]
    assert result.unresolved == [KEYS[5]] and result.evaluated == 5
    j = result.to_json()
    assert [(g["source"], g["destination"]) for g in j["groups"]] == [
        ("198.51.100.7", "shop/frontend"), ("shop/backend", "shop/frontend")]
    assert j["groups"][0]["changes"][0]["after"]["name"] == "deny" and (j["breaks"], j["newlyDenied"]) == (1, 2)


def test_replace_drops_the_current_policies():
    current = [np("be-from-fe", "shop", {"podSelector": {"matchLabels": {"app": "backend"}},
                                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}]}]})]
    result = what_if(KEYS, current, [], replace=True)
    # without any policy, ops -> backend is allowed again (and backend -> frontend, stored denied, was never policed)
    assert {(c.key.source.pod, c.newly_denied) for c in result.changes} == {("prometheus-0", False)}
    assert result.breaks == []


def test_a_cluster_scoped_proposal_is_evaluated_everywhere():
    anp = parse_policy({"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
                        "metadata": {"name": "no-dns-out"}, "spec": {
                            "priority": 3, "subject": {"namespaces": {}},
                            "egress": [{"name": "udp-53", "action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}],
                                        "ports": [{"portNumber": {"protocol": "UDP", "port": 53}}]}]}})
    result = what_if(KEYS, [], [anp])
    (change,) = result.changes
    assert (change.key.port, change.after.deciding().policy_name, change.after.deciding().policy_type) == (53, "no-dns-out", 4)
    assert result.to_json()["groups"][0]["changes"][0]["after"]["tier"] == "admin"


def test_recommendation_allows_exactly_what_flowed():
    policies, warnings = recommend(KEYS, "shop")
    assert any("shop/old-1" in w for w in warnings)
    names = [p["metadata"]["name"] for p in policies]
    assert names == ["default-deny", "backend-observed", "frontend-observed"]
    ps = PolicySet.of([parse_policy(p) for p in policies])
    for key in KEYS[:4]:
        assert decide(ps, key).allowed, key
    assert not decide(ps, KEYS[4]).allowed  # stored as denied: not opened
    assert not decide(ps, FlowKey(FE, BE, 8081, 6)).allowed  # another port
    assert not decide(ps, FlowKey(MON, FE, 9090, 6)).allowed  # another peer
    assert not decide(ps, FlowKey(FE, Endpoint("198.51.100.8"), 53, 17)).allowed  # another address
    be = next(p for p in policies if p["metadata"]["name"] == "backend-observed")
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
            "podSelector": {"matchLabels": {"app": "prometheus"}}} in [r["from"][0] for r in be["spec"]["ingress"]]
    fe = next(p for p in policies if p["metadata"]["name"] == "frontend-observed")
    assert fe["spec"]["podSelector"] == {"matchLabels": {"app": "frontend"}}
    assert {"from": [{"ipBlock": {"cidr": "198.51.100.7/32"}}], "ports": [{"protocol": "TCP", "port": 443}]} in fe["spec"]["ingress"]


@pytest.mark.parametrize(("pod", "workload"), [
    ("web-7d9f8b6c4-x2x5z", "web"), ("node-exporter-bcdfg", "node-exporter"), ("db-0", "db"),
    ("redis-cache", "redis-cache"), ("api-proxy", "api-proxy"),
])
def test_workload_names_from_pod_names(pod, workload):
    assert workload_of(pod) == workload


def test_what_if_skips_only_what_cannot_change():
    """The shortcut (a direction is evaluated twice only where a differing policy applies)
    gives the same changes as evaluating every key fully under both sets."""
    import random

    rnd = random.Random(7)
    pods = [Endpoint(f"10.0.{n}.{i}", f"ns{n}", f"app{i % 3}-{i}", {"app": f"app{i % 3}"}) for n in range(3) for i in range(6)]
    ends = [*pods, Endpoint("192.0.2.1"), Endpoint("192.0.2.2")]
    keys = [FlowKey(rnd.choice(ends), rnd.choice(ends), rnd.choice([80, 443, 5432]), rnd.choice([6, 17]))
            for _ in range(400)]
    current = [
        np("iso", "ns0", {"podSelector": {"matchLabels": {"app": "app1"}}, "ingress": [{"ports": [{"port": 80}]}]}),
        np("egr", "ns1", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16"}}]}]}),
    ]
    anp = {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy", "metadata": {"name": "a"},
           "spec": {"priority": 1, "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "ns2"}}},
                    "ingress": [{"action": "Pass", "from": [{"namespaces": {}}], "ports": [{"portNumber": {"port": 80}}]},
                                {"action": "Deny", "from": [{"namespaces": {}}]}]}}
    proposals = [
        [np("deny", "ns2", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})],
        [np("iso", "ns0", {"podSelector": {"matchLabels": {"app": "app1"}}, "ingress": [{"ports": [{"port": 443}]}]})],
        [parse_policy(anp)],
    ]
    for proposed in proposals:
        before_set, after_set = PolicySet.of(current), PolicySet.of([*current, *proposed])
        brute = {id(k) for k in keys if (k.source.is_pod or k.destination.is_pod)
                 and decide(before_set, k).allowed != decide(after_set, k).allowed}
        assert brute, proposed
        assert {id(c.key) for c in what_if(keys, current, proposed).changes} == brute
