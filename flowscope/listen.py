"""Listening addresses of flowscope's HTTP endpoints: ``HOST:PORT``, or empty to disable.

The agent's ``metricsAddress`` and the aggregator's ``apiAddress`` and ``listenAddress``
are written the same way, so one parser serves them and they accept and refuse the
same strings: an IP address (IPv6 in brackets), ``localhost`` or nothing (all
interfaces), a colon, and a port from 0 to 65535.
"""

from __future__ import annotations

import ipaddress
from typing import Any

__all__ = ["ListenAddressError", "parse_listen_address"]


class ListenAddressError(ValueError):
    """An address string that is not ``HOST:PORT``; the message names the key."""


def parse_listen_address(value: Any, key: str, *, example_port: int) -> tuple[str, int] | None:
    """``(host, port)`` of ``value``; None when it is empty or None (the endpoint is off)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    hint = f'write it as HOST:PORT, e.g. "0.0.0.0:{example_port}" or "[::]:{example_port}", or "" to disable'
    if not isinstance(value, str):
        raise ListenAddressError(f"{key}: {value!r} is not an address; {hint}")
    text = value.strip()
    if text.startswith("["):
        host, sep, port_s = text[1:].partition("]:")
        if not sep:
            raise ListenAddressError(f"{key}: {value!r} is not an address; {hint}")
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep or ":" in host:
            raise ListenAddressError(f"{key}: {value!r} is not an address; {hint}")
    if host and host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ListenAddressError(f"{key}: host {host!r} in {value!r} must be an IP address; {hint}") from None
    if not port_s.isdigit() or not 0 <= int(port_s) < 65536:
        raise ListenAddressError(f"{key}: port {port_s!r} in {value!r} must be a number from 0 to 65535")
    return (host or "0.0.0.0", int(port_s))
