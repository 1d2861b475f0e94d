"""The aggregator YAML: the design's keys and defaults, and errors that name key, value and fix."""

from __future__ import annotations

import pytest

from flowscope.aggregator.config import ConfigError, load_config, parse_config
from flowscope.ipfix.address import Address


def test_defaults_are_the_designs():
    c = parse_config({})
    assert c.external_collector is None
    assert c.export_interval == 60.0
    assert c.transport == "tls"
    assert c.aggregator_address == "flow-aggregator.flow-aggregator.svc"
    assert c.listen_port == 4739
    assert (c.tls.ca_file, c.tls.cert_file, c.tls.key_file) == (
        "/etc/flowscope/tls/ca.crt", "/etc/flowscope/tls/tls.crt", "/etc/flowscope/tls/tls.key")
    assert (c.correlation_timeout, c.inactive_timeout, c.max_flows) == (30.0, 90.0, 500_000)
    assert c.api_address == ("127.0.0.1", 10348)  # loopback: open; elsewhere it needs authentication
    assert c.metrics_address == ("0.0.0.0", 10349)
    assert not c.sinks.ipfix.enabled and not c.sinks.flow_log.enabled and not c.sinks.clickhouse.enabled
    assert c.sinks.flow_log.path == "/var/log/flowscope/flows.jsonl"
    assert (c.sinks.flow_log.max_size_mb, c.sinks.flow_log.max_backups) == (100.0, 3)
    assert (c.sinks.clickhouse.address, c.sinks.clickhouse.database, c.sinks.clickhouse.table,
            c.sinks.clickhouse.commit_interval) == ("tcp://clickhouse:9000", "flowscope", "flows", 8.0)
    assert c.sinks.ipfix.queue_size == c.sinks.flow_log.queue_size == 10_000
    # the ClickHouse sink holds more, so that its inserts carry 100,000 rows (ClickHouse's cost per INSERT)
    assert c.sinks.clickhouse.queue_size == 200_000
    assert parse_config({"sinks": {"clickhouse": {"queueSize": 5000}}}).sinks.clickhouse.queue_size == 5000


def test_full_file(tmp_path):
    path = tmp_path / "aggregator.yaml"
    path.write_text(
        'externalFlowCollectorAddr: "10.0.0.5:4739"\n'
        "flowExportInterval: 1m30s\n"
        "aggregatorTransportProtocol: UDP\n"
        "listenPort: 14739\n"
        "correlationTimeout: 500ms\n"  # refused below: minimum 1s
    )
    with pytest.raises(ConfigError, match=r"correlationTimeout: '500ms' is below the 1s minimum"):
        load_config(str(path))
    path.write_text(
        'externalFlowCollectorAddr: "[fd00::5]:9995:udp"\n'
        "flowExportInterval: 1m30s\n"
        "aggregatorTransportProtocol: UDP\n"
        "listenPort: 14739\n"
        "correlationTimeout: 10s\n"
        "inactiveFlowTimeout: 2m\n"
        "maxFlows: 1000\n"
        'apiAddress: "127.0.0.1:0"\n'
        "sinks:\n  flowLog: {enabled: true, path: /tmp/x.jsonl, maxSizeMB: 0.5, maxBackups: 0, queueSize: 5}\n"
    )
    c = load_config(str(path))
    assert c.external_collector == Address("fd00::5", 9995, "udp")
    assert c.sinks.ipfix.enabled  # on by default once the collector address is set
    assert (c.export_interval, c.transport, c.listen_port) == (90.0, "udp", 14739)
    assert (c.correlation_timeout, c.inactive_timeout, c.max_flows) == (10.0, 120.0, 1000)
    assert c.api_address == ("127.0.0.1", 0)
    assert c.sinks.flow_log == type(c.sinks.flow_log)(True, "/tmp/x.jsonl", 0.5, 0, 5)


def test_external_collector_defaults_to_tcp_and_port_4739():
    c = parse_config({"externalFlowCollectorAddr": "collector.example"})
    assert c.external_collector == Address("collector.example", 4739, "tcp")


@pytest.mark.parametrize("raw, message", [
    ({"flowExportInterval": "500ms"}, r"flowExportInterval: '500ms' is below the 1s minimum"),
    ({"flowExportInterval": "60"}, r"flowExportInterval: '60' is not a valid duration"),
    ({"flowExportInterval": 60}, r"flowExportInterval: 60 has no unit"),
    ({"aggregatorTransportProtocol": "quic"}, r"aggregatorTransportProtocol: 'quic' is not one of tls, tcp, udp, grpc"),
    ({"externalFlowCollectorAddr": "10.0.0.5:99999"}, r"externalFlowCollectorAddr: port '99999'"),
    ({"externalFlowCollectorAddr": "10.0.0.5:4739:tls"}, r"externalFlowCollectorAddr: protocol tls .* use tcp or udp"),
    ({"externalFlowCollectorAddr": "fd00::5:4739"}, r"externalFlowCollectorAddr: .*IPv6 address must be in brackets"),
    ({"listenPort": 70000}, r"listenPort: 70000 is out of range; it must be from 0 to 65535"),
    ({"listenPort": "4739"}, r"listenPort: '4739' must be a whole number"),
    ({"maxFlows": 0}, r"maxFlows: 0 is out of range; it must be from 1 to 100000000"),
    ({"apiAddress": "10348"}, r"apiAddress: '10348' is not an address"),
    ({"apiAddress": "nowhere:10348"}, r"apiAddress: host 'nowhere'"),
    ({"flowExportIntreval": "5s"}, r'flowExportIntreval: unknown key; did you mean "flowExportInterval"\?'),
    ({"tls": {"caFlie": "x"}}, r'tls.caFlie: unknown key; did you mean "tls.caFile"\?'),
    ({"tls": "x"}, r"tls: 'x' must be a mapping"),
    ({"sinks": {"ipfix": {"enabled": True}}}, r"sinks.ipfix.enabled: true needs externalFlowCollectorAddr, which is ''"),
    ({"sinks": {"flowLog": {"enabled": "yes"}}}, r"sinks.flowLog.enabled: 'yes' must be true or false"),
    ({"sinks": {"flowLog": {"maxSizeMB": 0}}}, r"sinks.flowLog.maxSizeMB: 0 is out of range; it must be above 0"),
    ({"sinks": {"flowLog": {"queueSize": 0}}}, r"sinks.flowLog.queueSize: 0 is out of range"),
    ({"sinks": {"kafka": {}}}, r"sinks.kafka: unknown key"),
    ({"sinks": {"clickhouse": {"commitInterval": "soon"}}}, r"sinks.clickhouse.commitInterval: 'soon'"),
])
def test_bad_values_name_the_key_and_the_fix(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_empty_api_address_disables_the_api():
    assert parse_config({"apiAddress": ""}).api_address is None
    assert parse_config({"apiAddress": "[::1]:9000"}).api_address == ("::1", 9000)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"--config: cannot read"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        load_config(str(bad))
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"must be a YAML mapping"):
        load_config(str(bad))


def test_every_aggregator_config_the_operator_renders_is_accepted():
    """The contract with the operator: what it renders from the sample CRs, we parse."""
    import glob
    import subprocess
    import sys

    import yaml

    pytest.importorskip("jinja2")
    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    samples = sorted(glob.glob(str(repo / "config" / "samples" / "*.yaml")))
    assert samples, "no sample custom resources"
    args = [a for s in samples for a in ("-f", s)]
    proc = subprocess.run([sys.executable, "-m", "flowscope", "render", *args, "--no-secrets"],
                          capture_output=True, text=True, timeout=60, cwd=repo)
    assert proc.returncode == 0, proc.stderr
    seen = 0
    for doc in yaml.safe_load_all(proc.stdout):
        if doc and doc.get("kind") == "ConfigMap" and "aggregator.yaml" in doc.get("data", {}):
            parse_config(yaml.safe_load(doc["data"]["aggregator.yaml"]))
            seen += 1
    assert seen >= 2
