"""How fast the dashboards load on a big store: each page over HTTP and in headless
Chromium, on a chDB store of N flows (default 10M), beside a peer measured in the same run.

The store is generated once by the store's benchmark generator (benchmarks/store_queries.py:
5,000 Pods in 50 namespaces on 50 Nodes, 200 Services, 100 network policies, a day of
history ending now, a few percent of the pairs denied), written block by block through
the store's own insert; a directory given with ``--store`` is reused when it already
holds N rows.

Measured, in the same run, for the last hour and the last day:

* ``http``: each dashboard as the page asks for it now, one request (``/ui/v1/page``) that
  the server answers panel by panel as each is ready; the wall time until the last line
  (median and p95 of ``--rounds``), and the questions the page sent to the store;
* ``http_panels``: the same page asked as separate panel requests sent concurrently
  (``/ui/v1/<panel>``, what the page did before);
* ``chromium``: Chromium (Debian's, through playwright) opening each dashboard until every
  chart has drawn its data (the page's ``data-loaded`` mark, set one animation frame after
  the last chart's data, looked for at every animation frame), median of ``--rounds``, with
  where the time went (``parts_median_ms``: the script ready, the page's request asked and
  answered, the first panel, drawing, and around the page's clock the navigation's start
  after ``goto`` and the mark's being seen);
* the peer: with ``--peer-ref REV``, the dashboards' code of that git revision
  (collector/ui/ as it was, over today's query layer) served from the same process on
  another port and measured the same way, round for round alternating with the current
  code (``peer_http``, ``peer_chromium``); with ``--raw``, the panels computed in-process
  from the raw table (``source=raw``), what the roll-ups are worth.

Target (issue 9): a dashboard at 10M stored flows loads in under a second.

    .venv/bin/python benchmarks/ui_dashboards.py [--flows 10000000] [--store DIR] [--rounds 5] [--peer-ref REV]

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


# --------------------------------------------------------------------------- the peer


def peer_package(ref: str) -> Any:
    """collector/ui/ of git revision ``ref``, importable as its own package (``flowscope_peer_ui``)
    beside today's: its app, dashboards and static files; ECharts from today's vendor dir."""
    import importlib
    import subprocess
    import sys
    import tempfile

    repo = Path(__file__).resolve().parents[1]
    root = Path(tempfile.mkdtemp(prefix="flowscope-ui-peer-"))
    pkg = root / "flowscope_peer_ui"
    names = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only", ref, "collector/ui"],
                           check=True, capture_output=True, text=True).stdout.split()
    for name in names:
        out = pkg / Path(name).relative_to("collector/ui")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(subprocess.run(["git", "-C", str(repo), "show", f"{ref}:{name}"], check=True,
                                       capture_output=True).stdout)
    (pkg / "static" / "vendor").symlink_to(repo / "collector" / "ui" / "static" / "vendor")
    sys.path.insert(0, str(root))
    return importlib.import_module("flowscope_peer_ui.app"), importlib.import_module("flowscope_peer_ui.dashboards")


# --------------------------------------------------------------------------- measuring


def _stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"median_ms": round(statistics.median(s) * 1000, 1),
            "p95_ms": round(s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))] * 1000, 1)}


def _serve(apps: list[Any], ports: list[int], ready: threading.Event, stop: threading.Event) -> None:
    from aiohttp import web

    async def main() -> None:
        runners = []
        for app in apps:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
            runners.append(runner)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.2)
        for runner in runners:
            await runner.cleanup()

    asyncio.run(main())


async def _page_one_request(base: str, page: str, since: str) -> float:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        async with session.get(f"{base}ui/v1/page", params={"d": page, "since": since}) as resp:
            lines = (await resp.read()).splitlines()
            assert resp.status == 200, (page, lines[:3])
        elapsed = time.perf_counter() - t0
        for line in lines:
            assert "error" not in json.loads(line), (page, line[:300])
        return elapsed


async def _page_panels(base: str, pages: dict[str, Any], page: str, since: str) -> float:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async def one(panel: str, params: dict[str, str]) -> None:
            async with session.get(f"{base}ui/v1/{panel}", params={"since": since, **params}) as resp:
                body = await resp.read()
                assert resp.status == 200, (panel, params, body[:300])

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p, q) for p, q in pages[page]))
        return time.perf_counter() - t0


def _since(span: str, i: int) -> str:
    """The ``i``-th variant of a range: one alignment unit longer per step (minutes for 1h,
    hours for 24h), so no two rounds ask the same question (nor meet an earlier answer
    the previous code kept for a few seconds)."""
    return f"{60 + i}m" if span == "1h" else f"{24 + i}h"


def _page_inprocess(dash: Any, page: str, since: str) -> float:
    t0 = time.perf_counter()
    for panel, params in PAGES[page]:
        getattr(dash, panel)({"since": since, **params})
    return time.perf_counter() - t0


def _questions(dash: Any, page: str, since: str) -> int:
    """How many questions one load of ``page`` sends to the store (its panels sharing them)."""
    from flowscope.collector.ui.dashboards import page_panels

    scope = dash.scoped()
    for panel, params in page_panels({"d": page, "since": since}):
        getattr(scope, panel)(params)
    return int(scope.asked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=10_000_000)
    ap.add_argument("--store", help="a chDB directory (kept; reused when it holds --flows rows)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--peer-ref", metavar="REV", help="also serve collector/ui/ of this git revision and measure it")
    ap.add_argument("--raw", action="store_true", help="also compute the pages from the raw table (slow)")
    ap.add_argument("--pages", default=",".join(PAGES), help="the dashboards to measure (comma-separated)")
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

    from flowscope.collector.ui.app import build_app
    from flowscope.collector.ui.dashboards import Dashboards

    pages = [p for p in args.pages.split(",") if p]
    clock = lambda: float(now)  # noqa: E731
    apps = [build_app(store, now=clock)]
    peer_pages = None
    if args.peer_ref:
        peer_app, peer_dash = peer_package(args.peer_ref)
        apps.append(peer_app.build_app(store, now=clock))
        peer_pages = peer_dash.PAGES
        result["peer_ref"] = args.peer_ref
    ports: list[int] = []
    ready, stop = threading.Event(), threading.Event()
    server = threading.Thread(target=_serve, args=(apps, ports, ready, stop), daemon=True)
    server.start()
    ready.wait(30)
    base = f"http://127.0.0.1:{ports[0]}/"
    peer_base = f"http://127.0.0.1:{ports[1]}/" if args.peer_ref else None
    dash = Dashboards(store, now=clock)
    raw = Dashboards(store, source="raw", now=clock)
    out: dict[str, dict[str, Any]] = {k: {} for k in ("http", "http_panels", "peer_http", "raw_in_process",
                                                       "questions")}
    try:
        for span in ("1h", "24h"):
            for page in pages:
                key = f"{page}@{span}"
                asyncio.run(_page_one_request(base, page, _since(span, 0)))  # warm
                if peer_base:
                    asyncio.run(_page_panels(peer_base, peer_pages, page, _since(span, 0)))
                ours, panels, theirs = [], [], []
                for i in range(1, args.rounds + 1):  # alternating, so both meet the same load
                    ours.append(asyncio.run(_page_one_request(base, page, _since(span, i))))
                    panels.append(asyncio.run(_page_panels(base, PAGES, page, _since(span, i))))
                    if peer_base:
                        theirs.append(asyncio.run(_page_panels(peer_base, peer_pages, page, _since(span, i))))
                out["http"][key] = _stats(ours)
                out["http_panels"][key] = _stats(panels)
                if theirs:
                    out["peer_http"][key] = _stats(theirs)
                out["questions"][key] = _questions(dash, page, _since(span, 99))
                if args.raw:
                    samples = [_page_inprocess(raw, page, _since(span, 1 + i)) for i in range(2)]
                    out["raw_in_process"][key] = _stats(samples)
        result.update({k: v for k, v in out.items() if v})
        if not args.no_browser:
            result["chromium"], peer = _browser(base, peer_base, pages, args.rounds)
            if peer:
                result["peer_chromium"] = peer
        if peer_base:
            result["ratio_peer_to_ours"] = {
                what: {k: round(result[f"peer_{what}"][k]["median_ms"] / max(result[what][k]["median_ms"], 0.1), 2)
                       for k in result[what]} for what in ("http", "chromium") if f"peer_{what}" in result}
    finally:
        stop.set()
        server.join(10)
    print(json.dumps(result, indent=1), flush=True)  # before chDB's session closes (it owns the process's fds)
    store.close()


def _browser(base: str, peer_base: str | None, pages: list[str], rounds: int
             ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    from playwright.sync_api import sync_playwright

    ours: dict[str, dict[str, Any]] = {}
    theirs: dict[str, dict[str, Any]] = {}
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        tabs = {"ours": b.new_page(viewport={"width": 1440, "height": 1000})}
        if peer_base:
            tabs["peer"] = b.new_page(viewport={"width": 1440, "height": 1000})
        errors: list[str] = []
        for tab in tabs.values():
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

        wall: dict[str, float] = {}

        def load(tab: Any, url: str) -> float:
            wall["asked"] = time.time()
            t0 = time.perf_counter()
            tab.goto(url)
            # Looked for at every animation frame: wait_for_selector retries at growing intervals
            # (up to 500 ms apart), which added up to half a second after the mark was set.
            tab.wait_for_function("() => document.querySelector('main[data-loaded]') !== null", polling="raf",
                                  timeout=60_000)
            elapsed = time.perf_counter() - t0
            wall["seen"] = time.time()
            return elapsed

        def parts(tab: Any) -> dict[str, float]:
            """Where the current code's page load went (its performance.measure marks), in seconds."""
            got = tab.evaluate("""() => {
                const nav = performance.getEntriesByType("navigation")[0];
                const m = (p) => performance.getEntriesByType("measure").filter((e) => e.name.startsWith(p));
                const sum = (es) => es.reduce((a, e) => a + e.duration, 0);
                const page = performance.getEntriesByType("resource").filter((e) => e.name.includes("ui/v1/page"))[0];
                return { script_ready: nav.domContentLoadedEventEnd, data: sum(m("flowscope:data")),
                         page_asked: page ? page.startTime : 0, page_first_byte: page ? page.responseStart : 0,
                         page_last_byte: page ? page.responseEnd : 0, time_origin: performance.timeOrigin,
                         loaded_mark: Math.max(...m("flowscope:painted").map((e) => e.startTime + e.duration)),
                         first_panel: Math.min(...m("flowscope:arrived").map((e) => e.duration)),
                         js_show: sum(m("flowscope:show")), paint: sum(m("flowscope:painted")),
                         answer_bytes: performance.getEntriesByType("resource")
                           .filter((e) => e.name.includes("ui/v1/page")).reduce((a, e) => a + e.encodedBodySize, 0) };
            }""")
            out = {k: float(v) / (1 if k == "answer_bytes" else 1000) for k, v in got.items()}
            # around the page's own clock: from goto until the navigation began (the last page's
            # unloading, the browser's start of the request), and from the page's loaded mark
            # until playwright saw it
            origin, loaded = out.pop("time_origin"), out.pop("loaded_mark")  # epoch seconds, seconds after it
            out["navigation_after_goto"] = origin - wall["asked"]
            out["seen_after_loaded_mark"] = wall["seen"] - (origin + loaded)
            return out

        for span in ("1h", "24h"):
            for view in pages:
                samples: dict[str, list[float]] = {k: [] for k in tabs}
                split: dict[str, list[float]] = {}
                for i in range(rounds + 1):
                    for name, tab in tabs.items():  # alternating, so both meet the same load
                        root = base if name == "ours" else peer_base
                        t = load(tab, f"{root}?d={view}&since={_since(span, 10 + i)}&refresh=0")
                        if i:  # the first load warms the browser's cache of the script and ECharts
                            samples[name].append(t)
                            if name == "ours":
                                for k, v in parts(tab).items():
                                    split.setdefault(k, []).append(v)
                ours[f"{view}@{span}"] = {**_stats(samples["ours"]), "parts_median_ms": {
                    k: round(statistics.median(v) * (1 if k == "answer_bytes" else 1000), 1) for k, v in split.items()}}
                if "peer" in samples:
                    theirs[f"{view}@{span}"] = _stats(samples["peer"])
        b.close()
        assert not errors, errors[:5]
    return ours, theirs


if __name__ == "__main__":
    main()
