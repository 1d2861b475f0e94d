"""Templates, and the record codecs compiled from them.

A template (RFC 7011 section 3.4.1) is an ordered list of field specifiers: an
information element and the length it is sent with. Every data record of a set is laid
out exactly as its template says, so the same byte layout repeats for every record: the
fast way to read or write records is to turn each template into code once.

Theory of operation. :func:`_compile` splits a template's fields into runs of
fixed-length fields separated by variable-length ones (RFC 7011 section 7). Each run
becomes one precompiled ``struct.Struct``; the generated Python function unpacks a run
in one call, reads each variable-length field's one- or three-octet length prefix inline
(the 255 escape), converts the values that need it (addresses to text, timestamps to
epoch seconds) and fills the record dict by copying a prototype that already holds the
template's keys (cheaper than building a dict: no insertions, no resizing). A template
of fixed-length fields only decodes a whole set with one ``Struct.iter_unpack``. The
encoder is the mirror image. Compiled codecs are cached by layout, so a thousand
exporters sending the same template share one compiled function.

Integers may be declared shorter than their type (reduced-size encoding, RFC 7011 section
6.2) and are decoded from and encoded to that length. A field whose declared length does
not fit its type, or whose element is unknown, is kept as raw bytes rather than failing
the message: a collector should never lose what it was sent.
"""

from __future__ import annotations

import collections
import functools
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .accel import NativeCodec, native_codec
from .errors import InvalidValue, MalformedMessage, UsageError
from .registry import VARIABLE_LENGTH, DataType, InformationElement, Registry, default_registry

__all__ = ["FieldSpecifier", "Template", "Record", "CompileBudget", "layout_of", "is_compiled", "CODEC_CACHE"]

Record = dict[str, Any]

_NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900-01-01 (NTP) to 1970-01-01 (Unix)


@dataclass(frozen=True, slots=True)
class FieldSpecifier:
    """An element and the length it is encoded with (65535: variable length)."""

    ie: InformationElement
    length: int

    @property
    def variable(self) -> bool:
        return self.length == VARIABLE_LENGTH


# --- value conversions used by the generated code --------------------------------------


class _Intern(dict[Any, Any]):
    """Converted values by their source: flow records repeat the same addresses, Pod,
    Namespace, Node and policy names over and over, and a dict hit is cheaper than a
    conversion, both ways. Bounded twice, so that a peer cannot grow it: at most
    ``limit`` entries and about ``max_bytes`` octets of keys (the cache is emptied when
    either is reached), and a value longer than ``max_key`` octets is converted but never
    kept (Kubernetes names are at most 253). A value that fails to convert raises and is
    not cached."""

    __slots__ = ("convert", "limit", "max_bytes", "max_key", "size", "clears")

    def __init__(self, convert: Callable[[Any], Any], limit: int = 65536, *, max_bytes: int = 8 << 20,
                 max_key: int = 512) -> None:
        super().__init__()
        self.convert = convert
        self.limit = limit
        self.max_bytes = max_bytes
        self.max_key = max_key
        self.size = 0  # octets of the keys held (len of bytes or str keys)
        self.clears = 0

    def __missing__(self, key: Any) -> Any:
        value = self.convert(key)
        n = len(key) if isinstance(key, (bytes, str)) else 8
        if n > self.max_key:
            return value
        if len(self) >= self.limit or self.size + n > self.max_bytes:
            self.clear()
            self.size = 0
            self.clears += 1
        self[key] = value
        self.size += n
        return value


_ntoa4 = socket.inet_ntoa
_ntoa6 = functools.partial(socket.inet_ntop, socket.AF_INET6)
_IP4 = _Intern(_ntoa4)
_IP6 = _Intern(_ntoa6)
_STR = _Intern(bytes.decode)  # strict UTF-8; a set that fails is decoded again leniently
_LSTR = _Intern(lambda raw: raw.decode("utf-8", "replace"))  # what LENIENT uses for fixed-length strings


def _aton4(v: Any) -> bytes:
    return socket.inet_pton(socket.AF_INET, v if isinstance(v, str) else str(v))


def _aton6(v: Any) -> bytes:
    return socket.inet_pton(socket.AF_INET6, v if isinstance(v, str) else str(v))


def _mac_to_text(b: bytes) -> str:
    return b.hex(":")


def _mac_to_bytes(v: Any) -> bytes:
    if isinstance(v, (bytes, bytearray)):
        raw = bytes(v)
    else:
        raw = bytes.fromhex(str(v).replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"{v!r} is not a 6-octet MAC address")
    return raw


def _from_ntp(v: int) -> float:
    return (v >> 32) - _NTP_EPOCH_OFFSET + (v & 0xFFFFFFFF) / 4294967296.0


def _to_ntp(seconds: float) -> int:
    whole = int(seconds // 1)
    frac = int((seconds - whole) * 4294967296.0) & 0xFFFFFFFF
    return ((whole + _NTP_EPOCH_OFFSET) << 32) | frac


def _lenient_utf8(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _to_ms(seconds: float) -> int:
    return round(seconds * 1000)


def _bool_out(v: int) -> bool:
    return v == 1  # RFC 7011 6.1.5: true is 1, false is 2


def _bool_in(v: Any) -> int:
    if not isinstance(v, (bool, int)):
        raise TypeError(f"{v!r} is not a boolean")
    return 1 if v else 2


def _to_bytes(v: Any) -> bytes:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    raise TypeError(f"{type(v).__name__} is not bytes")


def _to_utf8(v: Any) -> bytes:
    if not isinstance(v, str):
        raise TypeError(f"{type(v).__name__} is not a string")
    return v.encode("utf-8")


def _length_prefixed(payload: bytes) -> bytes:
    """A variable-length field: one length octet, or 255 and two (RFC 7011 section 7)."""
    n = len(payload)
    if n < 255:
        return bytes((n,)) + payload
    if n > 65535:
        raise ValueError(f"{n} octets do not fit a variable-length field (at most 65535)")
    return b"\xff" + n.to_bytes(2, "big") + payload


def _varlen_utf8(v: Any) -> bytes:
    return _length_prefixed(_to_utf8(v))


_INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_SINT_CODES = {1: "b", 2: "h", 4: "i", 8: "q"}
_UNSIGNED = {DataType.unsigned8, DataType.unsigned16, DataType.unsigned32, DataType.unsigned64}
_SIGNED = {DataType.signed8, DataType.signed16, DataType.signed32, DataType.signed64}

_HELPERS: dict[str, Any] = {
    "_IP4": _IP4,
    "_IP6": _IP6,
    "_STR": _STR,
    "_LSTR": _LSTR,
    "_aton4": _aton4,
    "_aton6": _aton6,
    "_mac_to_text": _mac_to_text,
    "_mac_to_bytes": _mac_to_bytes,
    "_from_ntp": _from_ntp,
    "_to_ntp": _to_ntp,
    "_to_ms": _to_ms,
    "_lenient_utf8": _lenient_utf8,
    "_bool_out": _bool_out,
    "_bool_in": _bool_in,
    "_to_bytes": _to_bytes,
    "_to_utf8": _to_utf8,
    "_int_from": int.from_bytes,
    "_MalformedMessage": MalformedMessage,
    "_struct_error": struct.error,
    "_ENC_IP4": _Intern(_aton4),
    "_ENC_IP6": _Intern(_aton6),
    "_ENC_VSTR": _Intern(_varlen_utf8),  # str -> length prefix + UTF-8
    "_length_prefixed": _length_prefixed,
}


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one field is read and written: struct code plus expressions around it."""

    code: str | None  # struct format for a fixed-length field, None for variable length
    decode: str  # expression of "{v}" giving the Python value
    encode: str  # expression of "{v}": what goes into struct.pack, or the length-prefixed bytes
    text: bool = False  # variable-length payload is UTF-8 text


def _plan(ie: InformationElement, length: int) -> _Plan:
    dt = ie.data_type
    variable = length == VARIABLE_LENGTH
    if not variable and length not in dt.allowed_lengths and dt.allowed_lengths:
        dt = DataType.octetArray  # declared length does not fit the type: keep raw bytes
    if variable and dt not in (DataType.string, DataType.octetArray) and dt.value < 20:
        dt = DataType.octetArray  # fixed-size type sent variable-length: keep raw bytes
    raw = f"{length}s"
    if dt in _UNSIGNED or dt in _SIGNED:
        codes = _INT_CODES if dt in _UNSIGNED else _SINT_CODES
        if length in codes:
            return _Plan(codes[length], "{v}", "{v}")
        signed = dt in _SIGNED
        return _Plan(raw, f"_int_from({{v}}, 'big', signed={signed})", f"({{v}}).to_bytes({length}, 'big', signed={signed})")
    if dt is DataType.float32 or (dt is DataType.float64 and length == 4):
        return _Plan("f", "{v}", "{v}")
    if dt is DataType.float64:
        return _Plan("d", "{v}", "{v}")
    if dt is DataType.boolean:
        return _Plan("B", "_bool_out({v})", "_bool_in({v})")
    if dt is DataType.macAddress:
        return _Plan("6s", "_mac_to_text({v})", "_mac_to_bytes({v})")
    if dt is DataType.dateTimeSeconds:
        return _Plan("I", "{v}", "int({v})")
    if dt is DataType.dateTimeMilliseconds:
        return _Plan("Q", "{v} / 1000", "_to_ms({v})")
    if dt in (DataType.dateTimeMicroseconds, DataType.dateTimeNanoseconds):
        return _Plan("Q", "_from_ntp({v})", "_to_ntp({v})")
    if dt is DataType.ipv4Address:
        return _Plan("4s", "_IP4[{v}]", "_ENC_IP4[{v}]")
    if dt is DataType.ipv6Address:
        return _Plan("16s", "_IP6[{v}]", "_ENC_IP6[{v}]")
    if dt is DataType.string:
        if variable:
            return _Plan(None, "_STR[{v}]", "_ENC_VSTR[{v}]", text=True)
        return _Plan(raw, "_STR[{v}.rstrip(b'\\0')]", "_to_utf8({v}).ljust(" + str(length) + ", b'\\0')")
    # octetArray, structured lists (RFC 6313, kept raw) and anything unknown
    if variable:
        return _Plan(None, "{v}", "_length_prefixed(_to_bytes({v}))")
    return _Plan(raw, "{v}", "_to_bytes({v})")


class _Codec:
    """Compiled reader and writer for one template layout."""

    __slots__ = ("decode_set", "encode_record", "min_length", "fixed_length")

    def __init__(
        self,
        decode_set: Callable[[bytes, int, int], list[Record]],
        encode_record: Callable[[Record], bytes],
        min_length: int,
        fixed_length: int | None,
    ) -> None:
        self.decode_set = decode_set
        self.encode_record = encode_record
        self.min_length = min_length
        self.fixed_length = fixed_length


Layout = tuple[tuple[str, InformationElement, int], ...]

# Decoder variants, tried in this order by Template.decode_records:
FAST = "fast"  # strings read as slices of a latin-1 view of the message, checked ASCII
EXACT = "exact"  # strings sliced and decoded as strict UTF-8, one field at a time
LENIENT = "lenient"  # as EXACT, invalid UTF-8 replaced rather than refused


class _CodecCache:
    """Compiled codecs by (layout, mode), least recently used first, bounded by the total
    number of fields they hold (a codec's size grows with its fields, not with the
    count of templates): a thousand exporters sending the same template share one
    codec, and a peer sending ever new large templates evicts only its own."""

    __slots__ = ("max_fields", "fields", "entries", "hits", "misses", "evictions", "build")

    def __init__(self, max_fields: int, build: Callable[[Layout, str], Any]) -> None:
        self.max_fields = max_fields
        self.build = build
        self.fields = 0
        self.entries: collections.OrderedDict[tuple[Layout, str], Any] = collections.OrderedDict()
        self.hits = self.misses = self.evictions = 0

    def get(self, layout: Layout, mode: str) -> Any:
        key = (layout, mode)
        if key in self.entries:
            self.entries.move_to_end(key)
            self.hits += 1
            return self.entries[key]
        self.misses += 1
        codec = self.build(layout, mode)
        weight = len(layout)
        if weight <= self.max_fields:
            while self.entries and self.fields + weight > self.max_fields:
                old, _ = self.entries.popitem(last=False)
                self.fields -= len(old[0])
                self.evictions += 1
            self.entries[key] = codec
            self.fields += weight
        return codec

    def clear(self) -> None:
        self.entries.clear()
        self.fields = 0


# About 32k fields of compiled codecs (a few tens of MB at most); Antrea's templates have
# 30 to 80 fields, so this holds hundreds of distinct layouts.
CODEC_CACHE = _CodecCache(max_fields=32768, build=lambda layout, mode: _build(layout, mode))
# The C accelerator's codecs (None where it declines a layout), bounded the same way.
NATIVE_CACHE = _CodecCache(max_fields=32768, build=lambda layout, mode: native_codec(layout, _HELPERS))


def _compile(layout: Layout, mode: str = FAST) -> _Codec:
    """The codec of ``layout``, from the cache or compiled now."""
    codec: _Codec = CODEC_CACHE.get(layout, mode)
    return codec


def _build(layout: Layout, mode: str = FAST) -> _Codec:
    """Generate, compile and return the codec of one layout of (key, element, length).

    Kubernetes names are ASCII (DNS labels), so the FAST decoder takes a latin-1 view of
    the message once per set and slices each string field out of it, checking once per
    record that the record's string region is ASCII. A non-ASCII byte, including a length
    octet of 255 (the three-octet escape), fails that check and the set is decoded again
    with the EXACT decoder; invalid UTF-8 falls back to LENIENT. Encoders do not vary.
    """
    ns: dict[str, Any] = dict(_HELPERS)
    plans = [_plan(ie, length) for _, ie, length in layout]
    if mode == LENIENT:
        plans = [
            # every strict UTF-8 decode becomes lenient, fixed-length strings included
            _Plan(p.code, "_lenient_utf8({v})" if p.decode == "_STR[{v}]" else p.decode.replace("_STR[", "_LSTR["),
                  p.encode, p.text)
            for p in plans
        ]
    keys = [key for key, _, _ in layout]

    # Runs of consecutive fixed-length fields share one Struct.
    steps: list[tuple[str, Any]] = []  # ("run", [indices]) or ("var", index)
    for i, plan in enumerate(plans):
        if plan.code is not None:
            if steps and steps[-1][0] == "run":
                steps[-1][1].append(i)
            else:
                steps.append(("run", [i]))
        else:
            steps.append(("var", i))
    bound = list(_HELPERS)  # bound as default arguments: locals are faster than globals
    structs: list[struct.Struct] = []
    for step in steps:
        if step[0] == "run":
            st = struct.Struct("!" + "".join(plans[i].code or "" for i in step[1]))
            ns[f"_S{len(structs)}"] = st
            bound.append(f"_S{len(structs)}")
            structs.append(st)
    fixed_total = sum(st.size for st in structs)
    n_var = sum(1 for step in steps if step[0] == "var")
    min_length = fixed_total + n_var
    fixed_length = fixed_total if n_var == 0 else None
    fast_text = mode == FAST and any(plans[i].text for kind, i in steps if kind == "var")

    def value(i: int) -> str:
        if fast_text and plans[i].text:
            return f"text[a{i}:e{i}]"
        return plans[i].decode.format(v=f"v{i}")

    ns["_proto"] = dict.fromkeys(keys)
    bound.append("_proto")
    defaults = ", ".join(f"{name}={name}" for name in bound)
    lines = [f"def decode_set(buf, off, end, {defaults}):"]
    if fixed_length is not None:
        # Fixed-length fields only: one iter_unpack over the whole set body.
        size = fixed_length
        unpacked = ", ".join(f"v{i}" for i in range(len(plans))) + ("," if len(plans) == 1 else "")
        lines += [
            f"    stop = off + (end - off) // {size} * {size}",
            "    out = []",
            "    append = out.append",
            f"    for ({unpacked}) in _S0.iter_unpack(buf[off:stop]):",
            "        d = _proto.copy()",
            *[f"        d[{keys[i]!r}] = {value(i)}" for i in range(len(keys))],
            "        append(d)",
            "    return out",
        ]
    else:
        if fast_text:
            lines.append("    text = buf[:end].decode('latin-1')")
        lines += ["    out = []", "    append = out.append", f"    while end - off >= {min_length}:"]
        run_no = 0
        text_fields = [i for kind, i in steps if kind == "var" and fast_text and plans[i].text]
        for kind, item in steps:
            if kind == "run":
                targets = ", ".join(f"v{i}" for i in item) + ("," if len(item) == 1 else "")
                lines.append(f"        ({targets}) = _S{run_no}.unpack_from(buf, off)")
                lines.append(f"        off += {structs[run_no].size}")
                run_no += 1
            elif item in text_fields:
                lines.append(f"        a{item} = off + 1")
                lines.append(f"        e{item} = off = a{item} + buf[off]")
            else:
                lines += [
                    "        n = buf[off]",
                    "        if n == 255:",
                    "            n = (buf[off + 1] << 8) | buf[off + 2]",
                    "            off += 3",
                    "        else:",
                    "            off += 1",
                    f"        v{item} = buf[off:off + n]",
                    "        off += n",
                ]
        lines += [
            "        if off > end:",
            "            raise _MalformedMessage(f'a data record runs {off - end} octets past the end of its set')",
        ]
        if text_fields:
            lines += [
                f"        if not text[a{text_fields[0]} - 1:e{text_fields[-1]}].isascii():",
                "            raise UnicodeDecodeError('ascii', b'', 0, 1, 'not ASCII: decode exactly')",
            ]
        # Copying a dict that already has the keys and replacing its values is cheaper
        # than building a new one with a display (no insertions, no resizing).
        lines.append("        d = _proto.copy()")
        lines += [f"        d[{keys[i]!r}] = {value(i)}" for i in range(len(keys))]
        lines += ["        append(d)", "    return out"]

    # Encoder: one expression per field, joined.
    enc: list[str] = [f"def encode_record(r, {defaults}):"]
    parts: list[str] = []
    run_no = 0
    for kind, item in steps:
        if kind == "run":
            args = ", ".join(plans[i].encode.format(v=f"r[{keys[i]!r}]") for i in item)
            parts.append(f"_S{run_no}.pack({args})")
            run_no += 1
        else:
            parts.append(plans[item].encode.format(v=f"r[{keys[item]!r}]"))  # length prefix included
    if len(parts) == 1:
        enc.append(f"    return {parts[0]}")
    else:
        enc.append("    return b''.join((" + ", ".join(parts) + ",))")

    source = "\n".join(lines + [""] + enc) + "\n"
    exec(compile(source, f"<ipfix template codec {len(layout)} fields, {mode}>", "exec"), ns)
    return _Codec(ns["decode_set"], ns["encode_record"], min_length, fixed_length)


def layout_of(fields: Sequence[FieldSpecifier]) -> Layout:
    """The (key, element, length) of each field: what a compiled codec is cached by.
    Keys are the element names, with "#2", "#3" appended to repeated elements, interned:
    the very key objects of the accelerator's codec (which interns them), so that a record
    built with a template's keys is read by the accelerator entry by entry, not by lookups."""
    seen: dict[str, int] = {}
    out = []
    for f in fields:
        name = f.ie.name
        count = seen.get(name, 0) + 1
        seen[name] = count
        out.append((sys.intern(name if count == 1 else f"{name}#{count}"), f.ie, f.length))
    return tuple(out)


def is_compiled(fields: Sequence[FieldSpecifier]) -> bool:
    """Whether a template of these fields would reuse a cached codec (no compile work)."""
    return (layout_of(fields), FAST) in CODEC_CACHE.entries


class CompileBudget:
    """A token bucket of template fields compiled per second, shared by the sessions of a
    collecting process, so that peers sending ever new templates cannot keep the event
    loop compiling (about 0.1 ms per field). Cached layouts cost nothing. Sans-IO: the
    caller passes the time. A template is allowed while the bucket is not empty, and then
    charged in full, so one call never waits more than one template's compile past the
    burst."""

    __slots__ = ("rate", "burst", "tokens", "last", "charged", "refused")

    def __init__(self, rate: float = 2048.0, burst: float = 2048.0) -> None:
        if rate <= 0 or burst <= 0:
            raise UsageError("a compile budget needs a positive rate and burst (fields per second)")
        self.rate, self.burst = float(rate), float(burst)
        self.tokens = self.burst
        self.last: float | None = None
        self.charged = 0  # fields compiled under this budget
        self.refused = 0  # templates deferred or refused because it was empty

    def _refill(self, now: float) -> None:
        if self.last is not None and now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        if self.last is None or now > self.last:
            self.last = now

    def take(self, fields: int, now: float) -> bool:
        self._refill(now)
        if self.tokens <= 0:
            self.refused += 1
            return False
        self.tokens -= fields
        self.charged += fields
        return True

    def wait(self, now: float) -> float:
        """Seconds until the bucket is no longer empty (0: it is not)."""
        self._refill(now)
        return 0.0 if self.tokens > 0 else (1.0 - self.tokens) / self.rate


def _native(layout: Layout) -> NativeCodec | None:
    """The C accelerator's codec of a layout (accel.py), or None: the generated one serves.
    Cached like the generated codecs, bounded by the fields the cached codecs hold."""
    codec: NativeCodec | None = NATIVE_CACHE.get(layout, FAST)
    return codec


class Template:
    """An IPFIX template or options template (RFC 7011 sections 3.4.1 and 3.4.2).

    ``keys`` are the record dict keys, one per field: the element names, with "#2", "#3"
    appended to repeated elements (a template may carry one element more than once).
    """

    __slots__ = ("template_id", "fields", "scope_field_count", "keys", "_layout", "_codec", "_native", "_hash")

    def __init__(
        self, template_id: int, fields: Sequence[FieldSpecifier], scope_field_count: int = 0
    ) -> None:
        if not 256 <= template_id <= 65535:
            raise UsageError(f"template id {template_id} is outside 256..65535 (RFC 7011 3.4.1)")
        if not fields:
            raise UsageError(f"template {template_id} has no fields")
        if not 0 <= scope_field_count <= len(fields):
            raise UsageError(f"template {template_id}: scope field count {scope_field_count} exceeds its fields")
        self.template_id = template_id
        self.fields: tuple[FieldSpecifier, ...] = tuple(fields)
        self.scope_field_count = scope_field_count
        self._layout: Layout = layout_of(self.fields)
        self.keys: tuple[str, ...] = tuple(key for key, _, _ in self._layout)
        self._codec = _compile(self._layout)
        if self._codec.min_length == 0:
            raise UsageError(f"template {template_id}: records of zero length cannot be delimited")
        self._native = _native(self._layout)
        self._hash = hash((template_id, self.fields, scope_field_count))

    @classmethod
    def build(
        cls,
        template_id: int,
        names: Iterable[str | tuple[str, int]],
        registry: Registry | None = None,
        *,
        scope_field_count: int = 0,
    ) -> Template:
        """A template from element names; a ``(name, length)`` pair asks for reduced-size
        encoding (or a fixed length for a string or octetArray)."""
        reg = registry or default_registry()
        fields = []
        for item in names:
            name, length = (item, None) if isinstance(item, str) else item
            ie = reg.get(name)
            if length is None:
                length = ie.default_length
            elif length != VARIABLE_LENGTH and ie.data_type.allowed_lengths and length not in ie.data_type.allowed_lengths:
                allowed = ", ".join(str(n) for n in sorted(ie.data_type.allowed_lengths))
                raise UsageError(f"{ie}: length {length} is not allowed for its type (allowed: {allowed})")
            fields.append(FieldSpecifier(ie, length))
        return cls(template_id, fields, scope_field_count)

    @property
    def names(self) -> tuple[str, ...]:
        return self.keys

    @property
    def is_options(self) -> bool:
        return self.scope_field_count > 0

    @property
    def min_record_length(self) -> int:
        return self._codec.min_length

    @property
    def fixed_record_length(self) -> int | None:
        """The length of every record, or None when the template has variable-length fields."""
        return self._codec.fixed_length

    def decode_records(self, buf: bytes, off: int, end: int) -> list[Record]:
        """Records of a data set body ``buf[off:end]``; trailing padding is skipped."""
        if self._native is not None:
            records = self._native.decode_set(buf, off, end)
            if records is not None:
                return records
        return self._decode_records_py(buf, off, end)

    def _decode_records_py(self, buf: bytes, off: int, end: int) -> list[Record]:
        """decode_records by the generated pure-Python codec: the reference, and what
        decides whenever the accelerator declines (malformed or non-UTF-8 input)."""
        try:
            return self._codec.decode_set(buf, off, end)
        except Exception:  # noqa: BLE001 - non-ASCII text, the 255 escape, or a real error
            pass
        try:
            try:
                return _compile(self._layout, EXACT).decode_set(buf, off, end)
            except UnicodeDecodeError:  # not UTF-8 as RFC 7011 6.1.6 wants: kept, replaced
                return _compile(self._layout, LENIENT).decode_set(buf, off, end)
        except (struct.error, IndexError) as exc:
            raise MalformedMessage(f"data set for template {self.template_id} is truncated ({exc})") from None

    def encode_record(self, record: Record) -> bytes:
        """One data record; a missing key or a value of the wrong type names the field."""
        try:
            return self._codec.encode_record(record)
        except Exception as exc:  # noqa: BLE001 - converted to a precise error below
            raise self._explain(record, exc) from None

    def _explain(self, record: Record, exc: Exception) -> UsageError:
        if not isinstance(record, dict):
            return UsageError(f"template {self.template_id}: a record must be a dict, not {type(record).__name__}")
        for key, f in zip(self.keys, self.fields):
            if key not in record:
                return UsageError(f"template {self.template_id}: the record has no value for {f.ie} (key {key!r})")
            single = _compile(((key, f.ie, f.length),))
            try:
                single.encode_record({key: record[key]})
            except Exception as field_exc:  # noqa: BLE001
                length = "variable" if f.variable else str(f.length)
                return InvalidValue(
                    f"template {self.template_id}: {record[key]!r} is not a valid {f.ie.data_type.name} "
                    f"for {f.ie} (length {length}): {field_exc}"
                )
        return UsageError(f"template {self.template_id}: cannot encode record: {exc}")

    def wire_length(self) -> int:
        """Octets of this template record inside a template set."""
        n = 6 if self.is_options else 4
        return n + sum(8 if f.ie.pen else 4 for f in self.fields)

    def to_bytes(self) -> bytes:
        """The template record (RFC 7011 3.4.1) or options template record (3.4.2)."""
        out = bytearray()
        if self.is_options:
            out += struct.pack("!HHH", self.template_id, len(self.fields), self.scope_field_count)
        else:
            out += struct.pack("!HH", self.template_id, len(self.fields))
        for f in self.fields:
            if f.ie.pen:
                out += struct.pack("!HHI", f.ie.element_id | 0x8000, f.length, f.ie.pen)
            else:
                out += struct.pack("!HH", f.ie.element_id, f.length)
        return bytes(out)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Template):
            return NotImplemented
        return (
            self.template_id == other.template_id
            and self.fields == other.fields
            and self.scope_field_count == other.scope_field_count
        )

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        kind = "OptionsTemplate" if self.is_options else "Template"
        return f"<{kind} {self.template_id}: {len(self.fields)} fields>"
