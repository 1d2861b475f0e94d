"""The collector's columnar path (collector/rows.py sets_to_columns, StoreWriter.offer_sets):
data sets decoded into columns become the very rows that the same messages decoded into
dicts become (records_to_columns), whatever the templates carry: every element, a few,
IPv6, both families in one template, an element sent with a length its column cannot
hold (left out and counted the same), and dict records in the same batch; through the
writer into chDB the rows are stored, within the bound, the overflow counted, and the
open batch committed at close."""

from __future__ import annotations

from typing import Any

from flowscope.collector.ingest import StoreWriter
from flowscope.collector.rows import records_to_columns, sets_to_columns
from flowscope.collector.schema import COLUMN_NAMES
from flowscope.collector.store import open_store
from flowscope.ipfix import Decoder, ExportSession, Template
from flowscope.ipfix.antrea import ENDED_REASONS, aggregator_fields
from flowscope.ipfix.columnar import ColumnarDecoder
from store_records import aggregated_record

from test_collector_ingest import ScriptedStore, wait


def _records(n: int, v6: bool = False, start: int = 0) -> list[dict[str, Any]]:
    out = []
    for i in range(start, start + n):
        r = aggregated_record(
            v6, sourceTransportPort=i % 65536, octetDeltaCount=i * 1000 + 7, flowEndReason=(2, 3)[i % 2],
            sourcePodNamespace=f"ns-{i % 5}", sourcePodName=f"wéb-{i % 7}", flowEndSeconds=1_700_000_000 + i,
            destinationServicePortName="shop/backend:http" if i % 3 else "")
        if v6:
            r["sourceIPv6Address"] = f"fd00::{i:x}"
        else:
            r["sourceIPv4Address"] = f"10.{i % 250}.0.{i % 7 + 1}"
        out.append(r)
    return out


def _session(templates: dict[int, list[Any]], batches: list[tuple[int, list[dict[str, Any]]]]) -> list[bytes]:
    s = ExportSession(1)
    for tid, names in templates.items():
        s.add_template(Template.build(tid, names))
    msgs = s.encode_templates(1000)
    for tid, recs in batches:
        msgs += s.encode_records(tid, recs, 1000)
    return msgs


def _both(msgs: list[bytes]) -> tuple[list[Any], list[Any]]:
    plain, cols = Decoder(), ColumnarDecoder()
    records, sets = [], []
    for m in msgs:
        records += [r for _, r in plain.decode(m).data_records()]
        sets += cols.decode(m).column_sets
    return records, sets


def _rows(columns: list[Any]) -> list[tuple[Any, ...]]:
    return sorted(zip(*[list(c) for c in columns]), key=repr)


def _convert_both(records: list[Any], sets: list[Any], extra: list[Any] = ()) -> tuple[Any, Any]:  # type: ignore[assignment]
    kw = dict(correlation="collected", ended=ENDED_REASONS, time_inserted=1_700_000_100, commit_id=42)
    want, bad_want = records_to_columns(records + list(extra), text="arrow", **kw)  # type: ignore[arg-type]
    got, bad_got = sets_to_columns(sets, list(extra), **kw)  # type: ignore[arg-type]
    return (_rows(want), bad_want), (_rows(got), bad_got)


V4 = list(aggregator_fields(4))
V6 = list(aggregator_fields(6))


def test_column_sets_become_the_rows_the_same_records_become() -> None:
    few = ["sourceIPv4Address", "destinationIPv4Address", "octetDeltaCount", "flowEndSeconds", "flowEndReason",
           "sourcePodName"]
    both = few + ["sourceIPv6Address"]
    templates = {256: V4, 257: V6, 258: few, 259: both}
    v4, v6 = _records(300), _records(40, v6=True)
    mixed = [{k: r[k] for k in few} | {"sourceIPv6Address": "fd00::9" if i % 2 else "::"} for i, r in enumerate(v4[:20])]
    msgs = _session(templates, [(256, v4), (257, v6), (258, [{k: r[k] for k in few} for r in v4[:50]]),
                                (259, mixed)])
    records, sets = _both(msgs)
    assert len(records) == sum(s.count for s in sets) == 410
    want, got = _convert_both(records, sets, extra=_records(5, start=9000))
    assert got == want and want[1] == 0
    assert len(want[0]) == 415
    row = dict(zip(COLUMN_NAMES, want[0][0]))
    assert row["correlation"] == "collected" and row["commitId"] == 42 and row["timeInserted"] == 1_700_000_100

    # a template whose element the column cannot hold (flowEndReason in 2 octets: unsigned8
    # allows 1, so the decoder keeps raw octets): every record left out, as the dict path does
    s = ExportSession(1)
    s.add_template(Template(260, [f if f.ie.name != "flowEndReason" else type(f)(f.ie, 2)
                                  for f in Template.build(260, few).fields]))
    bad_msgs = s.encode_templates(1000)
    bad_msgs += s.encode_records(260, [dict({k: r[k] for k in few}, flowEndReason=b"\x00\x03") for r in v4[:9]], 1000)
    records, sets = _both(bad_msgs)
    want, got = _convert_both(records, sets)
    assert got == want and want[1] == 9 and want[0] == []


def test_the_writer_stores_column_sets_within_its_bound_and_commits_the_open_batch_at_close() -> None:
    store = ScriptedStore()
    w = StoreWriter(store, batch_rows=100, max_rows=300, commit_interval=60)
    store.down.set()
    w.start()
    _, sets = _both(_session({256: V4}, [(256, _records(60, start=k * 60)) for k in range(8)]))
    per_message = [[s] for s in sets]
    taken = sum(w.offer_sets(m) for m in per_message)
    st = w.stats()
    assert taken == st.held <= 300 and st.overflow == st.offered - taken > 0  # past the bound: refused, counted
    store.down.clear()
    wait(lambda: w.stats().held < 100)  # the closed batches are in; the open one waits
    w.offer(_records(3, start=5000))  # dict records join the open batch of column sets
    w.close()
    st = w.stats()
    assert (st.committed, st.held, st.lost_at_close, st.invalid) == (taken + 3, 0, 0, 0)
    ports = sorted(r["sourceTransportPort"] for r in store.stored)
    assert len(ports) == len(set(ports)) == taken + 3  # never twice
    assert sum(r["final"] for r in store.stored) == sum(1 for r in store.stored if r["flowEndReason"] == 3)


def test_column_sets_land_in_chdb_as_rows(tmp_path) -> None:
    store = open_store(f"chdb://{tmp_path}/store")
    store.open()
    try:
        w = StoreWriter(store, batch_rows=1000, max_rows=10_000, commit_interval=0.05)
        w.start()
        _, sets = _both(_session({256: V4, 257: V6}, [(256, _records(500)), (257, _records(80, v6=True))]))
        assert w.offer_sets(sets) == 580
        wait(lambda: w.stats().committed == 580)
        w.close()
        rows = store.select("SELECT sourceIP, sourcePodName, octetDeltaCount, final, correlation FROM flowscope.flows "
                            "WHERE sourceTransportPort = 7 ORDER BY sourceIP")
        # record 7: flowEndReason 3 (end of flow) is final
        assert rows == [("10.7.0.1", "wéb-0", 7007, 1, "collected"), ("fd00::7", "wéb-0", 7007, 1, "collected")]
        assert store.count("flows_1m") > 0  # the roll-ups are fed as from any insert
    finally:
        store.close()
