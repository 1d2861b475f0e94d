"""``flowscope collector --store`` end to end: aggregated records over IPFIX/TCP in, rows
committed in chDB, records/s.

What it measures: ``--records`` aggregated IPv4 records (every element of the aggregated
record, values varying over a pool of 4096), encoded beforehand into IPFIX messages and
written to one TCP connection to a ``flowscope collector --listen ... --store chdb:///DIR
--api ...`` subprocess as fast as the socket takes them. The clock runs from the first
byte sent until the collector's API counts every record committed (polled every 200 ms: a
query every 50 ms took the store's lock and CPU from the ingest it measured).
Also reported: the collector's CPU seconds over the run (from /proc), so N over those is
the rate on one core whatever else the machine runs; and the same collector with no store
(``--format jsonl`` to /dev/null) as the decode-and-print baseline in the same run.
CPU ms per 1,000 records of each ingest stage come from the collector's own count at
shutdown (collector/ingest.py): decode (the event loop's thread: framing, decoding each
data set straight into typed columns (ipfix/columnar.py), and serving the API's polls),
queueing (offer_sets), conversion (the batch's column sets joined into the store's
columns: collector/rows.py sets_to_columns) and insert (the worker thread's CPU in the
backend's insert; chDB's own threads are in the collector's total only).

Prints one JSON object; ``--runs`` medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from flowscope.ipfix import ExportSession, Template, default_registry
from flowscope.ipfix.antrea import AGGREGATOR_IPV4_FIELDS

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
POOL = 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pool(now: int) -> list[dict[str, Any]]:
    reg = default_registry()
    out = []
    for i in range(POOL):
        rec: dict[str, Any] = {}
        for name in AGGREGATOR_IPV4_FIELDS:
            dt = reg.get(name).data_type.name
            if dt == "string":
                rec[name] = ""
            elif dt == "ipv4Address":
                rec[name] = f"10.{i % 50}.{i % 250}.{i % 7 + 1}"
            elif dt == "dateTimeSeconds":
                rec[name] = now - i % 3600
            else:
                rec[name] = (i * 7 + len(name)) % 200
        rec.update(sourcePodNamespace=f"ns-{i % 50}", sourcePodName=f"app-{i % 500}-abcde",
                   destinationPodNamespace=f"ns-{(i + 3) % 50}", destinationPodName=f"db-{i % 40}",
                   sourceNodeName=f"node-{i % 50}", destinationNodeName=f"node-{(i + 1) % 50}",
                   destinationServicePortName=f"ns-{i % 50}/svc-{i % 200}:http", tcpState="ESTABLISHED",
                   sourceTransportPort=10000 + i, flowType=2, octetDeltaCount=1000 + i)
        out.append(rec)
    return out


def encode(n: int) -> list[bytes]:
    now = int(time.time())
    recs = pool(now)
    t = Template.build(256, AGGREGATOR_IPV4_FIELDS)
    s = ExportSession(1)
    s.add_template(t)
    msgs = s.encode_templates(now)
    sent = 0
    while sent < n:
        k = min(POOL, n - sent)
        msgs += s.encode_records(256, recs[:k], now)
        sent += k
    return msgs


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def committed(api: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{api}/api/v1/top?group=flowType&source=raw", timeout=30) as r:
        return int(json.loads(r.read())["total"]["records"])


def run_store(msgs: list[bytes], n: int, root: str, batch_rows: int, interval: str) -> dict[str, Any]:
    port, api = free_port(), free_port()
    d = tempfile.mkdtemp(dir=root)
    proc = subprocess.Popen([FLOWSCOPE, "collector", "--listen", f"127.0.0.1:{port}", "--store", f"chdb://{d}/s",
                             "--api", f"127.0.0.1:{api}", "--commit-interval", interval,
                             "--batch-rows", str(batch_rows), "--queue-rows", str(max(batch_rows * 5, 1_000_000))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_api(api, proc)
        cpu0 = cpu_seconds(proc.pid)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            t0 = time.perf_counter()
            for m in msgs:
                sock.sendall(m)
            sent = time.perf_counter() - t0
            while (got := committed(api)) < n:
                if time.perf_counter() - t0 > 600:
                    raise RuntimeError(f"only {got} of {n} records committed after 600 s")
                time.sleep(0.2)
            elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        shutil.rmtree(d, ignore_errors=True)
    return {"seconds": round(elapsed, 3), "send_seconds": round(sent, 3), "records_per_s": round(n / elapsed),
            "collector_cpu_s": round(cpu, 2), "records_per_cpu_s": round(n / cpu) if cpu else None,
            "committed": got, "cpu_ms_per_1k_records": stage_cpu(err or "")}


def stage_cpu(stderr: str) -> dict[str, float]:
    """The collector's own count at shutdown: CPU ms per 1,000 records for each ingest stage."""
    m = re.search(r"CPU per 1,000 records: decode ([\d.]+) ms .*queueing ([\d.]+) ms, conversion ([\d.]+) ms, "
                  r"insert ([\d.]+) ms", stderr)
    if m is None:
        return {}
    out = dict(zip(("decode", "queueing", "conversion", "insert"), map(float, m.groups())))
    w = re.search(r"wall seconds: conversion ([\d.]+), insert ([\d.]+)", stderr)
    c = re.search(r"records stored in (\d+) commits", stderr)
    if w:
        out.update(conversion_wall_s=float(w.group(1)), insert_wall_s=float(w.group(2)))
    if c:
        out.update(commits=int(c.group(1)))
    return out


def run_print(msgs: list[bytes], n: int) -> dict[str, Any]:
    """The same collector decoding and printing JSON Lines to /dev/null (no store)."""
    port = free_port()
    proc = subprocess.Popen([FLOWSCOPE, "collector", "--listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        cpu0 = cpu_seconds(proc.pid)
        assert proc.stdout is not None
        counted = {"lines": 0}
        done = threading.Event()

        def read() -> None:  # a thread: the collector's output must drain while we send
            assert proc.stdout is not None
            for _ in proc.stdout:
                counted["lines"] += 1
                if counted["lines"] >= n:
                    break
            done.set()

        threading.Thread(target=read, daemon=True).start()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            t0 = time.perf_counter()
            for m in msgs:
                sock.sendall(m)
            done.wait(600)
            elapsed = time.perf_counter() - t0
        lines = counted["lines"]
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(60)
    return {"seconds": round(elapsed, 3), "records_per_s": round(lines / elapsed), "collector_cpu_s": round(cpu, 2),
            "records_per_cpu_s": round(lines / cpu) if cpu else None, "printed": lines}


def _wait_api(api: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"collector exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{api}/healthz", timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=500_000)
    ap.add_argument("--runs", type=int, default=3)
    # the collector's defaults: blocks of up to 200k rows, closed after 1 s
    ap.add_argument("--batch-rows", type=int, default=200_000, help="the collector's --batch-rows")
    ap.add_argument("--commit-interval", default="1s", help="the collector's --commit-interval")
    args = ap.parse_args()
    msgs = encode(args.records)
    root = tempfile.mkdtemp(prefix="fs-collector-bench-")
    try:
        store = [run_store(msgs, args.records, root, args.batch_rows, args.commit_interval) for _ in range(args.runs)]
        printed = [run_print(msgs, args.records) for _ in range(args.runs)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = lambda rs, k: statistics.median(r[k] for r in rs if r[k] is not None)  # noqa: E731
    print(json.dumps({
        "records": args.records, "runs": args.runs, "messages": len(msgs), "batch_rows": args.batch_rows,
        "commit_interval": args.commit_interval,
        "store_records_per_s_median": med(store, "records_per_s"),
        "store_cpu_ms_per_1k_records_median": {
            k: statistics.median(r["cpu_ms_per_1k_records"][k] for r in store if k in r["cpu_ms_per_1k_records"])
            for k in ("decode", "queueing", "conversion", "insert") if all(k in r["cpu_ms_per_1k_records"] for r in store)},
        "store_records_per_collector_cpu_s_median": med(store, "records_per_cpu_s"),
        "print_baseline_records_per_s_median": med(printed, "records_per_s"),
        "print_baseline_records_per_cpu_s_median": med(printed, "records_per_cpu_s"),
        "store_runs": store, "print_runs": printed,
    }, indent=2))


if __name__ == "__main__":
    main()
