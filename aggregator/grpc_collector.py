"""The Flow Aggregator's gRPC collecting side: Antrea agents' default transport since v2.4.

An Antrea Flow Exporter opens one client stream to ``FlowExportService.Export`` and sends
``ExportRequest`` batches of ``Flow`` messages over it, over mutual TLS (the same CA,
certificate and key as the IPFIX collecting process's TLS). :class:`GrpcCollectingProcess`
serves that service with grpcio's asyncio server; each flow becomes, through
:func:`flowscope.flowpb.flow_to_record`, the very record the same flow decodes to over
IPFIX, and goes to the same ``on_records`` callback the aggregator feeds its
aggregation from, so both transports yield the same aggregated records. The exporter is
named by its address (IPv4-mapped IPv6 as IPv4, as for IPFIX) and each flow's
observation domain comes from its ``ipfix.observation_domain_id``.

A message that is no flow (no IP version, addresses of a wrong size) is counted in
``malformed`` and skipped; the stream and the other flows of the batch go on. A client
without a certificate signed by the CA never gets past the TLS handshake.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import grpc

from flowscope.flowpb import flow_pb2, flow_pb2_grpc, flow_to_record

__all__ = ["GrpcCollectingProcess", "GrpcCollectorStats", "peer_host"]

log = logging.getLogger("flowscope.aggregator.grpc")

OnRecords = Callable[[Sequence[dict[str, Any]], str, int], None]


@dataclass(slots=True)
class GrpcCollectorStats:
    messages: int = 0  # ExportRequest batches received
    records: int = 0  # flows turned into records
    malformed: int = 0  # flows that were not flows
    sessions: int = 0  # Export streams open now
    sessions_total: int = 0
    callback_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string: ``ipv4:10.0.0.5:5000``, ``ipv6:[fd00::5]:5000``."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]")
        return host[7:] if host.startswith("::ffff:") and "." in host else host
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return rest or peer


class _Service(flow_pb2_grpc.FlowExportServiceServicer):
    def __init__(self, owner: GrpcCollectingProcess) -> None:
        self.owner = owner

    async def Export(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802 - the RPC's name
        owner = self.owner
        host = peer_host(context.peer())
        stats = owner.stats
        stats.sessions += 1
        stats.sessions_total += 1
        owner.open_peers[host] = owner.open_peers.get(host, 0) + 1
        try:
            async for request in request_iterator:
                stats.messages += 1
                by_domain: dict[int, list[dict[str, Any]]] = {}
                for flow in request.flows:
                    try:
                        rec = flow_to_record(flow)
                    except (ValueError, TypeError) as exc:
                        stats.malformed += 1
                        log.warning("a flow from %s is not a flow (%s): skipped", host, exc)
                        continue
                    by_domain.setdefault(flow.ipfix.observation_domain_id, []).append(rec)
                for domain, records in by_domain.items():
                    stats.records += len(records)
                    try:
                        owner.on_records(records, host, domain)
                    except Exception:  # noqa: BLE001 - a bug in the consumer must not end the stream
                        stats.callback_errors += 1
                        log.exception("on_records failed for flows from %s", host)
        finally:
            stats.sessions -= 1
            owner.open_peers[host] -= 1
            if not owner.open_peers[host]:
                del owner.open_peers[host]
        return flow_pb2.ExportResponse()


class GrpcCollectingProcess:
    """Serves FlowExportService on ``host:port`` over mutual TLS; ``port`` 0 picks one."""

    def __init__(self, host: str, port: int, *, cert: str, key: str, ca: str, on_records: OnRecords) -> None:
        self.host, self.requested_port = host, port
        self.on_records = on_records
        self.stats = GrpcCollectorStats()
        self.open_peers: dict[str, int] = {}
        try:
            with open(key, "rb") as k, open(cert, "rb") as c, open(ca, "rb") as a:
                self._creds = grpc.ssl_server_credentials([(k.read(), c.read())], root_certificates=a.read(),
                                                          require_client_auth=True)
        except OSError as exc:
            raise ValueError(f"cannot read the TLS files for gRPC ({exc.filename}): {exc.strerror}") from None
        self._server: Any = None
        self.port = 0

    async def start(self) -> None:
        server = grpc.aio.server()
        flow_pb2_grpc.add_FlowExportServiceServicer_to_server(_Service(self), server)
        target = f"[{self.host}]:{self.requested_port}" if ":" in self.host else f"{self.host}:{self.requested_port}"
        try:
            self.port = server.add_secure_port(target, self._creds)
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {target}: {exc}") from None
        if not self.port:
            raise OSError(f"cannot listen for gRPC on {target}")
        await server.start()
        self._server = server
        log.info("gRPC collecting process (FlowExportService) listening on %s (port %d)", target, self.port)

    @property
    def peers(self) -> list[str]:
        """Exporters with an Export stream open now."""
        return list(self.open_peers)

    async def close(self, drain: float = 1.0) -> None:
        """Stop taking streams; those open get ``drain`` seconds (gRPC's grace) to finish."""
        if self._server is not None:
            await self._server.stop(grace=drain)
            self._server = None
