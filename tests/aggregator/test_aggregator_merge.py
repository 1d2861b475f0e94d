"""The merge of both sides' Kubernetes fields, checked against its plain definition.

Each field comes from the side that owns it (``aggregation._OWNER``: the source node's
Kubernetes fields, then the destination node's, then each side's own Pod labels), from
the other side when the owner's is empty, and otherwise the default. aggregation._merged computes it with slices and one
comprehension (it runs once per exported flow); this compares it with the definition
written as a loop, over random tuples of empty and non-empty values. It also checks
that two aggregation processes do not share their merge caches.
"""

from __future__ import annotations

from typing import Any

from flowscope.aggregator import aggregation as agg
from hypothesis import given, settings
from hypothesis import strategies as st


def _definition(smeta: tuple[Any, ...] | None, dmeta: tuple[Any, ...] | None, v6: bool) -> tuple[Any, ...]:
    def empty(v: Any) -> bool:
        return v is None or v == "" or v == 0 or v == "0.0.0.0" or v == "::"

    out = []
    for i, default in enumerate(agg._META_DEFAULTS[v6]):
        own, other = (smeta, dmeta) if agg._OWNER[i] == 0 else (dmeta, smeta)
        v = own[i] if own is not None else None
        if empty(v) and other is not None and not empty(other[i]):
            v = other[i]
        out.append(default if v is None else v)
    return tuple(out)


values = st.sampled_from([None, "", 0, "0.0.0.0", "::", "web", "default", 1, 2, "10.96.0.1", "fd00::1"])
metas = st.none() | st.tuples(*[values] * len(agg._OWNER))


@settings(max_examples=300, deadline=None)
@given(metas, metas, st.booleans())
def test_merged_fields_follow_the_definition(smeta: Any, dmeta: Any, v6: bool) -> None:
    assert agg._merged(smeta, dmeta, v6, {}) == _definition(smeta, dmeta, v6)


def test_each_process_has_its_own_merge_cache() -> None:
    a, b = agg.AggregationProcess(), agg.AggregationProcess()
    assert a._merge_cache is not b._merge_cache
    assert not hasattr(agg, "_merge_cache")


def test_the_label_fields_are_each_owned_by_their_own_side() -> None:
    names = agg._META_NAMES[0]
    owner = dict(zip(names, agg._OWNER))
    assert (owner["sourcePodLabels"], owner["destinationPodLabels"]) == (0, 1)
    assert (owner["sourcePodName"], owner["destinationPodName"]) == (0, 1)


def _side_meta(owner: int) -> st.SearchStrategy[tuple[Any, ...]]:
    """A side's tuple as agents send it: values only in the fields its side owns (empty elsewhere)."""
    empties = st.sampled_from([None, "", 0, "0.0.0.0", "::"])
    return st.tuples(*[values if o == owner else empties for o in agg._OWNER])


@settings(max_examples=300, deadline=None)
@given(st.none() | _side_meta(0), st.none() | _side_meta(1), st.booleans())
def test_merged_fields_of_sides_that_keep_to_their_own_follow_the_definition(smeta: Any, dmeta: Any, v6: bool) -> None:
    """The fast path (neither side has a value in the other's fields), cached and not."""
    cache: dict[Any, Any] = {}
    assert agg._merged(smeta, dmeta, v6, cache) == _definition(smeta, dmeta, v6)
    assert agg._merged(smeta, dmeta, v6, cache) == _definition(smeta, dmeta, v6)
