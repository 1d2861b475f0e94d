"""``flowscope demo``: the whole pipeline, for real, on one machine, with its dashboards.

It shows what flowscope does without a cluster, using real parts only: a lab of network
namespaces shaped like a two-Node cluster (:mod:`flowscope.lab`), the kernel's conntrack
in each Node, one Flow Exporter agent per Node reading it, mutual TLS to a Flow
Aggregator that correlates the two halves of every inter-Node connection, and the
collector storing what the aggregator exports in chDB and serving the web dashboards.
The Kubernetes metadata comes from a static inventory (Pods, Nodes, a Service,
NetworkPolicies), the same objects the agent would watch through the API in a cluster.

Traffic of every kind flows steadily until Ctrl-C (or ``--duration``): Pod to Service
(ClusterIP DNAT, inter-Node), Pod to Pod on one Node and across Nodes, Pod to an external
host, a connection a NetworkPolicy denies, and UDP. The terminal shows progress while
the lab starts, the dashboards' URL, then a live summary read from the dashboards' own
JSON; at the end the latest record of each connection (a table, or JSON with ``--json``)
and the removal of everything the demo made: namespaces (with their links, nft rules and
conntrack tables), processes, the store. Root is required (network namespaces).

The collector runs inside the lab's control-plane namespace; the dashboards reach the
host's loopback through a relay (``python -m flowscope.lab forward``) that accepts on a
socket made on the host and connects inside the namespace.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flowscope.lab import Lab, Pod

SERVICE_IP = "10.96.0.10"
AGGREGATOR_NAME = "flow-aggregator.flow-aggregator.svc"


DEFAULT_UI = "127.0.0.1:8080"
TRAFFIC_EVERY = 3.0  # seconds between rounds of the steady traffic


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on this machine with its dashboards: netns Nodes, agents, aggregator, collector",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--duration", metavar="DURATION",
                   help="stop by itself after this long (a Go duration: 90s, 5m); default: run until Ctrl-C")
    p.add_argument("--ui", default=DEFAULT_UI, metavar="HOST:PORT",
                   help=f"serve the dashboards here (default {DEFAULT_UI}; port 0: any free port); off loopback, "
                        "--ui-token-file or --ui-insecure is required")
    p.add_argument("--ui-token-file", metavar="FILE", help="require 'Authorization: Bearer <token in FILE>'")
    p.add_argument("--ui-insecure", action="store_true",
                   help="serve a non-loopback --ui without authentication (every flow to anyone)")
    p.add_argument("--workdir", help="keep configs, logs, the store and records here (default: a temporary "
                                     "directory, removed)")
    p.add_argument("--json", action="store_true", help="at the end, print the latest records as JSON lines, not a table")
    p.set_defaults(func=run_demo)


# --------------------------------------------------------------------------- inventory


def _inventory(lab: Lab, pods: dict[str, Pod], *, showcase: bool = False) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for name, node in lab.nodes.items():
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name},
                "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
                "status": {"addresses": [{"type": "InternalIP", "address": node.underlay_ip}]},
            }
        )
    for ns in sorted({p.namespace for p in pods.values()}):
        objs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}})
    for pod in pods.values():
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels},
                "spec": {"nodeName": pod.node, "containers": [{"name": "app", "image": "demo", "ports": _ports(pod)}]},
                "status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]},
            }
        )
    objs.append(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "backend", "namespace": "shop"},
            "spec": {
                "clusterIP": SERVICE_IP,
                "clusterIPs": [SERVICE_IP],
                "selector": {"app": "backend"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            },
        }
    )
    objs.append(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "db-from-backend-only", "namespace": "data"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "db"}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "from": [
                            {
                                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
                                "podSelector": {"matchLabels": {"app": "backend"}},
                            }
                        ],
                        "ports": [{"protocol": "TCP", "port": 5432}],
                    }
                ],
            },
        }
    )
    if showcase:  # more policies, so that every kind of verdict shows on the dashboards
        objs.append({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "frontend-egress", "namespace": "shop"},
            "spec": {"podSelector": {"matchLabels": {"app": "frontend"}}, "policyTypes": ["Egress"], "egress": [{}]},
        })
        objs.append({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "backend-from-frontend", "namespace": "shop"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "backend"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                             "ports": [{"protocol": "TCP", "port": 8080}, {"protocol": "UDP", "port": 5353}]}],
            },
        })
    return objs


def _ports(pod: Pod) -> list[dict[str, Any]]:
    ports = {"backend": [("http", 8080, "TCP"), ("dns", 5353, "UDP")], "cache": [("redis", 6379, "TCP")], "db": [("pg", 5432, "TCP")]}
    return [{"name": n, "containerPort": p, "protocol": proto} for n, p, proto in ports.get(pod.labels.get("app", ""), [])]


# --------------------------------------------------------------------------- configs and TLS


def _tls(workdir: Path, ctl_ip: str) -> dict[str, Path]:
    from flowscope.operator.tls import ensure

    now = dt.datetime.now(dt.timezone.utc)
    material = ensure(
        {}, now=now, server_names=[AGGREGATOR_NAME, ctl_ip], lifetime=86400.0, ca_lifetime=86400.0 * 2,
        margin=3600.0, ca_name="flowscope-demo-ca",
    )  # fmt: skip
    files = {
        "ca": material.ca.cert_pem,
        "server.crt": material.server.cert_pem,
        "server.key": material.server.key_pem,
        "client.crt": material.client.cert_pem,
        "client.key": material.client.key_pem,
    }
    out = {}
    for name, data in files.items():
        path = workdir / "tls" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o600)
        out[name] = path
    return out


def _write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------- processes


class Processes:
    """Child processes of the demo, each logging to a file, all stopped on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopped: set[str] = set()  # stopped on purpose: their exit is no failure

    def start(self, name: str, argv: Sequence[str], stdout: Path | None = None) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        out = open(stdout, "wb") if stdout else log  # noqa: SIM115
        # A session of its own: Ctrl-C at the terminal reaches the demo, which stops its
        # children in order (agents' final records first), not every process at once.
        proc = subprocess.Popen(list(argv), stdout=out, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        self.children.append((name, proc))
        return proc

    def stop(self, name: str, timeout: float = 15.0) -> int | None:
        self.stopped.add(name)
        for n, proc in self.children:
            if n == name and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    return proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    return proc.wait()
        return None

    def check_alive(self) -> None:
        for name, proc in self.children:
            if name not in self.stopped and proc.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{tail}")

    def stop_all(self) -> None:
        for name, _ in reversed(self.children):
            self.stop(name, timeout=5.0)


def _flowscope(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowscope", *args]


def _wait_listening(netns: str, port: int, procs: Processes, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Hlnt", f"sport = :{port}"], capture_output=True, text=True)
        if out.stdout.strip():
            return
        procs.check_alive()
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} in {netns} after {timeout:g}s")


# --------------------------------------------------------------------------- the run


def _preflight() -> str | None:
    """Why the demo cannot run here (one line), or None."""
    if os.geteuid() != 0:
        return "needs root: it creates network namespaces (run: sudo bash scripts/demo.sh)"
    for tool in ("ip", "nft", "ss"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; scripts/setup.sh installs it"
    probe = f"fsl-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create network namespaces here ({made.stderr.strip() or 'ip netns add failed'})"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def run_demo(args: argparse.Namespace) -> int:
    from flowscope.durations import DurationError, parse_duration
    from flowscope.listen import ListenAddressError, parse_listen_address
    from flowscope.webauth import WebAuth, WebAuthError, check_exposure, read_token

    try:
        duration = parse_duration(args.duration, field="--duration") if args.duration else None
        ui = parse_listen_address(args.ui, "--ui", example_port=8080)
        if ui is None:
            raise ListenAddressError("--ui: give HOST:PORT, e.g. 127.0.0.1:8080")
        token = read_token(args.ui_token_file, "--ui-token-file") if args.ui_token_file else None
        check_exposure(ui[0], WebAuth(token=token, insecure=args.ui_insecure), "--ui")
    except (DurationError, ListenAddressError, WebAuthError, ValueError) as exc:
        print(f"flowscope demo: {exc}", file=sys.stderr)
        return 2
    if duration is not None and duration <= 0:
        print(f"flowscope demo: --duration: {args.duration!r} must be longer than 0", file=sys.stderr)
        return 2
    why = _preflight()
    if why:
        print(f"flowscope demo: {why}", file=sys.stderr)
        return 2
    keep = args.workdir is not None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="flowscope-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    listener = _listen(ui)
    if listener is None:
        print(f"flowscope demo: --ui: {args.ui} is taken on this machine; choose another port (or port 0)",
              file=sys.stderr)
        return 3
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Lab() as lab:
            return _run(lab, workdir, args, listener, token, duration, stop)
    finally:
        listener.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        _say("removed the lab's network namespaces (their links, nft rules and conntrack tables), "
             "stopped every process" + ("" if keep else " and deleted the store"))


def _listen(ui: tuple[str, int]) -> Any:
    """The dashboards' listening socket on the host (the relay accepts on it), or None if taken."""
    import socket

    family = socket.AF_INET6 if ":" in ui[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(ui)
    except OSError:
        sock.close()
        return None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _say(text: str) -> None:
    print(f"==> {text}", flush=True)


@dataclass(frozen=True, slots=True)
class Send:
    """One connection of the traffic plan and what its record must show."""

    src: str  # the Pod that connects
    target: str  # IP:PORT it connects to (a ClusterIP for the Service)
    proto: str  # tcp or udp
    size: int  # payload octets (per datagram for UDP)
    packets: int  # datagrams (UDP)
    what: str
    expect_dst: tuple[str, int]  # the destination after DNAT, as the record carries it
    denied: bool = False


def _complete(send: Send, src_ip: str, r: dict[str, Any]) -> bool:
    """Whether record ``r`` is ``send``'s connection with everything it moved counted."""
    proto = 6 if send.proto == "tcp" else 17
    if (r.get("sourceIPv4Address"), r.get("destinationIPv4Address"), r.get("destinationTransportPort"), r.get("protocolIdentifier")) != (
        src_ip, *send.expect_dst, proto,
    ):
        return False
    if send.denied:
        return r.get("ingressNetworkPolicyRuleAction") == 2
    sides = ["FromSourceNode"] + (["FromDestinationNode"] if r.get("flowType") == 2 else [])
    if send.proto == "udp":
        return all(r.get(f"packetTotalCount{side}", 0) >= send.packets for side in sides)
    return all(r.get(f"octetTotalCount{side}", 0) >= send.size for side in sides)


class Pipeline:
    """The demo's cluster: the lab, its inventory and TLS material, and the running
    collector, aggregator and agents. The end-to-end tests drive the same class."""

    def __init__(self, lab: Lab, workdir: Path, *, active_timeout: str = "4s", idle_timeout: str = "2s",
                 store: Path | None = None, collector_args: Sequence[str] = (), showcase: bool = False) -> None:
        """``store``: the collector keeps every record in a chDB directory there (and still
        prints them to :attr:`records_file`); ``collector_args``: more options for it (the
        demo's ``--ui``); ``showcase``: the demo's extra NetworkPolicies."""
        self.lab = lab
        self.workdir = workdir
        self.procs = Processes(workdir)
        self.records_file = workdir / "collector.jsonl"
        lab.add_node("node-a")
        lab.add_node("node-b")
        self.ctl = lab.add_host("ctl")
        self.ext = lab.add_host("ext")
        self.pods = {
            "frontend": lab.add_pod("node-a", "frontend-6d4f8", "shop", {"app": "frontend"}),
            "cache": lab.add_pod("node-a", "cache-0", "shop", {"app": "cache"}),
            "backend": lab.add_pod("node-b", "backend-5c7b9", "shop", {"app": "backend"}),
            "db": lab.add_pod("node-b", "db-0", "data", {"app": "db"}),
        }
        lab.add_service(SERVICE_IP, 80, self.pods["backend"], 8080)
        lab.deny_ingress(self.pods["db"], [self.pods["backend"].ip], 5432)
        self.inventory = workdir / "inventory.yaml"
        self.inventory.write_text(yaml.safe_dump_all(_inventory(lab, self.pods, showcase=showcase), sort_keys=False))
        self.tls = _tls(workdir, self.ctl.underlay_ip)
        self.active_timeout = active_timeout
        self.idle_timeout = idle_timeout
        self.store = store
        self.collector_args = list(collector_args)

    def start(self) -> None:
        tls, ctl = self.tls, self.ctl
        aggregator_cfg = _write(
            self.workdir / "aggregator.yaml",
            {
                "externalFlowCollectorAddr": "127.0.0.1:4740:tcp",
                "flowExportInterval": "2s",
                "aggregatorTransportProtocol": "tls",
                "flowAggregatorAddress": AGGREGATOR_NAME,
                "listenPort": 4739,
                "tls": {"caFile": str(tls["ca"]), "certFile": str(tls["server.crt"]), "keyFile": str(tls["server.key"])},
                "correlationTimeout": "6s",
                "apiAddress": "127.0.0.1:10348",
                "sinks": {"flowLog": {"enabled": True, "path": str(self.workdir / "flows.jsonl")}},
            },
        )
        collector = _flowscope("collector", "--listen", "127.0.0.1:4740:tcp")
        if self.store is not None:
            collector += ["--store", f"chdb://{self.store}", "--format", "jsonl", "--commit-interval", "1s"]
        collector += self.collector_args
        self.procs.start("collector", ["ip", "netns", "exec", ctl.netns, *collector], stdout=self.records_file)
        _wait_listening(ctl.netns, 4740, self.procs)
        self.procs.start("aggregator", ["ip", "netns", "exec", ctl.netns, *_flowscope("aggregator", "--config", str(aggregator_cfg))])
        _wait_listening(ctl.netns, 4739, self.procs)
        for name, node in self.lab.nodes.items():
            cfg = _write(
                self.workdir / f"agent-{name}.yaml",
                {
                    "flowCollectorAddr": f"{ctl.underlay_ip}:4739:tls",
                    "flowPollInterval": "1s",
                    "activeFlowExportTimeout": self.active_timeout,
                    "idleFlowExportTimeout": self.idle_timeout,
                    "nodeName": name,
                    "tls": {
                        "caFile": str(tls["ca"]), "certFile": str(tls["client.crt"]), "keyFile": str(tls["client.key"]),
                        "serverName": AGGREGATOR_NAME,
                    },  # fmt: skip
                    "metricsAddress": "127.0.0.1:9390",
                    "metadata": {"source": "static", "staticFile": str(self.inventory)},
                },
            )
            self.procs.start(f"agent-{name}", ["ip", "netns", "exec", node.netns, *_flowscope("agent", "--config", str(cfg))])
        self.start_servers()
        time.sleep(1.0)  # the agents' first poll and TLS session
        self.procs.check_alive()

    def start_servers(self) -> None:
        """The traffic servers in the Pods and the external host (again, after :meth:`stop`)."""
        serve = [sys.executable, "-m", "flowscope.lab", "serve"]
        pods, ext = self.pods, self.ext
        self.procs.start("srv-backend", pods["backend"].exec_args(*serve, "--tcp", "8080", "--udp", "5353", "--reply", "4000"))
        self.procs.start("srv-cache", pods["cache"].exec_args(*serve, "--tcp", "6379", "--reply", "200"))
        self.procs.start("srv-db", pods["db"].exec_args(*serve, "--tcp", "5432", "--reply", "800"))
        self.procs.start("srv-ext", ext.exec_args(*serve, "--tcp", "443", "--reply", "30000"))
        for netns, port in ((pods["backend"].netns, 8080), (pods["cache"].netns, 6379), (pods["db"].netns, 5432), (ext.netns, 443)):
            _wait_listening(netns, port, self.procs)

    def plan(self) -> list[Send]:
        """The demo's traffic: one connection of every kind."""
        pods, backend, db = self.pods, self.pods["backend"].ip, self.pods["db"].ip
        return [
            Send("frontend", f"{SERVICE_IP}:80", "tcp", 200_000, 1, "Pod -> Service (ClusterIP, inter-Node)", (backend, 8080)),
            Send("frontend", f"{pods['cache'].ip}:6379", "tcp", 50_000, 1, "Pod -> Pod (same Node)", (pods["cache"].ip, 6379)),
            Send("frontend", f"{self.ext.underlay_ip}:443", "tcp", 20_000, 1, "Pod -> external host", (self.ext.underlay_ip, 443)),
            Send("backend", f"{db}:5432", "tcp", 10_000, 1, "Pod -> Pod, allowed by NetworkPolicy", (db, 5432)),
            Send("frontend", f"{db}:5432", "tcp", 10_000, 1, "Pod -> Pod, denied by NetworkPolicy", (db, 5432), denied=True),
            Send("frontend", f"{backend}:5353", "udp", 512, 5, "Pod -> Pod over UDP (inter-Node)", (backend, 5353)),
        ]

    def showcase_plan(self) -> list[Send]:
        """The demo's steady traffic: :meth:`plan` plus Pod to Pod across Nodes over TCP."""
        pods = self.pods
        plan = self.plan()
        plan.insert(2, Send("frontend", f"{pods['backend'].ip}:8080", "tcp", 30_000, 1, "Pod -> Pod (across Nodes)",
                            (pods["backend"].ip, 8080)))
        return plan

    def start_traffic(self, plan: Sequence[Send], every: float = TRAFFIC_EVERY) -> None:
        """One ``python -m flowscope.lab loop`` per source Pod, sending ``plan`` every ``every`` seconds."""
        by_pod: dict[str, list[str]] = {}
        for s in plan:
            spec = f"{s.target}/{s.proto}/{s.size}" + (f"/{s.packets}" if s.proto == "udp" else "")
            by_pod.setdefault(s.src, []).append(spec)
        for src, specs in by_pod.items():
            cmd = self.pods[src].exec_args(sys.executable, "-m", "flowscope.lab", "loop", "--every", str(every), *specs)
            self.procs.start(f"traffic-{src}", cmd)

    def stop_traffic(self) -> None:
        """Each traffic loop finishes the connection in progress, then exits (a loop
        killed mid-connection would leave a part-sent connection as its kind's latest)."""
        for name, _ in list(self.procs.children):
            if name.startswith("traffic-"):
                self.procs.stop(name, timeout=20.0)

    def wait_settled(self, plan: Sequence[Send], *, timeout: float = 60.0, quiet: float = 4.0) -> list[Send]:
        """Wait until every connection of ``plan`` has reached the collector with all it
        moved counted by every Node it crossed, and nothing new has arrived for ``quiet``
        seconds (so the last record holds the final counters). Returns what never did."""
        deadline = time.monotonic() + timeout
        size, changed = -1, time.monotonic()
        missing = list(plan)
        while time.monotonic() < deadline:
            now_size = self.records_file.stat().st_size if self.records_file.exists() else 0
            if now_size != size:
                size, changed = now_size, time.monotonic()
                latest = latest_per_connection(self.records())
                missing = [s for s in plan if not any(_complete(s, self.pods[s.src].ip, r) for r in latest.values())]
            if not missing and time.monotonic() - changed >= quiet:
                return []
            self.procs.check_alive()
            time.sleep(0.2)
        return missing

    def send(self, src: str, target: str, proto: str, size: int, packets: int) -> str:
        """Run the traffic program in Pod ``src``; returns what it printed (octets answered)."""
        cmd = self.pods[src].exec_args(
            sys.executable, "-m", "flowscope.lab", "send", target, "--bytes", str(size), "--packets", str(packets),
            "--timeout", "1.5",
        )  # fmt: skip
        if proto == "udp":
            cmd.append("--udp")
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()

    def run_plan(self, plan: Sequence[Send]) -> dict[str, str]:
        return {s.what: self.send(s.src, s.target, s.proto, s.size, s.packets) for s in plan}

    def flowrecords(self) -> subprocess.CompletedProcess[str]:
        query = _flowscope("aggregator", "flowrecords", "--server", "http://127.0.0.1:10348", "-o", "table")
        return subprocess.run(["ip", "netns", "exec", self.ctl.netns, *query], capture_output=True, text=True)

    def stop(self) -> None:
        """Agents first (their final records), then the aggregator, then the collector."""
        for name in self.lab.nodes:
            self.procs.stop(f"agent-{name}")
        time.sleep(3)
        self.procs.stop("aggregator")
        self.procs.stop("collector")
        self.procs.stop_all()

    def records(self) -> list[dict[str, Any]]:
        text = self.records_file.read_text() if self.records_file.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def latest_per_connection(records: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        key = (
            r.get("sourceIPv4Address"), r.get("destinationIPv4Address"), r.get("sourceTransportPort"),
            r.get("destinationTransportPort"), r.get("protocolIdentifier"),
        )  # fmt: skip
        latest[key] = r
    return latest


class _Dashboards:
    """The demo's own reader of the dashboards' JSON, through the relay (as a browser would)."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.token = token

    def get(self, panel: str, **params: str) -> Any:
        from urllib.parse import urlencode

        req = urllib.request.Request(f"{self.url}ui/v1/{panel}?{urlencode(params)}")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())


def _summary_line(s: dict[str, Any], recent: dict[str, Any], elapsed: float) -> str:
    from flowscope.collector.ui.dashboards import _si_bytes

    m, sec = divmod(int(elapsed), 60)
    return (f"    [{m:02d}:{sec:02d}] {s['flows']} flow records, {_si_bytes(s['octets'])} in all, "
            f"{_si_bytes(recent['octetsPerSecond'])}/s in the last minute; {s['connections']} connections "
            f"({s['denied']} denied by policy), {s['nodes']} Nodes, {s['services']} Service(s)")


def _run(lab: Lab, workdir: Path, args: argparse.Namespace, listener: Any, token: str | None,
         duration: float | None, stop: threading.Event) -> int:
    started = time.monotonic()
    host, port = listener.getsockname()[:2]
    shutil.rmtree(workdir / "store", ignore_errors=True)  # a kept --workdir: each run starts empty
    _say(f"building the lab (network namespaces fsl-*-{lab.suffix}): 2 Nodes, 4 Pods in 2 namespaces, a Service, "
         "3 NetworkPolicies, a control-plane host and an external host")
    pipeline = Pipeline(lab, workdir, store=workdir / "store", showcase=True,
                        collector_args=["--ui", f"127.0.0.1:{port}", *(
                            ["--ui-token-file", args.ui_token_file] if args.ui_token_file else [])])
    display_host = f"[{host}]" if ":" in host else host
    dashboards = _Dashboards(f"http://{display_host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}/", token)
    records: list[dict[str, Any]] = []
    total = 0
    missing: list[Send] = []
    plan = pipeline.showcase_plan()
    try:
        _say("starting the collector (chDB store, dashboards) and the Flow Aggregator (mutual TLS) "
             "on the control-plane host,")
        _say("one Flow Exporter agent per Node reading that Node's conntrack, and servers in the Pods")
        pipeline.start()
        relay = [sys.executable, "-m", "flowscope.lab", "forward", "--fd", str(listener.fileno()),
                 "--to", f"127.0.0.1:{port}"]
        log = open(workdir / "relay.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(pipeline.ctl.exec_args(*relay), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                pass_fds=(listener.fileno(),), start_new_session=True)
        pipeline.procs.children.append(("relay", proc))
        _say("first round of traffic, one connection of every kind:")
        for s in plan:
            answer = pipeline.send(s.src, s.target, s.proto, s.size, s.packets)
            ip = pipeline.pods[s.src].ip
            print(f"    {s.what:42s} {ip} -> {s.target:22s} sent {s.size * s.packets:>7} B, got back: {answer}",
                  flush=True)
        pipeline.start_traffic(plan)
        _say(f"steady traffic: the same connections every {TRAFFIC_EVERY:g}s (sizes x1 to x2)")
        _say("waiting for the first flows to reach the store ...")
        summary = _wait_first_flows(dashboards, pipeline, stop, started)
        url = f"{dashboards.url}?d=overview&since=5m&refresh=5s"
        print(flush=True)
        _say(f"dashboards: {url}   (Overview; the filter box completes names with Tab)")
        _say(("stops by itself after " + (args.duration or "")) if duration is not None else "Ctrl-C stops the demo")
        print(flush=True)
        last_line = 0.0
        while not stop.is_set():
            if duration is not None and time.monotonic() - started >= duration:
                break
            if time.monotonic() - last_line >= 5.0:
                try:
                    summary = dashboards.get("summary", since=f"{int(time.monotonic() - started) + 60}s")
                    recent = dashboards.get("summary", since="60s")
                    print(_summary_line(summary, recent, time.monotonic() - started), flush=True)
                except (OSError, ValueError) as exc:
                    print(f"    (the dashboards did not answer: {exc})", flush=True)
                last_line = time.monotonic()
            pipeline.procs.check_alive()
            stop.wait(0.5)
        print(flush=True)
        _say("stopping the traffic; waiting until every connection's last record is in the store")
        pipeline.stop_traffic()
        missing = pipeline.wait_settled(plan, timeout=30.0)
        try:
            since = f"{int(time.monotonic() - started) + 120}s"
            total = int(dashboards.get("summary", since=since)["flows"])
            records = dashboards.get("flows", since=since, limit="500")["rows"]
        except (OSError, ValueError) as exc:
            print(f"flowscope demo: could not read the store at the end: {exc}", file=sys.stderr)
        _say("stopping agents (final records), aggregator, collector and the relay")
    finally:
        pipeline.stop()
    _say(f"the collector received {total} aggregated records; the latest of each kind of connection:")
    shown = [_as_record(r) for r in _latest_rows(records)]
    pod_ips = {p.ip for p in pipeline.pods.values()}
    shown = [r for r in shown if r.get("sourceIPv4Address") in pod_ips]
    if args.json:
        for r in shown:
            print(json.dumps(r, sort_keys=True))
    else:
        _table(shown)
    if missing:
        for s in missing:
            print(f"flowscope demo: no complete record for: {s.what} ({s.target})", file=sys.stderr)
        return 1
    return 0


def _wait_first_flows(dashboards: _Dashboards, pipeline: Pipeline, stop: threading.Event, started: float,
                      timeout: float = 90.0) -> dict[str, Any]:
    """Until the store holds a record (progress on one line), or raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline and not stop.is_set():
        pipeline.procs.check_alive()
        try:
            s = dashboards.get("summary", since="10m")
            if s["flows"] > 0:
                return s
        except (OSError, ValueError) as exc:
            last_error = str(exc)
        print(f"    ... {time.monotonic() - started:4.0f}s", flush=True)
        stop.wait(2.0)
    if stop.is_set():
        return {}
    raise RuntimeError(f"no flow reached the store in {timeout:g}s ({last_error or 'the store is empty'}); "
                       f"logs in {pipeline.workdir}")


def _latest_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest stored row of each kind of connection (source, destination, port,
    protocol, Service: the steady traffic repeats each kind every round; rows come newest first)."""
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        key = (r.get("sourceIP"), r.get("destinationIP"), r.get("destinationTransportPort"),
               r.get("protocolIdentifier"), r.get("destinationServicePortName"))
        seen.setdefault(key, r)
    return list(seen.values())


def _as_record(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as the aggregated record's IE names (what the collector decoded)."""
    from flowscope.collector.rows import row_to_record

    out = row_to_record(row)
    out["correlation"] = row.get("correlation", "")
    return out


FLOW_TYPES = {1: "intra-node", 2: "inter-node", 3: "to-external", 4: "from-external"}
ACTIONS = {0: "", 1: "Allow", 2: "Drop", 3: "Reject"}


def _table(records: list[dict[str, Any]]) -> None:
    rows = [("source", "destination", "service", "type", "octets(src node)", "octets(dst node)", "rev octets", "policy")]
    for r in sorted(records, key=lambda r: (r.get("flowType", 0), r.get("destinationTransportPort", 0))):
        src = f"{r.get('sourcePodNamespace')}/{r.get('sourcePodName')}" if r.get("sourcePodName") else r.get("sourceIPv4Address", "")
        dst = (
            f"{r.get('destinationPodNamespace')}/{r.get('destinationPodName')}"
            if r.get("destinationPodName")
            else r.get("destinationIPv4Address", "")
        )
        policy = ""
        if r.get("ingressNetworkPolicyName") or r.get("ingressNetworkPolicyRuleAction"):
            policy = f"{ACTIONS.get(r.get('ingressNetworkPolicyRuleAction', 0), '?')} {r.get('ingressNetworkPolicyNamespace', '')}/{r.get('ingressNetworkPolicyName', '')}".strip()
        rows.append(
            (
                f"{src}:{r.get('sourceTransportPort')}",
                f"{dst}:{r.get('destinationTransportPort')}/{'tcp' if r.get('protocolIdentifier') == 6 else 'udp' if r.get('protocolIdentifier') == 17 else r.get('protocolIdentifier')}",
                r.get("destinationServicePortName", ""),
                FLOW_TYPES.get(r.get("flowType", 0), "?"),
                str(r.get("octetTotalCountFromSourceNode", "")),
                str(r.get("octetTotalCountFromDestinationNode", "")),
                str(r.get("reverseOctetTotalCount", "")),
                policy,
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))
