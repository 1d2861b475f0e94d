"""Whatever bytes arrive, the decoder only raises its own error type.

Hypothesis feeds the Decoder and the MessageFramer random bytes, and valid messages with
random corruption (flipped octets, truncation, splices), for UDP and stream sessions. A
peer must never be able to raise anything but MalformedMessage out of the codec: any
other exception would escape a collecting process's error handling.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowscope.ipfix import Decoder, ExportSession, MalformedMessage, MessageFramer, Template

FIELDS = [
    "sourceIPv4Address", "sourcePodName", "octetDeltaCount", "destinationIPv6Address",
    ("packetDeltaCount", 3), "flowStartMilliseconds", "tcpState", "sourceMacAddress", "flowType",
]  # fmt: skip


def _valid_stream() -> list[bytes]:
    exporter = ExportSession(9)
    exporter.add_template(Template.build(256, FIELDS))
    exporter.add_template(Template.build(300, ["sourceTransportPort", "destinationTransportPort"]))
    rec = {
        "sourceIPv4Address": "10.1.2.3", "sourcePodName": "p" * 260, "octetDeltaCount": 99,
        "destinationIPv6Address": "fd00::2", "packetDeltaCount": 7, "flowStartMilliseconds": 1.7e9,
        "tcpState": "ESTABLISHED", "sourceMacAddress": "02:00:00:00:00:01", "flowType": 1,
    }  # fmt: skip
    return (
        exporter.encode_templates(1)
        + exporter.encode_records(256, [rec, dict(rec, sourcePodName="x")], 2)
        + exporter.encode_records(300, [{"sourceTransportPort": 1, "destinationTransportPort": 2}] * 3, 3)
        + exporter.encode_withdrawal([300], 4)
    )


VALID = _valid_stream()


def _decode_all(messages: list[bytes], transport: str) -> None:
    decoder = Decoder(transport=transport, template_lifetime=60.0)  # type: ignore[arg-type]
    for data in messages:
        try:
            decoder.decode(data, now=1.0)
        except MalformedMessage:
            pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.sampled_from(["udp", "tcp"]))
def test_random_bytes_only_raise_malformed_message(data: bytes, transport: str) -> None:
    _decode_all([VALID[0], data], transport)
    _decode_all([struct.pack("!HH", 10, len(data) + 4) + data], transport)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(min_value=0, max_value=len(VALID) - 1),
    st.lists(st.tuples(st.integers(min_value=0, max_value=2000), st.integers(min_value=0, max_value=255)), max_size=6),
    st.integers(min_value=0, max_value=2000),
    st.sampled_from(["udp", "tcp"]),
)
def test_corrupted_messages_only_raise_malformed_message(
    which: int, flips: list[tuple[int, int]], cut: int, transport: str
) -> None:
    data = bytearray(VALID[which])
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    messages = [*VALID[:which], bytes(data[: max(cut, 16)]) if cut < len(data) else bytes(data)]
    _decode_all(messages, transport)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_framer_only_raises_malformed_message(chunks: list[bytes]) -> None:
    framer = MessageFramer()
    decoder = Decoder(transport="tcp")
    try:
        for chunk in [VALID[0][:7], VALID[0][7:], *chunks]:
            for data in framer.feed(chunk):
                decoder.decode(data)
    except MalformedMessage:
        pass
