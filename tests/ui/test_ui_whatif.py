"""The dashboards' what-if page: ``POST /ui/v1/whatif`` over a real chDB store holding the
small cluster of the dashboards' tests, and the page in headless Chromium.

The changed flows are checked against sums over the records put in; the answer is also
the one ``what_if_report`` (what ``flowscope policy what-if -o json`` prints) gives. Bad
bodies get a 400 (413 past the size bound) naming the field, and the server keeps
answering; with a token, posting needs it like every panel.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from ui_cluster import FLOWS, NOW, RECORDS, filled_store, ui_client

from flowscope.collector.policy import load_inventory_text, what_if_report
from flowscope.collector.ui.app import build_app
from flowscope.collector.ui.whatif import MAX_BODY
from flowscope.webauth import WebAuth

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "out" / "ui-screenshots"

INVENTORY = """
kind: List
items:
- {kind: Namespace, metadata: {name: shop}}
- {kind: Namespace, metadata: {name: data}}
- {kind: Pod, metadata: {name: frontend-6d4f8, namespace: shop, labels: {app: frontend}}, status: {podIP: 10.244.1.10}}
- {kind: Pod, metadata: {name: cache-0, namespace: shop, labels: {app: cache}}, status: {podIP: 10.244.1.11}}
- {kind: Pod, metadata: {name: backend-5c7b9, namespace: shop, labels: {app: backend}}, status: {podIP: 10.244.2.10}}
- {kind: Pod, metadata: {name: db-0, namespace: data, labels: {app: db}}, status: {podIP: 10.244.2.11}}
- kind: NetworkPolicy
  metadata: {name: db-from-backend-only, namespace: data}
  spec:
    podSelector: {matchLabels: {app: db}}
    ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}},
                       podSelector: {matchLabels: {app: backend}}}], ports: [{port: 5432}]}]
"""
DENY_SHOP = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress]}
"""


@pytest.fixture(scope="module")
def store():
    yield from filled_store()


_client = ui_client


async def _post(client: TestClient, body, headers: dict | None = None):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    resp = await client.post("/ui/v1/whatif", data=data, headers={"Content-Type": "application/json", **(headers or {})})
    return resp.status, await resp.json()


def _octets(src: str, dst: str, port: int) -> tuple[int, int]:
    recs = [r for r in RECORDS if (r["sourcePodName"], r["destinationPodName"], r["destinationTransportPort"])
            == (src, dst, port)]
    return sum(r["octetDeltaCount"] + r["reverseOctetDeltaCount"] for r in recs), len(recs)


async def test_a_default_deny_lists_the_flows_it_would_break_with_what_they_carried(store) -> None:
    client = await _client(store)
    try:
        status, report = await _post(client, {"policies": DENY_SHOP, "inventory": INVENTORY, "since": NOW - 3600})
        assert status == 200, report
        changes = {(c["source"]["pod"], c["destination"]["pod"], c["port"], c["protocol"]): c
                   for g in report["groups"] for c in g["changes"]}
        # into shop: frontend -> backend 8080 and frontend -> cache 6379; nothing into data or outside
        assert set(changes) == {("frontend-6d4f8", "backend-5c7b9", 8080, "TCP"), ("frontend-6d4f8", "cache-0", 6379, "TCP")}
        for (src, dst, port, _), c in changes.items():
            assert c["change"] == "allowed->denied" and c["after"]["name"] == "default-deny"
            assert (c["octets"], c["records"]) == _octets(src, dst, port)
            assert c["lastSeen"] == max(r["flowEndSeconds"] for r in RECORDS if r["destinationPodName"] == dst)
        assert (report["evaluated"], report["newlyDenied"], report["breaks"], report["newlyAllowed"]) == (5, 2, 2, 0)
        assert report == json.loads(json.dumps(what_if_report(store, DENY_SHOP, inventory=load_inventory_text(INVENTORY),
                                                              since=NOW - 3600)))
        # the window: nothing was stored after NOW
        status, later = await _post(client, {"policies": DENY_SHOP, "inventory": INVENTORY, "since": NOW + 1})
        assert status == 200 and (later["evaluated"], later["changed"]) == (0, 0)
        # a namespace narrows; replace drops the current db policy: frontend -> db opens
        status, data_ns = await _post(client, {"policies": DENY_SHOP, "inventory": INVENTORY, "namespace": "data",
                                               "replace": True})
        assert status == 200
        assert {(c["source"]["pod"], c["destination"]["pod"], c["change"]) for g in data_ns["groups"]
                for c in g["changes"]} == {("frontend-6d4f8", "db-0", "denied->allowed")}
        # without an inventory the store has no labels for these Pods: every key is left out, and said so
        status, bare = await _post(client, {"policies": DENY_SHOP})
        assert status == 200 and (bare["evaluated"], len(bare["unresolved"])) == (0, 5)
    finally:
        await client.close()


@pytest.mark.parametrize(("body", "field", "words"), [
    (b"{not json", "body", "not JSON"),
    ([1, 2], "body", "not a JSON object"),
    ({"policies": DENY_SHOP, "sql": "DROP TABLE flows"}, "sql", "not a field of a what-if"),
    ({}, "policies", "give the proposed policies"),
    ({"policies": "kind: ["}, "policies", "not valid YAML"),
    ({"policies": "kind: AdminNetworkPolicy\napiVersion: policy.networking.k8s.io/v1alpha1\nmetadata: {name: x}\n"
                  "spec: {priority: 5000, subject: {namespaces: {}}}\n"}, "policies", "priority: 5000"),
    ({"policies": DENY_SHOP, "namespace": "shop' OR 1=1 --"}, "namespace", "not a Kubernetes namespace name"),
    ({"policies": DENY_SHOP, "since": "yesterday"}, "since", "not epoch seconds"),
    ({"policies": DENY_SHOP, "replace": "yes"}, "replace", "not true or false"),
    ({"policies": DENY_SHOP, "inventory": "- just\n- a list\n"}, "inventory", "not a Kubernetes object"),
])
async def test_bad_bodies_get_a_400_naming_the_field(store, body, field, words) -> None:
    client = await _client(store)
    try:
        status, answer = await _post(client, body)
        assert (status, answer["field"]) == (400, field), answer
        assert words in answer["error"]
        rows_before = store.count()
        status, _ = await _post(client, {"policies": DENY_SHOP, "inventory": INVENTORY})
        assert status == 200 and store.count() == rows_before  # still answering; nothing written
    finally:
        await client.close()


async def test_the_body_is_bounded_and_must_be_json(store) -> None:
    client = await _client(store)
    try:
        big = json.dumps({"policies": DENY_SHOP + "#" * MAX_BODY})
        status, answer = await _post(client, big)
        assert (status, answer["field"]) == (413, "body") and "more than" in answer["error"]

        async def chunks():  # no Content-Length: the bound holds while reading
            yield b'{"policies": "'
            for _ in range(MAX_BODY // 65536 + 1):
                yield b"#" * 65536
            yield b'"}'

        resp = await client.post("/ui/v1/whatif", data=chunks(), headers={"Content-Type": "application/json"})
        assert resp.status == 413 and (await resp.json())["field"] == "body"
        resp = await client.post("/ui/v1/whatif", data=DENY_SHOP, headers={"Content-Type": "text/yaml"})
        assert resp.status == 400 and "is not application/json" in (await resp.json())["error"]
        resp = await client.get("/ui/v1/whatif")
        assert resp.status == 405
    finally:
        await client.close()


async def test_with_a_token_posting_needs_it(store) -> None:
    token = "whatif-token-0123456789abcdef"
    client = await _client(store, WebAuth(token=token))
    try:
        status, _ = await _post(client, {"policies": DENY_SHOP})
        assert status == 401
        status, _ = await _post(client, {"policies": DENY_SHOP}, {"Authorization": "Bearer wrong"})
        assert status == 401
        status, report = await _post(client, {"policies": DENY_SHOP, "inventory": INVENTORY},
                                     {"Authorization": f"Bearer {token}"})
        assert status == 200 and report["breaks"] == 2
    finally:
        await client.close()


def test_in_chromium_pasted_policies_show_the_changed_flows(store) -> None:
    """The page: paste policies and the inventory, Evaluate, read the changed flows; bad YAML
    is one line under the form; an uploaded file fills the policies. Screenshots in out/ui-screenshots."""
    from conftest import require_tool

    require_tool("chromium")
    from playwright.sync_api import sync_playwright
    from served_app import served

    with served(lambda: build_app(store, now=lambda: float(NOW))) as base:
        SHOTS.mkdir(parents=True, exist_ok=True)
        url = f"{base}/"
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            page = b.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            iso = lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
            page.goto(f"{url}?d=what-if&from={iso(NOW - 3600)}&to={iso(NOW + 60)}&refresh=0")
            page.wait_for_selector("#whatif-policies", timeout=20_000)
            assert not page.is_visible("#filter")  # the what-if takes policies, not a filter
            page.fill("#whatif-policies", "kind: [")
            page.click("#whatif-run")
            page.wait_for_selector("#whatif-error:not([hidden])", timeout=20_000)
            assert "not valid YAML" in page.text_content("#whatif-error")
            upload = SHOTS.parent / "default-deny.yaml"
            upload.write_text(DENY_SHOP)
            page.set_input_files("#whatif-file", str(upload))
            page.wait_for_function("() => document.querySelector('#whatif-policies').value.includes('default-deny')",
                                   timeout=10_000)
            page.click("#whatif-form details summary")
            page.fill("#whatif-inventory", INVENTORY)
            page.click("#whatif-run")
            page.wait_for_selector("#whatif-summary", timeout=20_000)
            assert page.is_hidden("#whatif-error")
            summary = " ".join(page.text_content("#whatif-summary").split())
            assert "5 distinct flows evaluated" in summary and "2 would be denied (2 of them flowed)" in summary
            rows = [" ".join(t.split()) for t in page.eval_on_selector_all(
                "table.whatif-table tbody tr:not(.group)", "rs => rs.map(r => r.textContent)")]
            assert len(rows) == 2
            assert any("shop/frontend-6d4f8" in r and "shop/backend-5c7b9:8080/TCP" in r and
                       "Drop by NetworkPolicy shop/default-deny" in r for r in rows), rows
            assert any("shop/cache-0:6379/TCP" in r for r in rows), rows
            page.screenshot(path=str(SHOTS / "what-if.png"), full_page=True)
            assert errors == []
            b.close()
