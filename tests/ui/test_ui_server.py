"""The same dashboards over Debian's clickhouse-server 18.16 (what ``flowscope ui --store
tcp://...`` serves) as over chDB: every panel of every page gives the same answer.

The server is started on loopback by the store tests' helper; the same records go into
both stores through the store's own insert.
"""

from __future__ import annotations

import json

import pytest
from ui_cluster import FLOWS, NOW

from conftest import require_tool
from flowscope.collector.rows import flows_to_columns
from flowscope.collector.store import open_store
from flowscope.collector.ui.dashboards import PAGES, Dashboards

RANGE = {"from": str(NOW - 900), "to": str(NOW)}


def fill(store) -> None:
    store.open()
    columns, bad = flows_to_columns(FLOWS, time_inserted=NOW, commit_id=1)
    assert bad == 0
    store.insert(columns)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    require_tool("clickhouse-server", "clickhouse-client")
    from test_clickhouse_server import ClickHouseServer  # tests/collector, on the path through ui_cluster

    srv = ClickHouseServer(tmp_path_factory.mktemp("clickhouse"))
    srv.start()
    server = open_store(srv.address, database="fs_ui")
    chdb = open_store("chdb://")
    try:
        fill(server)
        fill(chdb)
        yield server, chdb
    finally:
        server.close()
        chdb.close()
        srv.kill()


def _canonical(panel: str, answer: dict) -> str:
    answer = dict(answer)
    answer.pop("table", None)  # which table answered may differ by what each server can do
    if panel == "flows":  # records of the same second may come in another order
        answer["rows"] = sorted(answer["rows"], key=lambda r: json.dumps(r, sort_keys=True))
    return json.dumps(answer, sort_keys=True)


def test_every_panel_answers_alike_on_clickhouse_18_16_and_chdb(stores) -> None:
    server, chdb = stores
    assert server.features is not None and server.features.version[:2] == (18, 16)
    on_server, on_chdb = Dashboards(server, now=lambda: float(NOW)), Dashboards(chdb, now=lambda: float(NOW))
    asked = 0
    for page, panels in PAGES.items():
        for panel, params in panels:
            a = getattr(on_server, panel)({**RANGE, **params})
            b = getattr(on_chdb, panel)({**RANGE, **params})
            assert _canonical(panel, a) == _canonical(panel, b), (page, panel, params)
            asked += 1
    completion = {"q": 'namespace = "', "pos": "13", **RANGE}
    assert on_server.complete(completion) == on_chdb.complete(completion)
    assert asked == sum(len(p) for p in PAGES.values())
