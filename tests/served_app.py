"""An aiohttp application served on loopback from a thread of its own, for the tests whose
client is synchronous (a browser driven by playwright's sync API, a CLI in a subprocess)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from aiohttp import web


@contextmanager
def served(make_app: Callable[[], web.Application], poll: float = 0.05) -> Iterator[str]:
    """Serve the app ``make_app`` builds on 127.0.0.1 (a free port) until the block ends;
    yields its base URL, ``http://127.0.0.1:PORT``."""
    port: list[int] = []
    ready, stop = threading.Event(), threading.Event()

    async def main() -> None:
        runner = web.AppRunner(make_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(poll)
        await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(30), "the app did not start within 30 s"
        yield f"http://127.0.0.1:{port[0]}"
    finally:
        stop.set()
        thread.join(10)
