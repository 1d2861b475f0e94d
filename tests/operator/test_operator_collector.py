"""spec.collector: a FlowAggregator that deploys the collector (flow store and dashboards).

Proves, without a cluster: ``flowscope render`` of the sample (chDB) and of a ClickHouse
variant gives manifests that kubernetes-validate accepts strictly; the wiring holds (the
aggregator's IPFIX sink exports to the collector's Service, whose port and selector match
the collector's pod; the chDB store on its PersistentVolumeClaim with one replica and
Recreate; the generated UI token Secret mounted where the command line reads it;
ClickHouse credentials only as secretKeyRef environment variables, and no credential in
the output under ``--no-secrets``); bad collector specs are refused by the operator's
parser and by the CRD (OpenAPI and CEL, test_operator_gitops.admitted). And the rendered
collector command line, run for real (only the addresses, the store directory and the
token file moved to loopback and a temporary directory), serves /healthz, the dashboards'
page and, with the rendered Secret's token and not without it, the panels' JSON.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from flowscope.operator.render import render_documents
from flowscope.operator.spec import SpecError, parse_flow_aggregator

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "config/samples/05-aggregator-with-collector.yaml"
K8S_VERSION = "1.37.0"


def by(objs, kind, name):
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def render(*args: str, stdin: str | None = None) -> list[dict]:
    res = subprocess.run([sys.executable, "-m", "flowscope", "render", *args], capture_output=True, text=True,
                         input=stdin, env={**os.environ, "FLOWSCOPE_IMAGE": "flowscope:test"})
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def container(objs, name):
    return by(objs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]


def validate_all(objs):
    for doc in objs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


CLICKHOUSE = """
apiVersion: v1
kind: Secret
metadata: {name: ch-creds, namespace: obs}
stringData: {user: flowscope, pass: "hunter2-not-printed"}
---
apiVersion: flowscope.dev/v1alpha1
kind: FlowAggregator
metadata: {name: agg, namespace: obs}
spec:
  transport: tls
  collector:
    enabled: true
    port: 4741
    store:
      clickhouse:
        address: "tcp://clickhouse.obs.svc:9000"
        database: netflows
        credentialsSecretRef: {name: ch-creds, usernameKey: user, passwordKey: pass}
    ui: {enabled: false, port: 9090}
    resources: {requests: {cpu: 200m, memory: 256Mi}}
"""


def test_the_chdb_sample_renders_a_wired_collector():
    objs = render("-f", str(SAMPLE))
    validate_all(objs)
    config = yaml.safe_load(by(objs, "ConfigMap", "flows-config")["data"]["aggregator.yaml"])
    assert config["externalFlowCollectorAddr"] == "flows-collector.flowscope-flows.svc:4740:tcp"
    assert config["sinks"]["ipfix"]["enabled"] is True
    svc = by(objs, "Service", "flows-collector")["spec"]
    assert {(p["name"], p["port"], p["protocol"]) for p in svc["ports"]} == {("ipfix-tcp", 4740, "TCP"),
                                                                             ("ui", 8080, "TCP")}
    dep = by(objs, "Deployment", "flows-collector")["spec"]
    assert dep["replicas"] == 1 and dep["strategy"] == {"type": "Recreate"}  # chDB: one process
    labels = dep["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= labels.items()
    assert not by(objs, "Service", "flows")["spec"]["selector"].items() <= labels.items()  # not the aggregator's
    c = dep["template"]["spec"]["containers"][0]
    assert c["args"] == ["collector", "--listen", "0.0.0.0:4740:tcp", "--store", "chdb:///var/lib/flowscope/store",
                         "--retention", "168h,720h,8760h", "--ui", "0.0.0.0:8080",
                         "--ui-token-file", "/etc/flowscope/ui-token/token"]
    assert c["readinessProbe"]["httpGet"] == c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ui"}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in dep["template"]["spec"]["volumes"]}
    assert mounts["store"] == "/var/lib/flowscope/store"
    assert volumes["store"]["persistentVolumeClaim"]["claimName"] == "flows-collector-store"
    pvc = by(objs, "PersistentVolumeClaim", "flows-collector-store")["spec"]
    assert pvc["resources"]["requests"]["storage"] == "20Gi" and pvc["accessModes"] == ["ReadWriteOnce"]
    assert mounts["ui-token"] == "/etc/flowscope/ui-token"
    assert volumes["ui-token"]["secret"]["secretName"] == "flows-ui-token"
    token = base64.b64decode(by(objs, "Secret", "flows-ui-token")["data"]["token"])
    assert len(token) == 64
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
    np = by(objs, "NetworkPolicy", "flows-collector")["spec"]
    ipfix_rule = next(r for r in np["ingress"] if r["ports"] == [{"protocol": "TCP", "port": 4740}])
    assert ipfix_rule["from"] == [{"podSelector": {"matchLabels": by(objs, "Service", "flows")["spec"]["selector"]}}]
    # no collector unless asked for
    fa = next(d for d in yaml.safe_load_all(SAMPLE.read_text()) if d["kind"] == "FlowAggregator")
    fa["spec"]["collector"]["enabled"] = False
    plain = render("-f", "-", stdin=yaml.safe_dump(fa))
    assert [o["metadata"]["name"] for o in plain if "collector" in o["metadata"]["name"] or "ui-token" in
            o["metadata"]["name"]] == []
    assert yaml.safe_load(by(plain, "ConfigMap", "flows-config")["data"]["aggregator.yaml"])[
        "externalFlowCollectorAddr"] == ""


def test_the_clickhouse_variant_takes_credentials_from_the_secret_only():
    objs = render("-f", "-", stdin=CLICKHOUSE)
    validate_all(objs)
    c = container(objs, "agg-collector")
    assert c["args"][:6] == ["collector", "--listen", "0.0.0.0:4741:tcp", "--store",
                             "tcp://clickhouse.obs.svc:9000/netflows", "--retention"]
    assert c["args"][7:] == ["--api", "0.0.0.0:9090", "--api-token-file", "/etc/flowscope/ui-token/token"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env == {"CLICKHOUSE_USERNAME": {"name": "ch-creds", "key": "user"},
                   "CLICKHOUSE_PASSWORD": {"name": "ch-creds", "key": "pass"}}
    assert c["resources"] == {"requests": {"cpu": "200m", "memory": "256Mi"}}
    dep = by(objs, "Deployment", "agg-collector")["spec"]
    assert "strategy" not in dep and not [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
    config = yaml.safe_load(by(objs, "ConfigMap", "agg-config")["data"]["aggregator.yaml"])
    assert config["externalFlowCollectorAddr"] == "agg-collector.obs.svc:4741:tcp"
    # an address of the user's own wins over the collector's Service
    own = parse_flow_aggregator({
        "apiVersion": "flowscope.dev/v1alpha1", "kind": "FlowAggregator", "metadata": {"name": "a", "namespace": "n"},
        "spec": {"externalFlowCollectorAddr": "elsewhere:4739:udp", "collector": {"enabled": True}}})
    assert own.external_flow_collector_addr == "elsewhere:4739:udp"

    text = subprocess.run([sys.executable, "-m", "flowscope", "render", "-f", "-", "--no-secrets"],
                          capture_output=True, text=True, input=CLICKHOUSE, check=True).stdout
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert [d for d in docs if d["kind"] == "Secret"] == []
    assert "hunter2" not in text
    mounted = {v["name"]: v for v in by(docs, "Deployment", "agg-collector")["spec"]["template"]["spec"]["volumes"]}
    assert mounted["ui-token"]["secret"]["secretName"] == "agg-ui-token"  # the operator's Secret, left out here


@pytest.mark.parametrize("collector, expected", [
    ({"enabled": True, "store": {"chdb": {}, "clickhouse": {"credentialsSecretRef": {"name": "s"}}}},
     "spec.collector.store: set either chdb"),
    ({"enabled": True, "store": {"clickhouse": {}}}, "spec.collector.store.clickhouse.credentialsSecretRef.name"),
    ({"enabled": True, "ui": {"port": 4740}}, "spec.collector.ui.port: 4740 must differ"),
    ({"enabled": True, "retention": "30m,720h,0"}, "spec.collector.retention: '30m,720h,0'"),
    ({"enabled": False, "store": {"chdb": {"reclaimPolicy": "Keep"}}},
     "spec.collector.store.chdb.reclaimPolicy: 'Keep' is not one of Retain, Delete"),
    # an unknown field: the apiserver's own strict field validation (kubectl's default) refuses it
    ({"enabled": True, "stroe": {}}, "spec.collector.stroe: unknown field; did you mean store?"),
])
def test_bad_collector_specs_are_refused_by_the_operator_and_the_crd(collector, expected):
    from test_operator_gitops import admitted
    body = {"apiVersion": "flowscope.dev/v1alpha1", "kind": "FlowAggregator", "metadata": {"name": "fa", "namespace": "ns"},
            "spec": {"transport": "tls", "port": 4739, "externalFlowCollectorAddr": "", "collector": collector}}
    with pytest.raises(SpecError) as err:
        parse_flow_aggregator(body)
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems
    if "unknown field" not in expected:
        assert not admitted("FlowAggregator", body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.timeout(180)
def test_the_rendered_collector_command_runs(tmp_path):
    """The Deployment's args, run by the real `flowscope collector` (chDB): addresses on
    loopback, the store in a temporary directory, the token from the rendered Secret."""
    objs = render("-f", str(SAMPLE))
    args = container(objs, "flows-collector")["args"]
    token = base64.b64decode(by(objs, "Secret", "flows-ui-token")["data"]["token"]).decode()
    (tmp_path / "token").write_text(token)
    ui_port = free_port()
    moved = {"0.0.0.0:4740:tcp": f"127.0.0.1:{free_port()}:tcp", "chdb:///var/lib/flowscope/store":
             f"chdb://{tmp_path}/store", "0.0.0.0:8080": f"127.0.0.1:{ui_port}",
             "/etc/flowscope/ui-token/token": str(tmp_path / "token")}
    assert set(moved) <= set(args)
    cmd = [sys.executable, "-m", "flowscope", *[moved.get(a, a) for a in args]]
    log = open(tmp_path / "collector.log", "w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=tmp_path)
    base = f"http://127.0.0.1:{ui_port}"
    try:
        while True:
            assert proc.poll() is None, (tmp_path / "collector.log").read_text()
            try:
                if get(f"{base}/healthz") == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)  # polling for the condition, not a fixed wait
        assert get(f"{base}/", token) == 200  # the dashboards' page
        assert get(f"{base}/ui/v1/summary", token) == 200  # a panel's JSON, from the chDB store
        assert get(f"{base}/ui/v1/summary") == 401  # not without the token
        assert f"storing into chdb://{tmp_path}/store" in (tmp_path / "collector.log").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def test_the_claim_whose_fate_reclaim_policy_decides():
    """The chDB claim is in question exactly when no collector uses it; its flows are kept
    unless the spec says Delete."""
    from flowscope.operator.manifests import collector_store_claim

    def spec(collector):
        return parse_flow_aggregator({"apiVersion": "flowscope.dev/v1alpha1", "kind": "FlowAggregator",
                                      "metadata": {"name": "fa", "namespace": "ns"},
                                      "spec": {"transport": "tcp", "collector": collector}})
    assert collector_store_claim(spec({"enabled": True})) is None  # in use
    off = spec({"enabled": False})
    assert collector_store_claim(off) == "fa-collector-store" and off.collector.chdb_reclaim_policy == "Retain"
    moved = spec({"enabled": True, "store": {"clickhouse": {"credentialsSecretRef": {"name": "s"}}}})
    assert collector_store_claim(moved) == "fa-collector-store"  # the store moved to a server
    gone = spec({"enabled": False, "store": {"chdb": {"reclaimPolicy": "Delete"}}})
    assert gone.collector.chdb_reclaim_policy == "Delete"
    # the builders never render the claim of a collector switched off
    assert not [o for o in render_documents([{"apiVersion": "flowscope.dev/v1alpha1", "kind": "FlowAggregator",
                                              "metadata": {"name": "fa", "namespace": "ns"},
                                              "spec": {"transport": "tcp", "collector": {"enabled": False}}}],
                                            image="i") if o["kind"] == "PersistentVolumeClaim"]
