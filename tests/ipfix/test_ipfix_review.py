"""Acceptance-review checks of the IPFIX library's address syntax (issue 2)."""

from __future__ import annotations

import pytest
from flowscope.ipfix.address import Address, AddressError, parse_address


@pytest.mark.parametrize("text", ["fd00::1", "::1", "fe80::1:4739"])
def test_an_ipv6_address_without_brackets_is_told_to_use_brackets(text: str) -> None:
    with pytest.raises(AddressError) as err:
        parse_address(text, default_protocol="tcp", field="externalFlowCollectorAddr")
    msg = str(err.value)
    assert msg.startswith("externalFlowCollectorAddr: ")
    assert repr(text) in msg
    assert f"[{text}]:4739" in msg  # the fix, spelled out
    assert "protocol" not in msg  # not mistaken for a bad PROTO


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[fd00::1]:4739:udp", Address("fd00::1", 4739, "udp")),
        ("[::1]", Address("::1", 4739, "tls")),
        ("10.0.0.1::UDP", Address("10.0.0.1", 4739, "udp")),  # the design's ELK example spells UDP
        ("flow-aggregator.flow-aggregator.svc", Address("flow-aggregator.flow-aggregator.svc", 4739, "tls")),
    ],
)
def test_the_design_forms_still_parse(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
