"""go-ipfix's collector as a peer: ``ipfixdump`` from ../shared/tools/go-ipfix.

go-ipfix is the IPFIX library of Antrea's agent and Flow Aggregator, and its collector is
the one the design names (the prebuilt one is v0.16.0: it does not know Antrea's elements
168-172, destinationServiceIPv4/6 and proxySnat*, which it shows by number and as raw
octets). :class:`GoIpfixCollector` runs the prebuilt ``ipfixdump`` on
loopback (or inside a test's namespace, through ``prefix``), writes its JSON lines to a
file (a full pipe would block go-ipfix's channel and stop decoding silently) and reads
back the templates and data records it decoded, each field under go-ipfix's own name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
        self._errors = ""

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
        """Stop it, keep what it printed in memory and remove its directory (nothing of a
        test run is left in /tmp)."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

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
        self._errors = self.err_path.read_text() if self.err_path.exists() else self._errors

    def _read(self) -> list[dict[str, Any]]:
        if not self.out_path.exists():
            return []
        return [json.loads(line) for line in self.out_path.read_text().splitlines() if line.strip()]

    def poll(self) -> list[dict[str, Any]]:
        """What it printed so far (complete lines only; once stopped, all it printed)."""
        if not self.out_path.exists():
            return self.lines
        text = self.out_path.read_text()
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]

    def count(self, kind: str = "DATA") -> int:
        return sum(1 for line in self.poll() if line.get("kind") == kind)

    @property
    def errors(self) -> str:
        return self.err_path.read_text() if self.err_path.exists() else self._errors

    @staticmethod
    def plain(fields: dict[str, Any], values: bool = True) -> dict[str, Any]:
        """Field names without go-ipfix's ``(PEN/id)`` suffix. An element this go-ipfix
        (v0.16.0) does not know, ``unknown(56506/168)``, comes as hex octets: it is named
        and read here by its id, as for tshark (ids and values compared)."""
        from flowscope.ipfix import default_registry

        reg = default_registry()
        out = {}
        for key, value in fields.items():
            m = _NAME.match(key)
            if not m:
                out[key] = value
                continue
            if m.group(1) != "unknown":
                out[m.group(1)] = value
                continue
            ie = reg.by_id(int(m.group(2)), int(m.group(3)))
            if values:
                raw = bytes.fromhex(value)
                t = ie.data_type.name
                if t.startswith("unsigned"):
                    value = int.from_bytes(raw, "big")
                elif t in ("ipv4Address", "ipv6Address"):
                    value = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
                elif t == "string":
                    value = raw.decode()
                else:
                    value = raw
            out[ie.name] = value
        return out

    def templates(self) -> dict[int, list[str]]:
        """Template id -> element names in template order, as go-ipfix learned them."""
        return {line["tid"]: [next(iter(self.plain({n: ""}, values=False))) for n in line["order"]]
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


# --------------------------------------------------------------------------- what go-ipfix can read


def framed(stream: bytes) -> list[bytes]:
    """A TCP byte stream cut into its IPFIX messages (the header says each one's length)."""
    out, off = [], 0
    while off + 4 <= len(stream):
        length = int.from_bytes(stream[off + 2:off + 4], "big")
        assert length >= 16, f"message at octet {off} claims {length} octets"
        out.append(stream[off:off + length])
        off += length
    assert off == len(stream), f"{len(stream) - off} octets after the last whole message"
    return out


def check_readable_by_go_ipfix(messages: list[bytes]) -> dict[str, int]:
    """Every message holds exactly one set filling it; a template set exactly one template
    record (no padding after it); a data set only whole records (no padding), each field of
    a template at its element's default length; no options template. Returns counts."""
    from flowscope.ipfix import Decoder, DataSet, TemplateSet, default_registry

    reg = default_registry()
    decoder = Decoder()
    counts = {"messages": 0, "template_sets": 0, "data_sets": 0, "records": 0}
    for m in messages:
        counts["messages"] += 1
        assert int.from_bytes(m[0:2], "big") == 10 and int.from_bytes(m[2:4], "big") == len(m)
        set_id, set_len = int.from_bytes(m[16:18], "big"), int.from_bytes(m[18:20], "big")
        assert 16 + set_len == len(m), f"message of {len(m)} octets holds more than its first set ({set_len})"
        assert set_id != 3, "an options template set (go-ipfix reads it as data and closes the session)"
        msg = decoder.decode(m)
        assert len(msg.sets) == 1
        s = msg.sets[0]
        if set_id == 2:
            assert isinstance(s, TemplateSet) and len(s.templates) == 1 and not s.withdrawals, "one template a set"
            t = s.templates[0]
            assert 4 + len(t.to_bytes()) == set_len, "padding after the template record"
            for f in t.fields:
                assert f.length == reg.by_id(f.ie.pen, f.ie.element_id).default_length, f"{f.ie.name}: reduced size"
            counts["template_sets"] += 1
        else:
            assert isinstance(s, DataSet)
            assert 4 + sum(len(s.template.encode_record(r)) for r in s.records) == set_len, "padding in a data set"
            counts["data_sets"] += 1
            counts["records"] += len(s.records)
    return counts


class RecordingProxy:
    """Forwards an exporter's IPFIX (TCP or UDP) to ``upstream`` on loopback and keeps every
    octet it passed, per TCP connection or per datagram, for :func:`check_readable_by_go_ipfix`.
    Started inside a network namespace (``with in_netns(...)``), it listens there and still
    forwards to the upstream port on the test's own loopback."""

    def __init__(self, proto: str, upstream_port: int) -> None:
        self.proto, self.upstream_port = proto, upstream_port
        self.streams: list[bytearray] = []
        self.datagrams: list[bytes] = []
        self.port = 0
        self._server: Any = None
        self._udp: Any = None
        self._up: Any = None

    async def start(self) -> RecordingProxy:
        import asyncio

        loop = asyncio.get_running_loop()
        if self.proto == "udp":
            proxy = self

            class _Datagrams(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: Any) -> None:
                    proxy.datagrams.append(data)
                    if proxy._up is None:  # made here, not in start(): in the test's own namespace
                        proxy._up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        proxy._up.connect(("127.0.0.1", proxy.upstream_port))
                    proxy._up.send(data)

            self._udp, _ = await loop.create_datagram_endpoint(_Datagrams, local_addr=("127.0.0.1", 0))
            self.port = self._udp.get_extra_info("socket").getsockname()[1]
        else:
            async def relay(reader: Any, writer: Any) -> None:
                buf = bytearray()
                self.streams.append(buf)
                up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

                async def back() -> None:  # the collector closing its side closes ours
                    await up_r.read()
                    writer.close()

                closer = asyncio.ensure_future(back())
                try:
                    while chunk := await reader.read(65536):
                        buf += chunk
                        up_w.write(chunk)
                        await up_w.drain()
                except (ConnectionError, OSError):
                    pass
                finally:
                    up_w.close()
                    closer.cancel()
                    writer.close()

            self._server = await asyncio.start_server(relay, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    def messages(self) -> list[bytes]:
        if self.proto == "udp":
            return list(self.datagrams)
        return [m for s in self.streams for m in framed(bytes(s))]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._udp is not None:
            self._udp.close()
        if self._up is not None:
            self._up.close()

    def records(self) -> list[tuple[int, dict[str, Any]]]:
        """What went through, decoded by our decoder: (template id, record)."""
        from flowscope.ipfix import Decoder

        out: list[tuple[int, dict[str, Any]]] = []
        sessions = [[d for d in self.datagrams]] if self.proto == "udp" else [framed(bytes(s)) for s in self.streams]
        for messages in sessions:
            decoder = Decoder()
            for m in messages:
                out += [(t.template_id, r) for t, r in decoder.decode(m).data_records()]
        return out
