"""Rows per second through the aggregator's ClickHouse sink, into chDB and into a ClickHouse server.

What it measures, per backend, median of ``--rounds`` runs of ``--rows`` aggregated
records (IPv4, every element of the aggregated record set, 200 Pods on 8 Nodes):

* ``sink``: ``ClickHouseSink.write`` of the ExportedFlows then one ``commit`` - the whole
  path the aggregator pays: record dicts to checked columns, then the insert (wall time:
  the server is another process).
* ``raw``: the backend's insert of the same rows already in columns (the store's
  ``insert``), i.e. what the conversion costs on top.
* peer, server only: clickhouse-driver's usual row-oriented insert (a list of tuples,
  ``execute("INSERT ... VALUES", rows)``), the obvious implementation, in the same run.
* ``convert``: ``flows_to_columns`` alone (CPU time of this process).

The server is Debian's clickhouse-server (18.16) started on loopback in a temporary
directory unless ``--server tcp://HOST:PORT`` names one. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time

from flowscope.aggregator.aggregation import ExportedFlow, output_names
from flowscope.aggregator.clickhouse_sink import ClickHouseSink
from flowscope.collector.rows import flows_to_columns, typed_columns
from flowscope.collector.schema import COLUMN_NAMES
from flowscope.collector.store import FlowStore, open_store

T0 = (int(time.time()) // 3600 - 2) * 3600  # recent: older rows would fall to the raw TTL


def make_flows(n: int, seed: int) -> list[ExportedFlow]:
    names = output_names(False, False)
    out = []
    for i in range(n):
        pod, node = i % 200, i % 8
        rec = {name: 0 for name in names}
        rec.update({
            "flowStartSeconds": T0 + i % 3600, "flowEndSeconds": T0 + i % 3600 + 30, "flowEndReason": 2,
            "sourceIPv4Address": f"10.244.{node}.{pod % 250}", "destinationIPv4Address": f"10.244.{(node + 1) % 8}.9",
            "sourceTransportPort": 10000 + i % 50000, "destinationTransportPort": 8080, "protocolIdentifier": 6,
            "destinationClusterIPv4": "10.96.0.10", "originalExporterIPv4Address": f"192.168.0.{node + 1}",
            "sourcePodNamespace": f"ns-{pod % 10}", "sourcePodName": f"frontend-{pod}", "sourceNodeName": f"node-{node}",
            "destinationPodNamespace": "shop", "destinationPodName": f"backend-{pod % 20}",
            "destinationNodeName": f"node-{(node + 1) % 8}", "destinationServicePortName": "shop/backend:http",
            "ingressNetworkPolicyName": "allow-web", "ingressNetworkPolicyNamespace": "shop",
            "ingressNetworkPolicyRuleName": "r1", "egressNetworkPolicyName": "", "egressNetworkPolicyNamespace": "",
            "egressNetworkPolicyRuleName": "", "tcpState": "ESTABLISHED",
        })
        for k in names:
            if "Count" in k:
                rec[k] = (i * 31 + seed + len(k)) % 1_000_000
        out.append(ExportedFlow(rec, "correlated", i % 10 == 0))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(root: str) -> tuple[subprocess.Popen[bytes], str]:
    tcp, http = free_port(), free_port()
    with open(os.path.join(root, "config.xml"), "w") as fh:
        fh.write(f"""<?xml version="1.0"?><yandex>
<logger><level>warning</level><log>{root}/server.log</log><errorlog>{root}/error.log</errorlog></logger>
<tcp_port>{tcp}</tcp_port><http_port>{http}</http_port><listen_host>127.0.0.1</listen_host>
<path>{root}/data/</path><tmp_path>{root}/tmp/</tmp_path><user_files_path>{root}/uf/</user_files_path>
<users_config>{root}/users.xml</users_config><default_profile>default</default_profile>
<default_database>default</default_database><timezone>UTC</timezone><mlock_executable>false</mlock_executable>
<mark_cache_size>134217728</mark_cache_size></yandex>""")
    with open(os.path.join(root, "users.xml"), "w") as fh:
        fh.write("""<?xml version="1.0"?><yandex><profiles><default/></profiles><users><default><password></password>
<networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
<quotas><default/></quotas></yandex>""")
    logging.getLogger("clickhouse_driver.connection").setLevel(logging.ERROR)  # the readiness poll
    proc = subprocess.Popen(["clickhouse-server", f"--config-file={root}/config.xml"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    from clickhouse_driver import Client

    deadline = time.monotonic() + 30
    while True:
        try:
            Client("127.0.0.1", port=tcp, connect_timeout=1).execute("SELECT 1")
            return proc, f"tcp://127.0.0.1:{tcp}"
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.05)


async def sink_round(store: FlowStore, flows: list[ExportedFlow]) -> float:
    sink = ClickHouseSink(store, commit_interval=3600, max_buffer=len(flows) + 1, chunk_rows=len(flows) + 1,
                          timer=False)
    t = time.perf_counter()
    await sink.write(flows)
    stored = await sink.commit()
    elapsed = time.perf_counter() - t
    assert stored == len(flows), (stored, sink.last_error)
    return elapsed


def measure(address: str, flows_by_round: list[list[ExportedFlow]], peer_rows: bool) -> dict[str, object]:
    n = len(flows_by_round[0])
    store = open_store(address, "flowscope_bench", f"flows_{os.getpid()}")
    store.open()
    sink_t, raw_t, peer_t = [], [], []
    try:
        for flows in flows_by_round:
            sink_t.append(asyncio.run(sink_round(store, flows)))
            cols = typed_columns(flows_to_columns(flows, time_inserted=int(time.time()), commit_id=1)[0])
            t = time.perf_counter()
            store.insert(cols)
            raw_t.append(time.perf_counter() - t)
            if peer_rows:
                rows = list(zip(*cols))
                client = store._conn()  # type: ignore[attr-defined]
                sql = f"INSERT INTO {store.qualified} ({', '.join(COLUMN_NAMES)}) VALUES"
                t = time.perf_counter()
                client.execute(sql, rows)
                peer_t.append(time.perf_counter() - t)
        total = store.count()
        assert total == n * len(flows_by_round) * (3 if peer_rows else 2), total
        store._execute(f"DROP TABLE {store.qualified}")  # type: ignore[attr-defined]
    finally:
        store.close()
    sink_m, raw_m = statistics.median(sink_t), statistics.median(raw_t)
    out: dict[str, object] = {
        "sink_rows_per_s_median": round(n / sink_m),
        "raw_insert_rows_per_s_median": round(n / raw_m),
        "sink_vs_raw_time_ratio": round(sink_m / raw_m, 2),
    }
    if peer_t:
        peer_m = statistics.median(peer_t)
        out["peer_driver_row_tuples_rows_per_s_median"] = round(n / peer_m)
        out["sink_speedup_vs_peer"] = round(peer_m / sink_m, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--server", help="tcp://HOST:PORT of a running server (default: start a temporary one)")
    args = ap.parse_args()
    rounds = [make_flows(args.rows, r) for r in range(args.rounds)]

    conv = []
    for flows in rounds:
        t = time.process_time()
        flows_to_columns(flows, time_inserted=T0, commit_id=1)
        conv.append(time.process_time() - t)
    result: dict[str, object] = {
        "rows": args.rows, "rounds": args.rounds,
        "convert_rows_per_s_median_cpu": round(args.rows / statistics.median(conv)),
        "chdb": measure("chdb://", rounds, peer_rows=False),
    }
    proc, root = None, None
    address = args.server
    try:
        if address is None and shutil.which("clickhouse-server"):
            root = tempfile.mkdtemp(prefix="fs-ch-bench-")
            proc, address = start_server(root)
        if address is not None:
            from clickhouse_driver import Client

            st = open_store(address)
            version = Client(st.address.host, port=st.address.port).execute("SELECT version()")[0][0]  # type: ignore[attr-defined]
            result["server"] = {"version": version, **measure(address, rounds, peer_rows=True)}
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
