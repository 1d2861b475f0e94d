"""Sets of fixed-length records: the accelerator's per-template plan decodes what the twin does.

ipfix/_speedups.c decodes the sets of templates of fixed-length fields with a plan
compiled once per template (each field's offset, value slot and one code for its kind
and width), fetching the IPv4 cache's slots records ahead. Hypothesis checks it on sets
whose consecutive records repeat some fields' octets (as an exporter's do: one protocol,
a few addresses and ports, counters of 0) and differ in others by a single bit, as sent
and flipped, cut, padded or random: where the accelerator answers it answers the twin's
records, value and type, and a record changed afterwards changes no other; and the plan
serves exactly the templates it was made for.

Batches of such templates are encoded by a plan of the same kind, straight into messages
made at their final size: on records of every shape it meets (decoded and re-exported,
built in template order or not, a key more or missing, a wrong value, not a dict) and on
every value at and past each planned field's range, it gives the twin's messages,
sequence numbers and errors. Message.data_records, served by the accelerator's own
iterator, gives the twin's pairs, also of sets changed while they are read.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowscope.ipfix import ExportSession, Template, accel
from flowscope.ipfix import codec as codec_module
from flowscope.ipfix.codec import DataSet, Message, TemplateSet
from flowscope.ipfix.registry import VARIABLE_LENGTH, DataType

from test_ipfix_accel import FIELDS, _outcome, _pair, _same_records, _value, mangled

pytestmark = pytest.mark.skipif(
    not accel.available() and (os.environ.get(accel.PURE_ENV, "") not in ("", "0") or not os.environ.get("CI")),
    reason="the C accelerator is turned off (FLOWSCOPE_IPFIX_PURE) or not built here",
)

FIXED = [f for f in FIELDS if f[1] != VARIABLE_LENGTH]

specs = st.one_of(
    st.lists(st.sampled_from(FIXED), min_size=1, max_size=12),  # keys shared through a class
    st.lists(st.sampled_from(FIXED), min_size=31, max_size=45),  # the accelerator's own keys table
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs, st.data())
def test_sets_whose_records_repeat_values_decode_as_the_twin_does(spec: list[tuple[str, int]], data: st.DataObject) -> None:
    fast, pure = _pair(spec)
    native = fast._native
    assert native is not None and native._planned
    # Consecutive records repeat some fields' octets and differ in others by a single
    # bit (any bit the reuse's comparison overlooked would show).
    first = {k: _value(data, n, ln, False) for k, (n, ln) in zip(fast.keys, spec)}
    record = bytearray(pure.encode_record(first))
    body = bytearray()
    for _ in range(data.draw(st.integers(0, 8))):
        body += record
        record = bytearray(record)
        offset = 0
        for _name, length in spec:
            if data.draw(st.booleans()):
                bit = data.draw(st.integers(0, 8 * length - 1))
                record[offset + bit // 8] ^= 1 << (bit % 8)
            offset += length
    raw, end, mode = mangled(data, bytes(body))
    want = _outcome(pure.decode_records, raw, 4, end)
    got = native.decode_set(raw, 4, end)
    event(f"{mode}: {'declined' if got is None else 'answered'}")
    if got is not None:
        assert want[0] == "ok" and _same_records(got, want[1]), (mode, got, want)
        if len(got) > 1:  # records share no dict (nor values table): changing one changes no other
            key = fast.keys[0]
            before = [dict(r) for r in got]
            got[0][key] = "changed"
            del got[-1][fast.keys[-1]]
            assert all(r == b for r, b in zip(got[1:-1], before[1:-1]))
    else:  # declined: only a string the twin must judge (a bit flipped may leave it not UTF-8)
        assert mode != "valid" or any(f.ie.data_type is DataType.string for f in fast.fields)
    public = _outcome(fast.decode_records, raw, 4, end)
    assert public[0] == want[0]
    assert _same_records(public[1], want[1]) if public[0] == "ok" else public == want


def test_the_plan_serves_fixed_length_templates_alone() -> None:
    fixed, _ = _pair([("sourceIPv4Address", 4), ("octetDeltaCount", 8), ("protocolIdentifier", 1)])
    variable, _ = _pair([("sourceIPv4Address", 4), ("interfaceName", VARIABLE_LENGTH)])
    assert fixed._native is not None and fixed._native._planned
    assert variable._native is not None and not variable._native._planned


# The kinds the encoder's fixed-length plan writes itself (any other makes a template
# take the general loop): unsigned integers of every width, seconds, IPv4 and IPv6.
PLANNED = [f for f in FIXED if f[0] in {"protocolIdentifier", "sourceTransportPort", "ingressInterface", "octetDeltaCount",
                                         "flowStartSeconds", "sourceIPv6Address", "flowType"}
           or f == ("sourceIPv4Address", 4)]  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.one_of(st.lists(st.sampled_from(PLANNED), min_size=1, max_size=12),
                 st.lists(st.sampled_from(PLANNED), min_size=31, max_size=40)), st.data())  # fmt: skip
def test_batches_of_fixed_length_records_encode_as_the_twin_does(spec: list[tuple[str, int]], data: st.DataObject) -> None:
    """The encoder's plan writes each record straight into a message made at its final
    size, reading the values from a decoded record's value slots or a dict's entries in
    template order; any record it does not write itself goes the general way. Records of
    every shape it may meet (decoded and re-exported, changed or not; built in template
    order; built in another order, with a key more or one missing; a value of the wrong
    type or out of range; not a dict): the twin's messages, sequence numbers and errors."""
    fast, pure = _pair(spec)
    assert fast._native is not None and fast._native._eplanned
    n = data.draw(st.integers(1, 60))
    built = [{k: _value(data, name, ln, False) for k, (name, ln) in zip(fast.keys, spec)} for _ in range(n)]
    body = b"".join(pure.encode_record(r) for r in built)
    decoded = fast._native.decode_set(body, 0, len(body))
    assert decoded is not None
    records: list[Any] = []
    for i in range(n):
        shape = data.draw(st.sampled_from(["decoded", "built", "decoded", "built", "reordered", "extra", "missing",
                                           "wrong", "changed", "other"]))  # fmt: skip
        rec: Any = decoded[i] if shape in ("decoded", "changed") else built[i]
        if shape == "reordered":
            rec = dict(reversed(list(rec.items())))
        elif shape == "extra":
            rec = {**rec, "extra": 1}
        elif shape == "missing":
            rec = dict(rec)
            del rec[data.draw(st.sampled_from(fast.keys))]
        elif shape in ("wrong", "changed"):
            field = data.draw(st.integers(0, len(spec) - 1))
            rec[fast.keys[field]] = _value(data, *spec[field], shape == "wrong")
        elif shape == "other":
            rec = data.draw(st.sampled_from([None, [1], "x"]))
        records.append(rec)
    size = data.draw(st.sampled_from([None, 100, 300, 1500]))
    outcomes = []
    for template in (fast, pure):
        session = ExportSession(5)
        session.add_template(template)
        session.sequence_number = 2**32 - 7
        first = _outcome(lambda: session.encode_records(256, records, 11, max_message_size=size))
        outcomes.append((first, session.sequence_number))
    assert outcomes[0] == outcomes[1]
    event(f"{outcomes[0][0][0]}")


EDGES: list[Any] = [0, 1, 255, 256, 65535, 65536, 2**24 - 1, 2**24, 2**32 - 1, 2**32, 2**40 - 1, 2**40, 2**60, 2**63,
                    2**64 - 1, 2**64, -1, -(2**31), True, False, 1.0, "1", None, b"\x01", "10.0.0.1", "10.0.0.256",
                    "010.0.0.1", "fd00::1", "::ffff:10.0.0.1", "fd00::g"]  # fmt: skip


@pytest.mark.parametrize("field", PLANNED, ids=lambda f: f"{f[0]}-{f[1]}")
def test_the_fixed_length_plan_writes_only_what_the_twin_accepts(field: tuple[str, int]) -> None:
    """Every value at and past the edges of each planned field's range, and of other
    types, in the middle of a batch: the twin's bytes, or the twin's error."""
    spec = [("protocolIdentifier", 1), field, ("octetDeltaCount", 8)]
    fast, pure = _pair(spec)
    assert fast._native is not None and fast._native._eplanned
    for value in EDGES:
        records = [dict(zip(fast.keys, (6, v, 2**40))) for v in ("10.0.0.1" if "IPv4" in field[0] else "fd00::2"
                   if "IPv6" in field[0] else 7, value, "10.0.0.2" if "IPv4" in field[0] else "fd00::3"
                   if "IPv6" in field[0] else 9)]  # fmt: skip
        outcomes = []
        for template in (fast, pure):
            session = ExportSession(1)
            session.add_template(template)
            outcomes.append(_outcome(lambda: session.encode_records(256, records, 0)))
        assert outcomes[0] == outcomes[1], (value, outcomes)


def _pairs(msg: Any, native: bool, mutate: int | None) -> list[tuple[Any, Any]]:
    """Message.data_records() by the accelerator's iterator or the twin's chain of zips,
    every pair kept (so no result tuple is reused under us); ``mutate``: after that many
    pairs, append a record to the first data set's list and empty the last's."""
    saved = codec_module._data_records
    codec_module._data_records = saved if native else None
    try:
        out = []
        for n, pair in enumerate(msg.data_records()):
            out.append(pair)
            data_sets = [s for s in msg.sets if isinstance(s, DataSet) and isinstance(s.records, list)]
            if n == mutate and data_sets:
                data_sets[0].records.append({"added": n})
                data_sets[-1].records.clear()
        return out
    finally:
        codec_module._data_records = saved


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 40), st.none(), st.just("tuple")), max_size=6), st.one_of(st.none(), st.integers(0, 30)))
def test_data_records_gives_the_twins_pairs(sizes: list[int | str | None], mutate: int | None) -> None:
    """Message.data_records through the accelerator's own iterator (one call per record,
    its result tuple reused when no one holds it) against the twin's chain of zips: the
    same (template, record) objects in the same order, template sets skipped, data sets
    changed while they are read (a record appended, a set emptied) read as the twin
    reads them, records that are not a list left to the twin."""
    assert codec_module._data_records is not None
    template = Template.build(300, ["protocolIdentifier"])
    def sets() -> list[Any]:
        out: list[Any] = []
        for i, n in enumerate(sizes):
            if n is None:
                out.append(TemplateSet(2, [template]))
            elif n == "tuple":
                out.append(DataSet(template, ({"t": i}, {"t": i + 1})))  # type: ignore[arg-type]
            else:
                out.append(DataSet(Template.build(256 + i, ["protocolIdentifier"]), [{"r": (i, j)} for j in range(n)]))
        return out
    got = _pairs(Message(0, 0, 0, sets()), True, mutate)
    want = _pairs(Message(0, 0, 0, sets()), False, mutate)
    assert [(t.template_id, r) for t, r in got] == [(t.template_id, r) for t, r in want]
    msg = Message(0, 0, 0, sets())
    flat = [(s.template, r) for s in msg.sets if isinstance(s, DataSet) for r in s.records]
    assert all(a is c and b is d for (a, b), (c, d) in zip([p for p in msg.data_records()], flat))
    n = 0
    for t, r in msg.data_records():  # pairs not kept: the tuple is reused, the values still right
        assert t is flat[n][0] and r is flat[n][1]
        n += 1
    assert n == len(flat)
