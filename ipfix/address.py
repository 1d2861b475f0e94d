"""Collector addresses in the Antrea syntax: ``HOST:[PORT][:PROTO]``.

The agent's ``flowCollectorAddr``, the aggregator's ``externalFlowCollectorAddr`` and the
``--to``/``--listen`` options of the CLI all name an IPFIX peer this way. HOST is a DNS
name or an IP address; an IPv6 address is wrapped in brackets ("[fd00::1]:4739:udp").
PORT defaults to 4739, the IANA port for IPFIX; PROTO is one of tls, tcp, udp and its
default depends on who asks (tls for agents, tcp for the aggregator's exporter).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

__all__ = ["Address", "AddressError", "parse_address", "IPFIX_PORT", "PROTOCOLS"]

IPFIX_PORT = 4739
Protocol = Literal["tls", "tcp", "udp"]
PROTOCOLS: tuple[Protocol, ...] = ("tls", "tcp", "udp")


class AddressError(ValueError):
    """An address string that does not follow ``HOST:[PORT][:PROTO]``."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int
    protocol: Protocol

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}:{self.protocol}"

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(
    text: str, *, default_protocol: Protocol = "tls", default_port: int = IPFIX_PORT, field: str = "address"
) -> Address:
    """Parse ``HOST:[PORT][:PROTO]``; ``field`` names the option in error messages."""
    hint = 'write it as HOST:PORT[:PROTO], e.g. "flow-aggregator.flow-aggregator.svc:4739:tls" or "[fd00::1]:4739:udp"'
    if not isinstance(text, str) or not text.strip():
        raise AddressError(f"{field}: {text!r} is not an address; {hint}")
    s = text.strip()
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise AddressError(f"{field}: {text!r} opens '[' without closing it; {hint}")
        host, rest = s[1:end], s[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{field}: {host!r} in {text!r} is not an IPv6 address; {hint}") from None
        if rest and not rest.startswith(":"):
            raise AddressError(f"{field}: unexpected {rest!r} after ']' in {text!r}; {hint}")
        parts = rest[1:].split(":") if rest else []
    else:
        if s.count(":") >= 2 and _is_ipv6(s):
            raise AddressError(
                f"{field}: {text!r} reads as an IPv6 address, and an IPv6 address must be in brackets so that "
                f"its ':' are not taken for PORT and PROTO; write it as \"[{s}]:{default_port}\""
            )
        host, *parts = s.split(":")
        if len(parts) > 2:
            raise AddressError(f"{field}: {text!r} has too many ':'; an IPv6 address must be in brackets; {hint}")
        if not host:
            raise AddressError(f"{field}: {text!r} has no host; {hint}")
    if len(parts) > 2:
        raise AddressError(f"{field}: {text!r} has too many ':'; {hint}")
    port_s = parts[0] if parts else ""
    proto_s = parts[1] if len(parts) > 1 else ""
    port = default_port
    if port_s:
        if not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise AddressError(f"{field}: port {port_s!r} in {text!r} must be a number from 1 to 65535")
        port = int(port_s)
    protocol: Protocol = default_protocol
    if proto_s:
        p = proto_s.lower()
        if p not in PROTOCOLS:
            raise AddressError(f"{field}: protocol {proto_s!r} in {text!r} is not one of tls, tcp, udp")
        protocol = p
    return Address(host, port, protocol)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True
