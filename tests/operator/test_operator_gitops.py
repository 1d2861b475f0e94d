"""GitOps and strictness, without a cluster: what `flowscope render` and the CRDs promise.

- strict specs: an unknown field is refused by render (and, through the same parser, by
  the operator), with the closest known field named; the CRD schemas declare exactly the
  fields the parser knows, each with a description (``kubectl explain``), and carry every
  rule the operator checks as OpenAPI or CEL (evaluated with cel-python);
- deterministic render with secrets: the same given CA gives the same bytes twice;
- cert-manager mode: the Certificate objects validate against cert-manager's own published
  CRD schema (tests/operator/data, Apache-2.0);
- ``--no-secrets`` prints no credential at all, not even the input's;
- the config hash render writes is the one the operator writes;
- a FlowExporterConfig with an explicit collector renders alone;
- the secure and observable defaults of every rendered manifest (kubernetes-validate,
  strict) and the agent's init script that puts the node's address in its config (run
  with the real /bin/sh).
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from flowscope.operator import manifests, tls
from flowscope.operator.manifests import Owner
from flowscope.operator.render import material_for, render_documents
from flowscope.operator.spec import FIELDS, SpecError, parse_flow_aggregator, parse_flow_exporter_config

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
K8S_VERSION = "1.37.0"
NOW = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
CRDS = {yaml.safe_load(p.read_text())["spec"]["names"]["kind"]: yaml.safe_load(p.read_text())
        for p in (ROOT / "crds").glob("*.yaml")}
SAMPLES = [d for p in sorted((ROOT / "config/samples").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def schema(kind: str) -> dict:
    return CRDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def fa(name="fa", ns="ns", **spec):
    return {"apiVersion": "flowscope.dev/v1alpha1", "kind": "FlowAggregator",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def fec(name="agents", ns="ns", **spec):
    return {"apiVersion": "flowscope.dev/v1alpha1", "kind": "FlowExporterConfig",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def by(objs, kind, name):
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def render(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowscope", "render", *args], capture_output=True, text=True,
                          input=stdin, env={**os.environ, "FLOWSCOPE_IMAGE": "flowscope:test"})


# -- strict specs ---------------------------------------------------------------------------

def test_unknown_fields_are_refused_with_the_closest_known_one():
    with pytest.raises(SpecError) as err:
        parse_flow_aggregator(fa(trasnport="tcp", sinks={"flowlog": {"enabled": True}}))
    assert err.value.problems == ["spec.trasnport: unknown field; did you mean transport?",
                                  "spec.sinks.flowlog: unknown field; did you mean flowLog?"]
    with pytest.raises(SpecError, match=r"spec.metrics.bindAdress: unknown field; did you mean bindAddress\?"):
        parse_flow_exporter_config(fec(flowCollectorAddr="c:1:udp", metrics={"bindAdress": "node"}))
    res = render("-f", "-", stdin=yaml.safe_dump(fa(trasnport="tcp")))
    assert res.returncode == 1 and res.stdout == ""
    assert "FlowAggregator ns/fa: spec.trasnport: unknown field; did you mean transport?" in res.stderr


def crd_tree(node: dict) -> dict:
    """The field tree a CRD schema declares (opaque Kubernetes types as leaves)."""
    props = node.get("properties")
    if node.get("type") == "array" or props is None or node.get("x-kubernetes-preserve-unknown-fields"):
        return None  # type: ignore[return-value]
    if set(props) <= {"requests", "limits"} and props:
        return {k: None for k in props}
    return {k: crd_tree(v) for k, v in props.items()}


def undescribed(node: dict, path: str) -> list[str]:
    out = []
    for key, sub in (node.get("properties") or {}).items():
        if key == "metadata" and path == "":
            continue
        if not sub.get("description") and not path.startswith(".status.conditions"):
            out.append(f"{path}.{key}")
        out += undescribed(sub, f"{path}.{key}")
        if isinstance(sub.get("items"), dict):
            out += undescribed(sub["items"], f"{path}.{key}[]")
    return out


@pytest.mark.parametrize("kind", ["FlowAggregator", "FlowExporterConfig"])
def test_the_crds_declare_exactly_the_known_fields_each_described(kind):
    assert crd_tree(schema(kind)["properties"]["spec"]) == FIELDS[kind]
    spec = schema(kind)["properties"]["spec"]
    assert undescribed(spec, ".spec") == []  # kubectl explain has something to say about every field
    assert undescribed(schema(kind)["properties"]["status"], ".status") == []


def cel(rule: str, value) -> bool:
    import celpy
    env = celpy.Environment()
    return bool(env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel(value)}))


def rules(node: dict, path=()) -> list[tuple[tuple, str]]:
    out = [(path, r["rule"]) for r in node.get("x-kubernetes-validations", [])]
    for key, sub in (node.get("properties") or {}).items():
        out += rules(sub, path + (key,))
    return out


def admitted(kind: str, body: dict) -> bool:
    """The CRD's verdict: OpenAPI (jsonschema) and every CEL rule where its value is set."""
    try:
        jsonschema.validate(body, schema(kind))
    except jsonschema.ValidationError:
        return False
    for path, rule in rules(schema(kind)):
        value = body
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None and not cel(rule, value):
            return False
    return True


@pytest.mark.parametrize("body", [
    fa(certificates={"lifetime": "24h", "rotationMargin": "48h"}),
    fa(certificates={"lifetime": "30m"}),
    fa(certificates={"lifetime": "100000h"}),  # longer than the default CA lifetime
    fa(name="x" * 53),
    fa(sinks={"ipfix": {"enabled": True}}, externalFlowCollectorAddr=""),
    fa(sinks={"clickhouse": {"enabled": True}}),
    fa(transport="tcp", certificates={"issuerRef": {"name": "ca"}}),
    fa(metrics={"port": 4739}, port=4739),
    fa(podLabels={"app.kubernetes.io/name": "x"}),
    fec(flowCollectorAddr="c:4739:tcp", transport="udp"),
    fec(flowCollectorAddr="c:4739"),  # tls without tlsSecretName
    fec(flowAggregatorRef={"name": "fa"}, maxUnavailable=0),
    fec(flowAggregatorRef={"name": "fa"}, metrics={"bindAddress": "eth0"}),
], ids=lambda b: f"{b['kind']}-{sorted(b['spec'])}")
def test_what_the_operator_refuses_the_crd_refuses_first(body):
    parse = parse_flow_aggregator if body["kind"] == "FlowAggregator" else parse_flow_exporter_config
    with pytest.raises(SpecError):
        parse(body)
    defaulted = copy.deepcopy(body)  # the apiserver defaults before it validates
    if body["kind"] == "FlowAggregator":
        defaulted["spec"] = {"transport": "tls", "port": 4739, "externalFlowCollectorAddr": "", **body["spec"]}
    assert not admitted(body["kind"], defaulted)


def test_the_samples_pass_both():
    for doc in SAMPLES:
        if doc["apiVersion"].startswith("flowscope.dev"):
            assert admitted(doc["kind"], doc), doc["metadata"]["name"]


# -- deterministic render, cert-manager, no secrets ---------------------------------------------

@pytest.fixture(scope="module")
def ca_files(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("ca")
    ca = tls.new_ca(NOW, 10 * 365 * 86400, "my-org-ca")
    (d / "ca.crt").write_bytes(ca.cert_pem)
    (d / "ca.key").write_bytes(ca.key_pem)
    return str(d / "ca.crt"), str(d / "ca.key")


def test_render_with_a_given_ca_is_the_same_twice_and_signed_by_it(ca_files):
    cert, key = ca_files
    args = ["-f", str(ROOT / "config/samples"), "--ca-cert", cert, "--ca-key", key]
    a, b = render(*args), render(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout  # re-applying changes nothing, rolls nothing
    docs = list(yaml.safe_load_all(a.stdout))
    server = by(docs, "Secret", "flow-aggregator-server-tls")
    import base64
    from cryptography import x509
    leaf = x509.load_pem_x509_certificate(base64.b64decode(server["data"]["tls.crt"]))
    ca = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    leaf.verify_directly_issued_by(ca)
    token = by(docs, "Secret", "lab-aggregator-api-token")["data"]["token"]
    assert token == by(list(yaml.safe_load_all(b.stdout)), "Secret", "lab-aggregator-api-token")["data"]["token"]
    # and the material stays valid: renewed a period later, before the rotation margin
    spec = parse_flow_aggregator(fa(certificates={"lifetime": "720h", "rotationMargin": "240h"}))
    given = tls.load(Path(cert).read_bytes(), Path(key).read_bytes())
    m1 = material_for(spec, NOW + dt.timedelta(days=1), given)
    assert material_for(spec, NOW + dt.timedelta(days=19), given) == m1
    m2 = material_for(spec, NOW + dt.timedelta(days=21), given)
    assert m2.server != m1.server and m2.server.not_after - (NOW + dt.timedelta(days=21)) > dt.timedelta(days=20)


def certificate_schema() -> dict:
    crd = yaml.safe_load((DATA / "cert-manager.io_certificates.yaml").read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def test_cert_manager_mode_renders_valid_certificates_instead_of_secrets():
    docs = [fa("flow-aggregator", "flow-aggregator", certificates={"issuerRef": {"name": "org-ca", "kind": "ClusterIssuer"}}),
            fec("flowscope-agent", "kube-system", flowAggregatorRef={"name": "flow-aggregator",
                                                                     "namespace": "flow-aggregator"})]
    out = render_documents(docs, image="i", now=NOW)
    assert [o for o in out if o["kind"] == "Secret"] == []  # nothing secret in the output at all
    certs = {o["metadata"]["name"]: o for o in out if o["kind"] == "Certificate"}
    assert set(certs) == {"flow-aggregator-server-tls", "flow-aggregator-client-tls",
                          "flow-aggregator-api-client-tls", "flowscope-agent-client-tls"}
    s = certificate_schema()
    for cert in certs.values():
        jsonschema.validate(cert, s)  # cert-manager's own schema, as published
        assert cert["spec"]["issuerRef"] == {"name": "org-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        assert cert["spec"]["secretName"] == cert["metadata"]["name"]
    server = certs["flow-aggregator-server-tls"]["spec"]
    assert server["dnsNames"][:3] == ["flow-aggregator", "flow-aggregator.flow-aggregator",
                                      "flow-aggregator.flow-aggregator.svc"]
    assert server["usages"] == ["digital signature", "server auth"]
    assert server["duration"] == "8760h0m0s" and server["renewBefore"] == "720h0m0s"
    assert certs["flowscope-agent-client-tls"]["metadata"]["namespace"] == "kube-system"
    # the pods mount the Secrets cert-manager will write
    pod = by(out, "DaemonSet", "flowscope-agent")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["tls"]["secret"]["secretName"] == "flowscope-agent-client-tls"
    # a namespaced Issuer cannot serve agents elsewhere: said before anything is rendered
    docs[0]["spec"]["certificates"]["issuerRef"]["kind"] = "Issuer"
    with pytest.raises(SpecError, match="use a ClusterIssuer"):
        render_documents(docs, image="i", now=NOW)


def test_no_secrets_prints_no_credential_at_all():
    res = render("-f", str(ROOT / "config/samples"), "--no-secrets")
    assert res.returncode == 0, res.stderr
    docs = list(yaml.safe_load_all(res.stdout))
    assert [d for d in docs if d["kind"] == "Secret"] == []
    assert "change-me" not in res.stdout  # the sample's ClickHouse password
    assert "left out Secret flowscope-lab/clickhouse-credentials" in res.stderr


def test_the_hash_render_writes_is_the_operators():
    spec = parse_flow_aggregator(fa())
    owner = Owner("FlowAggregator", "fa", "1234")
    offline = by(manifests.build_aggregator(spec, image="i", tls=None, secrets=False), "Deployment", "fa")
    live = by(manifests.build_aggregator(spec, image="i", tls=material_for(spec, NOW), owner=owner), "Deployment", "fa")
    key = "flowscope.dev/config-hash"
    assert offline["spec"]["template"]["metadata"]["annotations"][key] == \
        live["spec"]["template"]["metadata"]["annotations"][key]


def test_an_exporter_config_with_an_explicit_collector_renders_alone():
    res = render("-f", "-", stdin=yaml.safe_dump(fec(flowCollectorAddr="collector.example.org:4739:tcp")))
    assert res.returncode == 0, res.stderr
    docs = list(yaml.safe_load_all(res.stdout))
    assert by(docs, "DaemonSet", "agents")
    config = yaml.safe_load(by(docs, "ConfigMap", "agents-config")["data"]["agent.yaml"])
    assert config["flowCollectorAddr"] == "collector.example.org:4739:tcp"


# -- secure and observable defaults ---------------------------------------------------------------

def test_secure_and_observable_defaults():
    out = render_documents([*SAMPLES, fa("full", "ns", podAnnotations={"team": "net"}, podLabels={"tier": "obs"},
                                         priorityClassName="high", imagePullSecrets=[{"name": "regcred"}],
                                         affinity={"nodeAffinity": {}},
                                         sinks={"flowLog": {"enabled": True,
                                                            "persistentVolumeClaim": {"size": "10Gi"}}},
                                         metrics={"serviceMonitor": True, "podMonitor": True})],
                           image="flowscope:test", now=NOW)
    for doc in out:
        if doc["kind"] in ("ServiceMonitor", "PodMonitor"):
            continue  # the Prometheus operator's kinds: not in the upstream schemas
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    np = by(out, "NetworkPolicy", "flow-aggregator")["spec"]
    assert np["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "flow-aggregator"
    ports = {r["ports"][0]["port"]: r["from"] for r in np["ingress"]}
    assert set(ports) == {4739, 10348, 10349}
    assert ports[10348] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"flowscope.dev/api-client": "true"}}}]
    dep = by(out, "Deployment", "full")
    pod, meta = dep["spec"]["template"]["spec"], dep["spec"]["template"]["metadata"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    assert meta["annotations"]["prometheus.io/port"] == "10349" and meta["annotations"]["team"] == "net"
    assert meta["labels"]["tier"] == "obs" and meta["labels"]["app.kubernetes.io/part-of"] == "flowscope"
    assert meta["labels"]["app.kubernetes.io/version"]
    assert pod["priorityClassName"] == "high" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert {v["name"]: v for v in pod["volumes"]}["flow-log"] == {"name": "flow-log",
                                                                  "persistentVolumeClaim": {"claimName": "full-flow-log"}}
    assert by(out, "PersistentVolumeClaim", "full-flow-log")["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert by(out, "ServiceMonitor", "full")["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics",
                                                                        "scheme": "http"}]
    ds = by(out, "DaemonSet", "flowscope-agent")
    agent = ds["spec"]["template"]["spec"]["containers"][0]
    assert agent["readinessProbe"]["httpGet"]["path"] == "/healthz" and agent["resources"]["requests"]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1


def test_the_agent_config_gets_the_nodes_own_address(tmp_path):
    """The init container's script, run by the real /bin/sh on the rendered ConfigMap."""
    spec = parse_flow_exporter_config(fec(flowCollectorAddr="c:4739:tcp"))
    objs = manifests.build_agent(spec, image="i", collector=spec.flow_collector_addr, server_name=None, tls=None)
    text = by(objs, "ConfigMap", "agents-config")["data"]["agent.yaml"]
    (tmp_path / "template").mkdir()
    (tmp_path / "config").mkdir()
    (tmp_path / "template/agent.yaml").write_text(text)
    script = manifests.CONFIG_SCRIPT.replace("/etc/flowscope", str(tmp_path))
    from flowscope.agent.config import parse_config
    for host_ip, expected in (("10.1.2.3", ("10.1.2.3", 9390)), ("fd00::7", ("fd00::7", 9390))):
        subprocess.run(["/bin/sh", "-c", script], check=True, env={"HOST_IP": host_ip, "PATH": os.environ["PATH"]})
        cfg = parse_config(yaml.safe_load((tmp_path / "config/agent.yaml").read_text()), env={"NODE_NAME": "n"})
        assert cfg.metrics_address == expected
