"""The two kinds of failure in the IPFIX library, kept apart on purpose.

A *peer's* fault (bytes that break RFC 7011: a bad version, lengths that do not add up,
a truncated record, a data set nobody described) is a :class:`MalformedMessage`. A
collecting process counts it, logs it with the peer's address, closes that peer's stream
session if it has one, and goes on serving everyone else.

A *caller's* fault (an unknown information element name, a value that does not fit its
type, a record missing a field of its template) is a :class:`UsageError`, raised at once
with the element, the template and the value named, because it is a bug to fix in the
calling code, not a condition to survive.
"""

from __future__ import annotations

__all__ = ["IPFIXError", "MalformedMessage", "UsageError", "UnknownElement", "InvalidValue", "RecordTooLarge", "Deferred"]


class IPFIXError(Exception):
    """Base of every error this library raises."""


class MalformedMessage(IPFIXError):
    """A peer sent bytes that are not a valid IPFIX message (RFC 7011)."""


class UsageError(IPFIXError):
    """The calling code asked for something impossible."""


class UnknownElement(UsageError, KeyError):
    """An information element name or (PEN, id) that the registry does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown information element"


class InvalidValue(UsageError, ValueError):
    """A record value that cannot be encoded as its information element's type."""


class RecordTooLarge(UsageError):
    """A data record longer than fits in one message of the session's maximum size (over
    UDP, the path MTU); an exporter may send it alone in a larger message instead."""


class Deferred(IPFIXError):
    """Not now: decoding this message needs more template compiling than the budget
    allows at the moment. Nothing of the message was delivered; decode it again after
    ``retry_after`` seconds (a stream session stops reading meanwhile)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
