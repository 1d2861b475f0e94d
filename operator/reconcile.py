"""Reconcile: fetch what is, build what should be, write only the difference.

Theory of operation. A reconcile of a FlowAggregator or a FlowExporterConfig is
level-triggered and idempotent, so kopf may call it for any reason (an event on the
resource or on a child, a periodic resync, an operator restart):

1. Parse and validate the whole spec (spec.py). Any problem, a reference to a missing
   FlowAggregator, or a transport that disagrees with it ends the reconcile *before any
   write*: the status gets ``Ready=False`` with a reason and a message saying what to
   change, and what was applied before keeps running (never a half-applied state).
2. TLS (FlowAggregator, transport tls): read the three Secrets and keep their material
   unless missing, wrong or due for rotation (tls.ensure with the injected clock).
3. Build the desired objects with the pure builders (manifests.py).
4. For each object: create it when absent; when present, compare the desired fields with
   the live object (``contains``: only fields we set count, so server-filled defaults do
   not); merge-patch only when they differ. Someone's edit of a field we own (drift) is
   therefore undone on the next reconcile, and a reconcile with nothing changed writes
   nothing at all. Secrets, ConfigMaps, NetworkPolicies, Services and Deployments this
   resource controlled earlier but no longer needs (TLS material after a switch to tcp, the
   collector after spec.collector is switched off) are deleted; the collector's chDB claim
   (the stored flows) only with spec.collector.store.chdb.reclaimPolicy Delete, otherwise it
   is kept and named in status.retainedCollectorStore.
5. Status: ``observedGeneration`` and four conditions, patched through the status
   subresource only when something changed:
   ``Available`` (the workload has its pods available), ``Progressing`` (a rollout is
   under way: the workload has not observed its newest generation, or not every pod is
   updated yet, so old pods counting as ready do not make a change look done),
   ``Degraded`` (the spec or the cluster keeps us from applying it: the reason says why)
   and ``Ready`` (available, rolled out, not degraded, and for a FlowExporterConfig its
   FlowAggregator Ready too). Each has a reason and a message a person can act on.
6. Events: every decision that changes the ``Ready`` reason or writes objects is also a
   Kubernetes Event on the resource (Applied, InvalidSpec, NodeConflict, NameConflict,
   CertificateRotated, ...), so ``kubectl describe`` tells the story.

Objects made by ``flowscope render`` (no owner reference) are taken over only when they
carry the annotation ``flowscope.dev/adopt: "true"``; every conflict is listed at once.
FlowExporterConfigs whose nodes overlap: the one already running agents, else the older
one, deploys; the other gets ``NodeConflict`` and its DaemonSet is removed, so no node runs
two agents. One that deploys nothing because of its own spec or references holds no nodes.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import re
import secrets as _secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from flowscope.operator import manifests, tls
from flowscope.operator.kube import ApiError, KubeApi
from flowscope.operator.manifests import MANAGED_BY, AgentTLS, Owner
from flowscope.operator.spec import (
    API_VERSION, MUTUAL_TLS, FlowAggregatorSpec, FlowExporterConfigSpec, SpecError, parse_flow_aggregator,
    parse_flow_exporter_config,
)

__all__ = ["Reconciler", "Outcome", "contains", "condition", "ADOPT_ANNOTATION", "CONDITION_TYPES"]

log = logging.getLogger("flowscope.operator")
ADOPT_ANNOTATION = "flowscope.dev/adopt"
# A FlowExporterConfig's finalizer: its handler deletes the agents' cluster-scoped RBAC.
FINALIZER = "flowscope.dev/agent-rbac"
CONDITION_TYPES = ("Ready", "Available", "Progressing", "Degraded")
# Kinds whose presence depends on the spec (TLS material, per-transport objects, options,
# the collector's workload and Service once spec.collector is switched off). A
# PersistentVolumeClaim holds data and is never pruned with them: the collector's store
# follows spec.collector.store.chdb.reclaimPolicy (see _collector_store).
PRUNABLE = (("v1", "Secret"), ("v1", "ConfigMap"), ("networking.k8s.io/v1", "NetworkPolicy"),
            ("apps/v1", "Deployment"), ("v1", "Service"))
OPTIONAL_PRUNABLE = (("cert-manager.io/v1", "Certificate"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
                     ("monitoring.coreos.com/v1", "PodMonitor"))  # their CRDs may not be installed
Clock = Callable[[], dt.datetime]
# Ready reasons of a FlowExporterConfig that stopped before deploying anything, on a problem
# of its own spec or references (the user fixes it there): such a one holds no nodes.
# Not here: WaitingForAggregator (valid, deploys as soon as its aggregator has issued the
# client certificate) and NodeConflict (valid, held back by another): those still hold, so
# that two valid FlowExporterConfigs never both deploy on the strength of a stale status.
DEPLOYS_NOTHING = frozenset({"InvalidSpec", "AggregatorNotFound", "AggregatorInvalid", "TransportMismatch",
                             "IssuerNotUsable", "TLSSecretInvalid", "NameConflict", "ApplyFailed"})


_SUFFIX = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
           "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
           "P": Decimal(10) ** 15, "E": Decimal(10) ** 18, "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20,
           "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60}
_QTY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?$")


def quantity(value: Any) -> Decimal | None:
    """A Kubernetes quantity as a number ("500m" -> 0.5, "1Gi" -> 1073741824), else None."""
    m = _QTY.match(str(value).strip())
    if m is None:
        return None
    try:
        return Decimal(m.group(1)) * _SUFFIX[m.group(2) or ""]
    except InvalidOperation:
        return None


def contains(live: Any, desired: Any, *, quantities: bool = False) -> bool:
    """Does ``live`` already hold every field of ``desired``? Lists must match item by item.

    Values under ``requests``/``limits`` compare as quantities, because the apiserver
    rewrites them in canonical form ("0.5" becomes "500m"): comparing text there would
    patch on every reconcile, and every patch would trigger the next reconcile.
    """
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return False
        return all(
            k in live and contains(live[k], v, quantities=quantities or k in ("requests", "limits"))
            for k, v in desired.items() if v is not None
        ) and all(k not in live or live[k] is None for k, v in desired.items() if v is None)
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(
            contains(a, b) for a, b in zip(live, desired, strict=True)
        )
    if quantities and not isinstance(desired, bool):
        a, b = quantity(live), quantity(desired)
        if a is not None and b is not None:
            return a == b
    if isinstance(desired, (int, float)) and isinstance(live, str) or isinstance(desired, str) and isinstance(
        live, (int, float)
    ):
        return str(live) == str(desired)
    return bool(live == desired)


def condition(type_: str, ok: bool | None, reason: str, message: str, generation: int | None,
              now: dt.datetime, previous: list[Mapping[str, Any]] | None) -> dict[str, Any]:
    """A status condition; ``ok`` None is Unknown. The transition time stays while the status does."""
    status = "Unknown" if ok is None else "True" if ok else "False"
    since = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    for old in previous or []:
        if old.get("type") == type_ and old.get("status") == status and old.get("lastTransitionTime"):
            since = old["lastTransitionTime"]
    cond: dict[str, Any] = {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


class OwnershipConflict(Exception):
    """Objects we would write exist and are controlled by someone else (all of them listed)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    ready: bool
    reason: str
    message: str
    writes: int  # objects created or patched (the status patch not counted)


@dataclass(frozen=True, slots=True)
class Rollout:
    """What a Deployment's or DaemonSet's status says about the pods of its newest spec."""

    desired: int
    updated: int
    ready: int
    available: int
    observed: bool  # the controller has seen the workload's current generation

    @property
    def done(self) -> bool:
        return self.observed and self.updated >= self.desired

    @classmethod
    def of(cls, workload: Mapping[str, Any] | None, desired: int | None = None) -> "Rollout":
        w = workload or {}
        st = w.get("status") or {}
        generation = int((w.get("metadata") or {}).get("generation") or 0)
        observed = bool(st) and int(st.get("observedGeneration") or 0) >= generation
        if w.get("kind") == "DaemonSet":
            return cls(int(st.get("desiredNumberScheduled") or 0), int(st.get("updatedNumberScheduled") or 0),
                       int(st.get("numberReady") or 0), int(st.get("numberAvailable") or 0), observed)
        want = desired if desired is not None else int((w.get("spec") or {}).get("replicas") or 1)
        total = int(st.get("replicas") or 0)
        updated = int(st.get("updatedReplicas") or 0)
        # old pods still running next to updated ones: not done (Recreate avoids it, but say so)
        return cls(want, updated if total <= updated else min(updated, want - 1),
                   int(st.get("readyReplicas") or 0), int(st.get("availableReplicas") or 0), observed)


def _b64d(data: Mapping[str, Any] | None, key: str) -> bytes | None:
    value = (data or {}).get(key)
    if not value:
        return None
    try:
        return base64.b64decode(value)
    except ValueError:
        return None


class Reconciler:
    """Reconciles both custom resources through a KubeApi; the clock is injected."""

    def __init__(self, api: KubeApi, *, image: str, clock: Clock | None = None):
        self.api = api
        self.image = image
        self.clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))

    # -- shared ---------------------------------------------------------------------------
    @staticmethod
    def _check_ownership(live: Mapping[str, Any], desired: Mapping[str, Any]) -> None:
        """Never take over an object someone else owns: a user's ConfigMap that happens to
        carry our name, or the objects of another custom resource of the same name (a
        FlowAggregator and a FlowExporterConfig both called X in one namespace)."""
        want = desired["metadata"]
        have = live.get("metadata") or {}
        desc = f"{desired['kind']} {want.get('namespace') + '/' if want.get('namespace') else ''}{want['name']}"
        adopt = (have.get("annotations") or {}).get(ADOPT_ANNOTATION) == "true"
        mine = [r for r in want.get("ownerReferences") or [] if r.get("controller")]
        if mine:
            theirs = [r for r in have.get("ownerReferences") or [] if r.get("controller")]
            if not theirs:
                if adopt:
                    return  # made by `flowscope render` (or by hand) and handed over: adopted on write
                raise OwnershipConflict(f"{desc} already exists and no custom resource controls it (created by "
                                        f"hand or by another tool); delete it, annotate it {ADOPT_ANNOTATION}=true "
                                        "to let the operator adopt it, or rename this resource")
            t, m = theirs[0], mine[0]
            # the same resource re-created (a new uid after an orphaning delete) may adopt its objects
            if t.get("uid") != m["uid"] and (t.get("kind"), t.get("name")) != (m["kind"], m["name"]):
                raise OwnershipConflict(f"{desc} belongs to {t.get('kind')} {t.get('name')}; give this "
                                        f"{m['kind']} another name")
            return
        labels = want.get("labels") or {}
        if "flowscope.dev/owner-name" in labels:  # cluster-scoped: ownership is in the labels
            live_labels = have.get("labels") or {}
            if adopt and "flowscope.dev/owner-name" not in live_labels:
                return
            for key in ("flowscope.dev/owner-namespace", "flowscope.dev/owner-name"):
                if live_labels.get(key) != labels[key]:
                    raise OwnershipConflict(f"{desc} already exists and is not this resource's (label {key} is "
                                            f"{live_labels.get(key)!r}); delete it or rename this resource")

    @staticmethod
    def _key(obj: Mapping[str, Any]) -> tuple[str, str, str | None, str]:
        meta = obj["metadata"]
        return obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]

    async def apply(self, desired: Mapping[str, Any], live: Mapping[str, Any] | None = None,
                    *, fetched: bool = False) -> str:
        """Create ``desired`` or patch the live object where it differs; "created",
        "updated" or "unchanged". ``fetched`` says ``live`` was just read (None: absent)."""
        key = self._key(desired)
        if not fetched:
            live = await self.api.get(*key)
        if live is None:
            try:
                await self.api.create(desired)
                return "created"
            except ApiError as exc:
                if exc.status != 409:
                    raise
                live = await self.api.get(*key)  # created concurrently: fall through to compare
                if live is None:
                    raise
        self._check_ownership(live, desired)
        if contains(live, desired):
            return "unchanged"
        await self.api.patch(*key, desired)
        return "updated"

    async def _apply_all(self, objects: list[dict[str, Any]], owner: Owner | None,
                         changed: list[str] | None = None) -> int:
        """Apply every object, but only after checking that none of them belongs to someone
        else: an ownership conflict writes nothing at all."""
        lives = [await self.api.get(*self._key(obj)) for obj in objects]
        changed = [] if changed is None else changed
        conflicts = []
        for obj, live in zip(objects, lives, strict=True):
            if live is not None:
                try:
                    self._check_ownership(live, obj)
                except OwnershipConflict as exc:
                    conflicts.append(str(exc))
        if conflicts:
            raise OwnershipConflict("; ".join(conflicts))
        writes = 0
        for obj, live in zip(objects, lives, strict=True):
            result = await self.apply(obj, live, fetched=True)
            if result != "unchanged":
                writes += 1
                changed.append(f"{result} {obj['kind']} {obj['metadata']['name']}")
                log.info("%s %s %s/%s for %s", result, obj["kind"], obj["metadata"].get("namespace", ""),
                         obj["metadata"]["name"], owner and f"{owner.kind} {owner.name}")
        if owner is not None:
            writes += await self._prune(objects, owner, changed)
        return writes

    async def _prune(self, desired: list[dict[str, Any]], owner: Owner, changed: list[str]) -> int:
        """Delete what this owner created before and no longer needs (e.g. TLS material after a
        switch to tcp). Only objects controlled by this very owner (uid) are candidates."""
        namespaces = {o["metadata"].get("namespace") for o in desired} - {None}
        keep = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in desired}
        deleted = 0
        for namespace in namespaces:
            for api_version, kind in PRUNABLE + OPTIONAL_PRUNABLE:
                try:
                    lives = await self.api.list(api_version, kind, namespace, {"app.kubernetes.io/managed-by": MANAGED_BY})
                except ApiError:
                    if (api_version, kind) in PRUNABLE:
                        raise
                    continue  # not installed here (e.g. no Prometheus operator)
                for live in lives:
                    meta = live.get("metadata") or {}
                    refs = meta.get("ownerReferences") or []
                    if not any(r.get("uid") == owner.uid and r.get("controller") for r in refs):
                        continue
                    if (kind, meta.get("namespace"), meta.get("name")) in keep:
                        continue
                    if await self.api.delete(api_version, kind, meta.get("namespace"), meta["name"]):
                        log.info("pruned %s %s/%s for %s %s", kind, meta.get("namespace"), meta["name"],
                                 owner.kind, owner.name)
                        changed.append(f"pruned {kind} {meta['name']}")
                        deleted += 1
        return deleted

    async def event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A Kubernetes Event on the resource; losing one never fails a reconcile."""
        meta = body.get("metadata") or {}
        now = self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")
        ns = meta.get("namespace") or "default"
        try:
            await self.api.create({
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:12]}", "namespace": ns},
                "involvedObject": {"apiVersion": API_VERSION, "kind": body.get("kind"), "name": meta.get("name"),
                                   "namespace": ns, "uid": meta.get("uid"),
                                   "resourceVersion": meta.get("resourceVersion")},
                "reason": reason, "message": message[:1024], "type": type_, "count": 1,
                "firstTimestamp": now, "lastTimestamp": now,
                "source": {"component": MANAGED_BY}, "reportingComponent": f"{MANAGED_BY}",
                "reportingInstance": os.environ.get("HOSTNAME", MANAGED_BY),
            })
        except (ApiError, OSError) as exc:
            log.warning("could not post the Event %s for %s %s/%s: %s", reason, body.get("kind"), ns,
                        meta.get("name"), exc)

    async def _set_status(self, body: Mapping[str, Any], ready: bool, reason: str, message: str,
                          extra: Mapping[str, Any], *, available: tuple[bool, str, str] | None = None,
                          progressing: tuple[bool, str, str] | None = None,
                          degraded: tuple[bool, str, str] | None = None) -> None:
        """Write the four conditions (those not given keep their last value, or Unknown)
        and ``extra``; post an Event when the Ready reason or message changes."""
        meta = body.get("metadata") or {}
        old = body.get("status") or {}
        previous = old.get("conditions") or []
        generation = meta.get("generation")
        now = self.clock()
        if degraded is None:
            degraded = (not ready and reason not in ("Deploying", "AggregatorNotReady"),
                        reason if not ready else "AsExpected",
                        message if not ready else "the spec is applied")
            if not degraded[0]:
                degraded = (False, "AsExpected", "the spec is applied")
        given = {"Ready": (ready, reason, message), "Available": available, "Progressing": progressing,
                 "Degraded": degraded}
        conditions = []
        for type_ in CONDITION_TYPES:
            value = given[type_]
            if value is None:
                kept = next((c for c in previous if c.get("type") == type_), None)
                if kept is not None:
                    conditions.append(dict(kept))
                    continue
                conditions.append(condition(type_, None, "NotYetKnown", "not determined yet", generation, now,
                                            previous))
                continue
            conditions.append(condition(type_, value[0], value[1], value[2], generation, now, previous))
        status: dict[str, Any] = {"conditions": conditions, **extra}
        if generation is not None:
            status["observedGeneration"] = generation
        if contains(old, status) and len(previous) == len(conditions):
            return
        await self.api.patch(API_VERSION, body["kind"], meta.get("namespace"), meta["name"],
                             {"status": status}, subresource="status")
        old_ready = next((c for c in previous if c.get("type") == "Ready"), {})
        if (old_ready.get("reason"), old_ready.get("message")) != (reason, message):
            await self.event(body, "Normal" if ready or not degraded[0] else "Warning", reason, message)

    async def _apply_or_fail(self, body: Mapping[str, Any], objects: list[dict[str, Any]], owner: Owner | None,
                             changed: list[str]) -> int | Outcome:
        """:meth:`_apply_all` (the number of writes), or the status of a stop on this object's own
        account: a name that someone else controls (NameConflict) or an object the API server
        refuses for good (ApplyFailed). A retryable API error goes up, for kopf to retry."""
        try:
            return await self._apply_all(objects, owner, changed)
        except OwnershipConflict as exc:
            return await self._fail(body, "NameConflict", str(exc))
        except ApiError as exc:
            if exc.retryable:
                raise
            return await self._fail(body, "ApplyFailed", f"the API server refused an object: {exc}")

    async def _fail(self, body: Mapping[str, Any], reason: str, message: str, extra: Mapping[str, Any] | None = None
                    ) -> Outcome:
        log.warning("%s %s/%s not ready: %s: %s", body.get("kind"), body["metadata"].get("namespace"),
                    body["metadata"].get("name"), reason, message)
        await self._set_status(body, False, reason, message, extra or {})
        return Outcome(False, reason, message, 0)

    async def _applied(self, body: Mapping[str, Any], changed: list[str]) -> None:
        if changed:
            what = ", ".join(changed[:12]) + (f" and {len(changed) - 12} more" if len(changed) > 12 else "")
            await self.event(body, "Normal", "Applied", what)

    @staticmethod
    def _owner(body: Mapping[str, Any]) -> Owner | None:
        meta = body.get("metadata") or {}
        return Owner(body["kind"], meta["name"], meta["uid"]) if meta.get("uid") else None

    # -- FlowAggregator -------------------------------------------------------------------
    async def tls_material(self, spec: FlowAggregatorSpec) -> tls.TLSMaterial:
        async def pair(secret: str) -> tls.KeyPair | None:
            obj = await self.api.get("v1", "Secret", spec.namespace, f"{spec.name}-{secret}")
            data = (obj or {}).get("data")
            return tls.load(_b64d(data, "tls.crt"), _b64d(data, "tls.key"))

        ca_secret = await self.api.get("v1", "Secret", spec.namespace, f"{spec.name}-ca")
        ca_data = (ca_secret or {}).get("data")
        stored = {"ca": tls.load(_b64d(ca_data, "tls.crt"), _b64d(ca_data, "tls.key")),
                  "next_ca": tls.load(_b64d(ca_data, "next.crt"), _b64d(ca_data, "next.key")),
                  "server": await pair("server-tls"), "client": await pair("client-tls"),
                  "api_client": await pair("api-client-tls")}
        names = tuple(dict.fromkeys((*spec.service_dns_names, spec.flow_aggregator_address)))
        return tls.ensure(
            stored, now=self.clock(), server_names=names, lifetime=spec.certificates.lifetime,
            ca_lifetime=spec.certificates.ca_lifetime, margin=spec.certificates.rotation_margin,
            ca_name=f"flowscope-ca {spec.namespace}/{spec.name}", previous_ca=_b64d(ca_data, "previous.crt"),
        )

    async def api_token(self, spec: FlowAggregatorSpec, suffix: str = "api-token") -> bytes:
        """A bearer token kept in Secret NAME-SUFFIX (the flow-records API's, or the deployed
        collector's ``ui-token``): the stored one, or a new random one."""
        secret = await self.api.get("v1", "Secret", spec.namespace, f"{spec.name}-{suffix}")
        return _b64d((secret or {}).get("data"), "token") or _secrets.token_hex(32).encode()

    async def aggregator(self, body: Mapping[str, Any]) -> Outcome:
        try:
            spec = parse_flow_aggregator(body)
        except SpecError as exc:
            return await self._fail(body, "InvalidSpec", str(exc))
        stores = [("spec.sinks.clickhouse", spec.clickhouse)]
        if spec.collector.enabled and spec.collector.clickhouse is not None:
            stores.append(("spec.collector.store.clickhouse", spec.collector.clickhouse))
        for field, ch in stores:
            if not (ch.enabled and ch.credentials_secret):
                continue
            secret = await self.api.get("v1", "Secret", spec.namespace, ch.credentials_secret)
            data = {**((secret or {}).get("data") or {}), **((secret or {}).get("stringData") or {})}
            missing = [k for k in (ch.username_key, ch.password_key) if k not in data]
            if secret is None or missing:
                what = "does not exist" if secret is None else f"has no key {', '.join(missing)}"
                return await self._fail(
                    body, "ClickHouseSecretInvalid",
                    f"{field}.credentialsSecretRef: Secret {spec.namespace}/{ch.credentials_secret} "
                    f"{what}; create it with keys {ch.username_key} and {ch.password_key}")
        own_tls = spec.transport in MUTUAL_TLS and spec.certificates.issuer is None
        material = await self.tls_material(spec) if own_tls else None
        token = await self.api_token(spec) if manifests.api_mode(spec) == "token" else None
        ui_token = await self.api_token(spec, "ui-token") if spec.collector.enabled else None
        owner = self._owner(body)
        objects = manifests.build_aggregator(spec, image=self.image, tls=material, owner=owner, api_token=token,
                                             ui_token=ui_token)
        changed: list[str] = []
        writes = await self._apply_or_fail(body, objects, owner, changed)
        if isinstance(writes, Outcome):
            return writes
        old_status = body.get("status") or {}
        retained = await self._collector_store(body, spec, owner, changed) if owner is not None else None
        await self._applied(body, changed)
        scheme = "https" if manifests.api_mode(spec) == "mtls" else "http"
        extra: dict[str, Any] = {
            "collectorAddress": spec.collector_address, "serverCertificateNotAfter": None,
            "apiEndpoint": f"{scheme}://{spec.name}.{spec.namespace}.svc:{manifests.API_PORT}",
            "retainedCollectorStore": retained,
        }
        if material is not None:
            extra["serverCertificateNotAfter"] = material.server.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
            before = old_status.get("serverCertificateNotAfter")
            if before and before != extra["serverCertificateNotAfter"]:
                await self.event(body, "Normal", "CertificateRotated",
                                 f"new server and client certificates, valid until {extra['serverCertificateNotAfter']}; "
                                 "pods roll to pick them up")
        deployment = await self.api.get("apps/v1", "Deployment", spec.namespace, spec.name)
        r = Rollout.of(deployment, spec.replicas)
        extra.update(replicas=spec.replicas, readyReplicas=r.ready, updatedReplicas=r.updated)
        where = f"Deployment {spec.namespace}/{spec.name}"
        available = (r.available >= spec.replicas,
                     "MinimumReplicasAvailable" if r.available >= spec.replicas else "MinimumReplicasUnavailable",
                     f"{where}: {r.available} of {spec.replicas} replicas available")
        progressing = _progressing(r, where, "replicas")
        if not available[0] or not r.done:
            message = f"applied; waiting for {where}: " + (progressing[2] if not r.done else available[2])
            await self._set_status(body, False, "Deploying", message, extra, available=available,
                                   progressing=progressing)
            return Outcome(False, "Deploying", message, writes)
        message = f"aggregator listening on {spec.collector_address}"
        await self._set_status(body, True, "Running", message, extra, available=available, progressing=progressing)
        return Outcome(True, "Running", message, writes)

    async def _collector_store(self, body: Mapping[str, Any], spec: FlowAggregatorSpec, owner: Owner,
                               changed: list[str]) -> str | None:
        """The collector's chDB claim once no collector uses it (switched off, or moved to a
        ClickHouse server): deleted with reclaimPolicy Delete, else kept and named in the
        status (an Event says so once). Only a claim this very FlowAggregator controls."""
        name = manifests.collector_store_claim(spec)
        if name is None:
            return None  # in use (or never made): nothing to decide
        live = await self.api.get("v1", "PersistentVolumeClaim", spec.namespace, name)
        refs = ((live or {}).get("metadata") or {}).get("ownerReferences") or []
        if live is None or not any(r.get("uid") == owner.uid and r.get("controller") for r in refs):
            return None
        if spec.collector.chdb_reclaim_policy == "Delete":
            if await self.api.delete("v1", "PersistentVolumeClaim", spec.namespace, name):
                log.info("deleted PersistentVolumeClaim %s/%s (reclaimPolicy Delete) for FlowAggregator %s",
                         spec.namespace, name, spec.name)
                changed.append(f"deleted PersistentVolumeClaim {name} (its stored flows)")
            return None
        if (body.get("status") or {}).get("retainedCollectorStore") != name:
            await self.event(body, "Normal", "CollectorStoreRetained",
                             f"PersistentVolumeClaim {name} keeps the stored flows although no collector uses "
                             "it; enabling the chDB collector again reuses it; set "
                             "spec.collector.store.chdb.reclaimPolicy: Delete (or delete it) to free it")
        return name

    # -- FlowExporterConfig ---------------------------------------------------------------
    async def _runs_agents(self, body: Mapping[str, Any]) -> bool:
        """This FlowExporterConfig controls a live DaemonSet: its agents run on its nodes."""
        meta = body.get("metadata") or {}
        ds = await self.api.get("apps/v1", "DaemonSet", meta.get("namespace") or "default", meta["name"])
        ds_meta = (ds or {}).get("metadata") or {}
        refs = ds_meta.get("ownerReferences") or []
        return (ds is not None and not ds_meta.get("deletionTimestamp")
                and any(r.get("uid") == meta.get("uid") and r.get("controller") for r in refs))

    async def node_conflict(self, body: Mapping[str, Any], spec: FlowExporterConfigSpec) -> str | None:
        """The FlowExporterConfigs that hold nodes this one selects, ahead of it.

        One agent per node. A FlowExporterConfig holds its nodes while its agents run there (it
        controls a DaemonSet), or while it is on its way to run them: everything but one whose
        reconcile of its current generation stopped on a problem of its own (``DEPLOYS_NOTHING``),
        so a FlowExporterConfig with a typo or a dangling reference never keeps a valid one off
        the nodes. Of two that hold overlapping nodes, the one running agents goes first (creating
        or fixing a FlowExporterConfig never tears down agents that run), then the older
        (creationTimestamp; within one second, namespace then name). Every FlowExporterConfig
        judges with the same order, so of two the other one yields."""
        mine = manifests.node_constraints(spec)
        me = (0 if await self._runs_agents(body) else 1, *_age_key(body))
        ahead = []
        for other in await self.api.list(API_VERSION, "FlowExporterConfig"):
            meta = other.get("metadata") or {}
            if meta.get("uid") == (body.get("metadata") or {}).get("uid") or meta.get("deletionTimestamp"):
                continue
            try:
                theirs = parse_flow_exporter_config(other)
            except SpecError:
                continue  # deploys nothing
            if not manifests.selectors_overlap(mine, manifests.node_constraints(theirs)):
                continue
            running = await self._runs_agents(other)
            if not running and _stopped_on_its_own(other):
                continue
            if (0 if running else 1, *_age_key(other)) >= me:
                continue
            why = "its agents run there" if running else "older, its agents are being deployed"
            ahead.append(f"{theirs.namespace}/{theirs.name} (nodeSelector {manifests.agent_node_selector(theirs)}; "
                         f"{why})")
        if not ahead:
            return None
        return (f"nodes this FlowExporterConfig selects (nodeSelector {manifests.agent_node_selector(spec)}) are "
                f"held by FlowExporterConfig {', '.join(ahead)}: one agent per node only, so nothing is deployed "
                "for this one; make them exclusive (a label key with different values, or a required node "
                "affinity NotIn/DoesNotExist on the other's label), or delete one")

    async def exporter(self, body: Mapping[str, Any]) -> Outcome:
        try:
            spec = parse_flow_exporter_config(body)
        except SpecError as exc:
            return await self._fail(body, "InvalidSpec", str(exc))
        aggregator: FlowAggregatorSpec | None = None
        fa_body: Mapping[str, Any] | None = None
        agent_tls: AgentTLS | None = None
        if spec.aggregator_ref is not None:
            ref = spec.aggregator_ref
            fa_body = await self.api.get(API_VERSION, "FlowAggregator", ref.namespace, ref.name)
            if fa_body is not None:
                try:
                    aggregator = parse_flow_aggregator(fa_body)
                except SpecError as exc:
                    return await self._fail(
                        body, "AggregatorInvalid",
                        f"FlowAggregator {ref.namespace}/{ref.name} has an invalid spec; fix it first: {exc}")
        try:
            collector, server_name = manifests.resolve_collector(spec, aggregator)
            cert_manager = manifests.agent_cert_manager(spec, aggregator)
        except SpecError as exc:
            reason = ("AggregatorNotFound" if aggregator is None else
                      "TransportMismatch" if "spec.transport" in str(exc) else "IssuerNotUsable")
            return await self._fail(body, reason, str(exc))
        if aggregator is not None and aggregator.transport in MUTUAL_TLS and cert_manager is None:
            secret = await self.api.get("v1", "Secret", aggregator.namespace, f"{aggregator.name}-client-tls")
            data = (secret or {}).get("data")
            client = tls.load(_b64d(data, "tls.crt"), _b64d(data, "tls.key"))
            ca_pem = _b64d(data, "ca.crt")
            if client is None or ca_pem is None:
                return await self._fail(
                    body, "WaitingForAggregator",
                    f"FlowAggregator {aggregator.namespace}/{aggregator.name} has not issued the agents' client "
                    "certificate yet; it will be picked up on the next reconcile")
            agent_tls = AgentTLS(ca_pem, client)
        if collector.mutual_tls and agent_tls is None and cert_manager is None and spec.tls_secret:
            user_secret = await self.api.get("v1", "Secret", spec.namespace, spec.tls_secret)
            missing = [k for k in ("ca.crt", "tls.crt", "tls.key") if not (user_secret or {}).get("data", {}).get(k)]
            if missing:
                return await self._fail(
                    body, "TLSSecretInvalid",
                    f"spec.tlsSecretName: Secret {spec.namespace}/{spec.tls_secret} "
                    f"{'does not exist' if user_secret is None else 'lacks ' + ', '.join(missing)}; "
                    "it must hold ca.crt, tls.crt and tls.key")
        conflict = await self.node_conflict(body, spec)
        if conflict is not None:
            owner = self._owner(body)
            ds = await self.api.get("apps/v1", "DaemonSet", spec.namespace, spec.name)
            refs = ((ds or {}).get("metadata") or {}).get("ownerReferences") or []
            if ds is not None and owner is not None and any(r.get("uid") == owner.uid for r in refs):
                await self.api.delete("apps/v1", "DaemonSet", spec.namespace, spec.name)
                log.info("deleted DaemonSet %s/%s for FlowExporterConfig %s: node conflict", spec.namespace,
                         spec.name, spec.name)
            return await self._fail(body, "NodeConflict", conflict)
        await self._ensure_finalizer(body)
        owner = self._owner(body)
        objects = manifests.build_agent(spec, image=self.image, collector=collector, server_name=server_name,
                                        tls=agent_tls, owner=owner, cert_manager=cert_manager)
        changed: list[str] = []
        writes = await self._apply_or_fail(body, objects, owner, changed)
        if isinstance(writes, Outcome):
            return writes
        await self._applied(body, changed)
        ds = await self.api.get("apps/v1", "DaemonSet", spec.namespace, spec.name)
        r = Rollout.of(ds)
        extra: dict[str, Any] = {"collectorAddress": str(collector), "desiredAgents": r.desired,
                                 "readyAgents": r.ready, "updatedAgents": r.updated}
        where = f"DaemonSet {spec.namespace}/{spec.name}"
        if r.desired == 0:
            why = (f"no node matches spec.nodeSelector {dict(spec.node_selector)}" if spec.node_selector else
                   "no Linux node can run it yet (check the nodes' kubernetes.io/os label and taints)")
            available = (False, "NoNodes", f"{where} wants 0 agents: {why}")
        else:
            ok = r.available >= r.desired
            available = (ok, "AgentsAvailable" if ok else "AgentsUnavailable",
                         f"{where}: {r.available} of {r.desired} agents available")
        progressing = _progressing(r, where, "agents")
        if not available[0] or not r.done:
            message = f"applied; waiting for {where}: " + (progressing[2] if not r.done else available[2])
            await self._set_status(body, False, "Deploying", message, extra, available=available,
                                   progressing=progressing)
            return Outcome(False, "Deploying", message, writes)
        if fa_body is not None:
            fa_ready = next((c for c in (fa_body.get("status") or {}).get("conditions") or []
                             if c.get("type") == "Ready"), {})
            if fa_ready.get("status") != "True":
                ref = spec.aggregator_ref
                assert ref is not None
                message = (f"{r.ready} agents ready, but FlowAggregator {ref.namespace}/{ref.name} is not Ready "
                           f"({fa_ready.get('reason', 'no status yet')}: {fa_ready.get('message', '')}); "
                           "records wait in the agents until it is")
                await self._set_status(body, False, "AggregatorNotReady", message, extra, available=available,
                                       progressing=progressing)
                return Outcome(False, "AggregatorNotReady", message, writes)
        message = f"{r.ready} agents exporting to {collector}"
        await self._set_status(body, True, "Running", message, extra, available=available, progressing=progressing)
        return Outcome(True, "Running", message, writes)

    async def _ensure_finalizer(self, body: Mapping[str, Any]) -> None:
        """Put the finalizer on before the agents' cluster-scoped RBAC exists. kopf adds it too,
        but with a JSON patch guarded by the resourceVersion it read: when a status patch of
        ours lands in between, the API server answers 422 and kopf waits for the resource's next
        event, which a settled resource never has (seen in the emulator tests: a FlowExporterConfig
        left without it, so its RBAC would outlive it). Guarded the same way (409 on a stale
        version: the next reconcile tries again) and keeping any other finalizer."""
        meta = body.get("metadata") or {}
        present = list(meta.get("finalizers") or [])
        if FINALIZER in present or meta.get("deletionTimestamp") or not meta.get("resourceVersion"):
            return
        await self.api.patch(API_VERSION, "FlowExporterConfig", meta.get("namespace"), meta["name"],
                             {"metadata": {"finalizers": [*present, FINALIZER],
                                           "resourceVersion": meta["resourceVersion"]}})

    async def collect_orphans(self) -> int:
        """Delete agents' cluster-scoped RBAC whose FlowExporterConfig is gone: what the
        finalizer would have done had it run (a FlowExporterConfig deleted while no operator
        ran and its finalizer removed by hand). Returns how many objects were deleted."""
        alive = {((f.get("metadata") or {}).get("namespace"), (f.get("metadata") or {}).get("name"))
                 for f in await self.api.list(API_VERSION, "FlowExporterConfig")}
        deleted = 0
        for kind in ("ClusterRoleBinding", "ClusterRole"):
            for obj in await self.api.list("rbac.authorization.k8s.io/v1", kind, None,
                                           {"app.kubernetes.io/managed-by": MANAGED_BY}):
                labels = (obj.get("metadata") or {}).get("labels") or {}
                owner = (labels.get("flowscope.dev/owner-namespace"), labels.get("flowscope.dev/owner-name"))
                if owner[1] and owner not in alive:
                    if await self.api.delete("rbac.authorization.k8s.io/v1", kind, None, obj["metadata"]["name"]):
                        log.info("deleted %s %s: FlowExporterConfig %s/%s no longer exists", kind,
                                 obj["metadata"]["name"], *owner)
                        deleted += 1
        return deleted

    async def exporter_cleanup(self, body: Mapping[str, Any]) -> None:
        """Delete the cluster-scoped objects (owner references cannot cover them)."""
        meta = body["metadata"]
        name = f"flowscope-agent-{meta.get('namespace') or 'default'}-{meta['name']}"
        for kind in ("ClusterRoleBinding", "ClusterRole"):
            await self.api.delete("rbac.authorization.k8s.io/v1", kind, None, name)


def _stopped_on_its_own(body: Mapping[str, Any]) -> bool:
    """Its Ready condition, for its current generation, says it deployed nothing because of
    its own spec or references."""
    meta = body.get("metadata") or {}
    for cond in (body.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return (cond.get("status") == "False" and cond.get("reason") in DEPLOYS_NOTHING
                    and cond.get("observedGeneration") is not None
                    and cond.get("observedGeneration") == meta.get("generation"))
    return False


def _age_key(body: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = body.get("metadata") or {}
    return (str(meta.get("creationTimestamp") or "9999"), str(meta.get("namespace") or ""), str(meta.get("name")))


def _progressing(r: Rollout, where: str, what: str) -> tuple[bool, str, str]:
    if not r.observed:
        return True, "RolloutPending", f"{where} has not observed its newest spec yet"
    if r.updated < r.desired:
        return True, "RollingOut", f"{where}: {r.updated} of {r.desired} {what} updated to the newest spec"
    return False, "RolloutComplete", f"{where}: all {r.desired} {what} run the newest spec"
