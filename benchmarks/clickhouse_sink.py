"""Rows per second through the aggregator's ClickHouse sink, into chDB and into a ClickHouse server.

What it measures, per backend, median of ``--rounds`` runs of ``--rows`` aggregated
records (IPv4, every element of the aggregated record set, 200 Pods on 8 Nodes), as the
aggregator's export really hands them to the sink: agent records (one intra-node record
per connection, every agent IE) fed to an AggregationProcess, whose export scan gives the
ExportedFlows (their records the C export's Records where it is built, else the twin's
dicts):

* ``sink``: ``ClickHouseSink.write`` of the ExportedFlows then one ``commit`` of an
  open sink (its first commit, which opens and migrates the store, before the clock) -
  the whole path the aggregator pays: record dicts to typed, checked columns (in the form the
  backend takes: Arrow-layout text for chDB, sent as a Native block; lists for the driver), then the insert. Rows/s over
  wall time, and over this process's CPU time (every thread: chDB runs in-process, so
  this is the rate on one core whatever else the machine runs); CPU ms per 1,000 rows of
  the conversion (the committing thread) and of the insert/commit (the rest of the
  process's CPU in the round; for a server the server's own CPU is not in it).
* ``raw``: the backend's insert of the same rows already in columns (the store's
  ``insert``), i.e. what the conversion costs on top.
* peer, server only: clickhouse-driver's usual row-oriented insert (a list of tuples,
  ``execute("INSERT ... VALUES", rows)``), the obvious implementation, in the same run;
  ``chdb_sink_vs_server_peer`` is our chDB sink's wall rate over it.
* ``convert``: the sink's conversion alone (``clickhouse_sink.flows_columns``), both text
  forms (CPU time of this process), and which transposition served (the C extension or
  the pure-Python twin); ``convert_cpu_ms_per_1k_rows`` gives it per 1,000 rows for the
  export's records (``export``: Records, read in C without names) and for the same
  records as dicts (``dict``: collector.rows.flows_to_columns, the path before Records).
* ``chdb_views``: chDB's insert CPU per 1,000 rows into the same columns read and
  dropped, into the raw table alone, and with the roll-up families added one at a time,
  in the same session: what the reading, the raw part and each family's views cost
  (:func:`views_cost`).

The server is Debian's clickhouse-server (18.16) started on loopback in a temporary
directory unless ``--server tcp://HOST:PORT`` names one. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time

from flowscope.aggregator.aggregation import AggregationProcess, ExportedFlow, accelerated as aggregation_accelerated
from flowscope.aggregator.clickhouse_sink import ClickHouseSink, flows_columns
from flowscope.collector.rows import accelerated, flows_to_columns, typed_columns
from flowscope.collector.schema import COLUMN_NAMES
from flowscope.collector.store import FlowStore, open_store
from flowscope.ipfix import DataType, default_registry
from flowscope.ipfix.antrea import agent_fields

T0 = (int(time.time()) // 3600 - 2) * 3600  # recent: older rows would fall to the raw TTL


def agent_records(n: int, seed: int) -> dict[str, list[dict[str, object]]]:
    """One intra-node agent record per connection (every agent IE), by the node's agent."""
    names = agent_fields(4)
    reg = default_registry()
    blank = {name: "" if reg.get(name).data_type in (DataType.string, DataType.ipv4Address) else 0 for name in names}
    blank.update(destinationClusterIPv4="0.0.0.0", destinationServiceIPv4="0.0.0.0", proxySnatIPv4="0.0.0.0")
    out: dict[str, list[dict[str, object]]] = {}
    for i in range(n):
        pod, node = i % 200, i % 8
        rec = dict(blank)
        rec.update({
            "flowStartSeconds": T0 + i % 3600, "flowEndSeconds": T0 + i % 3600 + 30, "flowEndReason": 3 if i % 10 == 0 else 2,
            "sourceIPv4Address": f"10.244.{node}.{pod % 250}", "destinationIPv4Address": f"10.244.{node}.9",
            # one connection each: the source (its Pod, i % 200) and port (i // 200) tell them apart
            "sourceTransportPort": 1024 + (i // 200) % 64000, "destinationTransportPort": 8080, "protocolIdentifier": 6,
            "destinationClusterIPv4": "10.96.0.10",
            "sourcePodNamespace": f"ns-{pod % 10}", "sourcePodName": f"frontend-{pod}", "sourceNodeName": f"node-{node}",
            "destinationPodNamespace": "shop", "destinationPodName": f"backend-{pod % 20}",
            "destinationNodeName": f"node-{node}", "destinationServicePortName": "shop/backend:http",
            "ingressNetworkPolicyName": "allow-web", "ingressNetworkPolicyNamespace": "shop",
            "ingressNetworkPolicyRuleName": "r1", "tcpState": "ESTABLISHED", "flowType": 1,
        })
        for k in names:
            if "Count" in k:
                rec[k] = (i * 31 + seed + len(k)) % 1_000_000
        out.setdefault(f"192.168.0.{node + 1}", []).append(rec)
    return out


def make_flows(n: int, seed: int) -> list[ExportedFlow]:
    """What the aggregator's export hands its sinks for ``n`` connections: the agents'
    records through an AggregationProcess, then its export scan (every tenth one ended)."""
    proc = AggregationProcess(export_interval=60.0, max_flows=2 * n, max_flow_bytes=1 << 40)
    for exporter, recs in agent_records(n, seed).items():
        for at in range(0, len(recs), 100):  # an IPFIX message's worth at a time
            proc.ingest_many(recs[at:at + 100], exporter, 1, 1.0)
    out = proc.tick(60.0)
    assert len(out) == n, (len(out), proc.stats)
    return out


def as_dicts(flows: list[ExportedFlow]) -> list[ExportedFlow]:
    """The same ExportedFlows with their records as dicts (what the export made before Records)."""
    return [ExportedFlow(dict(f.record), f.correlation, f.final) for f in flows]


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


def process_cpu() -> float:
    """CPU seconds of this process, every thread (chDB's included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def sink_round(store: FlowStore, flows: list[ExportedFlow]) -> dict[str, float]:
    sink = ClickHouseSink(store, commit_interval=3600, max_buffer=len(flows) + 1, chunk_rows=len(flows) + 1,
                          timer=False)
    # The sink's first commit opens the store (its migrations: a dozen statements): a
    # running aggregator pays that once, so it is left out of the round.
    assert await sink.commit() == 0
    t, c = time.perf_counter(), process_cpu()
    await sink.write(flows)
    stored = await sink.commit()
    elapsed, cpu = time.perf_counter() - t, process_cpu() - c
    assert stored == len(flows), (stored, sink.last_error)
    return {"wall": elapsed, "cpu": cpu, "convert_cpu": sink.convert_cpu, "insert_thread_cpu": sink.insert_cpu,
            "insert_cpu": cpu - sink.convert_cpu}


def measure(address: str, flows_by_round: list[list[ExportedFlow]], peer_rows: bool) -> dict[str, object]:
    n = len(flows_by_round[0])
    store = open_store(address, "flowscope_bench", f"flows_{os.getpid()}")
    store.open()
    sink_r, raw_t, peer_t = [], [], []
    text = getattr(store, "text_form", "list")
    try:
        for flows in flows_by_round:
            sink_r.append(asyncio.run(sink_round(store, flows)))
            cols = flows_columns(flows, time_inserted=int(time.time()), commit_id=1, text=text)[0]
            t = time.perf_counter()
            store.insert(cols)
            raw_t.append(time.perf_counter() - t)
            if peer_rows:
                rows = list(zip(*typed_columns(flows_columns(flows, time_inserted=int(time.time()),
                                                                commit_id=1)[0])))
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
    med = {k: statistics.median(r[k] for r in sink_r) for k in sink_r[0]}
    raw_m = statistics.median(raw_t)
    out: dict[str, object] = {
        "text_form": text,
        "sink_rows_per_s_median": round(n / med["wall"]),
        "sink_rows_per_process_cpu_s_median": round(n / med["cpu"]),
        "sink_cpu_ms_per_1k_rows_median": {
            "conversion": round(med["convert_cpu"] / n * 1e6, 3),
            "insert_commit": round(med["insert_cpu"] / n * 1e6, 3),
            "insert_commit_calling_thread": round(med["insert_thread_cpu"] / n * 1e6, 3),
        },
        "raw_insert_rows_per_s_median": round(n / raw_m),
        "sink_vs_raw_time_ratio": round(med["wall"] / raw_m, 2),
    }
    if peer_t:
        peer_m = statistics.median(peer_t)
        out["peer_driver_row_tuples_rows_per_s_median"] = round(n / peer_m)
        out["sink_speedup_vs_peer"] = round(peer_m / med["wall"], 2)
    return out


def views_cost(flows_by_round: list[list[ExportedFlow]]) -> dict[str, object]:
    """Where chDB's insert CPU goes (process CPU, every thread), each target its own
    database in one session, the same columns inserted into each in turn by the store's
    own insert (its settings), background merges stopped (they are paid later, by every
    layout alike), medians of the rounds:

    * ``read_only``: a ``Null``-engine table of the stored columns: the Native block built
      from the columns and read by chDB's streaming insert, nothing written;
    * ``raw_table``: the raw table (its derived columns), no roll-up;
      ``raw_table_wide_parts``: the same with every part Wide (ClickHouse's default
      for parts over 10 MB, before the raw table wrote its insert-sized parts Compact);
    * then the families added one at a time in this order (conn, addr, main, ns, src,
      dst), each row the total so far, ``+family`` its increment: what each family's
      views and tables cost;
    * ``all_views_optimize_on_insert``: every view, with ClickHouse's default
      ``optimize_on_insert = 1``; ``all_views_fed_from_raw``: every family's finest
      table fed from the raw insert (before the narrow families read the main 1-minute
      table), with the store's settings.
    """
    from flowscope.collector import schema as sch

    n = len(flows_by_round[0])
    store = open_store("chdb://", "fs_views", "flows")
    store.open()
    features = store.features
    assert features is not None
    retention = sch.Retention()
    fams = {f.name or "main": f for f in sch.FAMILIES}
    order = ["conn", "addr", "main", "ns", "src", "dst"]
    base = store._insert_sql  # type: ignore[attr-defined]
    targets: dict[str, str] = {}

    def build(db: str, families: list[str], from_raw: bool = False) -> None:
        store.execute(f"CREATE DATABASE {db}")
        store.execute(sch.raw_table_sql(db, "flows", features, retention))
        for name in families:
            for r in fams[name].rollups:
                store.execute(sch.rollup_table_sql(db, "flows", r, features, retention, fams[name]))
        for name in families:
            fam = fams[name]
            for r in fam.rollups:
                sql = sch.rollup_view_sql(db, "flows", r, features, fam)
                if from_raw and r == fam.rollups[0]:
                    sql = sql[:sql.index(" AS SELECT") + 4] + sch.rollup_select_sql(db, "flows", r, None, fam)
                store.execute(sql)

    store.execute("CREATE DATABASE fs_read")
    body = ", ".join(f"`{c.name}` {c.sql_type(features)}" for c in sch.COLUMNS)
    store.execute(f"CREATE TABLE fs_read.flows ({body}) ENGINE = Null")
    targets["read_only"] = base.replace("`fs_views`.", "fs_read.", 1)
    build("fs_raw", [])
    targets["raw_table"] = base.replace("`fs_views`.", "fs_raw.", 1)
    if features.compact_parts:
        store.execute("CREATE DATABASE fs_raw_wide")
        store.execute(sch.raw_table_sql("fs_raw_wide", "flows", features, retention).replace(
            sch.raw_table_settings(features), " SETTINGS min_rows_for_wide_part = 0"))
        targets["raw_table_wide_parts"] = base.replace("`fs_views`.", "fs_raw_wide.", 1)
    for i, name in enumerate(order):
        build(f"fs_upto_{name}", order[: i + 1])
        targets[f"+{name}"] = base.replace("`fs_views`.", f"fs_upto_{name}.", 1)
    targets["all_views_optimize_on_insert"] = base.replace("optimize_on_insert = 0", "optimize_on_insert = 1")
    build("fs_from_raw", order, from_raw=True)
    targets["all_views_fed_from_raw"] = base.replace("`fs_views`.", "fs_from_raw.", 1)
    store.execute("SYSTEM STOP MERGES")
    cpu: dict[str, list[float]] = {k: [] for k in targets}
    try:
        for i, flows in enumerate(flows_by_round):
            cols = flows_columns(flows, time_inserted=int(time.time()), commit_id=1, text="arrow")[0]
            keys = list(targets)
            for k in keys[i % len(keys):] + keys[: i % len(keys)]:  # each round starts elsewhere
                store._insert_sql = targets[k]  # type: ignore[attr-defined]
                c = process_cpu()
                store.insert(cols)
                cpu[k].append(process_cpu() - c)
    finally:
        store.close()
    ms = {k: statistics.median(v) / n * 1e6 for k, v in cpu.items()}
    out: dict[str, object] = {"insert_cpu_ms_per_1k_rows": {k: round(v, 3) for k, v in ms.items()}}
    steps = ["read_only", "raw_table"] + [f"+{name}" for name in order]
    out["increment_ms_per_1k_rows"] = {b: round(ms[b] - ms[a], 3) for a, b in zip(steps, steps[1:])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--server", help="tcp://HOST:PORT of a running server (default: start a temporary one)")
    args = ap.parse_args()
    rounds = [make_flows(args.rows, r) for r in range(args.rounds)]

    conv: dict[str, list[float]] = {"arrow": [], "list": []}
    conv_dict: dict[str, list[float]] = {"arrow": [], "list": []}
    for flows in rounds:
        dicts = as_dicts(flows)
        for text in conv:  # alternating: the export's records, then the same as dicts
            t = time.process_time()
            got = flows_columns(flows, time_inserted=T0, commit_id=1, text=text)
            conv[text].append(time.process_time() - t)
            t = time.process_time()
            want = flows_to_columns(dicts, time_inserted=T0, commit_id=1, text=text)  # type: ignore[arg-type]
            conv_dict[text].append(time.process_time() - t)
            assert got[1] == want[1] == 0 and all(list(a) == list(b) for a, b in zip(got[0], want[0]))
        del dicts
    result: dict[str, object] = {
        "rows": args.rows, "rounds": args.rounds,
        "transposition": "C extension" if accelerated() else "pure Python",
        "records": "the C export's Records" if aggregation_accelerated() else "the twin's dicts",
        "convert_rows_per_cpu_s_median": {k: round(args.rows / statistics.median(v)) for k, v in conv.items()},
        "convert_cpu_ms_per_1k_rows": {
            "export": {k: round(statistics.median(v) / args.rows * 1e6, 3) for k, v in conv.items()},
            "dict": {k: round(statistics.median(v) / args.rows * 1e6, 3) for k, v in conv_dict.items()},
        },
        "chdb": measure("chdb://", rounds, peer_rows=False),
        "chdb_views": views_cost(rounds),
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
            chdb, server = result["chdb"], result["server"]
            assert isinstance(chdb, dict) and isinstance(server, dict)
            result["chdb_sink_vs_server_peer"] = round(
                chdb["sink_rows_per_s_median"] / server["peer_driver_row_tuples_rows_per_s_median"], 2)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
