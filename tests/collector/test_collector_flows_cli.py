"""``flowscope collector --store --api`` and ``flowscope flows`` as a user runs them: real
processes on loopback. The records of scripts/demo-flows.jsonl go in through ``flowscope
export`` over IPFIX/TCP; ``flowscope flows --api`` (the running collector) shows each
connection with its Pods, Service, policy, action and bytes as sent, in every output
form, with filters and --top (with "other"); after SIGTERM every record is committed and
``flowscope flows --store`` reads the same answers from the directory; bad input is one
line each."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_collector_cli import FLOWSCOPE, Collector, free_port

pytestmark = [pytest.mark.timeout(120)]

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo-flows.jsonl"


def flows_cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([FLOWSCOPE, "flows", *args], capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def sent() -> list[dict]:
    return [json.loads(x) for x in DEMO.read_text().splitlines() if x.strip()]


def test_collector_stores_and_flows_shows_what_was_sent(tmp_path):
    port, api = free_port(), free_port()
    store = f"chdb://{tmp_path}/store"
    col = Collector("--listen", f"127.0.0.1:{port}", "--store", store, "--api", f"127.0.0.1:{api}",
                    "--commit-interval", "200ms")
    url = f"http://127.0.0.1:{api}"
    try:
        records = sent()
        exp = subprocess.run([FLOWSCOPE, "export", "--to", f"127.0.0.1:{port}", "--input", str(DEMO)],
                             capture_output=True, text=True, timeout=60)
        assert exp.returncode == 0, exp.stderr
        deadline = time.monotonic() + 30
        while True:
            got = [json.loads(x) for x in flows_cmd("--api", url, "-o", "json", "--limit", "100").stdout.splitlines()]
            if len(got) == len(records):
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.1)
        # every record, field for field as sent (addresses folded into one column per end)
        key = lambda r: (r["flowEndSeconds"], r["sourceTransportPort"], r["destinationTransportPort"],  # noqa: E731
                         r.get("sourcePodName", ""), r.get("destinationPodName", ""))
        by_key = {key(r): r for r in records}
        for row in got:
            want = by_key[key(row)]
            for k, v in want.items():
                col_name = {"sourceIPv4Address": "sourceIP", "sourceIPv6Address": "sourceIP",
                            "destinationIPv4Address": "destinationIP", "destinationIPv6Address": "destinationIP",
                            "destinationClusterIPv4": "destinationClusterIP",
                            "destinationClusterIPv6": "destinationClusterIP"}.get(k, k)
                assert row[col_name] == v, (k, row[col_name], v)
        # the table names Pods, the Service, policy:action and both directions' bytes
        table = flows_cmd("--api", url, "--limit", "100").stdout.splitlines()
        assert table[0].split()[:9] == ["TIME", "SOURCE", "DESTINATION", "SERVICE", "PROTO", "TYPE", "POLICY",
                                       "BYTES", "PACKETS"]
        for r in records:
            src = f"{r['sourcePodNamespace']}/{r['sourcePodName']}" if r.get("sourcePodName") else None
            dst = f"{r['destinationPodNamespace']}/{r['destinationPodName']}" if r.get("destinationPodName") else None
            line = next(x for x in table[1:] if str(r["octetDeltaCount"] + r["reverseOctetDeltaCount"]) in x.split()
                        and (src is None or src == x.split()[1]) and (dst is None or dst == x.split()[2]))
            if r.get("destinationServicePortName"):
                assert r["destinationServicePortName"] in line.split()
            for d in ("ingress", "egress"):
                if r.get(f"{d}NetworkPolicyName"):
                    action = {1: "Allow", 2: "Drop", 3: "Reject"}[r[f"{d}NetworkPolicyRuleAction"]]
                    assert f"{r[f'{d}NetworkPolicyName']}:{action}" in line
        # filters: the options and the language agree
        dropped = [r for r in records if 2 in (r.get("ingressNetworkPolicyRuleAction"), r.get("egressNetworkPolicyRuleAction"))]
        assert dropped
        by_option = flows_cmd("--api", url, "--action", "drop", "-o", "json").stdout.splitlines()
        by_expr = flows_cmd("--api", url, "--filter", "action = drop", "-o", "json").stdout.splitlines()
        assert len(by_option) == len(by_expr) == len(dropped)
        shop = [r for r in records if "shop" in (r.get("sourcePodNamespace"), r.get("destinationPodNamespace"))]
        rows = list(csv.DictReader(io.StringIO(flows_cmd("--api", url, "--namespace", "shop", "-o", "csv").stdout)))
        assert len(rows) == len(shop) and all("shop" in (x["sourcePodNamespace"], x["destinationPodNamespace"]) for x in rows)
        # --top with the remainder as other, and the total of everything
        top = json.loads(flows_cmd("--api", url, "--top", "1", "--group", "namespace", "-o", "json").stdout)
        total = sum(r["octetDeltaCount"] + r["reverseOctetDeltaCount"] for r in records)
        assert top["total"]["bytes"] == total
        assert top["entries"][0]["bytes"] + top["other"]["bytes"] == total
        # --follow prints what is stored after it started (the demo records, sent once more)
        follow = subprocess.Popen([FLOWSCOPE, "flows", "--api", url, "--follow", "--interval", "200ms", "-o", "json",
                                   "--limit", "1", "--namespace", "shop"], stdout=subprocess.PIPE, text=True)
        try:
            assert follow.stdout is not None
            first = follow.stdout.readline()  # the newest stored record, then the stream
            assert "shop" in (json.loads(first)["sourcePodNamespace"], json.loads(first)["destinationPodNamespace"])
            time.sleep(1.1)  # the next commit lands in a later second than the last one seen
            exp = subprocess.run([FLOWSCOPE, "export", "--to", f"127.0.0.1:{port}", "--input", str(DEMO)],
                                 capture_output=True, text=True, timeout=60)
            assert exp.returncode == 0, exp.stderr
            streamed = [json.loads(follow.stdout.readline()) for _ in range(len(shop))]
        finally:
            follow.terminate()
            follow.wait(10)
        assert sorted(r["octetDeltaCount"] for r in streamed) == sorted(r["octetDeltaCount"] for r in shop)
        assert all("shop" in (r["sourcePodNamespace"], r["destinationPodNamespace"]) for r in streamed)
        records = records + records  # everything was stored twice now
        wide = flows_cmd("--api", url, "-o", "wide").stdout
        assert "CORRELATION" in wide.splitlines()[0]
        # one clear line per bad input
        bad = flows_cmd("--api", url, "--filter", "namespace = x;", check=False)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unexpected ';'" in bad.stderr
        bad = flows_cmd("--api", url, "--top", "3", "--group", "rack", check=False)
        assert bad.returncode == 2 and "--group: 'rack' is not one of" in bad.stderr
        bad = flows_cmd("--api", f"http://127.0.0.1:{free_port()}", check=False)
        assert bad.returncode == 3 and "cannot reach the collector" in bad.stderr
        bad = flows_cmd("--store", store, check=False)  # the collector holds the directory
        assert bad.returncode == 3 and "--api" in bad.stderr.splitlines()[-1]
    finally:
        col.proc.send_signal(signal.SIGTERM)
        col.proc.wait(30)
    err = "".join(col.err)
    assert f"{len(records)} records stored" in err and "0 not stored at shutdown" in err
    # the directory, now free, answers the same
    top_store = json.loads(flows_cmd("--store", store, "--top", "1", "--group", "namespace", "-o", "json").stdout)
    assert top_store["total"]["bytes"] == 2 * top["total"]["bytes"]
    assert top_store["entries"][0]["key"] == top["entries"][0]["key"]
    assert len(flows_cmd("--store", store, "-o", "json", "--limit", "100").stdout.splitlines()) == len(records)


def test_bad_options_are_one_line_each(tmp_path):
    for args, text in [
        ([], "say where to read: --store URL"),
        (["--store", "http://x"], "store: 'http://x' has the scheme 'http'"),
        (["--store", "chdb://rel"], "chDB takes an absolute directory"),
        (["--store", f"chdb://{tmp_path}", "--since", "yesterday"], "--since: 'yesterday' is neither a duration"),
        (["--store", f"chdb://{tmp_path}", "--filter", "nmespace = x"], "unknown field 'nmespace'"),
        (["--store", f"chdb://{tmp_path}", "--top", "0"], "--top: 0 is not a whole number in 1..1000"),
        (["--store", f"chdb://{tmp_path}", "--follow", "--top", "3"], "--follow streams records"),
    ]:
        p = flows_cmd(*args, check=False)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.count("\n") == 1 and text in p.stderr, (args, p.stderr)
    c = subprocess.run([FLOWSCOPE, "collector", "--listen", "127.0.0.1:4739", "--api", "127.0.0.1:8080"],
                       capture_output=True, text=True, timeout=30)
    assert c.returncode == 2 and "--api serves the flow store: give --store too" in c.stderr
    c = subprocess.run([FLOWSCOPE, "collector", "--listen", "127.0.0.1:4739", "--store", f"chdb://{tmp_path}/s",
                        "--api", "0.0.0.0:8080"], capture_output=True, text=True, timeout=30)
    assert c.returncode == 2 and "no client authentication is configured" in c.stderr

