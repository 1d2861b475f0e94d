"""The optional C accelerator of the record codec, and the switch that turns it off.

``_speedups`` (ipfix/_speedups.c) runs the record loops of :mod:`template` in C. It is
built by ``pip install`` where a compiler is at hand and skipped where none is; the
generated pure-Python codec of template.py is then used, which is also the reference the
accelerator is tested against (tests/ipfix/test_ipfix_accel.py). Setting the environment
variable ``FLOWSCOPE_IPFIX_PURE=1`` forces the pure-Python codec (CI runs the codec tests
both ways). Either way the choice is logged once, at the first template compiled.

:func:`native_codec` maps a template layout onto the accelerator's field kinds with the
same type rules as ``template._plan`` (a declared length that does not fit its type, or a
fixed-size type sent with variable length, is kept as raw octets).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Any, Protocol

from .registry import VARIABLE_LENGTH, DataType, InformationElement

__all__ = ["NativeCodec", "native_codec", "available", "data_records_iterator", "optional_extension", "say_once", "PURE_ENV"]

log = logging.getLogger("flowscope.ipfix")

PURE_ENV = "FLOWSCOPE_IPFIX_PURE"


class NativeCodec(Protocol):
    """What the accelerator compiles one template layout into."""

    @property
    def min_length(self) -> int: ...

    @property
    def fixed_length(self) -> int | None: ...

    def decode_set(self, buf: bytes, off: int, end: int, /) -> list[dict[str, Any]] | None: ...

    def encode_messages(
        self,
        records: Any,
        limit: int,
        fallback: Any,
        export_time: int,
        sequence: int,
        domain: int,
        template_id: int,
        /,
    ) -> tuple[list[bytes], int]: ...


def optional_extension(module: str, pure_env: str) -> tuple[Any, str | None]:
    """An optional C extension (``module``, a dotted name) and, when it is not used, why not:
    the environment variable ``pure_env`` forces the pure-Python twin, or the extension was
    not built (no compiler at install time). Every accelerator of flowscope's loads this way."""
    if os.environ.get(pure_env, "") not in ("", "0"):
        return None, f"{pure_env} is set"
    try:
        return importlib.import_module(module), None
    except ImportError as exc:  # built without a compiler: the pure-Python twin serves
        return None, f"the C extension is not built ({exc})"


@functools.cache
def say_once(logger: logging.Logger, what: str, extension: Any, why_not: str | None, native: str, twin: str) -> None:
    """Say once which implementation of ``what`` serves: the pure-Python ``twin`` (at INFO,
    with ``why_not`` from :func:`optional_extension`) or the C ``extension`` (at DEBUG).
    Every accelerator of flowscope says it this way, the first time it is used."""
    if extension is None:
        logger.info("%s: %s, %s", what, twin, why_not)
    else:
        logger.debug("%s: %s (%s)", what, native, os.path.basename(extension.__file__))


_speedups, _why_not = optional_extension(f"{__package__}._speedups", PURE_ENV)


def available() -> bool:
    """Whether records are encoded and decoded by the C accelerator."""
    return _speedups is not None


#: ``DataRecords(sets)``: the C iterator of ``Message.data_records`` over a list of
#: (template, records list) pairs, or None (the twin's chain of zips serves).
data_records_iterator: Any = getattr(_speedups, "DataRecords", None)


_UNSIGNED = {DataType.unsigned8, DataType.unsigned16, DataType.unsigned32, DataType.unsigned64}
_SIGNED = {DataType.signed8, DataType.signed16, DataType.signed32, DataType.signed64}


def _kind(ie: InformationElement, length: int, helpers: dict[str, Any]) -> tuple[str, Any]:
    """The accelerator's kind of one field and its encode helper; the rules of template._plan."""
    dt = ie.data_type
    variable = length == VARIABLE_LENGTH
    if not variable and length not in dt.allowed_lengths and dt.allowed_lengths:
        dt = DataType.octetArray
    if variable and dt not in (DataType.string, DataType.octetArray) and dt.value < 20:
        dt = DataType.octetArray
    if dt in _UNSIGNED:
        return "UINT", None
    if dt in _SIGNED:
        return "SINT", None
    if dt is DataType.float32 or (dt is DataType.float64 and length == 4):
        return "F32", None
    if dt is DataType.float64:
        return "F64", None
    if dt is DataType.boolean:
        return "BOOL", None
    if dt is DataType.macAddress:
        return "MAC", helpers["_mac_to_bytes"]
    if dt is DataType.dateTimeSeconds:
        return "SECONDS", None
    if dt is DataType.dateTimeMilliseconds:
        return "MILLIS", helpers["_to_ms"]
    if dt in (DataType.dateTimeMicroseconds, DataType.dateTimeNanoseconds):
        return "NTP", helpers["_to_ntp"]
    if dt is DataType.ipv4Address:
        return "IP4", helpers["_ENC_IP4"]
    if dt is DataType.ipv6Address:
        return "IP6", helpers["_ENC_IP6"]
    if dt is DataType.string:
        return ("STR_VAR" if variable else "STR_FIX"), None
    return ("OCT_VAR" if variable else "OCT_FIX"), None


def _split_prototype(keys: list[str]) -> dict[str, Any] | None:
    """A dict of ``keys`` (values None) whose copies share one keys table: an instance
    ``__dict__`` of a class made for this layout alone. Copying one allocates only its
    values (about 300 octets for 23 fields against 830 for a dict of its own), which
    makes the records of small templates cheaper to build and to hold. CPython shares
    keys up to 30 of them; for larger templates (or if this is not a split table) the
    accelerator uses ordinary dicts (None here, or its own check declines)."""
    if len(keys) > 30:
        return None
    holder = type("_RecordKeys", (), {"__slots__": ("__dict__",)})()
    for key in keys:
        setattr(holder, key, None)
    proto = holder.__dict__.copy()  # detached from the instance; the class lives in its keys
    return proto if list(proto) == keys else None


def native_codec(
    layout: tuple[tuple[str, InformationElement, int], ...], helpers: dict[str, Any]
) -> NativeCodec | None:
    """The accelerator's codec of one layout of (key, element, length), or None without it.

    ``helpers`` are template.py's conversion helpers and caches, shared so that both
    codecs convert the rare types with the very same code.
    """
    say_once(log, "IPFIX codec", _speedups, _why_not, "C accelerator", "pure Python")
    if _speedups is None:
        return None
    fields = []
    for key, ie, length in layout:
        kind, helper = _kind(ie, length, helpers)
        fields.append((key, getattr(_speedups, kind), length, helper))
    try:
        codec: NativeCodec = _speedups.Codec(fields, split=_split_prototype([key for key, _, _ in layout]))
    except ValueError:  # a layout it does not take (a zero-length field): the twin's alone
        return None
    return codec
