"""The harness of the hostile-peer tests: a real aggregator process, a legitimate exporter,
and what the tests measure (resident memory, health-check latency, records delivered).

The aggregator runs as ``flowscope aggregator --config`` in a subprocess, so its memory
is its own (``/proc/PID/status``), its health check is the real ``/healthz`` of its
``metricsAddress``, and a crash shows as an exit. The legitimate exporter is our
ExportingProcess in the test's event loop, sending agent records with distinct flow keys,
so the aggregator's ``receivedByExporter`` counts exactly what arrived. Hostile peers bind
127.0.0.2 (all of 127/8 is loopback on Linux), so per-source limits can tell them from
the legitimate exporter on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from flowscope.ipfix import Template
from flowscope.ipfix.address import Address
from flowscope.ipfix.antrea import agent_fields
from flowscope.ipfix.exporting import ExportingProcess
from flowscope.ipfix.transport import TLSConfig

T0 = 1_780_000_000
HOSTILE = "127.0.0.2"
GOOD = "127.0.0.1"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def raise_fd_limit(want: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def agent_record(i: int, *, pod: str = "frontend", **extra: Any) -> dict[str, Any]:
    """A complete (to-external) agent record of flow ``i``: one flow per ``i``."""
    rec: dict[str, Any] = {
        "flowStartSeconds": T0, "flowEndSeconds": T0 + 5, "flowEndReason": 2,
        "sourceIPv4Address": f"10.1.{i // 250 % 250}.{i % 250 + 1}", "destinationIPv4Address": "8.8.8.8",
        "sourceTransportPort": 10000 + i % 50000, "destinationTransportPort": 53 + i // 50000,
        "protocolIdentifier": 17,
        "packetTotalCount": 2, "octetTotalCount": 200, "packetDeltaCount": 2, "octetDeltaCount": 200,
        "reversePacketTotalCount": 1, "reverseOctetTotalCount": 100, "reversePacketDeltaCount": 1,
        "reverseOctetDeltaCount": 100, "destinationClusterIPv4": "0.0.0.0", "tcpState": "", "flowType": 3,
        "sourcePodNamespace": "shop", "sourcePodName": pod, "sourceNodeName": "node-a",
        "destinationPodNamespace": "", "destinationPodName": "", "destinationNodeName": "",
        "destinationServicePort": 0, "destinationServicePortName": "",
        "ingressNetworkPolicyName": "", "ingressNetworkPolicyNamespace": "", "ingressNetworkPolicyType": 0,
        "ingressNetworkPolicyRuleName": "", "ingressNetworkPolicyRuleAction": 0,
        "egressNetworkPolicyName": "", "egressNetworkPolicyNamespace": "", "egressNetworkPolicyType": 0,
        "egressNetworkPolicyRuleName": "", "egressNetworkPolicyRuleAction": 0,
        # the elements Antrea v2.7's agents add (agent_fields), empty here
        "destinationServiceIPv4": "0.0.0.0", "proxySnatIPv4": "0.0.0.0", "proxySnatPort": 0,
        "egressName": "", "egressIP": "", "egressNodeName": "",
    }
    rec.update(extra)
    return rec


def agent_templates() -> list[Template]:
    return [Template.build(256, agent_fields(4))]


async def until(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(step)


class Aggregator:
    """``flowscope aggregator`` in a subprocess on loopback ports of its own."""

    def __init__(self, transport: str = "tcp", *, pki: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None, nofile: int | None = None,
                 workdir: Path | None = None) -> None:
        self.transport = transport
        self.port = free_port(socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM)
        self.api_port = free_port()
        self.metrics_port = free_port()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="hostile-agg-"))
        config: dict[str, Any] = {
            "aggregatorTransportProtocol": transport, "listenAddress": "127.0.0.1", "listenPort": self.port,
            "apiAddress": f"127.0.0.1:{self.api_port}", "metricsAddress": f"127.0.0.1:{self.metrics_port}",
            "flowExportInterval": "600s", "inactiveFlowTimeout": "600s", "flowAggregatorAddress": "127.0.0.1",
        }
        if pki is not None:
            config["tls"] = {"caFile": pki["ca"], "certFile": pki["server_cert"], "keyFile": pki["server_key"]}
        for key, value in (extra or {}).items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key].update(value)
            else:
                config[key] = value
        self.config = config
        self.nofile = nofile
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "aggregator.log"

    def start(self, timeout: float = 30.0) -> Aggregator:
        """Start it; ports picked free in __init__ that another process took meanwhile
        ("address already in use") are picked again, up to three times."""
        for attempt in range(3):
            try:
                return self._start(timeout)
            except AssertionError as exc:
                if "already in use" not in str(exc) or attempt == 2:
                    raise
                self._new_ports()
        raise AssertionError("unreachable")

    def _new_ports(self) -> None:
        old = (self.port, self.api_port, self.metrics_port)
        self.port = free_port(socket.SOCK_DGRAM if self.transport == "udp" else socket.SOCK_STREAM)
        self.api_port, self.metrics_port = free_port(), free_port()
        c = self.config
        c["listenPort"] = self.port if c.get("listenPort") == old[0] else c.get("listenPort")
        for key, before, after in (("apiAddress", old[1], self.api_port), ("metricsAddress", old[2], self.metrics_port)):
            value = c.get(key)
            if isinstance(value, str) and value.endswith(f":{before}"):
                c[key] = value[: -len(str(before))] + str(after)

    def _start(self, timeout: float) -> Aggregator:
        path = self.dir / "aggregator.yaml"
        path.write_text(yaml.safe_dump(self.config))
        nofile = self.nofile

        def limits() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowscope", "aggregator", "--config", str(path), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), preexec_fn=limits, env=env)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"the aggregator exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                self.healthz(1.0)
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the aggregator did not answer /healthz")

    def stop(self, sig: int = 15, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def healthz(self, timeout: float = 5.0) -> float:
        """Seconds /healthz took to answer "ok" on the metrics port."""
        start = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=timeout) as r:
            assert r.read() == b"ok\n"
        return time.perf_counter() - start

    def api(self, path: str, *, token: str | None = None, timeout: float = 10.0) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def metrics(self, token: str | None = None) -> dict[str, Any]:
        return self.api("/recordmetrics", token=token)  # type: ignore[no-any-return]

    def received_from(self, host: str, token: str | None = None) -> int:
        return int(self.metrics(token)["receivedByExporter"].get(host, 0))

    def log_lines(self) -> int:
        return len(self.log.read_text(errors="replace").splitlines())


class HealthProbe:
    """Polls /healthz in a thread while a hostile peer works; keeps the worst latency and
    the failures (a timeout counts as the timeout)."""

    def __init__(self, agg: Aggregator, timeout: float = 5.0, interval: float = 0.1) -> None:
        self.agg, self.timeout, self.interval = agg, timeout, interval
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop:
            try:
                self.latencies.append(await asyncio.to_thread(self.agg.healthz, self.timeout))
            except OSError:
                self.failures += 1
                self.latencies.append(self.timeout)
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> HealthProbe:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        assert self._task is not None
        await self._task

    @property
    def worst(self) -> float:
        return max(self.latencies) if self.latencies else 0.0


async def good_exporter(agg: Aggregator, n: int, *, start: int = 0, pki: dict[str, str] | None = None,
                        batch: int = 100) -> ExportingProcess:
    """A legitimate exporter from 127.0.0.1 that submits ``n`` records (flows start..start+n)."""
    tls = None
    if pki is not None:
        tls = TLSConfig(pki["client_cert"], pki["client_key"], pki["ca"], server_name="127.0.0.1")
    e = ExportingProcess(Address(GOOD, agg.port, agg.transport), tls=tls, templates=agent_templates(),
                         backoff_initial=0.2, backoff_max=1.0, connect_timeout=5.0)
    await e.start()
    for lo in range(start, start + n, batch):
        assert e.submit(256, [agent_record(i) for i in range(lo, min(lo + batch, start + n))])
    return e


def report(name: str, **numbers: Any) -> None:
    """The measured numbers of a case, printed (pytest -s, or the captured output of a failure)."""
    print(f"HOSTILE {name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in numbers.items()))


# --------------------------------------------------------------------------- message fuzzing


def valid_messages() -> list[bytes]:
    """A template message and data messages of the agent template, the seeds of mutation."""
    from flowscope.ipfix import ExportSession

    session = ExportSession(7)
    for t in agent_templates():
        session.add_template(t)
    out = session.encode_templates(T0)
    for k in range(8):
        out += session.encode_records(256, [agent_record(900_000 + k * 10 + i, pod="p" * (5 + 60 * i))
                                            for i in range(5)], T0)
    return out


def mutations(n: int, seed: int = 10) -> list[bytes]:
    """``n`` mutated messages: flipped octets, truncations, splices, lies in the length
    fields of the header, a set or a template, random tails. Deterministic for a seed."""
    import random
    import struct

    rng = random.Random(seed)
    seeds = valid_messages()
    out: list[bytes] = []
    for _ in range(n):
        m = bytearray(rng.choice(seeds))
        kind = rng.randrange(7)
        if kind == 0:  # flip a few octets anywhere
            for _ in range(rng.randint(1, 8)):
                m[rng.randrange(len(m))] = rng.randrange(256)
        elif kind == 1:  # truncate (and keep or fix the header length)
            m = m[: rng.randrange(4, len(m))]
            if rng.random() < 0.5:
                struct.pack_into("!H", m, 2, len(m))
        elif kind == 2:  # splice two messages
            other = rng.choice(seeds)
            cut = rng.randrange(16, len(m))
            m = m[:cut] + other[rng.randrange(16, len(other)):]
            struct.pack_into("!H", m, 2, min(len(m), 65535))
        elif kind == 3 and len(m) > 20:  # a set length that lies
            struct.pack_into("!H", m, 18, rng.choice([0, 1, 3, 4, 5, len(m), 65535, rng.randrange(65536)]))
        elif kind == 4 and len(m) > 24:  # a field count or template id that lies
            struct.pack_into("!HH", m, 20, rng.randrange(65536), rng.randrange(65536))
        elif kind == 5:  # random sequence number and domain
            struct.pack_into("!II", m, 8, rng.randrange(2**32), rng.randrange(2**32))
        else:  # random tail
            m = m[:16] + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
            struct.pack_into("!H", m, 2, len(m))
        out.append(bytes(m))
    return out


async def settled(agg: Aggregator) -> None:
    """Until the aggregator has decoded every datagram that reached it (the count stands still)."""
    last = -1
    while True:
        now = agg.metrics()["collectingProcess"]["messages"]
        if now == last:
            return
        last = now
        await asyncio.sleep(0.5)


async def fuzz_tcp(port: int, messages: list[bytes], *, per_session: int = 1, host: str = HOSTILE,
                   concurrency: int = 48, wait: float = 2.0) -> int:
    """Send the messages over TCP, ``per_session`` in each session after the valid template
    message (a malformed message ends its session, so each mutated message gets its own by
    default); ``concurrency`` sessions at a time, each given up after ``wait`` seconds.
    Returns the sessions used."""
    prefix = valid_messages()[0]
    sessions = 0
    sem = asyncio.Semaphore(concurrency)

    async def one(lo: int) -> None:
        nonlocal sessions
        async with sem:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(host, 0))
            except OSError:
                return
            sessions += 1
            try:
                writer.write(prefix + b"".join(messages[lo:lo + per_session]))
                await asyncio.wait_for(writer.drain(), 5)
                writer.write_eof()
                # until the aggregator closes (a session held back by the compile budget is given up)
                await asyncio.wait_for(reader.read(), wait)
            except (OSError, asyncio.TimeoutError):
                pass
            writer.close()

    await asyncio.gather(*(one(lo) for lo in range(0, len(messages), per_session)))
    return sessions


def fuzz_udp(port: int, messages: list[bytes], *, host: str = HOSTILE, pace_every: int = 200,
             pause: float = 0.002) -> None:
    """Send each message as a datagram from one socket, pausing briefly every ``pace_every``
    datagrams (a burst larger than the socket buffer is loss, not a test of the decoder)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    try:
        for i, m in enumerate(messages):
            s.sendto(m, ("127.0.0.1", port))
            if i % pace_every == pace_every - 1:
                time.sleep(pause)
    finally:
        s.close()
