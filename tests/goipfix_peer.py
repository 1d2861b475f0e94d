"""go-ipfix's collector as a peer: ``ipfixdump`` from ../shared/tools/go-ipfix.

go-ipfix is the IPFIX library of Antrea's agent and Flow Aggregator, and its collector is
the one the design names. :class:`GoIpfixCollector` runs the prebuilt ``ipfixdump`` on
loopback (or inside a test's namespace, through ``prefix``), writes its JSON lines to a
file (a full pipe would block go-ipfix's channel and stop decoding silently) and reads
back the templates and data records it decoded, each field under go-ipfix's own name.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from conftest import shared_tool

_NAME = re.compile(r"^(.*)\((\d+)/(\d+)\)$")


def binary() -> str:
    return shared_tool("tools/go-ipfix/ipfixdump")


def _free_port(proto: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int, proto: str, prefix: list[str]) -> bool:
    """Is something bound to ``port`` (TCP: listening) in the namespace of ``prefix``?"""
    out = subprocess.run([*prefix, "ss", "-H", "-ln", "-u" if proto == "udp" else "-t"],
                         capture_output=True, text=True, check=False).stdout
    return any(line.split()[3].endswith(f":{port}") for line in out.splitlines() if len(line.split()) > 3)


class GoIpfixCollector:
    """``with GoIpfixCollector("tcp") as c: ... c.stop(); c.data()``"""

    def __init__(self, proto: str, *, host: str = "127.0.0.1", port: int | None = None,
                 prefix: list[str] | None = None) -> None:
        self.proto, self.host = proto, host
        self.port = port if port is not None else _free_port(proto)
        self.prefix = prefix or []
        self.dir = Path(tempfile.mkdtemp(prefix="goipfix-"))
        self.out_path, self.err_path = self.dir / "out.jsonl", self.dir / "err.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[dict[str, Any]] = []

    def __enter__(self) -> GoIpfixCollector:
        addr = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([*self.prefix, binary(), "-addr", addr, "-proto", self.proto, "-json",
                                          "-exit-after", "300s"], stdout=out, stderr=err)
        deadline = time.monotonic() + 20
        while not _listening(self.port, self.proto, self.prefix):
            assert self.proc.poll() is None, f"ipfixdump exited: {self.err_path.read_text()}"
            assert time.monotonic() < deadline, "ipfixdump did not start listening"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop it by its PID (SIGTERM: it prints its stats line and exits) and read its output."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.lines = self._read()

    def _read(self) -> list[dict[str, Any]]:
        if not self.out_path.exists():
            return []
        return [json.loads(line) for line in self.out_path.read_text().splitlines() if line.strip()]

    def poll(self) -> list[dict[str, Any]]:
        """What it printed so far (complete lines only)."""
        text = self.out_path.read_text() if self.out_path.exists() else ""
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]

    def count(self, kind: str = "DATA") -> int:
        return sum(1 for line in self.poll() if line.get("kind") == kind)

    @property
    def errors(self) -> str:
        return self.err_path.read_text() if self.err_path.exists() else ""

    @staticmethod
    def plain(fields: dict[str, Any]) -> dict[str, Any]:
        """Field names without go-ipfix's ``(PEN/id)`` suffix."""
        out = {}
        for key, value in fields.items():
            m = _NAME.match(key)
            out[m.group(1) if m else key] = value
        return out

    def templates(self) -> dict[int, list[str]]:
        """Template id -> element names in template order, as go-ipfix learned them."""
        return {line["tid"]: [self.plain({n: 0}).popitem()[0] for n in line["order"]]
                for line in self.lines if line.get("kind") == "TEMPLATE"}

    def data(self) -> list[tuple[int, dict[str, Any]]]:
        """(template id, record by go-ipfix's element names) for every data record decoded."""
        return [(line["tid"], self.plain(line["fields"])) for line in self.lines if line.get("kind") == "DATA"]

    def stats(self) -> dict[str, Any]:
        return next((line for line in self.lines if line.get("kind") == "STATS"), {})

    def cleanup(self) -> None:
        for p in (self.out_path, self.err_path):
            try:
                os.unlink(p)
            except OSError:
                pass
        try:
            self.dir.rmdir()
        except OSError:
            pass
