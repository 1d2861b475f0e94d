"""The sans-IO codec: round trips, what RFC 7011 lets a peer send, and what it must refuse.

Messages are built byte by byte here (not with our encoder) wherever the point is what a
*peer* may send, so that the decoder is not only tested against itself.
"""

from __future__ import annotations

import socket
import struct

import pytest

from flowscope.ipfix import (
    ANTREA_PEN,
    REVERSE_PEN,
    DataSet,
    DataType,
    Decoder,
    ExportSession,
    InformationElement,
    InvalidValue,
    MalformedMessage,
    MessageFramer,
    Registry,
    Template,
    TemplateSet,
    UnknownElement,
    UsageError,
    default_registry,
)

# --------------------------------------------------------------------------- helpers


def header(length: int, export_time: int = 1_700_000_000, seq: int = 0, domain: int = 1) -> bytes:
    return struct.pack("!HHIII", 10, length, export_time, seq, domain)


def message(*sets: bytes, seq: int = 0, domain: int = 1, export_time: int = 1_700_000_000) -> bytes:
    body = b"".join(sets)
    return header(16 + len(body), export_time, seq, domain) + body


def set_(set_id: int, payload: bytes) -> bytes:
    return struct.pack("!HH", set_id, 4 + len(payload)) + payload


def field(element_id: int, length: int, pen: int = 0) -> bytes:
    if pen:
        return struct.pack("!HHI", element_id | 0x8000, length, pen)
    return struct.pack("!HH", element_id, length)


def template_record(template_id: int, *fields: bytes) -> bytes:
    return struct.pack("!HH", template_id, len(fields)) + b"".join(fields)


def varlen(data: bytes) -> bytes:
    if len(data) < 255:
        return bytes([len(data)]) + data
    return b"\xff" + struct.pack("!H", len(data)) + data


AGENT_FIELDS = [
    "flowStartSeconds", "flowEndSeconds", "flowEndReason", "sourceIPv4Address", "destinationIPv4Address",
    "sourceTransportPort", "destinationTransportPort", "protocolIdentifier", "packetTotalCount",
    "octetTotalCount", "packetDeltaCount", "octetDeltaCount", "reversePacketTotalCount",
    "reverseOctetTotalCount", "reversePacketDeltaCount", "reverseOctetDeltaCount", "sourcePodNamespace",
    "sourcePodName", "destinationPodNamespace", "destinationPodName", "sourceNodeName", "destinationNodeName",
    "destinationClusterIPv4", "destinationServicePort", "destinationServicePortName",
    "ingressNetworkPolicyName", "ingressNetworkPolicyNamespace", "ingressNetworkPolicyType",
    "ingressNetworkPolicyRuleName", "egressNetworkPolicyName", "egressNetworkPolicyNamespace",
    "egressNetworkPolicyType", "egressNetworkPolicyRuleName", "ingressNetworkPolicyRuleAction",
    "egressNetworkPolicyRuleAction", "tcpState", "flowType",
]  # fmt: skip


def agent_record(i: int = 0, **overrides: object) -> dict[str, object]:
    rec: dict[str, object] = {
        "flowStartSeconds": 1_700_000_000 + i, "flowEndSeconds": 1_700_000_060 + i, "flowEndReason": 2,
        "sourceIPv4Address": f"10.10.0.{i % 250 + 1}", "destinationIPv4Address": "10.10.1.7",
        "sourceTransportPort": 30000 + i, "destinationTransportPort": 8080, "protocolIdentifier": 6,
        "packetTotalCount": 10 + i, "octetTotalCount": 1500 * (10 + i), "packetDeltaCount": 3,
        "octetDeltaCount": 4500, "reversePacketTotalCount": 8, "reverseOctetTotalCount": 9000,
        "reversePacketDeltaCount": 2, "reverseOctetDeltaCount": 3000, "sourcePodNamespace": "shop",
        "sourcePodName": f"frontend-7d9f-{i}", "destinationPodNamespace": "shop", "destinationPodName": "cart-0",
        "sourceNodeName": "node-a", "destinationNodeName": "node-b", "destinationClusterIPv4": "10.96.0.12",
        "destinationServicePort": 80, "destinationServicePortName": "shop/cart:http",
        "ingressNetworkPolicyName": "allow-frontend", "ingressNetworkPolicyNamespace": "shop",
        "ingressNetworkPolicyType": 1, "ingressNetworkPolicyRuleName": "ingress-0",
        "egressNetworkPolicyName": "", "egressNetworkPolicyNamespace": "", "egressNetworkPolicyType": 0,
        "egressNetworkPolicyRuleName": "", "ingressNetworkPolicyRuleAction": 1,
        "egressNetworkPolicyRuleAction": 0, "tcpState": "ESTABLISHED", "flowType": 2,
    }  # fmt: skip
    rec.update(overrides)
    return rec


def roundtrip(template: Template, records: list[dict[str, object]], registry: Registry | None = None) -> list[dict[str, object]]:
    exporter = ExportSession(7)
    exporter.add_template(template)
    decoder = Decoder(registry)
    out: list[dict[str, object]] = []
    for data in exporter.encode_templates(100) + exporter.encode_records(template.template_id, records, 101):
        out.extend(r for _, r in decoder.decode(data).data_records())
    return out


# --------------------------------------------------------------------------- registry


def test_registry_holds_every_ie_of_the_design_with_its_pen_id_and_type() -> None:
    reg = default_registry()
    expected = {
        "flowStartSeconds": (0, 150, "dateTimeSeconds"), "flowEndSeconds": (0, 151, "dateTimeSeconds"),
        "flowEndReason": (0, 136, "unsigned8"), "sourceIPv4Address": (0, 8, "ipv4Address"),
        "destinationIPv6Address": (0, 28, "ipv6Address"), "octetDeltaCount": (0, 1, "unsigned64"),
        "reversePacketTotalCount": (REVERSE_PEN, 86, "unsigned64"),
        "reverseOctetDeltaCount": (REVERSE_PEN, 1, "unsigned64"),
        "sourcePodNamespace": (ANTREA_PEN, 100, "string"), "destinationClusterIPv6": (ANTREA_PEN, 107, "ipv6Address"),
        "ingressNetworkPolicyType": (ANTREA_PEN, 115, "unsigned8"),
        "ingressNetworkPolicyRuleName": (ANTREA_PEN, 141, "string"),
        "egressNetworkPolicyRuleName": (ANTREA_PEN, 142, "string"), "tcpState": (ANTREA_PEN, 136, "string"),
        "flowType": (ANTREA_PEN, 137, "unsigned8"),
        "packetTotalCountFromSourceNode": (ANTREA_PEN, 120, "unsigned64"),
        "reverseOctetDeltaCountFromDestinationNode": (ANTREA_PEN, 135, "unsigned64"),
        "originalExporterIPv4Address": (0, 403, "ipv4Address"),
        "originalObservationDomainId": (0, 405, "unsigned32"),
    }  # fmt: skip
    for name, (pen, eid, dtype) in expected.items():
        ie = reg.get(name)
        assert (ie.pen, ie.element_id, ie.data_type.name) == (pen, eid, dtype), name
    antrea = [ie for ie in reg if ie.pen == ANTREA_PEN]
    # the design's elements, and every later one go-ipfix registers (test_ipfix_registry_goipfix.py)
    assert sorted(ie.element_id for ie in antrea) == list(range(100, 173))


def test_registry_rejects_clashes_and_names_unknown_elements() -> None:
    reg = default_registry().copy()
    with pytest.raises(UsageError, match="already registered"):
        reg.add(InformationElement("mine", ANTREA_PEN, 101, DataType.string))
    reg.add(InformationElement("myCounter", 99999, 1, DataType.unsigned32))
    assert reg.by_id(99999, 1).name == "myCounter"
    assert "myCounter" not in default_registry()
    with pytest.raises(UnknownElement, match="sourcePodNam"):
        reg.get("sourcePodNam")


# --------------------------------------------------------------------------- round trips


def test_agent_record_round_trip_ipv4_with_sequence_numbers() -> None:
    template = Template.build(256, AGENT_FIELDS)
    records = [agent_record(i) for i in range(500)]
    exporter = ExportSession(3, max_message_size=1400)
    exporter.add_template(template)
    decoder = Decoder()
    decoder.decode(exporter.encode_templates(10)[0])
    got, sequences, counts = [], [], []
    for data in exporter.encode_records(256, records, 11):
        assert len(data) <= 1400
        msg = decoder.decode(data)
        sequences.append(msg.sequence_number)
        counts.append(msg.record_count)
        got.extend(r for _, r in msg.data_records())
    assert got == records
    # each message's sequence number counts the data records sent before it (RFC 7011 3.1)
    assert sequences == [sum(counts[:i]) for i in range(len(counts))]
    assert exporter.sequence_number == 500
    assert decoder.lost_records == 0


def test_ipv6_and_every_data_type_round_trip() -> None:
    reg = default_registry().copy()
    extra = {
        "myS8": DataType.signed8, "myS32": DataType.signed32, "myF32": DataType.float32, "myF64": DataType.float64,
        "myBool": DataType.boolean, "myMac": DataType.macAddress, "myOctets": DataType.octetArray,
        "myMs": DataType.dateTimeMilliseconds, "myUs": DataType.dateTimeMicroseconds,
        "myNs": DataType.dateTimeNanoseconds,
    }  # fmt: skip
    for n, (name, dtype) in enumerate(extra.items()):
        reg.add(InformationElement(name, 4242, n + 1, dtype))
    names = ["sourceIPv6Address", "destinationIPv6Address", "destinationClusterIPv6", *extra, "sourcePodName"]
    template = Template.build(300, names, reg)
    rec = {
        "sourceIPv6Address": "fd00:10:244::5", "destinationIPv6Address": "2001:db8::1",
        "destinationClusterIPv6": "fd00:10:96::a", "myS8": -5, "myS32": -70000, "myF32": 1.5, "myF64": 2.25,
        "myBool": False, "myMac": "02:42:ac:11:00:02", "myOctets": b"\x00\x01\xfe",
        "myMs": 1_700_000_000.123, "myUs": 1_700_000_000.5, "myNs": 1_700_000_000.25, "sourcePodName": "pödé",
    }  # fmt: skip
    (got,) = roundtrip(template, [rec], reg)
    assert got.keys() == rec.keys()
    for key in ("myUs", "myNs", "myMs"):
        assert got[key] == pytest.approx(rec[key], abs=1e-6)
        got[key] = rec[key]
    assert got == rec


def test_long_strings_use_the_three_octet_length_escape() -> None:
    template = Template.build(256, ["sourcePodName", "destinationPodName", "octetDeltaCount"])
    names = ["", "a", "b" * 254, "c" * 255, "d" * 300, "e" * 30000]
    records = [{"sourcePodName": n, "destinationPodName": n[::-1], "octetDeltaCount": len(n)} for n in names]
    assert roundtrip(template, records) == records
    encoded = template.encode_record(records[3])
    assert encoded[:3] == b"\xff\x00\xff"  # 255 itself needs the escape (RFC 7011 7)


def test_reduced_size_encoding_both_ways() -> None:
    template = Template.build(256, [("octetDeltaCount", 4), ("packetDeltaCount", 2), ("octetTotalCount", 3)])
    assert template.fixed_record_length == 9
    records = [{"octetDeltaCount": 4_000_000_000, "packetDeltaCount": 65535, "octetTotalCount": 2**24 - 1}]
    assert roundtrip(template, records) == records
    with pytest.raises(InvalidValue, match="octetDeltaCount"):
        template.encode_record({"octetDeltaCount": 2**32, "packetDeltaCount": 1, "octetTotalCount": 1})
    with pytest.raises(UsageError, match="length 16 is not allowed"):
        Template.build(257, [("octetDeltaCount", 16)])


def test_peer_reduced_size_and_wrong_length_fields() -> None:
    # A peer sends octetDeltaCount in 4 octets and an address with an impossible length:
    # the integer is read at its length, the address is kept as raw bytes.
    t = template_record(400, field(1, 4), field(8, 6))
    data = set_(400, struct.pack("!I", 123456) + b"\x0a\x00\x00\x01\xaa\xbb")
    (rec,) = [r for _, r in Decoder().decode(message(set_(2, t), data)).data_records()]
    assert rec == {"octetDeltaCount": 123456, "sourceIPv4Address": b"\x0a\x00\x00\x01\xaa\xbb"}


def test_caller_errors_name_the_field_and_template() -> None:
    template = Template.build(256, AGENT_FIELDS)
    bad = agent_record()
    del bad["tcpState"]
    with pytest.raises(UsageError, match=r"template 256: the record has no value for tcpState"):
        template.encode_record(bad)
    with pytest.raises(InvalidValue, match=r"'10.0.0.300' is not a valid ipv4Address for sourceIPv4Address"):
        template.encode_record(agent_record(sourceIPv4Address="10.0.0.300"))
    with pytest.raises(InvalidValue, match="sourcePodName"):
        template.encode_record(agent_record(sourcePodName=42))
    exporter = ExportSession()
    with pytest.raises(UsageError, match="never added"):
        exporter.encode_records(999, [{}], 0)
    exporter.add_template(template)
    with pytest.raises(UsageError, match="already in use"):
        exporter.add_template(Template.build(256, ["octetDeltaCount"]))
    with pytest.raises(UsageError, match="outside 256..65535"):
        Template.build(255, ["octetDeltaCount"])


# --------------------------------------------------------------------------- what peers may send


def test_several_sets_records_and_padding_in_one_message() -> None:
    t1 = template_record(256, field(8, 4), field(1, 8))
    t2 = template_record(257, field(101, 65535, ANTREA_PEN), field(7, 2))
    templates = set_(2, t1 + t2 + b"\x00\x00")  # template set padding
    d1 = set_(256, socket.inet_aton("10.0.0.1") + struct.pack("!Q", 5) + socket.inet_aton("10.0.0.2") + struct.pack("!Q", 6) + b"\x00" * 3)
    d2 = set_(257, varlen(b"web-1") + struct.pack("!H", 80) + varlen(b"db") + struct.pack("!H", 5432) + b"\x00")
    msg = Decoder().decode(message(templates, d1, d2, seq=42))
    assert [type(s) for s in msg.sets] == [TemplateSet, DataSet, DataSet]
    assert msg.sequence_number == 42 and msg.observation_domain_id == 1
    assert [r for _, r in msg.data_records()] == [
        {"sourceIPv4Address": "10.0.0.1", "octetDeltaCount": 5},
        {"sourceIPv4Address": "10.0.0.2", "octetDeltaCount": 6},
        {"sourcePodName": "web-1", "sourceTransportPort": 80},
        {"sourcePodName": "db", "sourceTransportPort": 5432},
    ]


def test_unknown_enterprise_and_iana_elements_are_kept_as_raw_bytes() -> None:
    t = template_record(256, field(7, 2), field(999, 3, 12345), field(30000, 65535))
    data = set_(256, struct.pack("!H", 53) + b"\x01\x02\x03" + varlen(b"\xde\xad"))
    (rec,) = [r for _, r in Decoder().decode(message(set_(2, t), data)).data_records()]
    assert rec == {"sourceTransportPort": 53, "unknown:12345:999": b"\x01\x02\x03", "unknown:0:30000": b"\xde\xad"}


def test_templates_are_scoped_per_observation_domain() -> None:
    decoder = Decoder()
    decoder.decode(message(set_(2, template_record(256, field(7, 2))), domain=1))
    decoder.decode(message(set_(2, template_record(256, field(11, 2))), domain=2))
    a = decoder.decode(message(set_(256, struct.pack("!H", 1)), domain=1))
    b = decoder.decode(message(set_(256, struct.pack("!H", 2)), domain=2))
    assert [r for _, r in a.data_records()] == [{"sourceTransportPort": 1}]
    assert [r for _, r in b.data_records()] == [{"destinationTransportPort": 2}]


def test_options_template_records_decode_with_scope() -> None:
    # options template: scope observationDomainId, then exportedMessageTotalCount
    ot = struct.pack("!HHH", 258, 2, 1) + field(149, 4) + field(41, 8)
    data = set_(258, struct.pack("!IQ", 1, 77))
    msg = Decoder().decode(message(set_(3, ot), data))
    (tmpl, rec) = next(msg.data_records())
    assert tmpl.is_options and tmpl.scope_field_count == 1
    assert rec == {"observationDomainId": 1, "exportedMessageTotalCount": 77}


def test_withdrawals_over_tcp_including_withdraw_all() -> None:
    decoder = Decoder(transport="tcp")
    t = set_(2, template_record(256, field(7, 2)) + template_record(257, field(11, 2)))
    ot = set_(3, struct.pack("!HHH", 258, 1, 1) + field(149, 4))
    decoder.decode(message(t, ot))
    assert sorted(decoder.templates(1)) == [256, 257, 258]
    decoder.decode(message(set_(2, struct.pack("!HH", 256, 0))))
    assert sorted(decoder.templates(1)) == [257, 258]
    decoder.decode(message(set_(2, struct.pack("!HH", 2, 0))))  # all templates, not options
    assert sorted(decoder.templates(1)) == [258]
    decoder.decode(message(set_(3, struct.pack("!HH", 3, 0))))  # all options templates
    assert decoder.templates(1) == {}
    with pytest.raises(MalformedMessage, match="unknown template 257"):
        decoder.decode(message(set_(257, struct.pack("!H", 1))))


def test_exporter_withdrawal_messages_decode_as_withdrawals() -> None:
    exporter = ExportSession(1)
    exporter.add_template(Template.build(256, ["sourceTransportPort"]))
    exporter.add_template(Template.build(257, ["destinationTransportPort"]))
    decoder = Decoder(transport="tcp")
    for data in exporter.encode_templates(0):
        decoder.decode(data)
    for data in exporter.encode_withdrawal([256], 1):
        decoder.decode(data)
    assert list(decoder.templates(1)) == [257]
    for data in exporter.encode_withdrawal(None, 2):
        decoder.decode(data)
    assert decoder.templates(1) == {} and exporter.templates == {}


def test_udp_ignores_withdrawals_tolerates_unknown_templates_and_expires_templates() -> None:
    decoder = Decoder(transport="udp", template_lifetime=1800)
    decoder.decode(message(set_(2, template_record(256, field(7, 2)))), now=1000.0)
    msg = decoder.decode(message(set_(2, struct.pack("!HH", 256, 0))), now=1001.0)
    assert msg.ignored_withdrawals == 1 and list(decoder.templates(1)) == [256]
    msg = decoder.decode(message(set_(999, b"\x00\x01"), set_(256, b"\x00\x07")), now=1002.0)
    assert msg.unknown_template_sets == 1 and [r for _, r in msg.data_records()] == [{"sourceTransportPort": 7}]
    # refreshed before its lifetime ends: kept; not refreshed: gone
    decoder.decode(message(set_(2, template_record(256, field(7, 2)))), now=2500.0)
    assert list(decoder.templates(1)) == [256]
    msg = decoder.decode(message(set_(256, b"\x00\x07")), now=2500.0 + 1799.0)
    assert msg.record_count == 1
    msg = decoder.decode(message(set_(256, b"\x00\x07")), now=2500.0 + 1800.0)
    assert msg.record_count == 0 and msg.unknown_template_sets == 1
    # over UDP a template may be redefined in place
    decoder.decode(message(set_(2, template_record(256, field(11, 2)))), now=5000.0)
    assert decoder.templates(1)[256].names == ("destinationTransportPort",)


def test_template_redefinition_without_withdrawal_is_an_error_on_streams() -> None:
    decoder = Decoder(transport="tcp")
    decoder.decode(message(set_(2, template_record(256, field(7, 2)))))
    decoder.decode(message(set_(2, template_record(256, field(7, 2)))))  # identical: fine
    with pytest.raises(MalformedMessage, match="redefined"):
        decoder.decode(message(set_(2, template_record(256, field(11, 2)))))


def test_sequence_gaps_count_lost_records() -> None:
    decoder = Decoder()
    decoder.decode(message(set_(2, template_record(256, field(7, 2))), seq=0))
    decoder.decode(message(set_(256, b"\x00\x01\x00\x02"), seq=0))
    decoder.decode(message(set_(256, b"\x00\x03"), seq=5))  # records 2..4 never arrived
    assert decoder.lost_records == 3


def test_template_limit_bounds_what_one_session_can_make_us_hold() -> None:
    decoder = Decoder(max_templates=3)
    ts = b"".join(template_record(256 + i, field(7, 2)) for i in range(3))
    decoder.decode(message(set_(2, ts)))
    with pytest.raises(MalformedMessage, match="more than 3 templates"):
        decoder.decode(message(set_(2, template_record(300, field(7, 2)))))


def test_invalid_utf8_is_kept_with_replacement_characters() -> None:
    t = template_record(256, field(101, 65535, ANTREA_PEN), field(7, 2))
    data = set_(256, varlen(b"ok") + b"\x00\x01" + varlen(b"bad\xff\xfe") + b"\x00\x02")
    recs = [r for _, r in Decoder().decode(message(set_(2, t), data)).data_records()]
    assert recs == [{"sourcePodName": "ok", "sourceTransportPort": 1}, {"sourcePodName": "bad\ufffd\ufffd", "sourceTransportPort": 2}]


# --------------------------------------------------------------------------- malformed input


TEMPLATE_256 = set_(2, template_record(256, field(7, 2), field(101, 65535, ANTREA_PEN)))

BAD_MESSAGES = {
    "short header": b"\x00\x0a\x00\x10",
    "version 9": struct.pack("!HHIII", 9, 16, 0, 0, 0),
    "length larger than data": header(40) + set_(2, b""),
    "length smaller than data": header(16) + set_(2, b""),
    "set length below 4": message(struct.pack("!HH", 2, 2)),
    "set runs past the message": message(struct.pack("!HH", 256, 40) + b"\x00" * 4),
    "stray octets after last set": message(set_(2, template_record(256, field(7, 2))), b"\x00\x01"),
    "template truncated": message(set_(2, struct.pack("!HH", 256, 3) + field(7, 2))),
    "enterprise field truncated": message(set_(2, struct.pack("!HH", 256, 1) + struct.pack("!HH", 0x8001, 4))),
    "reserved template id": message(set_(2, template_record(200, field(7, 2)))),
    "zero-length field": message(set_(2, template_record(256, field(7, 0)))),
    "options scope count zero": message(set_(3, struct.pack("!HHH", 256, 1, 0) + field(7, 2))),
    "data for unknown template (tcp)": message(set_(256, b"\x00\x01")),
    "record runs past its set": message(TEMPLATE_256, set_(256, b"\x00\x01" + b"\x09abc")),
    "record escape runs past the message": message(TEMPLATE_256, set_(256, b"\x00\x01\xff\x10")),
    "withdrawal of a reserved id": message(set_(2, struct.pack("!HH", 5, 0))),
}


@pytest.mark.parametrize("name", sorted(BAD_MESSAGES))
def test_malformed_messages_raise_malformed_message(name: str) -> None:
    decoder = Decoder(transport="tcp")
    if "record" in name:
        decoder.decode(message(TEMPLATE_256))
    with pytest.raises(MalformedMessage):
        decoder.decode(BAD_MESSAGES[name])


def test_framer_cuts_a_stream_into_messages_and_refuses_a_desynchronised_one() -> None:
    exporter = ExportSession(1)
    exporter.add_template(Template.build(256, AGENT_FIELDS))
    stream = b"".join(exporter.encode_templates(0) + exporter.encode_records(256, [agent_record(i) for i in range(300)], 0))
    framer = MessageFramer()
    decoder = Decoder(transport="tcp")
    records = 0
    for i in range(0, len(stream), 977):  # arbitrary chunking
        for data in framer.feed(stream[i : i + 977]):
            records += decoder.decode(data).record_count
    assert records == 300 and framer.pending == 0
    framer.feed(stream[:10])
    assert framer.pending == 10  # an incomplete message waits for more
    with pytest.raises(MalformedMessage, match="lost sync"):
        MessageFramer().feed(b"\x00\x09\x00\x20" + b"\x00" * 28)
    with pytest.raises(MalformedMessage, match="shorter than the header"):
        MessageFramer().feed(b"\x00\x0a\x00\x08")


def test_a_record_longer_than_a_message_is_its_own_error_and_can_go_alone_in_a_larger_one() -> None:
    from flowscope.ipfix import RecordTooLarge

    exporter = ExportSession(1, max_message_size=512)
    exporter.add_template(Template.build(256, ["sourcePodName"]))
    big = {"sourcePodName": "p" * 600}
    with pytest.raises(RecordTooLarge, match="more than fits in a 512-octet message"):
        exporter.encode_records(256, [big], 0)
    assert exporter.sequence_number == 0  # nothing was counted as sent
    (data,) = exporter.encode_records(256, [big], 0, max_message_size=65535)
    decoder = Decoder()
    decoder.decode(exporter.encode_templates(0)[0])
    assert [r for _, r in decoder.decode(data).data_records()] == [big]
    assert exporter.max_message_size == 512
