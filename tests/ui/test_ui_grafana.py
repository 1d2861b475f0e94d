"""The Grafana dashboards (collector/ui/grafana/*.json): every panel's SQL, with the
ClickHouse data source plugin's macros expanded as the plugin documents them, runs on a
real chDB store and returns the rows the stored records add up to.

Grafana cannot run on this machine (it is in neither Debian's nor PyPI's archive here), so
what this proves is the SQL and its answers over flowscope's schema, not the drawing.
"""

from __future__ import annotations

import json
import re

import pytest
from ui_cluster import FLOWS, NOW, RECORDS

from flowscope.collector.rows import flows_to_columns
from flowscope.collector.store import open_store
from flowscope.collector.ui import grafana

FROM, TO, INTERVAL = NOW - 900, NOW, 60


def expand(sql: str, database: str) -> str:
    """The plugin's macros and the dashboard's variables, for the range [FROM, TO]."""
    sql = re.sub(r"\$__timeFilter\((\w+)\)",
                 lambda m: f"{m[1]} >= toDateTime({FROM}) AND {m[1]} <= toDateTime({TO})", sql)
    sql = sql.replace("$__fromTime", f"toDateTime({FROM})").replace("$__toTime", f"toDateTime({TO})")
    sql = sql.replace("$__interval_s", str(INTERVAL)).replace("${database}", database)
    assert "$" not in sql, sql
    return sql


@pytest.fixture(scope="module")
def store():
    s = open_store("chdb://")
    s.open()
    columns, bad = flows_to_columns(FLOWS, time_inserted=NOW, commit_id=1)
    assert bad == 0
    s.insert(columns)
    yield s
    s.close()


def panels() -> dict[str, dict[str, list]]:
    out = {}
    for name in grafana.DASHBOARDS:
        model = json.loads((grafana.DIR / f"flowscope-{name}.json").read_text())
        out[name] = {p["title"]: p for p in model["panels"]}
    return out


def run(store, panel: dict) -> list[tuple]:
    (target,) = panel["targets"]
    return store.select(expand(target["rawSql"], store.database))


def test_the_json_files_are_what_the_module_builds() -> None:
    for name in grafana.DASHBOARDS:
        on_disk = json.loads((grafana.DIR / f"flowscope-{name}.json").read_text())
        assert on_disk == json.loads(json.dumps(grafana.build(name))), f"run python -m flowscope.collector.ui.grafana ({name})"
        assert on_disk["uid"] == f"flowscope-{name}"
        for p in on_disk["panels"]:
            assert p["datasource"]["type"] == "grafana-clickhouse-datasource"


def test_every_panel_runs_and_returns_what_the_records_add_up_to(store) -> None:
    all_panels = panels()
    ran = 0
    for dashboard in all_panels.values():
        for panel in dashboard.values():
            assert run(store, panel), panel["title"]  # every panel has rows for this cluster
            ran += 1
    assert ran == sum(len(grafana.build(n)["panels"]) for n in grafana.DASHBOARDS)

    ov = all_panels["overview"]
    assert run(store, ov["Flow records"]) == [(len(RECORDS),)]
    assert run(store, ov["Traffic"]) == [(sum(r["octetDeltaCount"] + r["reverseOctetDeltaCount"] for r in RECORDS),)]
    assert run(store, ov["Denied flow records"]) == [(40,)]
    assert run(store, ov["Pods"]) == [(4,)]
    svc = run(store, ov["Top Services"])
    assert [row[0] for row in svc] == ["shop/backend:http"]
    tx = {(s, d): b for s, d, b in run(store, all_panels["pod-to-pod"]["Cumulative Tx (source Pod -> destination Pod)"])}
    assert tx[("shop/frontend-6d4f8", "shop/cache-0")] == sum(
        r["octetDeltaCount"] for r in RECORDS if r.get("destinationPodName") == "cache-0")
    assert ("shop/frontend-6d4f8", "shop/backend-5c7b9") not in tx  # through the Service: Pod-to-Service
    rx = run(store, all_panels["pod-to-service"]["Cumulative Rx (Pod -> Service)"])
    assert rx == [("shop/frontend-6d4f8", "shop/backend:http",
                   sum(r["reverseOctetDeltaCount"] for r in RECORDS if r.get("destinationServicePortName")))]
    ext = run(store, all_panels["pod-to-external"]["Cumulative Tx and Rx (Pod -> external address)"])
    assert [(row[0], row[1]) for row in ext] == [("shop/frontend-6d4f8", "172.31.250.13")]
    policy = run(store, all_panels["network-policy"]["Egress policy -> ingress policy"])
    assert policy[0][:2] == ("shop/frontend-egress", "data/db-from-backend-only") and policy[0][4] == 40
    denied = run(store, all_panels["network-policy"]["Denied connections"])
    assert len(denied) == 40 and {row[3] for row in denied} == {"data/db-0"}
    records = run(store, all_panels["flow-records"]["Flow records (newest first)"])
    assert len(records) == len(RECORDS)
    mbit = run(store, all_panels["node-throughput"]["Tx per Node (Mbit/s)"])
    sent_a = sum(r["octetDeltaCount"] for r in RECORDS if r["sourceNodeName"] == "node-a") + \
        sum(r["reverseOctetDeltaCount"] for r in RECORDS if r.get("destinationNodeName") == "node-a")
    assert sum(v for _, n, v in mbit if n == "node-a") == pytest.approx(sent_a * 8 / 1e6 / INTERVAL)
