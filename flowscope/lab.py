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
inside these namespaces, and :meth:`Lab.close` (also on errors, as a context manager, and
at interpreter exit) stops the processes left inside the lab's namespaces and deletes the
namespaces, which removes their links, routes and conntrack tables. Root is required.

A test that built a lab may crash past any cleanup (SIGKILL, a timeout, a lost CI
runner). Each lab therefore writes a marker, ``/run/flowscope-lab/<suffix>.json``, with
its owner's pid and start time and its namespaces, before it makes anything; every new
:class:`Lab` first removes the labs whose owner is gone (:func:`reap_stale`). Labs of a
live process are never touched.

The plumbing speaks netlink through pyroute2 (namespaces, links, addresses, routes) and
writes sysctls under ``/proc/sys`` from inside the namespace; nftables rules, which
pyroute2 cannot express, still go through ``nft -f -``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import json
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Lab", "LabError", "Host", "Pod", "Node", "UNDERLAY_PREFIX", "inside", "set_sysctl", "reap_stale"]

UNDERLAY_PREFIX = "172.31.250"  # the fabric's /24, inside the lab's own namespaces only
MARKER_DIR = "/run/flowscope-lab"
NFT_CONNTRACK = """
table inet flowscope_lab {
  chain output { type filter hook output priority 0; ct state new,established,related counter; }
  chain forward { type filter hook forward priority 0; ct state new,established,related counter; }
  chain input { type filter hook input priority 0; ct state new,established,related counter; }
}
"""


class LabError(RuntimeError):
    """A step building the lab failed; the message names the step and the kernel's answer."""


def run(args: Sequence[str], *, ns: str | None = None, input: str | None = None, check: bool = True) -> str:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@contextlib.contextmanager
def inside(netns: str) -> Iterator[None]:
    """Run the body in network namespace ``netns`` (this thread only), then come back:
    sockets made inside stay in that namespace."""
    from pyroute2 import netns as pyroute2_netns

    pyroute2_netns.pushns(netns)
    try:
        yield
    finally:
        pyroute2_netns.popns()


def set_sysctl(netns: str, key: str, value: object) -> None:
    """``sysctl -w key=value`` inside ``netns`` (``/proc/sys/net`` is per namespace and
    resolved when the file is opened)."""
    path = "/proc/sys/" + key.replace(".", "/")
    try:
        with inside(netns), open(path, "w") as fh:
            fh.write(f"{value}\n")
    except OSError as exc:
        raise LabError(f"sysctl {key}={value} in {netns}: {exc.strerror}") from None


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _kill_inside(names: Sequence[str]) -> None:
    """SIGKILL every process whose network namespace is one of ``names``."""
    from pyroute2 import netns as pyroute2_netns

    try:
        pids = pyroute2_netns.ns_pids()
    except OSError:
        return
    own = os.getpid()
    for name in names:
        for pid in pids.get(name, ()):
            if pid != own:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def _remove_namespaces(names: Sequence[str]) -> None:
    from pyroute2 import netns as pyroute2_netns

    _kill_inside(names)
    for name in names:
        with contextlib.suppress(OSError):
            pyroute2_netns.remove(name)


def reap_stale(marker_dir: str = MARKER_DIR) -> list[str]:
    """Remove the labs whose owner process is gone; returns the namespaces removed."""
    removed: list[str] = []
    try:
        markers = os.listdir(marker_dir)
    except OSError:
        return removed
    for fname in markers:
        path = os.path.join(marker_dir, fname)
        try:
            with open(path) as fh:
                info = json.load(fh)
            pid, started, names = int(info["pid"]), info.get("start_time"), list(info["namespaces"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _start_time(pid) is not None and _start_time(pid) == started:
            continue  # its owner lives: not ours to clean
        _remove_namespaces(names)
        removed += names
        with contextlib.suppress(OSError):
            os.unlink(path)
    return removed


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
    host_network: bool = False  # runs in its Node's namespace, with the Node's addresses

    def exec_args(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]


@dataclass
class Node(Host):
    index: int = 0
    pod_cidr: str = ""
    pods: list[Pod] = field(default_factory=list)

    @property
    def gateway_ip(self) -> str:
        """The Node's address on its Pods' side (the first of its Pod CIDR)."""
        return self.pod_cidr.rsplit(".", 1)[0] + ".1"


class Lab:
    """Build with :meth:`add_node`, :meth:`add_host`, :meth:`add_pod`, :meth:`add_service`."""

    def __init__(self, suffix: str | None = None) -> None:
        reap_stale()
        self.suffix = suffix or secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.nodes: dict[str, Node] = {}
        self.hosts: dict[str, Host] = {}
        self._next_underlay = 10
        self._marker = os.path.join(MARKER_DIR, f"{self.suffix}.json")
        self._closed = False
        atexit.register(self.close)
        try:
            self.fabric = self._netns("fabric")

            def bridge(ipr: Any) -> None:
                ipr.link("add", ifname="br0", kind="bridge")
                ipr.link("set", index=ipr.link_lookup(ifname="br0")[0], state="up")

            self._nl(self.fabric, "bridge br0", bridge)
        except BaseException:
            self.close()
            raise

    # -- lifecycle

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        _remove_namespaces(list(reversed(self.namespaces)))
        self.namespaces.clear()
        with contextlib.suppress(OSError):
            os.unlink(self._marker)

    def _write_marker(self, pending: str) -> None:
        """The marker lists a namespace before it exists, so a crash in between leaves
        nothing unlisted."""
        os.makedirs(MARKER_DIR, exist_ok=True)
        info = {"pid": os.getpid(), "start_time": _start_time(os.getpid()), "namespaces": [*self.namespaces, pending]}
        tmp = self._marker + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(info, fh)
        os.replace(tmp, self._marker)

    # -- building

    @staticmethod
    def _nl(netns: str, what: str, work: Any) -> Any:
        """``work(ipr)`` with a pyroute2 ``NetNS`` of ``netns``; netlink errors become a
        LabError naming ``what``. pyroute2's synchronous API runs an asyncio loop of its
        own, which a thread that already runs one (an async test) cannot: there the work
        runs in a helper thread."""
        from pyroute2 import NetNS

        def call() -> Any:
            try:
                with NetNS(netns) as ipr:
                    return work(ipr)
            except Exception as exc:  # pyroute2's NetlinkError, OSError
                raise LabError(f"{what} in {netns}: {exc}") from None

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return call()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(call).result()

    def _netns(self, role: str) -> str:
        from pyroute2 import netns as pyroute2_netns

        name = f"fsl-{role}-{self.suffix}"
        self._write_marker(name)
        try:
            pyroute2_netns.create(name)
        except Exception as exc:
            raise LabError(f"creating network namespace {name}: {exc}") from None
        self.namespaces.append(name)
        self._nl(name, "lo up", lambda ipr: ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up"))
        return name

    def _veth(self, outer_ns: str, outer: str, inner_ns: str, inner: str) -> None:
        """A veth pair: ``outer`` in ``outer_ns``, ``inner`` in ``inner_ns``."""
        self._nl(outer_ns, f"veth {outer} - {inner} ({inner_ns})", lambda ipr: ipr.link(
            "add", ifname=outer, kind="veth", peer={"ifname": inner, "net_ns_fd": inner_ns}))

    def _addr_up(self, netns: str, ifname: str, ip: str, prefixlen: int) -> None:
        def work(ipr: Any) -> None:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=idx, address=ip, prefixlen=prefixlen)
            ipr.link("set", index=idx, state="up")

        self._nl(netns, f"address {ip}/{prefixlen} on {ifname}", work)

    def _route(self, netns: str, dst: str, *, via: str | None = None, dev: str | None = None) -> None:
        def work(ipr: Any) -> None:
            kwargs: dict[str, Any] = {"dst": "0.0.0.0/0" if dst == "default" else dst}
            if via is not None:
                kwargs["gateway"] = via
            if dev is not None:
                kwargs["oif"] = ipr.link_lookup(ifname=dev)[0]
                if via is None:
                    kwargs["scope"] = 253  # link, as `ip route add ... dev` picks
            ipr.route("add", **kwargs)

        self._nl(netns, f"route {dst} via {via or dev}", work)

    def _plug(self, netns: str, role: str) -> str:
        """A veth from the fabric bridge into ``netns``, with the next underlay address."""
        ip = f"{UNDERLAY_PREFIX}.{self._next_underlay}"
        self._next_underlay += 1
        outer = f"u{self._next_underlay}{self.suffix}"[:15]
        self._veth(self.fabric, outer, netns, "eth0")
        self._nl(self.fabric, f"{outer} into br0", lambda ipr: ipr.link(
            "set", index=ipr.link_lookup(ifname=outer)[0], master=ipr.link_lookup(ifname="br0")[0], state="up"))
        self._addr_up(netns, "eth0", ip, 24)
        return ip

    def add_host(self, role: str) -> Host:
        netns = self._netns(role)
        host = Host(role, netns, self._plug(netns, role))
        self.hosts[role] = host
        for node in self.nodes.values():  # hosts reach every Pod through its Node
            self._route(netns, node.pod_cidr, via=node.underlay_ip)
        return host

    def add_node(self, role: str) -> Node:
        index = len(self.nodes) + 1
        netns = self._netns(role)
        node = Node(role, netns, self._plug(netns, role), index=index, pod_cidr=f"10.244.{index}.0/24")
        set_sysctl(netns, "net.ipv4.ip_forward", 1)
        run(["nft", "-f", "-"], ns=netns, input=NFT_CONNTRACK)
        set_sysctl(netns, "net.netfilter.nf_conntrack_acct", 1)
        set_sysctl(netns, "net.netfilter.nf_conntrack_timestamp", 1)
        for other in self.nodes.values():
            self._route(netns, other.pod_cidr, via=other.underlay_ip)
            self._route(other.netns, node.pod_cidr, via=node.underlay_ip)
        for host in self.hosts.values():
            self._route(host.netns, node.pod_cidr, via=node.underlay_ip)
        self.nodes[role] = node
        return node

    def add_pod(self, node_role: str, name: str, namespace: str, labels: dict[str, str] | None = None) -> Pod:
        node = self.nodes[node_role]
        n = len([p for p in node.pods if not p.host_network]) + 10
        ip = f"10.244.{node.index}.{n}"
        netns = self._netns(f"pod{node.index}{n}")
        host_if = f"v{node.index}x{n}{self.suffix}"[:15]
        self._veth(node.netns, host_if, netns, "eth0")
        gateway = node.gateway_ip
        self._addr_up(netns, "eth0", ip, 32)
        self._route(netns, f"{gateway}/32", dev="eth0")
        self._route(netns, "default", via=gateway, dev="eth0")
        self._addr_up(node.netns, host_if, gateway, 32)
        self._route(node.netns, f"{ip}/32", dev=host_if)
        pod = Pod(name, namespace, node_role, netns, ip, dict(labels or {}))
        node.pods.append(pod)
        return pod

    def add_host_network_pod(self, node_role: str, name: str, namespace: str, labels: dict[str, str] | None = None) -> Pod:
        """A hostNetwork Pod: it runs in its Node's namespace and has the Node's address
        (status.podIP is the Node's InternalIP, as the kubelet reports it)."""
        node = self.nodes[node_role]
        pod = Pod(name, namespace, node_role, node.netns, node.underlay_ip, dict(labels or {}), host_network=True)
        node.pods.append(pod)
        return pod

    def set_sysctl(self, host: Host, key: str, value: object) -> None:
        set_sysctl(host.netns, key, value)

    @contextlib.contextmanager
    def inside(self, host: Host | Pod) -> Iterator[None]:
        """Sockets made in the body belong to ``host``'s namespace."""
        with inside(host.netns):
            yield

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
    rounds (x1 to x2) so throughput lines move. Runs ``rounds`` rounds (0: until stopped).

    SIGTERM stops it after the connection in progress: every connection it made is
    whole, so the last record of each kind carries what one round sends (the demo's
    closing report reads it)."""
    import contextlib
    import io
    import signal
    import time

    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)

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
            if stopping:
                return 0
        n += 1
        next_at += every
        while not stopping and (left := next_at - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))
        if stopping:
            return 0
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
