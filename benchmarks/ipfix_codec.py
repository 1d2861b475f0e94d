"""Encode and decode throughput of flowscope's IPFIX codec, side by side with PyPI `ipfix`.

Both libraries work on the same records and decode the very same message bytes in the
same run, one core, so the ratio means something on a shared, noisy machine. Cases:

- ``agent_ipv4``: the Antrea agent record, every IE of the design's agent tables for
  IPv4 (IANA, reverse PEN 29305, enterprise PEN 56506), strings included;
- ``agent_ipv6``: the same for IPv6;
- ``fixed_only``: the agent record's fixed-length fields only (no strings), values made
  from the record's index (every address new, every counter and port new each record);
- ``fixed_agent_sets``: the same fields with values shaped as our agent's sets are
  (agent/records.py): one node's Pods as sources, a cluster's endpoints and Services as
  destinations, a few server ports, the end time of one export shared by its records,
  zero deltas for idle connections, "0.0.0.0" where there is no Service or SNAT, in
  no particular order (the connection store's). Informational beside ``fixed_only``,
  whose target it does not replace: what repeats between neighbouring records here is
  what repeats in real sets, and the codec reuses some of it.

The same messages are also decoded into columns (``flowscope_columns``: ipfix/columnar.py's
ColumnarDecoder, one typed array per field per set, what the collector's store takes): its
rate counts the records those columns hold, not records made, and is no record decoder's
result; it is reported apart, with no ratio to the peer.

flowscope is measured twice: as installed (with the C accelerator of ipfix/_speedups.c
when it is built) and with the pure-Python codec forced (``flowscope_pure``), so the
accelerator's gain and both codecs' ratio to the peer come from the same run. The runs
of the three are interleaved, repeat by repeat, so a burst of load elsewhere on the
machine hits all of them alike, and time is the thread's CPU time (``time.thread_time``):
records per second of one core, which other processes on a shared machine slow down
far less than they slow the wall clock.

Decoding consumes records as a collector does (each message decoded, its records
visited, then dropped). Re-export (``reexport_records_per_s``) encodes the records each
codec decoded itself, as the aggregator sends on what it received (flowscope's
accelerated records are then its own split-table dicts; the peer's hold its own types). The inputs are frozen out of the garbage collector's reach
(``gc.freeze``) while they are timed. Prints one JSON object; medians over ``--repeat``
runs, as records per second and as CPU microseconds per 1,000 records (one core's thread
time: a cluster's flow rate times this is the codec's share of its CPU).

    .venv/bin/python benchmarks/ipfix_codec.py [--records 20000] [--repeat 5] [--case fixed_only]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import ipaddress
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from flowscope.ipfix import ANTREA_PEN, DataType, Decoder, ExportSession, Template, accel, default_registry
from flowscope.ipfix import columnar
from flowscope.ipfix import template as template_module
from flowscope.ipfix.antrea import AGENT_IPV4_FIELDS, AGENT_IPV6_FIELDS

CASES = ("agent_ipv4", "agent_ipv6", "fixed_only", "fixed_agent_sets")


def agent_fields(family: int) -> list[str]:
    """Every IE of the design's agent tables for one family, in the agent's template order."""
    return list(AGENT_IPV4_FIELDS if family == 4 else AGENT_IPV6_FIELDS)


def make_records(names: list[str], n: int, family: int) -> list[dict[str, Any]]:
    reg = default_registry()
    out = []
    for i in range(n):
        rec: dict[str, Any] = {}
        for name in names:
            dtype = reg.get(name).data_type
            if dtype is DataType.string:
                rec[name] = f"{name[:12].lower()}-{i % 97}"
            elif dtype is DataType.ipv4Address:
                rec[name] = f"10.{i % 200}.{(i // 200) % 250}.{i % 7 + 1}"
            elif dtype is DataType.ipv6Address:
                rec[name] = f"fd00:10:244:{i % 200:x}::{i % 7 + 1:x}"
            elif dtype is DataType.dateTimeSeconds:
                rec[name] = 1_700_000_000 + i
            elif dtype is DataType.unsigned8:
                rec[name] = i % 4
            elif dtype is DataType.unsigned16:
                rec[name] = i % 65536
            else:
                rec[name] = i * 1500
        out.append(rec)
    return out


def make_agent_sets(names: list[str], n: int) -> list[dict[str, Any]]:
    """Records of ``names`` (fixed-length IPv4 agent fields) shaped as one agent's exports of
    ``n`` connections, 1,000 per export: deterministic (a seeded generator)."""
    import random

    rng = random.Random(12)
    pods = [f"10.244.3.{i}" for i in range(2, 112)]  # one node's Pods
    endpoints = [f"10.244.{i % 20}.{2 + i // 20}" for i in range(2000)]  # the cluster's
    services = [(f"10.96.{i // 200}.{10 + i % 200}", rng.choice([80, 443, 8080, 5432, 6379, 9090])) for i in range(50)]
    out = []
    for i in range(n):
        export = 1_700_000_000 + 60 * (i // 1000)
        via = rng.choice(services) if rng.random() < 0.6 else None
        port = via[1] if via else rng.choice([80, 443, 53, 8080, 9100, 10250])
        packets, rpackets = rng.randint(1, 50_000), rng.randint(1, 50_000)
        idle = rng.random() < 0.4
        snat = rng.random() < 0.1
        rec = {
            "flowStartSeconds": export - rng.randint(1, 3600),
            "flowEndSeconds": export if not idle else export - rng.randint(1, 60),
            "flowEndReason": rng.choice([1, 2, 2, 2, 3]),
            "sourceIPv4Address": rng.choice(pods),
            "destinationIPv4Address": rng.choice(endpoints) if rng.random() < 0.9 else f"203.0.113.{rng.randint(1, 254)}",
            "sourceTransportPort": rng.randint(32768, 60999),
            "destinationTransportPort": port,
            "protocolIdentifier": 17 if port == 53 else 6,
            "packetTotalCount": packets,
            "octetTotalCount": packets * rng.randint(60, 1500),
            "packetDeltaCount": 0 if idle else rng.randint(1, packets),
            "octetDeltaCount": 0 if idle else rng.randint(60, 1500 * packets),
            "reversePacketTotalCount": rpackets,
            "reverseOctetTotalCount": rpackets * rng.randint(60, 1500),
            "reversePacketDeltaCount": 0 if idle else rng.randint(1, rpackets),
            "reverseOctetDeltaCount": 0 if idle else rng.randint(60, 1500 * rpackets),
            "destinationClusterIPv4": via[0] if via else "0.0.0.0",
            "destinationServiceIPv4": via[0] if via else "0.0.0.0",
            "proxySnatIPv4": "192.168.0.3" if snat else "0.0.0.0",
            "destinationServicePort": via[1] if via else 0,
            "ingressNetworkPolicyType": rng.choice([0, 0, 1, 2]),
            "ingressNetworkPolicyRuleAction": rng.choice([0, 0, 1]),
            "egressNetworkPolicyType": rng.choice([0, 0, 1, 2]),
            "egressNetworkPolicyRuleAction": rng.choice([0, 0, 1]),
            "flowType": rng.choice([1, 2, 3]),
            "proxySnatPort": rng.randint(32768, 60999) if snat else 0,
        }
        out.append({name: rec[name] for name in names})
    return out


# Each codec: encode() -> messages; decode(messages) -> records visited; and
# reexport(messages) -> a function encoding the records this codec decoded from them.
Codec = tuple[Callable[[], list[bytes]], Callable[[list[bytes]], int], Callable[[list[bytes]], Callable[[], Any]]]

# ---------------------------------------------------------------------- flowscope


def ours(names: list[str], records: list[dict[str, Any]], *, pure: bool = False) -> Codec:
    """flowscope's encoder and decoder; ``pure``: templates without the C accelerator."""
    native = template_module._native

    def compiled(layout: Any) -> Any:
        return None if pure else native(layout)

    def encode() -> list[bytes]:
        template_module._native = compiled  # type: ignore[assignment]
        try:
            template = Template.build(256, names)
        finally:
            template_module._native = native
        session = ExportSession(1)
        session.add_template(template)
        return session.encode_templates(0) + session.encode_records(256, records, 0)

    def decode(messages: list[bytes]) -> int:
        template_module._native = compiled  # type: ignore[assignment]
        try:
            decoder = Decoder()
            n = 0
            for data in messages:
                for _template, _record in decoder.decode(data).data_records():
                    n += 1
            return n
        finally:
            template_module._native = native

    def reexport(messages: list[bytes]) -> Callable[[], list[bytes]]:
        template_module._native = compiled  # type: ignore[assignment]
        try:
            decoder = Decoder()
            decoded = [r for data in messages for _t, r in decoder.decode(data).data_records()]
            template = Template.build(256, names)
        finally:
            template_module._native = native

        def run() -> list[bytes]:
            session = ExportSession(1)
            session.add_template(template)
            return session.encode_records(256, decoded, 0)

        return run

    return encode, decode, reexport


def ours_columns(messages: list[bytes]) -> int:
    """flowscope's columnar decoder on the same messages: each data set into typed columns
    (the buffers a store takes as they are); the count of records they hold."""
    decoder = columnar.ColumnarDecoder()
    n = 0
    for data in messages:
        for column_set in decoder.decode(data).column_sets:
            n += column_set.count
    return n


# ---------------------------------------------------------------------- PyPI ipfix


def peer(names: list[str], records: list[dict[str, Any]]) -> Codec:
    import ipfix.ie
    import ipfix.message
    import ipfix.template

    ipfix.ie.use_iana_default()
    ipfix.ie.use_5103_default()
    reg = default_registry()
    for name in names:  # declare Antrea's enterprise elements to the package
        ie = reg.get(name)
        if ie.pen == ANTREA_PEN:
            length = 65535 if ie.data_type is DataType.string else ie.data_type.default_length
            ipfix.ie.for_spec(f"{name}({ie.pen}/{ie.element_id})<{ie.data_type.name}>[{length}]")
    template = ipfix.template.from_ielist(256, ipfix.ie.spec_list(names))

    # The package wants its own value types: addresses as ipaddress objects, dateTimeSeconds as datetimes.
    def convert(rec: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in rec.items():
            dtype = reg.get(k).data_type
            if dtype in (DataType.ipv4Address, DataType.ipv6Address):
                v = ipaddress.ip_address(v)
            elif dtype is DataType.dateTimeSeconds:
                v = dt.datetime.utcfromtimestamp(v)
            out[k] = v
        return out

    converted = [convert(r) for r in records]

    def encode(converted: list[dict[str, Any]] = converted) -> list[bytes]:
        msg = ipfix.message.MessageBuffer()
        # It checks only a record's minimum length against the MTU, so a variable-length
        # record near the end of its 64 KiB buffer overflows it: leave it headroom.
        msg.mtu = 60000
        msg.begin_export(1)
        msg.add_template(template)
        out = []
        msg.export_ensure_set(256)
        for rec in converted:
            try:
                msg.export_namedict(rec)
            except ipfix.message.EndOfMessage:
                out.append(msg.to_bytes())
                msg.begin_export(1)
                msg.export_ensure_set(256)
                msg.export_namedict(rec)
        out.append(msg.to_bytes())
        return out

    def decode(messages: list[bytes]) -> int:
        msg = ipfix.message.MessageBuffer()
        n = 0
        for data in messages:
            msg.from_bytes(data)
            for _record in msg.namedict_iterator():
                n += 1
        return n

    def reexport(messages: list[bytes]) -> Callable[[], list[bytes]]:
        msg = ipfix.message.MessageBuffer()
        decoded = []
        for data in messages:
            msg.from_bytes(data)
            decoded += msg.namedict_iterator()
        return lambda: encode(decoded)

    return encode, decode, reexport


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds of each function, run in turn ``repeat`` times; and the last results."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, Any] = {}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.thread_time()
            results[name] = fn()
            times[name].append(time.thread_time() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}, results


def run_case(names: list[str], family: int, n: int, repeat: int, shaped: bool = False) -> dict[str, Any]:
    records = make_agent_sets(names, n) if shaped else make_records(names, n, family)
    codecs = {"flowscope": ours(names, records), "flowscope_pure": ours(names, records, pure=True), "ipfix_pypi": peer(names, records)}
    # The inputs of all three (the peer's hold ipaddress and datetime objects) live through
    # the run, as they would not in a daemon: keep the collector's full passes off them.
    gc.collect()
    gc.freeze()
    enc_t, encoded = interleaved({name: enc for name, (enc, _, _) in codecs.items()}, repeat)
    assert encoded["flowscope"] == encoded["flowscope_pure"], "the accelerated and pure codecs disagree"
    messages = encoded["flowscope"]
    # Every decoder reads the same bytes: ours (with the template message first).
    decoders: dict[str, Callable[[], Any]] = {name: (lambda d=dec: d(messages)) for name, (_, dec, _) in codecs.items()}
    decoders["flowscope_columns"] = lambda: ours_columns(messages)
    dec_t, counts = interleaved(decoders, repeat)
    assert all(c == n for c in counts.values()), (counts, n)
    del encoded, counts
    # Re-export, as the aggregator does: each codec encodes the records it decoded itself.
    runs = {name: again(messages) for name, (_, _, again) in codecs.items()}
    gc.collect()
    gc.freeze()
    re_t, sent = interleaved(runs, repeat)
    assert sent["flowscope"] == sent["flowscope_pure"], "the accelerated and pure codecs disagree on re-export"
    del runs, sent
    gc.unfreeze()
    result: dict[str, Any] = {
        "fields": len(names),
        "record_octets": round(sum(len(m) for m in messages[1:]) / n, 1),
    }
    for name in codecs:
        result[name] = {
            "encode_records_per_s": round(n / enc_t[name]),
            "decode_records_per_s": round(n / dec_t[name]),
            # CPU time of one core per 1,000 records: what a flow rate costs (issue 12)
            "encode_cpu_us_per_1000_records": round(enc_t[name] / n * 1e9, 1),
            "decode_cpu_us_per_1000_records": round(dec_t[name] / n * 1e9, 1),
            "reexport_records_per_s": round(n / re_t[name]),
            "reexport_cpu_us_per_1000_records": round(re_t[name] / n * 1e9, 1),
        }
    result["flowscope_columns"] = {  # columns, not records: no dict is made (ipfix/columnar.py)
        "accelerated": columnar.accelerated(),
        "decode_as_columns_records_per_s": round(n / dec_t["flowscope_columns"]),
        "decode_as_columns_cpu_us_per_1000_records": round(dec_t["flowscope_columns"] / n * 1e9, 1),
    }
    peer_enc, peer_dec = enc_t["ipfix_pypi"], dec_t["ipfix_pypi"]
    result["ratio"] = {  # how many times faster than the peer (and than the pure codec)
        "encode": round(peer_enc / enc_t["flowscope"], 2),
        "decode": round(peer_dec / dec_t["flowscope"], 2),
        "pure_encode": round(peer_enc / enc_t["flowscope_pure"], 2),
        "pure_decode": round(peer_dec / dec_t["flowscope_pure"], 2),
        "accelerator_encode": round(enc_t["flowscope_pure"] / enc_t["flowscope"], 2),
        "accelerator_decode": round(dec_t["flowscope_pure"] / dec_t["flowscope"], 2),
        "reexport": round(re_t["ipfix_pypi"] / re_t["flowscope"], 2),
        "pure_reexport": round(re_t["ipfix_pypi"] / re_t["flowscope_pure"], 2),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--case", action="append", choices=CASES, help="run only this case (repeatable; default: all)")
    args = ap.parse_args(argv)
    reg = default_registry()
    fixed = [n for n in agent_fields(4) if reg.get(n).data_type is not DataType.string]
    cases = {  # name: (fields, address family, values shaped as the agent's sets)
        "agent_ipv4": (agent_fields(4), 4, False),
        "agent_ipv6": (agent_fields(6), 6, False),
        "fixed_only": (fixed, 4, False),
        "fixed_agent_sets": (fixed, 4, True),
    }
    cases = {name: case for name, case in cases.items() if not args.case or name in args.case}
    out = {
        "benchmark": "ipfix_codec",
        "python": sys.version.split()[0],
        "records": args.records,
        "repeat": args.repeat,
        "statistic": "median",
        "clock": "thread CPU time",
        "accelerator": accel.available(),
        "targets": {"agent_records_per_s": 1_000_000, "fixed_only_records_per_s": 3_000_000, "ratio_vs_ipfix_pypi": 3},
        "cases": {name: run_case(names, fam, args.records, args.repeat, shaped) for name, (names, fam, shaped) in cases.items()},
    }
    # Each target beside its measurement: the accelerated codec's median, and the peer's ratio.
    met = {}
    for name, case in out["cases"].items():
        want = out["targets"]["fixed_only_records_per_s" if name.startswith("fixed") else "agent_records_per_s"]
        for way in ("decode", "encode"):
            got = case["flowscope"][f"{way}_records_per_s"]
            ratio = case["ratio"][way]
            met[f"{name}_{way}"] = {"records_per_s": got, "target": want, "met": got >= want,
                                    "ratio_vs_ipfix_pypi": ratio, "ratio_met": ratio >= out["targets"]["ratio_vs_ipfix_pypi"]}
    out["targets_met"] = met
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
