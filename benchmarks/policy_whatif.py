"""``flowscope policy what-if`` at production size: 10M stored flows, 100 policies (target: < 10 s).

The store is chDB in a temporary directory, filled by ClickHouse itself
(``INSERT ... SELECT FROM numbers(N)``; going through the sink would take minutes and
measure the sink, not the what-if) with a day of a realistic cluster: 5,000 Pods in 50
namespaces, 200 workloads of 25 Pods each behind 200 Services, each Pod talking to
the backends of 5 Services (3 backend Pods each) and to 2 external addresses, source
ports and times varying per row, 5% of the rows denied. The policies: 90
NetworkPolicies (two per namespace for 45 namespaces, Pod and namespace selectors with
ports), 9 AdminNetworkPolicies at different priorities (Deny, Allow, Pass, CIDRs) and
the BaselineAdminNetworkPolicy. The proposal: a default-deny for 5 namespaces.

Measured, median of ``--rounds``:

* ``what_if``: the whole command's work after the inventory is loaded: the seam's GROUP
  BY over every row (:func:`stored_flow_keys`), label resolution, evaluation of every
  distinct key under the current and the proposed policies.
* ``what_if_admin_proposal``: the same with a cluster-scoped proposal (an
  AdminNetworkPolicy), where every key is evaluated under both policy sets.
* ``group_by``: the seam's query alone, the floor any what-if over this store pays.
* peer, ``per_row``: the obvious implementation, evaluating every row instead of every
  distinct key: rows read and evaluated for a sample of ``--sample`` rows, scaled to
  the whole table (reading 10M rows into Python alone exceeds the target).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from flowscope.agent.metadata import Inventory
from flowscope.agent.policy import PolicySet, parse_policy
from flowscope.agent.policy_insight import decide, what_if
from flowscope.collector.store import open_store
from flowscope.collector.policy import current_policies, resolve_keys, stored_flow_keys

T0 = 1_780_000_000
PODS, NAMESPACES, WORKLOADS = 5000, 50, 200


def pod_ip(p: int) -> str:
    return f"10.{p // 250}.{p % 250}.1"


def fill(store, rows: int) -> None:
    # stored during the last day: retention (7 days by default) counts from timeInserted
    inserted = int(time.time()) - 86400
    # p: source Pod; svc: one of its 5 Services; b: a backend Pod of that Service (3 of its 25)
    store._execute(f"""
INSERT INTO {store.qualified} (timeInserted, flowStartSeconds, flowEndSeconds, sourcePodNamespace, sourcePodName,
  sourceIP, destinationPodNamespace, destinationPodName, destinationIP, sourceTransportPort,
  destinationTransportPort, protocolIdentifier, octetDeltaCount, reverseOctetDeltaCount,
  ingressNetworkPolicyRuleAction, originalExporterIP)
SELECT toDateTime({inserted} + number % 86400), {T0} + number % 86400, {T0} + number % 86400 + 5,
  concat('ns-', toString(p % {NAMESPACES})), concat('app-', toString(intDiv(p, 25)), '-', toString(p)),
  concat('10.', toString(intDiv(p, 250)), '.', toString(p % 250), '.1'),
  if(ext, '', concat('ns-', toString(b % {NAMESPACES}))),
  if(ext, '', concat('app-', toString(intDiv(b, 25)), '-', toString(b))),
  if(ext, concat('203.0.113.', toString((p + number % 2) % 250)),
          concat('10.', toString(intDiv(b, 250)), '.', toString(b % 250), '.1')),
  10000 + number % 50000, if(ext, 443, 8000 + svc), if(svc % 10 = 3, 17, 6),
  100 + number % 5000, 1000 + number % 20000, if(number % 20 = 0, 2, 1), '192.168.0.1'
FROM (SELECT number, intHash32(number) % {PODS} AS p, (p * 7 + number % 5) % {WORKLOADS} AS svc,
             svc * 25 + intHash32(number + 1) % 3 AS b, number % 5 = 0 AS ext FROM numbers({rows}))""")


def inventory() -> Inventory:
    inv = Inventory()
    for n in range(NAMESPACES):
        inv.apply({"kind": "Namespace", "metadata": {"name": f"ns-{n}", "labels": {"tier": ("web", "data")[n % 2]}}})
    for p in range(PODS):
        inv.apply({"kind": "Pod", "metadata": {"name": f"app-{p // 25}-{p}", "namespace": f"ns-{p % NAMESPACES}",
                                               "labels": {"app": f"app-{p // 25}", "shard": str(p % 3)}},
                   "spec": {"nodeName": f"node-{p % 50}"}, "status": {"podIP": pod_ip(p)}})
    for obj in policies():
        inv.apply(obj)
    return inv


def policies() -> list[dict]:
    out: list[dict] = []
    for n in range(45):
        ns = f"ns-{n}"
        out.append({"kind": "NetworkPolicy", "metadata": {"name": "from-web", "namespace": ns}, "spec": {
            "podSelector": {"matchExpressions": [{"key": "shard", "operator": "In", "values": ["0", "1"]}]},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"tier": "web"}}}],
                         "ports": [{"port": 8000, "endPort": 8150}]},
                        {"from": [{"podSelector": {}}]}]}})
        out.append({"kind": "NetworkPolicy", "metadata": {"name": "egress", "namespace": ns}, "spec": {
            "podSelector": {"matchLabels": {"shard": "2"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.19.0.0/16"]}}]},
                       {"to": [{"namespaceSelector": {}}], "ports": [{"protocol": "UDP", "port": 8013}]}]}})
    for i in range(9):
        action = ("Deny", "Allow", "Pass")[i % 3]
        peer = ({"networks": [f"203.0.113.{i * 16}/28"]} if i % 2 else
                {"pods": {"namespaceSelector": {"matchLabels": {"tier": "data"}}, "podSelector": {"matchLabels": {"app": f"app-{i * 20}"}}}})
        rule = {"name": f"r{i}", "action": action, ("to" if i % 2 else "from"): [peer],
                "ports": [{"portNumber": {"protocol": "TCP", "port": 443 if i % 2 else 8000 + i * 20}}]}
        out.append({"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
                    "metadata": {"name": f"admin-{i}"}, "spec": {
                        "priority": 10 * i, "subject": {"namespaces": {"matchLabels": {"tier": ("web", "data")[i % 2]}}},
                        ("egress" if i % 2 else "ingress"): [rule]}})
    out.append({"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "BaselineAdminNetworkPolicy",
                "metadata": {"name": "default"}, "spec": {"subject": {"namespaces": {}}, "ingress": [
                    {"name": "no-data-from-web", "action": "Deny",
                     "from": [{"namespaces": {"matchLabels": {"tier": "web"}}}]}]}})
    return out


def proposal() -> list:
    return [parse_policy({"kind": "NetworkPolicy", "metadata": {"name": "default-deny", "namespace": f"ns-{n}"},
                          "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}) for n in range(45, 50)]


def proposal_admin() -> list:
    """A cluster-scoped proposal: every key is evaluated twice (nothing can be skipped)."""
    return [parse_policy({"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
                          "metadata": {"name": "web-not-to-data"}, "spec": {
                              "priority": 5, "subject": {"namespaces": {"matchLabels": {"tier": "data"}}},
                              "ingress": [{"name": "deny-web", "action": "Deny",
                                           "from": [{"namespaces": {"matchLabels": {"tier": "web"}}}],
                                           "ports": [{"portRange": {"protocol": "TCP", "start": 8000, "end": 8100}}]}]}})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sample", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="flowscope-bench-") as d:
        store = open_store(f"chdb://{d}/store")
        store.open()
        t = time.perf_counter()
        fill(store, args.rows)
        fill_s = time.perf_counter() - t
        # every row kept (a timeInserted past the store's retention would be dropped on insert)
        stored = store.count()
        assert stored == args.rows, f"{stored} of {args.rows} rows stored"
        inv = inventory()
        current, proposed = current_policies(inv), proposal()
        assert len(current) == 100
        whatif_s, admin_s, group_s, whatif_cpu, admin_cpu, group_cpu = [], [], [], [], [], []
        result = admin = None
        for _ in range(args.rounds):
            t, c = time.perf_counter(), time.process_time()
            stored_flow_keys(store)
            group_s.append(time.perf_counter() - t)
            group_cpu.append(time.process_time() - c)
            t, c = time.perf_counter(), time.process_time()
            rows = stored_flow_keys(store)
            result = what_if(resolve_keys(rows, inv), current, proposed)
            whatif_s.append(time.perf_counter() - t)
            whatif_cpu.append(time.process_time() - c)
            t, c = time.perf_counter(), time.process_time()
            rows = stored_flow_keys(store)
            admin = what_if(resolve_keys(rows, inv), current, proposal_admin())
            admin_s.append(time.perf_counter() - t)
            admin_cpu.append(time.process_time() - c)
        assert result is not None and admin is not None
        # the peer: every row evaluated (a sample, scaled)
        t = time.perf_counter()
        sample = store.select(
            "SELECT sourcePodNamespace, sourcePodName, sourceIP, destinationPodNamespace, destinationPodName, "
            "destinationIP, destinationTransportPort, protocolIdentifier, ingressNetworkPolicyRuleAction = 2, "
            "octetDeltaCount + reverseOctetDeltaCount, 1, toUInt32(flowEndSeconds), '', '' "
            f"FROM {store.qualified} LIMIT {args.sample}")
        before_set, after_set = PolicySet.of(current), PolicySet.of([*current, *proposed])
        changed = 0
        for key in resolve_keys([(*r[:8], bool(r[8]), *r[9:12], "", "") for r in sample], inv):
            changed += decide(before_set, key).allowed != decide(after_set, key).allowed
        per_row_s = (time.perf_counter() - t) * args.rows / len(sample)
        store.close()
    what_if_med = statistics.median(whatif_s)
    print(json.dumps({
        "rows": args.rows, "policies": len(current), "proposed": len(proposed),
        "distinct_keys": result.evaluated + len(result.unresolved), "changed": len(result.changes),
        "fill_s": round(fill_s, 2),
        "what_if_s_median": round(what_if_med, 3),
        "what_if_admin_proposal_s_median": round(statistics.median(admin_s), 3), "admin_changed": len(admin.changes),
        "group_by_s_median": round(statistics.median(group_s), 3),
        # CPU seconds of this process (chDB runs in it, on up to all cores): what the work costs
        # whatever else the machine runs; wall time above is what a user waits on this machine now
        "what_if_cpu_s_median": round(statistics.median(whatif_cpu), 3),
        "what_if_admin_proposal_cpu_s_median": round(statistics.median(admin_cpu), 3),
        "group_by_cpu_s_median": round(statistics.median(group_cpu), 3),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "peer_per_row_s_scaled": round(per_row_s, 1), "peer_sample_rows": len(sample),
        "speedup_vs_per_row": round(per_row_s / what_if_med, 1), "target_s": 10, "rounds": args.rounds,
    }, indent=2))


if __name__ == "__main__":
    main()
