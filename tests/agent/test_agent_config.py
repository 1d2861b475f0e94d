"""The agent's configuration: defaults of the design, and errors naming key, value and fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
from flowscope.agent.config import ConfigError, load_config, parse_config


def test_defaults_are_the_designs():
    cfg = parse_config({}, env={"NODE_NAME": "node-7"})
    assert str(cfg.flow_collector) == "flow-aggregator.flow-aggregator.svc:4739:tls"
    assert (cfg.poll_interval, cfg.active_timeout, cfg.idle_timeout) == (5.0, 60.0, 15.0)
    assert cfg.node_name == "node-7"
    assert cfg.tls.ca_file == "/etc/flowscope/tls/ca.crt" and cfg.tls_server_name == "flow-aggregator.flow-aggregator.svc"
    assert cfg.conntrack_zones == () and cfg.max_connections == 200_000
    assert cfg.metrics_address == ("0.0.0.0", 9390)
    assert cfg.metadata.source == "none"
    assert parse_config({}, env={"KUBERNETES_SERVICE_HOST": "10.96.0.1"}).metadata.source == "kubernetes"


def test_every_key_parses():
    cfg = parse_config({
        "flowCollectorAddr": "[fd00::5]:4740:udp",
        "flowPollInterval": "1s",
        "activeFlowExportTimeout": "1m30s",
        "idleFlowExportTimeout": "1500ms",
        "nodeName": "n1",
        "tls": {"caFile": "/c", "certFile": "/t", "keyFile": "/k", "serverName": "agg"},
        "conntrackZones": [3, 0, 3],
        "maxConnections": 10,
        "metricsAddress": "[::1]:9000",
        "metadata": {"source": "static", "staticFile": "/inv.yaml", "watchRemotePods": False},
        "exportQueueSize": 500,
    }, env={})
    assert (cfg.flow_collector.host, cfg.flow_collector.port, cfg.flow_collector.protocol) == ("fd00::5", 4740, "udp")
    assert (cfg.poll_interval, cfg.active_timeout, cfg.idle_timeout) == (1.0, 90.0, 1.5)
    assert cfg.tls_server_name == "agg" and cfg.conntrack_zones == (0, 3)
    assert cfg.metrics_address == ("::1", 9000) and cfg.metadata.static_file == "/inv.yaml"
    assert cfg.metadata.watch_remote_pods is False and cfg.export_queue_size == 500
    assert parse_config({"metricsAddress": ""}, env={}).metrics_address is None


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"flowPollInterval": "500ms"}, "flowPollInterval: '500ms' is below the 1s minimum"),
        ({"flowPollInterval": "5"}, "flowPollInterval: '5' is not a valid duration"),
        ({"activeFlowExportTimeout": "1 minute"}, "activeFlowExportTimeout: '1 minute' is not a valid duration"),
        ({"idleFlowExportTimeout": 15}, "idleFlowExportTimeout: 15 has no unit"),
        ({"flowCollectorAddr": "fd00::1:4739"}, "flowCollectorAddr: .* IPv6 address must be in brackets"),
        ({"flowCollectorAddr": "agg:4739:sctp"}, "flowCollectorAddr: protocol 'sctp'"),
        ({"flowCollectorAddr": "agg:99999"}, "flowCollectorAddr: port '99999'"),
        ({"conntrackZones": [70000]}, "conntrackZones: 70000 is not a zone number"),
        ({"conntrackZones": "all"}, "conntrackZones: 'all' must be a list"),
        ({"maxConnections": 0}, "maxConnections: 0 must be a whole number from 1"),
        ({"maxConnections": "lots"}, "maxConnections: 'lots' must be a whole number"),
        ({"metricsAddress": "9390"}, "metricsAddress: '9390' is not an address"),
        ({"metricsAddress": "0.0.0.0:http"}, "metricsAddress: port 'http'"),
        ({"metadata": {"source": "etcd"}}, "metadata.source: 'etcd' is not one of kubernetes, static, none"),
        ({"metadata": {"source": "static"}}, "metadata.staticFile: None must name the inventory YAML file"),
        ({"tls": {"caFile": ""}}, "tls.caFile: '' must be a non-empty string"),
        ({"flowPollIntervall": "5s"}, "flowPollIntervall: unknown key; allowed keys are"),
        ({"tls": {"ca": "/x"}}, "tls.ca: unknown key"),
        ({"exportHostFlows": "yes"}, "exportHostFlows: 'yes' must be true or false"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_config(raw, env={})


def test_load_config_reports_bad_yaml_and_missing_files(tmp_path):
    bad = tmp_path / "a.yaml"
    bad.write_text("flowPollInterval: [5s\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"))
    top = tmp_path / "b.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(str(top))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "flowscope", "agent", *args], capture_output=True, text=True, timeout=60)


def test_cli_refuses_a_bad_config_with_the_message(tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text('flowPollInterval: "200ms"\n')
    proc = run_cli("--config", str(cfg))
    assert proc.returncode == 2
    assert "flowPollInterval: '200ms' is below the 1s minimum" in proc.stderr


def test_cli_check_validates_config_and_static_inventory(tmp_path):
    inv = tmp_path / "inv.yaml"
    inv.write_text("kind: Pod\nmetadata: {name: p, namespace: n}\nstatus: {podIP: 10.0.0.300}\n")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"nodeName: n1\nflowCollectorAddr: 127.0.0.1:4739:tcp\nmetadata: {{source: static, staticFile: {inv}}}\n")
    proc = run_cli("--config", str(cfg), "--check")
    assert proc.returncode == 2 and "Pod n/p: status.podIPs: '10.0.0.300'" in proc.stderr
    inv.write_text("kind: Pod\nmetadata: {name: p, namespace: n}\nstatus: {podIP: 10.0.0.3}\n")
    proc = run_cli("--config", str(cfg), "--check")
    assert proc.returncode == 0 and "node n1" in proc.stdout


def test_cli_refuses_unreadable_tls_files(tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"flowCollectorAddr: 127.0.0.1:4739:tls\ntls: {{caFile: {tmp_path}/nope.crt}}\nmetricsAddress: ''\n")
    proc = run_cli("--config", str(cfg))
    assert proc.returncode == 2 and "nope.crt" in proc.stderr and "tls.caFile" in proc.stderr


def test_cli_kubernetes_source_without_a_cluster_says_so(tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("flowCollectorAddr: 127.0.0.1:4739:tcp\nmetricsAddress: ''\nmetadata: {source: kubernetes}\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")}
    proc = subprocess.run([sys.executable, "-m", "flowscope", "agent", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "metadata.source: kubernetes needs the in-cluster service account or a kubeconfig" in proc.stderr


def test_grpc_collector_address_and_pod_labels_as_antrea_configures_them():
    cfg = parse_config({"flowCollectorAddr": "flow-aggregator.flow-aggregator.svc:grpc"}, env={"NODE_NAME": "n"})
    assert cfg.grpc and (cfg.flow_collector.host, cfg.flow_collector.port) == ("flow-aggregator.flow-aggregator.svc", 14739)
    cfg = parse_config({"flowCollectorAddr": "[fd00::1]:9000:GRPC"}, env={"NODE_NAME": "n"})
    assert cfg.grpc and (cfg.flow_collector.host, cfg.flow_collector.port) == ("fd00::1", 9000)
    assert not parse_config({}, env={"NODE_NAME": "n"}).grpc
    assert not parse_config({}, env={"NODE_NAME": "n"}).pod_labels  # off by default
    assert parse_config({"recordContents": {"podLabels": True}}, env={"NODE_NAME": "n"}).pod_labels
    with pytest.raises(ConfigError, match=r"recordContents.podLabels: 'yes' must be true or false"):
        parse_config({"recordContents": {"podLabels": "yes"}})
    with pytest.raises(ConfigError, match=r"recordContents.labels: unknown key; allowed keys are podLabels"):
        parse_config({"recordContents": {"labels": True}})


def test_cli_check_reads_the_tls_files_a_real_start_needs(tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"nodeName: n1\nflowCollectorAddr: 127.0.0.1:4739:tls\ntls: {{caFile: {tmp_path}/ca.crt}}\n")
    proc = run_cli("--config", str(cfg), "--check")
    assert proc.returncode == 2 and "tls.caFile: cannot read" in proc.stderr and "ca.crt" in proc.stderr


@pytest.mark.parametrize("raw, message", [
    ({"conntrackZones": 0}, r"conntrackZones: 0 must be a list"),
    ({"conntrackZones": False}, r"conntrackZones: False must be a list"),
    ({"metadata": {"source": False}}, r"metadata.source: False is not one of"),
    ({"metadata": {"source": ""}}, r"metadata.source: '' is not one of"),
    ({"metadata": []}, r"metadata: \[\] must be a mapping"),
    ({"tls": []}, r"tls: \[\] must be a mapping"),
    ({"tls": False}, r"tls: False must be a mapping"),
    ({"tls": {"serverName": False}}, r"tls.serverName: False must be a non-empty string"),
    ({"flowPollInterval": float("nan")}, r"flowPollInterval: nan"),
    ({"activeFlowExportTimeout": float("inf")}, r"activeFlowExportTimeout: inf"),
    ({"idleFlowExportTimeout": "10000h"}, r"idleFlowExportTimeout: '10000h' is above the 168h"),
])
def test_falsy_and_non_finite_values_are_refused_not_taken_for_defaults(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, env={})
