"""``flowscope flows --api https://...`` against a collector whose --api asks for client
certificates (mutual TLS, ``--api-tls-cert/-key/-ca``): a real collector process with a
chDB store, the demo's records sent to it over IPFIX/TCP by ``flowscope export``, and real
TLS handshakes on loopback. With the client options it reads what was sent; without a
certificate, with one from another CA, or not trusting the collector's certificate, the
handshake is refused and says so in one line (exit 3); a missing or unreadable file is one
line before anything connects (exit 2)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from test_collector_api_tls import mutual_tls_collector
from test_collector_cli import FLOWSCOPE, free_port

from pki import CA, make_pki

pytestmark = [pytest.mark.timeout(150)]

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo-flows.jsonl"


class Ran(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def flows(capsys: pytest.CaptureFixture[str], *args: str) -> Ran:
    """``flowscope flows ARGS`` through the command's own entry point, in this process (the
    handshakes are real; no interpreter is started per call)."""
    from flowscope.cli import main

    code = main(["flows", *args])
    out = capsys.readouterr()
    return Ran(code, out.out, out.err)


def one_line(p: Ran) -> str:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("flowscope flows: "), lines[0]
    return lines[0]


def test_flows_presents_a_client_certificate_to_a_mutual_tls_collector(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = make_pki(tmp_path)
    impostor = CA(tmp_path, "impostor").issue("intruder", server=False, names=("intruder",))
    listen, api = free_port(), free_port()
    url = f"https://127.0.0.1:{api}"
    mine = ("--api-tls-cert", pki["client_cert"], "--api-tls-key", pki["client_key"], "--api-tls-ca", pki["ca"])
    with mutual_tls_collector(tmp_path, pki, api, listen, "--commit-interval", "200ms"):
        exp = subprocess.run([FLOWSCOPE, "export", "--to", f"127.0.0.1:{listen}", "--input", str(DEMO)],
                             capture_output=True, text=True, timeout=60)
        assert exp.returncode == 0, exp.stderr
        records = [json.loads(x) for x in DEMO.read_text().splitlines() if x.strip()]
        deadline = time.monotonic() + 30
        while True:  # the collector commits every 200ms: wait until it has them all
            got = flows(capsys, "--api", url, *mine, "-o", "json", "--limit", "100")
            assert got.returncode == 0, got.stderr
            rows = [json.loads(x) for x in got.stdout.splitlines()]
            if len(rows) == len(records):
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.1)
        assert sorted(r["octetTotalCount"] for r in rows) == sorted(r["octetTotalCount"] for r in records)
        top = flows(capsys, "--api", url, *mine, "--top", "1", "--group", "namespace", "-o", "json")
        assert top.returncode == 0 and json.loads(top.stdout)["entries"], top.stderr

        # No client certificate: the collector refuses the handshake.
        bare = flows(capsys, "--api", url, "--api-tls-ca", pki["ca"])
        assert bare.returncode == 3
        assert "the collector asks for a client certificate (the TLS connection closed without an answer" in one_line(bare)
        # A certificate another CA signed: refused too, and said to be ours that was refused.
        other = flows(capsys, "--api", url, "--api-tls-cert", impostor.cert, "--api-tls-key", impostor.key,
                      "--api-tls-ca", pki["ca"])
        assert other.returncode == 3
        assert "the collector refused our client certificate" in one_line(other)
        # Not trusting the collector's certificate (the system's CAs did not sign it).
        untrusted = flows(capsys, "--api", url, "--api-tls-cert", pki["client_cert"], "--api-tls-key", pki["client_key"])
        assert untrusted.returncode == 3
        assert "the collector's certificate is not trusted" in one_line(untrusted)
        assert "give --api-tls-ca" in untrusted.stderr


def test_bad_client_tls_options_are_one_line_before_anything_connects(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*args: str) -> tuple[int, str]:
        p = flows(capsys, *args)
        return p.returncode, one_line(p)

    pki = make_pki(tmp_path)
    url = f"https://127.0.0.1:{free_port()}"  # nothing listens: these must fail before connecting
    missing = str(tmp_path / "missing.pem")
    unreadable = tmp_path / "unreadable.pem"
    unreadable.mkdir()  # a directory: unreadable as a file even for root
    cases = [
        (("--api-tls-cert", missing, "--api-tls-key", pki["client_key"]), f"--api-tls-cert: cannot read {missing!r}"),
        (("--api-tls-cert", pki["client_cert"], "--api-tls-key", missing), f"--api-tls-key: cannot read {missing!r}"),
        (("--api-tls-ca", missing), f"--api-tls-ca: cannot read {missing!r}"),
        (("--api-tls-ca", str(unreadable)), f"--api-tls-ca: cannot read {str(unreadable)!r}"),
        (("--api-tls-cert", pki["client_cert"]), "--api-tls-cert and --api-tls-key: give both"),
        (("--api-tls-cert", pki["client_key"], "--api-tls-key", pki["client_key"]),
         "are not a PEM certificate and its private key"),
        (("--api-tls-ca", pki["client_key"]), "holds no PEM CA certificate"),
    ]
    for options, words in cases:
        code, line = run("--api", url, *options)
        assert code == 2 and words in line, (options, line)
    code, line = run("--api", url.replace("https", "http"), "--api-tls-ca", pki["ca"])
    assert code == 2 and "are for --api https://" in line
    code, line = run("--store", f"chdb://{tmp_path}/s", "--api-tls-ca", pki["ca"])
    assert code == 2 and "are for --api https://HOST:PORT" in line
