"""Grafana dashboards for users who already run Grafana: the same views as flowscope's own
pages, as dashboard JSON for the ClickHouse data source plugin (grafana-clickhouse-datasource).

Antrea's Theia moved its flow visibility to Grafana over ClickHouse; these dashboards read
flowscope's store the same way: every time series and every sankey-like table from the
1-minute roll-up (``<database>.flows_1m``), the record tables from the raw table. Panels
use only the plugin's documented macros (``$__timeFilter``, ``$__fromTime``,
``$__toTime``, ``$__interval_s``) and the dashboard variable ``$database``.

The JSON files in ``collector/ui/grafana/`` are written by :func:`write` (``python -m
flowscope.collector.ui.grafana``); a test checks they are what this module builds and runs
every panel's SQL against a real store, macros expanded as the plugin does. Grafana itself
cannot run on this machine: what is proven is that each query is valid ClickHouse SQL over
flowscope's schema and returns the expected rows, not how Grafana draws it. Sankey
diagrams need a panel plugin Grafana does not ship; those views are tables (source,
destination, bytes) that any sankey panel can read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

__all__ = ["DASHBOARDS", "build", "write"]

DIR: Final = Path(__file__).resolve().parent / "grafana"
DS: Final = {"type": "grafana-clickhouse-datasource", "uid": "${datasource}"}
M1: Final = "${database}.flows_1m"
RAW: Final = "${database}.flows"
WINDOW_1M: Final = "timeBucket >= toUInt32($__fromTime) AND timeBucket < toUInt32($__toTime)"
BYTES: Final = "(octetDeltaCount + reverseOctetDeltaCount)"
POD = "if({n} = '', '', concat({ns}, '/', {n}))"
SRC_POD: Final = POD.format(ns="sourcePodNamespace", n="sourcePodName")
DST_POD: Final = POD.format(ns="destinationPodNamespace", n="destinationPodName")
BUCKET: Final = "toDateTime(intDiv(timeBucket, $__interval_s) * $__interval_s)"
DENIED: Final = "(ingressNetworkPolicyRuleAction IN (2, 3) OR egressNetworkPolicyRuleAction IN (2, 3))"


def _series(title: str, sql: str, unit: str = "Bps", x: int = 0, y: int = 0, w: int = 12, h: int = 8,
            stack: bool = False) -> dict[str, Any]:
    return {
        "type": "timeseries", "title": title, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"stacking": {"mode": "normal" if stack else "none"},
                                                              "fillOpacity": 10}}, "overrides": []},
        "targets": [{"refId": "A", "datasource": DS, "format": 0, "queryType": "timeseries", "rawSql": sql,
                     "editorType": "sql"}],
    }


def _table(title: str, sql: str, x: int = 0, y: int = 0, w: int = 12, h: int = 8) -> dict[str, Any]:
    return {
        "type": "table", "title": title, "datasource": DS, "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {}, "overrides": [
            {"matcher": {"id": "byRegexp", "options": "bytes|octets"}, "properties": [{"id": "unit", "value": "decbytes"}]},
        ]},
        "targets": [{"refId": "A", "datasource": DS, "format": 1, "queryType": "table", "rawSql": sql,
                     "editorType": "sql"}],
    }


def _stat(title: str, sql: str, unit: str, x: int, w: int = 4) -> dict[str, Any]:
    return {
        "type": "stat", "title": title, "datasource": DS, "gridPos": {"x": x, "y": 0, "w": w, "h": 4},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": "A", "datasource": DS, "format": 1, "queryType": "table", "rawSql": sql,
                     "editorType": "sql"}],
    }


def _throughput_by(key: str, where: str = "1") -> str:
    return (f"SELECT {BUCKET} AS time, {key} AS name, sum({BYTES}) / $__interval_s AS value FROM {M1} "
            f"WHERE {WINDOW_1M} AND {where} GROUP BY time, name ORDER BY time")


def _links(src: str, dst: str, where: str, octets: str) -> str:
    return (f"SELECT {src} AS source, {dst} AS destination, sum({octets}) AS bytes FROM {M1} "
            f"WHERE {WINDOW_1M} AND {where} GROUP BY source, destination ORDER BY bytes DESC LIMIT 50")


_P2P: Final = "flowType IN (1, 2) AND destinationServicePortName = '' AND sourcePodName != '' AND destinationPodName != ''"
_P2S: Final = "destinationServicePortName != ''"


def _dashboards() -> dict[str, tuple[str, list[dict[str, Any]]]]:
    return {
        "overview": ("flowscope: Overview", [
            _stat("Flow records", f"SELECT sum(records) AS flow_records FROM {M1} WHERE {WINDOW_1M}", "short", 0),
            _stat("Traffic", f"SELECT sum({BYTES}) AS bytes FROM {M1} WHERE {WINDOW_1M}", "decbytes", 4),
            _stat("Denied flow records", f"SELECT sum(records) AS denied FROM {M1} WHERE {WINDOW_1M} AND {DENIED}",
                  "short", 8),
            _stat("Pods", f"SELECT uniqExact(p) AS pods FROM (SELECT {SRC_POD} AS p FROM {M1} WHERE {WINDOW_1M} "
                          f"UNION ALL SELECT {DST_POD} FROM {M1} WHERE {WINDOW_1M}) WHERE p != ''", "short", 12),
            _series("Throughput by flow type", _throughput_by(
                "multiIf(flowType = 1, 'intra-node', flowType = 2, 'inter-node', flowType = 3, 'to-external', "
                "flowType = 4, 'from-external', 'host')"), y=4, w=24),
            _table("Top source Pods", f"SELECT {SRC_POD} AS pod, sum(octetDeltaCount) AS sent_bytes, "
                                      f"sum(reverseOctetDeltaCount) AS received_bytes, sum(records) AS flow_records "
                                      f"FROM {M1} WHERE {WINDOW_1M} AND sourcePodName != '' GROUP BY pod "
                                      "ORDER BY sent_bytes + received_bytes DESC LIMIT 10", y=12),
            _table("Top Services", f"SELECT destinationServicePortName AS service, sum({BYTES}) AS bytes, "
                                   f"sum(records) AS flow_records FROM {M1} WHERE {WINDOW_1M} AND {_P2S} "
                                   "GROUP BY service ORDER BY bytes DESC LIMIT 10", x=12, y=12),
            _series("Denied flow records over time", f"SELECT {BUCKET} AS time, sum(records) AS denied FROM {M1} "
                                           f"WHERE {WINDOW_1M} AND {DENIED} GROUP BY time ORDER BY time",
                    unit="short", y=20, w=24),
        ]),
        "pod-to-pod": ("flowscope: Pod-to-Pod", [
            _table("Cumulative Tx (source Pod -> destination Pod)", _links(SRC_POD, DST_POD, _P2P, "octetDeltaCount")),
            _table("Cumulative Rx (source Pod -> destination Pod)",
                   _links(SRC_POD, DST_POD, _P2P, "reverseOctetDeltaCount"), x=12),
            _series("Throughput per source Pod", _throughput_by(SRC_POD, _P2P), y=8),
            _series("Throughput per destination Pod", _throughput_by(DST_POD, _P2P), x=12, y=8),
        ]),
        "pod-to-service": ("flowscope: Pod-to-Service", [
            _table("Cumulative Tx (Pod -> Service)",
                   _links(SRC_POD, "destinationServicePortName", _P2S, "octetDeltaCount")),
            _table("Cumulative Rx (Pod -> Service)",
                   _links(SRC_POD, "destinationServicePortName", _P2S, "reverseOctetDeltaCount"), x=12),
            _series("Throughput per Service", _throughput_by("destinationServicePortName", _P2S), y=8, w=24),
        ]),
        "pod-to-external": ("flowscope: Pod-to-External", [
            _table("Cumulative Tx and Rx (Pod -> external address)",
                   f"SELECT {SRC_POD} AS source, destinationIP AS destination, sum(octetDeltaCount) AS tx_bytes, "
                   f"sum(reverseOctetDeltaCount) AS rx_bytes FROM {RAW} WHERE $__timeFilter(flowEndSeconds) "
                   "AND flowType = 3 GROUP BY source, destination ORDER BY tx_bytes + rx_bytes DESC LIMIT 50", w=24),
            _series("Throughput per external address",
                    f"SELECT toDateTime(intDiv(toUInt32(flowEndSeconds), $__interval_s) * $__interval_s) AS time, "
                    f"destinationIP AS name, sum({BYTES}) / $__interval_s AS value FROM {RAW} "
                    "WHERE $__timeFilter(flowEndSeconds) AND flowType = 3 GROUP BY time, name ORDER BY time",
                    y=8, w=24),
        ]),
        "flow-records": ("flowscope: Flow Records", [
            _table("Flow records (newest first)",
                   "SELECT flowEndSeconds AS time, sourcePodNamespace, sourcePodName, sourceIP, sourceTransportPort, "
                   "destinationPodNamespace, destinationPodName, destinationIP, destinationTransportPort, "
                   "destinationServicePortName, protocolIdentifier, flowType, octetDeltaCount AS octets, "
                   "reverseOctetDeltaCount AS reverse_octets, ingressNetworkPolicyName, ingressNetworkPolicyRuleAction, "
                   "egressNetworkPolicyName, egressNetworkPolicyRuleAction, correlation "
                   f"FROM {RAW} WHERE $__timeFilter(flowEndSeconds) ORDER BY flowEndSeconds DESC LIMIT 1000",
                   w=24, h=16),
        ]),
        "node-throughput": ("flowscope: Node Throughput", [
            _series("Inter-Node traffic per Node (as source)", _throughput_by("sourceNodeName", "flowType = 2")),
            _series("Intra-Node traffic per Node", _throughput_by("sourceNodeName", "flowType = 1"), x=12),
            _series("Tx per Node (Mbit/s)",
                    f"SELECT time, node AS name, sum(tx) * 8 / 1000000 / $__interval_s AS value FROM ("
                    f"SELECT {BUCKET} AS time, sourceNodeName AS node, sum(octetDeltaCount) AS tx FROM {M1} "
                    f"WHERE {WINDOW_1M} AND sourceNodeName != '' GROUP BY time, node UNION ALL "
                    f"SELECT {BUCKET} AS time, destinationNodeName AS node, sum(reverseOctetDeltaCount) AS tx "
                    f"FROM {M1} WHERE {WINDOW_1M} AND destinationNodeName != '' GROUP BY time, node) "
                    "GROUP BY time, name ORDER BY time", unit="Mbits", y=8, w=24),
        ]),
        "network-policy": ("flowscope: Network Policy", [
            _table("Egress policy -> ingress policy",
                   "SELECT if(egressNetworkPolicyName = '', '(none)', concat(egressNetworkPolicyNamespace, '/', "
                   "egressNetworkPolicyName)) AS source, if(ingressNetworkPolicyName = '', '(none)', "
                   "concat(ingressNetworkPolicyNamespace, '/', ingressNetworkPolicyName)) AS destination, "
                   f"sum({BYTES}) AS bytes, sum(records) AS flow_records, sumIf(records, {DENIED}) AS denied_records "
                   f"FROM {M1} WHERE {WINDOW_1M} GROUP BY source, destination ORDER BY denied_records DESC, "
                   "bytes DESC LIMIT 50", w=24),
            _table("Denied connections",
                   f"SELECT flowEndSeconds AS time, {SRC_POD} AS source_pod, sourceIP, {DST_POD} AS destination_pod, "
                   "destinationIP, destinationTransportPort, ingressNetworkPolicyName, ingressNetworkPolicyRuleAction, "
                   f"egressNetworkPolicyName, egressNetworkPolicyRuleAction FROM {RAW} "
                   f"WHERE $__timeFilter(flowEndSeconds) AND {DENIED} ORDER BY flowEndSeconds DESC LIMIT 200",
                   y=8, w=24),
        ]),
    }


DASHBOARDS: Final = tuple(_dashboards())


def build(name: str) -> dict[str, Any]:
    """One dashboard's JSON model."""
    title, panels = _dashboards()[name]
    for i, p in enumerate(panels, 1):
        p["id"] = i
    return {
        "title": title, "uid": f"flowscope-{name}", "tags": ["flowscope", "network"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "grafana-clickhouse-datasource",
             "label": "ClickHouse"},
            {"name": "database", "type": "constant", "query": "flowscope", "hide": 2},
        ]},
        "panels": panels,
    }


def write(directory: Path = DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name in DASHBOARDS:
        path = directory / f"flowscope-{name}.json"
        path.write_text(json.dumps(build(name), indent=2) + "\n")
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write():
        print(p)
