"""The Flow Aggregator: an IPFIX mediator that collects, correlates and aggregates agent records (see docs/aggregator.md)."""
