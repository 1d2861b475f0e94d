"""Config edges of the aggregator (issue 10): non-finite and out-of-range values name the key,
the API is refused open on a non-loopback address, ``--check`` reads every file a start reads,
and a start that cannot open one port opens nothing (the error names the key)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest

from flowscope.aggregator.config import ConfigError, parse_config
from flowscope.aggregator.service import FlowAggregator, check_files


@pytest.mark.parametrize("raw, message", [
    ({"sinks": {"flowLog": {"maxSizeMB": float("nan")}}}, r"sinks.flowLog.maxSizeMB: nan must be a finite number"),
    ({"sinks": {"flowLog": {"maxSizeMB": float("inf")}}}, r"sinks.flowLog.maxSizeMB: inf must be a finite number"),
    ({"sinks": {"flowLog": {"maxBackups": 10_000_000}}}, r"sinks.flowLog.maxBackups: 10000000 is out of range"),
    ({"sinks": {"ipfix": {"queueSize": 10**9}}}, r"sinks.ipfix.queueSize: 1000000000 is out of range"),
    ({"flowExportInterval": "10000h"}, r"flowExportInterval: '10000h' is above the 168h0m0s maximum"),
    ({"maxFlowsMB": 0}, r"maxFlowsMB: 0 is out of range"),
    ({"collectingProcess": {"maxSessionsPerSource": 0}}, r"collectingProcess.maxSessionsPerSource: 0 is out of range"),
    ({"collectingProcess": {"handshakeTimeout": "1ms"}}, r"collectingProcess.handshakeTimeout: '1ms' is below"),
    ({"collectingProcess": {"maxTemplateFields": 100000}}, r"collectingProcess.maxTemplateFields: 100000"),
    ({"collectingProcess": {"idle": "5m"}}, r"collectingProcess.idle: unknown key"),
    ({"api": {"insecure": "yes"}}, r"api.insecure: 'yes' must be true or false"),
    ({"api": {"tls": {"certFile": "/x"}}}, r"api.tls.keyFile: required"),
    ({"apiAddress": "0.0.0.0:10348"}, r"apiAddress: 0.0.0.0:10348 is reachable from other hosts"),
    ({"apiAddress": "[::]:10348", "api": {"tls": {"certFile": "/c", "keyFile": "/k"}}},
     r"apiAddress: \[::\]:10348 is reachable"),  # HTTPS without client certificates authenticates no one
    ({"apiAddress": "127.0.0.1:9000", "metricsAddress": "0.0.0.0:9000"}, r"metricsAddress: port 9000"),
])
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_the_api_may_be_open_on_loopback_or_when_said_so_or_with_credentials():
    assert parse_config({}).api_address == ("127.0.0.1", 10348)
    assert parse_config({"apiAddress": "0.0.0.0:10348", "api": {"insecure": True}}).api.insecure
    c = parse_config({"apiAddress": "0.0.0.0:10348", "api": {"tokenFile": "/t"}})
    assert c.api.token_file == "/t"
    c = parse_config({"apiAddress": "0.0.0.0:10348", "api": {"tls": {"certFile": "/c", "keyFile": "/k", "caFile": "/a"}}})
    assert c.api.tls is not None and c.api.tls.ca_file == "/a"
    assert parse_config({"collectingProcess": {"streamIdleTimeout": "0"}}).collecting.stream_idle_timeout is None


def test_check_files_names_the_unreadable_token_and_the_unwritable_flow_log(tmp_path):
    c = parse_config({"aggregatorTransportProtocol": "tcp", "api": {"tokenFile": str(tmp_path / "none")}})
    with pytest.raises(ConfigError, match=r"api.tokenFile: cannot read"):
        check_files(c)
    (tmp_path / "short").write_text("abc\n")
    c = parse_config({"aggregatorTransportProtocol": "tcp", "api": {"tokenFile": str(tmp_path / "short")}})
    with pytest.raises(ConfigError, match=r"api.tokenFile: the token .* has 3 characters"):
        check_files(c)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    c = parse_config({"aggregatorTransportProtocol": "tcp", "sinks": {"flowLog": {"enabled": True,
                                                                                   "path": str(ro / "x" / "f.jsonl")}}})
    try:
        if os.geteuid() == 0:  # root writes anywhere: use a path under a file instead
            c = parse_config({"aggregatorTransportProtocol": "tcp", "sinks": {"flowLog": {
                "enabled": True, "path": str(tmp_path / "short" / "f.jsonl")}}})
        with pytest.raises(ConfigError, match=r"sinks.flowLog.path: cannot write .*(not writable|not a directory)"):
            check_files(c)
    finally:
        ro.chmod(0o700)


def test_cli_check_fails_on_files_a_start_would_fail_on(tmp_path):
    cfg = tmp_path / "a.yaml"
    cfg.write_text(f"aggregatorTransportProtocol: tcp\napi: {{tokenFile: {tmp_path}/missing}}\n")
    proc = subprocess.run([sys.executable, "-m", "flowscope", "aggregator", "--config", str(cfg), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "api.tokenFile: cannot read" in proc.stderr


async def test_a_taken_api_port_names_apiAddress_and_opens_nothing_else():
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    ipfix_port = probe.getsockname()[1]
    probe.close()
    try:
        c = parse_config({"aggregatorTransportProtocol": "tcp", "listenAddress": "127.0.0.1", "listenPort": ipfix_port,
                          "apiAddress": f"127.0.0.1:{taken}", "metricsAddress": ""})
        agg = FlowAggregator(c, sinks=[])
        with pytest.raises(OSError, match=rf"apiAddress: cannot listen on 127.0.0.1:{taken}"):
            await agg.start()
        assert agg.collecting is None
        with pytest.raises(OSError):  # the IPFIX port was never opened
            await asyncio.open_connection("127.0.0.1", ipfix_port)
    finally:
        blocker.close()
