"""IPFIX data sets decoded into typed columns: one array per field, per set, no dict per record.

Why it exists: a collector that stores flows wants columns, and the record decoder
(:meth:`~flowscope.ipfix.template.Template.decode_records`) builds one dict per record
(about 1 µs each) that the store takes apart again. :func:`decode_set` reads a data set
body once and hands back a :class:`ColumnSet`: for every field of the template, its values
of all the set's records in one column laid out from the template:

* integers (unsigned, signed, dateTimeSeconds; reduced-size encoding widened) an
  ``array`` of the element type's width (``B``/``H``/``I``/``Q``, ``b``/``h``/``i``/``q``);
* floats and the finer dateTime types (epoch seconds, as the record decoder gives them)
  an ``array('d')``; booleans an ``array('B')`` of 1 (true) and 0;
* text (strings, addresses and MAC addresses as text, exactly as the record decoder
  spells them) and octets a :class:`VarColumn`: Arrow's variable-length layout, int32
  offsets into one data buffer (UTF-8 for text), which Arrow reads without a copy.

A set keeps the buffers the decoder wrote (:attr:`ColumnSet.buffers`), and makes the
typed objects only when asked: a store joining the columns of many sets never needs them.

The values are the record decoder's, value for value, with the same type rules
(``accel._kind``: a length that does not fit its type, or a fixed-size type sent with
variable length, is octets), on valid and malformed input alike; a set whose record
runs past its end raises :class:`~flowscope.ipfix.errors.MalformedMessage`
(tests/ipfix/test_ipfix_columnar.py compares both with hypothesis).

The work is done by the C extension ``_columnar`` (ipfix/_columnar.c, optional, built by
setup.py where a compiler is at hand; ``FLOWSCOPE_IPFIX_COLUMNAR_PURE=1`` turns it off).
Its pure-Python twin decodes with the generated pure-Python record codec and transposes:
slower, but it cannot drift from the record decoder's semantics.

:class:`ColumnarDecoder` is a :class:`~flowscope.ipfix.codec.Decoder` whose messages
(:class:`ColumnarMessage`) carry their data sets as column sets (``column_sets``); the
template handling, limits and sequence accounting are the Decoder's own. Such a message
still answers :meth:`~ColumnarMessage.data_records` (records decoded on demand), so a
consumer that wants dicts loses nothing.
"""

from __future__ import annotations

import functools
import logging
import struct
from array import array
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Any, Union, cast, overload

from .accel import _kind, optional_extension, say_once
from .codec import Decoder, Message
from .errors import MalformedMessage
from .registry import VARIABLE_LENGTH, DataType
from .template import Record, Template

__all__ = ["PURE_ENV", "ColumnSet", "ColumnarDecoder", "ColumnarMessage", "Column", "VarColumn", "accelerated",
           "concat", "decode_set"]

log = logging.getLogger("flowscope.ipfix")

#: Set to 1 to use the pure-Python twin even where the C extension is built.
PURE_ENV = "FLOWSCOPE_IPFIX_COLUMNAR_PURE"

_columnar, _why_not = optional_extension(f"{__package__}._columnar", PURE_ENV)

# The C extension's kinds, in its enum's order.
KINDS = ("UINT", "SINT", "F32", "F64", "BOOL", "MAC", "SECONDS", "MILLIS", "NTP", "IP4", "IP6",
         "STR_VAR", "STR_FIX", "OCT_VAR", "OCT_FIX")
_KIND = {k: i for i, k in enumerate(KINDS)}
_TEXT_KINDS = frozenset({"MAC", "IP4", "IP6", "STR_VAR", "STR_FIX"})
_OCTET_KINDS = frozenset({"OCT_VAR", "OCT_FIX"})
_FLOAT_KINDS = frozenset({"F32", "F64", "MILLIS", "NTP"})
_WIDTH = {DataType.unsigned8: 1, DataType.unsigned16: 2, DataType.unsigned32: 4, DataType.unsigned64: 8,
          DataType.signed8: 1, DataType.signed16: 2, DataType.signed32: 4, DataType.signed64: 8}
_UCODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_SCODES = {1: "b", 2: "h", 4: "i", 8: "q"}
for _c, _n in (*_UCODES.items(), *_SCODES.items(), (8, "d")):  # the C extension writes these widths
    assert array(_n).itemsize == _c, _n


def accelerated() -> bool:
    """Whether data sets are decoded into columns by the C extension."""
    return _columnar is not None


# --------------------------------------------------------------------------- columns

class VarColumn(Sequence[Any]):
    """Values of variable size in Arrow's layout: ``offsets`` (n + 1 int32, native order)
    into ``data``; text (UTF-8, indexing gives str) or octets (indexing gives bytes)."""

    __slots__ = ("offsets", "data", "text", "_view")

    def __init__(self, offsets: bytes, data: bytes, text: bool) -> None:
        self.offsets = offsets
        self.data = data
        self.text = text
        self._view: memoryview | None = None  # made when first indexed: most columns never are

    @property
    def _o(self) -> memoryview:
        if self._view is None:
            self._view = memoryview(self.offsets).cast("i")
        return self._view

    def __len__(self) -> int:
        return len(self.offsets) // 4 - 1

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        raw = self.data[self._o[i]:self._o[i + 1]]
        return raw.decode("utf-8") if self.text else raw

    def __iter__(self) -> Iterator[Any]:
        o, data = self._o, self.data
        if self.text:
            return (data[o[i]:o[i + 1]].decode("utf-8") for i in range(len(o) - 1))
        return (data[o[i]:o[i + 1]] for i in range(len(o) - 1))

    def tolist(self) -> list[Any]:
        return list(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VarColumn):
            return NotImplemented
        return self.text == other.text and self.offsets == other.offsets and self.data == other.data

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<VarColumn {'text' if self.text else 'octets'} of {len(self)}>"


Column = Union["array[Any]", VarColumn]


Buffer = Union[bytes, tuple[bytes, bytes]]


class ColumnSet:
    """The records of one data set as columns, one per template field (template order).

    ``buffers`` are what the decoder wrote, per field: a number column's bytes (native
    order, the typecode's width) or a variable-size column's (offsets, data) pair; a
    consumer that joins columns (a store) takes them as they are. :attr:`columns` are the
    same as typed objects (``array`` or :class:`VarColumn`), made when asked for."""

    __slots__ = ("template", "count", "buffers", "codes", "texts", "kinds")

    def __init__(self, template: Template, count: int, buffers: Sequence[Buffer], codes: Sequence[str | None],
                 texts: Sequence[bool], kinds: Sequence[str]) -> None:
        self.template = template
        self.count = count
        self.buffers = buffers
        self.codes = codes  # per field: an array typecode, or None for a variable-size column
        self.texts = texts  # per field: a variable-size column of text (else octets)
        self.kinds = kinds  # per field: how it was decoded (accel._kind: "UINT", "BOOL", "IP4", ...)

    @property
    def columns(self) -> tuple[Column, ...]:
        out: list[Column] = []
        for code, text, b in zip(self.codes, self.texts, self.buffers):
            if isinstance(b, tuple):
                out.append(VarColumn(b[0], b[1], text))
            else:
                out.append(array(code or "B", b))
        return tuple(out)

    def column(self, key: str) -> Column:
        """The column of a record key (the element name; ``name#2`` for a repeat)."""
        return self.columns[self.template.keys.index(key)]

    def values(self, key: str) -> list[Any]:
        return self.column(key).tolist()

    def records(self) -> list[Record]:
        """The set's records as the record decoder's dicts, value for value."""
        if not self.count:
            return []
        values = [list(map(bool, c)) if kind == "BOOL" else c.tolist() for c, kind in zip(self.columns, self.kinds)]
        return [dict(zip(self.template.keys, row)) for row in zip(*values)]


@dataclass(frozen=True, slots=True)
class _Plan:
    plan: bytes  # 4 octets a field: kind, width, length (native u16)
    min_length: int
    kinds: tuple[str, ...]
    codes: tuple[str | None, ...]  # an array typecode, or None for a VarColumn
    texts: tuple[bool, ...]  # a VarColumn of text (else octets)


_PLANS: dict[Template, _Plan] = {}  # by template: its hash is kept, and a hit is an identity compare
_MAX_PLANS = 4096


def _plan_of(template: Template) -> _Plan:
    plan = _PLANS.get(template)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:  # bounded: a peer sending ever new templates only empties it
            _PLANS.clear()
        plan = _PLANS[template] = _layout_plan(template.fields)
    return plan


@functools.lru_cache(maxsize=1024)
def _layout_plan(fields: tuple[Any, ...]) -> _Plan:
    helpers: defaultdict[str, Any] = defaultdict(lambda: None)
    packed = bytearray()
    kinds, codes = [], []
    min_length = 0
    for f in fields:
        kind, _ = _kind(f.ie, f.length, helpers)
        if kind in ("UINT", "SINT"):
            width = _WIDTH.get(f.ie.data_type, 8)
            code: str | None = (_UCODES if kind == "UINT" else _SCODES)[width]
        elif kind in _FLOAT_KINDS:
            width, code = 8, "d"
        elif kind == "BOOL":
            width, code = 1, "B"
        elif kind == "SECONDS":
            width, code = 4, "I"
        else:
            width, code = 0, None
        packed += struct.pack("=BBH", _KIND[kind], width, f.length)
        kinds.append(kind)
        codes.append(code)
        min_length += 1 if f.length == VARIABLE_LENGTH else f.length
    return _Plan(bytes(packed), min_length, tuple(kinds), tuple(codes), tuple(k in _TEXT_KINDS for k in kinds))


def decode_set(template: Template, buf: bytes, off: int, end: int) -> ColumnSet:
    """The records of a data set body ``buf[off:end]`` as columns; trailing padding (less
    than a record) is skipped. A record running past ``end`` raises MalformedMessage."""
    plan = _plan_of(template)
    if _columnar is None:
        return _decode_set_py(template, plan, buf, off, end)
    try:
        n, raw = _columnar.decode_set(buf, off, end, plan.plan, plan.min_length)
    except (ValueError, OverflowError) as exc:
        raise MalformedMessage(f"data set for template {template.template_id}: {exc}") from None
    return ColumnSet(template, n, raw, plan.codes, plan.texts, plan.kinds)


def _decode_set_py(template: Template, plan: _Plan, buf: bytes, off: int, end: int) -> ColumnSet:
    """The twin: the generated pure-Python record codec's records, transposed."""
    if not 0 <= off <= end <= len(buf):
        raise MalformedMessage(f"data set for template {template.template_id}: set body {off}..{end} is outside "
                               f"the {len(buf)}-octet buffer")
    records = template._decode_records_py(buf, off, end)
    buffers: list[Buffer] = []
    for key, code, kind in zip(template.keys, plan.codes, plan.kinds):
        vals = [r[key] for r in records]
        if code is not None:
            buffers.append(array(code, vals).tobytes())
            continue
        col = _var_column([v.encode("utf-8") for v in vals] if kind in _TEXT_KINDS else vals, kind in _TEXT_KINDS)
        buffers.append((col.offsets, col.data))
    return ColumnSet(template, len(records), buffers, plan.codes, plan.texts, plan.kinds)


def _var_column(datas: Sequence[bytes], text: bool) -> VarColumn:
    offsets = array("i", [0])
    at = 0
    for d in datas:
        at += len(d)
        offsets.append(at)
    return VarColumn(offsets.tobytes(), b"".join(datas), text)


def concat(columns: Sequence[VarColumn]) -> VarColumn:
    """Variable-size columns of the same kind joined into one (offsets rebased)."""
    if not columns:
        raise ValueError("concat needs at least one column")
    text = columns[0].text
    if any(c.text != text for c in columns):
        raise ValueError("concat: text and octets columns do not mix")
    if _columnar is not None:
        offsets, data = _columnar.concat([(c.offsets, c.data) for c in columns])
        return VarColumn(offsets, data, text)
    out = array("i", [0])
    base = 0
    for c in columns:
        o = array("i")
        o.frombytes(c.offsets)
        out.extend(base + x for x in o[1:])
        base += len(c.data)
    if base > 0x7FFFFFFF:
        raise OverflowError("concat: the data outgrows int32 offsets")
    return VarColumn(out.tobytes(), b"".join(c.data for c in columns), text)


# --------------------------------------------------------------------------- decoder

@dataclass(slots=True)
class ColumnarMessage(Message):
    """A message whose data sets are column sets (``column_sets``, in message order);
    ``sets`` holds its template sets only."""

    column_sets: list[ColumnSet] = field(default_factory=list)

    def data_records(self) -> Iterator[tuple[Template, Record]]:
        """Every data record with its template, rebuilt from the columns."""
        return chain.from_iterable([zip(repeat(s.template), s.records()) for s in self.column_sets])

    @property
    def record_count(self) -> int:
        return sum(s.count for s in self.column_sets)


class ColumnarDecoder(Decoder):
    """A Decoder whose data sets come out as columns (:class:`ColumnarMessage`).

    The message walk is :meth:`Decoder.decode` itself, set for set and check for check;
    only a data set is decoded by :func:`decode_set` instead of into records."""

    message_class = ColumnarMessage

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        say_once(log, "IPFIX columns", _columnar, _why_not, "C decoder", "pure-Python twin")

    def decode(self, data: bytes, now: float = 0.0) -> ColumnarMessage:
        return cast(ColumnarMessage, super().decode(data, now))

    def _data_set(self, msg: Message, template: Template, data: bytes, body: int, end: int) -> None:
        cast(ColumnarMessage, msg).column_sets.append(decode_set(template, data, body, end))
