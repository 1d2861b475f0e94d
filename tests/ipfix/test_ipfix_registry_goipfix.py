"""The registry against go-ipfix's published one, compared as data.

``data/goipfix_registry.csv`` is go-ipfix's table (the IPFIX library of Antrea's agent,
aggregator and collector): its IANA elements, the RFC 5103 reverse twins it derives and
all of Antrea's PEN 56506 elements, each with name, id, type and encoded length. An
Antrea peer names elements by that table, so ours must agree with it wherever we know an
element, know every Antrea element, and give a reverse twin to exactly the IANA elements
go-ipfix does.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from flowscope.ipfix import ANTREA_PEN, IANA_PEN, REVERSE_PEN, Decoder, ExportSession, Template, UnknownElement, default_registry

TABLE = Path(__file__).parent / "data" / "goipfix_registry.csv"


def published() -> dict[tuple[int, int], tuple[str, str, int]]:
    lines = [line for line in TABLE.read_text().splitlines() if line and not line.startswith("#")]
    return {
        (int(r["enterpriseId"]), int(r["elementId"])): (r["name"], r["dataType"], int(r["length"]))
        for r in csv.DictReader(lines)
    }


def test_every_antrea_element_of_go_ipfix_is_known_with_its_name_id_type_and_length() -> None:
    reg = default_registry()
    antrea = {k: v for k, v in published().items() if k[0] == ANTREA_PEN}
    assert len(antrea) == 73  # ids 100-172
    for (pen, eid), (name, dtype, length) in antrea.items():
        ie = reg.by_id(pen, eid)
        assert (ie.name, ie.data_type.name, ie.default_length) == (name, dtype, length), f"{pen}/{eid}"
        assert reg.get(name) is ie
    ours = {ie.key for ie in reg if ie.pen == ANTREA_PEN}
    assert ours == set(antrea)


def test_every_iana_and_reverse_element_we_know_matches_go_ipfix() -> None:
    table = published()
    reg = default_registry()
    iana = [ie for ie in reg if ie.pen == IANA_PEN]
    assert len(iana) > 150
    for ie in iana:
        assert (IANA_PEN, ie.element_id) in table, f"{ie} is not in go-ipfix's IANA table"
        name, dtype, length = table[(IANA_PEN, ie.element_id)]
        assert (ie.name, ie.data_type.name, ie.default_length) == (name, dtype, length)
        # RFC 5103 6.1 as go-ipfix reads it: a reverse twin exactly where go-ipfix has one
        theirs = table.get((REVERSE_PEN, ie.element_id))
        try:
            mine = reg.by_id(REVERSE_PEN, ie.element_id)
        except UnknownElement:
            mine = None
        if theirs is None:
            assert mine is None, f"{ie.name} has a reverse twin here but not in go-ipfix"
        else:
            assert mine is not None, f"{ie.name}: go-ipfix knows {theirs[0]}, we do not"
            assert (mine.name, mine.data_type.name, mine.default_length) == theirs
    for name in ("reverseSourceIPv4Address", "reverseDestinationTransportPort", "reverseProtocolIdentifier",
                 "reverseFlowEndSeconds", "reverseSourceIPv6Address"):
        assert reg.get(name).pen == REVERSE_PEN
    for name in ("templateId", "observationDomainId", "exporterIPv4Address", "paddingOctets", "biflowDirection"):
        assert "reverse" + name[0].upper() + name[1:] not in reg


@pytest.mark.parametrize("name", ["sourcePodUUID", "egressNetworkPolicyUUID", "egressNodeUUID"])
def test_antrea_uuids_are_16_octet_fields_as_go_ipfix_sends_them(name: str) -> None:
    t = Template.build(300, ["sourcePodName", name])
    assert t.fields[1].length == 16
    session = ExportSession(1)
    session.add_template(t)
    uuid = bytes(range(16))
    decoded = []
    decoder = Decoder()
    for m in session.encode_templates(0) + session.encode_records(300, [{"sourcePodName": "a", name: uuid}], 0):
        decoded += [r for _, r in decoder.decode(m).data_records()]
    assert decoded == [{"sourcePodName": "a", name: uuid}]
