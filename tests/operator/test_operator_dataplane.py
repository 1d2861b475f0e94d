"""What the operator renders runs the real aggregator, and the agents' certificate gets in.

The FlowAggregator and FlowExporterConfig samples are rendered; the aggregator's config
file and the TLS Secrets are written to a temporary directory as the Pod would see them
(only the paths, the loopback ports and the flow log path are moved out of /etc and
/var), and the real ``flowscope aggregator`` daemon starts from them. Its own
``--check`` must find the server certificate valid for ``flowAggregatorAddress``. An
IPFIX exporting process holding the agents' Secret (and checking the name the agent
config says) sends Antrea agent records over mutual TLS; the aggregator's API must count
exactly the records sent, from one exporter.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import signal
import socket
import sys
import urllib.request
from pathlib import Path

import yaml

from flowscope.ipfix import Address, Template
from flowscope.ipfix.antrea import AGENT_IPV4_FIELDS
from flowscope.ipfix.exporting import ExportingProcess
from flowscope.ipfix.transport import TLSConfig
from flowscope.operator.render import render_documents

ROOT = Path(__file__).resolve().parents[2]
NOW = dt.datetime.now(dt.timezone.utc)


def free_port() -> int:
    """A TCP port free on every address: the aggregator listens on [::] (dual stack)."""
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::", 0))
        return s.getsockname()[1]


async def _api_up(daemon, api: int, deadline: float) -> bool:
    """Wait for the daemon's API on loopback: True when it answers, False when the daemon exited."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            await asyncio.to_thread(get_json, f"http://127.0.0.1:{api}/recordmetrics")
            return True
        except OSError:
            if daemon.returncode is not None:
                return False
            assert loop.time() < deadline, "the aggregator did not start within 20s"
            await asyncio.sleep(0.1)


def find(objects, kind, name):
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def write_secret(secret: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for key in ("ca.crt", "tls.crt", "tls.key"):
        (directory / key).write_bytes(base64.b64decode(secret["data"][key]))


def agent_record(i: int) -> dict:
    """An Antrea agent record, every field of AGENT_IPV4_FIELDS, values per ``i``."""
    r = {
        "flowStartSeconds": 1795716000 + i, "flowEndSeconds": 1795716060 + i, "flowEndReason": 1,
        "sourceIPv4Address": f"10.10.0.{i + 1}", "destinationIPv4Address": f"10.20.0.{i + 1}",
        "sourceTransportPort": 40000 + i, "destinationTransportPort": 8080, "protocolIdentifier": 6,
        "packetTotalCount": 100 + i, "octetTotalCount": 10000 + i, "packetDeltaCount": 10, "octetDeltaCount": 1000,
        "reversePacketTotalCount": 90 + i, "reverseOctetTotalCount": 9000 + i, "reversePacketDeltaCount": 9,
        "reverseOctetDeltaCount": 900, "destinationClusterIPv4": "0.0.0.0", "destinationServicePort": 0,
        "ingressNetworkPolicyType": 0, "ingressNetworkPolicyRuleAction": 0, "egressNetworkPolicyType": 0,
        "egressNetworkPolicyRuleAction": 0, "flowType": 1,
        "sourcePodNamespace": "shop", "sourcePodName": f"web-{i}", "destinationPodNamespace": "shop",
        "destinationPodName": f"db-{i}", "sourceNodeName": "node-1", "destinationNodeName": "node-1",
        "destinationServicePortName": "", "ingressNetworkPolicyName": "", "ingressNetworkPolicyNamespace": "",
        "ingressNetworkPolicyRuleName": "", "egressNetworkPolicyName": "", "egressNetworkPolicyNamespace": "",
        "egressNetworkPolicyRuleName": "", "tcpState": "ESTABLISHED",
        "destinationServiceIPv4": "0.0.0.0", "proxySnatIPv4": "0.0.0.0", "proxySnatPort": 0,
        "egressName": "", "egressIP": "", "egressNodeName": "",
    }
    assert set(r) == set(AGENT_IPV4_FIELDS)
    return r


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.loads(resp.read())


async def test_rendered_config_and_certificates_run_the_aggregator_and_admit_agents(tmp_path):
    docs = [d for name in ("01-aggregator-tls.yaml", "02-agents.yaml")
            for d in yaml.safe_load_all((ROOT / "config/samples" / name).read_text()) if d]
    objects = render_documents(docs, image="flowscope:test", now=NOW)
    config = yaml.safe_load(find(objects, "ConfigMap", "flow-aggregator-config")["data"]["aggregator.yaml"])
    agent_config = yaml.safe_load(find(objects, "ConfigMap", "flowscope-agent-config")["data"]["agent.yaml"])
    write_secret(find(objects, "Secret", "flow-aggregator-server-tls"), tmp_path / "agg")
    write_secret(find(objects, "Secret", "flowscope-agent-client-tls"), tmp_path / "agent")

    # the Pod's paths and ports, moved to this test's directory and loopback
    assert config["tls"] == {"caFile": "/etc/flowscope/tls/ca.crt", "certFile": "/etc/flowscope/tls/tls.crt",
                             "keyFile": "/etc/flowscope/tls/tls.key"}
    config["tls"] = {k: str(tmp_path / "agg" / Path(v).name) for k, v in config["tls"].items()}
    port, api = free_port(), free_port()
    config["listenPort"] = port
    config["apiAddress"] = f"127.0.0.1:{api}"
    # the API's mutual TLS and the metrics listener (api, metricsAddress) are keys of the API
    # contract whose aggregator code lands from another branch; test_operator_render checks
    # them as rendered. On loopback the API needs neither.
    for key in ("api", "metricsAddress"):
        config.pop(key, None)
    config["sinks"]["flowLog"]["path"] = str(tmp_path / "flows.jsonl")
    path = tmp_path / "aggregator.yaml"
    path.write_text(yaml.safe_dump(config))

    check = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowscope", "aggregator", "--config", str(path), "--check",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await check.communicate()
    assert check.returncode == 0, err.decode()
    assert "warning" not in err.decode()  # the server certificate carries flowAggregatorAddress
    assert "OK; collecting tls" in out.decode()

    loop = asyncio.get_running_loop()
    daemon = None
    try:
        for attempt in range(3):
            daemon = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "flowscope", "aggregator", "--config", str(path),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            if await _api_up(daemon, api, loop.time() + 20):
                break
            # a free port may be taken before the daemon binds it (the machine runs other
            # tests): new ports, another start; any other exit is a failure
            said = (await daemon.stdout.read()).decode()
            assert "Address already in use" in said and attempt < 2, \
                f"the aggregator exited ({daemon.returncode}): {said[-2000:]}"
            port, api = free_port(), free_port()
            config["listenPort"], config["apiAddress"] = port, f"127.0.0.1:{api}"
            path.write_text(yaml.safe_dump(config))
        deadline = loop.time() + 20
        tls = TLSConfig(str(tmp_path / "agent/tls.crt"), str(tmp_path / "agent/tls.key"),
                        str(tmp_path / "agent/ca.crt"), server_name=agent_config["tls"]["serverName"])
        template = Template.build(256, AGENT_IPV4_FIELDS)
        exporter = ExportingProcess(Address("127.0.0.1", port, "tls"), tls=tls, templates=[template])
        await exporter.start()
        sent = [agent_record(i) for i in range(20)]
        assert exporter.submit(256, sent)
        assert await exporter.flush(10)
        metrics = {}
        while loop.time() < deadline + 10:
            metrics = await asyncio.to_thread(get_json, f"http://127.0.0.1:{api}/recordmetrics")
            if metrics["numRecordsReceived"] >= len(sent):
                break
            await asyncio.sleep(0.1)
        await exporter.close()
        assert metrics["numRecordsReceived"] == len(sent)
        assert sum(metrics["receivedByExporter"].values()) == len(sent)
        assert len(metrics["receivedByExporter"]) == 1
    finally:
        if daemon is not None and daemon.returncode is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(daemon.wait(), 20)
            except asyncio.TimeoutError:
                daemon.kill()
                await daemon.wait()
    log = (await daemon.stdout.read()).decode()
    assert daemon.returncode == 0, log[-2000:]
