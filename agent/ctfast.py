"""The conntrack parser's C accelerator (agent/_ctparse.c), behind EntryParser.parse.

conntrack.py stays the reference: it compiles every layout (``_compile``) and parses in
Python where the extension is not built, or when ``FLOWSCOPE_CONNTRACK_PURE=1`` is set.
Where it is built, :class:`NativeParser` runs the per-message loop in C: each layout
conntrack.py compiles is described to the C parser once (leaf offsets and kinds from
its ``struct`` format, the entry field each leaf fills, read off the generated build
function by feeding it marker objects), and every later message of that shape is
matched and turned into the same ConntrackEntry in C. The C parser also remembers the
last dump's entries by conntrack id and returns an unchanged one again, the very object
(see agent/_ctparse.c), so that the store recognises it by identity; the pure parser
builds every entry, equal field for field.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from flowscope.ipfix.accel import optional_extension, say_once

log = logging.getLogger(__name__)

PURE_ENV = "FLOWSCOPE_CONNTRACK_PURE"

_ctparse, _why_not = optional_extension(f"{__package__}._ctparse", PURE_ENV)


def available() -> bool:
    return _ctparse is not None


class _Marker:
    """Stands for leaf value i when reading which entry field a layout's build fills."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


_CODES = {"B": ("U8", 1), "H": ("U16", 2), "I": ("U32", 4), "Q": ("U64", 8)}


def _leaves(fmt: str) -> list[tuple[int, int, int]]:
    """(offset, kind, size) of each value a big-endian struct format unpacks."""
    assert fmt.startswith(">")
    out = []
    pos = 0
    for count, code in re.findall(r"(\d*)([xBHIQs])", fmt[1:]):
        n = int(count) if count else 1
        if code == "x":
            pos += n
        elif code == "s":
            out.append((pos, _ctparse.BYTES, n))
            pos += n
        else:
            kind, size = _CODES[code]
            for _ in range(n):
                out.append((pos, getattr(_ctparse, kind), size))
                pos += size
    return out


def _sources(values: tuple[Any, ...]) -> tuple[list[int], list[Any]]:
    src = [v.index if isinstance(v, _Marker) else -1 for v in values]
    defaults = [None if isinstance(v, _Marker) else v for v in values]
    return src, defaults


class NativeParser:
    """EntryParser.parse in C. ``learn(buf, off, length)`` is conntrack.py's compiler: it
    returns the compiled layout of a message, or None for a malformed one (counted there)."""

    def __init__(self, entry_type: type, key_type: type, learn: Callable[[Any, int, int], Any], max_layouts: int) -> None:
        self._c = _ctparse.Parser(entry_type, key_type, entry_type._fields.index("ct_id"))  # type: ignore[attr-defined]
        self._learn = learn
        self.max_layouts = max_layouts

    def parse(
        self, buf: Any, n: int, out: list[Any], zones: frozenset[int], error: Callable[[int, str], Exception],
        held: dict[Any, Any] | None = None, poll: int = 0,
    ) -> tuple[bool, int, bool, int]:
        """(done, total, interrupted, marked): see EntryParser.parse; ``marked`` entries
        were unchanged and marked seen in ``held`` instead of appended."""
        def unknown(off: int, length: int) -> Any:
            lay = self._learn(buf, off, length)
            if lay is None:
                return None
            self._add(lay, buf, off, length)
            return lay[3](lay[0](buf, off))

        done, total, interrupted, problem, marked = self._c.parse(buf, n, out, zones or None, unknown, held, poll)
        if problem is not None:
            what, value = problem
            if what == "overrun":
                raise error(errno.EBADMSG, f"netlink message of length {value} overruns the datagram")
            raise error(value, f"conntrack dump refused: {os.strerror(value)}")
        return bool(done), total, bool(interrupted), marked

    def begin(self) -> None:
        """A dump starts (the C parser returns the last dump's unchanged entries again)."""
        self._c.begin()

    @property
    def reused(self) -> int:
        """Entries returned again, unchanged since the last dump, instead of built anew."""
        return int(self._c.reused)

    def _add(self, lay: Any, buf: Any, off: int, length: int) -> None:
        unpack, mask_int, expected, build = lay
        leaves = _leaves(unpack.__self__.format)
        probe = build(tuple(_Marker(i) for i in range(len(leaves))))
        key_src, key_def = _sources(tuple(probe[0]))
        entry_src, entry_def = _sources(tuple(probe[1:]))
        if self._c.layout_count >= self.max_layouts:
            self._c.clear()
        self._c.add(
            length, mask_int.to_bytes(length, "little"), expected.to_bytes(length, "little"), leaves,
            entry_src, entry_def, key_src, key_def, 0,
        )  # fmt: skip  (0: the zone is the key's first field)


def native_parser(entry_type: type, key_type: type, learn: Callable[[Any, int, int], Any], max_layouts: int) -> NativeParser | None:
    """The C parser, or None (then conntrack.py parses in Python); says which, once."""
    say_once(log, "conntrack parser", _ctparse, _why_not, "C parser", "pure Python")
    if _ctparse is None:
        return None
    return NativeParser(entry_type, key_type, learn, max_layouts)
