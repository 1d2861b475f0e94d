"""``flowscope collector --api`` over mutual TLS, with the aggregator's rule: loopback
open, any other address only with a bearer token, client certificates or --api-insecure.
A real collector process (chDB store) and real TLS handshakes on loopback; the refusals
happen before anything listens."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pki import make_pki

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mutual_tls_collector(tmp_path: Path, pki: dict[str, str], api: int, listen: int,
                         *more: str) -> Iterator[subprocess.Popen[str]]:
    """A ``flowscope collector`` (IPFIX on ``listen``, chDB in ``tmp_path``) whose --api on
    127.0.0.1:``api`` asks for client certificates, once it says it serves; afterwards
    stopped with SIGTERM, which it must end with exit status 0."""
    proc = subprocess.Popen([FLOWSCOPE, "collector", "--listen", f"127.0.0.1:{listen}", "--store",
                             f"chdb://{tmp_path}/store", *more, "--api", f"127.0.0.1:{api}", "--api-tls-cert",
                             pki["server_cert"], "--api-tls-key", pki["server_key"], "--api-tls-ca", pki["ca"]],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 90
        while True:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the collector exited"
            if f"API on https://127.0.0.1:{api}/api/v1 (client certificates required)" in line:
                break
            assert time.monotonic() < deadline, line
        yield proc
    finally:
        proc.terminate()
        proc.wait(60)
    assert proc.returncode == 0


def collector(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLOWSCOPE, "collector", "--listen", f"127.0.0.1:{free_port()}", "--store", "chdb://",
                           *args], capture_output=True, text=True, timeout=120)


def test_api_off_loopback_needs_a_token_or_client_certificates(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    open_ = collector("--api", "0.0.0.0:0")
    assert open_.returncode == 2 and "--api: '0.0.0.0' is reachable from other hosts" in open_.stderr
    # HTTPS without a client CA encrypts, but anyone may read: still refused
    tls_only = collector("--api", "0.0.0.0:0", "--api-tls-cert", pki["server_cert"], "--api-tls-key", pki["server_key"])
    assert tls_only.returncode == 2 and "reachable from other hosts" in tls_only.stderr
    half = collector("--api", "127.0.0.1:0", "--api-tls-cert", pki["server_cert"])
    assert half.returncode == 2 and "--api-tls-cert and --api-tls-key: give both" in half.stderr
    bad_ca = collector("--api", "127.0.0.1:0", "--api-tls-cert", pki["server_cert"], "--api-tls-key",
                       pki["server_key"], "--api-tls-ca", str(tmp_path / "missing.pem"))
    assert bad_ca.returncode == 2 and "--api-tls.caFile: cannot load" in bad_ca.stderr
    no_api = subprocess.run([FLOWSCOPE, "collector", "--listen", f"127.0.0.1:{free_port()}", "--store", "chdb://",
                             "--api-tls-ca", pki["ca"]], capture_output=True, text=True, timeout=60)
    assert no_api.returncode == 2 and "give --api HOST:PORT too" in no_api.stderr


def test_api_with_mutual_tls_serves_only_clients_with_a_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    api = free_port()
    with mutual_tls_collector(tmp_path, pki, api, free_port()):
        url = f"https://127.0.0.1:{api}/api/v1/schema"
        anonymous = ssl.create_default_context(cafile=pki["ca"])
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(url, context=anonymous, timeout=30).read()
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP is not served
            urllib.request.urlopen(f"http://127.0.0.1:{api}/api/v1/schema", timeout=30).read()
        client = ssl.create_default_context(cafile=pki["ca"])
        client.load_cert_chain(pki["client_cert"], pki["client_key"])
        with urllib.request.urlopen(url, context=client, timeout=30) as r:
            assert r.status == 200 and b"srcNamespace" in r.read()
