"""The operator's small window onto the Kubernetes API.

kopf watches the custom resources; creating, reading and patching the objects they own
goes through this module: five verbs over plain dicts (get, list, create, merge-patch,
delete) for the handful of kinds the operator manages, on aiohttp (which kopf already
brings). Keeping the surface this small keeps the reconciler testable against any API
server speaking HTTP (the tests use kmock's emulator) and leaves discovery out: the kinds
are known.

``Connection`` is resolved once at start: in a Pod from the mounted ServiceAccount (the
token file is re-read on each request, as bound tokens rotate), otherwise from the
kubeconfig through the kubernetes client's loader.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp

from flowscope import __version__
from flowscope.operator.spec import API_VERSION

__all__ = ["Connection", "KubeApi", "ApiError", "KINDS", "resource_path"]

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
USER_AGENT = f"flowscope-operator/{__version__}"

# (apiVersion, kind) -> (plural, namespaced)
KINDS: dict[tuple[str, str], tuple[str, bool]] = {
    ("v1", "Namespace"): ("namespaces", False),
    ("v1", "ServiceAccount"): ("serviceaccounts", True),
    ("v1", "ConfigMap"): ("configmaps", True),
    ("v1", "Secret"): ("secrets", True),
    ("v1", "Service"): ("services", True),
    ("v1", "PersistentVolumeClaim"): ("persistentvolumeclaims", True),
    ("v1", "Event"): ("events", True),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("networkpolicies", True),
    ("coordination.k8s.io/v1", "Lease"): ("leases", True),
    ("cert-manager.io/v1", "Certificate"): ("certificates", True),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("servicemonitors", True),
    ("monitoring.coreos.com/v1", "PodMonitor"): ("podmonitors", True),
    ("apps/v1", "Deployment"): ("deployments", True),
    ("apps/v1", "DaemonSet"): ("daemonsets", True),
    ("rbac.authorization.k8s.io/v1", "Role"): ("roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("rolebindings", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): ("clusterroles", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): ("clusterrolebindings", False),
    (API_VERSION, "FlowAggregator"): ("flowaggregators", True),
    (API_VERSION, "FlowExporterConfig"): ("flowexporterconfigs", True),
}


class ApiError(Exception):
    """An answer of the API server other than success (or a 404 where None is returned)."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(f"HTTP {status}: {message}")

    @property
    def retryable(self) -> bool:
        return self.status in (409, 429) or self.status >= 500


def resource_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    try:
        plural, namespaced = KINDS[(api_version, kind)]
    except KeyError:
        raise ValueError(f"the operator does not manage {kind} ({api_version})") from None
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespaced and namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    return f"{base}/{name}" if name else base


@dataclass(frozen=True, slots=True)
class Connection:
    server: str
    token_file: str | None = None
    token: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    @classmethod
    def in_cluster(cls) -> Connection:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", token_file=f"{SA_DIR}/token", ca_file=f"{SA_DIR}/ca.crt")

    @classmethod
    def from_kubeconfig(cls, context: str | None = None) -> Connection:
        from kubernetes import client, config  # heavy; only outside a Pod

        cfg = client.Configuration()
        config.load_kube_config(context=context, client_configuration=cfg)  # type: ignore[no-untyped-call]
        keys = cfg.api_key or {}
        raw = str(keys.get("authorization") or keys.get("BearerToken") or "")
        token = raw.removeprefix("Bearer ").strip() or None
        return cls(cfg.host, token=token, ca_file=cfg.ssl_ca_cert, cert_file=cfg.cert_file,
                   key_file=cfg.key_file, insecure=not cfg.verify_ssl)

    @classmethod
    def detect(cls, context: str | None = None) -> Connection:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(f"{SA_DIR}/token") and not context:
            return cls.in_cluster()
        return cls.from_kubeconfig(context)

    def bearer(self) -> str | None:
        if self.token_file:
            with open(self.token_file) as f:
                return f.read().strip()
        return self.token

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


class KubeApi:
    """get / list / create / patch / delete of plain-dict objects; 404 reads as None or False."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.connection.ssl_context()),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        token = self.connection.bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        async with self._session.request(method, self.connection.server + path, data=data, headers=headers) as resp:
            text = await resp.text()
            if resp.status == 404:
                return None
            if resp.status >= 400:
                try:
                    message = json.loads(text).get("message") or text
                except ValueError:
                    message = text
                raise ApiError(resp.status, f"{method} {path}: {message[:500]}")
            return json.loads(text) if text else {}

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return await self._request("GET", resource_path(api_version, kind, namespace, name))  # type: ignore[no-any-return]

    async def list(self, api_version: str, kind: str, namespace: str | None = None,
                   labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        path = resource_path(api_version, kind, namespace)
        if labels:
            path += "?" + urlencode({"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())})
        answer = await self._request("GET", path)
        items = list((answer or {}).get("items") or [])
        if labels:  # defensive: not every server filters by labels
            items = [i for i in items if all((i.get("metadata", {}).get("labels") or {}).get(k) == v
                                             for k, v in labels.items())]
        return items

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj.get("metadata") or {}
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        answer = await self._request("POST", path, obj)
        if answer is None:
            raise ApiError(404, f"POST {path}: the namespace or the resource type does not exist")
        return answer  # type: ignore[no-any-return]

    async def patch(self, api_version: str, kind: str, namespace: str | None, name: str, patch: Mapping[str, Any],
                    *, subresource: str | None = None) -> dict[str, Any] | None:
        path = resource_path(api_version, kind, namespace, name)
        if subresource:
            path += f"/{subresource}"
        return await self._request("PATCH", path, patch, "application/merge-patch+json")  # type: ignore[no-any-return]

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        answer = await self._request("DELETE", resource_path(api_version, kind, namespace, name),
                                     {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
        return answer is not None
