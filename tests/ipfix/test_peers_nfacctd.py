"""Conformance with pmacct's nfacctd: every element of the design's agent tables that our
exporting process sends over UDP (IPv4 and IPv6 records, IANA, RFC 5103 reverse and
Antrea enterprise elements, variable-length strings included) comes out of nfacctd's
print plugin with the value we submitted.

nfacctd knows no Antrea elements, so each element is declared in an
``aggregate_primitives`` file (``field_type=56506:101 len=vlen semantics=str`` and the
like) and all of them are aggregated on, which makes every record its own line of JSON.
nfacctd listens on UDP only, so this peer covers our UDP path.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool
from ipfix_samples import agent_record

from flowscope.ipfix import Address, Template, default_registry
from flowscope.ipfix.antrea import AGENT_IPV4_FIELDS, AGENT_IPV6_FIELDS
from flowscope.ipfix.exporting import ExportingProcess

pytestmark = pytest.mark.peer


def primitive(name: str) -> str:
    return "f_" + name.lower()


def primitives_file(names: list[str]) -> str:
    reg = default_registry()
    lines = []
    for name in names:
        ie = reg.get(name)
        field_type = f"{ie.pen}:{ie.element_id}" if ie.pen else str(ie.element_id)
        dt = ie.data_type.name
        if dt == "string":
            length, semantics = "vlen", "str"
        elif dt in ("ipv4Address", "ipv6Address"):
            length, semantics = str(ie.data_type.default_length), "ip"
        else:
            length, semantics = str(ie.data_type.default_length), "u_int"
        lines.append(f"name={primitive(name)} field_type={field_type} len={length} semantics={semantics}")
    return "\n".join(lines) + "\n"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(pred: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_nfacctd_decodes_every_agent_field_we_export(tmp_path: Path) -> None:
    require_tool("nfacctd")
    names = list(dict.fromkeys(AGENT_IPV4_FIELDS + AGENT_IPV6_FIELDS))
    (tmp_path / "primitives.lst").write_text(primitives_file(names))
    out = tmp_path / "records.json"
    port = free_udp_port()
    (tmp_path / "nfacctd.conf").write_text(
        "daemonize: false\n"
        f"nfacctd_ip: 127.0.0.1\nnfacctd_port: {port}\n"
        f"aggregate_primitives: {tmp_path / 'primitives.lst'}\n"
        "plugins: print[out]\n"
        f"aggregate[out]: {', '.join(primitive(n) for n in names)}\n"
        "print_output[out]: json\n"
        f"print_output_file[out]: {out}\n"
        "print_output_file_append[out]: true\n"
        "print_refresh_time[out]: 1\n"
        "print_cache_entries[out]: 1031\n"
    )
    log = tmp_path / "nfacctd.log"
    with log.open("wb") as log_fh:
        proc = subprocess.Popen(
            ["nfacctd", "-f", str(tmp_path / "nfacctd.conf")], stdout=log_fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        await wait_for(lambda: b"waiting for NetFlow/IPFIX data" in log.read_bytes() or proc.poll() is not None,
                       20, "nfacctd to listen")
        assert proc.poll() is None, log.read_text()

        v4 = [agent_record(i, 4) for i in range(30)]
        v6 = [agent_record(i, 6) for i in range(30, 60)]
        for r in (v4 + v6)[::3]:
            r["destinationPodName"] = r["egressNetworkPolicyRuleName"] = ""
        t4, t6 = Template.build(256, AGENT_IPV4_FIELDS), Template.build(257, AGENT_IPV6_FIELDS)
        e = ExportingProcess(Address("127.0.0.1", port, "udp"), tls=None, templates=[t4, t6])
        await e.start()
        e.submit(256, v4)
        e.submit(257, v6)
        assert await e.flush(timeout=5)
        await e.close()
        assert e.stats.records_sent == 60 and e.stats.send_errors == 0

        def lines() -> list[dict[str, Any]]:
            return [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.exists() else []

        await wait_for(lambda: len(lines()) >= 60, 20, "nfacctd to print 60 records")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # nfacctd stops on SIGINT, not SIGTERM
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group we started: nfacctd and its plugin
                proc.wait()

    got = lines()
    assert len(got) == 60
    by_start = {int(r[primitive("flowStartSeconds")]): r for r in got}
    reg = default_registry()
    for sent in v4 + v6:
        theirs = by_start[sent["flowStartSeconds"]]
        for name, value in sent.items():
            text = theirs[primitive(name)]
            if reg.get(name).data_type.name.startswith(("unsigned", "dateTime")):
                assert int(text) == value, (name, value, text)
            else:
                assert text == value, (name, value, text)
        assert theirs["bytes"] == sent["octetDeltaCount"] and theirs["packets"] == sent["packetDeltaCount"]
