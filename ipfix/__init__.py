"""flowscope's IPFIX library (RFC 7011, 7012, 5103).

The codec is sans-IO: :class:`ExportSession` turns templates and records into message
bytes, :class:`Decoder` turns message bytes into :class:`Message` objects; neither knows
sockets, clocks or metrics. ``flowscope.ipfix.collecting`` and ``flowscope.ipfix.exporting``
wrap them in asyncio collecting and exporting processes over UDP, TCP and TLS (what they
share, TLS settings and peers, is in ``flowscope.ipfix.transport``). Records are plain dicts keyed
by information element names from the :class:`Registry`.

This package imports nothing else of flowscope's (checked by import-linter).
"""

from .address import Address, AddressError, parse_address
from .codec import DataSet, Decoder, ExportSession, Message, MessageFramer, TemplateSet
from .errors import InvalidValue, IPFIXError, MalformedMessage, RecordTooLarge, UnknownElement, UsageError
from .registry import (
    ANTREA_PEN,
    IANA_PEN,
    REVERSE_PEN,
    VARIABLE_LENGTH,
    DataType,
    InformationElement,
    Registry,
    default_registry,
)
from .template import FieldSpecifier, Record, Template

__all__ = [
    "Address",
    "AddressError",
    "parse_address",
    "DataSet",
    "Decoder",
    "ExportSession",
    "Message",
    "MessageFramer",
    "TemplateSet",
    "InvalidValue",
    "IPFIXError",
    "MalformedMessage",
    "RecordTooLarge",
    "UnknownElement",
    "UsageError",
    "ANTREA_PEN",
    "IANA_PEN",
    "REVERSE_PEN",
    "VARIABLE_LENGTH",
    "DataType",
    "InformationElement",
    "Registry",
    "default_registry",
    "FieldSpecifier",
    "Record",
    "Template",
]
