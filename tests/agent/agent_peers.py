"""Decoding the agent's records two ways: flowscope.ipfix's Decoder and the independent
PyPI ``ipfix`` package (with the Antrea elements declared from the design's table)."""

from __future__ import annotations

from typing import Any

from design_ies import ANTREA_SPECS
from flowscope.agent.records import templates
from flowscope.ipfix import Decoder, ExportSession


def encode(batches: list[tuple[int, list[dict[str, Any]]]], export_time: int = 1_700_000_000) -> list[bytes]:
    session = ExportSession(7)
    for t in templates():
        session.add_template(t)
    out = session.encode_templates(export_time)
    for tid, recs in batches:
        out += session.encode_records(tid, recs, export_time)
    return out


def decode_ours(messages: list[bytes]) -> list[dict[str, Any]]:
    dec = Decoder()
    return [rec for m in messages for _, rec in dec.decode(m).data_records()]


def decode_pypi(messages: list[bytes]) -> list[dict[str, Any]]:
    import ipfix.ie
    import ipfix.message

    ipfix.ie.use_iana_default()
    ipfix.ie.use_5103_default()
    for spec in ANTREA_SPECS:
        ipfix.ie.for_spec(spec)
    buf = ipfix.message.MessageBuffer()
    out = []
    for m in messages:
        buf.from_bytes(m)
        out.extend(dict(r) for r in buf.namedict_iterator())
    return out
