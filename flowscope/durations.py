"""Go duration strings, as the Antrea configuration writes them.

Every timeout and interval in flowscope's configuration (agent, aggregator, custom
resources) is written the way Antrea's Go code reads it: a sequence of decimal numbers
with units, "5s", "1m30s", "500ms", "1.5h", "250us" or "250µs". This module is the one
parser for them, so that all components accept and reject exactly the same strings.
"""

from __future__ import annotations

import re

__all__ = ["DurationError", "parse_duration", "format_duration"]

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 micro sign
    "μs": 1e-6,  # U+03BC Greek mu, which Go accepts too
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class DurationError(ValueError):
    """A duration string that Go's time.ParseDuration would refuse."""


def parse_duration(text: str | int | float, *, field: str = "duration") -> float:
    """Parse a Go duration string into seconds.

    ``field`` names the configuration key in the error message. A bare ``0`` is
    accepted, as in Go; any other number needs a unit.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise DurationError(f"{field}: {text!r} is not a duration; write it like \"5s\", \"1m30s\" or \"500ms\"")
    if isinstance(text, (int, float)):
        if text == 0:
            return 0.0
        raise DurationError(
            f"{field}: {text!r} has no unit; write it like \"{text}s\" "
            '(units: "ns", "us" or "µs", "ms", "s", "m", "h")'
        )
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise DurationError(
                f"{field}: {text!r} is not a valid duration; write it like \"5s\", \"1m30s\" or \"500ms\" "
                '(units: "ns", "us" or "µs", "ms", "s", "m", "h")'
            )
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise DurationError(f"{field}: an empty string is not a duration; write it like \"5s\"")
    return sign * total


def format_duration(seconds: float) -> str:
    """Render seconds the way Go's Duration.String does for whole units ("1m30s", "500ms")."""
    if seconds == 0:
        return "0s"
    neg = seconds < 0
    seconds = abs(seconds)
    if seconds < 1:
        for unit, scale in (("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
            if seconds >= scale:
                out = f"{seconds / scale:.9g}{unit}"
                break
        else:
            out = f"{seconds / 1e-9:.9g}ns"
    else:
        h, rem = divmod(seconds, 3600)
        m, s = divmod(rem, 60)
        out = ""
        if h:
            out += f"{int(h)}h"
        if h or m:
            out += f"{int(m)}m"
        out += f"{s:.9g}s"
    return ("-" if neg else "") + out
