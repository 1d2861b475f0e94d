"""kopf wiring: which events run which reconcile. Each handler is a few lines.

- any event of a FlowAggregator or FlowExporterConfig (create, update, resume) reconciles it;
- an event of an object the operator owns (Deployment, DaemonSet, ConfigMap, Secret,
  ServiceAccount, Service, NetworkPolicy, and the agents' ClusterRole/ClusterRoleBinding),
  filtered by the API server on the managed-by label, reconciles its owner: someone's
  edit or deletion is undone at once, not at the next resync;
- a change of a FlowAggregator also reconciles the FlowExporterConfigs referencing it
  (new address, transport, certificates or readiness reach them at once); a change of a
  FlowExporterConfig re-judges the ones held back by a node conflict;
- one operator-wide resync loop (not kopf timers: a kopf timer makes kopf put its own
  finalizer on every resource and, on deletion, wait for the timer to stop, which took
  minutes) lists both kinds every ``resync`` seconds (certificate rotation, retries after
  transient errors) and collects the agents' cluster-scoped RBAC left behind;
- deletion: a FlowAggregator carries no finalizer at all (owner references let the
  garbage collector delete its objects); a FlowExporterConfig carries the finalizer
  ``flowscope.dev/agent-rbac``, whose handler deletes its cluster-scoped RBAC (which
  owner references cannot cover), so deleting one takes as long as two API calls.

Event handlers are not retried by kopf, which suits level-triggered reconciles: the next
event or the resync loop picks up anything a transient API error left undone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

from flowscope.operator.kube import ApiError, Connection, KubeApi
from flowscope.operator.manifests import MANAGED_BY
from flowscope.operator.reconcile import FINALIZER, Reconciler
from flowscope.operator.spec import API_VERSION, GROUP, VERSION

__all__ = ["FINALIZER", "build_registry", "configure"]  # the reconciler puts FINALIZER on too

log = logging.getLogger("flowscope.operator")


OWNED = (("apps", "v1", "deployments"), ("apps", "v1", "daemonsets"), ("", "v1", "configmaps"),
         ("", "v1", "secrets"), ("", "v1", "serviceaccounts"), ("", "v1", "services"),
         ("networking.k8s.io", "v1", "networkpolicies"))
CLUSTER_OWNED = (("rbac.authorization.k8s.io", "v1", "clusterroles"),
                 ("rbac.authorization.k8s.io", "v1", "clusterrolebindings"))


def configure(settings: kopf.OperatorSettings) -> kopf.OperatorSettings:
    """Watch only our own objects, filtered by the API server, not all of a large cluster's
    (the handlers' label filters alone would be applied client-side); name our finalizer."""
    selector = f"app.kubernetes.io/managed-by={MANAGED_BY}"
    for group, version, plural in OWNED + CLUSTER_OWNED:
        settings.watching.label_selectors[group, version, plural] = selector
    settings.persistence.finalizer = FINALIZER
    return settings


def build_registry(connection: Connection, *, image: str, resync: float | None = 60.0,
                   reconciler: Reconciler | None = None) -> kopf.OperatorRegistry:
    """A kopf registry whose handlers reconcile through one shared Reconciler."""
    registry = kopf.OperatorRegistry()
    rec = reconciler or Reconciler(KubeApi(connection), image=image)
    locks: dict[tuple[str, str, str], asyncio.Lock] = {}
    tasks: list[asyncio.Task[None]] = []

    async def run(kind: str, namespace: str, name: str) -> None:
        """Reconcile one resource, serialised per resource, always from a fresh read."""
        key = (kind, namespace, name)
        async with locks.setdefault(key, asyncio.Lock()):
            try:
                fresh = await rec.api.get(API_VERSION, kind, namespace, name)
                if fresh is None:
                    locks.pop(key, None)
                    return
                if (fresh.get("metadata") or {}).get("deletionTimestamp"):
                    return
                if kind == "FlowAggregator":
                    await rec.aggregator(fresh)
                else:
                    await rec.exporter(fresh)
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                # level-triggered: the next event or the resync loop tries again
                log.warning("reconcile of %s %s/%s will be retried: %s", kind, namespace, name, exc)

    async def referencing(namespace: str, name: str) -> list[tuple[str, str]]:
        out = []
        for fec in await rec.api.list(API_VERSION, "FlowExporterConfig"):
            ref = (fec.get("spec") or {}).get("flowAggregatorRef") or {}
            meta = fec.get("metadata") or {}
            if ref.get("name") == name and (ref.get("namespace") or meta.get("namespace")) == namespace:
                out.append((meta.get("namespace") or "default", meta["name"]))
        return out

    async def held_back(but: tuple[str, str]) -> list[tuple[str, str]]:
        out = []
        for fec in await rec.api.list(API_VERSION, "FlowExporterConfig"):
            meta = fec.get("metadata") or {}
            key = (meta.get("namespace") or "default", meta["name"])
            reasons = {c.get("reason") for c in (fec.get("status") or {}).get("conditions") or []}
            if key != but and "NodeConflict" in reasons:
                out.append(key)
        return out

    async def resync_loop(period: float) -> None:
        while True:
            try:
                await rec.collect_orphans()
                for kind in ("FlowAggregator", "FlowExporterConfig"):
                    for obj in await rec.api.list(API_VERSION, kind):
                        meta = obj.get("metadata") or {}
                        await run(kind, meta.get("namespace") or "default", meta["name"])
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.warning("resync failed, next one in %gs: %s", period, exc)
            await asyncio.sleep(period)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=connection.server, token=connection.bearer(), ca_path=connection.ca_file,
            insecure=connection.insecure, certificate_path=connection.cert_file,
            private_key_path=connection.key_file,
        )

    @kopf.on.startup(registry=registry)
    async def start(**_: Any) -> None:
        if resync:
            tasks.append(asyncio.create_task(resync_loop(resync), name="flowscope-resync"))

    @kopf.on.cleanup(registry=registry)
    async def close(**_: Any) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await rec.api.close()

    @kopf.on.event(GROUP, VERSION, "flowaggregators", registry=registry)
    async def aggregator_event(type: str, namespace: str | None, name: str, **_: Any) -> None:
        ns0 = namespace or "default"
        if type != "DELETED":
            await run("FlowAggregator", ns0, name)
        for ns, n in await referencing(ns0, name):
            await run("FlowExporterConfig", ns, n)

    @kopf.on.event(GROUP, VERSION, "flowexporterconfigs", registry=registry)
    async def exporter_event(type: str, namespace: str | None, name: str, **_: Any) -> None:
        ns0 = namespace or "default"
        if type != "DELETED":
            await run("FlowExporterConfig", ns0, name)
        for ns, n in await held_back((ns0, name)):
            await run("FlowExporterConfig", ns, n)

    @kopf.on.delete(GROUP, VERSION, "flowexporterconfigs", registry=registry)
    async def exporter_deleted(body: Mapping[str, Any], **_: Any) -> None:
        await rec.exporter_cleanup(body)

    async def child_event(body: kopf.Body, namespace: str | None, **_: Any) -> None:
        for ref in body.get("metadata", {}).get("ownerReferences") or []:
            if ref.get("apiVersion") == API_VERSION and ref.get("controller") and namespace:
                await run(ref["kind"], namespace, ref["name"])

    async def cluster_child_event(body: kopf.Body, **_: Any) -> None:
        labels = body.get("metadata", {}).get("labels") or {}
        ns, name = labels.get("flowscope.dev/owner-namespace"), labels.get("flowscope.dev/owner-name")
        if ns and name:
            await run("FlowExporterConfig", ns, name)

    managed = {"app.kubernetes.io/managed-by": MANAGED_BY}
    for group, version, plural in OWNED:
        kopf.on.event(group, version, plural, labels=managed, registry=registry)(child_event)
    for group, version, plural in CLUSTER_OWNED:
        kopf.on.event(group, version, plural, labels=managed, registry=registry)(cluster_child_event)
    return registry
