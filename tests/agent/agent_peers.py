"""Decoding the agent's records two ways: flowscope.ipfix's Decoder and the independent
PyPI ``ipfix`` package (with the Antrea elements declared from the design's table)."""

from __future__ import annotations

from typing import Any

from flowscope.agent.records import templates
from flowscope.ipfix import Decoder, ExportSession

# The design's agent tables, written out independently of flowscope.ipfix's registry.
ANTREA_SPECS = [
    "sourcePodNamespace(56506/100)<string>[65535]", "sourcePodName(56506/101)<string>[65535]",
    "destinationPodNamespace(56506/102)<string>[65535]", "destinationPodName(56506/103)<string>[65535]",
    "sourceNodeName(56506/104)<string>[65535]", "destinationNodeName(56506/105)<string>[65535]",
    "destinationClusterIPv4(56506/106)<ipv4Address>[4]", "destinationClusterIPv6(56506/107)<ipv6Address>[16]",
    "destinationServicePort(56506/108)<unsigned16>[2]", "destinationServicePortName(56506/109)<string>[65535]",
    "ingressNetworkPolicyName(56506/110)<string>[65535]", "ingressNetworkPolicyNamespace(56506/111)<string>[65535]",
    "ingressNetworkPolicyType(56506/115)<unsigned8>[1]", "ingressNetworkPolicyRuleName(56506/141)<string>[65535]",
    "egressNetworkPolicyName(56506/112)<string>[65535]", "egressNetworkPolicyNamespace(56506/113)<string>[65535]",
    "egressNetworkPolicyType(56506/118)<unsigned8>[1]", "egressNetworkPolicyRuleName(56506/142)<string>[65535]",
    "ingressNetworkPolicyRuleAction(56506/139)<unsigned8>[1]", "egressNetworkPolicyRuleAction(56506/140)<unsigned8>[1]",
    "tcpState(56506/136)<string>[65535]", "flowType(56506/137)<unsigned8>[1]",
]


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
