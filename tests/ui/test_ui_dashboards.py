"""The README's first command, with a browser on its dashboards while it runs.

One run of ``bash scripts/demo.sh --duration ...`` (setup, then ``flowscope demo``: the
netns cluster, real agents over mutual TLS, the aggregator, the collector with chDB and
the dashboards, steady traffic of every kind) serves every test here:

* headless Chromium (Debian's, driven by PyPI playwright) opens each dashboard and finds
  the lab's Pods, Service, external host, Nodes and policies in its charts, the denied
  connection on the Network Policy page, filters and time ranges narrowing what is shown,
  completion from the store, a flow's details, and no console error; a screenshot of
  every page is written to the directory the tests print;
* the dashboards' JSON answers exactly what ``flowscope flows --api`` prints for the same
  filter and range; hostile filter text is refused or stays text;
* Ctrl-C stops the demo, which prints the latest records (each carrying what was sent)
  and leaves nothing behind: no namespace of its lab, no process, no listening port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import require_root, require_tool

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "out" / "ui-screenshots"
DASHBOARDS = ["overview", "pod-to-pod", "pod-to-service", "pod-to-external", "flows", "nodes", "policy"]
PODS = ["shop/frontend-6d4f8", "shop/cache-0", "shop/backend-5c7b9", "data/db-0"]


class Demo:
    """The running demo: its process, what it printed, the dashboards' URL."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            ["bash", str(REPO / "scripts" / "demo.sh"), "--duration", "300s", "--ui", "127.0.0.1:0",
             "--workdir", str(workdir), "--json"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.url = ""
        self.suffix = ""
        self.started = time.time()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output)
            if m:
                return m
            if self.proc.poll() is not None:
                time.sleep(0.5)  # the reader's last lines
                m = re.search(pattern, self.output)
                if m:
                    return m
                raise AssertionError(f"the demo exited ({self.proc.returncode}) before {pattern!r}:\n"
                                     + self.output[-4000:])
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} after {timeout:g}s:\n{self.output[-4000:]}")

    def get(self, path: str, **params: str) -> tuple[int, object]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=15) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    require_root()
    require_tool("ip", "nft", "ss", "chromium")
    d = Demo(tmp_path_factory.mktemp("demo"))
    try:
        d.suffix = d.wait_for(r"network namespaces fsl-\*-([0-9a-f]+)", 120)[1]
        d.url = d.wait_for(r"dashboards: (http://127\.0\.0\.1:\d+/)", 180)[1]
        # Until the store holds every kind of connection of the plan, the denied one included.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            _, kinds = d.get("ui/v1/top", group="flowType", since="15m")
            _, denied = d.get("ui/v1/summary", since="15m", filter="action = drop")
            names = {r["name"] for r in kinds.get("rows", [])} if isinstance(kinds, dict) else set()
            if {"intra-node", "inter-node", "to-external"} <= names and denied.get("flows", 0) > 0:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"the store never held every kind of flow: {kinds}\n{d.output[-3000:]}")
        yield d
    finally:
        if d.proc.poll() is None:
            os.killpg(d.proc.pid, signal.SIGINT)
            try:
                d.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(d.proc.pid, signal.SIGKILL)
                d.proc.wait()


@pytest.fixture(scope="module")
def browser(demo):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots of the dashboards: {SHOTS}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium",
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = b.new_page(viewport={"width": 1440, "height": 1000})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.errors = errors  # type: ignore[attr-defined]
        yield page
        b.close()


def open_view(page, demo: Demo, **state: str) -> None:
    """Open a dashboard with ``state`` in its URL; wait until every panel has answered."""
    query = urllib.parse.urlencode({"refresh": "0", **state})
    page.goto(f"{demo.url}?{query}")
    page.wait_for_selector("main[data-loaded]", state="attached", timeout=30_000)


def reloaded(page, before: str) -> None:
    page.wait_for_selector(f"main:not([data-loaded='{before}'])", state="attached", timeout=30_000)


def attr(page, selector: str, name: str) -> list:
    values = page.eval_on_selector_all(selector, f"els => els.map(e => e.dataset.{name} || '[]')")
    return [json.loads(v) for v in values]


def test_every_dashboard_renders_the_labs_pods_services_nodes_and_policies(browser, demo) -> None:
    ext_ip = re.search(r"-> (172\.31\.250\.\d+):443", demo.output)[1]
    expected = {
        "pod-to-pod": PODS,
        "pod-to-service": ["shop/frontend-6d4f8", "shop/backend:http"],
        "pod-to-external": ["shop/frontend-6d4f8", ext_ip],
        "policy": ["shop/frontend-egress", "data/db-from-backend-only", "shop/backend-from-frontend"],
    }
    for view in DASHBOARDS:
        open_view(browser, demo, d=view, since="15m")
        status = browser.text_content("#status")
        assert "error" not in status and "not understood" not in status, (view, status)
        assert browser.query_selector_all("main .chart, main .scroll"), view
        assert not browser.query_selector_all("main .chart[data-empty]"), f"{view}: an empty chart"
        browser.screenshot(path=str(SHOTS / f"{view}.png"), full_page=True)
        if view in expected:
            shown = {n for nodes in attr(browser, "[data-chart^='sankey']", "nodes") for n in nodes}
            assert set(expected[view]) <= shown, (view, shown)
    open_view(browser, demo, d="overview", since="15m")
    assert set(PODS) <= set(attr(browser, "[data-chart='top:pod']", "rows")[0])
    assert attr(browser, "[data-chart='top:service']", "rows")[0] == ["shop/backend:http"]
    denied = browser.text_content("section.stat.deny .value")
    assert int(denied) >= 1
    open_view(browser, demo, d="nodes", since="15m")
    assert attr(browser, "[data-chart='heatmap:tx']", "nodes") == [["node-a", "node-b"]]
    assert attr(browser, "[data-chart='heatmap:rx']", "nodes") == [["node-a", "node-b"]]
    inter = attr(browser, "[data-chart='throughput:node']", "series")
    assert set(inter[0]) == {"node-a", "node-b"}  # inter-Node: both Nodes send to the other
    assert set(inter[1]) == {"node-a", "node-b"}  # intra-Node: frontend->cache on a, backend->db on b


def test_the_denied_connection_stands_out_on_the_network_policy_page(browser, demo) -> None:
    open_view(browser, demo, d="policy", since="15m")
    (sankey,) = browser.query_selector_all("[data-chart^='sankey:policy']")
    # frontend-egress -> db-from-backend-only, dropped (and the destination Node's uncorrelated half of
    # the same connection, which knows no egress policy)
    assert int(sankey.get_attribute("data-denied")) >= 1
    status, data = demo.get("ui/v1/sankey", scope="policy", since="15m")
    names = {n["name"]: n["label"] for n in data["nodes"]}
    denied = {(names[x["source"]], names[x["target"]]) for x in data["links"] if x["denied"]}
    assert ("shop/frontend-egress", "data/db-from-backend-only") in denied, denied
    assert all(target == "data/db-from-backend-only" for _, target in denied), denied
    rows = browser.query_selector_all("main section:last-child tbody tr.denied")
    assert rows, browser.text_content("main section:last-child")
    texts = [r.text_content() for r in rows]
    assert all("data/db-0:5432" in t and "drop" in t for t in texts), texts
    assert any("shop/frontend-6d4f8" in t and "frontend-egress" in t for t in texts), texts
    open_view(browser, demo, d="policy", since="15m", ingressPolicyNamespace="shop")
    shown = {n for nodes in attr(browser, "[data-chart^='sankey:policy']", "nodes") for n in nodes}
    assert "shop/backend-from-frontend" in shown and "data/db-from-backend-only" not in shown
    browser.screenshot(path=str(SHOTS / "policy-ingress-namespace-shop.png"), full_page=True)


def test_the_filter_box_completes_from_the_store_and_narrows_the_records(browser, demo) -> None:
    open_view(browser, demo, d="flows", since="15m")
    all_total = int(re.search(r"of (\d+) records", browser.text_content(".pager"))[1])
    box = browser.locator("#filter")
    box.click()
    box.type("namespace = ")
    deadline, offered = time.monotonic() + 15, []
    while time.monotonic() < deadline and not {'"shop"', '"data"'} <= set(offered):
        time.sleep(0.2)  # the list first offers fields (on focus), then the values after "="
        offered = browser.eval_on_selector_all("#complete li span:first-child", "els => els.map(e => e.textContent)")
    assert {'"shop"', '"data"'} <= set(offered), offered
    browser.screenshot(path=str(SHOTS / "filter-completion.png"))
    box.fill('dstPod = "data/db-0"')
    before = browser.get_attribute("main", "data-loaded")
    box.press("Enter")
    reloaded(browser, before)
    assert "filter=dstPod" in browser.url  # the filter lives in the URL: the view can be shared
    rows = browser.eval_on_selector_all("table.flows tbody tr td:nth-child(3)", "els => els.map(e => e.textContent)")
    assert rows and all(r.startswith("data/db-0:5432") for r in rows), rows
    total = int(re.search(r"of (\d+) records", browser.text_content(".pager"))[1])
    assert 0 < total < all_total
    browser.screenshot(path=str(SHOTS / "flows-filtered.png"), full_page=True)
    # the shared link reproduces the view
    link = browser.url
    browser.goto("about:blank")
    browser.goto(link)
    browser.wait_for_selector("main[data-loaded]", state="attached", timeout=30_000)
    assert browser.input_value("#filter") == 'dstPod = "data/db-0"'
    # a filter outside the language is shown, not run (the panels' 400s are the only console lines)
    seen = len(browser.errors)
    box = browser.locator("#filter")
    box.fill('namespace = "x" <img src=x onerror=alert(1)>')
    before = browser.get_attribute("main", "data-loaded")
    box.press("Enter")
    reloaded(browser, before)
    assert browser.is_visible("#filter-error")
    assert "unexpected" in browser.text_content("#filter-error")
    assert not browser.query_selector_all("img[src=x]")
    expected = browser.errors[seen:]
    assert expected and all("status of 400" in e for e in expected), expected
    del browser.errors[seen:]


def test_the_time_range_narrows_the_records(browser, demo) -> None:
    before_demo = datetime.fromtimestamp(demo.started - 7200, timezone.utc).isoformat()
    until = datetime.fromtimestamp(demo.started - 3600, timezone.utc).isoformat()
    open_view(browser, demo, d="flows", **{"from": before_demo, "to": until})
    assert "no flow records" in browser.text_content("main section:last-child")
    assert browser.input_value("#range") == "custom"
    first = min(r["flowEndSeconds"] for r in demo.get("ui/v1/flows", since="15m", limit="500")[1]["rows"])
    start = (first // 60 + 1) * 60  # the window aligns to minutes: start one after the first record
    while time.time() < start + 5:  # at most a minute: the demo has been running for a while
        time.sleep(0.5)
    iso = datetime.fromtimestamp(start, timezone.utc).isoformat()
    open_view(browser, demo, d="flows", **{"from": iso})
    total = int(re.search(r"of (\d+) records", browser.text_content(".pager"))[1])
    # the last 15 minutes, read after (the demo's flows keep coming): more than the narrowed range
    open_view(browser, demo, d="flows", since="15m")
    all_total = int(re.search(r"of (\d+) records", browser.text_content(".pager"))[1])
    assert 0 < total < all_total


def test_clicking_a_flow_shows_both_nodes_counters_and_its_policies(browser, demo) -> None:
    open_view(browser, demo, d="flows", since="15m", filter='service = "shop/backend:http"')
    browser.click("table.flows tbody tr")
    browser.wait_for_selector("#details .details", timeout=10_000)
    text = browser.text_content("#details")
    for part in ("from the source Node", "from the destination Node", "shop/backend-from-frontend",
                 "shop/frontend-egress", "correlation", "node-a", "node-b", "10.96.0.10:80"):
        assert part in text, part
    browser.screenshot(path=str(SHOTS / "flow-details.png"))
    browser.keyboard.press("Escape")


def test_no_console_errors(browser, demo) -> None:
    assert browser.errors == []


def test_the_dashboards_json_answers_what_flowscope_flows_prints(demo) -> None:
    first = min(r["flowEndSeconds"] for r in demo.get("ui/v1/flows", since="15m", limit="500")[1]["rows"])
    end = (first // 60 + 1) * 60  # a whole minute in the past, after the first record
    while time.time() < end + 3:
        time.sleep(0.5)
    start = end - 600
    rfc = {k: datetime.fromtimestamp(v, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") for k, v in
           (("from", start), ("to", end))}
    for expr in ('namespace = "data"', "action = drop", 'type = to-external or protocol = udp', ""):
        status, page = demo.get("ui/v1/flows", filter=expr, limit="500", **rfc)
        assert status == 200, page
        cli = subprocess.run(
            [sys.executable, "-m", "flowscope", "flows", "--api", demo.url.rstrip("/"), "-o", "json",
             "--since", rfc["from"], "--until", rfc["to"], "--limit", "500", *(["--filter", expr] if expr else [])],
            capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        printed = [json.loads(line) for line in cli.stdout.splitlines() if line.strip()]
        assert printed, expr
        def canonical(rows: list) -> list:
            return sorted(json.dumps(r, sort_keys=True) for r in rows)  # ties in time may come in any order

        assert canonical(page["rows"]) == canonical(printed), expr
        assert page["total"] == len(printed)


def test_hostile_input_over_http_is_refused_and_the_dashboards_keep_answering(demo) -> None:
    for params in ({"filter": 'namespace = "shop"; DROP TABLE flowscope.flows'},
                   {"filter": "sourcePodName = '1' OR 1=1 --"},
                   {"group": "srcPod) UNION ALL SELECT 1 --", "since": "15m"},
                   {"since": "15m); DROP TABLE flows; --"},
                   {"scope": "<script>alert(1)</script>"}):
        status, body = demo.get("ui/v1/top", **params)
        assert status == 400 and body["field"] in params, (params, body)
    status, body = demo.get("ui/v1/flows", since="15m", filter="namespace = \"'; DROP TABLE flows; --\"")
    assert status == 200 and body["total"] == 0
    status, body = demo.get("ui/v1/summary", since="15m")
    assert status == 200 and body["flows"] > 0


def test_ctrl_c_stops_the_demo_which_prints_what_was_sent_and_leaves_nothing_behind(demo) -> None:
    port = int(demo.url.rsplit(":", 1)[1].strip("/"))
    os.killpg(demo.proc.pid, signal.SIGINT)
    assert demo.proc.wait(120) == 0, demo.output[-4000:]
    time.sleep(0.5)
    out = demo.output
    # every connection kind it reported sending came back as a record carrying at least that much
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    received = re.search(r"the collector received (\d+) aggregated records", out)
    assert received and int(received[1]) >= len(records) > 0, out[-3000:]
    sends = re.findall(r"(\S+) -> (\S+):(\d+)\s+sent\s+(\d+) B, got back: (.*)$", out, re.M)
    assert len(sends) == 7, out[:3000]
    for src, dst, port_s, sent, answer in sends:
        matches = [r for r in records if r.get("sourceIPv4Address") == src
                   and dst in (r.get("destinationClusterIPv4"), r.get("destinationIPv4Address"))
                   and (r.get("destinationServicePort") if dst.startswith("10.96.") else r.get("destinationTransportPort"))
                   == int(port_s)]
        assert matches, f"no record for {src} -> {dst}:{port_s}"
        octets = max(max(r.get("octetTotalCountFromSourceNode", 0), r.get("octetTotalCount", 0)) for r in matches)
        if answer.startswith("refused"):
            assert 0 < octets < int(sent), (dst, octets)
        else:
            assert octets >= int(sent), (dst, port_s, sent, octets)
    # nothing left: the lab's namespaces, processes started for it, the dashboards' port
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"-{demo.suffix}" not in namespaces, namespaces
    left = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(demo.workdir) in cmdline or f"-{demo.suffix}" in cmdline:
                left.append(cmdline)
    assert not left, left
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "flowscope_lab" not in tables  # the lab's rules lived (and died) in its namespaces
