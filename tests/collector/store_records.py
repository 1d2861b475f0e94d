"""Aggregated records for the store tests: every element of the aggregated record, given or zero."""

from __future__ import annotations

from typing import Any

from flowscope.aggregator.aggregation import ExportedFlow
from flowscope.ipfix import DataType, default_registry
from flowscope.ipfix.antrea import aggregator_fields


def aggregated_record(v6: bool = False, **fields: Any) -> dict[str, Any]:
    """An aggregated record of one family: the given fields, every other element 0, "" or the zero address."""
    reg = default_registry()
    out: dict[str, Any] = {}
    for name in aggregator_fields(6 if v6 else 4):
        dt = reg.get(name).data_type
        if dt is DataType.string:
            out[name] = ""
        elif dt is DataType.ipv4Address:
            out[name] = "0.0.0.0"
        elif dt is DataType.ipv6Address:
            out[name] = "::"
        else:
            out[name] = 0
    unknown = set(fields) - set(out)
    if unknown:
        raise KeyError(f"not elements of the aggregated record: {sorted(unknown)}")
    out.update(fields)
    return out


def flow(v6: bool = False, correlation: str = "correlated", final: bool = False, **fields: Any) -> ExportedFlow:
    return ExportedFlow(aggregated_record(v6, **fields), correlation, final)
