"""The operator sets what the data plane already speaks: ``transport: grpc`` (Antrea's Flow
messages over gRPC with mutual TLS, aggregator/grpc_collector.py) and the agents'
``recordContents.podLabels`` (agent/config.py).

Sample 06 rendered: every manifest passes kubernetes-validate (strict, 1.37); the aggregator's
Service and pod expose the gRPC port by that name; the config files are read back by the
aggregator's and the agent's own parsers (gRPC on, the labels on); the spec and the CRDs'
CEL rules (evaluated with celpy) refuse the same mistakes, naming the field.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from flowscope.aggregator.config import parse_config as parse_aggregator_config
from flowscope.agent.config import parse_config as parse_agent_config
from flowscope.operator.render import render_documents
from flowscope.operator.spec import SpecError, parse_endpoint, parse_flow_aggregator, parse_flow_exporter_config

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "config" / "samples" / "06-aggregator-grpc.yaml"
CRDS = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "crds").glob("*.yaml")}
NS = "flowscope-grpc"


def _by(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    docs = [d for d in yaml.safe_load_all(SAMPLE.read_text()) if d]
    return render_documents(docs, image="flowscope:test", now=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))


def test_the_grpc_sample_renders_valid_manifests_with_the_grpc_port_exposed(rendered):
    for doc in rendered:
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
    svc = _by(rendered, "Service", "grpc-aggregator")
    assert svc["spec"]["ports"][0] == {"name": "grpc", "protocol": "TCP", "port": 14739, "targetPort": 14739}
    pod = _by(rendered, "Deployment", "grpc-aggregator")["spec"]["template"]["spec"]
    assert {"name": "grpc", "containerPort": 14739, "protocol": "TCP"} in pod["containers"][0]["ports"]
    assert "tls" in {m["name"] for m in pod["containers"][0]["volumeMounts"]}  # the gRPC server's mutual TLS
    policy = _by(rendered, "NetworkPolicy", "grpc-aggregator")
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 14739}]
    # the operator makes the certificates as for tls, and hands the agents their client pair
    for name in ("grpc-aggregator-ca", "grpc-aggregator-server-tls", "grpc-aggregator-client-tls",
                 "grpc-agents-client-tls"):
        assert _by(rendered, "Secret", name)["data"]["tls.crt"]


def test_the_grpc_configs_are_read_by_the_aggregator_and_the_agent(rendered):
    raw = yaml.safe_load(_by(rendered, "ConfigMap", "grpc-aggregator-config")["data"]["aggregator.yaml"])
    assert raw["aggregatorTransportProtocol"] == "grpc" and raw["listenPort"] == 14739
    agg = parse_aggregator_config(raw)
    assert (agg.transport, agg.listen_port, agg.tls.cert_file) == ("grpc", 14739, "/etc/flowscope/tls/tls.crt")
    assert raw["api"]["tls"]  # the flow-records API uses mutual TLS against the agents' CA, as with tls
    text = _by(rendered, "ConfigMap", "grpc-agents-config")["data"]["agent.yaml"]
    raw = yaml.safe_load(text.replace("__NODE_IP__", "10.0.0.1"))
    assert raw["flowCollectorAddr"] == "grpc-aggregator.flowscope-grpc.svc:14739:grpc"
    assert raw["recordContents"] == {"podLabels": True}
    agent = parse_agent_config(raw, env={"NODE_NAME": "node-1"})
    assert agent.grpc and agent.pod_labels
    assert (agent.flow_collector.host, agent.flow_collector.port) == ("grpc-aggregator.flowscope-grpc.svc", 14739)
    assert agent.tls_server_name == "grpc-aggregator.flowscope-grpc.svc"
    assert agent.tls.cert_file == "/etc/flowscope/tls/tls.crt"


def test_pod_labels_stay_off_unless_asked_for():
    spec = parse_flow_exporter_config({"kind": "FlowExporterConfig", "metadata": {"name": "a", "namespace": "n"},
                                       "spec": {"flowCollectorAddr": "c:4739:tcp"}})
    assert spec.pod_labels is False


def _fec(spec: dict) -> dict:
    return {"kind": "FlowExporterConfig", "metadata": {"name": "a", "namespace": "n"}, "spec": spec}


@pytest.mark.parametrize("spec,expected", [
    ({"flowCollectorAddr": "c:14739:grpc"}, "spec.tlsSecretName: required when spec.flowCollectorAddr ('c:14739:grpc') "
                                            "uses grpc (mutual TLS)"),
    ({"flowCollectorAddr": "c:4739:tcp", "transport": "grpc"}, "spec.transport: 'grpc' disagrees with the protocol"),
    ({"flowCollectorAddr": "c:4739:tcp", "recordContents": {"podLabels": "yes"}},
     "spec.recordContents.podLabels: 'yes' must be true or false"),
    ({"flowCollectorAddr": "c:4739:tcp", "recordContents": {"podLabel": True}},
     "spec.recordContents.podLabel: unknown field; did you mean podLabels?"),
    ({"flowCollectorAddr": "c:4739:tcp", "recordContents": True}, "spec.recordContents: must be a mapping, got True"),
    ({"flowCollectorAddr": "c:4739:tcp", "transport": "http"}, "spec.transport: 'http' is not one of tls, tcp, udp, grpc"),
])
def test_bad_grpc_and_label_specs_name_the_field(spec, expected):
    with pytest.raises(SpecError) as exc:
        parse_flow_exporter_config(_fec(spec))
    assert expected in str(exc.value)


def test_explicit_grpc_addresses_default_to_antreas_port():
    spec = parse_flow_exporter_config(_fec({"flowCollectorAddr": "[fd00::1]:grpc", "tlsSecretName": "mine"}))
    assert str(spec.flow_collector_addr) == "[fd00::1]:14739:grpc" and spec.flow_collector_addr.mutual_tls
    via = parse_flow_exporter_config(_fec({"flowCollectorAddr": "c", "transport": "grpc", "tlsSecretName": "m"}))
    assert str(via.flow_collector_addr) == "c:14739:grpc"
    assert str(parse_endpoint("c:4739:TCP", default_protocol="grpc", field="f")) == "c:4739:tcp"


def test_a_tcp_agent_cannot_reference_a_grpc_aggregator():
    from flowscope.operator.manifests import resolve_collector

    fa = parse_flow_aggregator({"kind": "FlowAggregator", "metadata": {"name": "g", "namespace": "n"},
                                "spec": {"transport": "grpc", "port": 14739}})
    assert fa.collector_address == "g.n.svc:14739:grpc"
    fec = parse_flow_exporter_config(_fec({"flowAggregatorRef": {"name": "g"}, "transport": "tcp"}))
    with pytest.raises(SpecError, match="spec.transport: 'tcp' does not match FlowAggregator n/g, which listens "
                                        "with 'grpc'"):
        resolve_collector(fec, fa)
    # cert-manager may issue the grpc certificates too
    parse_flow_aggregator({"kind": "FlowAggregator", "metadata": {"name": "g", "namespace": "n"},
                           "spec": {"transport": "grpc", "certificates": {"issuerRef": {"name": "ca"}}}})


def _schema(kind: str) -> dict:
    crd = next(c for c in CRDS.values() if c["spec"]["names"]["kind"] == kind)
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _cel(rule: str, value) -> bool:
    import celpy  # the test extra installs it
    env = celpy.Environment()
    return bool(env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel(value)}))


def test_the_crds_admit_grpc_and_pod_labels_and_their_cel_rules_agree_with_the_operator():
    fec = _schema("FlowExporterConfig")["properties"]["spec"]
    props = fec["properties"]
    assert "grpc" in props["transport"]["enum"] and props["recordContents"]["properties"]["podLabels"]["default"] is False
    for field in (props["transport"], props["flowCollectorAddr"], props["recordContents"],
                  props["recordContents"]["properties"]["podLabels"]):
        assert field["description"]  # kubectl explain
    pattern = re.compile(props["flowCollectorAddr"]["pattern"])
    assert pattern.match("c:14739:grpc") and pattern.match("[fd00::1]:GRPC") and not pattern.match("c:1:grpcs")
    rules = [r["rule"] for r in fec["x-kubernetes-validations"]]
    secret_rule = next(r for r in rules if "tlsSecretName" in r)
    assert not _cel(secret_rule, {"flowCollectorAddr": "c:14739:grpc"})
    assert not _cel(secret_rule, {"flowCollectorAddr": "c", "transport": "grpc"})
    assert _cel(secret_rule, {"flowCollectorAddr": "c:14739:grpc", "tlsSecretName": "m"})
    assert _cel(secret_rule, {"flowCollectorAddr": "c:4739:tcp"})
    agree = next(r for r in rules if "self.transport + '$'" in r)
    assert not _cel(agree, {"flowCollectorAddr": "c:1:grpc", "transport": "tls"})
    assert _cel(agree, {"flowCollectorAddr": "c:1:grpc", "transport": "grpc"})
    fa = _schema("FlowAggregator")["properties"]["spec"]
    assert "grpc" in fa["properties"]["transport"]["enum"]
    issuer = next(r["rule"] for r in fa["x-kubernetes-validations"] if "issuerRef" in r["rule"])
    assert _cel(issuer, {"transport": "grpc", "certificates": {"issuerRef": {"name": "ca"}}})
    assert not _cel(issuer, {"transport": "tcp", "certificates": {"issuerRef": {"name": "ca"}}})
