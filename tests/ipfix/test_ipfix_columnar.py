"""Data sets decoded into columns (ipfix/columnar.py, ipfix/_columnar.c) hold exactly what the
record decoder gives, field for field, on valid and malformed input.

Hypothesis builds templates of every kind of field (each integer width and reduced size,
signed integers, floats, booleans, MAC and IP addresses, the four timestamp types, strings
and octet arrays of fixed and variable length, lengths that do not fit their type) and
set bodies that are valid, have flipped octets, are cut short, padded or plain random.
The reference is the pure-Python record codec (``Template._decode_records_py``). The C
decoder and the pure-Python twin must each give, per field, the reference's values in
order (booleans as 1/0, floats bit for bit), or raise MalformedMessage where it does;
any other exception (or a crash) fails. ColumnarDecoder must read whole messages as the
codec's Decoder does: the same records and counters, and MalformedMessage for the same
messages.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowscope.ipfix import Decoder, ExportSession, FieldSpecifier, Template
from flowscope.ipfix import columnar
from flowscope.ipfix.errors import MalformedMessage
from flowscope.ipfix.registry import VARIABLE_LENGTH

# The codec tests' private registry (signed, float32, boolean and list elements added) and
# their fields of every kind, lengths that fall back to raw octets included.
from test_ipfix_accel import FIELDS, REG, mangled

# Outside CI (which must build it) a missing C extension skips only the C comparisons.
NEED_C = pytest.mark.skipif(
    not columnar.accelerated() and (os.environ.get(columnar.PURE_ENV, "") not in ("", "0") or not os.environ.get("CI")),
    reason="the columnar C extension is turned off or not built here",
)


def _template(spec: list[tuple[str, int]]) -> Template:
    return Template(256, [FieldSpecifier(REG.get(name), length) for name, length in spec])


def _same(col_value: Any, want: Any) -> bool:
    """A column's value against the record decoder's: booleans are 1/0, floats bit for bit."""
    if isinstance(want, bool):
        return type(col_value) is int and col_value == int(want)
    if isinstance(want, float):
        return type(col_value) is float and (
            struct.pack("!d", col_value) == struct.pack("!d", want) or (math.isnan(col_value) and math.isnan(want)))
    return type(col_value) is type(want) and col_value == want


def _check(cs: columnar.ColumnSet, records: list[dict[str, Any]]) -> None:
    assert cs.count == len(records)
    rebuilt = cs.records()  # the records rebuilt from the columns: the decoder's, value and type
    assert [list(r) for r in rebuilt] == [list(r) for r in records]
    assert all(type(a[k]) is type(b[k]) and _same(a[k], b[k]) or (isinstance(b[k], bool) and a[k] is b[k])
               for a, b in zip(rebuilt, records) for k in a)
    for key, col in zip(cs.template.keys, cs.columns):
        got = col.tolist()
        want = [r[key] for r in records]
        assert len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want)), (key, got, want)


def _outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except MalformedMessage as exc:
        return "malformed", str(exc)


def _body(data: st.DataObject, t: Template, spec: list[tuple[str, int]]) -> tuple[bytes, int]:
    """A set body at offset 4 of a buffer (with two octets after it): valid records of
    random field bytes, then maybe flipped, cut, padded, or random bytes altogether
    (test_ipfix_accel.mangled, as the record codec's tests mangle theirs)."""
    parts = []
    for _ in range(data.draw(st.integers(0, 5))):
        for _name, length in spec:
            if length == VARIABLE_LENGTH:
                n = data.draw(st.sampled_from([0, 1, 3, 17, 254, 255, 300]))
                payload = data.draw(st.one_of(st.binary(min_size=n, max_size=n),
                                              st.text(max_size=n).map(lambda s: s.encode("utf-8"))))
                n = len(payload)
                parts.append((bytes((n,)) if n < 255 and data.draw(st.booleans()) else b"\xff" + n.to_bytes(2, "big"))
                             + payload)
            else:
                parts.append(data.draw(st.binary(min_size=length, max_size=length)))
    raw, end, _ = mangled(data, b"".join(parts))
    return raw, end


specs = st.lists(st.sampled_from(FIELDS), min_size=1, max_size=8)


def _against_reference(decode: Any, spec: list[tuple[str, int]], data: st.DataObject) -> None:
    t = _template(spec)
    raw, end = _body(data, t, spec)
    want = _outcome(t._decode_records_py, raw, 4, end)
    got = _outcome(decode, t, raw, 4, end)
    assert got[0] == want[0], (got, want)
    if got[0] == "ok":
        _check(got[1], want[1])


@NEED_C
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs, st.data())
def test_the_c_decoder_gives_the_record_decoders_values_or_its_error(spec: list[tuple[str, int]],
                                                                      data: st.DataObject) -> None:
    assert columnar.accelerated()
    _against_reference(columnar.decode_set, spec, data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs, st.data())
def test_the_pure_twin_gives_the_record_decoders_values_or_its_error(spec: list[tuple[str, int]],
                                                                     data: st.DataObject) -> None:
    _against_reference(lambda t, raw, off, end: columnar._decode_set_py(t, columnar._plan_of(t), raw, off, end),
                       spec, data)


def test_text_is_spelled_as_the_record_decoder_spells_it() -> None:
    # one record by hand: what a store shows a user must be the decoder's text
    t = _template([("sourceIPv4Address", 4), ("sourceIPv6Address", 16), ("sourceMacAddress", 6),
                   ("interfaceName", 8), ("sourcePodName", VARIABLE_LENGTH), ("testBoolean", 1),
                   ("flowStartMilliseconds", 8)])
    body = (bytes([10, 0, 200, 7]) + bytes(15) + b"\x01" + bytes([0xAA, 0xBB, 0, 1, 2, 0xFF]) + b"eth0\0\0\0\0"
            + b"\x04w\xc3\xa9b" + b"\x02" + (1_700_000_000_123).to_bytes(8, "big"))
    cs = columnar.decode_set(t, body, 0, len(body))
    assert [c.tolist()[0] for c in cs.columns] == ["10.0.200.7", "::1", "aa:bb:00:01:02:ff", "eth0", "wéb", 0,
                                                   1_700_000_000.123]
    assert cs.records() == [dict(zip(t.keys, ["10.0.200.7", "::1", "aa:bb:00:01:02:ff", "eth0", "wéb", False,
                                              1_700_000_000.123]))]
    assert cs.records()[0]["testBoolean"] is False
    bad_utf8 = b"\x03a\xffb"
    t2 = _template([("sourcePodName", VARIABLE_LENGTH)])
    assert columnar.decode_set(t2, bad_utf8, 0, 4).values("sourcePodName") == ["a\ufffdb"]


def test_a_record_past_the_end_of_its_set_is_malformed_and_short_padding_is_not() -> None:
    t = _template([("sourceTransportPort", 2), ("sourcePodName", VARIABLE_LENGTH)])
    good = b"\x00\x50\x02ab"
    assert columnar.decode_set(t, good + b"\x00\x00", 0, 7).count == 1  # 2 octets < a record: padding
    with pytest.raises(MalformedMessage):
        columnar.decode_set(t, good + b"\x00\x51\x09abc", 0, 11)  # says 9 octets, has 3
    with pytest.raises(MalformedMessage):
        columnar.decode_set(t, good + b"\x00\x51\xff\x00", 0, 9)  # the 255 escape cut short
    with pytest.raises(MalformedMessage):
        columnar.decode_set(t, good, 0, 99)  # a set end past the buffer


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.binary(max_size=5), max_size=4), min_size=1, max_size=5), st.booleans())
def test_concat_joins_columns_value_for_value(chunks: list[list[bytes]], text: bool) -> None:
    cols = [columnar._var_column(c, text=False) for c in chunks]
    joined = columnar.concat(cols)
    assert joined.tolist() == [v for c in chunks for v in c]
    assert columnar.concat([joined]).tolist() == joined.tolist()


# --------------------------------------------------------------------------- whole messages

def _messages(data: st.DataObject) -> list[bytes]:
    """A session: templates (two, one announced twice), data in several sets per message
    (and a withdrawal and reuse of an id), with sequence numbers."""
    s = ExportSession(7, max_message_size=data.draw(st.sampled_from([200, 600, 65535])))
    t1 = Template.build(256, ["sourceIPv4Address", "destinationIPv4Address", "octetDeltaCount", "sourcePodName",
                              "flowEndSeconds"])
    t2 = Template.build(257, ["sourceIPv6Address", ("packetDeltaCount", 4), "destinationPodNamespace"])
    s.add_template(t1)
    s.add_template(t2)
    out = s.encode_templates(1000)
    names = st.text(alphabet="abcé-0", max_size=12)
    for _ in range(data.draw(st.integers(1, 4))):
        tid = data.draw(st.sampled_from([256, 257]))
        n = data.draw(st.integers(1, 30))
        if tid == 256:
            recs = [{"sourceIPv4Address": f"10.0.0.{i % 250}", "destinationIPv4Address": "10.0.1.1",
                     "octetDeltaCount": data.draw(st.integers(0, 2**64 - 1)), "sourcePodName": data.draw(names),
                     "flowEndSeconds": 1000 + i} for i in range(n)]
        else:
            recs = [{"sourceIPv6Address": f"fd00::{i:x}", "packetDeltaCount": i, "destinationPodNamespace": "ns"}
                    for i in range(n)]
        out += s.encode_records(tid, recs, 1000)
    out += s.encode_withdrawal([257], 1001)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_columnar_decoder_reads_messages_as_the_decoder_does(data: st.DataObject) -> None:
    msgs = _messages(data)
    if data.draw(st.booleans()):  # damage one message: cut, or an octet changed
        i = data.draw(st.integers(0, len(msgs) - 1))
        m = bytearray(msgs[i])
        if data.draw(st.booleans()):
            m[data.draw(st.integers(0, len(m) - 1))] = data.draw(st.integers(0, 255))
        else:
            m = m[: data.draw(st.integers(0, len(m)))]
        msgs[i] = bytes(m)
    plain, cols = Decoder(transport="tcp"), columnar.ColumnarDecoder(transport="tcp")
    for m in msgs:
        a = _outcome(plain.decode, m)
        b = _outcome(cols.decode, m)
        assert a[0] == b[0], (a, b)  # both decoded, or both malformed (the wording may differ)
        if a[0] != "ok":
            break
        ma, mb = a[1], b[1]
        assert isinstance(mb, columnar.ColumnarMessage)
        assert (ma.record_count, ma.sequence_number, ma.observation_domain_id, ma.length) == \
               (mb.record_count, mb.sequence_number, mb.observation_domain_id, mb.length)
        assert [len(s.templates) for s in ma.sets if not hasattr(s, "records")] == [len(s.templates) for s in mb.sets]
        for (ta, ra), (tb, rb) in zip(ma.data_records(), mb.data_records(), strict=True):
            assert ta == tb and ra == rb
    assert (plain.lost_records, plain.sequence_jumps, plain.template_count) == \
           (cols.lost_records, cols.sequence_jumps, cols.template_count)
