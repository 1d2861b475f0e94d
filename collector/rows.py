"""Aggregated flow records into the store's columns, and stored rows back into records.

Ingest's hot path: :func:`flows_to_columns` turns a batch of ExportedFlows (anything with
``record``, ``correlation`` and ``final``) into one list per column of
:data:`~flowscope.collector.schema.COLUMNS`, the form both backends insert fastest.
Records are taken a shape (flow family, exporter family) at a time, each column with one
C-level ``map``, and each integer column is checked as a whole by building an ``array`` of
the column's width (a non-integer, a negative or too large a value raises); only when a
column fails are its records checked one by one, so one bad record costs only itself and
is left out and counted, never sent to fail the whole insert. Those arrays are the columns
handed to the backend (chDB reads them as numpy views, no per-value conversion).

:func:`row_to_record` rebuilds the original IE dict of a stored row: the family of the
flow's addresses is the family of ``sourceIP`` (a ``:`` is IPv6), the exporter's that of
``originalExporterIP``.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from operator import attrgetter, itemgetter, methodcaller
from typing import Any

from .schema import COLUMNS, RECORD_COLUMNS, Column

__all__ = ["ARRAY_CODES", "flows_to_columns", "row_to_record", "typed_columns"]

_RECORD_COLUMNS = RECORD_COLUMNS


def _value_ok(col: Column, v: Any) -> bool:
    if col.is_int:
        return isinstance(v, int) and 0 <= v <= col.maximum
    return type(v) is str


def _shape_names(v6: bool, e6: bool) -> tuple[str, ...]:
    """The element names of the record columns for one record shape (flow family, exporter family)."""
    out = []
    for col in _RECORD_COLUMNS:
        if len(col.elements) == 2:
            out.append(col.elements[1 if (e6 if col.name == "originalExporterIP" else v6) else 0])
        else:
            out.append(col.elements[0])
    return tuple(out)


# Per record shape, one C-level getter per column.
_SHAPE_GETTERS = {
    (v6, e6): tuple(itemgetter(n) for n in _shape_names(v6, e6)) for v6 in (False, True) for e6 in (False, True)
}


def _slow_columns(recs: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Columns of records that may lack elements (defaults: 0, empty text)."""
    out: list[list[Any]] = []
    for col in _RECORD_COLUMNS:
        if len(col.elements) == 2:
            a, b = col.elements
            out.append([r.get(a) or r.get(b) or "" for r in recs])
        else:
            (name,) = col.elements
            default: Any = 0 if col.is_int else ""
            out.append([r.get(name, default) for r in recs])
    return out


def _record_columns(recs: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Columns of records of one shape; the aggregator's carry every element of theirs (fast path)."""
    if not recs:
        return [[] for _ in _RECORD_COLUMNS]
    r0 = recs[0]
    getters = _SHAPE_GETTERS["sourceIPv6Address" in r0, "originalExporterIPv6Address" in r0]
    try:
        return [list(map(g, recs)) for g in getters]
    except KeyError:
        return _slow_columns(recs)


_get_record = attrgetter("record")
_get_correlation = attrgetter("correlation")
_get_final = attrgetter("final")
_HAS_V6 = methodcaller("__contains__", "sourceIPv6Address")
_HAS_E6 = methodcaller("__contains__", "originalExporterIPv6Address")


def _shape(flow: Any) -> tuple[bool, bool]:
    r = flow.record
    return "sourceIPv6Address" in r, "originalExporterIPv6Address" in r


ARRAY_CODES = {"UInt8": "B", "UInt16": "H", "UInt32": "I", "UInt64": "Q", "DateTime": "I"}
_ARRAY_CODES = ARRAY_CODES
_BITS = {"UInt8": 8, "UInt16": 16, "UInt32": 32, "UInt64": 64, "DateTime": 32}
# Types whose array code is wider than the column on this platform (then the maximum is checked too).
_WIDER = frozenset(t for t, code in _ARRAY_CODES.items() if array(code).itemsize * 8 > _BITS[t])


def _typed(values: Sequence[Sequence[Any]]) -> list[Any] | None:
    """The columns typed, or None if a value does not fit its column: an ``array`` of the
    column's width takes an int column in one C pass (a non-int, a negative or too large a
    value raises) and is the typed column itself; text must be str."""
    out: list[Any] = []
    for col, vals in zip(_RECORD_COLUMNS, values):
        if col.is_int:
            try:
                typed = array(_ARRAY_CODES[col.type], vals)
            except (TypeError, OverflowError):
                return None
            if vals and col.type in _WIDER and max(typed) > col.maximum:
                return None
            out.append(typed)
        elif vals and set(map(type, vals)) != {str}:
            return None
        else:
            out.append(vals)
    return out


def flows_to_columns(flows: Sequence[Any], *, time_inserted: int, commit_id: int) -> tuple[list[Any], int]:
    """Typed columns (in :data:`COLUMNS` order: ``array``s of the column's width for
    integers, lists of str for text) of a batch of ExportedFlows, and how many were left out.

    Records are taken a shape (flow family, exporter family) at a time, each column with
    one C-level ``map``, and each column is checked as a whole; only when a column fails
    are its records checked one by one, so one bad record costs only itself. Rows may
    come out grouped by shape (a table has no row order).
    """
    groups: dict[tuple[bool, bool], list[Any]] = {}
    try:  # usually one shape (an IPv4 cluster): two C-level passes tell, no loop in Python
        recs = list(map(_get_record, flows))
        v6 = set(map(_HAS_V6, recs))
        e6 = set(map(_HAS_E6, recs))
        if len(v6) == 1 and len(e6) == 1:
            groups[v6.pop(), e6.pop()] = list(flows)
    except (AttributeError, TypeError):
        pass
    if not groups:
        for f in flows:
            try:
                key = _shape(f)
            except (AttributeError, TypeError):
                key = (False, False)  # not a record mapping: the row check below leaves it out
            groups.setdefault(key, []).append(f)
    parts = [_checked(g) for g in groups.values()]
    kept = [f for part in parts for f in part[0]]
    invalid = sum(part[2] for part in parts)
    if len(parts) == 1:
        values = parts[0][1]
    else:
        values = [array(_ARRAY_CODES[c.type]) if c.is_int else [] for c in _RECORD_COLUMNS]
        for _, vals, _ in parts:
            for acc, v in zip(values, vals):
                acc.extend(v)
    n = len(kept)
    final = array("B", map(bool, map(_get_final, kept)))
    return [array("I", (time_inserted,)) * n, *values, list(map(_get_correlation, kept)), final,
            array("Q", (commit_id,)) * n], invalid


def _row_ok(f: Any) -> bool:
    try:
        row = _slow_columns([f.record])
    except (AttributeError, TypeError):
        return False
    return type(f.correlation) is str and all(_value_ok(col, vals[0]) for col, vals in zip(_RECORD_COLUMNS, row))


def _checked(flows: list[Any]) -> tuple[list[Any], list[Any], int]:
    """(flows kept, their typed record columns, how many were left out) for flows of one shape."""
    try:
        typed = _typed(_record_columns(list(map(_get_record, flows))))
        if typed is not None and (not flows or set(map(type, map(_get_correlation, flows))) == {str}):
            return flows, typed, 0
    except (AttributeError, TypeError):
        pass
    good = [f for f in flows if _row_ok(f)]
    typed = _typed(_record_columns([f.record for f in good]))
    assert typed is not None  # every value of every kept row was checked
    return good, typed, len(flows) - len(good)


def row_to_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """The aggregated record (IE names, the decoder's value forms) of a stored row.

    The family of the flow's addresses is the family of ``sourceIP``; the exporter's is
    that of ``originalExporterIP``.
    """
    v6 = ":" in row["sourceIP"]
    e6 = ":" in row["originalExporterIP"]
    out: dict[str, Any] = {}
    for col in _RECORD_COLUMNS:
        if len(col.elements) == 2:
            which = e6 if col.name == "originalExporterIP" else v6
            out[col.elements[1 if which else 0]] = row[col.name]
        else:
            out[col.elements[0]] = row[col.name]
    return out


def typed_columns(columns: Sequence[Sequence[Any]]) -> list[Any]:
    """Columns with every integer column an ``array`` of its width (those of
    :func:`flows_to_columns` already are; lists given by hand become arrays); text stays lists."""
    out: list[Any] = []
    for col, vals in zip(COLUMNS, columns):
        if col.is_int and not isinstance(vals, array):
            out.append(array(_ARRAY_CODES[col.type], vals))
        else:
            out.append(vals)
    return out



