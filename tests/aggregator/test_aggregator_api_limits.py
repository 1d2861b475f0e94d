"""The API server's own bounds, in-process: 503 past maxClients (while /healthz still
answers), bearer tokens, and the rate-limited event-loop exception handler."""

from __future__ import annotations

import asyncio
import logging

from aiohttp.test_utils import TestClient, TestServer

from flowscope.aggregator.api import ApiServer, QuietExceptionHandler
from flowscope.webauth import WebAuth


class Backend:
    def __init__(self) -> None:
        self.gate = asyncio.Event()

    def select_flows(self, flt, limit):
        return list(range(200))

    def render_flows(self, flows):
        from flowscope.aggregator.aggregation import ExportedFlow

        return [ExportedFlow({"sourceTransportPort": f}, "intra-node", False) for f in flows]

    def record_metrics(self):
        return {"numFlows": 200}

    def prometheus(self):
        return b"# nothing\n"


async def test_past_max_clients_requests_get_503_and_health_still_answers():
    server = ApiServer(Backend(), max_clients=1)
    async with TestClient(TestServer(server.app())) as client:
        server._active = 1  # one request in progress
        busy = await client.get("/flowrecords")
        assert busy.status == 503 and "api.maxClients" in (await busy.json())["error"]
        assert (await client.get("/healthz")).status == 200
        server._active = 0
        doc = await (await client.get("/flowrecords")).json()
        assert [r["sourceTransportPort"] for r in doc["flowRecords"]] == list(range(200))
        assert server.stats.busy == 1


async def test_the_token_guards_everything_but_healthz():
    server = ApiServer(Backend(), auth=WebAuth(token="t" * 20))
    async with TestClient(TestServer(server.app())) as client:
        assert (await client.get("/recordmetrics")).status == 401
        assert (await client.get("/metrics")).status == 401
        assert (await client.get("/healthz")).status == 200
        ok = await client.get("/recordmetrics", headers={"Authorization": "Bearer " + "t" * 20})
        assert ok.status == 200


async def test_metrics_only_serves_no_flows_and_needs_no_token():
    server = ApiServer(Backend(), auth=WebAuth(token="t" * 20), metrics_only=True)
    async with TestClient(TestServer(server.app())) as client:
        assert (await client.get("/metrics")).status == 200
        assert (await client.get("/flowrecords")).status == 404


def test_loop_errors_are_logged_at_most_burst_per_window(caplog):
    now = [0.0]
    handler = QuietExceptionHandler(burst=3, window=10.0, clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for _ in range(1000):
                handler(loop, {"message": "socket.accept() out of system resource"})
        assert len([r for r in caplog.records if "accept" in r.getMessage()]) == 3
        assert handler.suppressed == 997 and handler.total == 1000
        now[0] = 11.0
        with caplog.at_level(logging.WARNING):
            handler(loop, {"message": "again"})
        assert any("997 more event loop errors" in r.getMessage() for r in caplog.records)
    finally:
        loop.close()
