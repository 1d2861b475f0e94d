"""The ClickHouse sink against a real ClickHouse server (Debian's clickhouse-server 18.16),
started once for this module on loopback with its own config, ports and data directory.

Proves: the schema's SQL runs on 18.16; rows written through the sink read back field for
field with clickhouse-driver and with clickhouse-client; the query API's numbers equal what
was written; the real aggregator fed by two agents over IPFIX/TCP ends with correlated rows
whose per-Node counters are what each agent sent; a server killed and restarted loses no
row and duplicates none; an aggregator whose ClickHouse is unreachable starts, counts the
failures and what it could not store; a version-4 store is rebuilt to version 5 in place;
the insert blocks flowscope writes itself over the driver's connection store exactly what the
driver's own columnar insert stores (both text forms, a LowCardinality column left to the
driver's writer), and a malformed block is refused before anything is sent.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_tool
from flowscope.aggregator.aggregation import ExportedFlow
from flowscope.aggregator.config import parse_config
from flowscope.aggregator.service import FlowAggregator
from flowscope.aggregator.clickhouse_sink import make_sink
from flowscope.collector.rows import flows_to_columns, row_to_record
from flowscope.collector.schema import COLUMN_NAMES, COLUMNS
from flowscope.collector.server_store import send_block
from flowscope.collector.store import open_store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "aggregator"))  # agg_records

pytestmark = [pytest.mark.timeout(120)]

USER, PASSWORD = "flowscope", "s3cret-pw"

_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{root}/server.log</log><errorlog>{root}/error.log</errorlog>
    <size>10M</size><count>1</count></logger>
  <tcp_port>{tcp}</tcp_port>
  <http_port>{http}</http_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{root}/data/</path>
  <tmp_path>{root}/tmp/</tmp_path>
  <user_files_path>{root}/user_files/</user_files_path>
  <format_schema_path>{root}/format_schemas/</format_schema_path>
  <users_config>{root}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mark_cache_size>134217728</mark_cache_size>
  <uncompressed_cache_size>134217728</uncompressed_cache_size>
  <mlock_executable>false</mlock_executable>
</yandex>
"""
_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>1000000000</max_memory_usage></default></profiles>
  <users>
    <default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile>
      <quota>default</quota></default>
    <{user}><password>{password}</password><networks><ip>127.0.0.1</ip></networks><profile>default</profile>
      <quota>default</quota></{user}>
  </users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
    <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClickHouseServer:
    """clickhouse-server on loopback: its own config, ports and data directory; start, kill, restart."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tcp, self.http = free_port(), free_port()
        (root / "config.xml").write_text(_CONFIG.format(root=root, tcp=self.tcp, http=self.http))
        (root / "users.xml").write_text(_USERS.format(user=USER, password=PASSWORD))
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp}"

    def start(self, timeout: float = 30.0) -> None:
        from clickhouse_driver import Client

        with open(self.root / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(["clickhouse-server", f"--config-file={self.root / 'config.xml'}"],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"clickhouse-server exited {self.proc.returncode}: "
                                   f"{(self.root / 'stdout.log').read_text()[-2000:]}")
            try:
                Client("127.0.0.1", port=self.tcp, connect_timeout=1).execute("SELECT 1")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the server goes away mid-whatever, as a crashed pod would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def client(self):
        from clickhouse_driver import Client

        return Client("127.0.0.1", port=self.tcp, user=USER, password=PASSWORD)

    def cli(self, query: str) -> str:
        return subprocess.run(["clickhouse-client", "--host", "127.0.0.1", "--port", str(self.tcp), "--user", USER,
                               "--password", PASSWORD, "--query", query], capture_output=True, text=True,
                              check=True, timeout=30).stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_tool("clickhouse-server", "clickhouse-client")
    srv = ClickHouseServer(tmp_path_factory.mktemp("clickhouse"))
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("CLICKHOUSE_USERNAME", USER)
    monkeypatch.setenv("CLICKHOUSE_PASSWORD", PASSWORD)


def unique_db() -> str:
    return f"fs_{secrets.token_hex(4)}"


def sink_config(address: str, database: str, **extra):
    ch = {"enabled": True, "address": address, "database": database, "table": "flows", "commitInterval": "8s"}
    ch.update(extra)
    return parse_config({"sinks": {"clickhouse": ch}}).sinks.clickhouse


def full_record(i: int, v6: bool, e6: bool) -> dict:
    from test_aggregator_clickhouse_sink import aggregated

    return aggregated(i, v6=v6, e6=e6)


def _select_all() -> str:
    return ", ".join(f"toUInt32({c.name})" if c.type == "DateTime" else c.name for c in COLUMNS)


async def test_rows_read_back_field_for_field_with_the_driver_and_clickhouse_client(server, env):
    db = unique_db()
    sink = make_sink(sink_config(server.address, db))
    await sink.start()
    flows = [ExportedFlow(full_record(i, v6=bool(i & 1), e6=bool(i & 2)), ("correlated", "external", "denied")[i % 3],
                          i % 2 == 0) for i in range(40)]
    await sink.write(flows[:25])
    await sink.write(flows[25:])
    await sink.close()  # commits what is buffered
    assert sink.committed_rows == 40 and sink.lost_at_close == 0 and sink.commit_failures == 0

    by_key = {(f.record["flowStartSeconds"], f.record["sourceTransportPort"]): f for f in flows}
    rows = server.client().execute(f"SELECT {_select_all()} FROM {db}.flows")
    assert len(rows) == 40
    for row in rows:
        d = dict(zip(COLUMN_NAMES, row))
        f = by_key[(d["flowStartSeconds"], d["sourceTransportPort"])]
        assert row_to_record(d) == f.record
        assert (d["correlation"], d["final"]) == (f.correlation, int(f.final))

    # clickhouse-client, the server's own tool, prints the same values.
    text = server.cli(f"SELECT {_select_all()} FROM {db}.flows FORMAT TabSeparated")
    lines = text.splitlines()
    assert len(lines) == 40
    for line in lines:
        vals = line.split("\t")
        d = {c.name: (int(v) if c.type != "String" else v) for c, v in zip(COLUMNS, vals)}
        f = by_key[(d["flowStartSeconds"], d["sourceTransportPort"])]
        assert row_to_record(d) == f.record
    # The table is the one the docs describe: MergeTree, ordered by time.
    engine = server.cli(f"SELECT engine_full FROM system.tables WHERE database = '{db}' AND name = 'flows'")
    assert engine.startswith("MergeTree() PARTITION BY toYYYYMMDD(flowEndSeconds) ORDER BY (toStartOfMinute(flowEndSeconds)")


async def test_query_api_numbers_equal_what_was_written(server, env):
    from test_clickhouse_chdb import check_query_api

    sink = make_sink(sink_config(server.address, unique_db()))
    try:
        await check_query_api(sink)
    finally:
        await sink.close()


async def test_the_aggregator_fed_over_ipfix_ends_with_correlated_rows(server, env):
    """Two agents send their halves of 30 inter-node connections (and 5 intra-node ones) over
    IPFIX/TCP to the real FlowAggregator, whose configuration enables the sink."""
    from agg_records import agent_record, destination_half, source_half
    from flowscope.ipfix import Address, Template
    from flowscope.ipfix.antrea import agent_fields
    from flowscope.ipfix.exporting import ExportingProcess

    db = unique_db()
    now = [1000.0]
    cfg = parse_config({
        "aggregatorTransportProtocol": "tcp", "listenAddress": "127.0.0.1", "listenPort": 0, "apiAddress": "",
        "flowExportInterval": "60s", "correlationTimeout": "30s", "inactiveFlowTimeout": "90s",
        "sinks": {"clickhouse": {"enabled": True, "address": server.address, "database": db, "commitInterval": "1h"}},
    })
    agg = FlowAggregator(cfg, clock=lambda: now[0])
    await agg.start(api=False, ticker=False)
    n = 30
    src = [source_half(sport=20000 + i, pkts=100 + i, octets=10_000 + i, rpkts=90 + i, roctets=9_000 + i)
           for i in range(n)]
    dst = [destination_half(sport=20000 + i, pkts=97 + i, octets=9_700 + i, rpkts=88 + i, roctets=8_800 + i)
           for i in range(n)]
    intra = [agent_record(flow_type=1, sport=30000 + i, src="10.0.2.3", pkts=5 + i, octets=500 + i,
                          sourcePodNamespace="db", sourcePodName=f"client-{i}", sourceNodeName="node-b",
                          destinationPodNamespace="db", destinationPodName="pg-0", destinationNodeName="node-b")
             for i in range(5)]
    agents = []
    try:
        for domain, records in ((11, src), (22, dst + intra)):
            p = ExportingProcess(Address("127.0.0.1", agg.collecting_port, "tcp"), tls=None,
                                 templates=[Template.build(256, agent_fields(4))], observation_domain_id=domain)
            await p.start()
            agents.append(p)
            assert p.submit(256, records)
        for p in agents:
            await p.flush()
        deadline = time.monotonic() + 15
        while agg.process.stats.records_received < 2 * n + 5:
            assert time.monotonic() < deadline, agg.process.stats
            await asyncio.sleep(0.02)
    finally:
        for p in agents:
            await p.close()
    now[0] += 61  # the export interval passes
    agg.tick()
    await agg.close()  # drains the sink queue; the sink commits on close
    stats = agg.sinks[0].stats()
    assert (stats["written"], stats["failed"], stats["dropped"], stats["committedRows"]) == (n + 5, 0, 0, n + 5)

    cols = ["sourceTransportPort", "correlation", "sourcePodName", "destinationPodName", "sourceNodeName",
            "destinationNodeName", "packetTotalCount", "octetTotalCount", "packetTotalCountFromSourceNode",
            "packetTotalCountFromDestinationNode", "octetTotalCountFromSourceNode", "octetTotalCountFromDestinationNode",
            "reverseOctetTotalCountFromDestinationNode", "originalObservationDomainId", "final"]
    rows = {r[0]: dict(zip(cols, r)) for r in server.client().execute(f"SELECT {', '.join(cols)} FROM {db}.flows")}
    assert len(rows) == n + 5
    for i in range(n):
        r = rows[20000 + i]
        assert r["correlation"] == "correlated"
        assert (r["sourcePodName"], r["destinationPodName"], r["sourceNodeName"], r["destinationNodeName"]) == (
            "frontend-1", "backend-1", "node-a", "node-b")
        assert (r["packetTotalCountFromSourceNode"], r["packetTotalCountFromDestinationNode"]) == (100 + i, 97 + i)
        assert (r["octetTotalCountFromSourceNode"], r["octetTotalCountFromDestinationNode"]) == (10_000 + i, 9_700 + i)
        assert r["reverseOctetTotalCountFromDestinationNode"] == 8_800 + i
        assert (r["packetTotalCount"], r["octetTotalCount"]) == (100 + i, 10_000 + i)  # the source Node's
        assert r["originalObservationDomainId"] == 11
    for i in range(5):
        r = rows[30000 + i]
        assert (r["correlation"], r["sourcePodName"], r["packetTotalCount"]) == ("intra-node", f"client-{i}", 5 + i)
        assert r["originalObservationDomainId"] == 22


async def test_a_killed_and_restarted_server_loses_and_duplicates_nothing(server, env):
    db = unique_db()
    now = [500.0]
    sink = make_sink(sink_config(server.address, db))
    sink.timer, sink.clock = False, (lambda: now[0])
    sink.store.connect_timeout = 2.0
    await sink.start()

    def flows(start: int, k: int) -> list[ExportedFlow]:
        return [ExportedFlow(full_record(i, v6=False, e6=False), "correlated", False) for i in range(start, start + k)]

    await sink.write(flows(0, 100))
    assert await sink.commit() == 100
    server.kill()
    try:
        await sink.write(flows(100, 150))
        assert await sink.commit() == 0
        await sink.write(flows(250, 50))
        now[0] += 1
        assert await sink.commit() == 0
        assert sink.commit_failures == 2 and sink.held == 200 and sink.stats()["connected"] is False
        assert sink.last_error
    finally:
        server.start()
    now[0] = sink.next_due()
    assert await sink.commit() == 200
    await sink.close()
    got = server.client().execute(f"SELECT toUInt32(flowStartSeconds) AS t, sourceTransportPort, count() "
                                  f"FROM {db}.flows GROUP BY t, sourceTransportPort")
    sent = {(f.record["flowStartSeconds"], f.record["sourceTransportPort"]) for f in flows(0, 300)}
    assert {(a, b) for a, b, _ in got} == sent
    assert all(c == 1 for _, _, c in got) and len(got) == 300
    assert (sink.committed_rows, sink.lost_at_close, sink.refused_records) == (300, 0, 0)


async def test_an_aggregator_whose_clickhouse_is_unreachable_starts_and_counts(env, caplog):
    require_tool("clickhouse-server")
    from agg_records import agent_record

    port = free_port()  # nothing listens there
    cfg = parse_config({
        "aggregatorTransportProtocol": "tcp", "listenAddress": "127.0.0.1", "listenPort": 0, "apiAddress": "",
        "sinks": {"clickhouse": {"enabled": True, "address": f"tcp://127.0.0.1:{port}", "commitInterval": "1s"}},
    })
    now = [0.0]
    agg = FlowAggregator(cfg, clock=lambda: now[0])
    await agg.start(api=False, ticker=False)  # does not raise
    ch = agg.sinks[0].sink
    deadline = time.monotonic() + 10
    while ch.commit_failures < 1:  # the first connection attempt happens at start
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert f"127.0.0.1:{port}" in caplog.text and "retry in 1s" in caplog.text
    agg.ingest_records([agent_record(flow_type=3, sport=i, dst="8.8.8.8") for i in range(7)], "192.168.1.1")
    now[0] += 61
    assert len(agg.tick()) == 7
    await agg.close()
    st = agg.sinks[0].stats()
    assert (st["written"], st["lostAtClose"], st["committedRows"]) == (7, 7, 0)
    assert st["commitFailures"] >= 2 and "refused" in st["lastCommitError"].lower()


async def test_the_docs_example_queries_run_on_18_16(server, env):
    from test_clickhouse_chdb import check_doc_queries

    sink = make_sink(sink_config(server.address, unique_db()))
    try:
        await check_doc_queries(sink)
    finally:
        await sink.close()


def test_a_version_4_store_is_rebuilt_on_18_16_every_row_kept_and_new_rows_reach_each_rollup(server, env):
    """Schema version 5's in-place rebuild (the raw table sorted by the minute first, connection
    states in 8-row granules) on the old server, which has no TTL and no cascading views (every
    view reads the raw table): every row and roll-up is kept and the views fire on the rebuilt
    table."""
    from flowscope.collector.rows import flows_to_columns, typed_columns
    from flowscope.collector.schema import rollup_tables
    from flowscope.collector.store import open_store
    from test_collector_migrations import _V4_KEY, _as_version_4, _granularity, _rollup_sums, _sorting_key
    from test_collector_store import FLOWS

    db = unique_db()
    url = f"{server.address}/{db}"
    store = open_store(url)
    store.open()
    try:
        assert store.features.version[:2] == (18, 16) and not store.features.cascading_views
        store.insert(typed_columns(flows_to_columns(FLOWS, time_inserted=int(time.time()), commit_id=3)[0]))
        _as_version_4(store, db)
        assert _sorting_key(store, db) == _V4_KEY and _granularity(store, "flows_conn_1m", db) == "8192"
        raw = store.select(f"SELECT count(), sum(octetDeltaCount), uniqExact(sourceIP, sourceTransportPort, "
                           f"flowEndSeconds) FROM {db}.flows")
        rollups = _rollup_sums(store, db)
    finally:
        store.close()
    again = open_store(url)
    again.open()
    try:
        assert again.schema_version == 5 and _sorting_key(again, db).startswith("toStartOfMinute(flowEndSeconds), ")
        assert [_granularity(again, f"flows_conn_{s}", db) for s in ("1m", "10m", "1h")] == ["8"] * 3
        assert again.select(f"SELECT count(), sum(octetDeltaCount), uniqExact(sourceIP, sourceTransportPort, "
                            f"flowEndSeconds) FROM {db}.flows") == raw
        assert _rollup_sums(again, db) == rollups
        tables = {r[0] for r in again.select(f"SELECT name FROM system.tables WHERE database = '{db}'")}
        assert not any(t.endswith(("__v4", "__v5")) for t in tables)
        again.insert(typed_columns(flows_to_columns(FLOWS, time_inserted=int(time.time()), commit_id=4)[0]))
        for name in rollup_tables("flows"):
            if "conn" not in name:
                assert again.select(f"SELECT sum(records) FROM {db}.{name}")[0][0] == 2 * len(FLOWS), name
        assert again.select(f"SELECT uniqCombinedMerge(connections) FROM {db}.flows_conn_1h") == \
            again.select(f"SELECT uniqCombined(connectionHash) FROM {db}.flows")
    finally:
        again.close()


async def test_the_operators_sample_config_runs_the_aggregator_process_into_clickhouse(server, tmp_path):
    """The operator renders sample 03 (ClickHouse enabled) into a ConfigMap and a Deployment
    whose env takes the Secret's keys; the ``flowscope aggregator`` process run with that
    config (only the addresses changed for loopback) and that env stores what agents send."""
    import yaml
    from agg_records import destination_half, source_half
    from flowscope.ipfix import Address, Template
    from flowscope.ipfix.antrea import agent_fields
    from flowscope.ipfix.exporting import ExportingProcess
    from flowscope.operator.manifests import build_aggregator
    from flowscope.operator.spec import parse_flow_aggregator

    root = Path(__file__).resolve().parents[2]
    sample = next(root.glob("config/samples/03-*clickhouse*.yaml"))
    docs = list(yaml.safe_load_all(sample.read_text()))
    fa = next(d for d in docs if d["kind"] == "FlowAggregator")
    secret = next(d for d in docs if d["kind"] == "Secret")
    objs = build_aggregator(parse_flow_aggregator(fa), image="flowscope:test", tls=None)
    config = yaml.safe_load(next(o for o in objs if o["kind"] == "ConfigMap")["data"]["aggregator.yaml"])
    deployment = next(o for o in objs if o["kind"] == "Deployment")
    env_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
                if e["name"].startswith("CLICKHOUSE_")}
    assert {r["name"] for r in env_refs.values()} == {secret["metadata"]["name"]}
    assert {r["key"] for r in env_refs.values()} <= set(secret["stringData"])
    ours = {"username": USER, "password": PASSWORD}  # this server's credentials, in the Secret's keys
    env = dict(os.environ, **{name: ours[ref["key"]] for name, ref in env_refs.items()})

    ch = config["sinks"]["clickhouse"]
    assert ch["enabled"] is True and ch["address"].startswith("tcp://")
    ch["address"] = server.address  # loopback instead of the cluster Service; database, table, interval as rendered
    config.pop("externalFlowCollectorAddr")
    config["sinks"]["ipfix"]["enabled"] = False
    config.update(listenAddress="127.0.0.1", listenPort=0, apiAddress="127.0.0.1:0", metricsAddress="127.0.0.1:0")
    # the API's bearer token from the Secret the operator mounts, here a file of our own
    assert config["api"]["tokenFile"].startswith("/etc/flowscope/")
    token = tmp_path / "api-token"
    token.write_text("t0ken-" + "x" * 26)
    config["api"]["tokenFile"] = str(token)
    cfg_file = tmp_path / "aggregator.yaml"
    cfg_file.write_text(yaml.safe_dump(config))

    proc = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block; its stderr is read in a thread
        [sys.executable, "-m", "flowscope", "aggregator", "--config", str(cfg_file)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    agent = None
    try:
        seen = []
        while True:
            line = await asyncio.to_thread(proc.stderr.readline)
            assert line, "".join(seen)
            seen.append(line)
            if "collecting tcp on port" in line:
                break
        port = int(line.split("collecting tcp on port ")[1].split(",")[0])
        assert "sinks clickhouse" in line
        agent = ExportingProcess(Address("127.0.0.1", port, "tcp"), tls=None,
                                 templates=[Template.build(256, agent_fields(4))], observation_domain_id=9)
        await agent.start()
        records = [source_half(sport=100 + i, pkts=50 + i, octets=5000 + i) for i in range(12)]
        records += [destination_half(sport=100 + i, pkts=40 + i, octets=4000 + i) for i in range(12)]
        assert agent.submit(256, records)
        await agent.flush()
        await agent.close()
        agent = None
        # The aggregator exports unexported changes at SIGTERM and the sink commits on close;
        # wait until it has the 24 records (its API) before stopping it.
        api_port = int(line.rsplit("API ", 1)[1].split()[0])
        deadline = time.monotonic() + 15
        while True:
            rc = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "flowscope", "aggregator", "recordmetrics", "--server",
                                 f"http://127.0.0.1:{api_port}", "--token-file", str(token), "-o", "json"],
                capture_output=True, text=True,
                check=False)
            if rc.returncode == 0 and '"numRecordsReceived": 24' in rc.stdout:
                break
            assert time.monotonic() < deadline, rc.stdout + rc.stderr
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        err = (await asyncio.to_thread(proc.communicate, timeout=30))[1]
        assert proc.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM), err
    finally:
        if agent is not None:
            await agent.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rows = server.client().execute(
        f"SELECT sourceTransportPort, correlation, packetTotalCountFromSourceNode, packetTotalCountFromDestinationNode, "
        f"octetTotalCount FROM {ch['database']}.{ch['table']} ORDER BY sourceTransportPort")
    assert rows == [(100 + i, "correlated", 50 + i, 40 + i, 5000 + i) for i in range(12)], err


class CuttingProxy:
    """A loopback TCP relay to the server that, once armed, swallows the first answer the
    server sends after the client has sent ``threshold`` more bytes, and cuts the link: an
    insert that landed but whose answer never arrived."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.client_bytes = 0
        self.armed_at: int | None = None
        self.threshold = 0
        self.cuts = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    def arm(self, threshold: int) -> None:
        self.armed_at, self.threshold = self.client_bytes, threshold

    async def _relay(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def up() -> None:
            while data := await cr.read(65536):
                self.client_bytes += len(data)
                sw.write(data)
                await sw.drain()
            sw.close()

        async def down() -> None:
            while data := await sr.read(65536):
                if self.armed_at is not None and self.client_bytes - self.armed_at >= self.threshold:
                    self.armed_at = None
                    self.cuts += 1
                    cw.transport.abort()
                    sw.transport.abort()
                    return
                cw.write(data)
                await cw.drain()
            cw.close()

        await asyncio.gather(up(), down(), return_exceptions=True)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_an_insert_whose_answer_is_lost_is_not_stored_twice(server, env):
    proxy = CuttingProxy(server.tcp)
    port = await proxy.start()
    db = unique_db()
    now = [0.0]
    sink = make_sink(sink_config(f"tcp://127.0.0.1:{port}", db))
    sink.timer, sink.clock = False, (lambda: now[0])
    sink.store.timeout = 5.0
    try:
        await sink.start()
        assert await sink.commit() == 0 and sink.stats()["connected"]  # the table exists
        flows = [ExportedFlow(full_record(i, v6=bool(i & 1), e6=False), "correlated", False) for i in range(2000)]
        await sink.write(flows)
        proxy.arm(threshold=200_000)  # well inside the insert's data (about 0.8 MB)
        assert await sink.commit() == 0  # the answer was lost: a failure, rows kept
        assert proxy.cuts == 1 and sink.commit_failures == 1 and sink.held == 2000
        assert server.client().execute(f"SELECT count() FROM {db}.flows")[0][0] == 2000  # yet it landed
        now[0] = sink.next_due()
        assert await sink.commit() == 2000  # found by its commitId, not inserted again
        assert sink.already_stored == 1 and sink.committed_rows == 2000
        assert server.client().execute(f"SELECT count(), uniqExact(flowStartSeconds, sourceTransportPort) "
                                       f"FROM {db}.flows")[0] == (2000, 2000)
    finally:
        await sink.close()
        await proxy.close()


def test_the_operators_collector_command_stores_into_clickhouse_with_the_secrets_env(server, tmp_path):
    """A FlowAggregator with spec.collector on a ClickHouse store: the rendered collector's
    command line, run for real against this server (address, listen and UI on loopback, the
    token file in tmp), with the Secret's keys as CLICKHOUSE_USERNAME / CLICKHOUSE_PASSWORD
    (as the pod's secretKeyRef env gives them): a wrong password is refused at start, the
    right one opens the store, and the dashboards answer with the token."""
    import base64
    import urllib.error
    import urllib.request

    from flowscope.operator.render import render_documents

    db = unique_db()
    fa = {"apiVersion": "flowscope.dev/v1alpha1", "kind": "FlowAggregator", "metadata": {"name": "fa", "namespace": "ns"},
          "spec": {"transport": "tcp", "collector": {"enabled": True, "store": {"clickhouse": {
              "address": "tcp://clickhouse.ns.svc:9000", "database": db, "credentialsSecretRef": {"name": "ch"}}}}}}
    objs = render_documents([fa], image="i")
    dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "fa-collector")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    keys = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in c["env"]}
    assert keys == {"CLICKHOUSE_USERNAME": "username", "CLICKHOUSE_PASSWORD": "password"}
    token = base64.b64decode(next(o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == "fa-ui-token")
                             ["data"]["token"]).decode()
    (tmp_path / "token").write_text(token)
    ui = free_port()
    moved = {"0.0.0.0:4740:tcp": f"127.0.0.1:{free_port()}:tcp", f"tcp://clickhouse.ns.svc:9000/{db}":
             f"{server.address}/{db}", "0.0.0.0:8080": f"127.0.0.1:{ui}", "/etc/flowscope/ui-token/token":
             str(tmp_path / "token")}
    assert set(moved) <= set(c["args"])
    cmd = [sys.executable, "-m", "flowscope", *[moved.get(a, a) for a in c["args"]]]

    wrong = subprocess.run(cmd, env={**os.environ, "CLICKHOUSE_USERNAME": USER, "CLICKHOUSE_PASSWORD": "wrong"},
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0 and "cannot open the store" in wrong.stderr, wrong.stderr

    log = open(tmp_path / "collector.log", "w+")
    proc = subprocess.Popen(cmd, env={**os.environ, "CLICKHOUSE_USERNAME": USER, "CLICKHOUSE_PASSWORD": PASSWORD},
                            stdout=subprocess.DEVNULL, stderr=log)

    def status(path: str, auth: bool = True) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{ui}{path}",
                                     headers={"Authorization": f"Bearer {token}"} if auth else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        while True:
            assert proc.poll() is None, (tmp_path / "collector.log").read_text()
            try:
                if status("/healthz", auth=False) == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)  # polling for the condition
        assert status("/") == 200 and status("/ui/v1/summary") == 200 and status("/ui/v1/summary", auth=False) == 401
        assert f"{server.address}/{db}" in (tmp_path / "collector.log").read_text()
        assert server.client().execute(f"EXISTS TABLE {db}.flows")[0][0] == 1  # migrated as the Secret's user
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def _flows_for_blocks(n: int) -> list[ExportedFlow]:
    flows = [ExportedFlow(full_record(i, v6=bool(i & 1), e6=bool(i & 2)), ("correlated", "external", "denied")[i % 3],
                          i % 2 == 0) for i in range(n)]
    flows[0].record["sourcePodName"] = ""  # empty text, and text of several bytes a character
    flows[1].record["destinationPodName"] = "p\u00f6d-\u2603-\U0001f600" * 9  # over 127 bytes: a 2-byte length
    return flows


def _rows_by_commit(server, db: str, table: str = "flows") -> dict[int, list[tuple]]:
    cols = _select_all()
    out: dict[int, list[tuple]] = {}
    for row in server.client().execute(f"SELECT commitId, {cols} FROM {db}.{table} ORDER BY commitId, sourceTransportPort, "
                                       "flowStartSeconds, sourceIP"):
        out.setdefault(row[0], []).append(row[1:])
    return out


def test_blocks_written_by_flowscope_store_what_the_drivers_insert_stores(server, env):
    """The same rows through send_block (Arrow-layout text as Native bytes, and lists of str
    through the driver's string writer) and through the driver's own columnar insert:
    every value read back the same, commit by commit."""
    db = unique_db()
    store = open_store(server.address, db, "flows", user=USER, password=PASSWORD)
    store.open()
    try:
        assert store.text_form == "arrow"  # 18.16: every text column a String
        flows, now = _flows_for_blocks(300), int(time.time())
        for commit, text, how in [(1, "arrow", "native"), (2, "list", "native"), (3, "list", "driver"),
                                  (4, "arrow", "driver")]:
            cols, invalid = flows_to_columns(flows, time_inserted=now, commit_id=commit, text=text)
            assert invalid == 0
            if how == "native":
                store.insert(cols)
            else:
                with store._lock:
                    store._driver_insert(cols)
        rows = _rows_by_commit(server, db)
        assert sorted(rows) == [1, 2, 3, 4] and len(rows[1]) == 300
        commit_at = COLUMN_NAMES.index("commitId")
        strip = [[r[:commit_at] + r[commit_at + 1:] for r in rows[c]] for c in (1, 2, 3, 4)]
        assert strip[0] == strip[1] == strip[2] == strip[3]
        by_key = {(f.record["flowStartSeconds"], f.record["sourceTransportPort"]): f for f in flows}
        for row in rows[1]:
            d = dict(zip(COLUMN_NAMES, row))
            assert row_to_record(d) == by_key[(d["flowStartSeconds"], d["sourceTransportPort"])].record
    finally:
        store.close()


def test_a_malformed_block_is_refused_before_anything_is_sent_and_the_connection_still_works(server, env):
    db = unique_db()
    store = open_store(server.address, db, "flows", user=USER, password=PASSWORD)
    store.open()
    try:
        cols, _ = flows_to_columns(_flows_for_blocks(10), time_inserted=int(time.time()), commit_id=1, text="arrow")
        short = list(cols)
        at = COLUMN_NAMES.index("sourcePodName")
        short[at] = flows_to_columns(_flows_for_blocks(9), time_inserted=0, commit_id=1, text="arrow")[0][at]
        with pytest.raises(ValueError, match="column sourcePodName has 9 values, the block 10"):
            store.insert(short)
        with pytest.raises(ValueError, match="74 columns, the table has"):
            store.insert(cols[:-1])
        store.insert(cols)  # the same connection (or a fresh one) takes the next block
        assert store.count() == 10
    finally:
        store.close()


def test_a_column_the_server_types_lowcardinality_goes_through_the_drivers_writer(server, env):
    """18.16 has LowCardinality behind a setting: a table whose sourcePodName is one gets that
    column from the driver's writer and every other column from flowscope's, in one block."""
    db = unique_db()
    store = open_store(server.address, db, "flows", user=USER, password=PASSWORD)
    store.open()
    try:
        client = server.client()
        client.execute(f"CREATE TABLE {db}.flows_lc AS {db}.flows")
        client.execute(f"ALTER TABLE {db}.flows_lc MODIFY COLUMN sourcePodName LowCardinality(String)",
                       settings={"allow_experimental_low_cardinality_type": 1})
        types = dict(client.execute(f"SELECT name, type FROM system.columns WHERE database = '{db}' "
                                    "AND table = 'flows_lc'"))
        assert types["sourcePodName"] == "LowCardinality(String)"
        flows = _flows_for_blocks(50)
        cols, _ = flows_to_columns(flows, time_inserted=int(time.time()), commit_id=7, text="arrow")
        sql = store._insert_sql.replace(f"{store.qualified} ", f"`{db}`.`flows_lc` ", 1)
        assert send_block(store._conn(), sql, cols) == 50
        store.insert(cols)
        got = _rows_by_commit(server, db, "flows_lc")[7]
        assert got == _rows_by_commit(server, db)[7]
    finally:
        store.close()
