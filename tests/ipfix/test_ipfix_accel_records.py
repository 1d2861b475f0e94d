"""Records the C accelerator decodes are dicts like any other, and encode as the twin's do.

ipfix/_speedups.c builds the records of a set as copies of one split-table prototype per
template (the keys table shared, each record an array of values): through a class's
shared keys for templates of up to 30 fields, and from a keys table of its own making for
wider ones (the agent's 43). Such a record is read back, for export, straight from its
value slots. Hypothesis checks, for narrow, wide and variable-length templates:

- decoded records equal the twin's, key order included, and stay equal to them through
  any sequence of the dict operations a consumer uses (set, add, delete, pop, update,
  setdefault, popitem, clear, copy); the prototype is left untouched (decoding again
  gives the same records, every placeholder reference is given back);
- encoding those records, changed or not, gives the twin's messages or the twin's error;
- Python code run inside the encoder emptying and refilling a decoded record it is
  reading: the record as it then is, as the twin reads it.

And on CPython 3.11, where the wide prototype is made, a decoded agent record holds a
quarter of the memory an ordinary dict of it does (the aggregator holds many).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowscope.ipfix import ExportSession, accel
from flowscope.ipfix import template as template_module
from flowscope.ipfix.antrea import AGENT_IPV4_FIELDS, AGENT_IPV6_FIELDS

from test_ipfix_accel import FIELDS, REG, _outcome, _pair, _same_records, _value

pytestmark = pytest.mark.skipif(
    not accel.available() and (os.environ.get(accel.PURE_ENV, "") not in ("", "0") or not os.environ.get("CI")),
    reason="the C accelerator is turned off (FLOWSCOPE_IPFIX_PURE) or not built here",
)

specs = st.one_of(
    st.lists(st.sampled_from(FIELDS), min_size=1, max_size=12),  # shared through a class
    st.lists(st.sampled_from(FIELDS), min_size=31, max_size=70),  # the accelerator's own keys table
    st.sampled_from([AGENT_IPV4_FIELDS, AGENT_IPV6_FIELDS]).map(
        lambda names: [(n, REG.get(n).data_type.default_length) for n in names]
    ),
)

# What a consumer does to a record: (operation, uses a key of the template, uses a value).
OPS = ["set", "add", "delete", "pop", "update", "setdefault", "popitem", "clear", "copy"]


def _apply(rec: dict[str, Any], op: str, key: str, value: Any) -> tuple[dict[str, Any], Any]:
    """One operation on a record: the record after it (a copy for "copy") and its result."""
    if op == "set":
        rec[key] = value
        return rec, None
    if op == "add":
        rec["extra"] = value
        return rec, None
    if op == "delete":
        return rec, _outcome(rec.__delitem__, key)
    if op == "pop":
        return rec, rec.pop(key, "absent")
    if op == "update":
        rec.update({key: value, "more": 1})
        return rec, None
    if op == "setdefault":
        return rec, rec.setdefault(key, value)
    if op == "popitem":
        return rec, _outcome(rec.popitem)
    if op == "clear":
        rec.clear()
        return rec, None
    return rec.copy(), None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs, st.data())
def test_decoded_records_behave_and_encode_as_the_twins(spec: list[tuple[str, int]], data: st.DataObject) -> None:
    fast, pure = _pair(spec)
    native = fast._native
    assert native is not None
    records = [{k: _value(data, n, ln, False) for k, (n, ln) in zip(fast.keys, spec)} for _ in range(data.draw(st.integers(1, 4)))]
    body = b"".join(pure.encode_record(r) for r in records)
    before = native._placeholder_refcounts()
    ours = fast.decode_records(body, 0, len(body))
    theirs = pure.decode_records(body, 0, len(body))
    assert _same_records(ours, theirs)
    # the same operations on both lists of records, compared after each
    for _ in range(data.draw(st.integers(0, 6))):
        i = data.draw(st.integers(0, len(ours) - 1))
        op = data.draw(st.sampled_from(OPS))
        key = data.draw(st.sampled_from([*fast.keys, "absent"]))
        field = data.draw(st.integers(0, len(spec) - 1))
        value = _value(data, *spec[field], data.draw(st.booleans()))
        ours[i], got = _apply(ours[i], op, key, value)
        theirs[i], want = _apply(theirs[i], op, key, value)
        assert got == want, (op, key)
        assert list(ours[i].items()) == list(theirs[i].items()), (op, key)
    # read back for export: the twin's bytes, or the twin's error
    size = data.draw(st.sampled_from([None, 300]))
    outcomes = []
    for template, recs in ((fast, ours), (pure, theirs)):
        session = ExportSession(2)
        session.add_template(template)
        outcomes.append(_outcome(lambda: session.encode_records(256, recs, 0, max_message_size=size)))
    assert outcomes[0] == outcomes[1]
    # the prototype is as it was: the same records again, every placeholder reference back
    assert _same_records(fast.decode_records(body, 0, len(body)), pure.decode_records(body, 0, len(body)))
    del ours
    assert native._placeholder_refcounts() == before


@pytest.mark.parametrize("wide", [False, True], ids=["shared-keys", "own-keys"])
def test_python_code_inside_the_encoder_may_refill_a_decoded_record(wide: bool) -> None:
    """An IPv6 address the C encoder cannot read itself (not a str) goes through the twin's
    cache, whose __missing__ calls str() on it: Python code, here emptying the decoded
    record being read (its value slots are freed), filling it again with other values, and
    copying another record (whose new slots may take the freed memory). The encoder must
    read the record again, not the slots it held: the twin's bytes."""
    spec = [("sourceIPv6Address", 16), ("sourceIPv4Address", 4), ("protocolIdentifier", 1)]
    if wide:
        spec += [("octetDeltaCount", 8)] * 40
    outcomes = []
    for template in _pair(spec):
        session = ExportSession(1)
        session.add_template(template)
        values = {k: {"sourceIPv6Address": "fd00::2", "sourceIPv4Address": "10.0.0.2"}.get(n, 6)
                  for k, (n, _) in zip(template.keys, spec)}  # fmt: skip
        (msg,) = session.encode_records(256, [values] * 8, 0)
        records: list[Any] = template.decode_records(msg, 20, len(msg))
        spare = []
        template_module._HELPERS["_ENC_IP6"].pop("fd00::1", None)

        class Address:
            def __str__(self) -> str:
                records[5].clear()
                records[5].update({k: 17 for k in values}, sourceIPv4Address="10.0.0.9")
                spare.extend(records[0].copy() for _ in range(4))
                return "fd00::1"

        records[5]["sourceIPv6Address"] = Address()
        outcomes.append(_outcome(lambda: session.encode_records(256, records, 0)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == "ok", outcomes
    (msg,) = outcomes[0][1]
    refilled = dict({k: 17 for k in values}, sourceIPv6Address="fd00::1", sourceIPv4Address="10.0.0.9")
    assert template.decode_records(msg, 20, len(msg))[5] == refilled


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the accelerator makes wide split tables on CPython 3.11")
@pytest.mark.parametrize("names", [AGENT_IPV4_FIELDS, AGENT_IPV6_FIELDS], ids=["ipv4", "ipv6"])
def test_a_decoded_agent_record_is_a_quarter_of_an_ordinary_dict(names: tuple[str, ...]) -> None:
    fast, pure = _pair([(n, REG.get(n).data_type.default_length) for n in names])
    rec = {k: {"string": "pod-1", "ipv4Address": "10.0.0.1", "ipv6Address": "fd00::1"}.get(REG.get(k).data_type.name, 7)
           for k in fast.keys}  # fmt: skip
    body = fast.encode_record(rec) * 3
    (ours, *_) = fast.decode_records(body, 0, len(body))
    assert ours == rec and list(ours) == list(rec)
    assert sys.getsizeof(ours) * 3 < sys.getsizeof(dict(rec)), (sys.getsizeof(ours), sys.getsizeof(dict(rec)))
