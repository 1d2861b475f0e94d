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
   nothing at all. Secrets and ConfigMaps this resource controlled earlier but no longer
   needs (TLS material after a switch to tcp) are deleted.
5. Status: ``observedGeneration``, ``Ready`` (with reason/message) and a few facts,
   patched through the status subresource only when it changed.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from flowscope.operator import manifests, tls
from flowscope.operator.kube import ApiError, KubeApi
from flowscope.operator.manifests import MANAGED_BY, AgentTLS, Owner
from flowscope.operator.spec import (
    API_VERSION, FlowAggregatorSpec, SpecError, parse_flow_aggregator, parse_flow_exporter_config,
)

__all__ = ["Reconciler", "Outcome", "contains", "condition"]

log = logging.getLogger("flowscope.operator")
# Kinds whose presence depends on the spec (TLS material, per-transport objects).
PRUNABLE = (("v1", "Secret"), ("v1", "ConfigMap"))
Clock = Callable[[], dt.datetime]


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


def condition(type_: str, ok: bool, reason: str, message: str, generation: int | None,
              now: dt.datetime, previous: list[Mapping[str, Any]] | None) -> dict[str, Any]:
    status = "True" if ok else "False"
    since = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    for old in previous or []:
        if old.get("type") == type_ and old.get("status") == status and old.get("lastTransitionTime"):
            since = old["lastTransitionTime"]
    cond: dict[str, Any] = {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


class OwnershipConflict(Exception):
    """An object we would write exists and is controlled by someone else."""


@dataclass(frozen=True, slots=True)
class Outcome:
    ready: bool
    reason: str
    message: str
    writes: int  # objects created or patched (the status patch not counted)


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
        mine = [r for r in want.get("ownerReferences") or [] if r.get("controller")]
        if mine:
            theirs = [r for r in have.get("ownerReferences") or [] if r.get("controller")]
            if not theirs:
                raise OwnershipConflict(f"{desc} already exists and no custom resource controls it (created by "
                                        "hand or by another tool); delete or rename it, or rename this resource")
            t, m = theirs[0], mine[0]
            # the same resource re-created (a new uid after an orphaning delete) may adopt its objects
            if t.get("uid") != m["uid"] and (t.get("kind"), t.get("name")) != (m["kind"], m["name"]):
                raise OwnershipConflict(f"{desc} belongs to {t.get('kind')} {t.get('name')}; give this "
                                        f"{m['kind']} another name")
            return
        labels = want.get("labels") or {}
        if "flowscope.dev/owner-name" in labels:  # cluster-scoped: ownership is in the labels
            live_labels = have.get("labels") or {}
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

    async def _apply_all(self, objects: list[dict[str, Any]], owner: Owner | None) -> int:
        """Apply every object, but only after checking that none of them belongs to someone
        else: an ownership conflict writes nothing at all."""
        lives = [await self.api.get(*self._key(obj)) for obj in objects]
        for obj, live in zip(objects, lives, strict=True):
            if live is not None:
                self._check_ownership(live, obj)
        writes = 0
        for obj, live in zip(objects, lives, strict=True):
            result = await self.apply(obj, live, fetched=True)
            if result != "unchanged":
                writes += 1
                log.info("%s %s %s/%s", result, obj["kind"], obj["metadata"].get("namespace", ""),
                         obj["metadata"]["name"])
        if owner is not None:
            writes += await self._prune(objects, owner)
        return writes

    async def _prune(self, desired: list[dict[str, Any]], owner: Owner) -> int:
        """Delete what this owner created before and no longer needs (e.g. TLS material after a
        switch to tcp). Only objects controlled by this very owner (uid) are candidates."""
        namespaces = {o["metadata"].get("namespace") for o in desired} - {None}
        keep = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in desired}
        deleted = 0
        for namespace in namespaces:
            for api_version, kind in PRUNABLE:
                for live in await self.api.list(api_version, kind, namespace, {"app.kubernetes.io/managed-by": MANAGED_BY}):
                    meta = live.get("metadata") or {}
                    refs = meta.get("ownerReferences") or []
                    if not any(r.get("uid") == owner.uid and r.get("controller") for r in refs):
                        continue
                    if (kind, meta.get("namespace"), meta.get("name")) in keep:
                        continue
                    if await self.api.delete(api_version, kind, meta.get("namespace"), meta["name"]):
                        log.info("pruned %s %s/%s", kind, meta.get("namespace"), meta["name"])
                        deleted += 1
        return deleted

    async def _set_status(self, body: Mapping[str, Any], ready: bool, reason: str, message: str,
                          extra: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        old = body.get("status") or {}
        generation = meta.get("generation")
        cond = condition("Ready", ready, reason, message, generation, self.clock(), old.get("conditions"))
        status: dict[str, Any] = {"conditions": [cond], **extra}
        if generation is not None:
            status["observedGeneration"] = generation
        if contains(old, status) and len(old.get("conditions") or []) == 1:
            return
        await self.api.patch(API_VERSION, body["kind"], meta.get("namespace"), meta["name"],
                             {"status": status}, subresource="status")

    async def _fail(self, body: Mapping[str, Any], reason: str, message: str, extra: Mapping[str, Any] | None = None
                    ) -> Outcome:
        log.warning("%s %s/%s not ready: %s: %s", body.get("kind"), body["metadata"].get("namespace"),
                    body["metadata"].get("name"), reason, message)
        await self._set_status(body, False, reason, message, extra or {})
        return Outcome(False, reason, message, 0)

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
                  "server": await pair("server-tls"), "client": await pair("client-tls")}
        names = tuple(dict.fromkeys((*spec.service_dns_names, spec.flow_aggregator_address)))
        return tls.ensure(
            stored, now=self.clock(), server_names=names, lifetime=spec.certificates.lifetime,
            ca_lifetime=spec.certificates.ca_lifetime, margin=spec.certificates.rotation_margin,
            ca_name=f"flowscope-ca {spec.namespace}/{spec.name}", previous_ca=_b64d(ca_data, "previous.crt"),
        )

    async def aggregator(self, body: Mapping[str, Any]) -> Outcome:
        try:
            spec = parse_flow_aggregator(body)
        except SpecError as exc:
            return await self._fail(body, "InvalidSpec", str(exc))
        ch = spec.clickhouse
        if ch.enabled and ch.credentials_secret:
            secret = await self.api.get("v1", "Secret", spec.namespace, ch.credentials_secret)
            data = {**((secret or {}).get("data") or {}), **((secret or {}).get("stringData") or {})}
            missing = [k for k in (ch.username_key, ch.password_key) if k not in data]
            if secret is None or missing:
                what = "does not exist" if secret is None else f"has no key {', '.join(missing)}"
                return await self._fail(
                    body, "ClickHouseSecretInvalid",
                    f"spec.sinks.clickhouse.credentialsSecretRef: Secret {spec.namespace}/{ch.credentials_secret} "
                    f"{what}; create it with keys {ch.username_key} and {ch.password_key}")
        material = await self.tls_material(spec) if spec.transport == "tls" else None
        owner = self._owner(body)
        objects = manifests.build_aggregator(spec, image=self.image, tls=material, owner=owner)
        try:
            writes = await self._apply_all(objects, owner)
        except OwnershipConflict as exc:
            return await self._fail(body, "NameConflict", str(exc))
        except ApiError as exc:
            if exc.retryable:
                raise
            return await self._fail(body, "ApplyFailed", f"the API server refused an object: {exc}")
        extra: dict[str, Any] = {"collectorAddress": spec.collector_address, "serverCertificateNotAfter": None}
        if material is not None:
            extra["serverCertificateNotAfter"] = material.server.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        deployment = await self.api.get("apps/v1", "Deployment", spec.namespace, spec.name) or {}
        available = int((deployment.get("status") or {}).get("availableReplicas") or 0)
        if available < spec.replicas:
            message = (f"applied; waiting for Deployment {spec.namespace}/{spec.name}: "
                       f"{available} of {spec.replicas} replicas available")
            await self._set_status(body, False, "Deploying", message, extra)
            return Outcome(False, "Deploying", message, writes)
        message = f"aggregator listening on {spec.collector_address}"
        await self._set_status(body, True, "Running", message, extra)
        return Outcome(True, "Running", message, writes)

    # -- FlowExporterConfig ---------------------------------------------------------------
    async def exporter(self, body: Mapping[str, Any]) -> Outcome:
        try:
            spec = parse_flow_exporter_config(body)
        except SpecError as exc:
            return await self._fail(body, "InvalidSpec", str(exc))
        aggregator: FlowAggregatorSpec | None = None
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
        except SpecError as exc:
            reason = "AggregatorNotFound" if aggregator is None else "TransportMismatch"
            return await self._fail(body, reason, str(exc))
        if aggregator is not None and aggregator.transport == "tls":
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
        if collector.protocol == "tls" and agent_tls is None and spec.tls_secret:
            user_secret = await self.api.get("v1", "Secret", spec.namespace, spec.tls_secret)
            missing = [k for k in ("ca.crt", "tls.crt", "tls.key") if not (user_secret or {}).get("data", {}).get(k)]
            if missing:
                return await self._fail(
                    body, "TLSSecretInvalid",
                    f"spec.tlsSecretName: Secret {spec.namespace}/{spec.tls_secret} "
                    f"{'does not exist' if user_secret is None else 'lacks ' + ', '.join(missing)}; "
                    "it must hold ca.crt, tls.crt and tls.key")
        owner = self._owner(body)
        objects = manifests.build_agent(spec, image=self.image, collector=collector, server_name=server_name,
                                        tls=agent_tls, owner=owner)
        try:
            writes = await self._apply_all(objects, owner)
        except OwnershipConflict as exc:
            return await self._fail(body, "NameConflict", str(exc))
        except ApiError as exc:
            if exc.retryable:
                raise
            return await self._fail(body, "ApplyFailed", f"the API server refused an object: {exc}")
        extra = {"collectorAddress": str(collector)}
        ds = await self.api.get("apps/v1", "DaemonSet", spec.namespace, spec.name) or {}
        st = ds.get("status") or {}
        desired_n, ready_n = int(st.get("desiredNumberScheduled") or 0), int(st.get("numberReady") or 0)
        if desired_n == 0 or ready_n < desired_n:
            message = (f"applied; waiting for DaemonSet {spec.namespace}/{spec.name}: {ready_n} of {desired_n} "
                       "agents ready" + (" (no node matches spec.nodeSelector yet)" if desired_n == 0 else ""))
            await self._set_status(body, False, "Deploying", message, extra)
            return Outcome(False, "Deploying", message, writes)
        message = f"{ready_n} agents exporting to {collector}"
        await self._set_status(body, True, "Running", message, extra)
        return Outcome(True, "Running", message, writes)

    async def exporter_cleanup(self, body: Mapping[str, Any]) -> None:
        """Delete the cluster-scoped objects (owner references cannot cover them)."""
        meta = body["metadata"]
        name = f"flowscope-agent-{meta.get('namespace') or 'default'}-{meta['name']}"
        for kind in ("ClusterRoleBinding", "ClusterRole"):
            await self.api.delete("rbac.authorization.k8s.io/v1", kind, None, name)
