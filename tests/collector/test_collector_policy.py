"""``flowscope policy what-if`` and ``recommend`` over a real chDB store: rows written to a
directory, the store seam reading them back as distinct keys with the sums written, the
CLI's verdict changes and exit status, and a recommendation that validates against the
upstream schema (kubernetes-validate) and, applied over the same history in a what-if,
newly denies nothing while still closing what was not observed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from flowscope.agent.metadata import load_inventory_file
from flowscope.agent.policy import PolicySet, parse_policy
from flowscope.agent.policy_insight import Endpoint, FlowKey, decide, recommend
from flowscope.collector.schema import COLUMNS
from flowscope.collector.store import open_store
from flowscope.collector.policy import resolve_keys, stored_flow_keys

pytestmark = [pytest.mark.timeout(180)]

INVENTORY = """
kind: List
items:
- {kind: Namespace, metadata: {name: shop}}
- {kind: Namespace, metadata: {name: data}}
- {kind: Pod, metadata: {name: frontend-6d4f8-x2x5z, namespace: shop, labels: {app: frontend, pod-template-hash: 6d4f8}},
   spec: {nodeName: node-a}, status: {podIP: 10.244.1.10}}
- {kind: Pod, metadata: {name: frontend-6d4f8-bb7kq, namespace: shop, labels: {app: frontend, pod-template-hash: 6d4f8}},
   spec: {nodeName: node-b}, status: {podIP: 10.244.2.11}}
- {kind: Pod, metadata: {name: backend-0, namespace: shop, labels: {app: backend}}, spec: {nodeName: node-b},
   status: {podIP: 10.244.2.10}}
- {kind: Pod, metadata: {name: db-0, namespace: data, labels: {app: db}}, spec: {nodeName: node-b},
   status: {podIP: 10.244.2.20}}
- kind: NetworkPolicy
  metadata: {name: db-from-backend-only, namespace: data}
  spec:
    podSelector: {matchLabels: {app: db}}
    ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}},
                       podSelector: {matchLabels: {app: backend}}}], ports: [{port: 5432}]}]
"""

FE1, FE2, BE, DB, EXT = "10.244.1.10", "10.244.2.11", "10.244.2.10", "10.244.2.20", "203.0.113.5"
T0 = 1_780_000_000  # flow times
# Rows were stored in the last hour: retention counts from timeInserted, and a store opened
# with the default retention (7 days) drops older rows.
INSERTED = int(time.time()) - 3600

# (src ns, src pod, src ip, dst ns, dst pod, dst ip, sport, dport, proto, octets, reverse octets, ingress action, end)
ROWS = [
    ("shop", "frontend-6d4f8-x2x5z", FE1, "shop", "backend-0", BE, 40001, 8080, 6, 1000, 4000, 0, T0 + 10),
    ("shop", "frontend-6d4f8-x2x5z", FE1, "shop", "backend-0", BE, 40001, 8080, 6, 500, 100, 0, T0 + 20),  # same conn
    ("shop", "frontend-6d4f8-bb7kq", FE2, "shop", "backend-0", BE, 40002, 8080, 6, 300, 300, 0, T0 + 30),
    ("shop", "frontend-6d4f8-x2x5z", FE1, "shop", "backend-0", BE, 40003, 5353, 17, 64, 64, 0, T0 + 40),
    ("shop", "frontend-6d4f8-x2x5z", FE1, "", "", EXT, 40004, 443, 6, 200, 30000, 0, T0 + 50),
    ("shop", "backend-0", BE, "data", "db-0", DB, 40005, 5432, 6, 10000, 800, 1, T0 + 60),
    ("shop", "frontend-6d4f8-x2x5z", FE1, "data", "db-0", DB, 40006, 5432, 6, 60, 0, 2, T0 + 70),  # denied
    ("shop", "gone-7f9c8-zzzzz", "10.244.1.99", "shop", "backend-0", BE, 40007, 8080, 6, 10, 10, 0, T0 + 80),
]


def _write(store_dir: Path | None, address: str | None = None) -> None:
    store = open_store(address or f"chdb://{store_dir}")
    store.open()
    cols: dict[str, list] = {c.name: [] for c in COLUMNS}
    for r in ROWS:
        row = {c.name: (0 if c.is_int else "") for c in COLUMNS}
        row.update(timeInserted=INSERTED + r[12] - T0, sourcePodNamespace=r[0], sourcePodName=r[1], sourceIP=r[2],
                   destinationPodNamespace=r[3], destinationPodName=r[4], destinationIP=r[5],
                   sourceTransportPort=r[6], destinationTransportPort=r[7], protocolIdentifier=r[8],
                   octetDeltaCount=r[9], reverseOctetDeltaCount=r[10], ingressNetworkPolicyRuleAction=r[11],
                   flowStartSeconds=T0, flowEndSeconds=r[12], originalExporterIP="172.31.250.10")
        for name, v in row.items():
            cols[name].append(v)
    store.insert([cols[c.name] for c in COLUMNS])
    store.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pytest.importorskip("chdb")
    d = tmp_path_factory.mktemp("policy")
    _write(d / "store")
    (d / "inventory.yaml").write_text(INVENTORY)
    return d


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowscope", "policy", *args], capture_output=True, text=True,
                          input=stdin, timeout=120)


def test_the_seam_reads_distinct_keys_with_what_was_written(world):
    store = open_store(f"chdb://{world / 'store'}")
    store.open()
    try:
        keys = stored_flow_keys(store)
        shop_only = stored_flow_keys(store, namespace="data")
        recent = stored_flow_keys(store, since=INSERTED + 45)
    finally:
        store.close()
    by = {(k[1], k[5], k[6], k[7], k[8]): k for k in keys}
    assert len(keys) == 7  # two rows of one connection are one key
    fe_be = by[("frontend-6d4f8-x2x5z", BE, 8080, 6, False)]
    assert (fe_be[9], fe_be[10], fe_be[11]) == (1000 + 4000 + 500 + 100, 2, T0 + 20)  # octets, records, last seen
    assert by[("frontend-6d4f8-x2x5z", DB, 5432, 6, True)][9] == 60
    assert {k[5] for k in shop_only} == {DB}
    assert {k[6] for k in recent} == {443, 5432, 8080}


def test_the_seam_answers_the_same_on_clickhouse_server_18_16(world, tmp_path):
    from conftest import require_tool
    from test_clickhouse_server import ClickHouseServer

    require_tool("clickhouse-server")
    srv = ClickHouseServer(tmp_path)
    srv.start()
    try:
        _write(None, srv.address + "/policy_seam")
        server, local = open_store(srv.address + "/policy_seam"), open_store(f"chdb://{world / 'store'}")
        server.open()
        local.open()
        try:
            for kw in ({}, {"namespace": "data"}, {"since": INSERTED + 45}):
                assert sorted(stored_flow_keys(server, **kw)) == sorted(stored_flow_keys(local, **kw)), kw
        finally:
            server.close()
            local.close()
    finally:
        srv.kill()


def test_what_if_of_a_default_deny_lists_what_breaks_and_exits_1(world, tmp_path):
    deny = tmp_path / "deny.yaml"
    deny.write_text(yaml.safe_dump({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                    "metadata": {"name": "default-deny", "namespace": "shop"},
                                    "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}))
    out = _cli("what-if", "-f", str(deny), "--store", f"chdb://{world / 'store'}",
               "--inventory", str(world / "inventory.yaml"), "-o", "json")
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    # into shop: frontend -> backend on 8080/TCP (both Pods of the workload) and 5353/UDP
    changed = {(c["source"]["pod"], c["port"], c["protocol"], c["change"]) for g in report["groups"] for c in g["changes"]}
    assert changed == {("frontend-6d4f8-x2x5z", 8080, "TCP", "allowed->denied"),
                       ("frontend-6d4f8-bb7kq", 8080, "TCP", "allowed->denied"),
                       ("frontend-6d4f8-x2x5z", 5353, "UDP", "allowed->denied")}
    (group,) = report["groups"]
    assert (group["source"], group["destination"], group["octets"], group["lastSeen"]) == (
        "shop/frontend", "shop/backend", 5600 + 600 + 128, T0 + 40)
    assert group["changes"][0]["after"] == {"name": "default-deny", "namespace": "shop", "rule": "", "action": "Drop",
                                            "policyType": 1, "tier": "namespaced", "kind": "NetworkPolicy"}
    assert report["breaks"] == 3
    assert [u["source"]["pod"] for u in report["unresolved"]] == ["gone-7f9c8-zzzzz"]
    table = _cli("what-if", "-f", str(deny), "--store", f"chdb://{world / 'store'}",
                 "--inventory", str(world / "inventory.yaml"))
    assert table.returncode == 1 and "shop/frontend -> shop/backend" in table.stdout


def test_what_if_that_only_opens_exits_0_and_says_so(world):
    allow = yaml.safe_dump({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                            "metadata": {"name": "db-from-frontend", "namespace": "data"},
                            "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                                     "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "frontend"}}}]}]}})
    out = _cli("what-if", "-f", "-", "--store", f"chdb://{world / 'store'}", "--inventory",
               str(world / "inventory.yaml"), "-o", "json", stdin=allow)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    (change,) = [c for g in report["groups"] for c in g["changes"]]
    assert (change["change"], change["storedVerdict"], change["after"]["name"]) == (
        "denied->allowed", "denied", "db-from-frontend")
    assert report["breaks"] == 0


def test_bad_input_gets_one_clear_line(world, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: AdminNetworkPolicy\napiVersion: policy.networking.k8s.io/v1alpha1\n"
                   "metadata: {name: x}\nspec: {priority: 5000, subject: {namespaces: {}}}\n")
    out = _cli("what-if", "-f", str(bad), "--store", f"chdb://{world / 'store'}")
    assert out.returncode == 2 and "priority: 5000 must be an integer 0-1000" in out.stderr
    out = _cli("recommend", "--namespace", "Shop;DROP", "--store", f"chdb://{world / 'store'}")
    assert out.returncode == 2 and "is not a Kubernetes namespace name" in out.stderr
    out = _cli("recommend", "--namespace", "shop", "--store", f"chdb://{world / 'store'}")  # no labels anywhere
    assert out.returncode == 2 and "give --inventory FILE or --kube" in out.stderr and out.stdout == ""
    good = tmp_path / "good.yaml"
    good.write_text("kind: NetworkPolicy\nmetadata: {name: x, namespace: shop}\nspec: {podSelector: {}}\n")
    out = _cli("what-if", "-f", str(good), "--store", "tcp://127.0.0.1:1", "--since", "yesterday")
    assert out.returncode == 2 and "--since: 'yesterday' is neither a duration" in out.stderr
    out = _cli("what-if", "-f", str(good), "--store", "tcp://127.0.0.1:1")
    assert out.returncode == 2 and "--store: tcp://127.0.0.1:1" in out.stderr and len(out.stderr.splitlines()) == 1


def test_recommendation_validates_keeps_what_flowed_and_closes_the_rest(world, tmp_path):
    kv = pytest.importorskip("kubernetes_validate")
    out = _cli("recommend", "--namespace", "shop", "--store", f"chdb://{world / 'store'}",
               "--inventory", str(world / "inventory.yaml"))
    assert out.returncode == 1, out.stderr  # the gone Pod's flow is not covered, and that is said
    assert "1 observed flows are not covered" in out.stderr
    policies = list(yaml.safe_load_all(out.stdout))
    for p in policies:
        kv.validate(p, "1.32", strict=True)
    by_name = {p["metadata"]["name"]: p["spec"] for p in policies}
    assert by_name["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    fe = by_name["frontend-observed"]
    assert fe["podSelector"] == {"matchLabels": {"app": "frontend"}}  # pod-template-hash left out
    assert fe["policyTypes"] == ["Egress"]
    assert {(json.dumps(r["to"], sort_keys=True), json.dumps(r["ports"], sort_keys=True)) for r in fe["egress"]} == {
        (json.dumps([{"podSelector": {"matchLabels": {"app": "backend"}}}]),
         json.dumps([{"port": 8080, "protocol": "TCP"}, {"port": 5353, "protocol": "UDP"}], sort_keys=True)),
        (json.dumps([{"ipBlock": {"cidr": f"{EXT}/32"}}]), json.dumps([{"port": 443, "protocol": "TCP"}])),
    }  # the denied frontend -> db is not opened
    be = by_name["backend-observed"]
    assert be["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                              "ports": [{"protocol": "TCP", "port": 8080}, {"protocol": "UDP", "port": 5353}]}]
    assert be["egress"] == [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "data"}},
                                     "podSelector": {"matchLabels": {"app": "db"}}}],
                             "ports": [{"protocol": "TCP", "port": 5432}]}]
    assert "gone-7f9c8-zzzzz" in out.stderr  # left out, and said so
    rec = tmp_path / "rec.yaml"
    rec.write_text(out.stdout)
    check = _cli("what-if", "-f", str(rec), "--store", f"chdb://{world / 'store'}",
                 "--inventory", str(world / "inventory.yaml"), "-o", "json", "--namespace", "shop")
    assert check.returncode == 0, check.stdout
    assert json.loads(check.stdout)["newlyDenied"] == 0
    # what it did not see, it closes: backend -> frontend, frontend -> backend on another port
    inv = load_inventory_file(str(world / "inventory.yaml"))
    ps = PolicySet.of([*inv.policies.values(), *[parse_policy(p) for p in policies]])
    keys = {(k.source.pod, k.destination.pod, k.port): k for k in resolve_keys(
        [("shop", "frontend-6d4f8-x2x5z", FE1, "shop", "backend-0", BE, 8080, 6, False, 0, 0, 0, "", ""),
         ("shop", "frontend-6d4f8-x2x5z", FE1, "shop", "backend-0", BE, 9090, 6, False, 0, 0, 0, "", ""),
         ("shop", "backend-0", BE, "shop", "frontend-6d4f8-x2x5z", FE1, 8080, 6, False, 0, 0, 0, "", "")], inv)}
    assert decide(ps, keys[("frontend-6d4f8-x2x5z", "backend-0", 8080)]).allowed
    assert not decide(ps, keys[("frontend-6d4f8-x2x5z", "backend-0", 9090)]).allowed
    assert not decide(ps, keys[("backend-0", "frontend-6d4f8-x2x5z", 8080)]).allowed


def test_recommend_uses_stored_labels_when_the_inventory_has_none():
    src = Endpoint("10.0.0.1", "ns", "job-abc", {"app": "job"})
    dst = Endpoint("10.0.0.2", "ns", "api-0", None)  # unknown labels
    policies, warnings = recommend([FlowKey(src, dst, 80, 6)], "ns")
    assert [p["metadata"]["name"] for p in policies] == ["default-deny"]
    assert warnings and "no known labels" in warnings[0]


def test_the_dashboards_functions_return_what_the_cli_prints(world):
    from flowscope.collector.policy import PolicyInputError, recommend_report, what_if_report

    inv = load_inventory_file(str(world / "inventory.yaml"))
    deny = yaml.safe_dump({"kind": "NetworkPolicy", "metadata": {"name": "default-deny", "namespace": "shop"},
                           "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
    store = open_store(f"chdb://{world / 'store'}")
    store.open()
    try:
        report = what_if_report(store, deny, inventory=inv)
        rec = recommend_report(store, "shop", inventory=inv, since=INSERTED)
        with pytest.raises(PolicyInputError, match="not valid YAML"):
            what_if_report(store, "kind: [", inventory=inv)
    finally:
        store.close()
    out = _cli("what-if", "-f", "-", "--store", f"chdb://{world / 'store'}", "--inventory",
               str(world / "inventory.yaml"), "-o", "json", stdin=deny)
    assert json.loads(out.stdout) == json.loads(json.dumps(report))
    assert [p["metadata"]["name"] for p in rec["policies"]] == ["default-deny", "backend-observed", "frontend-observed"]


async def test_what_if_reads_pods_and_current_policies_from_the_cluster(world, tmp_path):
    """--kube: the agent's watch against kmock's emulator over real HTTP, from a kubeconfig."""
    import asyncio
    import os

    kmock = pytest.importorskip("kmock")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "operator"))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agent"))
    from kmock_compat import CompatEmulator
    from test_agent_kube import api_client, call

    objs = [o for o in yaml.safe_load(INVENTORY)["items"]]
    paths = {"Namespace": "/api/v1/namespaces", "Pod": "/api/v1/namespaces/{ns}/pods",
             "NetworkPolicy": "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"}
    async with CompatEmulator() as emu, kmock.Server(emu) as srv:
        api = api_client(srv.url)
        for o in objs:
            o = {"apiVersion": "networking.k8s.io/v1" if o["kind"] == "NetworkPolicy" else "v1", **o}
            path = paths[o["kind"]].format(ns=o["metadata"].get("namespace", ""))
            assert await asyncio.to_thread(call, api, "POST", path, o) in (200, 201)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emu",
            "clusters": [{"name": "emu", "cluster": {"server": str(srv.url).rstrip("/")}}],
            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u"}}],
            "users": [{"name": "u", "user": {"token": "test"}}]}))
        deny = tmp_path / "deny.yaml"
        deny.write_text(yaml.safe_dump({"kind": "NetworkPolicy", "metadata": {"name": "deny", "namespace": "data"},
                                        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flowscope", "policy", "what-if", "-f", str(deny), "--store",
            f"chdb://{world / 'store'}", "--kube", "-o", "json", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "KUBECONFIG": str(kubeconfig)})
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    # the cluster's db-from-backend-only admits backend -> db, and NetworkPolicies add up: the
    # added deny changes nothing (without the cluster's policy, backend -> db would break); the
    # Pods' labels came from the cluster too (6 keys evaluated, the gone Pod's left out)
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert (report["changed"], report["evaluated"], len(report["unresolved"])) == (0, 6, 1), report


def test_stored_labels_stand_in_for_pods_the_inventory_lacks():
    """When the table carries sourcePodLabels / destinationPodLabels (IEs 56506/143-144, JSON
    objects as Antrea sends them), a Pod gone from the inventory is still evaluated."""
    inv = load_inventory_file_text(INVENTORY)
    row = ("shop", "gone-7f9c8-zzzzz", "10.244.1.99", "shop", "backend-0", BE, 8080, 6, False, 10, 1, T0,
           '{"app": "frontend"}', "")
    (key,) = resolve_keys([row], inv)
    assert key.source.labels == {"app": "frontend"}  # stored, the inventory has no such Pod
    assert key.destination.labels == {"app": "backend"}  # the inventory's, preferred
    (bad,) = resolve_keys([(*row[:12], "not json", "")], None)
    assert bad.source.labels is None and bad.destination.labels is None


def load_inventory_file_text(text: str):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
        fh.write(text)
        fh.flush()
        return load_inventory_file(fh.name)


def test_the_seams_columns_are_the_stores():
    from flowscope.collector.policy import _KEY_COLUMNS, _LABEL_COLUMNS
    from flowscope.collector.schema import COLUMN_NAMES

    assert set(_KEY_COLUMNS + _LABEL_COLUMNS) <= set(COLUMN_NAMES)


def test_a_namespace_never_reaches_the_sql_text(world):
    from flowscope.collector.policy import PolicyInputError

    class Recording:
        database, table = "flowscope", "flows"
        seen: list = []

        def rows(self, sql, params):
            self.seen.append((sql, dict(params)))
            return []

    rec = Recording()
    assert stored_flow_keys(rec, namespace="shop", since=INSERTED) == []
    ((sql, params),) = rec.seen
    assert "shop" not in sql and sorted(params.values(), key=str) == sorted([INSERTED, "shop"], key=str)
    with pytest.raises(PolicyInputError, match="is not a Kubernetes namespace name"):
        stored_flow_keys(rec, namespace="shop' OR 1=1 --")


def test_policy_over_api_asks_the_collector_holding_the_store_for_the_same_keys(world, tmp_path):
    """chDB belongs to one process: ``--api`` reads the keys from the collector's API (here
    the API application over the store, served on loopback) and evaluates them locally."""
    from served_app import served

    from flowscope.collector.api import make_app
    from flowscope.webauth import WebAuth

    deny = tmp_path / "deny.yaml"
    deny.write_text("kind: NetworkPolicy\nmetadata: {name: default-deny, namespace: shop}\n"
                    "spec: {podSelector: {}, policyTypes: [Ingress]}\n")
    args = ("what-if", "-f", str(deny), "--inventory", str(world / "inventory.yaml"), "-o", "json", "--since", "168h")
    local = _cli(*args, "--store", f"chdb://{world / 'store'}")
    assert local.returncode == 1, local.stderr
    token = "policy-api-token-0123456789"
    (tmp_path / "token").write_text(token + "\n")
    store = open_store(f"chdb://{world / 'store'}")
    store.open()
    try:
        with served(lambda: make_app(store, WebAuth(token=token))) as api:
            remote = _cli(*args, "--api", api, "--token-file", str(tmp_path / "token"))
            assert remote.returncode == 1, remote.stderr
            assert json.loads(remote.stdout) == json.loads(local.stdout)
            rec = _cli("recommend", "--namespace", "shop", "--inventory", str(world / "inventory.yaml"), "--api", api,
                       "--token-file", str(tmp_path / "token"))
            assert rec.returncode == 1 and "frontend-observed" in rec.stdout
            no_token = _cli(*args, "--api", api)
            assert no_token.returncode == 2 and "401" in no_token.stderr and len(no_token.stderr.splitlines()) == 1
            import urllib.error
            import urllib.request

            for q in ("namespace=Shop%3BDROP", "since=yesterday", "table=x"):
                req = urllib.request.Request(f"{api}/api/v1/policy/keys?{q}",
                                             headers={"Authorization": f"Bearer {token}"})
                with pytest.raises(urllib.error.HTTPError) as err:
                    urllib.request.urlopen(req, timeout=30)
                assert err.value.code == 400 and q.split("=")[0] in json.loads(err.value.read())["error"]
    finally:
        store.close()
    gone = _cli(*args, "--api", "http://127.0.0.1:1")
    assert gone.returncode == 2 and "cannot reach the collector" in gone.stderr
