"""kopf handlers: when to reconcile. What a reconcile does lives in reconcile.py.

Every handler is a few lines that call the Reconciler. Triggers:

- any event of a FlowAggregator or FlowExporterConfig (creation, spec or status change,
  operator restart: kopf replays everything it lists);
- an event of a Deployment or DaemonSet the operator manages (someone edited it: drift;
  or its status changed: readiness), which reconciles the owning custom resource;
- a change of a FlowAggregator also reconciles the FlowExporterConfigs referencing it
  (new address, transport or certificates reach the agents at once);
- a resync timer per resource (certificate rotation, retries after transient errors);
- deletion of a FlowExporterConfig, whose finalizer removes its cluster-scoped RBAC
  (owner references cover everything namespaced).

Event handlers are not retried by kopf, which suits level-triggered reconciles: the next
event or the resync timer picks up anything a transient API error left undone.
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
from flowscope.operator.reconcile import Reconciler
from flowscope.operator.spec import API_VERSION, GROUP, VERSION

__all__ = ["build_registry", "configure"]

log = logging.getLogger("flowscope.operator")


def configure(settings: kopf.OperatorSettings) -> kopf.OperatorSettings:
    """Watch only our own Deployments and DaemonSets, filtered by the API server, not all of
    a large cluster's (the handlers' label filters alone would be applied client-side)."""
    selector = f"app.kubernetes.io/managed-by={MANAGED_BY}"
    settings.watching.label_selectors["apps", "deployments"] = selector
    settings.watching.label_selectors["apps", "daemonsets"] = selector
    return settings


def build_registry(connection: Connection, *, image: str, resync: float | None = 60.0,
                   reconciler: Reconciler | None = None) -> kopf.OperatorRegistry:
    """A kopf registry whose handlers reconcile through one shared Reconciler."""
    registry = kopf.OperatorRegistry()
    rec = reconciler or Reconciler(KubeApi(connection), image=image)
    locks: dict[tuple[str, str, str], asyncio.Lock] = {}

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
                # level-triggered: the next event or the resync timer tries again
                log.warning("reconcile of %s %s/%s will be retried: %s", kind, namespace, name, exc)

    async def referencing(namespace: str, name: str) -> list[tuple[str, str]]:
        out = []
        for fec in await rec.api.list(API_VERSION, "FlowExporterConfig"):
            ref = (fec.get("spec") or {}).get("flowAggregatorRef") or {}
            meta = fec.get("metadata") or {}
            if ref.get("name") == name and (ref.get("namespace") or meta.get("namespace")) == namespace:
                out.append((meta.get("namespace") or "default", meta["name"]))
        return out

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=connection.server, token=connection.bearer(), ca_path=connection.ca_file,
            insecure=connection.insecure, certificate_path=connection.cert_file,
            private_key_path=connection.key_file,
        )

    @kopf.on.cleanup(registry=registry)
    async def close(**_: Any) -> None:
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
        if type != "DELETED":
            await run("FlowExporterConfig", namespace or "default", name)

    if resync:  # None: no timers (tests drive reconciles by events and injected clocks)
        @kopf.timer(GROUP, VERSION, "flowaggregators", interval=resync, initial_delay=resync, registry=registry)
        async def aggregator_resync(namespace: str | None, name: str, **_: Any) -> None:
            await run("FlowAggregator", namespace or "default", name)

        @kopf.timer(GROUP, VERSION, "flowexporterconfigs", interval=resync, initial_delay=resync,
                    registry=registry)
        async def exporter_resync(namespace: str | None, name: str, **_: Any) -> None:
            await run("FlowExporterConfig", namespace or "default", name)

    @kopf.on.delete(GROUP, VERSION, "flowexporterconfigs", registry=registry)
    async def exporter_deleted(body: Mapping[str, Any], **_: Any) -> None:
        await rec.exporter_cleanup(body)

    async def child_event(body: kopf.Body, namespace: str | None, **_: Any) -> None:
        for ref in body.get("metadata", {}).get("ownerReferences") or []:
            if ref.get("apiVersion") == API_VERSION and ref.get("controller") and namespace:
                await run(ref["kind"], namespace, ref["name"])

    managed = {"app.kubernetes.io/managed-by": MANAGED_BY}
    kopf.on.event("apps", "v1", "deployments", labels=managed, registry=registry)(child_event)
    kopf.on.event("apps", "v1", "daemonsets", labels=managed, registry=registry)(child_event)
    return registry
