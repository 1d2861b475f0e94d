"""The dashboards' queries at production size: a generated cluster's day of flows in chDB,
every query the dashboards and ``flowscope flows --top`` issue timed, p50/p95, and the
store's bytes on disk per flow.

The cluster (``--rows`` flows, 10M by default): 5,000 Pods in 50 namespaces on 50 Nodes,
200 Services, 100 network policies (ingress, and 10 cluster policies on egress), a day of
history ending now; Pod popularity is skewed (a Zipf-like weight), a third of
pairs go through a Service, 8% of flows leave the cluster, 4% come in from outside; each
Pod talks to 6 peers, and a pair's policy verdict is fixed (3% of pairs dropped, 1%
rejected, by the ingress policy of the destination). Columns are
generated with numpy and handed to the store's insert as arrow arrays, in blocks of
``--block`` rows (the materialized views roll every block up as it lands).

Each query runs ``--repeat`` times after one warm-up; the time is the query layer's
(SQL built, run, rows turned into results); then once more counting what chDB read
(``statements``, ``rows_read``, ``mb_read``: whether the range was pruned to its
granules). Windows: the last 24 h on whole hours as the dashboards send it (the 1-hour
roll-ups answer), the same on whole minutes (the edges from the 10- and 1-minute
roll-ups), the last 1 h on whole minutes, and the last 15 min unaligned (its edge
seconds from the raw table), to show each. The peer, in the same run: some of the
questions asked of the raw table (``source=raw``), with a check that the answers are
the same. Sizes: rows and bytes on disk of every table, and per stored flow; with a kept
``--dir`` of an older schema, ``open_seconds`` is its migration.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowscope.collector import query
from flowscope.collector.schema import COLUMNS, rollup_tables
from flowscope.collector.store import open_store

PODS, NAMESPACES, NODES, SERVICES, POLICIES = 5000, 50, 50, 200, 100
PEERS = 6  # destinations per source Pod


def _strings(values: list[str], idx: np.ndarray) -> pa.Array:
    return pc.take(pa.array(values, type=pa.string()), pa.array(idx))


def generate(n: int, end: int, seed: int) -> dict[str, Any]:
    """One block of n flows as columns (numpy for numbers, arrow for text)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, PODS + 1) ** 0.6
    weights /= weights.sum()
    src = rng.choice(PODS, n, p=weights)
    # Each Pod talks to a few peers (its Services' backends), as in a real cluster: a Pod's
    # connections repeat, which is what the roll-ups fold.
    peers = (np.arange(PODS)[:, None] * 31 + np.arange(PEERS)[None, :] * 997 + 7) % PODS
    dst = peers[src, rng.integers(0, PEERS, n)]
    kind = rng.random(n)
    to_ext, from_ext = kind < 0.08, (kind >= 0.08) & (kind < 0.12)
    svc = dst % SERVICES  # the Service in front of the destination Pod
    svc_hit = ((src + dst) % 3 == 0) & ~to_ext & ~from_ext  # a third of the pairs go through it
    pod_ns = np.arange(PODS) % NAMESPACES
    pod_node = (np.arange(PODS) * 7) % NODES
    pod_names = [f"app{p % 400}-{(p * 2654435761) % 0xfffff:05x}{'abcdef'[p % 6]}-{p:05d}" for p in range(PODS)]
    ns_names = [f"ns-{i:02d}" for i in range(NAMESPACES)]
    node_names = [f"node-{i:02d}" for i in range(NODES)]
    svc_names = [f"ns-{i % NAMESPACES:02d}/svc-{i}:http" for i in range(SERVICES)]
    pol_names = [f"policy-{i}" for i in range(POLICIES)]
    end_t = end - rng.integers(0, 86400, n)
    dur = rng.integers(1, 300, n)
    octets = rng.lognormal(8, 2, n).astype(np.uint64) + 40
    rocts = rng.lognormal(9, 2, n).astype(np.uint64)
    pkts = octets // 900 + 1
    rpkts = rocts // 900
    same_node = pod_node[src] == pod_node[dst]
    flow_type = np.where(to_ext, 3, np.where(from_ext, 4, np.where(same_node, 1, 2))).astype(np.uint8)
    pol = dst % POLICIES  # the policy selecting the destination Pod
    has_in = (dst % 5 < 3) & ~to_ext
    pair = (src * 7919 + dst) % 100  # a pair's verdict is the same for each of its connections
    in_action = np.where(has_in, np.where(pair < 3, 2, np.where(pair < 4, 3, 1)), 0).astype(np.uint8)
    has_eg = (src % 10 < 3) & ~from_ext
    eg_action = np.where(has_eg, 1, 0).astype(np.uint8)
    empty = np.zeros(n, dtype=np.int64)
    blank = pa.array([""], type=pa.string())

    def text(values: list[str], idx: np.ndarray, present: np.ndarray | None = None) -> pa.Array:
        arr = _strings(values, idx)
        if present is None:
            return arr
        return pc.if_else(pa.array(present), arr, pc.take(blank, pa.array(empty)))

    src_pod = ~from_ext
    dst_pod = ~to_ext
    ips = [f"10.{p // 250 % 256}.{p % 250}.{p % 7 + 1}" for p in range(PODS)]
    cols: dict[str, Any] = {c.name: np.zeros(n, dtype=np.uint64 if c.type == "UInt64" else np.uint32)
                            for c in COLUMNS if c.is_int}
    for c in COLUMNS:
        if c.is_int:
            cols[c.name] = cols[c.name].astype({"UInt8": np.uint8, "UInt16": np.uint16, "UInt32": np.uint32,
                                                "UInt64": np.uint64, "DateTime": np.uint32}[c.type])
        else:
            cols[c.name] = text([""], empty)
    cols.update(
        timeInserted=np.full(n, end, dtype=np.uint32), flowEndSeconds=end_t.astype(np.uint32),
        flowStartSeconds=(end_t - dur).astype(np.uint32), flowEndReason=rng.choice([1, 2, 2, 3], n).astype(np.uint8),
        sourceTransportPort=rng.integers(30000, 61000, n).astype(np.uint16),
        destinationTransportPort=np.array([80, 443, 8080, 5432, 6379, 53], dtype=np.uint16)[dst % 6],
        protocolIdentifier=np.where(dst % 6 == 5, 17, 6).astype(np.uint8),
        octetDeltaCount=octets, packetDeltaCount=pkts, reverseOctetDeltaCount=rocts, reversePacketDeltaCount=rpkts,
        octetTotalCount=octets, packetTotalCount=pkts, reverseOctetTotalCount=rocts, reversePacketTotalCount=rpkts,
        flowType=flow_type, ingressNetworkPolicyRuleAction=in_action, egressNetworkPolicyRuleAction=eg_action,
        ingressNetworkPolicyType=np.where(has_in, 1, 0).astype(np.uint8),
        egressNetworkPolicyType=np.where(has_eg, 3, 0).astype(np.uint8),
        destinationServicePort=np.where(svc_hit, 80, 0).astype(np.uint16),
        final=(rng.random(n) < 0.5).astype(np.uint8), commitId=np.arange(n, dtype=np.uint64),
        sourceIP=text(ips, src), destinationIP=pc.if_else(pa.array(to_ext), _strings(["203.0.113.7"], empty),
                                                           _strings(ips, dst)),
        destinationClusterIP=pc.if_else(pa.array(svc_hit), _strings([f"10.96.0.{i % 250}" for i in range(SERVICES)], svc),
                                        _strings(["0.0.0.0"], empty)),
        originalExporterIP=_strings([f"192.168.0.{i + 1}" for i in range(NODES)], pod_node[src]),
        sourcePodNamespace=text(ns_names, pod_ns[src], src_pod), sourcePodName=text(pod_names, src, src_pod),
        sourceNodeName=text(node_names, pod_node[src], src_pod),
        destinationPodNamespace=text(ns_names, pod_ns[dst], dst_pod), destinationPodName=text(pod_names, dst, dst_pod),
        destinationNodeName=text(node_names, pod_node[dst], dst_pod),
        destinationServicePortName=text(svc_names, svc, svc_hit),
        ingressNetworkPolicyNamespace=text(ns_names, pod_ns[dst], has_in), ingressNetworkPolicyName=text(pol_names, pol, has_in),
        ingressNetworkPolicyRuleName=text(["rule-1", "rule-2"], pol % 2, has_in),
        egressNetworkPolicyName=text([f"acnp-{i}" for i in range(10)], pol % 10, has_eg),
        egressNetworkPolicyRuleName=text(["egress-1"], empty, has_eg),
        tcpState=text(["ESTABLISHED", "TIME_WAIT", "CLOSE"], rng.integers(0, 3, n)),
        correlation=text(["correlated", "intra-node", "external"], rng.integers(0, 3, n)),
    )
    return cols


def queries(now: int) -> dict[str, query.FlowQuery]:
    """What the dashboards and --top ask, by name."""
    minute = now - now % 60
    hour_end = (now // 3600 + 1) * 3600
    day = query.FlowQuery(start=hour_end - 86400, end=hour_end)  # the dashboards' 24 h: whole hours
    day_minutes = query.FlowQuery(start=minute - 86400, end=minute)  # whole minutes: edges from the 1-minute roll-ups
    hour = query.FlowQuery(start=minute - 3600, end=minute)
    recent = query.FlowQuery(start=now - 900, end=now)  # unaligned: the raw table
    out: dict[str, Any] = {}
    for name, q in (("24h", day), ("24h-minutes", day_minutes), ("1h", hour), ("15m-raw", recent)):
        out[f"overview {name}"] = ("overview", q, None)
        for g in ("srcPod", "dstPod", "srcNamespace", "dstNamespace", "service", "policy", "srcNode", "flowType"):
            out[f"top {g} {name}"] = ("top", q.with_(group=g, top=10), None)
        out[f"top srcPod action=drop {name}"] = ("top", q.with_(group="srcPod", filter="action = drop"), None)
        out[f"top dstPod namespace=ns-03 {name}"] = ("top", q.with_(group="dstPod", filter='namespace = "ns-03"'), None)
        out[f"series dstNamespace {name}"] = ("series", q.with_(group="dstNamespace", top=10), None)
        out[f"series srcNode throughput {name}"] = ("series", q.with_(group="srcNode", by="throughput"), None)
        out[f"sankey ns->ns {name}"] = ("sankey", q.with_(group="srcNamespace", top=50), "dstNamespace")
        out[f"sankey pod->service {name}"] = ("sankey", q.with_(group="srcPod", top=50, filter="service != \"\""),
                                              "service")
        out[f"sankey pod->external {name}"] = ("sankey", q.with_(group="srcPod", top=15, filter="type = to-external"),
                                               "dstIP")
        out[f"series srcPod throughput {name}"] = ("series", q.with_(group="srcPod", by="throughput", top=8), None)
        out[f"flows page ns-07 {name}"] = ("flows", q.with_(filter='namespace = "ns-07"', limit=100), None)
        out[f"flows page drops {name}"] = ("flows", q.with_(filter="action in (drop, reject)", limit=100), None)
    out["complete pod app1"] = ("complete", day, "pod")
    out["complete namespace"] = ("complete", day, "namespace")
    return out


class _Counted:
    """The store as the query layer sees it, counting what chDB read for each statement
    (storage rows and bytes: whether a range was pruned to its granules)."""

    def __init__(self, store: Any) -> None:
        self.store, self.database, self.table = store, store.database, store.table
        self.statements = self.rows_read = self.bytes_read = 0

    def rows(self, sql: str, params: Any) -> list[tuple[Any, ...]]:
        from flowscope.collector.filter import bind

        res = self.store._conn().query(bind(sql, params) + " SETTINGS output_format_json_quote_64bit_integers = 0",
                                       "JSONCompact")
        self.statements += 1
        self.rows_read += res.storage_rows_read()
        self.bytes_read += res.storage_bytes_read()
        data = res.bytes()
        return [tuple(r) for r in json.loads(data)["data"]] if data else []


def run(store: Any, kind: str, q: query.FlowQuery, extra: Any) -> tuple[Any, str]:
    if kind == "overview":
        return query.overview(store, q), "-"
    if kind == "top":
        r = query.top(store, q)
        return r, r.table
    if kind == "series":
        r = query.series(store, q)
        return r, r.table
    if kind == "sankey":
        return query.sankey(store, q, extra), "-"
    if kind == "flows":
        return query.flows(store, q), "flows"
    return query.complete(store, extra, "app1" if extra == "pod" else "", q=q), "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--block", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--dir", help="chDB directory (default: a temporary one, removed); one that already holds "
                                  "--rows flows is queried again without loading")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="fs-store-bench-")
    store = open_store(f"chdb://{root}/store")
    t_open = time.perf_counter()
    store.open()  # a kept --dir of an older schema is migrated here
    open_s = time.perf_counter() - t_open
    now = int(time.time())
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    done = 0
    if store.count() == args.rows:  # a kept --dir: query what it holds, as of its newest row
        done = args.rows
        now = int(store.select(f"SELECT max(toUInt32(timeInserted)) FROM {store.qualified}")[0][0])
    loaded = done == 0
    while done < args.rows:
        n = min(args.block, args.rows - done)
        cols = generate(n, now, seed=done)
        store.insert([cols[c.name] for c in COLUMNS])
        done += n
    load_s, load_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    store.execute(f"OPTIMIZE TABLE {store.qualified} FINAL")  # as the server's merges would, given time
    for name in rollup_tables(store.table):
        store.execute(f"OPTIMIZE TABLE `{store.database}`.`{name}` FINAL")
    counts = {t: store.count(t) for t in ("flows",) + rollup_tables("flows")}
    open_s = round(open_s, 1)
    sizes = dict((str(t), int(b)) for t, b in store.select(
        f"SELECT table, sum(bytes_on_disk) FROM system.parts WHERE database = '{store.database}' AND active "
        "GROUP BY table"))
    results: dict[str, Any] = {}
    peers: dict[str, Any] = {}

    def timed(kind: str, q: query.FlowQuery, extra: Any, repeat: int) -> tuple[dict[str, Any], Any]:
        first, table = run(store, kind, q, extra)  # warm-up
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            _, table = run(store, kind, q, extra)
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        counted = _Counted(store)
        run(counted, kind, q, extra)
        return {"table": table, "p50_ms": round(statistics.median(times), 1),
                "p95_ms": round(times[max(int(len(times) * 0.95) - 1, 0)], 1), "statements": counted.statements,
                "rows_read": counted.rows_read, "mb_read": round(counted.bytes_read / 1e6, 1)}, first

    for name, (kind, q, extra) in queries(now).items():
        results[name], answer = timed(kind, q, extra, args.repeat)
        if (name.endswith(" 24h") and (kind in ("overview", "sankey") or name.startswith(("top srcPod 24h",
                                                                                           "series srcPod")))
                or name in ("top dstPod 24h-minutes", "series srcPod throughput 1h", "top policy 15m-raw")):
            # the peer, in the same run: the same question to the raw table (what a store
            # without roll-ups pays), and its answer, which must be the same
            peers[name], raw_answer = timed(kind, q.with_(source="raw"), extra, max(3, args.repeat // 4))
            same = (raw_answer == answer) if kind != "top" and kind != "series" else (
                raw_answer.to_json() | {"table": ""} == answer.to_json() | {"table": ""})
            peers[name]["same_answer"] = same
            peers[name]["ratio_raw_to_rollup_p50"] = round(peers[name]["p50_ms"] / max(results[name]["p50_ms"], .1), 1)
    p95s = [r["p95_ms"] for r in results.values()]
    out = {
        "rows": args.rows, "pods": PODS, "namespaces": NAMESPACES, "nodes": NODES, "services": SERVICES,
        "policies": POLICIES, "repeat": args.repeat, "cpus": os.cpu_count(),
        "load_seconds": round(load_s, 1) if loaded else None,
        "load_rows_per_s": round(args.rows / load_s) if loaded else None,
        "load_cpu_seconds": round(load_cpu, 1) if loaded else None,
        "table_rows": counts, "bytes_on_disk": sizes,
        "bytes_per_flow_raw": round(sizes.get("flows", 0) / max(counts["flows"], 1), 1),
        "bytes_per_flow_all_tables": round(sum(sizes.values()) / max(counts["flows"], 1), 1),
        "open_seconds": open_s, "load_average_1m": round(os.getloadavg()[0], 1),
        "queries": results,
        "peer_raw_table": peers,
        "max_p95_ms": max(p95s), "queries_over_300ms_p95": sorted(k for k, r in results.items() if r["p95_ms"] > 300),
    }
    store.close()
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
