"""Network namespaces for the agent's real-conntrack tests: a "node" namespace that routes
between "pod" namespaces over veth links, with nftables switching conntrack on.

Every name carries a random suffix and everything is removed on exit, also on failure.
Traffic only ever flows between these namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field


def sh(*args: str, ns: str | None = None, check: bool = True, input: str | None = None) -> str:
    cmd = list(args)
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


NFT_CONNTRACK = """
table inet flowscope_test {
  chain c_out { type filter hook output priority 0; ct state new,established,related counter; }
  chain c_fwd { type filter hook forward priority 0; ct state new,established,related counter; }
  chain c_in { type filter hook input priority 0; ct state new,established,related counter; }
}
"""


@dataclass
class Topology:
    """A node namespace and pod namespaces; ``pods[name] = (ns, ipv4, ipv6)``."""

    suffix: str
    node: str
    pods: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    def add_ns(self, name: str) -> str:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "link", "set", "lo", "up", ns=name)
        # no duplicate address detection: link-local addresses usable at once, so that
        # neighbour discovery works from the first IPv6 packet
        sh("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0", ns=name)
        return name

    def add_pod(
        self, name: str, index: int, node: str | None = None, v4: str | None = None, v6: str | None = None
    ) -> tuple[str, str, str]:
        node = node or self.node
        ns = self.add_ns(f"fs-{name}-{self.suffix}")
        host_if, pod_if = f"h{index}{self.suffix}"[:15], f"p{index}{self.suffix}"[:15]
        sh("ip", "link", "add", host_if, "netns", node, "type", "veth", "peer", "name", pod_if, "netns", ns)
        v4, v6 = v4 or f"10.244.0.{10 + index}", v6 or f"fd00:244::{10 + index:x}"
        gw4, gw6 = f"169.254.{index}.1", f"fd00:ffff:{index:x}::1"
        sh("ip", "addr", "add", f"{v4}/32", "dev", pod_if, ns=ns)
        sh("ip", "-6", "addr", "add", f"{v6}/128", "dev", pod_if, "nodad", ns=ns)
        sh("ip", "link", "set", pod_if, "up", ns=ns)
        sh("ip", "route", "add", f"{gw4}/32", "dev", pod_if, ns=ns)
        sh("ip", "route", "add", "default", "via", gw4, "dev", pod_if, ns=ns)
        sh("ip", "-6", "route", "add", f"{gw6}/128", "dev", pod_if, ns=ns)
        sh("ip", "-6", "route", "add", "default", "via", gw6, "dev", pod_if, ns=ns)
        sh("ip", "addr", "add", f"{gw4}/32", "dev", host_if, ns=node)
        sh("ip", "-6", "addr", "add", f"{gw6}/128", "dev", host_if, "nodad", ns=node)
        sh("ip", "link", "set", host_if, "up", ns=node)
        sh("ip", "route", "add", f"{v4}/32", "dev", host_if, ns=node)
        sh("ip", "-6", "route", "add", f"{v6}/128", "dev", host_if, ns=node)
        self.pods[name] = (ns, v4, v6)
        return self.pods[name]


def conntrack_on(ns: str) -> None:
    sh("nft", "-f", "-", ns=ns, input=NFT_CONNTRACK)
    sh("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1", ns=ns)
    sh("sysctl", "-qw", "net.netfilter.nf_conntrack_timestamp=1", ns=ns)


@contextlib.contextmanager
def topology(pods: tuple[str, ...] = ()) -> Iterator[Topology]:
    """A node namespace (conntrack on, forwarding on) and one namespace per pod name."""
    suffix = secrets.token_hex(3)
    topo = Topology(suffix=suffix, node=f"fs-node-{suffix}")
    try:
        topo.add_ns(topo.node)
        conntrack_on(topo.node)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=topo.node)
        sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.forwarding=1", ns=topo.node)
        for i, name in enumerate(pods, start=1):
            topo.add_pod(name, i)
        yield topo
    finally:
        for ns in reversed(topo.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body in another network namespace (this thread only), then come back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(own)
        os.close(own)
        os.close(target)


@contextlib.contextmanager
def two_nodes() -> Iterator[Topology]:
    """Two node namespaces linked by a veth (192.168.77.1 and .2), Pod "a" (10.244.0.11)
    on the first and Pod "b" (10.244.1.12) on the second; ``topo.node`` is the first and
    ``topo.node2`` the second."""
    suffix = secrets.token_hex(3)
    topo = Topology(suffix=suffix, node=f"fs-nodea-{suffix}")
    try:
        node2 = f"fs-nodeb-{suffix}"
        for n in (topo.node, node2):
            topo.add_ns(n)
            conntrack_on(n)
            sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=n)
        ia, ib = f"na{suffix}", f"nb{suffix}"
        sh("ip", "link", "add", ia, "netns", topo.node, "type", "veth", "peer", "name", ib, "netns", node2)
        sh("ip", "addr", "add", "192.168.77.1/24", "dev", ia, ns=topo.node)
        sh("ip", "addr", "add", "192.168.77.2/24", "dev", ib, ns=node2)
        sh("ip", "link", "set", ia, "up", ns=topo.node)
        sh("ip", "link", "set", ib, "up", ns=node2)
        sh("ip", "route", "add", "10.244.1.0/24", "via", "192.168.77.2", ns=topo.node)
        sh("ip", "route", "add", "10.244.0.0/24", "via", "192.168.77.1", ns=node2)
        topo.add_pod("a", 1, node=topo.node, v4="10.244.0.11")
        topo.add_pod("b", 2, node=node2, v4="10.244.1.12")
        topo.node2 = node2  # type: ignore[attr-defined]
        yield topo
    finally:
        for ns in reversed(topo.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
