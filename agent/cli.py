"""``flowscope agent``: run the Flow Exporter on this node.

Wiring only: read the configuration (a bad value stops here, with the key, the value
and what is allowed), switch conntrack accounting and events on, pick the metadata
source, start one exporting process per destination and the metrics endpoint, subscribe
to conntrack DESTROY events, then poll until SIGTERM or SIGINT, at which point every
live connection gets its final record (flowEndReason 4).
"""

from __future__ import annotations

import argparse
import logging
import sys
import zlib
from typing import Any

log = logging.getLogger("flowscope.agent")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "agent",
        help="run the Flow Exporter: conntrack -> connection store -> IPFIX",
        description="Poll the kernel's conntrack table, enrich connections with Kubernetes "
        "metadata and export them as IPFIX flow records.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="agent YAML configuration (docs/configuration.md)")
    p.add_argument("--check", action="store_true", help="validate the configuration and the metadata source, then exit")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run_agent)


def _metadata(cfg: Any) -> Any:
    from flowscope.agent.metadata import NoMetadata, StaticMetadata

    if cfg.metadata.source == "static":
        return StaticMetadata(cfg.metadata.static_file)
    if cfg.metadata.source == "kubernetes":
        from flowscope.agent.kube import KubernetesMetadata

        return KubernetesMetadata(node_name=cfg.node_name, watch_remote_pods=cfg.metadata.watch_remote_pods)
    return NoMetadata()


def run_agent(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from flowscope.agent.config import ConfigError, check_files, load_config
    from flowscope.agent.metadata import MetadataError

    try:
        cfg = load_config(args.config)
        check_files(cfg)  # --check checks what a real start reads
        metadata = _metadata(cfg)
    except (ConfigError, MetadataError) as exc:
        print(f"flowscope agent: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"configuration OK: node {cfg.node_name}, collector {cfg.flow_collector}, metadata {cfg.metadata.source}")
        return 0
    import asyncio

    return asyncio.run(_serve(cfg, metadata))


async def _serve(cfg: Any, metadata: Any) -> int:
    import asyncio
    import signal

    from flowscope.agent.conntrack import ConntrackError, NetlinkConntrack, enable_accounting
    from flowscope.agent.ctevents import ConntrackEvents, enable_events, table_statistics
    from flowscope.agent.exporter import Destination, FlowExporter, FlowFilter
    from flowscope.agent.metadata import Enricher, MetadataError
    from flowscope.agent.metrics import AgentMetrics
    from flowscope.agent.records import templates
    from flowscope.ipfix import UsageError
    from flowscope.ipfix.exporting import ExportingProcess
    from flowscope.ipfix.transport import TLSConfig

    tls = None
    if cfg.flow_collector.protocol == "tls":
        tls = TLSConfig(cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.ca_file, server_name=cfg.tls_server_name)
    # A stable observation domain per node, so the aggregator tells exporters apart.
    domain = zlib.crc32(cfg.node_name.encode()) & 0xFFFFFFFF
    try:
        if cfg.grpc:  # Antrea's Flow messages over gRPC, mutual TLS
            from flowscope.agent.grpc_exporter import GrpcExportingProcess

            try:
                sink: Any = GrpcExportingProcess(
                    cfg.flow_collector.host, cfg.flow_collector.port, cert=cfg.tls.cert_file, key=cfg.tls.key_file,
                    ca=cfg.tls.ca_file, server_name=cfg.tls.server_name, observation_domain_id=domain,
                    queue_size=cfg.export_queue_size,
                )
            except OSError as exc:
                raise UsageError(f"cannot read {exc.filename!r}: {exc.strerror}") from None
        else:
            sink = ExportingProcess(
                cfg.flow_collector, tls=tls, templates=templates(labels=cfg.pod_labels), observation_domain_id=domain,
                queue_size=cfg.export_queue_size,
            )
        extra = []
        for dc in cfg.destinations:
            dtls = None
            if dc.address.protocol == "tls":
                dtls = TLSConfig(cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.ca_file, server_name=dc.tls_server_name)
            dsink = ExportingProcess(
                dc.address, tls=dtls, templates=templates(labels=cfg.pod_labels), observation_domain_id=domain, queue_size=dc.queue_size,
            )
            f = dc.filter
            extra.append(Destination(
                dc.name, dsink, dc.active_timeout, dc.idle_timeout,
                FlowFilter(f.protocols, f.namespaces, f.flow_types, f.denied_only),
            ))
    except UsageError as exc:  # unreadable or mismatched certificate files
        print(f"flowscope agent: {exc} (keys tls.caFile, tls.certFile, tls.keyFile)", file=sys.stderr)
        return 2
    try:
        metadata.start()
    except MetadataError as exc:
        print(f"flowscope agent: {exc}", file=sys.stderr)
        return 2
    metrics = AgentMetrics()
    if cfg.metrics_address is not None:
        host, port = cfg.metrics_address
        try:
            metrics.serve(host, port)
        except OSError as exc:
            print(f"flowscope agent: metricsAddress: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
            return 2
        log.info("metrics on http://%s:%d/metrics", host, port)
    # Only now touch the node: the sysctls, then the netlink socket.
    enable_accounting()
    try:
        conntrack = NetlinkConntrack(cfg.conntrack_zones)
    except (ConntrackError, OSError) as exc:
        print(f"flowscope agent: cannot open the conntrack netlink socket: {exc}", file=sys.stderr)
        return 1
    events = None
    if cfg.conntrack_events.enabled and enable_events():
        try:
            # subscribed before the first dump, so that no ending falls between the two
            # between two polls it holds at most maxConnections events (about 400 bytes each)
            events = ConntrackEvents(
                cfg.conntrack_zones, buffer_size=cfg.conntrack_events.buffer_size, max_pending=cfg.max_connections,
            )
            events.start()
        except OSError as exc:
            log.warning(
                "cannot subscribe to conntrack events (%s): connections ending between polls get the last poll's "
                "counters; the agent runs on with the dump alone", exc,
            )
    wait_synced = getattr(metadata, "wait_synced", None)
    if wait_synced is not None:
        # Denials are judged when a connection is first seen: give the watches a moment
        # to list the policies first. The agent starts anyway if the API is slow.
        if not await asyncio.to_thread(wait_synced, 30.0):
            log.warning("Kubernetes metadata not fully listed after 30s; exporting meanwhile with what is known")
    # one connection attempt each, all at once: a slow or absent collector delays no other
    await asyncio.gather(sink.start(), *(d.sink.start() for d in extra))  # type: ignore[attr-defined]
    exporter = FlowExporter(
        conntrack=conntrack, sink=sink, enricher=Enricher(cfg.node_name, metadata, pod_labels=cfg.pod_labels),
        active_timeout=cfg.active_timeout, idle_timeout=cfg.idle_timeout, poll_interval=cfg.poll_interval,
        export_host_flows=cfg.export_host_flows,
        max_connections=cfg.max_connections, metrics=metrics, destinations=extra, events=events,
        table_statistics=table_statistics, wait_for_destroy=cfg.conntrack_events.wait_for_destroy,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "flow exporter on node %s: collector %s, poll %gs, active %gs, idle %gs, conntrack events %s",
        cfg.node_name, cfg.flow_collector, cfg.poll_interval, cfg.active_timeout, cfg.idle_timeout,
        "on" if events is not None else "off",
    )
    for dc in cfg.destinations:
        log.info("destination %s: %s, active %gs, idle %gs", dc.name, dc.address, dc.active_timeout, dc.idle_timeout)
    try:
        await exporter.run(stop)
    finally:
        metadata.close()
    return 0
