"""IPFIX data records as JSON objects, both ways: what ``flowscope collector`` prints and
what ``flowscope export`` reads.

One JSON object per record, keyed by information element names exactly as the registry
spells them, so that a collector's output can be replayed by the exporter unchanged.
Values keep their meaning rather than their wire form: addresses and MAC addresses are
text, dateTimeSeconds an integer of epoch seconds, the finer dateTime types a number of
epoch seconds, strings text, booleans true/false, and octet arrays (including elements
the registry does not know, keyed ``unknown:<PEN>:<id>``) lowercase hex. Keys starting
with an underscore carry what is not part of the record: the exporter's address
(``_exporter``), the observation domain (``_observationDomainId``) and the template
(``_templateId``). No information element name starts with an underscore, so they can
never clash; the exporter ignores them.

Converting back checks each value against its element's type, and an error names the
input line, the field, the value and what would have been accepted.
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from flowscope.ipfix import DataType, InformationElement, Registry, UnknownElement, VARIABLE_LENGTH

__all__ = [
    "RecordError",
    "META_KEYS",
    "record_to_json",
    "dumps_record",
    "record_from_json",
    "parse_line",
    "unknown_key",
    "template_order",
]

META_KEYS = ("_exporter", "_observationDomainId", "_templateId")

_UNSIGNED_BITS = {DataType.unsigned8: 8, DataType.unsigned16: 16, DataType.unsigned32: 32, DataType.unsigned64: 64}
_SIGNED_BITS = {DataType.signed8: 8, DataType.signed16: 16, DataType.signed32: 32, DataType.signed64: 64}
_FINE_TIMES = (DataType.dateTimeMilliseconds, DataType.dateTimeMicroseconds, DataType.dateTimeNanoseconds)


class RecordError(ValueError):
    """A JSON record that cannot become an IPFIX record; the message names line and field."""


# --------------------------------------------------------------------------- to JSON


def _json_value(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity; a float element that holds one prints null
    return value


def record_to_json(
    record: Mapping[str, Any], *, exporter: str | None = None, domain: int | None = None, template_id: int | None = None
) -> dict[str, Any]:
    """A decoded record as a JSON-ready dict (bytes as hex), with the underscore keys."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, (bytes, bytearray, memoryview)) or isinstance(value, float):
            value = _json_value(value)
        out[key] = value
    if exporter is not None:
        out["_exporter"] = exporter
    if domain is not None:
        out["_observationDomainId"] = domain
    if template_id is not None:
        out["_templateId"] = template_id
    return out


def dumps_record(record: Mapping[str, Any], **meta: Any) -> str:
    """One line of JSON (no newline) for a decoded record."""
    return json.dumps(record_to_json(record, **meta), ensure_ascii=False, separators=(", ", ": "))


# --------------------------------------------------------------------------- from JSON


def unknown_key(key: str) -> InformationElement | None:
    """The raw-bytes element behind an ``unknown:<PEN>:<id>`` key, or None if it is not one."""
    if not key.startswith("unknown:"):
        return None
    parts = key.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    pen, element_id = int(parts[1]), int(parts[2])
    if pen > 0xFFFFFFFF or element_id > 0x7FFF:
        return None
    return InformationElement(key, pen, element_id, DataType.octetArray)


def _where(line: int | None, key: str) -> str:
    return f"line {line}: field {key!r}" if line is not None else f"field {key!r}"


def _convert(ie: InformationElement, value: Any, where: str) -> Any:
    dt = ie.data_type
    if dt in _UNSIGNED_BITS or dt in _SIGNED_BITS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(f"{where}: {value!r} is not an integer ({dt.name})")
        if dt in _UNSIGNED_BITS:
            lo, hi = 0, (1 << _UNSIGNED_BITS[dt]) - 1
        else:
            bits = _SIGNED_BITS[dt]
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if not lo <= value <= hi:
            raise RecordError(f"{where}: {value} is out of range for {dt.name} ({lo}..{hi})")
        return value
    if dt is DataType.dateTimeSeconds:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
            raise RecordError(f"{where}: {value!r} is not a dateTimeSeconds (integer epoch seconds, 0..4294967295)")
        return value
    if dt in _FINE_TIMES:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise RecordError(f"{where}: {value!r} is not a {dt.name} (a number of epoch seconds)")
        return float(value)
    if dt in (DataType.float32, DataType.float64):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecordError(f"{where}: {value!r} is not a number ({dt.name})")
        return float(value)
    if dt is DataType.boolean:
        if not isinstance(value, bool):
            raise RecordError(f"{where}: {value!r} is not true or false (boolean)")
        return value
    if dt is DataType.ipv4Address:
        try:
            return str(ipaddress.IPv4Address(value))
        except (ValueError, TypeError):
            raise RecordError(f'{where}: {value!r} is not an IPv4 address (write it like "10.0.0.1")') from None
    if dt is DataType.ipv6Address:
        try:
            return ipaddress.IPv6Address(value).compressed
        except (ValueError, TypeError):
            raise RecordError(f'{where}: {value!r} is not an IPv6 address (write it like "fd00::1")') from None
    if dt is DataType.macAddress:
        text = value if isinstance(value, str) else ""
        raw = text.replace(":", "").replace("-", "")
        if len(raw) != 12 or any(c not in "0123456789abcdefABCDEF" for c in raw):
            raise RecordError(f'{where}: {value!r} is not a MAC address (write it like "aa:bb:cc:dd:ee:ff")')
        return ":".join(raw[i : i + 2] for i in range(0, 12, 2)).lower()
    if dt is DataType.string:
        if not isinstance(value, str):
            raise RecordError(f"{where}: {value!r} is not a string")
        if len(value.encode("utf-8")) >= VARIABLE_LENGTH:
            raise RecordError(f"{where}: the string is longer than the 65534 octets IPFIX can carry")
        return value
    # octetArray, lists and anything else: hex text
    if not isinstance(value, str):
        raise RecordError(f"{where}: {value!r} is not hex text ({dt.name} values are written as hex)")
    try:
        raw_bytes = bytes.fromhex(value)
    except ValueError:
        raise RecordError(f"{where}: {value!r} is not hex text ({dt.name} values are written as hex)") from None
    if len(raw_bytes) >= VARIABLE_LENGTH:
        raise RecordError(f"{where}: {len(raw_bytes)} octets are more than IPFIX can carry in one field")
    return raw_bytes


def record_from_json(obj: Any, registry: Registry, *, line: int | None = None) -> dict[str, Any]:
    """A JSON object as an IPFIX record dict ready for encoding.

    Keys starting with "_" are dropped. ``unknown:<PEN>:<id>`` keys are added to
    ``registry`` as octetArray elements (pass a copy of the default registry).
    """
    if not isinstance(obj, dict):
        where = f"line {line}" if line is not None else "record"
        raise RecordError(f"{where}: expected a JSON object of element names and values, got {type(obj).__name__}")
    record: dict[str, Any] = {}
    for key, value in obj.items():
        if key.startswith("_"):
            continue
        try:
            ie = registry.get(key)
        except UnknownElement:
            ie_unknown = unknown_key(key)
            if ie_unknown is None:
                raise RecordError(
                    f"{_where(line, key)}: not an information element of the registry "
                    "(names are case-sensitive, e.g. sourceIPv4Address; raw fields are written unknown:<PEN>:<id>)"
                ) from None
            try:
                ie = registry.add(ie_unknown)
            except Exception as exc:  # noqa: BLE001 - the (PEN, id) belongs to a known element
                known = registry.lookup(ie_unknown.pen, ie_unknown.element_id)
                raise RecordError(f"{_where(line, key)}: ({ie_unknown.pen}/{ie_unknown.element_id}) is {known.name}; use that name") from exc
        if value is None:
            raise RecordError(f"{_where(line, key)}: null is not a value; leave the field out instead")
        record[key] = _convert(ie, value, _where(line, key))
    if not record:
        where = f"line {line}" if line is not None else "record"
        raise RecordError(f"{where}: the record has no information elements")
    return record


def parse_line(text: str, registry: Registry, line: int) -> dict[str, Any] | None:
    """One line of JSON Lines input; None for a blank line."""
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise RecordError(f"line {line}: not valid JSON ({exc})") from None
    return record_from_json(obj, registry, line=line)


def template_order(keys: Iterable[str], registry: Registry) -> list[str]:
    """A template's field order for a set of keys: fixed-length fields first, then the
    variable-length ones, each group in the order given (decoders read the fixed part of a
    record in one go)."""
    keys = list(keys)
    fixed = [k for k in keys if registry.get(k).data_type.default_length != VARIABLE_LENGTH]
    variable = [k for k in keys if registry.get(k).data_type.default_length == VARIABLE_LENGTH]
    return fixed + variable
