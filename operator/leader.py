"""Leader election between the operator's replicas, on a coordination.k8s.io Lease.

Two replicas of the operator run (config/operator/deployment.yaml); only the one holding
the Lease reconciles, the other stands by and takes over when the holder stops renewing
(a crashed pod, a lost node) or gives the Lease up (a graceful stop). The protocol is
client-go's: the holder renews ``renewTime`` every ``renew`` seconds; a Lease whose
``renewTime`` is older than ``leaseDurationSeconds`` is free; every write carries the
resourceVersion read, so of two replicas racing for a free Lease the API server lets
exactly one win (409 Conflict for the other). A holder that cannot renew within the
lease duration stops reconciling at once (``lost``), because by then a standby may hold
the Lease.

Time comes from an injected clock; nothing here knows kopf.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from flowscope.operator.kube import ApiError, KubeApi

__all__ = ["LeaseElector"]

log = logging.getLogger("flowscope.operator")
LEASE = ("coordination.k8s.io/v1", "Lease")
Clock = Callable[[], dt.datetime]


def _micro(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    for fmt in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return dt.datetime.strptime(text, fmt).replace(tzinfo=dt.timezone.utc)
        except ValueError:
            continue
    return None


class LeaseElector:
    def __init__(self, api: KubeApi, namespace: str, name: str, identity: str, *, lease_seconds: float = 15,
                 renew_seconds: float = 5, clock: Clock | None = None):
        if renew_seconds >= lease_seconds:
            raise ValueError("the renew period must be shorter than the lease duration")
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
        self.clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))
        self.lost = asyncio.Event()
        self._last_renew: dt.datetime | None = None

    async def try_acquire(self) -> bool:
        """One attempt to take or renew the Lease; True when we hold it afterwards."""
        now = self.clock()
        lease = await self.api.get(*LEASE, self.namespace, self.name)
        spec: dict[str, Any] = {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.lease_seconds),
                                "renewTime": _micro(now)}
        if lease is None:
            spec.update(acquireTime=_micro(now), leaseTransitions=0)
            try:
                await self.api.create({"apiVersion": LEASE[0], "kind": LEASE[1],
                                       "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec})
            except ApiError as exc:
                if exc.status == 409:
                    return False
                raise
            self._last_renew = now
            return True
        current = lease.get("spec") or {}
        holder = current.get("holderIdentity") or ""
        renewed = _parse(current.get("renewTime"))
        duration = dt.timedelta(seconds=int(current.get("leaseDurationSeconds") or self.lease_seconds))
        expired = renewed is None or renewed + duration < now
        if holder and holder != self.identity and not expired:
            return False
        if holder != self.identity:
            spec.update(acquireTime=_micro(now), leaseTransitions=int(current.get("leaseTransitions") or 0) + 1)
        patch = {"metadata": {"resourceVersion": lease["metadata"].get("resourceVersion")}, "spec": spec}
        try:
            await self.api.patch(*LEASE, self.namespace, self.name, patch)
        except ApiError as exc:
            if exc.status == 409:  # someone else wrote first
                return False
            raise
        if holder != self.identity:
            log.info("leader election: %s took the Lease %s/%s from %r", self.identity, self.namespace,
                     self.name, holder)
        self._last_renew = now
        return True

    async def acquire(self) -> None:
        """Wait until we hold the Lease (standing by meanwhile)."""
        announced = False
        while True:
            try:
                if await self.try_acquire():
                    return
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.warning("leader election: %s", exc)
            if not announced:
                log.info("leader election: %s stands by; another replica holds the Lease %s/%s", self.identity,
                         self.namespace, self.name)
                announced = True
            await asyncio.sleep(self.renew_seconds)

    async def keep(self) -> None:
        """Renew until cancelled; set ``lost`` (and return) when the Lease is lost."""
        while True:
            await asyncio.sleep(self.renew_seconds)
            try:
                if await self.try_acquire():
                    continue
                log.error("leader election: the Lease %s/%s was taken over", self.namespace, self.name)
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                last = self._last_renew or self.clock()
                if self.clock() - last < dt.timedelta(seconds=self.lease_seconds - self.renew_seconds):
                    log.warning("leader election: renewal failed, retrying: %s", exc)
                    continue
                log.error("leader election: could not renew the Lease in time: %s", exc)
            self.lost.set()
            return

    async def release(self) -> None:
        """Give the Lease up (a graceful stop): a standby takes over at its next attempt."""
        try:
            lease = await self.api.get(*LEASE, self.namespace, self.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                await self.api.patch(*LEASE, self.namespace, self.name, {
                    "metadata": {"resourceVersion": lease["metadata"].get("resourceVersion")},
                    "spec": {"holderIdentity": "", "renewTime": _micro(self.clock() - dt.timedelta(days=1))}})
        except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("leader election: could not release the Lease: %s", exc)
