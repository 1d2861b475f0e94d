"""The Flow Aggregator as users run it: the ``flowscope aggregator`` process, records/s per CPU-second.

benchmarks/aggregator_pipeline.py adds up the CPU of each stage fed in memory; this runs the
daemon itself, so what it counts is everything the process does for the records: the
event loop, the TLS sessions, the collecting process's framing and bounds, the ingest, the
periodic export, the sinks' queues and workers, the IPFIX sink's encoding and its TCP
connection, and the ClickHouse sink's conversion and insert. Three ClickHouse cases, each
its own runs: ``none`` (no ClickHouse sink), ``server`` (Debian's clickhouse-server 18.16
on loopback, started by the benchmark: the aggregator pays the conversion and the client's
side of the insert, the server's CPU is not counted) and ``chdb`` (in the aggregator's
process: its insert CPU is the aggregator's).

What happens in one run: eight agents (one TLS 1.3 session each, client certificates from
a CA of the run's own) send the records of aggregator_correlation.py's cluster (each
inter-node flow reported by both nodes, then updated by both: ``--flows`` flows, four
records each) as fast as the aggregator takes them, from another process. The aggregator
exports every second to an IPFIX collector on loopback (a socket that reads and discards,
in this process) and to the ClickHouse sink (its default chunks of 100,000 rows, committed
as each fills; ``commitInterval`` 2 s instead of 8, so that the run's last rows do not
wait 8 s of idle export scans). The clock starts once the ClickHouse sink has opened the
store (its tables created), as in a running aggregator. The run ends when the
aggregator has received every record, exported every flow's last update, and every sink
has written all it was offered (its API's ``/recordmetrics``); the aggregator's CPU time
(``/proc``: every thread) from before the first record to then is the run's cost.

``records_per_cpu_s`` is records received over that CPU time: the rate of the whole process
on one core. ``cpu_ms_per_1k_records`` the same the other way; ``exported_per_record``
says how many aggregated records each agent record became. The peer, in the same run,
alternating: the same daemon with the aggregation's pure-Python twin
(``FLOWSCOPE_AGGREGATOR_PURE=1``).

    .venv/bin/python benchmarks/aggregator_process.py [--flows 200000] [--runs 3]
        [--clickhouse none,server,chdb] [--store-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from multiprocessing import Process
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))

from aggregator_correlation import make_records, to_messages  # noqa: E402
from pki import make_pki  # noqa: E402

from flowscope.ipfix import ExportSession, Template  # noqa: E402
from flowscope.ipfix.antrea import agent_fields  # noqa: E402

SERVER_NAME = "flow-aggregator.flow-aggregator.svc"
TICKS = os.sysconf("SC_CLK_TCK")


def agent_streams(n_flows: int) -> dict[str, list[bytes]]:
    """Each agent's IPFIX messages, its templates first, its records in messages of ~100."""
    template = Template.build(256, agent_fields(4))
    sessions: dict[str, ExportSession] = {}
    out: dict[str, list[bytes]] = {}
    for round_no in (0, 1):
        for exporter, recs in to_messages(make_records(n_flows, round_no)):
            if exporter not in sessions:
                sessions[exporter] = ExportSession(1)
                sessions[exporter].add_template(template)
                out[exporter] = list(sessions[exporter].encode_templates(0))
            out[exporter] += sessions[exporter].encode_records(256, recs, 0)
    return out


def send(port: int, pki: dict[str, str], streams: dict[str, list[bytes]]) -> None:
    """The agents: one mutual-TLS session each, every message sent, agents interleaved."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(pki["client_cert"], pki["client_key"])
    ctx.load_verify_locations(pki["ca"])
    conns = []
    for _ in streams:
        raw = socket.create_connection(("127.0.0.1", port))
        conns.append(ctx.wrap_socket(raw, server_hostname=SERVER_NAME))
    queues = list(streams.values())
    step = 16  # messages per turn: the agents' records arrive interleaved, as from a cluster
    for i in range(0, max(len(q) for q in queues), step):
        for conn, q in zip(conns, queues):
            if i < len(q):
                conn.sendall(b"".join(q[i:i + step]))
    time.sleep(600)  # the sessions stay open; the parent ends this process


def drain(server: socket.socket, stop: threading.Event) -> None:
    """The external IPFIX collector: reads whatever the aggregator's IPFIX sink sends."""
    server.settimeout(0.2)
    conns: list[socket.socket] = []
    while not stop.is_set():
        try:
            c, _ = server.accept()
            c.setblocking(False)
            conns.append(c)
        except TimeoutError:
            pass
        for c in conns:
            try:
                while c.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
    for c in conns:
        c.close()


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def metrics(api: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{api}/recordmetrics", timeout=10) as r:
        return dict(json.load(r))


def settled(m: dict[str, Any], n_in: int, n_flows: int) -> bool:
    if m["numRecordsReceived"] < n_in or m["numRecordsExported"] < n_flows:
        return False
    for s in m["sinks"].values():
        if s["queued"] or s["written"] + s["failed"] + s["dropped"] < s["offered"]:
            return False
        if s.get("bufferedRows"):
            return False
    return True


def run_once(n_flows: int, streams: dict[str, list[bytes]], pki: dict[str, str], tmp: str, *, twin: bool,
             clickhouse: str, store_dir: str, server: str) -> dict[str, float]:
    n_in = 4 * n_flows
    collector = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    drainer = threading.Thread(target=drain, args=(collector, stop), daemon=True)
    drainer.start()
    store = tempfile.mkdtemp(dir=store_dir)
    sinks: dict[str, Any] = {"ipfix": {"enabled": True, "queueSize": 10_000}}
    if clickhouse == "chdb":
        sinks["clickhouse"] = {"enabled": True, "address": f"chdb://{store}", "commitInterval": "2s"}
    elif clickhouse == "server":
        sinks["clickhouse"] = {"enabled": True, "address": server, "database": f"fs_{os.getpid()}_{time.time_ns()}",
                               "commitInterval": "2s"}
    cfg = {
        "aggregatorTransportProtocol": "tls", "listenAddress": "127.0.0.1", "listenPort": 0,
        "flowAggregatorAddress": SERVER_NAME,
        "tls": {"caFile": pki["ca"], "certFile": pki["server_cert"], "keyFile": pki["server_key"]},
        "externalFlowCollectorAddr": f"127.0.0.1:{collector.getsockname()[1]}:tcp",
        "flowExportInterval": "1s", "correlationTimeout": "30s", "inactiveFlowTimeout": "90s",
        "maxFlows": n_flows * 2, "apiAddress": "127.0.0.1:0", "metricsAddress": "", "sinks": sinks,
    }
    path = Path(tmp) / "aggregator.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if k != "FLOWSCOPE_AGGREGATOR_PURE"}
    if twin:
        env["FLOWSCOPE_AGGREGATOR_PURE"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "flowscope", "aggregator", "--config", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sender: Process | None = None
    try:
        seen = []
        while True:
            line = proc.stderr.readline() if proc.stderr else ""
            if not line:
                raise RuntimeError("the aggregator stopped:\n" + "".join(seen))
            seen.append(line)
            m = re.search(r"collecting tls on port (\d+), sinks .*, API (\d+)", line)
            if m:
                port, api = int(m.group(1)), int(m.group(2))
                break
        log_lines: list[str] = []  # kept for the error of a run that does not settle
        threading.Thread(target=lambda: log_lines.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
        deadline = time.monotonic() + 60
        while clickhouse != "none" and not metrics(api)["sinks"]["clickhouse"].get("connected"):
            assert time.monotonic() < deadline, "the ClickHouse sink did not open the store"
            time.sleep(0.2)
        time.sleep(0.5)  # its first commits and connections settle
        cpu0, t0 = cpu_of(proc.pid), time.perf_counter()
        sender = Process(target=send, args=(port, pki, streams), daemon=True)
        sender.start()
        deadline = time.monotonic() + max(60.0, n_in / 5000)
        while True:
            m = metrics(api)
            if settled(m, n_in, n_flows):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"not settled: {json.dumps(m)[:3000]}\n{''.join(log_lines[-20:])}")
            time.sleep(0.2)  # each poll costs the aggregator an API request
        cpu, wall = cpu_of(proc.pid) - cpu0, time.perf_counter() - t0
        exported = m["numRecordsExported"]
        assert m["numRecordsDropped"] == 0 and m["aggregation"].get("flows_correlated") == n_flows, m
        for name, s in m["sinks"].items():
            assert s["failed"] == 0 and s["dropped"] == 0, (name, s)
        if clickhouse != "none":
            assert m["sinks"]["clickhouse"]["committedRows"] == m["sinks"]["clickhouse"]["offered"], m["sinks"]
    finally:
        if sender is not None:
            sender.kill()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stop.set()
        drainer.join()
        collector.close()
        subprocess.run(["rm", "-rf", store], check=False)
    return {"records_per_cpu_s": n_in / cpu, "records_per_s": n_in / wall, "cpu_s": cpu, "wall_s": wall,
            "exported_per_record": exported / n_in}


def summary(runs: list[dict[str, float]]) -> dict[str, float]:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {
        "records_per_cpu_s_median": round(med["records_per_cpu_s"]),
        "cpu_ms_per_1k_records_median": round(1e6 / med["records_per_cpu_s"], 3),
        "records_per_s_wall_median": round(med["records_per_s"]),
        "exported_per_record": round(med["exported_per_record"], 3),
        "runs_records_per_cpu_s": [round(r["records_per_cpu_s"]) for r in runs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clickhouse", default="none,server,chdb",
                    help="comma-separated cases: none, server (18.16 on loopback), chdb")
    ap.add_argument("--store-dir", default=tempfile.gettempdir(),
                    help="where the chDB store goes (default: the temp directory)")
    ap.add_argument("--no-twin", action="store_true", help="skip the pure-Python peer")
    args = ap.parse_args()
    cases = [c.strip() for c in args.clickhouse.split(",") if c.strip()]
    bad = [c for c in cases if c not in ("none", "server", "chdb")]
    if bad:
        ap.error(f"--clickhouse: unknown case {bad[0]!r}; the cases are none, server, chdb")
    streams = agent_streams(args.flows)
    out: dict[str, Any] = {"flows": args.flows, "records": 4 * args.flows, "agents": len(streams), "runs": args.runs,
                           "store_dir": args.store_dir, "target_records_per_cpu_s": 300_000}
    results: dict[str, dict[str, list[dict[str, float]]]] = {c: {"aggregator": [], "twin": []} for c in cases}
    loads = []
    server_proc = None
    with tempfile.TemporaryDirectory() as tmp:
        server = ""
        if "server" in cases:
            from clickhouse_sink import start_server

            os.makedirs(Path(tmp) / "server")
            server_proc, server = start_server(str(Path(tmp) / "server"))
        try:
            pki = make_pki(Path(tmp), server_names=("127.0.0.1", SERVER_NAME))
            for _ in range(args.runs):
                for case in cases:  # alternating: the machine's load hits every case alike
                    loads.append(os.getloadavg()[0])
                    for twin in ((False,) if args.no_twin else (False, True)):
                        results[case]["twin" if twin else "aggregator"].append(run_once(
                            args.flows, streams, pki, tmp, twin=twin, clickhouse=case, store_dir=args.store_dir,
                            server=server))
        finally:
            if server_proc is not None:
                os.killpg(server_proc.pid, signal.SIGKILL)
                server_proc.wait()
    out["load_average_at_runs"] = [round(x, 2) for x in loads]
    for case in cases:
        res: dict[str, Any] = {"aggregator": summary(results[case]["aggregator"])}
        if results[case]["twin"]:
            res["twin"] = summary(results[case]["twin"])
            res["vs_twin"] = round(res["aggregator"]["records_per_cpu_s_median"] / res["twin"]["records_per_cpu_s_median"], 2)
        res["target_met"] = res["aggregator"]["records_per_cpu_s_median"] >= 300_000
        out[f"clickhouse_{case}"] = res
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
