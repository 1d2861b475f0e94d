"""The CRDs' address patterns accept what the design writes (protocol names in any case, as
the agent and aggregator parse them) and refuse what those parsers refuse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from flowscope.ipfix.address import AddressError, parse_address

CRDS = Path(__file__).resolve().parents[2] / "crds"


def _pattern(crd: str, field: str) -> re.Pattern[str]:
    doc = yaml.safe_load((CRDS / crd).read_text())
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == field and isinstance(v, dict) and "pattern" in v:
                    found.append(v["pattern"])
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert len(found) == 1, (crd, field, found)
    return re.compile(found[0])


@pytest.mark.parametrize(
    "crd,field,value,ok",
    [
        ("flowaggregators.yaml", "externalFlowCollectorAddr", "10.96.0.20:4739:UDP", True),  # the design's example form
        ("flowaggregators.yaml", "externalFlowCollectorAddr", "10.96.0.20:4739:tcp", True),
        ("flowaggregators.yaml", "externalFlowCollectorAddr", "[fd00::20]:4739", True),
        ("flowaggregators.yaml", "externalFlowCollectorAddr", "10.96.0.20:4739:sctp", False),
        ("flowaggregators.yaml", "externalFlowCollectorAddr", "10.96.0.20:4739:tls", False),  # the design: tcp or udp
        ("flowexporterconfigs.yaml", "flowCollectorAddr", "flow-aggregator.flow-aggregator.svc:4739:TLS", True),
        ("flowexporterconfigs.yaml", "flowCollectorAddr", "[fd00::1]:4739:tls", True),
        ("flowexporterconfigs.yaml", "flowCollectorAddr", "fd00::1:4739", False),
    ],
)
def test_address_patterns_agree_with_the_parsers(crd: str, field: str, value: str, ok: bool) -> None:
    assert bool(_pattern(crd, field).match(value)) is ok
    if ok:
        parse_address(value, field=field)  # what the schema admits, the components read
    elif "sctp" in value or value.count(":") > 2 and "[" not in value:
        with pytest.raises(AddressError):
            parse_address(value, field=field)
