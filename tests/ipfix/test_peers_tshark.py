"""Conformance with Wireshark's IPFIX dissector: what our exporting process sends over
loopback (UDP and TCP, IPv4 and IPv6 records with every element of the design's agent
tables, and aggregated records with every element the aggregator adds) is captured by
dumpcap and decoded by tshark, field for field.

tshark names the IANA elements itself (srcaddr, permanent_octets, ...), marks the
RFC 5103 reverse ones "(Reverse Type N ...)" and shows Antrea's (PEN 56506, "Project
Antrea") as raw bytes after delimiting them, the variable-length strings included. We
read its PDML, map each field back to (PEN, element id), interpret the raw bytes by the
element's type, and compare every value with what was submitted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
import subprocess
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool
from ipfix_samples import agent_record, aggregator_record

from flowscope.ipfix import Address, Template, default_registry
from flowscope.ipfix.antrea import AGENT_IPV4_FIELDS, AGENT_IPV6_FIELDS, AGGREGATOR_IPV4_FIELDS
from flowscope.ipfix.collecting import CollectingProcess
from flowscope.ipfix.exporting import ExportingProcess

pytestmark = pytest.mark.peer

# tshark field names of the IANA elements in the agent record -> IANA element id
TSHARK_IANA = {
    "cflow.abstimestart": 150,
    "cflow.abstimeend": 151,
    "cflow.flow_end_reason": 136,
    "cflow.srcaddr": 8,
    "cflow.dstaddr": 12,
    "cflow.srcaddrv6": 27,
    "cflow.dstaddrv6": 28,
    "cflow.srcport": 7,
    "cflow.dstport": 11,
    "cflow.protocol": 4,
    "cflow.permanent_packets": 86,
    "cflow.permanent_octets": 85,
    "cflow.packets": 2,
    "cflow.octets": 1,
    "cflow.original_exporter_ipv4_address": 403,
    "cflow.original_observation_domain_id": 405,
}
_REVERSE = re.compile(r"\(Reverse Type (\d+)")
_ENTERPRISE = re.compile(r"\(Project Antrea\) Type (\d+)")


def interpret(data_type: str, raw: bytes) -> Any:
    if data_type.startswith(("unsigned", "dateTimeSeconds")):
        return int.from_bytes(raw, "big")
    if data_type == "ipv4Address":
        return socket.inet_ntop(socket.AF_INET, raw)
    if data_type == "ipv6Address":
        return ipaddress.IPv6Address(raw).compressed
    if data_type == "string":
        return raw.decode("utf-8")
    return raw


def tshark_records(pcap: Path, port: int, protocol: str) -> list[dict[str, Any]]:
    """Data records as tshark decodes them, in capture order, keyed by our IE names."""
    pdml = subprocess.run(
        # the aggregated record has more than tshark's default limit of 60 fields a template
        ["tshark", "-r", str(pcap), "-d", f"{protocol}.port=={port},cflow", "-o", "cflow.max_template_fields:200",
         "-T", "pdml"],
        check=True, capture_output=True, timeout=60,
    ).stdout
    reg = default_registry()
    records = []
    for flow in ET.fromstring(pdml).iter("field"):
        if not (flow.get("show") or "").startswith("Flow "):
            continue
        record: dict[str, Any] = {}
        for f in flow.iter("field"):
            name, showname = f.get("name") or "", f.get("showname") or ""
            key: tuple[int, int] | None = None
            if name == "cflow.enterprise_private_entry":
                m = _ENTERPRISE.search(showname)
                assert m, showname
                key = (56506, int(m.group(1)))
            elif name in TSHARK_IANA:
                m = _REVERSE.search(showname)
                key = (29305, int(m.group(1))) if m else (0, TSHARK_IANA[name])
            if key is None:
                continue
            ie = reg.by_id(*key)
            record[ie.name] = interpret(ie.data_type.name, bytes.fromhex(f.get("value") or ""))
        records.append(record)
    return records


class Capture:
    """dumpcap on lo, streaming pcapng to us. dumpcap says "Capturing on" a moment before
    it really captures, so ``start`` sends probe datagrams to a port of our own until one
    shows up in the stream (``sync``); syncing again after the traffic makes sure the last
    block of packets reached us before dumpcap is stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.probes = 0
        self.data = bytearray()
        self.probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.probe.bind(("127.0.0.1", 0))  # probes land here, not on anything else
        probe_port = self.probe.getsockname()[1]
        self.proc = subprocess.Popen(
            ["dumpcap", "-q", "-i", "lo", "-f", f"port {port} or udp port {probe_port}", "-w", "-"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(1 << 16):
            self.data += chunk

    async def sync(self) -> None:
        """Return once a fresh probe shows up in the stream: everything sent before it has
        been captured (lo delivers in order; dumpcap hands packets over in blocks)."""
        self.probes += 1
        token = f"flowscope-probe-{os.getpid()}-{self.probes}.".encode()
        for _ in range(1000):  # at most 10 s
            self.probe.sendto(token, self.probe.getsockname())
            await asyncio.sleep(0.01)
            if token in self.data:
                return
            assert self.proc.poll() is None, "dumpcap exited"
        raise AssertionError("dumpcap did not capture a probe on lo within 10 s")

    def stop(self, pcap: Path) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)
        self.probe.close()
        pcap.write_bytes(bytes(self.data))


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
async def test_tshark_decodes_every_agent_field_we_export(protocol: str, tmp_path: Path) -> None:
    require_tool("dumpcap", "tshark")
    got: list[int] = []
    async with CollectingProcess(
        Address("127.0.0.1", 0, protocol), tls=None, on_message=lambda p, m: got.append(m.record_count)  # type: ignore[arg-type]
    ) as collector:
        pcap = tmp_path / "ipfix.pcapng"
        capture = Capture(collector.port)
        try:
            await capture.sync()
            t4, t6 = Template.build(256, AGENT_IPV4_FIELDS), Template.build(257, AGENT_IPV6_FIELDS)
            v4 = [agent_record(i, 4) for i in range(40)]
            v6 = [agent_record(i, 6) for i in range(40, 80)]
            for r in (v4 + v6)[::4]:  # empty strings amid the others, as for external peers
                r["destinationPodName"] = r["destinationPodNamespace"] = ""
            ta = Template.build(258, AGGREGATOR_IPV4_FIELDS)
            agg = [aggregator_record(i) for i in range(80, 100)]
            e = ExportingProcess(Address("127.0.0.1", collector.port, protocol), tls=None, templates=[t4, t6, ta])  # type: ignore[arg-type]
            await e.start()
            e.submit(256, v4)
            e.submit(257, v6)
            e.submit(258, agg)
            assert await e.flush(timeout=5)
            await e.close()
            loop = asyncio.get_running_loop()
            end = loop.time() + 5
            while sum(got) < 100 and loop.time() < end:  # our collector saw it all: so did lo
                await asyncio.sleep(0.01)
            assert sum(got) == 100
            await capture.sync()
        finally:
            capture.stop(pcap)
    decoded = tshark_records(pcap, collector.port, protocol)
    assert len(decoded) == 100
    # tshark keeps capture order: v4 records, v6 records, aggregated records. It shows no
    # entry for a zero-length string, but the fields after one must still be delimited right.
    for sent, theirs in zip(v4 + v6 + agg, decoded):
        assert theirs == {k: v for k, v in sent.items() if v != ""}
