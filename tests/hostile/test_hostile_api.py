"""Hostile HTTP clients against a real aggregator process (issue 10, case 6): the API asks
for credentials (a bearer token, or client certificates over HTTPS), probes and scrapers
need none on metricsAddress, clients that request and never read cost bounded memory and
are dropped after the write timeout, and under file-descriptor exhaustion the health check
still answers and the log stays short."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from hostile_peers import GOOD, Aggregator, HealthProbe, good_exporter, raise_fd_limit, report, until
from pki import CA, make_pki

HEALTH_BOUND = 2.0
TOKEN = "s3cr3t-token-0123456789abcdef"

pytestmark = pytest.mark.slow  # real aggregator processes, seconds each


def _status(url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10,
                                    context=context) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def _fill(agg: Aggregator, n: int, token: str | None = None) -> None:
    exporter = await good_exporter(agg, n, batch=500)
    await until(lambda: agg.received_from(GOOD, token) == n, 60, f"{n} records in the store")
    await exporter.close()


def test_6_the_api_needs_the_token_but_health_and_metrics_do_not(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    agg = Aggregator("tcp", extra={"apiAddress": "", "api": {"tokenFile": str(token_file)}})
    agg.config["apiAddress"] = f"127.0.0.1:{agg.api_port}"
    agg.start()
    try:
        api = f"http://127.0.0.1:{agg.api_port}"
        assert _status(api + "/flowrecords") == 401
        assert _status(api + "/flowrecords", {"Authorization": "Bearer wrong-token-0123456789"}) == 401
        assert _status(api + "/flowrecords", {"Authorization": f"Bearer {TOKEN}"}) == 200
        assert _status(api + "/recordmetrics") == 401
        assert _status(api + "/healthz") == 200  # public on the API port too
        metrics = f"http://127.0.0.1:{agg.metrics_port}"
        assert _status(metrics + "/metrics") == 200 and _status(metrics + "/healthz") == 200
        assert _status(metrics + "/flowrecords") == 404  # no flows on the metrics port
        cli = subprocess.run([sys.executable, "-m", "flowscope", "aggregator", "recordmetrics", "--server", api,
                              "--token-file", str(token_file), "-o", "json"], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0 and "numRecordsReceived" in json.loads(cli.stdout)
        cli = subprocess.run([sys.executable, "-m", "flowscope", "aggregator", "recordmetrics", "--server", api],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode != 0 and "bearer token" in cli.stderr
    finally:
        agg.stop()


def test_6_https_with_client_certificates_refuses_clients_without_one(tmp_path):
    (tmp_path / "pki").mkdir()
    (tmp_path / "other").mkdir()
    pki = make_pki(tmp_path / "pki", server_names=("127.0.0.1",))
    other = CA(tmp_path / "other", "impostor").issue("client", server=False, names=("x",), cn="x")
    agg = Aggregator("tcp", extra={"apiAddress": "", "api": {"tls": {
        "certFile": pki["server_cert"], "keyFile": pki["server_key"], "caFile": pki["ca"]}}})
    agg.config["apiAddress"] = f"0.0.0.0:{agg.api_port}"  # all interfaces: allowed, clients are authenticated
    agg.start()
    try:
        url = f"https://127.0.0.1:{agg.api_port}/recordmetrics"
        ctx = ssl.create_default_context(cafile=pki["ca"])
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _status(url, context=ctx)  # no client certificate
        bad = ssl.create_default_context(cafile=pki["ca"])
        bad.load_cert_chain(other.cert, other.key)
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _status(url, context=bad)  # signed by another CA
        cli = subprocess.run([sys.executable, "-m", "flowscope", "aggregator", "flowrecords", "--server",
                              f"https://127.0.0.1:{agg.api_port}", "--cacert", pki["ca"], "--cert", pki["client_cert"],
                              "--key", pki["client_key"], "-o", "json"], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout) == []
    finally:
        agg.stop()


async def test_6_clients_that_never_read_cost_bounded_memory_and_are_dropped():
    agg = Aggregator("tcp", extra={"api": {"writeTimeout": "3s"}}).start()
    socks: list[socket.socket] = []
    try:
        await _fill(agg, 20_000)
        base = agg.rss_mb()
        async with HealthProbe(agg) as probe:
            for _ in range(50):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(("127.0.0.1", agg.api_port))
                s.sendall(b"GET /flowrecords HTTP/1.1\r\nHost: x\r\n\r\n")
                socks.append(s)
            await until(lambda: agg.metrics()["api"]["writeTimeouts"] >= 50 - 1, 60, "the stalled clients dropped")
            peak = agg.rss_mb()
        # and a reader still gets the whole (capped) answer
        doc = await asyncio.to_thread(agg.api, "/flowrecords")
        report("api-slow-readers", rss_before_mb=base, rss_peak_mb=peak, health_worst_s=probe.worst,
               write_timeouts=agg.metrics()["api"]["writeTimeouts"], records_served=len(doc["flowRecords"]))
        assert len(doc["flowRecords"]) == 10_000 and doc["truncated"] is True
        assert peak - base < 100, f"RSS grew {peak - base:.0f} MB for 50 stalled clients"
        assert probe.failures == 0 and probe.worst < HEALTH_BOUND
    finally:
        for s in socks:
            s.close()
        agg.stop()


def _received_or_none(agg: Aggregator) -> int | None:
    try:
        return agg.received_from(GOOD)
    except OSError:
        return None


async def test_6_fd_exhaustion_keeps_health_up_and_the_log_short():
    raise_fd_limit()
    agg = Aggregator("tcp", nofile=256).start()
    socks: list[socket.socket] = []
    try:
        lines_before = agg.log_lines()
        async with HealthProbe(agg) as probe:
            t0 = time.monotonic()
            for _ in range(1100):  # slow clients that connect and send nothing
                s = socket.socket()
                s.setblocking(False)
                try:
                    s.connect(("127.0.0.1", agg.api_port))
                except BlockingIOError:
                    pass
                socks.append(s)
            await asyncio.sleep(0)
            exporter = await good_exporter(agg, 100)
            await until(lambda: time.monotonic() - t0 > 3, 10, "three seconds under load", step=0.2)
            await exporter.flush(10)
            scrape = await asyncio.to_thread(  # the metrics port stays usable while the API port is saturated
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{agg.metrics_port}/metrics", timeout=5).read())
            await exporter.close()
        for s in socks:
            s.close()
        socks.clear()
        await until(lambda: _received_or_none(agg) == 100, 30, "the exporter's 100 records, the API back")
        api = agg.metrics()["api"]
        lines = agg.log_lines() - lines_before
        report("fd-exhaustion", health_worst_s=probe.worst, health_failures=probe.failures,
               connections_refused=api["connectionsRefused"], log_lines=lines)
        assert agg.alive and probe.failures == 0 and probe.worst < HEALTH_BOUND
        assert b"flowscope_aggregator_api_requests_refused" in scrape
        assert api["connectionsRefused"] > 0
        assert lines < 200, f"{lines} log lines"
    finally:
        for s in socks:
            s.close()
        agg.stop()
