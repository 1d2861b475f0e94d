"""A whole dashboard in one request (``/ui/v1/page``), on a real chDB store: every panel of
every page answers what its own panel request answers, questions two panels share reach
the store once, a panel is sent as soon as it is ready (a slow one does not hold back the
others), and bad page parameters are refused up front, by name, before anything runs.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from ui_cluster import BrokenStore, filled_store, ui_client

from flowscope.collector.ui import dashboards as dash_module
from flowscope.collector.ui.dashboards import PAGES, Dashboards, page_panels


@pytest.fixture(scope="module")
def store():
    yield from filled_store()


def _lines(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(x) for x in body.splitlines()]


async def test_every_page_answers_what_its_panels_answer_one_by_one(store) -> None:
    client = await ui_client(store)
    try:
        for page in PAGES:
            resp = await client.get("/ui/v1/page", params={"d": page, "since": "15m"})
            assert resp.status == 200 and resp.content_type == "application/x-ndjson"
            lines = _lines(await resp.read())
            assert sorted(x["i"] for x in lines) == list(range(len(PAGES[page])))
            for line in lines:
                panel, params = PAGES[page][line["i"]]
                assert line["panel"] == panel and "error" not in line, line
                alone = await client.get(f"/ui/v1/{panel}", params={"since": "15m", **params})
                assert alone.status == 200
                assert line["data"] == await alone.json(), (page, panel, params)
        # the page's range, filter and page number reach its panels
        resp = await client.get("/ui/v1/page", params={"d": "flows", "since": "15m", "filter": "action = drop",
                                                       "page": "2"})
        (records,) = [x for x in _lines(await resp.read()) if x["panel"] == "flows"]
        assert records["data"]["page"] == 2 and records["data"]["total"] == 40  # the denied connection's records
    finally:
        await client.close()


def test_panels_of_a_page_share_the_questions_they_ask_alike(store) -> None:
    dash = Dashboards(store)
    for page, shared in (("pod-to-pod", True), ("nodes", True), ("overview", False)):
        scope = dash.scoped()
        alone = 0
        for panel, params in page_panels({"d": page, "since": "15m"}):
            getattr(scope, panel)(params)
            one = dash.scoped()
            getattr(one, panel)(params)
            alone += one.asked
        assert scope.asked <= alone
        if shared:  # the Tx and Rx sankeys read one GROUP BY; so do the two heatmaps
            assert scope.asked < alone, (page, scope.asked, alone)
    # a scope keeps nothing for the next request: a new one asks again
    first, second = dash.scoped(), dash.scoped()
    first.summary({"since": "15m"})
    second.summary({"since": "15m"})
    assert first.asked == second.asked > 0


async def test_a_panel_is_sent_when_ready_and_a_slow_one_holds_back_nothing(store, monkeypatch) -> None:
    release = threading.Event()
    slow = dash_module.Dashboards.flows

    def held_flows(self: Dashboards, params: dict[str, str]) -> dict[str, Any]:
        assert release.wait(30)
        return slow(self, params)

    monkeypatch.setattr(dash_module.Dashboards, "flows", held_flows)
    client = await ui_client(store)
    try:
        resp = await client.get("/ui/v1/page", params={"d": "flows", "since": "15m"})
        assert resp.status == 200
        first = json.loads(await asyncio.wait_for(resp.content.readline(), 30))
        assert first["panel"] == "series" and first["data"]["series"]  # while the records table still waits
        release.set()
        second = json.loads(await asyncio.wait_for(resp.content.readline(), 30))
        assert second["panel"] == "flows" and second["data"]["rows"]
        assert await resp.content.read() == b""
    finally:
        release.set()
        await client.close()


@pytest.mark.parametrize(("params", "field", "words"), [
    ({"d": "nope"}, "d", "is not one of overview"),
    ({}, "d", "is not one of"),
    ({"d": "overview", "scope": "denied"}, "scope", "not a parameter of a page"),
    ({"d": "overview", "metric": "flows"}, "metric", "not a parameter of a page"),
    ({"d": "overview", "filter": "namespace = x;"}, "filter", ""),
    ({"d": "overview", "since": "-5m"}, "since", ""),
    ({"d": "policy", "ingressPolicyName": "a/b"}, "ingressPolicyName", "is not a Kubernetes name"),
    ({"d": "flows", "page": "0"}, "page", "is not a whole number"),
])
async def test_bad_page_parameters_are_refused_by_name_before_anything_runs(store, params, field, words) -> None:
    client = await ui_client(store)
    try:
        resp = await client.get("/ui/v1/page", params={"since": "15m", **params})
        body = await resp.json()
        assert resp.status == 400 and body["field"] == field and words in body["error"], body
        twice = await client.get("/ui/v1/page?d=overview&since=15m&since=1h")
        assert twice.status == 400 and (await twice.json())["field"] == "since"
    finally:
        await client.close()


def test_in_chromium_every_page_draws_from_one_request_and_a_policy_link_asks_its_pod_pairs(store) -> None:
    from playwright.sync_api import sync_playwright
    from served_app import served

    from conftest import require_tool
    from flowscope.collector.ui.app import build_app
    from ui_cluster import NOW

    require_tool("chromium")
    shots = Path(__file__).resolve().parents[2] / "out" / "ui-screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with served(lambda: build_app(store, now=lambda: float(NOW))) as base:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            page = b.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            asked: list[str] = []
            page.on("request", lambda r: asked.append(r.url) if "/ui/v1/" in r.url else None)
            for view in PAGES:
                asked.clear()
                page.goto(f"{base}/?d={view}&since=15m&refresh=0")
                page.wait_for_selector("main[data-loaded]", state="attached", timeout=30_000)
                assert [u.split("?")[0].rsplit("/", 1)[1] for u in asked] == ["page"], asked
                assert page.text_content("#status").startswith(page.title().split(" \u00b7 ")[0]), \
                    page.text_content("#status")
                drawn = page.eval_on_selector_all("[data-chart]", "els => els.map(e => e.dataset.ready)")
                assert drawn and all(d == "1" for d in drawn), (view, drawn)
                page.screenshot(path=str(shots / f"page-{view}.png"), full_page=True)
            # the denied link's tooltip: its Pod pairs, asked when it opens
            page.goto(f"{base}/?d=policy&since=15m&refresh=0")
            page.wait_for_selector("main[data-loaded]", state="attached", timeout=30_000)
            asked.clear()
            # hover the middle of the denied link (where ECharts laid it out)
            x, y = page.evaluate("""() => {
                const div = document.querySelector("[data-chart^='sankey:policy']");
                const series = echarts.getInstanceByDom(div).getModel().getSeriesByIndex(0);
                let edge = null;
                series.getGraph().eachEdge((e) => { if (!edge && e.getModel().get("denied")) edge = e; });
                const s = edge.node1.getLayout(), t = edge.node2.getLayout(), l = edge.getLayout();
                const r = div.getBoundingClientRect(), box = series.layoutInfo;
                return [r.left + box.x + (s.x + s.dx + t.x) / 2,
                        r.top + box.y + (s.y + l.sy + l.dy / 2 + t.y + l.ty + l.dy / 2) / 2];
            }""")
            page.mouse.move(x - 4, y)
            page.mouse.move(x, y)
            page.wait_for_function("""() => [...document.querySelectorAll("div")].some((d) =>
                d.textContent.includes("shop/frontend-6d4f8 \u2192 data/db-0") && d.textContent.includes("Drop"))""",
                                   timeout=15_000)
            assert [u for u in asked if "/ui/v1/pairs" in u and "egress=shop%2Ffrontend-egress" in u], asked
            assert len(asked) == 1, asked  # hovered twice, asked once
            tip = page.evaluate("""() => [...document.querySelectorAll("div")].map((d) => d.textContent)
                .filter((t) => t.startsWith("shop/frontend-egress \u2192"))[0]""")
            assert tip.startswith("shop/frontend-egress \u2192 data/db-from-backend-only: 2.40 kB"), tip  # its bytes, not the floored width
            # the link's bytes and its one Pod pair's (the same 2,400 bytes) in the one format
            assert "shop/frontend-6d4f8 \u2192 data/db-0: 2.40 kB, 40 records (egress Allow, ingress Drop)" in tip, tip
            page.screenshot(path=str(shots / "page-policy-link-tooltip.png"))
            b.close()
    assert not errors, errors


async def test_a_store_that_fails_is_said_in_each_panel_line_and_the_server_keeps_serving(store) -> None:
    client = await ui_client(BrokenStore(store), api=False)
    try:
        resp = await client.get("/ui/v1/page", params={"d": "overview", "since": "15m"})
        lines = _lines(await resp.read())
        assert resp.status == 200 and len(lines) == len(PAGES["overview"])
        assert all(x["status"] == 503 and x["field"] == "store" and "went away" in x["error"] for x in lines)
        # a policy namespace is resolved from the store up front: its failure is the page's 503
        resp = await client.get("/ui/v1/page", params={"d": "policy", "since": "15m", "ingressPolicyNamespace": "a"})
        assert resp.status == 503 and "went away" in (await resp.json())["error"]
        assert (await client.get("/healthz")).status == 200
    finally:
        await client.close()
