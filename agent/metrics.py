"""The agent's Prometheus metrics, on their own registry, served over HTTP.

The four connection metrics of the Antrea design keep their meaning under the
flowscope prefix (antrea_agent_conntrack_total_connection_count becomes
flowscope_agent_conntrack_total_connection_count, and so on); the rest say what the
exporter did: records exported and dropped, reconnections, connections the store could
not hold, and how long a poll cycle takes; per destination (label ``destination``: the
main one is ``main``) records exported and dropped and whether it is connected; and what
the conntrack events did: events read, events lost (netlink buffer overruns), and how
many connections ended with the kernel's final counters or, without an event, with the
last poll's.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["AgentMetrics"]


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.conntrack_total = Gauge(
            "flowscope_agent_conntrack_total_connection_count",
            "Connections in the conntrack table at the last poll (all zones)", registry=r)
        self.tracked = Gauge(
            "flowscope_agent_conntrack_connection_count",
            "Connections held by the agent's connection store", registry=r)
        self.denied = Gauge(
            "flowscope_agent_denied_connection_count",
            "Connections exported as denied by a NetworkPolicy since the agent started", registry=r)
        self.conntrack_max = Gauge(
            "flowscope_agent_conntrack_max_connection_count",
            "The conntrack table's size limit (nf_conntrack_max)", registry=r)
        self.reconnections = Gauge(
            "flowscope_agent_exporter_reconnections",
            "Times the exporting process reconnected to the collector", registry=r)
        self.records_exported = Counter(
            "flowscope_agent_records_exported",
            "Flow records handed to the exporting process", registry=r)
        self.records_dropped = Gauge(
            "flowscope_agent_records_dropped",
            "Flow records dropped because the export backlog was full", registry=r)
        self.records_lost = Gauge(
            "flowscope_agent_records_lost",
            "Flow records still in the send buffer when a connection to the collector broke", registry=r)
        self.connections_dropped = Gauge(
            "flowscope_agent_connections_dropped",
            "New connections not tracked because the store was at maxConnections", registry=r)
        self.host_flows_skipped = Gauge(
            "flowscope_agent_host_flow_records_skipped",
            "Records not exported because neither end is a Pod (exportHostFlows: false)", registry=r)
        self.exporter_connected = Gauge(
            "flowscope_agent_exporter_connected", "1 while the collector connection is up", registry=r)
        self.poll_errors = Counter(
            "flowscope_agent_poll_errors", "Poll cycles that failed to dump conntrack", registry=r)
        self.destination_records_exported = Counter(
            "flowscope_agent_destination_records_exported",
            "Flow records handed to a destination's exporting process", ["destination"], registry=r)
        self.destination_records_dropped = Gauge(
            "flowscope_agent_destination_records_dropped",
            "Flow records a destination dropped (its backlog was full)", ["destination"], registry=r)
        self.destination_connected = Gauge(
            "flowscope_agent_destination_connected",
            "1 while the destination's collector connection is up", ["destination"], registry=r)
        self.events_received = Gauge(
            "flowscope_agent_conntrack_events",
            "Conntrack events read since the agent started", registry=r)
        self.events_overruns = Gauge(
            "flowscope_agent_conntrack_event_overruns",
            "Times the conntrack event socket overflowed (ENOBUFS): events were lost", registry=r)
        self.events_lost = Gauge(
            "flowscope_agent_conntrack_events_lost",
            "Conntrack events the kernel dropped for the agent's socket (netlink Drops) or the agent could not hold",
            registry=r)
        self.ended_by_event = Gauge(
            "flowscope_agent_connections_ended_by_event",
            "Connections exported at their end with the kernel's final counters (DESTROY events)", registry=r)
        self.ended_without_event = Gauge(
            "flowscope_agent_connections_ended_without_event",
            "Connections that left the table without an event (events lost or off): exported with the last "
            "poll's counters", registry=r)
        self.conntrack_early_drops = Gauge(
            "flowscope_agent_conntrack_early_drops",
            "Entries conntrack evicted because its table was full (conntrack -S early_drop)", registry=r)
        self.conntrack_insert_failed = Gauge(
            "flowscope_agent_conntrack_insert_failed",
            "Entries conntrack failed to insert (conntrack -S insert_failed)", registry=r)
        self.conntrack_drops = Gauge(
            "flowscope_agent_conntrack_drops",
            "Packets conntrack dropped for lack of an entry (conntrack -S drop)", registry=r)
        self.poll_duration = Histogram(
            "flowscope_agent_poll_duration_seconds",
            "Time of one poll cycle: dump, parse, store update, export decisions",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0), registry=r)

    def serve(self, host: str, port: int) -> object:  # pragma: no cover - thin wrapper
        """Start the /metrics HTTP server in a daemon thread; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
