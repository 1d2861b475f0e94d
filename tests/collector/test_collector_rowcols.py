"""The store's records-to-columns transposition: the C extension (collector/_rowcols.c)
against its pure-Python twin (collector/rows.py), value for value, on valid and malformed
records (hypothesis); and what either keeps: every valid record exactly, every record
with a value its column cannot hold left out and counted, nothing stored wrong. The same
for the text columns' Native layout (native_text): the same bytes from both on any text,
the same refusals of offsets that go backwards or past the data, and the layout
ClickHouse documents (a LEB128 length, then the UTF-8 bytes)."""

from __future__ import annotations

import types
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowscope.collector import rows
from flowscope.collector.rows import TextColumn, native_text, records_to_columns, row_to_record, transpose
from flowscope.collector.schema import COLUMN_NAMES, RECORD_COLUMNS
from flowscope.ipfix.accel import say_once
from store_records import aggregated_record

needs_c = pytest.mark.skipif(rows._rowcols is None, reason="the C extension is not built")  # CI builds it

ELEMENTS = sorted({e for c in RECORD_COLUMNS for e in c.elements})
_COL_OF = {e: c for c in RECORD_COLUMNS for e in c.elements}


def plain(columns: list) -> list[list]:
    return [list(c) for c in columns]


def c_transpose(records, correlation, text):
    out, bad = rows._rowcols.transpose(records, rows._SLOT_OF, len(rows._SLOT_OF), rows._PLAN, correlation,
                                       text == "list")
    cols = []
    for col, v in zip((*RECORD_COLUMNS, None), out):
        if col is not None and col.is_int:
            a = array(rows.ARRAY_CODES[col.type])
            a.frombytes(v)
            cols.append(list(a))
        elif isinstance(v, tuple):
            cols.append(list(TextColumn(*v)))
        else:
            cols.append(list(v))
    return cols, bad


def good_value(name: str):
    col = _COL_OF[name]
    if col.is_int:
        return st.integers(0, col.maximum)
    return st.text(max_size=12)


# values a column may be handed by a broken or hostile exporter or a bug upstream
hostile = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.binary(max_size=4),
    st.text(max_size=6), st.just("\ud800"), st.just("ü\udfff"), st.lists(st.integers(), max_size=2),
    st.just(()), st.just(0),
)


@st.composite
def record(draw):
    base = aggregated_record(v6=draw(st.booleans()), sourcePodName=draw(st.text(max_size=8)),
                             octetDeltaCount=draw(st.integers(0, 2**64 - 1)))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(ELEMENTS))
        base[name] = draw(st.one_of(good_value(name), hostile))
    for _ in range(draw(st.integers(0, 2))):
        base.pop(draw(st.sampled_from(sorted(base))), None)
    if draw(st.booleans()):
        base[draw(st.sampled_from(["unknownElement", "_exporter", "sourceIPv6Address"]))] = draw(hostile)
    kind = draw(st.sampled_from(["dict", "dict", "dict", "proxy", "none", "list"]))
    if kind == "proxy":
        return types.MappingProxyType(base)
    if kind == "none":
        return None
    if kind == "list":
        return list(base.items())
    return base


@needs_c
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(record(), max_size=12), st.one_of(st.just("collected"), st.lists(st.one_of(
    st.text(max_size=5), st.none(), st.just("\udcff"), st.integers()), min_size=12, max_size=12)),
    st.sampled_from(["list", "arrow"]))
def test_the_c_transposition_and_its_twin_agree_on_any_records(recs, corr, text):
    if not isinstance(corr, str):
        corr = corr[:len(recs)]
    want_cols, want_bad = rows._transpose_py(recs, corr)
    got_cols, got_bad = c_transpose(recs, corr, text)
    assert got_bad == want_bad
    assert got_cols == plain(want_cols)


def test_valid_records_come_back_exactly_and_bad_ones_are_counted_not_stored():
    good = [aggregated_record(sourceTransportPort=i, sourcePodName=f"pod-ü-{i}", octetDeltaCount=2**64 - 1 - i)
            for i in range(4)]
    good.append(aggregated_record(v6=True, sourceIPv6Address="fd00::1", flowEndReason=3))
    good.append({"sourceIPv4Address": "10.0.0.1", "octetDeltaCount": 5})  # an agent's record: the rest defaults
    bad = [aggregated_record(packetTotalCount=-1), aggregated_record(sourceTransportPort=70000),
           aggregated_record(sourcePodName=b"bytes"), aggregated_record(flowEndSeconds=2**32),
           aggregated_record(sourcePodName="\ud800"), aggregated_record(octetDeltaCount=1.5),
           aggregated_record(destinationPodName=None), None, "not a record"]
    for text in ("list", "arrow"):
        cols, invalid = records_to_columns(bad[:3] + good + bad[3:], correlation="collected", ended={3},
                                           time_inserted=1_790_000_000, commit_id=7, text=text)
        assert invalid == len(bad)
        got = [dict(zip(COLUMN_NAMES, (c[i] for c in cols))) for i in range(len(cols[0]))]
        assert [row_to_record(r) for r in got[:5]] == good[:5]
        assert (got[5]["sourceIP"], got[5]["octetDeltaCount"], got[5]["sourcePodName"], got[5]["flowEndSeconds"]) == (
            "10.0.0.1", 5, "", 0)
        assert [r["final"] for r in got] == [0, 0, 0, 0, 1, 0]
        assert {(r["correlation"], r["timeInserted"], r["commitId"]) for r in got} == {("collected", 1_790_000_000, 7)}


def test_folded_addresses_take_the_first_that_is_set():
    recs = [{"sourceIPv4Address": "", "sourceIPv6Address": "fd00::2"},
            {"sourceIPv4Address": "10.0.0.9", "sourceIPv6Address": "fd00::2"},
            {"sourceIPv6Address": "fd00::3"}, {}]
    cols, bad = transpose(recs, "x")
    src = cols[[c.name for c in RECORD_COLUMNS].index("sourceIP")]
    assert list(src) == ["fd00::2", "10.0.0.9", "fd00::3", ""] and bad == []


def test_a_bad_correlation_constant_is_a_callers_mistake():
    with pytest.raises(ValueError, match="correlation"):
        transpose([{}], "\ud800")


def test_one_log_line_says_which_transposition_serves(caplog):
    say_once.cache_clear()
    with caplog.at_level("DEBUG", logger="flowscope.collector.rows"):
        transpose([{}], "x")
        transpose([{}], "x")
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("store columns:")]
    assert len(said) == 1
    assert ("C transposition" if rows.accelerated() else "pure-Python transposition") in said[0]


def leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n >= 0x80 else 0))
        n >>= 7
        if not n:
            return bytes(out)


@needs_c
@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=6), st.text(min_size=120, max_size=300), st.just("ü" * 70)), max_size=30))
def test_native_text_is_each_values_length_then_its_bytes_from_c_and_twin_alike(values):
    offsets, data = rows._text_part(values)
    want = b"".join(leb128(len(v.encode())) + v.encode() for v in values)
    assert rows._rowcols.native_text(offsets, data) == rows._native_text_py(offsets, data) == want
    assert native_text(values) == native_text(TextColumn(offsets, data)) == want


@needs_c
@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-5, 40), max_size=8), st.binary(max_size=32), st.integers(0, 3))
def test_native_text_refuses_offsets_that_go_backwards_or_past_the_data_in_c_and_twin_alike(offs, data, cut):
    raw = array("i", offs).tobytes()
    raw = raw[:len(raw) - cut] if cut and len(raw) > cut else raw
    outcomes = []
    for fn in (rows._rowcols.native_text, rows._native_text_py):
        try:
            outcomes.append(fn(raw, data))
        except ValueError:
            outcomes.append("refused")
    assert outcomes[0] == outcomes[1]
    valid = (len(raw) >= 4 and len(raw) % 4 == 0 and offs and 0 <= offs[0] and offs[-1] <= len(data)
             and all(a <= b for a, b in zip(offs, offs[1:])))
    assert (outcomes[0] != "refused") == bool(valid)
