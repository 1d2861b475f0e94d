"""The accelerator's set-at-a-time paths against the pure-Python twin: long batches cut
into many messages, and the bookkeeping of decoded record prototypes.

ipfix/_speedups.c encodes a batch through one message-sized scratch buffer, cutting a
message whenever the next record does not fit, and still encodes every record before it
reports one too long for any message (as the twin does, so that a bad value raises rather
than RecordTooLarge). It decodes a set by copying a prototype whose values are per-field
placeholder objects and gives their references back once per set. Hypothesis checks:

- batches of up to 80 records, message sizes that force many cuts, an oversized record
  and a bad value anywhere: the same messages, sequence numbers and errors both ways;
- decoding valid, damaged, truncated and random set bodies, for narrow templates (split
  tables through a class's shared keys), wide ones (over 30 fields: split tables of the
  accelerator's own keys table) and variable-length ones, leaves
  every placeholder's reference count as it found it, answered or declined;
- Python code that runs inside the encoder (an address's ``__str__``) emptying the batch
  or the record being encoded, with and without Python code run before it: no crash,
  and the twin's outcome.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowscope.ipfix import ExportSession, accel
from flowscope.ipfix import template as template_module
from flowscope.ipfix.antrea import AGENT_IPV4_FIELDS

from test_ipfix_accel import FIELDS, REG, _outcome, _pair, _same_records, _value

# Skipped where the accelerator is turned off on purpose, or (outside CI, which must build
# it) not built.
pytestmark = pytest.mark.skipif(
    not accel.available() and (os.environ.get(accel.PURE_ENV, "") not in ("", "0") or not os.environ.get("CI")),
    reason="the C accelerator is turned off (FLOWSCOPE_IPFIX_PURE) or not built here",
)

AGENT = [(n, REG.get(n).data_type.default_length) for n in AGENT_IPV4_FIELDS]
FIXED = [f for f in FIELDS if f[1] != 65535]
specs = st.one_of(
    st.lists(st.sampled_from(FIELDS), min_size=1, max_size=8),
    st.lists(st.sampled_from(FIXED), min_size=1, max_size=12),  # fixed-length records
    st.lists(st.sampled_from(FIXED), min_size=31, max_size=40),  # too many keys to share
    st.just(AGENT),
)


def _records(data: st.DataObject, keys: tuple[str, ...], spec: list[tuple[str, int]], n: int) -> list[dict[str, Any]]:
    return [{k: _value(data, name, length, False) for k, (name, length) in zip(keys, spec)} for _ in range(n)]


with_text = st.lists(st.sampled_from(FIELDS), min_size=0, max_size=6).map(lambda s: [*s, ("interfaceName", 65535)])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.one_of(specs, with_text), st.data())
def test_long_batches_are_cut_and_refused_as_the_twin_does(spec: list[tuple[str, int]], data: st.DataObject) -> None:
    fast, pure = _pair(spec)
    records: list[Any] = _records(data, fast.keys, spec, data.draw(st.integers(1, 80)))
    var = [k for k, (_, length) in zip(fast.keys, spec) if length == 65535 and isinstance(records[0][k], (str, bytes))]
    if var and data.draw(st.booleans()):  # one record longer than any message of this size
        i = data.draw(st.integers(0, len(records) - 1))
        records[i][var[0]] = type(records[i][var[0]])(b"x" * 2000 if isinstance(records[i][var[0]], bytes) else "x" * 2000)
    if data.draw(st.booleans()):  # and a value the twin refuses, before or after it
        i = data.draw(st.integers(0, len(records) - 1))
        field = data.draw(st.integers(0, len(spec) - 1))
        records[i][fast.keys[field]] = _value(data, *spec[field], True)
    size = data.draw(st.sampled_from([None, 200, 700, 1500, 4000]))
    outcomes = []
    for template in (fast, pure):
        session = ExportSession(3)
        session.add_template(template)
        session.sequence_number = 2**32 - 40
        first = _outcome(lambda: session.encode_records(256, records, 9, max_message_size=size))
        second = _outcome(lambda: session.encode_records(256, records[:3], 9, max_message_size=size))
        outcomes.append((first, second, session.sequence_number))
    assert outcomes[0] == outcomes[1]
    event(f"{outcomes[0][0][0]}, {len(outcomes[0][0][1]) if outcomes[0][0][0] == 'ok' else 0} messages")
    if outcomes[0][0][0] == "ok":
        messages = outcomes[0][0][1]
        assert sum(len(pure.decode_records(m, 20, len(m))) for m in messages) == len(records)
        assert all(len(m) <= (size or 65535) for m in messages) or len(messages) == 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs, st.data())
def test_decoding_gives_back_every_placeholder_reference(spec: list[tuple[str, int]], data: st.DataObject) -> None:
    fast, pure = _pair(spec)
    native = fast._native
    assert native is not None
    records = _records(data, fast.keys, spec, data.draw(st.integers(0, 5)))
    body = bytearray(b"".join(pure.encode_record(r) for r in records))
    mode = data.draw(st.sampled_from(["valid", "flipped", "cut", "random"]))
    if mode == "flipped" and body:
        for _ in range(data.draw(st.integers(1, 4))):
            body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    elif mode == "cut" and body:
        del body[data.draw(st.integers(0, len(body) - 1)) :]
    elif mode == "random":
        body = bytearray(data.draw(st.binary(max_size=400)))
    raw = bytes(body)
    before = native._placeholder_refcounts()
    got = native.decode_set(raw, 0, len(raw))
    event(f"{mode}: {'declined' if got is None else 'answered'}")
    assert native._placeholder_refcounts() == before
    if got is not None:
        assert _same_records(got, pure.decode_records(raw, 0, len(raw)))
        del got
    assert native._placeholder_refcounts() == before


@pytest.mark.parametrize("cached", [True, False], ids=["other-addresses-cached", "uncached"])
@pytest.mark.parametrize("victim", ["batch", "record"])
def test_python_code_run_inside_the_encoder_may_change_its_input_safely(victim: str, cached: bool) -> None:
    """An address the C encoder cannot parse itself goes through the twin's cache, whose
    __missing__ calls str() on it: Python code, here emptying the batch or the record
    the encoder is reading. It must neither crash nor read freed memory, and it ends as
    with the twin: the batch encoded is the batch passed, a record emptied is refused.
    Whether the other addresses are in the cache (then no Python code runs before the
    odd one) must not matter."""
    cache = template_module._HELPERS["_ENC_IP6"]
    if cached:
        cache["fd00::2"]  # noqa: B018 - fills the cache
    else:
        cache.pop("fd00::2", None)
    outcomes = []
    for template in _pair([("sourceIPv6Address", 16), ("sourceIPv4Address", 4), ("protocolIdentifier", 1)]):
        records: list[Any] = []

        class Address:
            def __str__(self) -> str:
                (records if victim == "batch" else records[5]).clear()
                return "fd00::1"

        records += [{"sourceIPv6Address": "fd00::2", "sourceIPv4Address": "10.0.0.2", "protocolIdentifier": 6}
                    for _ in range(20)]  # fmt: skip
        records[5]["sourceIPv6Address"] = Address()
        session = ExportSession(1)
        session.add_template(template)
        outcomes.append(_outcome(lambda: [len(m) for m in session.encode_records(256, records, 0)]))
    fast, pure = outcomes
    assert fast == pure, outcomes
    assert fast[0] == ("UsageError" if victim == "record" else "ok"), fast
    assert victim == "record" or fast[1] == [20 + 20 * 21], fast  # every record of the batch passed
