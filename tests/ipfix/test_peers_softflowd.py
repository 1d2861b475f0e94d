"""Our collector decodes what a foreign exporter sends: softflowd (Debian), watching a
veth inside a network namespace this test creates, exports IPFIX (``-v 10``) over UDP
and over TCP (``-P``) to ``flowscope collector`` running in the same namespace on its
loopback. We send
known UDP datagrams over IPv4 and IPv6 between two namespaces and compare the flow
records the collector prints (ports, addresses, protocol, packets, octets) with what was
sent. Nothing leaves the two namespaces; both are removed afterwards, also on failure.

softflowd reads packets through libpcap's TPACKET_V3 ring, which hands packets over in
blocks that only retire when full: after the measured datagrams we send filler traffic
on another port until softflowd has processed more packets than we measure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_root, require_tool

pytestmark = [pytest.mark.peer, pytest.mark.netns]

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))


def sh(*args: str, ns: str | None = None, check: bool = True) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout


@contextlib.contextmanager
def two_namespaces() -> Iterator[tuple[str, str, str, str]]:
    """(sender ns, observer ns, sender veth, observer veth), removed on exit."""
    suffix = secrets.token_hex(3)
    a, b = f"fs-sfa-{suffix}", f"fs-sfb-{suffix}"
    va, vb = f"sfa{suffix}", f"sfb{suffix}"
    made: list[str] = []
    try:
        for ns in (a, b):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
            # no duplicate address detection, for link-local addresses too: neighbour
            # discovery must answer from the first IPv6 packet
            sh("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0", ns=ns)
        sh("ip", "link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
        for ns, dev, n in ((a, va, 1), (b, vb, 2)):
            sh("ip", "addr", "add", f"10.99.0.{n}/24", "dev", dev, ns=ns)
            sh("ip", "addr", "add", f"fd00:99::{n}/64", "dev", dev, "nodad", ns=ns)
            sh("ip", "link", "set", dev, "up", ns=ns)
        yield a, b, va, vb
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        left = sh("ip", "netns", "list") + sh("ip", "-o", "link")
        assert suffix not in left, f"namespaces or links of this test left behind: {left}"


class Lines:
    """Reads a subprocess's stdout lines in a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)


def wait(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


SENDER = r"""
import socket, sys, json
plan = json.loads(sys.argv[1])
for family, src, dst, sport, dport, sizes in plan:
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((src, sport))
    for n in sizes:
        s.sendto(b"f" * n, (dst, dport))
    s.close()
"""


def processed(ctl: Path, ns: str) -> int:
    out = sh("softflowctl", "-c", str(ctl), "statistics", ns=ns, check=False)
    m = re.search(r"Packets processed: (\d+)", out)
    return int(m.group(1)) if m else -1


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_collector_decodes_softflowd_ipfix_flows_from_a_namespace(transport: str, tmp_path: Path) -> None:
    require_root()
    require_tool("softflowd", "softflowctl", "ip", "ping")
    v4_sizes = [100, 200, 300, 400, 1000]
    v6_sizes = [64, 128, 256]
    measured = [
        (4, "10.99.0.1", "10.99.0.2", 40001, 50001, v4_sizes),
        (6, "fd00:99::1", "fd00:99::2", 40002, 50002, v6_sizes),
    ]
    with two_namespaces() as (a, b, _va, vb):
        collector = subprocess.Popen(
            ["ip", "netns", "exec", b, FLOWSCOPE, "collector", "--listen", f"127.0.0.1:4739:{transport}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        out = Lines(collector)
        assert collector.stderr is not None and "listening on" in collector.stderr.readline()
        ctl, pid = tmp_path / "softflowd.ctl", tmp_path / "softflowd.pid"
        softflowd = subprocess.Popen(
            ["ip", "netns", "exec", b, "softflowd", "-d", "-6", "-v", "10", "-P", transport, "-i", vb,
             "-n", "127.0.0.1:4739", "-c", str(ctl), "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            wait(lambda: processed(ctl, b) >= 0, 10, "softflowd's control socket")
            for peer in ("10.99.0.2", "fd00:99::2"):  # resolve neighbours first: no datagram waits on ND
                sh("ping", "-c", "1", "-W", "5", peer, ns=a)
            sh(sys.executable, "-c", SENDER, json.dumps(measured), ns=a)
            target = sum(len(p[5]) for p in measured) + 500
            for _ in range(40):  # filler until the ring has handed our packets over
                if processed(ctl, b) >= target:
                    break
                sh(sys.executable, "-c", SENDER, json.dumps([(4, "10.99.0.1", "10.99.0.2", 40009, 50009, [20] * 1000)]), ns=a)
            assert processed(ctl, b) >= target
            sh("softflowctl", "-c", str(ctl), "expire-all", ns=b)

            def records() -> list[dict[str, Any]]:
                return [json.loads(x) for x in list(out.lines) if x.startswith("{")]

            def measured_flows() -> dict[int, dict[str, Any]]:
                return {r["sourceTransportPort"]: r for r in records() if r.get("sourceTransportPort") in (40001, 40002)}

            wait(lambda: len(measured_flows()) == 2, 15, "both measured flows from softflowd")
        finally:
            softflowd.send_signal(signal.SIGTERM)
            collector.send_signal(signal.SIGINT)
            for proc in (softflowd, collector):
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        assert collector.returncode == 0
        assert collector.stderr is not None and "0 malformed" in collector.stderr.read()

    flows = measured_flows()
    v4, v6 = flows[40001], flows[40002]
    assert (v4["sourceIPv4Address"], v4["destinationIPv4Address"]) == ("10.99.0.1", "10.99.0.2")
    assert (v4["destinationTransportPort"], v4["protocolIdentifier"]) == (50001, 17)
    assert v4["packetDeltaCount"] == len(v4_sizes)
    assert v4["octetDeltaCount"] == sum(n + 20 + 8 for n in v4_sizes)  # IP length: + IPv4 and UDP headers
    assert (v6["sourceIPv6Address"], v6["destinationIPv6Address"]) == ("fd00:99::1", "fd00:99::2")
    assert (v6["destinationTransportPort"], v6["protocolIdentifier"]) == (50002, 17)
    assert v6["packetDeltaCount"] == len(v6_sizes)
    assert v6["octetDeltaCount"] == sum(n + 40 + 8 for n in v6_sizes)
    assert v4["_exporter"].startswith("127.0.0.1:") and isinstance(v4["_templateId"], int)
    assert os.path.exists(FLOWSCOPE)
