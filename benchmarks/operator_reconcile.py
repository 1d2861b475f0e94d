"""How long the operator takes to render and to reconcile the samples, against a peer.

Prints JSON. Measured in one run:
- render_ms: ``render_documents`` of every sample without secrets (templates + YAML);
- tls_material_ms: one CA, server and client certificate (ECDSA P-256);
- first_reconcile_ms: the operator's reconcile of every sample against a fresh API
  server (kmock's emulator over HTTP, the tests' compatibility layer), creating all objects;
- noop_reconcile_ms: the same reconcile again with nothing changed (reads only);
- peer kubectl_apply_ms: the real kubectl applying the same rendered objects (server-side
  defaults aside, the same GET-then-create per object) to a fresh emulator;
- ratio_first_reconcile_vs_kubectl: < 1 means the operator applies faster than kubectl.
Medians of --rounds rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "operator"))

import kmock  # noqa: E402
from kmock_compat import CompatEmulator  # noqa: E402

from flowscope.operator.kube import Connection, KubeApi  # noqa: E402
from flowscope.operator.reconcile import Reconciler  # noqa: E402
from flowscope.operator.render import material_for, render_documents  # noqa: E402
from flowscope.operator.spec import parse_flow_aggregator  # noqa: E402

SAMPLES = sorted((ROOT / "config" / "samples").glob("*.yaml"))
DOCS = [d for p in SAMPLES for d in yaml.safe_load_all(p.read_text()) if d]


def ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


async def with_server(fn):
    async with CompatEmulator() as emu, kmock.Server(emu) as srv:
        return await fn(emu, str(srv.url).rstrip("/"))


async def seed(api: KubeApi, url: str) -> list[dict]:
    """Create the CRDs' resources, namespaces and CRs the way kubectl would (setup, not timed)."""
    async with __import__("aiohttp").ClientSession() as s:
        for crd in (ROOT / "crds").glob("*.yaml"):
            await s.post(url + "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=yaml.safe_load(crd.read_text()))
        bodies = []
        for doc in DOCS:
            if doc["kind"] == "Namespace":
                await s.post(url + "/api/v1/namespaces", json=doc)
        for doc in DOCS:
            if doc["apiVersion"].startswith("flowscope.dev"):
                bodies.append(await api.create(doc))
            elif doc["kind"] != "Namespace":
                await api.create(doc)  # e.g. the ClickHouse credentials Secret
    return bodies


async def reconcile_round(emu, url):
    api = KubeApi(Connection(server=url))
    rec = Reconciler(api, image="flowscope:bench")
    bodies = await seed(api, url)

    async def all_once():
        for kind in ("FlowAggregator", "FlowExporterConfig"):
            for b in bodies:
                if b["kind"] == kind:
                    fresh = await api.get(b["apiVersion"], kind, b["metadata"]["namespace"], b["metadata"]["name"])
                    await (rec.aggregator(fresh) if kind == "FlowAggregator" else rec.exporter(fresh))
    n0 = len(list(emu))
    t0 = time.perf_counter()
    await all_once()
    first = time.perf_counter() - t0
    n1 = len(list(emu))
    t0 = time.perf_counter()
    await all_once()
    noop = time.perf_counter() - t0
    n2 = len(list(emu))
    writes = sum(1 for r in list(emu)[n1:] if r.method.value != "GET")
    await api.close()
    return first, noop, n1 - n0, n2 - n1, writes


async def kubectl_round(emu, url, manifest: Path, tmp: Path):
    kc = tmp / "kubeconfig"
    kc.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "b",
                                  "clusters": [{"name": "b", "cluster": {"server": url}}],
                                  "contexts": [{"name": "b", "context": {"cluster": "b", "user": "u"}}],
                                  "users": [{"name": "u", "user": {"token": "t"}}]}))
    api = KubeApi(Connection(server=url))
    await seed(api, url)
    await api.close()
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec("kubectl", "--kubeconfig", str(kc), "apply", "--validate=false",
                                                "-f", str(manifest), stdout=asyncio.subprocess.DEVNULL)
    await proc.wait()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    render_t, tls_t, first_t, noop_t, kubectl_t = [], [], [], [], []
    fa = parse_flow_aggregator(next(d for d in DOCS if d["kind"] == "FlowAggregator"))
    import datetime as dt
    now = dt.datetime.now(dt.timezone.utc)
    objects = render_documents(DOCS, image="flowscope:bench", now=now)
    rendered = [o for o in objects if o not in DOCS]  # what the operator creates, not the inputs
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        manifest = tmp / "rendered.yaml"
        manifest.write_text(yaml.safe_dump_all(rendered))
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            render_documents(DOCS, image="flowscope:bench", secrets=False)
            render_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            material_for(fa, now)
            tls_t.append(time.perf_counter() - t0)
            first, noop, first_requests, noop_requests, noop_writes = asyncio.run(with_server(reconcile_round))
            first_t.append(first)
            noop_t.append(noop)
            if shutil.which("kubectl"):
                kubectl_t.append(asyncio.run(with_server(lambda e, u: kubectl_round(e, u, manifest, tmp))))
    out = {
        "objects_per_reconcile": len(rendered),
        "render_ms": ms(render_t),
        "tls_material_ms": ms(tls_t),
        "first_reconcile_ms": ms(first_t),
        "noop_reconcile_ms": ms(noop_t),
        "first_reconcile_requests": first_requests,
        "noop_reconcile_requests": noop_requests,
        "noop_reconcile_writes": noop_writes,
        "note": "the emulator answers a request in ~10-20 ms; both reconcile times are dominated by it",
        "peer": "kubectl 1.32 apply of the same rendered objects to the same kind of API server",
        "kubectl_apply_ms": ms(kubectl_t) if kubectl_t else None,
        "ratio_first_reconcile_vs_kubectl": round(statistics.median(first_t) / statistics.median(kubectl_t), 3)
        if kubectl_t else None,
        "rounds": args.rounds,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
