"""``flowscope collector`` and ``flowscope export`` as a user runs them: real processes,
loopback sockets, signals and exit codes. What the exporter reads is what the collector
prints, field for field, over TCP, UDP and mutual TLS; the collector's output replays
unchanged; bad input names its line and field; both stop cleanly on a signal."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ipfix"))
from ipfix_samples import agent_record  # noqa: E402
from pki import CA  # noqa: E402

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Collector:
    """A ``flowscope collector`` subprocess; stdout lines gathered by a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [FLOWSCOPE, "collector", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.err: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True).start()
        self.wait(lambda: any("listening on" in e for e in self.err) or self.proc.poll() is not None, "listening")
        assert self.proc.poll() is None, "".join(self.err)

    @staticmethod
    def _pump(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait(self, pred: Any, what: str, timeout: float = 15) -> None:
        end = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < end, f"timed out waiting for {what}; stderr: {''.join(self.err)}"
            time.sleep(0.02)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in list(self.lines) if x.startswith("{")]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def export(args: list[str], lines: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLOWSCOPE, "export", *args], input="".join(x + "\n" for x in lines), capture_output=True, text=True,
        timeout=timeout,
    )


def strip_meta(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if not k.startswith("_")}


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_what_export_reads_the_collector_prints_and_it_replays_unchanged(proto: str) -> None:
    port = free_port(socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
    listen = f"127.0.0.1:{port}" + (":udp" if proto == "udp" else "")  # tcp is the default
    sent = [agent_record(i, 4 if i % 3 else 6, unicode_names=(i % 11 == 0)) for i in range(150)]
    sent.append({"sourceIPv4Address": "192.0.2.1", "octetDeltaCount": 5, "unknown:4242:17": "beef"})
    with Collector("--listen", listen) as c:
        done = export(["--to", listen], [json.dumps(r) for r in sent])
        assert done.returncode == 0, done.stderr
        assert f"{len(sent)} records sent" in done.stderr and "with 3 templates" in done.stderr
        c.wait(lambda: len(c.records()) == len(sent), "every record")
        printed = c.records()
        assert [strip_meta(r) for r in printed] == sent
        assert {r["_templateId"] for r in printed} == {256, 257, 258}
        assert all(r["_exporter"].startswith("127.0.0.1:") and r["_observationDomainId"] == 0 for r in printed)

        # the collector's own output (with its underscore keys) replays as is
        again = export(["--to", listen, "--observation-domain", "9"], [json.dumps(r) for r in printed])
        assert again.returncode == 0, again.stderr
        c.wait(lambda: len(c.records()) == 2 * len(sent), "the replay")
        replayed = c.records()[len(sent):]
        assert [strip_meta(r) for r in replayed] == sent
        assert {r["_observationDomainId"] for r in replayed} == {9}
        assert c.stop(signal.SIGTERM) == 0
    summary = "".join(c.err)
    assert f"{2 * len(sent)} records" in summary and "0 malformed" in summary


def test_predefined_template_and_errors_naming_line_and_field() -> None:
    port = free_port()
    listen = f"127.0.0.1:{port}:tcp"
    good = [agent_record(i) for i in range(5)]
    missing = dict(agent_record(5))
    del missing["tcpState"]
    extra = dict(agent_record(6), sourceIPv6Address="fd00::1")
    bad_value = dict(agent_record(7), flowType=300)
    lines = [json.dumps(good[0]), json.dumps(missing), "", json.dumps(good[1]), json.dumps(extra), "{oops",
             json.dumps(bad_value)] + [json.dumps(r) for r in good[2:]]
    with Collector("--listen", listen) as c:
        done = export(["--to", listen, "--template", "agent-ipv4"], lines)
        assert done.returncode == 1, done.stderr  # some input rejected
        err = done.stderr
        assert "line 2: field 'tcpState' is missing; template agent-ipv4 needs all of its 43 fields" in err
        assert "line 5: field 'sourceIPv6Address' is not part of template agent-ipv4" in err
        assert "line 6: not valid JSON" in err
        assert "line 7: field 'flowType': 300 is out of range for unsigned8 (0..255)" in err
        assert "5 records sent" in err and "4 input lines rejected" in err
        c.wait(lambda: len(c.records()) == 5, "the good records")
        assert [strip_meta(r) for r in c.records()] == good
        assert {r["_templateId"] for r in c.records()} == {256}
        c.stop()


def test_usage_errors_and_an_unreachable_collector_have_their_exit_codes() -> None:
    r = subprocess.run([FLOWSCOPE, "collector", "--listen", "127.0.0.1:99999"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--listen: port '99999'" in r.stderr
    r = subprocess.run([FLOWSCOPE, "collector", "--listen", "127.0.0.1:4739:tls"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--tls-cert, --tls-key, --tls-ca must be given" in r.stderr
    r = subprocess.run([FLOWSCOPE, "export", "--to", "127.0.0.1:4739", "--tls-ca", "x"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "is not a tls address" in r.stderr
    r = subprocess.run([FLOWSCOPE, "export", "--to", "h:1", "--template", "nope"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "'nope' is not one of agent-ipv4" in r.stderr
    port = free_port()  # nobody listens
    r = export(["--to", f"127.0.0.1:{port}", "--connect-timeout", "1s"], [json.dumps(agent_record(1))])
    assert r.returncode == 3 and "cannot reach the collector" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = subprocess.run([FLOWSCOPE, "collector", "--listen", f"127.0.0.1:{busy.getsockname()[1]}"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 3 and "cannot listen" in r.stderr


def test_mutual_tls_from_the_command_line(tmp_path: Path) -> None:
    good, other = CA(tmp_path, "good"), CA(tmp_path, "other")
    server, client, stranger = good.issue("collector", server=True), good.issue("agent", server=False), other.issue("x", server=False)
    port = free_port()
    listen = f"127.0.0.1:{port}:tls"
    with Collector("--listen", listen, "--tls-cert", server.cert, "--tls-key", server.key, "--tls-ca", good.path) as c:
        sent = [agent_record(i) for i in range(20)]
        r = export(["--to", listen, "--tls-cert", client.cert, "--tls-key", client.key, "--tls-ca", good.path,
                    "--tls-server-name", "collector"], [json.dumps(x) for x in sent])
        assert r.returncode == 0, r.stderr
        c.wait(lambda: len(c.records()) == 20, "records over TLS")
        assert [strip_meta(x) for x in c.records()] == sent
        r = export(["--to", listen, "--tls-cert", stranger.cert, "--tls-key", stranger.key, "--tls-ca", good.path,
                    "--connect-timeout", "1s"], [json.dumps(agent_record(99))])
        assert r.returncode == 3, r.stderr
        c.stop()
    assert "TLS handshakes refused" in "".join(c.err) and len(c.records()) == 20


def test_table_format_shows_flows_readably() -> None:
    port = free_port()
    with Collector("--listen", f"127.0.0.1:{port}", "--format", "table") as c:
        r = export(["--to", f"127.0.0.1:{port}"], [json.dumps(agent_record(3))])
        assert r.returncode == 0, r.stderr
        c.wait(lambda: len(c.lines) >= 2, "header and row")
        header, row = c.lines[0], c.lines[1]
        assert header.split()[:4] == ["EXPORTER", "DOM", "TPL", "SOURCE"]
        rec = agent_record(3)
        assert f"{rec['sourceIPv4Address']}:{rec['sourceTransportPort']}" in row
        assert str(rec["octetTotalCount"]) in row and "sourcePodName=frontend-7d9f8b6c5-00003" in row
        c.stop()


def test_export_stops_on_sigint_after_flushing_what_it_read() -> None:
    port = free_port()
    with Collector("--listen", f"127.0.0.1:{port}") as c:
        proc = subprocess.Popen([FLOWSCOPE, "export", "--to", f"127.0.0.1:{port}"], stdin=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdin is not None
        sent = [agent_record(i) for i in range(1200)]  # more than one read batch
        proc.stdin.write("".join(json.dumps(r) + "\n" for r in sent))
        proc.stdin.flush()  # and keep stdin open: the exporter waits for more
        c.wait(lambda: len(c.records()) == 1200, "what was written so far")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 128 + signal.SIGINT
        assert proc.stderr is not None and "1200 records sent" in proc.stderr.read()
        proc.stdin.close()
        assert [strip_meta(r) for r in c.records()] == sent
        assert c.stop(signal.SIGINT) == 0


def test_collector_stdout_closed_early_ends_quietly() -> None:
    port = free_port()
    proc = subprocess.Popen([FLOWSCOPE, "collector", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None and "listening on" in proc.stderr.readline()
        assert proc.stdout is not None
        proc.stdout.close()  # like `| head -0`
        export(["--to", f"127.0.0.1:{port}"], [json.dumps(agent_record(i)) for i in range(3)])
        assert proc.wait(timeout=10) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_export_streams_more_records_than_its_queue_holds_without_losing_any(tmp_path: Path) -> None:
    n = 150_000  # more than the exporter's 65536-record queue: backpressure, not drops
    src = tmp_path / "many.jsonl"
    with src.open("w") as fh:
        for i in range(n):
            fh.write(f'{{"sourceTransportPort": {i % 65536}, "octetDeltaCount": {i}, "sourceIPv4Address": "10.1.{i // 256 % 256}.{i % 256}"}}\n')
    port = free_port()
    with Collector("--listen", f"127.0.0.1:{port}") as c:
        r = subprocess.run([FLOWSCOPE, "export", "--to", f"127.0.0.1:{port}", "--input", str(src)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"{n} records sent" in r.stderr and "0 records not delivered" in r.stderr
        c.wait(lambda: len(c.lines) >= n, "every record", timeout=60)
        got = sorted(json.loads(x)["octetDeltaCount"] for x in c.lines)
        assert got == list(range(n))
        c.stop()
