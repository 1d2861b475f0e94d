"""JSON forms of IPFIX records, both ways: what the collector prints is what the exporter
reads, every data type keeps its meaning, and bad input is refused with the line, the
field, the value and what would be accepted."""

from __future__ import annotations

import json

import pytest

from flowscope.collector.records import (
    RecordError,
    dumps_record,
    parse_line,
    record_from_json,
    record_to_json,
    template_order,
)
from flowscope.ipfix import Decoder, ExportSession, Template, default_registry


EVERY_TYPE = {
    "sourceIPv4Address": "10.0.0.1",
    "sourceIPv6Address": "fd00::1",
    "sourceMacAddress": "0a:1b:2c:3d:4e:5f",
    "sourceTransportPort": 443,
    "octetDeltaCount": 2**64 - 1,
    "flowStartSeconds": 1795716000,
    "flowStartMilliseconds": 1795716000.25,
    "flowStartMicroseconds": 1795716000.5,
    "sourcePodName": "pöd-ß",
    "unknown:99999:7": "00ff10",
}


def test_every_type_round_trips_through_json_and_ipfix() -> None:
    reg = default_registry().copy()
    record = record_from_json(json.loads(json.dumps(EVERY_TYPE)), reg, line=1)
    assert record["unknown:99999:7"] == b"\x00\xff\x10"
    t = Template.build(300, template_order(record, reg), reg)
    s = ExportSession(registry=reg)
    s.add_template(t)
    msgs = s.encode_templates(1) + s.encode_records(300, [record], 1)
    d = Decoder(default_registry())  # the collector does not know the unknown element
    decoded = [r for m in msgs for _, r in d.decode(m).data_records()]
    line = dumps_record(decoded[0], exporter="127.0.0.1:5000", domain=3, template_id=300)
    back = json.loads(line)
    assert back.pop("_exporter") == "127.0.0.1:5000"
    assert back.pop("_observationDomainId") == 3 and back.pop("_templateId") == 300
    assert back == EVERY_TYPE


def test_underscore_keys_are_ignored_and_ipv6_is_normalised() -> None:
    reg = default_registry().copy()
    r = parse_line('{"_exporter": "x", "_templateId": 5, "sourceIPv6Address": "FD00:0:0::0001"}', reg, 7)
    assert r == {"sourceIPv6Address": "fd00::1"}
    assert parse_line("   ", reg, 8) is None


def test_fixed_length_fields_come_first_in_a_template() -> None:
    reg = default_registry()
    assert template_order(["sourcePodName", "sourceTransportPort", "tcpState", "flowType"], reg) == [
        "sourceTransportPort", "flowType", "sourcePodName", "tcpState",
    ]


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"sourcePort": 1}', "line 4: field 'sourcePort': not an information element"),
        ('{"sourceTransportPort": 70000}', "line 4: field 'sourceTransportPort': 70000 is out of range for unsigned16 (0..65535)"),
        ('{"sourceTransportPort": -1}', "out of range for unsigned16"),
        ('{"sourceTransportPort": true}', "True is not an integer (unsigned16)"),
        ('{"sourceTransportPort": "80"}', "'80' is not an integer"),
        ('{"sourceIPv4Address": "10.0.0.256"}', "line 4: field 'sourceIPv4Address': '10.0.0.256' is not an IPv4 address"),
        ('{"sourceIPv6Address": "10.0.0.1"}', "is not an IPv6 address"),
        ('{"sourcePodName": 5}', "5 is not a string"),
        ('{"flowStartSeconds": 1.5}', "is not a dateTimeSeconds"),
        ('{"sourceMacAddress": "zz:00:00:00:00:00"}', "is not a MAC address"),
        ('{"unknown:5:1": "xyz"}', "is not hex text"),
        ('{"unknown:0:8": "0a000001"}', "is sourceIPv4Address; use that name"),
        ('{"sourceTransportPort": null}', "null is not a value"),
        ("[1, 2]", "line 4: expected a JSON object"),
        ("{}", "line 4: the record has no information elements"),
        ("{not json", "line 4: not valid JSON"),
    ],
)
def test_bad_input_names_the_line_the_field_and_the_fix(line: str, message: str) -> None:
    with pytest.raises(RecordError) as exc:
        parse_line(line, default_registry().copy(), 4)
    assert message in str(exc.value)


def test_record_to_json_writes_bytes_as_hex_and_nan_as_null() -> None:
    assert record_to_json({"a": b"\x01\x02", "b": float("nan"), "c": 1.5}) == {"a": "0102", "b": None, "c": 1.5}
