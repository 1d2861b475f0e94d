"""A throwaway, cluster-shaped network built of Linux network namespaces.

The embedded demo and the end-to-end tests need what a Kubernetes cluster's data plane
looks like to the Flow Exporter, without a cluster: Nodes whose conntrack tables see
real connections, Pods behind them, a Service ClusterIP translated by DNAT as kube-proxy
does, a host outside the cluster, and a control-plane host where the Flow Aggregator and
the collector run. This module builds exactly that, and removes it again.

    fabric   a namespace holding one bridge: the "underlay" every host plugs into
    node-*   a Node: routes its Pods' /24, conntrack on (nftables ct rules, accounting and
             timestamps), DNAT for Service ClusterIPs; the agent runs inside it
    pod-*    a Pod: one veth to its Node, default route through it
    ctl      the control plane host (aggregator, collector)
    ext      a host outside the cluster

Everything is named ``fsl-<role>-<suffix>`` with a random suffix, addresses are used only
inside these namespaces, and :meth:`Lab.close` (also on errors, as a context manager)
deletes every namespace it made, which removes their links, routes and conntrack tables.
Root is required.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Lab", "LabError", "Host", "Pod", "Node", "UNDERLAY_PREFIX"]

UNDERLAY_PREFIX = "172.31.250"  # the fabric's /24, inside the lab's own namespaces only
NFT_CONNTRACK = """
table inet flowscope_lab {
  chain output { type filter hook output priority 0; ct state new,established,related counter; }
  chain forward { type filter hook forward priority 0; ct state new,established,related counter; }
  chain input { type filter hook input priority 0; ct state new,established,related counter; }
}
"""


class LabError(RuntimeError):
    """A command building the lab failed; the message carries the command and its stderr."""


def run(args: Sequence[str], *, ns: str | None = None, input: str | None = None, check: bool = True) -> str:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Host:
    """A namespace plugged into the fabric."""

    name: str  # the role, e.g. "node-a"
    netns: str
    underlay_ip: str

    def exec_args(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]


@dataclass
class Pod:
    name: str
    namespace: str  # the Kubernetes namespace
    node: str
    netns: str
    ip: str
    labels: dict[str, str] = field(default_factory=dict)

    def exec_args(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]


@dataclass
class Node(Host):
    index: int = 0
    pod_cidr: str = ""
    pods: list[Pod] = field(default_factory=list)


class Lab:
    """Build with :meth:`add_node`, :meth:`add_host`, :meth:`add_pod`, :meth:`add_service`."""

    def __init__(self, suffix: str | None = None) -> None:
        self.suffix = suffix or secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.nodes: dict[str, Node] = {}
        self.hosts: dict[str, Host] = {}
        self._next_underlay = 10
        self.fabric = self._netns("fabric")
        run(["ip", "link", "add", "br0", "type", "bridge"], ns=self.fabric)
        run(["ip", "link", "set", "br0", "up"], ns=self.fabric)

    # -- lifecycle

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            run(["ip", "netns", "delete", ns], check=False)
        self.namespaces.clear()

    # -- building

    def _netns(self, role: str) -> str:
        name = f"fsl-{role}-{self.suffix}"
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run(["ip", "link", "set", "lo", "up"], ns=name)
        return name

    def _plug(self, netns: str, role: str) -> str:
        """A veth from the fabric bridge into ``netns``, with the next underlay address."""
        ip = f"{UNDERLAY_PREFIX}.{self._next_underlay}"
        self._next_underlay += 1
        outer = f"u{self._next_underlay}{self.suffix}"[:15]
        run(["ip", "link", "add", outer, "netns", self.fabric, "type", "veth", "peer", "name", "eth0", "netns", netns])
        run(["ip", "link", "set", outer, "master", "br0", "up"], ns=self.fabric)
        run(["ip", "addr", "add", f"{ip}/24", "dev", "eth0"], ns=netns)
        run(["ip", "link", "set", "eth0", "up"], ns=netns)
        return ip

    def add_host(self, role: str) -> Host:
        netns = self._netns(role)
        host = Host(role, netns, self._plug(netns, role))
        self.hosts[role] = host
        for node in self.nodes.values():  # hosts reach every Pod through its Node
            run(["ip", "route", "add", node.pod_cidr, "via", node.underlay_ip], ns=netns)
        return host

    def add_node(self, role: str) -> Node:
        index = len(self.nodes) + 1
        netns = self._netns(role)
        node = Node(role, netns, self._plug(netns, role), index=index, pod_cidr=f"10.244.{index}.0/24")
        run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], ns=netns)
        run(["nft", "-f", "-"], ns=netns, input=NFT_CONNTRACK)
        run(["sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1"], ns=netns)
        run(["sysctl", "-qw", "net.netfilter.nf_conntrack_timestamp=1"], ns=netns)
        for other in self.nodes.values():
            run(["ip", "route", "add", other.pod_cidr, "via", other.underlay_ip], ns=netns)
            run(["ip", "route", "add", node.pod_cidr, "via", node.underlay_ip], ns=other.netns)
        for host in self.hosts.values():
            run(["ip", "route", "add", node.pod_cidr, "via", node.underlay_ip], ns=host.netns)
        self.nodes[role] = node
        return node

    def add_pod(self, node_role: str, name: str, namespace: str, labels: dict[str, str] | None = None) -> Pod:
        node = self.nodes[node_role]
        n = len(node.pods) + 10
        ip = f"10.244.{node.index}.{n}"
        netns = self._netns(f"pod{node.index}{n}")
        host_if = f"v{node.index}x{n}{self.suffix}"[:15]
        run(["ip", "link", "add", host_if, "netns", node.netns, "type", "veth", "peer", "name", "eth0", "netns", netns])
        gateway = f"10.244.{node.index}.1"
        run(["ip", "addr", "add", f"{ip}/32", "dev", "eth0"], ns=netns)
        run(["ip", "link", "set", "eth0", "up"], ns=netns)
        run(["ip", "route", "add", f"{gateway}/32", "dev", "eth0"], ns=netns)
        run(["ip", "route", "add", "default", "via", gateway, "dev", "eth0"], ns=netns)
        run(["ip", "addr", "add", f"{gateway}/32", "dev", host_if], ns=node.netns)
        run(["ip", "link", "set", host_if, "up"], ns=node.netns)
        run(["ip", "route", "add", f"{ip}/32", "dev", host_if], ns=node.netns)
        pod = Pod(name, namespace, node_role, netns, ip, dict(labels or {}))
        node.pods.append(pod)
        return pod

    def add_service(self, cluster_ip: str, port: int, backend: Pod, target_port: int, protocol: str = "tcp") -> None:
        """DNAT ``cluster_ip:port`` to the backend on every Node, as kube-proxy would."""
        rules = f"""
table ip flowscope_lab_nat {{
  chain prerouting {{ type nat hook prerouting priority -100;
    ip daddr {cluster_ip} {protocol} dport {port} dnat to {backend.ip}:{target_port}
  }}
}}
"""
        for node in self.nodes.values():
            run(["nft", "-f", "-"], ns=node.netns, input=rules)

    def deny_ingress(self, pod: Pod, allowed_from: Sequence[str], port: int) -> None:
        """Drop new connections to ``pod:port`` except from ``allowed_from``, inside the Pod,
        as a NetworkPolicy dataplane would: the Nodes forward the SYN and see no reply."""
        allowed = ", ".join(allowed_from) or "127.0.0.1"
        rules = f"""
table inet flowscope_lab_policy {{
  chain input {{ type filter hook input priority 0;
    tcp dport {port} ct state new ip saddr != {{ {allowed} }} drop
  }}
}}
"""
        run(["nft", "-f", "-"], ns=pod.netns, input=rules)

    def pods(self) -> list[Pod]:
        return [p for node in self.nodes.values() for p in node.pods]


# --------------------------------------------------------------------------- traffic
#
# Small, dependency-free traffic programs run inside the lab's namespaces with
# ``python -m flowscope.lab serve|send|loop``: they move exactly the bytes they are told to, so
# what the flow records say can be compared with what was sent. ``forward`` relays a
# socket made on the host into a namespace (the demo's dashboards).


def _serve(tcp_ports: Sequence[int], udp_ports: Sequence[int], reply: int) -> None:
    import selectors
    import socket

    sel = selectors.DefaultSelector()
    for port in tcp_ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(64)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, "accept")
    for port in udp_ports:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("0.0.0.0", port))
        u.setblocking(False)
        sel.register(u, selectors.EVENT_READ, "udp")
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data == "accept":
                conn, _ = sock.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, "conn")
            elif key.data == "udp":
                data, addr = sock.recvfrom(65535)
                sock.sendto(b"r" * min(reply, 1400), addr)
            else:
                try:
                    data = sock.recv(65536)
                except ConnectionError:
                    data = b""
                if not data:  # the client finished sending: answer, then close
                    sel.unregister(sock)
                    sock.setblocking(True)
                    try:
                        sock.sendall(b"r" * reply)
                    except OSError:
                        pass
                    sock.close()


ANSWER_TIMEOUT = 60.0  # seconds a connected TCP client waits for the server's answer


def _send(target: str, protocol: str, count: int, packets: int, timeout: float) -> int:
    """Send ``count`` octets of payload (TCP) or ``packets`` datagrams of ``count`` octets (UDP);
    print what came back. Exit status 0 when answered, 1 when refused or unanswered."""
    import socket

    host, _, port_s = target.rpartition(":")
    addr = (host, int(port_s))
    if protocol == "udp":
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(timeout)
        got = 0
        for _ in range(packets):
            u.sendto(b"q" * count, addr)
            try:
                got += len(u.recv(65535))
            except OSError:
                pass
        print(got)
        return 0 if got else 1
    try:
        s = socket.create_connection(addr, timeout=timeout)
    except OSError as exc:
        print(f"refused: {exc}")
        return 1
    # ``timeout`` tells a dropped SYN (a denied connection) from an answer; a server that
    # answers slowly (a loaded machine) is waited for, up to a bound of its own.
    s.settimeout(max(timeout, ANSWER_TIMEOUT))
    s.sendall(b"q" * count)
    s.shutdown(socket.SHUT_WR)
    got = 0
    while chunk := s.recv(65536):
        got += len(chunk)
    s.close()
    print(got)
    return 0


def _loop(targets: Sequence[str], every: float, rounds: int, timeout: float) -> int:
    """Steady traffic: every ``every`` seconds, one connection to each target
    (``IP:PORT/tcp/BYTES`` or ``IP:PORT/udp/BYTES/PACKETS``); sizes grow and shrink over
    rounds (x1 to x2) so throughput lines move. Runs ``rounds`` rounds (0: until killed)."""
    import contextlib
    import io
    import time

    plan = []
    for t in targets:
        parts = t.split("/")
        if len(parts) not in (3, 4) or parts[1] not in ("tcp", "udp"):
            raise SystemExit(f"loop: {t!r} is not IP:PORT/tcp/BYTES or IP:PORT/udp/BYTES/PACKETS")
        plan.append((parts[0], parts[1], int(parts[2]), int(parts[3]) if len(parts) == 4 else 1))
    n = 0
    next_at = time.monotonic()
    while rounds == 0 or n < rounds:
        scale = 1 + (n % 5) / 4
        for target, proto, size, packets in plan:
            with contextlib.redirect_stdout(io.StringIO()):
                _send(target, proto, int(size * scale), packets, timeout)
        n += 1
        next_at += every
        time.sleep(max(next_at - time.monotonic(), 0))
    return 0


def _forward(fd: int, target: str) -> int:
    """Accept on the inherited listening socket ``fd`` (made in another namespace, e.g. the
    host's loopback) and relay each connection to ``target`` in this process's namespace:
    how the demo shows a browser on the host the dashboards of a collector inside the lab."""
    import asyncio
    import socket

    host, _, port_s = target.rpartition(":")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(host, int(port_s))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    async def serve() -> None:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        server = await asyncio.start_server(relay, sock=sock)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m flowscope.lab", description="traffic inside a flowscope lab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--tcp", type=int, action="append", default=[])
    serve.add_argument("--udp", type=int, action="append", default=[])
    serve.add_argument("--reply", type=int, default=1000)
    send = sub.add_parser("send")
    send.add_argument("target", help="IP:PORT")
    send.add_argument("--udp", action="store_true")
    send.add_argument("--bytes", type=int, default=1000)
    send.add_argument("--packets", type=int, default=1)
    send.add_argument("--timeout", type=float, default=2.0)
    loop = sub.add_parser("loop")
    loop.add_argument("targets", nargs="+", help="IP:PORT/tcp/BYTES or IP:PORT/udp/BYTES/PACKETS")
    loop.add_argument("--every", type=float, default=3.0)
    loop.add_argument("--rounds", type=int, default=0)
    loop.add_argument("--timeout", type=float, default=1.0)
    fwd = sub.add_parser("forward")
    fwd.add_argument("--fd", type=int, required=True, help="an inherited listening socket")
    fwd.add_argument("--to", required=True, help="IP:PORT to relay to, in this namespace")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        _serve(args.tcp, args.udp, args.reply)
        return 0
    if args.cmd == "loop":
        return _loop(args.targets, args.every, args.rounds, args.timeout)
    if args.cmd == "forward":
        return _forward(args.fd, args.to)
    return _send(args.target, "udp" if args.udp else "tcp", args.bytes, args.packets, args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
