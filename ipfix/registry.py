"""Information elements: the names, numbers and types every IPFIX record is made of.

The registry is data, not code. ``data/iana.csv`` holds the IANA-assigned elements that
flowscope knows by name. Their RFC 5103 reverse twins (PEN 29305, same element id, name
prefixed with "reverse") follow RFC 5103 section 6.1: every element is reversible except
the few that describe the processes, the domain or the record as a whole, listed in
``data/rfc5103.csv`` (go-ipfix, the library of Antrea's agent and aggregator, reads the
section the same way). ``data/antrea.csv`` holds all of Antrea's enterprise elements
(PEN 56506) with go-ipfix's names, ids and types, including the encoded length where it
is not the type's default (the 16-octet UUIDs). Users add their own elements, under their
own PEN, at run time with :meth:`Registry.add`.

One correction to the design document: it gives originalObservationDomainId the IANA id
151, which is flowEndSeconds. IANA assigns originalObservationDomainId the id 405 (next to
originalExporterIPv4Address, 403), and that is what this registry uses.

Data types and their default (full) encoded lengths are those of RFC 7011 section 6.1;
:data:`VARIABLE_LENGTH` (65535) marks a variable-length field (RFC 7011 section 7).
"""

from __future__ import annotations

import csv
import enum
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources

from .errors import UnknownElement, UsageError

__all__ = [
    "DataType",
    "InformationElement",
    "Registry",
    "default_registry",
    "IANA_PEN",
    "REVERSE_PEN",
    "ANTREA_PEN",
    "VARIABLE_LENGTH",
]

IANA_PEN = 0
REVERSE_PEN = 29305  # RFC 5103 section 6.1
ANTREA_PEN = 56506
VARIABLE_LENGTH = 65535


class DataType(enum.Enum):
    """RFC 7011 section 6.1 abstract data types, with their IANA codes (RFC 7012 / IANA)."""

    octetArray = 0
    unsigned8 = 1
    unsigned16 = 2
    unsigned32 = 3
    unsigned64 = 4
    signed8 = 5
    signed16 = 6
    signed32 = 7
    signed64 = 8
    float32 = 9
    float64 = 10
    boolean = 11
    macAddress = 12
    string = 13
    dateTimeSeconds = 14
    dateTimeMilliseconds = 15
    dateTimeMicroseconds = 16
    dateTimeNanoseconds = 17
    ipv4Address = 18
    ipv6Address = 19
    basicList = 20
    subTemplateList = 21
    subTemplateMultiList = 22

    @property
    def default_length(self) -> int:
        return _DEFAULT_LENGTH.get(self, VARIABLE_LENGTH)

    @property
    def allowed_lengths(self) -> frozenset[int]:
        """Lengths a template may declare for this type (reduced-size encoding, RFC 7011 6.2)."""
        return _ALLOWED_LENGTHS.get(self, frozenset())


_DEFAULT_LENGTH = {
    DataType.unsigned8: 1,
    DataType.unsigned16: 2,
    DataType.unsigned32: 4,
    DataType.unsigned64: 8,
    DataType.signed8: 1,
    DataType.signed16: 2,
    DataType.signed32: 4,
    DataType.signed64: 8,
    DataType.float32: 4,
    DataType.float64: 8,
    DataType.boolean: 1,
    DataType.macAddress: 6,
    DataType.dateTimeSeconds: 4,
    DataType.dateTimeMilliseconds: 8,
    DataType.dateTimeMicroseconds: 8,
    DataType.dateTimeNanoseconds: 8,
    DataType.ipv4Address: 4,
    DataType.ipv6Address: 16,
}
# Integers may be sent in fewer octets than their type's size (RFC 7011 6.2); float64 may
# be sent as float32. Types not listed (octetArray, string, lists) take any length.
_ALLOWED_LENGTHS = {
    DataType.unsigned8: frozenset({1}),
    DataType.unsigned16: frozenset({1, 2}),
    DataType.unsigned32: frozenset({1, 2, 3, 4}),
    DataType.unsigned64: frozenset(range(1, 9)),
    DataType.signed8: frozenset({1}),
    DataType.signed16: frozenset({1, 2}),
    DataType.signed32: frozenset({1, 2, 3, 4}),
    DataType.signed64: frozenset(range(1, 9)),
    DataType.float32: frozenset({4}),
    DataType.float64: frozenset({4, 8}),
    DataType.boolean: frozenset({1}),
    DataType.macAddress: frozenset({6}),
    DataType.dateTimeSeconds: frozenset({4}),
    DataType.dateTimeMilliseconds: frozenset({8}),
    DataType.dateTimeMicroseconds: frozenset({8}),
    DataType.dateTimeNanoseconds: frozenset({8}),
    DataType.ipv4Address: frozenset({4}),
    DataType.ipv6Address: frozenset({16}),
}


@dataclass(frozen=True, slots=True)
class InformationElement:
    """One information element: its name, (PEN, id) and abstract data type."""

    name: str
    pen: int
    element_id: int
    data_type: DataType
    length: int | None = None  # the encoded length when it is not the type's default

    @property
    def key(self) -> tuple[int, int]:
        return (self.pen, self.element_id)

    @property
    def default_length(self) -> int:
        """The length a template gives this element unless told otherwise."""
        return self.length if self.length is not None else self.data_type.default_length

    def __str__(self) -> str:
        return f"{self.name}({self.pen}/{self.element_id})<{self.data_type.name}>"


def unknown_element(pen: int, element_id: int) -> InformationElement:
    """Stand-in for an element the registry does not know: its value stays raw bytes."""
    return InformationElement(f"unknown:{pen}:{element_id}", pen, element_id, DataType.octetArray)


class Registry:
    """Information elements by name and by (PEN, id)."""

    def __init__(self, elements: Iterable[InformationElement] = ()) -> None:
        self._by_name: dict[str, InformationElement] = {}
        self._by_key: dict[tuple[int, int], InformationElement] = {}
        for ie in elements:
            self.add(ie)

    def add(self, ie: InformationElement, *, replace: bool = False) -> InformationElement:
        """Register an element; a clash of name or (PEN, id) is an error unless ``replace``."""
        if not isinstance(ie, InformationElement):
            raise UsageError(f"registry.add takes an InformationElement, not {type(ie).__name__}")
        if not 0 <= ie.element_id < 0x8000:
            raise UsageError(f"{ie.name}: element id {ie.element_id} is outside 0..32767")
        if not 0 <= ie.pen <= 0xFFFFFFFF:
            raise UsageError(f"{ie.name}: enterprise number {ie.pen} is outside 0..4294967295")
        if not replace:
            old = self._by_name.get(ie.name) or self._by_key.get(ie.key)
            if old is not None and old != ie:
                raise UsageError(f"cannot add {ie}: {old} is already registered")
        self._by_name[ie.name] = ie
        self._by_key[ie.key] = ie
        return ie

    def get(self, name: str) -> InformationElement:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownElement(
                f"unknown information element {name!r}; register it first with Registry.add "
                "(enterprise elements need their PEN)"
            ) from None

    def by_id(self, pen: int, element_id: int) -> InformationElement:
        try:
            return self._by_key[(pen, element_id)]
        except KeyError:
            raise UnknownElement(f"no information element ({pen}/{element_id}) in the registry") from None

    def lookup(self, pen: int, element_id: int) -> InformationElement:
        """Like :meth:`by_id`, but an unknown element yields a raw-bytes stand-in."""
        ie = self._by_key.get((pen, element_id))
        return ie if ie is not None else unknown_element(pen, element_id)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[InformationElement]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def copy(self) -> Registry:
        return Registry(self)


def _rows(filename: str) -> Iterator[dict[str, str]]:
    text = resources.files(__package__).joinpath("data", filename).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    yield from csv.DictReader(lines)


def reverse_name(name: str) -> str:
    return "reverse" + name[0].upper() + name[1:]


def non_reversible() -> frozenset[str]:
    """The IANA elements RFC 5103 section 6.1 gives no reverse twin (``data/rfc5103.csv``)."""
    return frozenset(row["name"] for row in _rows("rfc5103.csv"))


def load_builtin() -> Registry:
    """IANA + RFC 5103 reverse + Antrea elements from the CSV files in ``data/``."""
    reg = Registry()
    fixed = non_reversible()
    for row in _rows("iana.csv"):
        ie = InformationElement(row["name"], IANA_PEN, int(row["elementId"]), DataType[row["dataType"]])
        reg.add(ie)
        if ie.name not in fixed:
            reg.add(InformationElement(reverse_name(ie.name), REVERSE_PEN, ie.element_id, ie.data_type))
    for row in _rows("antrea.csv"):
        length = int(row["length"]) if row.get("length") else None
        reg.add(InformationElement(row["name"], ANTREA_PEN, int(row["elementId"]), DataType[row["dataType"]], length))
    return reg


@functools.cache
def default_registry() -> Registry:
    """The shared built-in registry. Copy it (``.copy()``) before adding elements of your own
    if other code must not see them; adding to it directly makes them visible everywhere."""
    return load_builtin()
