"""How fast the dashboards answer on a big store: every panel of every page over HTTP, and
each page loaded in headless Chromium, on a chDB store of N flows (default 10M).

The store is generated once by the store's benchmark generator (benchmarks/store_queries.py:
5,000 Pods in 50 namespaces on 50 Nodes, 200 Services, 100 network policies, a day of
history ending now, a few percent of the pairs denied), written block by block through
the store's own insert; a directory given with ``--store`` is reused when it already
holds N rows.

Measured, in the same run:

* ``panels``: each dashboard's panel requests, sent concurrently as the page sends them,
  to the aiohttp application on loopback; the wall time until the last answers (median
  and p95 of ``--rounds``), for the last hour and the last day;
* ``peer_raw``: the same panels computed with the query layer forced to the raw table
  (``source=raw``) instead of the roll-ups it picks: what the roll-ups are worth;
* ``page_load``: Chromium (Debian's, through playwright) opening each dashboard until
  every panel has drawn (the page's own ``data-loaded`` mark), median of ``--rounds``.

Target (issue 9): a dashboard at 10M stored flows loads in under a second.

    .venv/bin/python benchmarks/ui_dashboards.py [--flows 10000000] [--store /var/tmp/fs-bench] [--rounds 5]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from flowscope.collector.schema import COLUMNS, rollup_tables
from flowscope.collector.ui.dashboards import PAGES
from flowscope.collector.store import open_store

CHUNK = 1_000_000
DAY = 86400


# --------------------------------------------------------------------------- the store


def fill(store: Any, flows: int, now: int) -> float:
    """The store helper's generated cluster (benchmarks/store_queries.py), block by block."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from store_queries import generate

    t0 = time.perf_counter()
    done = 0
    while done < flows:
        n = min(CHUNK, flows - done)
        cols = generate(n, now, seed=done)
        store.insert([cols[c.name] for c in COLUMNS])
        done += n
    store.execute(f"OPTIMIZE TABLE {store.qualified} FINAL")  # as the server's merges would, given time
    for name in rollup_tables(store.table):
        store.execute(f"OPTIMIZE TABLE `{store.database}`.`{name}` FINAL")
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- measuring


def _stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"median_ms": round(statistics.median(s) * 1000, 1),
            "p95_ms": round(s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))] * 1000, 1)}


def _serve(store: Any, port_box: list[int], ready: threading.Event, stop: threading.Event, now: int) -> None:
    from aiohttp import web

    from flowscope.collector.ui.app import build_app

    async def main() -> None:
        runner = web.AppRunner(build_app(store, now=lambda: float(now)), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_box.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.2)
        await runner.cleanup()

    asyncio.run(main())


async def _page_http(base: str, page: str, since: str) -> float:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async def one(panel: str, params: dict[str, str]) -> None:
            async with session.get(f"{base}ui/v1/{panel}", params={"since": since, **params}) as resp:
                body = await resp.read()
                assert resp.status == 200, (panel, params, body[:300])

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p, q) for p, q in PAGES[page]))
        return time.perf_counter() - t0


def _since(span: str, i: int) -> str:
    """The ``i``-th variant of a range: one alignment unit longer per step (minutes for 1h,
    hours for 24h), so no two rounds ask the same question."""
    return f"{60 + i}m" if span == "1h" else f"{24 + i}h"


def _page_inprocess(dash: Any, page: str, since: str) -> float:
    t0 = time.perf_counter()
    for panel, params in PAGES[page]:
        getattr(dash, panel)({"since": since, **params})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=10_000_000)
    ap.add_argument("--store", help="a chDB directory (kept; reused when it holds --flows rows)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args()

    import tempfile

    path = Path(args.store or tempfile.mkdtemp(prefix="flowscope-ui-bench-"))
    store = open_store(f"chdb://{path}")
    store.open()
    now = int(time.time())
    fill_s = None
    if store.count() != args.flows:
        store.execute(f"TRUNCATE TABLE {store.qualified}")
        for name in rollup_tables(store.table):
            store.execute(f"TRUNCATE TABLE `{store.database}`.`{name}`")
        fill_s = fill(store, args.flows, now)
    else:  # a reused store: its day of history ends when it was filled, and so do the pages' ranges
        now = int(store.select(f"SELECT max(toUInt32(timeInserted)) FROM {store.qualified}")[0][0])
    result: dict[str, Any] = {"flows": store.count(), "fill_seconds": round(fill_s, 1) if fill_s else "reused",
                              "disk_bytes_per_flow": round(store.disk_bytes() / max(store.count(), 1), 1),
                              "load_average_1m_at_start": round(os.getloadavg()[0], 1)}

    from flowscope.collector.ui.dashboards import Dashboards

    ranges = ("1h", "24h")
    panels: dict[str, dict[str, Any]] = {}
    peer: dict[str, dict[str, Any]] = {}
    port_box: list[int] = []
    ready, stop = threading.Event(), threading.Event()
    server = threading.Thread(target=_serve, args=(store, port_box, ready, stop, now), daemon=True)
    server.start()
    ready.wait(30)
    base = f"http://127.0.0.1:{port_box[0]}/"
    raw = Dashboards(store, source="raw", now=lambda: float(now))
    try:
        for since in ranges:
            for page in PAGES:
                # Each round asks a range one step longer than the last (the windows align to
                # minutes up to 6 h, to hours past): new questions, so the dashboards' few-second
                # memo of a page's repeated questions never answers a round.
                asyncio.run(_page_http(base, page, _since(since, 0)))  # warm
                samples = [asyncio.run(_page_http(base, page, _since(since, i))) for i in range(1, args.rounds + 1)]
                panels.setdefault(since, {})[page] = _stats(samples)
                samples = [_page_inprocess(raw, page, _since(since, 1 + i)) for i in range(max(2, args.rounds // 2))]  # its own memo
                peer.setdefault(since, {})[page] = _stats(samples)
        result["panels_http"] = panels
        result["peer_raw_table_in_process"] = peer
        result["ratio_peer_to_ui_24h"] = {
            p: round(peer["24h"][p]["median_ms"] / max(panels["24h"][p]["median_ms"], 0.1), 2) for p in PAGES}
        if not args.no_browser:
            result["page_load_chromium"] = _browser(base, args.rounds)
    finally:
        stop.set()
        server.join(10)
    print(json.dumps(result, indent=1), flush=True)  # before chDB's session closes (it owns the process's fds)
    store.close()


def _browser(base: str, rounds: int) -> dict[str, dict[str, float]]:
    from playwright.sync_api import sync_playwright

    out = {}
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = b.new_page(viewport={"width": 1440, "height": 1000})
        for since in ("1h", "24h"):
            for view in PAGES:
                samples = []
                for i in range(rounds + 1):
                    t0 = time.perf_counter()
                    page.goto(f"{base}?d={view}&since={_since(since, 10 + i)}&refresh=0")
                    page.wait_for_selector("main[data-loaded]", state="attached", timeout=60_000)
                    if i:  # the first load warms the browser's cache of the script and ECharts
                        samples.append(time.perf_counter() - t0)
                out[f"{view}@{since}"] = _stats(samples)
        b.close()
    return out


if __name__ == "__main__":
    main()
