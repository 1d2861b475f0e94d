"""Prometheus metrics of the Flow Aggregator, read from the counters the components already keep.

The hot path never touches prometheus_client: the aggregation process, the sinks and the
collecting side count in plain integers, and :class:`AggregatorCollector` turns them into
metric families when ``/metrics`` is scraped. Metric names are prefixed
``flowscope_aggregator_``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["AggregatorCollector", "make_registry"]

P = "flowscope_aggregator_"


class AggregatorCollector(Collector):
    """Builds every metric from ``snapshot()``, a dict the aggregator service assembles."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        s = self.snapshot()
        agg = s["aggregation"]

        by_exporter = CounterMetricFamily(
            P + "records_received", "Agent records received, per exporting agent address (the first 512 "
            "addresses heard; later ones are summed as exporter=\"other\").", labels=["exporter"])
        for exporter, n in sorted(s["received_by_exporter"].items()):
            by_exporter.add_metric([exporter], n)
        yield by_exporter
        yield GaugeMetricFamily(P + "flows", "Flows held in the flow store.", value=s["flows"])
        yield GaugeMetricFamily(P + "flows_max", "Cap on flows held (maxFlows).", value=s["max_flows"])
        yield GaugeMetricFamily(
            P + "exporters_connected", "Agents connected to the collecting process (or heard from recently over UDP).",
            value=s["exporters_connected"])

        exported = CounterMetricFamily(
            P + "records_exported", "Aggregated records written by each sink.", labels=["sink"])
        for name, st in sorted(s["sinks"].items()):
            exported.add_metric([name], st["written"])
        yield exported
        yield CounterMetricFamily(
            P + "records_aggregated", "Aggregated records produced for the sinks.", value=agg["records_exported"])

        corr = CounterMetricFamily(
            P + "flows_correlation", "Inter-node flows by correlation outcome: correlated (both halves met in "
            "time), late (met after the lone half was exported), uncorrelated (exported alone).", labels=["outcome"])
        corr.add_metric(["correlated"], agg["flows_correlated"])
        corr.add_metric(["late"], agg["flows_late_correlated"])
        corr.add_metric(["uncorrelated"], agg["flows_uncorrelated"])
        yield corr

        removed = CounterMetricFamily(P + "flows_removed", "Flows removed from the store, by why.", labels=["reason"])
        removed.add_metric(["ended"], agg["flows_ended"])
        removed.add_metric(["inactive"], agg["flows_expired"])
        yield removed
        yield CounterMetricFamily(
            P + "tuple_reuses", "Records whose totals went backwards: the 5-tuple was reused by a new connection.",
            value=agg["counter_resets"])

        dropped = CounterMetricFamily(
            P + "records_dropped", "Records dropped, by reason (flow_cap, invalid_record, stale_record, "
            "malformed_message, sink_queue_full, sink_error, flow_bytes).", labels=["reason"])
        dropped.add_metric(["flow_cap"], agg["dropped_flow_cap"])
        dropped.add_metric(["flow_bytes"], agg.get("dropped_flow_bytes", 0))
        dropped.add_metric(["invalid_record"], agg["dropped_invalid"])
        dropped.add_metric(["stale_record"], agg["dropped_stale"])
        dropped.add_metric(["malformed_message"], s.get("malformed_messages", 0))
        dropped.add_metric(["sink_queue_full"], sum(st["dropped"] for st in s["sinks"].values()))
        dropped.add_metric(["sink_error"], sum(st["failed"] for st in s["sinks"].values()))
        yield dropped

        sink_dropped = CounterMetricFamily(
            P + "sink_records_dropped", "Records a sink lost, by sink and reason.", labels=["sink", "reason"])
        queued = GaugeMetricFamily(P + "sink_queue_length", "Records waiting in each sink's queue.", labels=["sink"])
        for name, st in sorted(s["sinks"].items()):
            sink_dropped.add_metric([name, "queue_full"], st["dropped"])
            sink_dropped.add_metric([name, "error"], st["failed"])
            queued.add_metric([name], st["queued"])
        yield sink_dropped
        yield queued

        coll = s.get("collecting") or {}
        if coll:
            yield CounterMetricFamily(
                P + "records_lost", "Records the agents' sequence numbers say never arrived (sanity-checked: "
                "implausible jumps are counted in sequence_jumps instead).", value=coll.get("lost_records", 0))
            yield CounterMetricFamily(P + "sequence_jumps", "Implausible IPFIX sequence numbers, resynchronised on.",
                                      value=coll.get("sequence_jumps", 0))
            yield GaugeMetricFamily(P + "sessions", "IPFIX transport sessions open now.", value=coll.get("sessions", 0))
            refused = CounterMetricFamily(
                P + "sessions_refused", "IPFIX connections or sessions refused, by the limit that refused them.",
                labels=["limit"])
            for label, key in (("max_sessions", "sessions_refused"), ("per_source", "sessions_refused_source"),
                               ("pending_handshakes", "handshakes_refused"), ("tls", "tls_refused"),
                               ("handshake_timeout", "handshakes_timed_out")):
                refused.add_metric([label], coll.get(key, 0))
            yield refused
            limits = CounterMetricFamily(
                P + "collecting_limits", "Times a peer met a bound of the collecting process.", labels=["bound"])
            for key in ("templates_refused", "domains_evicted", "messages_deferred", "messages_abandoned",
                        "sessions_evicted", "sessions_expired", "templates_expired", "malformed"):
                limits.add_metric([key], coll.get(key, 0))
            yield limits
        api = s.get("api") or {}
        if api:
            api_family = CounterMetricFamily(
                P + "api_requests_refused", "HTTP API requests or clients refused, by why.", labels=["reason"])
            api_family.add_metric(["busy"], api.get("busy", 0))
            api_family.add_metric(["connections"], api.get("connectionsRefused", 0))
            api_family.add_metric(["write_timeout"], api.get("writeTimeouts", 0))
            yield api_family


def make_registry(snapshot: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AggregatorCollector(snapshot))
    return registry
