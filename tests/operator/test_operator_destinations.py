"""FlowExporterConfig spec.destinations: the CRD's schema, the operator's checks and the
agent configuration it renders, which the agent itself must accept."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml
from flowscope.agent.config import parse_config
from flowscope.operator.manifests import NODE_IP
from flowscope.operator.spec import parse_endpoint
from flowscope.operator.manifests import agent_config
from flowscope.operator.spec import SpecError, parse_flow_exporter_config

CRD = yaml.safe_load((Path(__file__).parents[2] / "crds" / "flowexporterconfigs.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

SECURITY = {
    "name": "security", "address": "soc.example.org:4739:udp", "idleFlowExportTimeout": "30s",
    "filter": {"protocols": ["TCP", "UDP"], "namespaces": ["shop"], "flowTypes": ["InterNode", "ToExternal"],
               "deniedOnly": True},
}


def fec(**spec):
    return {"apiVersion": "flowscope.dev/v1alpha1", "kind": "FlowExporterConfig",
            "metadata": {"name": "agents", "namespace": "ns"}, "spec": spec}


def test_destinations_pass_the_schema_the_operator_and_the_agent():
    body = fec(flowAggregatorRef={"name": "fa"}, destinations=[SECURITY])
    jsonschema.validate(body, SCHEMA)
    spec = parse_flow_exporter_config(body)
    cfg = agent_config(spec, parse_endpoint("fa.ns.svc:4739:tls", default_protocol="tls", field="flowCollectorAddr"), None)
    assert cfg["destinations"] == [SECURITY]
    # the agent pod's init container writes the node's address where NODE_IP stands
    cfg["metricsAddress"] = cfg["metricsAddress"].replace(NODE_IP, "10.0.0.1")
    agent = parse_config(cfg, env={})
    (d,) = agent.destinations
    assert (d.name, str(d.address), d.idle_timeout) == ("security", "soc.example.org:4739:udp", 30.0)
    assert d.filter.denied_only and d.filter.protocols == {6, 17} and d.filter.flow_types == {2, 3}
    assert "destinations" not in agent_config(parse_flow_exporter_config(fec(flowAggregatorRef={"name": "fa"})),
                                              parse_endpoint("fa.ns.svc:4739:tls", default_protocol="tls", field="flowCollectorAddr"), None)


@pytest.mark.parametrize("dest", [
    {"address": "a:1"},
    {"name": "x", "address": "a:1:sctp"},
    {"name": "x", "address": "a", "filter": {"flowTypes": ["Sideways"]}},
    {"name": "x", "address": "a", "filter": {"protocols": ["GRE"]}},
    {"name": "X_Y", "address": "a"},
])
def test_the_schema_refuses_bad_destinations(dest):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(fec(flowAggregatorRef={"name": "fa"}, destinations=[dest]), SCHEMA)


@pytest.mark.parametrize("dest, message", [
    ({"address": "a:1"}, "spec.destinations[0].name: required"),
    ({"name": "x", "address": "a:1:sctp"}, "spec.destinations[0].address"),
    ({"name": "main", "address": "a"}, "used twice"),
    ({"name": "x", "address": "a", "idleFlowExportTimeout": "10ms"}, "spec.destinations[0].idleFlowExportTimeout"),
    ({"name": "x", "address": "a", "color": "red"}, "spec.destinations[0].color: unknown key"),
])
def test_the_operator_names_the_field_of_a_bad_destination(dest, message):
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_flow_exporter_config(fec(flowAggregatorRef={"name": "fa"}, destinations=[dest]))
