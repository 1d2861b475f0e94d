"""Sets of fixed-length records: the accelerator's per-template plan decodes what the twin does.

ipfix/_speedups.c decodes the sets of templates of fixed-length fields with a plan
compiled once per template (each field's offset, value slot and one code for its kind
and width), fetching the IPv4 cache's slots records ahead. Hypothesis checks it on sets
whose consecutive records repeat some fields' octets (as an exporter's do: one protocol,
a few addresses and ports, counters of 0) and differ in others by a single bit, as sent
and flipped, cut, padded or random: where the accelerator answers it answers the twin's
records, value and type, and a record changed afterwards changes no other; and the plan
serves exactly the templates it was made for.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowscope.ipfix import accel
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
