"""CPU per stage of the Flow Aggregator's whole path, per 1,000 records, on one core.

The aggregator's work for each agent record, stage by stage, in one process and without
sockets or an event loop (each stage is the same code the daemon runs, fed in memory):

- ``tls_in``: decrypting the agents' IPFIX byte streams (TLS 1.3 with client
  certificates, ``ssl.MemoryBIO``; the handshake is not counted, it happens once a
  session);
- ``decode``: MessageFramer + Decoder (flowscope.ipfix) over the plaintext;
- ``ingest``: correlation and aggregation (AggregationProcess.ingest_many);
- ``export``: one export scan (``tick``) building the aggregated records (the C
  export's Records, snapshots of the flows; the twin's dicts);
- ``ipfix_out``: encoding them for the IPFIX sink (the aggregator's templates: the sink's
  ``data_records``, for Records the C encoder's data sets, which the session frames as
  messages; the twin's dicts by the codec) and encrypting the stream (``tls_out``);
- ``clickhouse_columns``: the ClickHouse sink's conversion to insert columns
  (aggregator.clickhouse_sink.flows_columns: straight from Records in C, else
  collector.rows.flows_to_columns; the insert itself is ClickHouse's CPU, see
  benchmarks/clickhouse_sink.py).

``held_bytes_per_exported_record`` is what one exported record (its ExportedFlow and
record, values included) holds while it waits in a sink queue, measured with tracemalloc
on a smaller run (``--held-flows``): a Record against the twin's dict.

The input is aggregator_correlation.py's: 100k inter-node flows, each reported by both
nodes, then updated by both (400k records). ``per_1000_records_ms`` divides each stage's
CPU time by the records that came in, so the sum is the cost of the whole path and
``records_per_s`` its throughput on one core; the output stages are also given per
record they handle. ``cpu_per_1000_records_ms`` groups them into the four stages a
cluster's cost is computed from (its flow records per second x the sum / 1000 = CPU
milliseconds per second, i.e. cores x 1000): ``decode`` (TLS in + IPFIX decode),
``correlation_aggregation`` (ingest + the export scan), ``export_encode`` (IPFIX out +
TLS out) and ``sink`` (the ClickHouse conversion). Run it twice to compare codecs: as installed, and with
``FLOWSCOPE_IPFIX_PURE=1`` (the pure-Python codec) in the environment.

The peer measured in the same run is the aggregation's pure-Python twin (the code before
aggregator/_aggr.c, still what serves without a compiler or with
``FLOWSCOPE_AGGREGATOR_PURE=1``): each repeat runs the whole path once with the C ingest
loop and record builder and once with the twin, alternating, so load from other
processes hits both alike; ``twin`` holds its numbers.

    .venv/bin/python benchmarks/aggregator_pipeline.py [--flows 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aggregator_correlation import make_records, to_messages  # noqa: E402

from flowscope.aggregator import aggregation  # noqa: E402
from flowscope.aggregator.aggregation import AggregationProcess  # noqa: E402
from flowscope.aggregator.clickhouse_sink import flows_columns  # noqa: E402
from flowscope.aggregator.sinks import TEMPLATE_IDS, data_records, template_names  # noqa: E402
from flowscope.ipfix import Decoder, ExportSession, MessageFramer, Template, accel  # noqa: E402
from flowscope.ipfix.antrea import agent_fields  # noqa: E402

CLOCK = time.thread_time  # CPU time of this thread: one core's work, not the machine's load


def _cert(tmp: str, name: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = os.path.join(tmp, f"{name}.pem"), os.path.join(tmp, f"{name}.key")
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


class TLSPair:
    """A client and a server TLS session joined in memory (mutual authentication)."""

    def __init__(self, tmp: str) -> None:
        srv_cert, srv_key = _cert(tmp, "aggregator")
        cli_cert, cli_key = _cert(tmp, "agent")
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(srv_cert, srv_key)
        sctx.verify_mode = ssl.CERT_REQUIRED
        sctx.load_verify_locations(cli_cert)
        cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cctx.load_cert_chain(cli_cert, cli_key)
        cctx.load_verify_locations(srv_cert)
        self._c_in, self._c_out, self._s_in, self._s_out = (ssl.MemoryBIO() for _ in range(4))
        self.client = cctx.wrap_bio(self._c_in, self._c_out, server_hostname="aggregator")
        self.server = sctx.wrap_bio(self._s_in, self._s_out, server_side=True)
        for _ in range(10):
            for side in (self.client, self.server):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            self._s_in.write(self._c_out.read())
            self._c_in.write(self._s_out.read())
        self.client.do_handshake()
        self.server.do_handshake()

    def encrypt(self, data: list[bytes]) -> list[bytes]:
        """What the client sends for these messages, in 64 KiB socket reads."""
        for chunk in data:
            self.client.write(chunk)
        wire = self._c_out.read()
        return [wire[i : i + 65536] for i in range(0, len(wire), 65536)]

    def decrypt(self, wire: list[bytes]) -> list[bytes]:
        out = []
        for chunk in wire:
            self._s_in.write(chunk)
            while True:
                try:
                    out.append(self.server.read(1 << 20))
                except ssl.SSLWantReadError:
                    break
        return out


def run_once(n_flows: int, tmp: str, twin: bool = False) -> dict[str, float]:
    rounds = [make_records(n_flows, r) for r in range(2)]
    n_in = sum(len(r) for r in rounds)
    # What each agent sends: its records in IPFIX messages of ~100 records, one TLS session each.
    template = Template.build(256, agent_fields(4))
    by_agent: dict[str, list[tuple[int, list[dict[str, Any]]]]] = {}
    for round_no, records in enumerate(rounds):
        for exporter, recs in to_messages(records):
            by_agent.setdefault(exporter, []).append((round_no, recs))
    sessions: dict[str, tuple[TLSPair, list[bytes], list[int]]] = {}
    for exporter, batches in by_agent.items():
        exp = ExportSession(1)
        exp.add_template(template)
        msgs = exp.encode_templates(0)
        rounds_of = [0]
        for round_no, recs in batches:
            new = exp.encode_records(256, recs, 0)
            msgs += new
            rounds_of += [round_no] * len(new)
        pair = TLSPair(tmp)
        sessions[exporter] = (pair, pair.encrypt(msgs), rounds_of)
    del rounds, by_agent
    gc.collect()
    gc.freeze()
    cpu: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        t0 = CLOCK()
        result = fn()
        cpu[name] = cpu.get(name, 0.0) + CLOCK() - t0
        return result

    plain = {exp: stage("tls_in", lambda p=pair, w=wire: p.decrypt(w)) for exp, (pair, wire, _) in sessions.items()}

    def decode(chunks: list[bytes]) -> list[list[dict[str, Any]]]:
        framer, decoder, out = MessageFramer(), Decoder(), []
        for chunk in chunks:
            for data in framer.feed(chunk):
                msg = decoder.decode(data)
                out.append([rec for _t, rec in msg.data_records()])
        return out

    decoded = {exp: stage("decode", lambda c=chunks: decode(c)) for exp, chunks in plain.items()}
    proc = AggregationProcess(export_interval=60.0, correlation_timeout=30.0, inactive_timeout=90.0, max_flows=n_flows * 2)
    if twin:  # the pure-Python twin serves this run (what FLOWSCOPE_AGGREGATOR_PURE=1 does at import)
        proc._accel = None

    def ingest() -> None:
        # the agents' messages interleaved, round by round, as they arrive
        for round_no in (0, 1):
            queues = [
                [recs for recs, r in zip(decoded[exp], sessions[exp][2]) if r == round_no and recs] for exp in decoded
            ]
            for i in range(max(len(q) for q in queues)):
                for exp, q in zip(decoded, queues):
                    if i < len(q):
                        proc.ingest_many(q[i], exp, 1, 5.0 * (round_no + 1))

    stage("ingest", ingest)
    assert len(proc.flows) == n_flows and proc.stats.flows_correlated == n_flows, proc.stats
    exported = stage("export", lambda: proc.tick(60.0))
    assert len(exported) == n_flows
    out_session = ExportSession(1)
    for (v6, e6), tid in TEMPLATE_IDS.items():
        out_session.add_template(Template.build(tid, template_names(v6, e6)))

    def ipfix_out() -> list[bytes]:
        msgs: list[bytes] = []
        for tid, items, sets in data_records(exported, out_session.data_set_limit):
            msgs += out_session.encode_data_sets(tid, items, 60) if sets else out_session.encode_records(tid, items, 60)
        return msgs

    out_msgs = stage("ipfix_out", ipfix_out)
    out_pair = TLSPair(tmp)
    stage("tls_out", lambda: out_pair.encrypt(out_msgs))
    columns, invalid = stage("clickhouse_columns", lambda: flows_columns(exported, time_inserted=60, commit_id=1))
    assert invalid == 0 and len(columns[0]) == n_flows
    gc.unfreeze()
    cpu["records_in"] = n_in
    cpu["records_out"] = len(exported)
    return cpu


def held_bytes(n_flows: int, twin: bool) -> float:
    """Bytes one exported record holds (ExportedFlow, record, its own values) while queued."""
    import tracemalloc

    proc = AggregationProcess(export_interval=60.0, correlation_timeout=30.0, inactive_timeout=90.0, max_flows=n_flows * 2)
    if twin:
        proc._accel = None
    for records in (make_records(n_flows, 0),):
        for exporter, recs in to_messages(records):
            proc.ingest_many(recs, exporter, 1, 5.0)
    proc.tick(60.0)  # the merge cache filled, as in a running aggregator
    for records in (make_records(n_flows, 1),):
        for exporter, recs in to_messages(records):
            proc.ingest_many(recs, exporter, 1, 65.0)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    exported = proc.tick(120.0)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(exported) == n_flows
    return (after - before) / n_flows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--held-flows", type=int, default=20_000)
    args = ap.parse_args(argv)
    runs, twin_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            runs.append(run_once(args.flows, tmp))
            if aggregation.accelerated():
                twin_runs.append(run_once(args.flows, tmp, twin=True))
    n_in, n_out = runs[0]["records_in"], runs[0]["records_out"]
    stages = [k for k in runs[0] if not k.startswith("records_")]
    med = {k: statistics.median(r[k] for r in runs) for k in stages}
    total = sum(med.values())
    twin_med = {k: statistics.median(r[k] for r in twin_runs) for k in stages} if twin_runs else None
    groups = {
        "decode": ("tls_in", "decode"),
        "correlation_aggregation": ("ingest", "export"),
        "export_encode": ("ipfix_out", "tls_out"),
        "sink": ("clickhouse_columns",),
    }
    # go-ipfix's aggregation (Antrea's Flow Aggregator) as documented in issue 12: 6.3 us a
    # record. Not measured here: this machine has no Go toolchain, and the go-ipfix copy in
    # /work/shared/tools/go-ipfix holds its collector binaries and ipfixdump's main.go only,
    # not pkg/intermediate (the aggregation and its benchmark).
    peer_us = 6.3
    corr_ms = sum(med[k] for k in groups["correlation_aggregation"]) / n_in * 1e6
    twin_out = None
    if twin_med is not None:
        twin_total = sum(twin_med.values())
        twin_out = {
            "what": "the aggregation's pure-Python twin (the previous code), same input, alternating runs",
            "per_1000_records_ms": {k: round(v / n_in * 1e6, 3) for k, v in twin_med.items()},
            "cpu_per_1000_records_ms": {g: round(sum(twin_med[k] for k in ks) / n_in * 1e6, 3)
                                        for g, ks in groups.items()},
            "records_per_s": round(n_in / twin_total),
            "held_bytes_per_exported_record": round(held_bytes(args.held_flows, True)),
            "ratio_records_per_s": round(twin_total / total, 2),
            "ratio_correlation_aggregation_cpu": round(
                sum(med[k] for k in groups["correlation_aggregation"])
                / sum(twin_med[k] for k in groups["correlation_aggregation"]), 2),
        }
    print(json.dumps({
        "benchmark": "aggregator_pipeline",
        "python": sys.version.split()[0],
        "ipfix_accelerator": accel.available(),
        "aggregation_accelerator": aggregation.accelerated(),
        "flows": args.flows,
        "records_in": n_in,
        "records_out": n_out,
        "repeat": args.repeat,
        "clock": "thread CPU time, medians per stage",
        "per_1000_records_ms": {k: round(v / n_in * 1e6, 3) for k, v in med.items()},
        "per_1000_records_out_ms": {k: round(med[k] / n_out * 1e6, 3) for k in ("export", "ipfix_out", "tls_out", "clickhouse_columns")},
        "cpu_per_1000_records_ms": {g: round(sum(med[k] for k in ks) / n_in * 1e6, 3) for g, ks in groups.items()},
        "whole_path_per_1000_records_ms": round(total / n_in * 1e6, 3),
        "records_per_s": round(n_in / total),
        "peer": "go-ipfix aggregation, documented (issue 12): 6.3 us a record; not runnable here (no Go toolchain, no go-ipfix pkg/intermediate sources)",
        "peer_per_1000_records_ms": peer_us,
        "ratio_correlation_aggregation_vs_peer": round(corr_ms / peer_us, 2),
        "held_bytes_per_exported_record": round(held_bytes(args.held_flows, False)),
        "twin": twin_out,
        "target": {"records_per_s": 300_000},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
