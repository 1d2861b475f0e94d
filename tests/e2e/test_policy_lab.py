"""Policy insight against the kernel: the demo's two-Node lab, real agents, the aggregator
writing to a chDB store, real traffic, and policies realized as nftables rules in the
Pods (tests/e2e/policy_nft.py, a translator written apart from the evaluator).

- An AdminNetworkPolicy Deny wins over a namespaced Allow for cache -> backend: the lab
  really drops it, and the correlated record names the admin policy (type 4, its rule).
- ``flowscope policy what-if`` of a default-deny for ``shop`` over the stored history
  names exactly the connections that then really fail once the default-deny is applied.
- A what-if of a policy that opens frontend -> db names exactly the connection that then
  really works.
- ``flowscope policy recommend --namespace shop`` validates against the upstream schema;
  applied, every observed connection still works, and one never observed is blocked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import require_root, require_tool
from flowscope.agent.metadata import load_inventory_file
from flowscope.agent.policy import PolicySet, parse_policy
from flowscope.demo import SERVICE_IP, Pipeline, Processes, Send, latest_per_connection
from flowscope.lab import Lab
from policy_nft import LabPod, LabService, Translator, clear

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(400)]

EXTRA = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend-from-shop, namespace: shop}
spec:
  podSelector: {matchLabels: {app: backend}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: frontend}}}]
  - from: [{podSelector: {matchLabels: {app: cache}}}]
    ports: [{protocol: TCP, port: 8080}]
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: no-cache-to-backend}
spec:
  priority: 10
  subject:
    pods:
      namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}}
      podSelector: {matchLabels: {app: backend}}
  ingress:
  - name: deny-cache
    action: Deny
    from:
    - pods:
        namespaceSelector: {}
        podSelector: {matchLabels: {app: cache}}
    ports: [{portNumber: {protocol: TCP, port: 8080}}]
"""

DEFAULT_DENY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "deny-all-ingress", "namespace": "shop"},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}


def _failed(answer: str) -> bool:
    return answer.startswith("refused") or answer in ("", "0")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowscope", "policy", *args], capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory: pytest.TempPathFactory):
    require_root()
    require_tool("ip", "nft", "conntrack", "ss")
    pytest.importorskip("chdb")
    workdir: Path = tmp_path_factory.mktemp("policy-lab")
    store_dir = workdir / "store"
    with Lab() as lab:
        pipeline = Pipeline(lab, workdir, store=store_dir)  # the collector writes it; free once stopped
        # every policy of the inventory is realized by the translator below, the lab's own
        # drop rule for the db Pod (the same db-from-backend-only) included: remove the lab's
        subprocess.run(pipeline.pods["db"].exec_args("nft", "delete", "table", "inet", "flowscope_lab_policy"),
                       check=True, capture_output=True)
        with pipeline.inventory.open("a") as fh:
            fh.write("---\n" + EXTRA)
        inventory = load_inventory_file(str(pipeline.inventory))
        current = [*inventory.policies.values(), *inventory.cluster_policies.values()]
        pods = [LabPod(p.netns, p.ip, p.namespace, p.labels) for p in pipeline.pods.values()]
        services = [LabService(SERVICE_IP, 80, "TCP", pipeline.pods["backend"].ip, 8080)]

        def realize(extra_policies: list) -> None:
            Translator(PolicySet.of([*current, *extra_policies]), pods, services).apply()

        backend = pipeline.pods["backend"].ip
        cache_to_backend = Send("cache", f"{backend}:8080", "tcp", 3000, 1, "cache -> backend (admin Deny)",
                                (backend, 8080), denied=True)
        plan = [*pipeline.plan(), cache_to_backend]
        realize([])
        try:
            pipeline.start()
            before = pipeline.run_plan(plan)
            missing = pipeline.wait_settled(plan)
        finally:
            pipeline.stop()
        assert missing == [], [s.what for s in missing]
        records = latest_per_connection(pipeline.records())
        # stop() ended the servers with the agents; the checks below send again
        (workdir / "again").mkdir()
        pipeline.procs = Processes(workdir / "again")
        pipeline.start_servers()
        out = {"lab": lab, "pipeline": pipeline, "plan": plan, "before": before, "records": records,
               "store": f"chdb://{store_dir}", "realize": realize, "pods": pods, "workdir": workdir}
        try:
            yield out
        finally:
            pipeline.procs.stop_all()
            clear(pods)


def test_an_admin_deny_wins_over_a_namespaced_allow_and_the_record_names_it(lab_run):
    before, records, pipeline = lab_run["before"], lab_run["records"], lab_run["pipeline"]
    assert _failed(before["cache -> backend (admin Deny)"])  # the lab really dropped it
    cache, backend = pipeline.pods["cache"], pipeline.pods["backend"]
    (r,) = [r for r in records.values()
            if r["sourceIPv4Address"] == cache.ip and r["destinationIPv4Address"] == backend.ip]
    assert (r["ingressNetworkPolicyName"], r["ingressNetworkPolicyNamespace"], r["ingressNetworkPolicyRuleName"],
            r["ingressNetworkPolicyType"], r["ingressNetworkPolicyRuleAction"]) == (
        "no-cache-to-backend", "", "deny-cache", 4, 2)
    # while the namespaced policy the admin tier overrides names what it does allow
    (fe,) = [r for r in records.values() if r["sourceIPv4Address"] == pipeline.pods["frontend"].ip
             and r["destinationIPv4Address"] == backend.ip and r["destinationTransportPort"] == 8080]
    assert (fe["ingressNetworkPolicyName"], fe["ingressNetworkPolicyRuleName"], fe["ingressNetworkPolicyRuleAction"]) == (
        "backend-from-shop", "ingress-0", 1)


def test_what_if_of_a_default_deny_names_exactly_what_then_fails(lab_run):
    pipeline, plan, before = lab_run["pipeline"], lab_run["plan"], lab_run["before"]
    proposed = lab_run["workdir"] / "default-deny.yaml"
    proposed.write_text(yaml.safe_dump(DEFAULT_DENY))
    out = _cli("what-if", "-f", str(proposed), "--store", lab_run["store"], "--inventory", str(pipeline.inventory),
               "-o", "json")
    assert out.returncode == 1, out.stderr  # something that flowed would be denied
    report = json.loads(out.stdout)
    predicted = {(c["source"]["pod"], c["destination"]["ip"], c["port"], c["protocol"].lower())
                 for g in report["groups"] for c in g["changes"] if c["change"] == "allowed->denied"}
    assert report["unresolved"] == []
    lab_run["realize"]([parse_policy(DEFAULT_DENY)])
    try:
        after = pipeline.run_plan(plan)
    finally:
        lab_run["realize"]([])
    broke = {(pipeline.pods[s.src].name, s.expect_dst[0], s.expect_dst[1], s.proto)
             for s in plan if not _failed(before[s.what]) and _failed(after[s.what])}
    assert broke == predicted
    # NetworkPolicies add up: backend-from-shop still admits frontend, so only frontend -> cache breaks
    assert predicted == {(pipeline.pods["frontend"].name, pipeline.pods["cache"].ip, 6379, "tcp")}


def test_recommended_policies_keep_what_was_observed_and_block_what_was_not(lab_run):
    pipeline, plan, before = lab_run["pipeline"], lab_run["plan"], lab_run["before"]
    kv = pytest.importorskip("kubernetes_validate")
    out = _cli("recommend", "--namespace", "shop", "--store", lab_run["store"], "--inventory", str(pipeline.inventory))
    assert out.returncode == 0, out.stderr
    recommended = [o for o in yaml.safe_load_all(out.stdout) if o]
    for obj in recommended:
        kv.validate(obj, "1.32", strict=True)
    rec_file = lab_run["workdir"] / "recommended.yaml"
    rec_file.write_text(out.stdout)
    check = _cli("what-if", "-f", str(rec_file), "--store", lab_run["store"], "--inventory", str(pipeline.inventory),
                 "-o", "json")
    assert check.returncode == 0 and json.loads(check.stdout)["newlyDenied"] == 0, check.stdout

    cache = pipeline.pods["cache"]
    unobserved = ("backend", f"{cache.ip}:6379", "tcp", 500, 1)
    assert not _failed(pipeline.send(*unobserved))  # nothing but the recommendation would stop it
    lab_run["realize"]([parse_policy(o) for o in recommended])
    try:
        after = pipeline.run_plan(plan)
        blocked = pipeline.send(*unobserved)
    finally:
        lab_run["realize"]([])
    kept = {s.what: after[s.what] for s in plan if not _failed(before[s.what])}
    assert len(kept) == 5 and not any(_failed(a) for a in kept.values()), kept
    assert all(_failed(after[s.what]) for s in plan if _failed(before[s.what]))
    assert _failed(blocked), blocked


def test_what_if_of_an_opening_names_exactly_what_then_works(lab_run):
    pipeline, plan, before = lab_run["pipeline"], lab_run["plan"], lab_run["before"]
    opening = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "db-from-frontend", "namespace": "data"},
               "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
                                               "podSelector": {"matchLabels": {"app": "frontend"}}}],
                                     "ports": [{"protocol": "TCP", "port": 5432}]}]}}
    proposed = lab_run["workdir"] / "opening.yaml"
    proposed.write_text(yaml.safe_dump(opening))
    out = _cli("what-if", "-f", str(proposed), "--store", lab_run["store"], "--inventory", str(pipeline.inventory),
               "-o", "json")
    assert out.returncode == 0, out.stderr  # it only opens
    report = json.loads(out.stdout)
    predicted = {(c["source"]["pod"], c["destination"]["ip"], c["port"], c["protocol"].lower())
                 for g in report["groups"] for c in g["changes"] if c["change"] == "denied->allowed"}
    assert report["newlyDenied"] == 0
    lab_run["realize"]([parse_policy(opening)])
    try:
        after = pipeline.run_plan(plan)
    finally:
        lab_run["realize"]([])
    opened = {(pipeline.pods[s.src].name, s.expect_dst[0], s.expect_dst[1], s.proto)
              for s in plan if _failed(before[s.what]) and not _failed(after[s.what])}
    assert opened == predicted == {(pipeline.pods["frontend"].name, pipeline.pods["db"].ip, 5432, "tcp")}
    # the admin Deny still wins over any namespaced opening: cache -> backend stays blocked
    assert _failed(after["cache -> backend (admin Deny)"])
