"""The agent's gRPC exporting process: Antrea's Flow messages to a Flow Aggregator over gRPC.

Since v2.4 Antrea's agents export to the Flow Aggregator over gRPC by default
(``flowCollectorAddr: HOST:14739:grpc``): one client stream to
``FlowExportService.Export`` carrying ``ExportRequest`` batches, over mutual TLS.
:class:`GrpcExportingProcess` does that for flowscope's agent, behind the same small
interface the Flow Exporter uses for the IPFIX :class:`~flowscope.ipfix.exporting.ExportingProcess`
(``start``, ``submit(template_id, records)``, ``flush``, ``close``, ``stats``), so the
exporter does not know which transport it feeds: each record becomes a ``Flow`` through
:func:`flowscope.flowpb.record_to_flow`.

``submit`` only queues (bounded, in records; a batch that does not fit is refused whole
and counted in ``records_dropped``). One sender task keeps a stream open and writes a
request per queued batch. A client stream is answered only when it ends, so a stream
that breaks takes with it what was written since it opened: those records are counted
in ``records_lost``, never as sent; the sender reconnects with exponential backoff
(1 s doubling to 60 s) while records wait in the queue. ``flush`` ends the stream
cleanly and waits for the aggregator's answer, which confirms everything written.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import grpc

from flowscope.flowpb import flow_pb2, flow_pb2_grpc, record_to_flow

__all__ = ["GrpcExportingProcess", "GrpcExporterStats"]

log = logging.getLogger("flowscope.agent.grpc")


@dataclass(slots=True)
class GrpcExporterStats:
    records_submitted: int = 0
    records_sent: int = 0  # written to a stream the aggregator then answered, or still open
    records_dropped: int = 0  # refused by a full queue, or still queued at close()
    records_lost: int = 0  # written to a stream that broke before its answer
    records_invalid: int = 0  # could not become a Flow message
    requests_sent: int = 0
    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    connected: bool = False
    queued: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


class GrpcExportingProcess:
    """Flow records to ``host:port`` over gRPC with mutual TLS (client cert, CA, server name)."""

    def __init__(
        self, host: str, port: int, *, cert: str, key: str, ca: str, server_name: str | None = None,
        observation_domain_id: int = 0, queue_size: int = 50_000, max_batch: int = 1000,
        backoff_initial: float = 1.0, backoff_max: float = 60.0, clock: Any = time.time,
    ) -> None:
        with open(key, "rb") as k, open(cert, "rb") as c, open(ca, "rb") as a:
            self._creds = grpc.ssl_channel_credentials(root_certificates=a.read(), private_key=k.read(),
                                                       certificate_chain=c.read())
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        self.observation_domain_id = observation_domain_id
        self.queue_size, self.max_batch = queue_size, max_batch
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.clock = clock
        self.stats = GrpcExporterStats()
        self._queue: collections.deque[list[dict[str, Any]]] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._flush_now = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._channel: Any = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"grpc-export-{self.target}")

    def submit(self, template_id: int, records: Sequence[dict[str, Any]]) -> bool:
        """Queue records (the template id is IPFIX's: unused here); False if they do not fit."""
        n = len(records)
        if not n:
            return True
        if self._closing or self.stats.queued + n > self.queue_size:
            self.stats.records_dropped += n
            return False
        self._queue.append(list(records))
        self.stats.queued += n
        self.stats.records_submitted += n
        self._idle.clear()
        self._wake.set()
        return True

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted was written and the aggregator answered its stream."""
        self._flush_now = True
        self._wake.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self) -> None:
        await self.flush(timeout=5.0)
        self._closing = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.stats.queued:
            self.stats.records_dropped += self.stats.queued
            self.stats.queued = 0
            self._queue.clear()
        if self._channel is not None:
            await self._channel.close()
        self.stats.connected = False

    def _take(self) -> list[Any]:
        flows: list[Any] = []
        export_time = int(self.clock())
        while self._queue and len(flows) < self.max_batch:
            batch = self._queue.popleft()
            self.stats.queued -= len(batch)
            for rec in batch:
                try:
                    flows.append(record_to_flow(rec, observation_domain_id=self.observation_domain_id,
                                                export_time=export_time))
                except (KeyError, ValueError, TypeError, OSError) as exc:
                    self.stats.records_invalid += 1
                    log.warning("record not exported to %s: %s", self.target, exc)
        return flows

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            if failures:
                await asyncio.sleep(min(self.backoff_max, self.backoff_initial * 2 ** (failures - 1)))
            written = 0
            try:
                if self._channel is None:
                    self._channel = grpc.aio.secure_channel(self.target, self._creds, options=self._options)
                call = flow_pb2_grpc.FlowExportServiceStub(self._channel).Export()
                self.stats.connects += 1
                if self.stats.connects > 1:
                    self.stats.reconnects += 1
                self.stats.connected = True
                while True:
                    flows = self._take()
                    if flows:
                        await call.write(flow_pb2.ExportRequest(flows=flows))
                        written += len(flows)
                        self.stats.records_sent += len(flows)
                        self.stats.requests_sent += 1
                        continue
                    if self._flush_now or self._closing:
                        break
                    self._wake.clear()
                    try:  # a quiet stream still ends now and then, so that its records are confirmed
                        await asyncio.wait_for(self._wake.wait(), timeout=5.0)
                    except asyncio.TimeoutError:
                        break
                await call.done_writing()
                await call  # the aggregator's answer: everything written arrived
                failures = 0
                self._flush_now = False
                if not self._queue:
                    self._idle.set()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                failures += 1
                self.stats.connected = False
                self.stats.connect_failures += 1
                self.stats.records_sent -= written
                self.stats.records_lost += written
                log.warning("gRPC export to %s failed (%s: %s)%s", self.target, exc.code().name, exc.details(),
                            f"; {written} records written to the broken stream are lost" if written else "")
