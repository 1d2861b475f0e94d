"""The accelerator's string cache gives the twin's strings, whatever it holds or evicts.

ipfix/_speedups.c hands out a decoded string from a bounded cache of two ways a set (the
newer first), compares a candidate with the octets in whole words (the last word
overlapping), and hands out the interpreter's own empty str for an empty field. Nothing of
that may change a value: here sets of string fields whose values differ from each other in
one octet anywhere (first, middle, last, inside the overlapping last word), of every
length from 0 to 40, non-ASCII ones (never cached), and far more distinct values than the
cache holds (so that both ways of many sets are evicted and refilled) are decoded by the
accelerator and by the pure-Python twin, and compared record by record.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowscope.ipfix import accel
from flowscope.ipfix.registry import VARIABLE_LENGTH

from test_ipfix_accel import _pair, _same_records

pytestmark = pytest.mark.skipif(
    not accel.available() and (os.environ.get(accel.PURE_ENV, "") not in ("", "0") or not os.environ.get("CI")),
    reason="the C accelerator is turned off (FLOWSCOPE_IPFIX_PURE) or not built here",
)

SPEC = [("sourcePodName", VARIABLE_LENGTH), ("destinationPodName", VARIABLE_LENGTH), ("sourceNodeName", 16)]


def _decode_both(records: list[dict[str, Any]]) -> tuple[Any, Any]:
    fast, pure = _pair(SPEC)
    body = b"".join(pure._codec.encode_record(r) for r in records)
    return fast.decode_records(body, 0, len(body)), pure.decode_records(body, 0, len(body))


@st.composite
def near_names(draw: Any) -> str:
    """A name, or one that differs from it in one octet at a chosen place."""
    n = draw(st.integers(0, 40))
    base = "abcdefghijklmnopqrstuvwxyz0123456789ABCD"[:n]
    if n and draw(st.booleans()):
        at = draw(st.sampled_from(sorted({0, n // 2, n - 1, max(0, n - 5), max(0, n - 8)})))
        base = base[:at] + draw(st.sampled_from("#é_")) + base[at + 1:]
    return base


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(near_names(), near_names(), near_names().map(lambda s: s.replace("é", "~")[:16])), min_size=1, max_size=60))
def test_names_that_differ_in_one_octet_decode_as_the_twins(rows: Any) -> None:
    records = [dict(sourcePodName=a, destinationPodName=b, sourceNodeName=c) for a, b, c in rows]
    got, want = _decode_both(records)
    assert _same_records(got, want) and _same_records(got, records)


def test_more_names_than_the_cache_holds_decode_as_the_twins() -> None:
    """30,000 distinct names (the cache has 8,192 slots), each sent twice, interleaved with
    a few names that recur throughout: evictions of both ways of a set, and hits after them."""
    names = [f"pod-{i:05d}-{'x' * (i % 23)}" for i in range(30_000)]
    recurring = ["web-1", "db-1", "node-a", ""]
    records = [
        dict(sourcePodName=n, destinationPodName=recurring[i % 4], sourceNodeName=f"node-{i % 5}")
        for i, n in enumerate(names + names[::-1])
    ]
    got, want = _decode_both(records)
    assert _same_records(got, want)
    empty = [r["destinationPodName"] for r in got if r["destinationPodName"] == ""]
    assert empty and all(e is str() for e in empty)  # the interpreter's own empty str
