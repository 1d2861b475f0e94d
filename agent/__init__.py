"""The Flow Exporter: one per node, conntrack -> connection store -> enriched IPFIX records (see docs/agent.md)."""
