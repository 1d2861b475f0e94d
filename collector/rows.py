"""Aggregated flow records into the store's columns, and stored rows back into records.

Ingest's hot path: :func:`records_to_columns` (the collector's decoded records) and
:func:`flows_to_columns` (the aggregator's ExportedFlows) turn a batch into one typed
column per column of :data:`~flowscope.collector.schema.COLUMNS`, built once: every
integer column an ``array`` of the column's width (its bytes are what chDB's Native insert
takes, no per-value conversion), every text column either a :class:`TextColumn` (Arrow's
string layout, int32 offsets and UTF-8 data, rewritten in one C pass as Native's
length-prefixed strings by :func:`native_text`) or a list of str (what the server's driver
takes). Each backend says which it wants (``text_form``).

The transposition is :func:`transpose`: the C extension ``_rowcols``
(collector/_rowcols.c, built by setup.py when a compiler is at hand) or its pure-Python
twin :func:`_transpose_py`, which checks every value the same way (tests compare them,
valid and malformed records): an integer column takes an int in its range (missing: 0),
a text column an exact str that encodes as UTF-8 (missing: ""), a folded address column
``v4 or v6 or ""``, the correlation an exact str. A record with a value its column cannot
hold is left out whole and counted (never stored wrong, never sent to fail the whole
insert); one log line says which implementation serves.

:func:`row_to_record` rebuilds the original IE dict of a stored row: the family of the
flow's addresses is the family of ``sourceIP`` (a ``:`` is IPv6), the exporter's that of
``originalExporterIP``.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Collection, Iterator, Mapping, Sequence
from operator import attrgetter, methodcaller
from dataclasses import dataclass
from typing import Any, Literal, overload

from flowscope.ipfix.accel import optional_extension, say_once
from flowscope.ipfix import columnar as _ipfix_columnar
from flowscope.ipfix.columnar import ColumnSet, VarColumn, concat

from .schema import COLUMNS, RECORD_COLUMNS, Column

__all__ = ["ARRAY_CODES", "PURE_ENV", "TextColumn", "accelerated", "block_rows", "columns_of", "flows_to_columns", "int_bytes", "leb128",
           "native_text", "records_to_columns", "row_to_record", "sets_to_columns", "transpose", "typed_columns"]

log = logging.getLogger("flowscope.collector.rows")

#: Set to 1 to use the pure-Python transposition even where the C extension is built.
PURE_ENV = "FLOWSCOPE_ROWS_PURE"

TextForm = Literal["list", "arrow"]

_RECORD_COLUMNS = RECORD_COLUMNS
ARRAY_CODES = {"UInt8": "B", "UInt16": "H", "UInt32": "I", "UInt64": "Q", "DateTime": "I"}
_ARRAY_CODES = ARRAY_CODES
for _code in set(_ARRAY_CODES.values()):  # the C extension writes the column's width; array must read it
    assert array(_code).itemsize * 8 == {"B": 8, "H": 16, "I": 32, "Q": 64}[_code], _code

# The C extension's plan: element name -> slot, and per record column (kind, width, slot_a, slot_b).
_SLOT_OF: dict[str, int] = {}
for _col in _RECORD_COLUMNS:
    for _el in _col.elements:
        _SLOT_OF.setdefault(_el, len(_SLOT_OF))
_PLAN: tuple[tuple[int, int, int, int], ...] = tuple(
    (0 if c.is_int else 1, c.width, _SLOT_OF[c.elements[0]],
     _SLOT_OF[c.elements[1]] if len(c.elements) == 2 else -1)
    for c in _RECORD_COLUMNS)

_rowcols, _why_not = optional_extension(f"{__package__}._rowcols", PURE_ENV)
# the IPFIX library's column join in C (pairs of offsets and data), where it is built
_columnar_concat = _ipfix_columnar._columnar.concat if _ipfix_columnar._columnar is not None else None


def accelerated() -> bool:
    """Whether records are transposed by the C extension."""
    return _rowcols is not None


def _say_once() -> None:
    say_once(log, "store columns", _rowcols, _why_not, "C transposition", "pure-Python transposition")


class TextColumn(Sequence[str]):
    """A text column in Arrow's string layout: ``offsets`` (n + 1 int32, little-endian)
    into ``data`` (UTF-8), as the transposition and the decoder's columns build it; the chDB
    store rewrites it in one pass as Native's strings (:func:`native_text`); indexing
    decodes one value (tests and the server's fallback)."""

    __slots__ = ("offsets", "data", "_n")

    def __init__(self, offsets: bytes, data: bytes) -> None:
        self.offsets = memoryview(offsets).cast("i")
        self.data = data
        self._n = len(self.offsets) - 1

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self.data[self.offsets[i]:self.offsets[i + 1]].decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(self._n))

    def tolist(self) -> list[str]:
        return list(self)


# --------------------------------------------------------------------------- the twin

def _value_ok(col: Column, v: Any) -> bool:
    if col.is_int:
        return isinstance(v, int) and 0 <= v <= col.maximum
    return _text_ok(v)


def _text_ok(v: Any) -> bool:
    if type(v) is not str:
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _texts_ok(vals: Sequence[Any]) -> bool:
    """Every value an exact str that encodes as UTF-8 (a whole column in two C passes)."""
    if vals and set(map(type, vals)) != {str}:
        return False
    try:
        "".join(vals).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_GETTERS = tuple(
    (methodcaller("get", c.elements[0]), methodcaller("get", c.elements[1])) if len(c.elements) == 2
    else methodcaller("get", c.elements[0], 0 if c.is_int else "")
    for c in _RECORD_COLUMNS)


def _either(a: Any, b: Any) -> Any:
    return a or b or ""


def _as_dict(r: Any) -> dict[Any, Any] | None:
    """A record as a dict, as the C extension takes it (any mapping is copied); None if it is none."""
    if isinstance(r, dict):
        return r
    try:
        return {k: r[k] for k in r.keys()}
    except Exception:  # noqa: BLE001 - not a mapping: the record is left out
        return None


def _values(recs: Sequence[dict[Any, Any]]) -> list[list[Any]]:
    """One list per record column (defaults for what a record lacks), C-level passes."""
    out: list[list[Any]] = []
    for g in _GETTERS:
        if isinstance(g, tuple):
            out.append(list(map(_either, map(g[0], recs), map(g[1], recs))))
        else:
            out.append(list(map(g, recs)))
    return out


def _int_types_ok(vals: Sequence[Any]) -> bool:
    return all(issubclass(t, int) for t in set(map(type, vals)))


def _typed(values: Sequence[Sequence[Any]]) -> list[Any] | None:
    """The record columns typed, or None if a value does not fit its column."""
    out: list[Any] = []
    for col, vals in zip(_RECORD_COLUMNS, values):
        if col.is_int:
            if not _int_types_ok(vals):
                return None
            try:
                out.append(array(_ARRAY_CODES[col.type], vals))
            except (TypeError, OverflowError, ValueError):
                return None
        elif not _texts_ok(vals):
            return None
        else:
            out.append(list(vals))
    return out


def _row_ok(rec: dict[Any, Any] | None) -> bool:
    if rec is None:
        return False
    try:
        row = _values([rec])
    except Exception:  # noqa: BLE001 - a value whose truth cannot be told
        return False
    return all(_value_ok(col, vals[0]) for col, vals in zip(_RECORD_COLUMNS, row))


def _transpose_py(records: Sequence[Any], correlation: str | Sequence[Any]) -> tuple[list[Any], list[int]]:
    """The pure-Python twin of ``_rowcols.transpose`` (record columns, then the correlation
    column; the indices of the records left out). Columns are built and checked whole;
    only when one fails are the records checked one by one."""
    dicts = list(map(_as_dict, records))
    const = isinstance(correlation, str)
    corr: list[Any] = [] if const else list(correlation)
    if not const and len(corr) != len(dicts):
        raise ValueError("one correlation per record")
    typed: list[Any] | None = None
    if None not in dicts:
        try:
            typed = _typed(_values(dicts))  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - a value whose truth cannot be told: checked row by row
            typed = None
        if typed is not None and not const and not _texts_ok(corr):
            typed = None
    bad: list[int] = []
    if typed is None:
        keep = [i for i, d in enumerate(dicts) if _row_ok(d) and (const or _text_ok(corr[i]))]
        kept = set(keep)
        bad = [i for i in range(len(dicts)) if i not in kept]
        typed = _typed(_values([dicts[i] for i in keep]))  # type: ignore[misc]
        assert typed is not None  # every value of every kept row was checked
        corr = [corr[i] for i in keep] if not const else corr
    n = len(dicts) - len(bad)
    typed.append([correlation] * n if const else corr)
    return typed, bad


def transpose(records: Sequence[Any], correlation: str | Sequence[Any], *,
              text: TextForm = "list") -> tuple[list[Any], list[int]]:
    """Record columns (in :data:`RECORD_COLUMNS` order) and the correlation column of
    ``records``: integer columns ``array``s of their width, text columns lists of str
    (``text="list"``) or, from the C extension, :class:`TextColumn`s (``"arrow"``); and
    the indices of the records left out (a value their column cannot hold)."""
    _say_once()
    if isinstance(correlation, str) and not _text_ok(correlation):
        raise ValueError(f"correlation {correlation!r} is not text that encodes as UTF-8")
    if _rowcols is None:
        return _transpose_py(records, correlation)
    raw, bad = _rowcols.transpose(records, _SLOT_OF, len(_SLOT_OF), _PLAN, correlation, text == "list")
    return columns_of(raw), bad


def columns_of(raw: Sequence[Any]) -> list[Any]:
    """A C transposition's columns (the record columns, then the correlation) as the store
    takes them: an integer column's bytes as an ``array`` of its type, text as a
    :class:`TextColumn` from ``(offsets, data)``, a list of str as it is. Shared by
    collector/_rowcols.c's ``transpose`` and aggregator/_aggr.c's ``columns``, which lay
    their output out alike."""
    out: list[Any] = []
    for col, v in zip((*_RECORD_COLUMNS, None), raw):
        if col is not None and col.is_int:
            a = array(_ARRAY_CODES[col.type])
            a.frombytes(v)
            out.append(a)
        elif isinstance(v, tuple):
            out.append(TextColumn(*v))
        else:
            out.append(v)
    return out


# --------------------------------------------------------------------------- batches

def _drop(values: list[Any], bad: Sequence[int]) -> list[Any]:
    if not bad:
        return values
    gone = set(bad)
    return [v for i, v in enumerate(values) if i not in gone]


def _assemble(cols: list[Any], final: array, *, time_inserted: int, commit_id: int) -> list[Any]:
    n = len(final)
    return [array("I", (time_inserted,)) * n, *cols[:-1], cols[-1], final, array("Q", (commit_id,)) * n]


_FLOW_END_REASON = next(i for i, c in enumerate(_RECORD_COLUMNS) if c.name == "flowEndReason")
assert _RECORD_COLUMNS[_FLOW_END_REASON].type == "UInt8"  # _final maps it through a 256-byte table


def _final(reasons: Any, ended: Collection[int]) -> array:
    """The ``final`` column (UInt8, 0 or 1): whether each row's flowEndReason (a UInt8
    column: its octets are its values) is in ``ended``."""
    ends = frozenset(ended)
    return array("B", bytes(reasons).translate(bytes(i in ends for i in range(256))))


def records_to_columns(records: Sequence[Mapping[str, Any]], *, correlation: str, ended: Collection[int],
                       time_inserted: int, commit_id: int, text: TextForm = "list") -> tuple[list[Any], int]:
    """Typed columns (in :data:`COLUMNS` order) of decoded records, and how many were left
    out. Every row gets ``correlation``; ``final`` is whether its flowEndReason is in ``ended``."""
    cols, bad = transpose(records, correlation, text=text)
    return _assemble(cols, _final(cols[_FLOW_END_REASON], ended), time_inserted=time_inserted, commit_id=commit_id), len(bad)


_get_record = attrgetter("record")
_get_correlation = attrgetter("correlation")
_get_final = attrgetter("final")


def _flow_parts(flows: Sequence[Any]) -> tuple[list[Any], list[Any], list[Any]]:
    try:
        return list(map(_get_record, flows)), list(map(_get_correlation, flows)), list(map(_get_final, flows))
    except AttributeError:  # something that is no ExportedFlow: left out as invalid below
        recs, corr, fin = [], [], []
        for f in flows:
            ok = all(hasattr(f, a) for a in ("record", "correlation", "final"))
            recs.append(f.record if ok else None)
            corr.append(f.correlation if ok else None)
            fin.append(f.final if ok else False)
        return recs, corr, fin


def flows_to_columns(flows: Sequence[Any], *, time_inserted: int, commit_id: int,
                     text: TextForm = "list") -> tuple[list[Any], int]:
    """Typed columns (in :data:`COLUMNS` order) of a batch of ExportedFlows (anything with
    ``record``, ``correlation`` and ``final``), and how many were left out."""
    recs, corr, fin = _flow_parts(flows)
    cols, bad = transpose(recs, corr, text=text)
    final = array("B", map(bool, _drop(fin, bad)))
    return _assemble(cols, final, time_inserted=time_inserted, commit_id=commit_id), len(bad)


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
    :func:`flows_to_columns` already are; lists given by hand become arrays); text stays
    as given (lists of str or :class:`TextColumn`)."""
    out: list[Any] = []
    for col, vals in zip(COLUMNS, columns):
        if col.is_int and not isinstance(vals, array):
            out.append(array(_ARRAY_CODES[col.type], vals))
        else:
            out.append(vals)
    return out


# --------------------------------------------------------------------------- column sets

@dataclass(frozen=True, slots=True)
class _SetPlan:
    """Where each record column of the store comes from in one template's column set:
    per record column (field index or -1, IPv6 field index or -1 for a folded address),
    and whether the set can be taken as it is (every present field of the column's type)."""

    sources: tuple[tuple[int, int], ...]
    direct: bool


_SET_PLANS: dict[Any, _SetPlan] = {}


def _set_plan(template: Any, cs: ColumnSet) -> _SetPlan:
    plan = _SET_PLANS.get(template)
    if plan is not None:
        return plan
    index = {k: i for i, k in enumerate(template.keys)}
    sources = []
    direct = True
    for col in _RECORD_COLUMNS:
        a = index.get(col.elements[0], -1)
        b = index.get(col.elements[1], -1) if len(col.elements) == 2 else -1
        if a >= 0 and b >= 0:
            direct = False  # both families in one template: `v4 or v6` per record, by the twin
        for i in (a, b):
            if i < 0:
                continue
            if col.is_int:
                direct &= cs.codes[i] == _ARRAY_CODES[col.type]
            else:
                direct &= cs.codes[i] is None and cs.texts[i]
        sources.append((a, b))
    if len(_SET_PLANS) >= 4096:
        _SET_PLANS.clear()
    plan = _SET_PLANS[template] = _SetPlan(tuple(sources), direct)
    return plan


_EMPTY_TEXT: dict[int, bytes] = {}


def _no_text(n: int) -> tuple[bytes, bytes]:
    offsets = _EMPTY_TEXT.get(n)
    if offsets is None:
        offsets = bytes(4 * (n + 1))
        if len(_EMPTY_TEXT) < 256:
            _EMPTY_TEXT[n] = offsets
    return offsets, b""


def _text_part(v: Any) -> tuple[bytes, bytes]:
    """A text column chunk of the twin's output (TextColumn or list of str) as (offsets, data)."""
    if isinstance(v, TextColumn):
        return bytes(v.offsets), v.data
    datas = [s.encode("utf-8") for s in v]
    offsets = array("i", [0])
    at = 0
    for d in datas:
        at += len(d)
        offsets.append(at)
    return offsets.tobytes(), b"".join(datas)


def leb128(n: int) -> bytes:
    """An unsigned integer as ClickHouse's Native format writes lengths and counts: LEB128,
    seven bits a byte, low first, the high bit set on every byte but the last."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def block_rows(columns: Sequence[Any]) -> int:
    """The rows of an insert block in :data:`~flowscope.collector.schema.COLUMNS` order,
    checked before anything is sent: one column per table column, each as long as the
    first (an integer column given as ``bytes``: whole values of its width)."""
    if len(columns) != len(COLUMNS):
        raise ValueError(f"{len(columns)} columns, the table has {len(COLUMNS)}")
    n = _column_length(COLUMNS[0], columns[0])
    for c, v in zip(COLUMNS, columns):
        if _column_length(c, v) != n:
            raise ValueError(f"column {c.name} has {_column_length(c, v)} values, the block {n}")
    return n


def _column_length(c: Column, v: Any) -> int:
    return len(v) // c.width if isinstance(v, bytes) and c.is_int else len(v)


def int_bytes(v: Any, c: Column, n: int) -> bytes | memoryview:
    """An integer column of ``n`` values in Native's layout, little-endian values of its
    width: a typed buffer as it is (it must hold exactly ``n`` values of that width),
    anything else (a list, a numpy or pyarrow array) converted."""
    if isinstance(v, (array, memoryview, bytes)):
        out: bytes | memoryview = memoryview(v).cast("B")
    else:
        import numpy as np

        out = np.asarray(v, dtype=f"<u{c.width}").tobytes()
    if len(out) != n * c.width:
        raise ValueError(f"a {c.type} column of {n} values takes {n * c.width} bytes, not {len(out)}")
    return out


def native_text(v: Any) -> bytes:
    """A text column (a :class:`TextColumn` or a list of str) in ClickHouse's Native layout:
    each value's UTF-8 length as :func:`leb128`, then its bytes. The chDB store inserts
    Native blocks (collector.chdb_store); the C extension writes it in one pass, the twin
    (:func:`_native_text_py`) gives the same bytes."""
    offsets, data = (v.offsets, v.data) if isinstance(v, TextColumn) else _text_part(v)
    if _rowcols is not None:
        return bytes(_rowcols.native_text(offsets, data))
    return _native_text_py(offsets, data)


def _native_text_py(offsets: bytes | memoryview, data: bytes) -> bytes:
    """The pure-Python twin of ``_rowcols.native_text``: the same bytes, the same refusals
    (offsets not n + 1 int32 values, going backwards or past the data). Vectorised with
    numpy when every value is under 128 bytes (one length byte each, the usual case)."""
    import numpy as np

    offsets = memoryview(offsets).cast("B")
    if len(offsets) < 4 or len(offsets) % 4:
        raise ValueError("offsets must be n + 1 int32 values")
    off = np.frombuffer(offsets, dtype="<i4").astype(np.int64)
    lengths = np.diff(off)
    if off[0] < 0 or off[-1] > len(data) or (lengths < 0).any():
        raise ValueError("offsets go backwards or past the data")
    n = len(lengths)
    payload = np.frombuffer(data, dtype=np.uint8)[off[0]:off[-1]]
    if not n or lengths.max() < 0x80:
        out = np.empty(n + len(payload), dtype=np.uint8)
        at = off[:-1] - off[0] + np.arange(n)  # where each value's length byte goes
        out[at] = lengths
        body = np.ones(len(out), dtype=bool)
        body[at] = False
        out[body] = payload
        return out.tobytes()
    return b"".join(leb128(int(b - a)) + data[a:b] for a, b in zip(off[:-1].tolist(), off[1:].tolist()))


def _join_text(parts: list[tuple[bytes, bytes]]) -> TextColumn:
    if len(parts) == 1:
        return TextColumn(*parts[0])
    if _columnar_concat is not None:
        return TextColumn(*_columnar_concat(parts))
    vc = concat([VarColumn(o, d, True) for o, d in parts])
    return TextColumn(vc.offsets, vc.data)


def _join_ints(code: str, parts: list[Any]) -> Any:
    """Integer column chunks (arrays or bytes of the column's width) as one typed buffer
    (a ``memoryview`` of the column's typecode)."""
    joined = parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)
    return memoryview(joined).cast(code)  # type: ignore[call-overload]


_IS_INT = tuple(c.is_int for c in _RECORD_COLUMNS)
_WIDTHS = tuple(c.width for c in _RECORD_COLUMNS)
_CODES = tuple(_ARRAY_CODES[c.type] if c.is_int else "" for c in _RECORD_COLUMNS)


def sets_to_columns(sets: Sequence[ColumnSet], records: Sequence[Mapping[str, Any]] = (), *, correlation: str,
                    ended: Collection[int], time_inserted: int, commit_id: int) -> tuple[list[Any], int]:
    """Typed columns (in :data:`COLUMNS` order) of decoded column sets (and of records
    decoded as dicts, if any: their rows come after the sets'), and how many records were
    left out. The rows and the checks are :func:`records_to_columns`'s: the sets of a
    template that carries every column's element with the column's type are taken as
    they are (an integer column is their arrays' buffers joined, a ``memoryview`` of the
    column's typecode; text their Arrow offsets and data joined, a :class:`TextColumn`;
    a missing element reads 0 or ""); the sets of any other template go through the
    twin, record by record."""
    _say_once()
    by_template: dict[Any, list[ColumnSet]] = {}
    for cs in sets:
        if cs.count:
            by_template.setdefault(cs.template, []).append(cs)
    int_parts: list[list[Any]] = [[] for _ in _RECORD_COLUMNS]
    text_parts: list[list[tuple[bytes, bytes]]] = [[] for _ in _RECORD_COLUMNS]
    slow: list[Mapping[str, Any]] = []
    n = 0
    for template, group in by_template.items():
        plan = _set_plan(template, group[0])
        if not plan.direct:
            for cs in group:
                slow.extend(cs.records())
            continue
        m = sum(cs.count for cs in group)
        n += m
        for j, (a, b) in enumerate(plan.sources):
            i = a if a >= 0 else b
            if _IS_INT[j]:
                int_parts[j].append(b"".join([cs.buffers[i] for cs in group]) if i >= 0  # type: ignore[misc]
                                    else bytes(m * _WIDTHS[j]))
            elif i >= 0:
                text_parts[j] += [cs.buffers[i] for cs in group]  # type: ignore[misc]
            else:
                text_parts[j].append(_no_text(m))
    slow.extend(records)
    bad = 0
    if slow:
        twin, left_out = transpose(slow, correlation, text="arrow")
        bad = len(left_out)
        n += len(slow) - bad
        for j, v in enumerate(twin[:-1]):
            if _IS_INT[j]:
                int_parts[j].append(v)
            else:
                text_parts[j].append(_text_part(v))
    out: list[Any] = []
    for j in range(len(_RECORD_COLUMNS)):
        if _IS_INT[j]:
            out.append(_join_ints(_CODES[j], int_parts[j]) if int_parts[j] else array(_CODES[j]))
        else:
            out.append(_join_text(text_parts[j]) if text_parts[j] else TextColumn(*_no_text(0)))
    word = correlation.encode("utf-8")
    w = len(word)
    out.append(TextColumn(array("i", range(0, w * (n + 1), w)).tobytes() if w else bytes(4 * (n + 1)), word * n))
    return _assemble(out, _final(out[_FLOW_END_REASON], ended), time_inserted=time_inserted, commit_id=commit_id), bad
