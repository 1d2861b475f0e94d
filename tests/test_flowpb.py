"""flowscope/flowpb: our flow.proto against Antrea's published gRPC flow API, the committed
generated code against what grpcio-tools makes of it, and the record <-> Flow mapping."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from flowscope.flowpb import flow_pb2, flow_to_record, record_to_flow

REPO = Path(__file__).resolve().parent.parent
ANTREA = Path(__file__).parent / "data" / "antrea_flow_proto.csv"


def our_facts() -> set[tuple[str, ...]]:
    fd = descriptor_pb2.FileDescriptorProto()
    flow_pb2.DESCRIPTOR.CopyToProto(fd)
    rows: set[tuple[str, ...]] = set()
    label, ftype = descriptor_pb2.FieldDescriptorProto.Label.Name, descriptor_pb2.FieldDescriptorProto.Type.Name

    def walk(prefix: str, msgs) -> None:  # type: ignore[no-untyped-def]
        for m in msgs:
            name = prefix + m.name
            for f in m.field:
                oneof = m.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else ""
                rows.add(("field", name, f.name, str(f.number), ftype(f.type), f.type_name, label(f.label), oneof))
            walk(name + ".", m.nested_type)

    walk(fd.package + ".", fd.message_type)
    for e in fd.enum_type:
        for v in e.value:
            rows.add(("enum", f"{fd.package}.{e.name}", v.name, str(v.number), "", "", "", ""))
    for s in fd.service:
        for mth in s.method:
            streaming = ("client_streaming" if mth.client_streaming else "") + ("server_streaming" if mth.server_streaming else "")
            rows.add(("rpc", f"{fd.package}.{s.name}", mth.name, "0", mth.input_type, mth.output_type, streaming, ""))
    return rows


def test_package_services_messages_fields_and_numbers_are_antreas() -> None:
    lines = [line for line in ANTREA.read_text().splitlines() if line and not line.startswith("#")]
    theirs = {tuple(r[k] for k in ("kind", "scope", "name", "number", "type", "type_name", "label", "oneof"))
              for r in csv.DictReader(lines)}
    assert len(theirs) == 128
    ours = our_facts()
    assert ours == theirs, {"only ours": sorted(ours - theirs), "only Antrea's": sorted(theirs - ours)}


def test_committed_generated_code_is_what_grpcio_tools_makes(tmp_path: Path) -> None:
    grpc_tools = pytest.importorskip("grpc_tools")
    include = Path(grpc_tools.__file__).parent / "_proto"
    shutil.copytree(REPO / "flowscope" / "flowpb", tmp_path / "flowscope" / "flowpb",
                    ignore=shutil.ignore_patterns("*_pb2*.py", "__pycache__", "__init__.py"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"-I{include}", "--python_out=.",
                    "--grpc_python_out=.", "flowscope/flowpb/flow.proto"], cwd=tmp_path, check=True)
    for name in ("flow_pb2.py", "flow_pb2_grpc.py"):
        fresh = (tmp_path / "flowscope" / "flowpb" / name).read_text()
        assert fresh == (REPO / "flowscope" / "flowpb" / name).read_text(), f"{name} is stale: regenerate it"


def _record(v6: bool, **over: object) -> dict[str, object]:
    from flowscope.ipfix.antrea import agent_fields

    fam, short = ("IPv6", "v6") if v6 else ("IPv4", "v4")
    rec: dict[str, object] = {name: "" for name in agent_fields(6 if v6 else 4)}
    rec.update({
        "flowStartSeconds": 1_790_000_000, "flowEndSeconds": 1_790_000_009, "flowEndReason": 3,
        f"source{fam}Address": "fd00:10:1::5" if v6 else "10.1.0.5",
        f"destination{fam}Address": "fd00:10:2::7" if v6 else "10.2.0.7",
        "sourceTransportPort": 40000, "destinationTransportPort": 8080, "protocolIdentifier": 6,
        "packetTotalCount": 12, "octetTotalCount": 3400, "packetDeltaCount": 2, "octetDeltaCount": 400,
        "reversePacketTotalCount": 10, "reverseOctetTotalCount": 9000, "reversePacketDeltaCount": 1,
        "reverseOctetDeltaCount": 700, f"destinationClusterIP{short}": "fd00:96::a" if v6 else "10.96.0.10",
        f"destinationServiceIP{short}": "fd00:96::a" if v6 else "10.96.0.10",
        f"proxySnatIP{short}": "fd00:ffff::1" if v6 else "169.254.3.1", "proxySnatPort": 61000,
        "destinationServicePort": 80, "ingressNetworkPolicyType": 2, "ingressNetworkPolicyRuleAction": 1,
        "egressNetworkPolicyType": 1, "egressNetworkPolicyRuleAction": 3, "flowType": 2,
        "sourcePodNamespace": "shop", "sourcePodName": "web-0", "sourceNodeName": "node-a",
        "destinationServicePortName": "shop/api:http", "egressNetworkPolicyName": "deny-all",
        "tcpState": "TIME_WAIT", "egressName": "eg", "egressIP": "172.18.0.9", "egressNodeName": "node-e",
    })
    rec.update(over)
    return rec


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_record_survives_the_flow_message_unchanged(v6: bool) -> None:
    rec = _record(v6)
    wire = record_to_flow(rec, observation_domain_id=7).SerializeToString()
    back = flow_to_record(flow_pb2.Flow.FromString(wire))
    assert back == rec


def test_labels_and_empty_fields_as_antrea_leaves_them() -> None:
    rec = _record(False, sourcePodLabels='{"app":"web","tier":"a"}', destinationPodLabels="{}",
                  proxySnatIPv4="0.0.0.0", proxySnatPort=0, destinationClusterIPv4="0.0.0.0",
                  destinationServiceIPv4="0.0.0.0", egressIP="", tcpState="")
    f = record_to_flow(rec)
    assert f.proxy_snat_ip == b"" and f.k8s.destination_service_ip == b"" and not f.transport.HasField("TCP")
    assert dict(f.k8s.source_pod_labels.labels) == {"app": "web", "tier": "a"}
    assert f.k8s.HasField("destination_pod_labels") and not f.k8s.destination_pod_labels.labels
    assert flow_to_record(flow_pb2.Flow.FromString(f.SerializeToString())) == rec
    with pytest.raises(ValueError):
        flow_to_record(flow_pb2.Flow())  # no IP version: not a flow
