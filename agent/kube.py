"""Kubernetes metadata through the API: list and watch what enrichment and policies need.

One daemon thread per kind lists the objects (in pages of 500), then watches from the
list's resourceVersion; a watch that ends or expires (410 Gone) starts over with a
fresh list, and objects missing from the new list are removed. Errors back off
exponentially (1 s to 30 s) and never stop the agent: records are exported all along,
with whatever the inventory knows at that moment.

What is watched, and why:
- Pods: the Pods of this node for names and for the policies that isolate them, and
  (``watchRemotePods``, default on) the Pods of every node, because NetworkPolicy peers
  are selected by label and the far end of a connection may live elsewhere. Each Pod
  is kept slim (namespace, name, node, IPs, labels, named ports: about 0.9 KB measured
  with five labels), so 100k Pods cost about 90 MB; without remote Pods, peers on other nodes only
  match ipBlock rules. Pods that finished (Succeeded/Failed) released their IPs and are
  dropped.
- Nodes: their podCIDRs tell a Pod on another node from an external address (flowType).
- Services: ClusterIPs and ports, for destinationClusterIP and destinationServicePortName.
  Endpoints are not needed: conntrack already names the Pod a ClusterIP was translated to.
- Namespaces (labels, for namespaceSelector) and NetworkPolicies.
- AdminNetworkPolicies and the BaselineAdminNetworkPolicy (``policy.networking.k8s.io/
  v1alpha1``), when the cluster serves them: a cluster without those CRDs answers 404,
  which counts as listed (nothing to know) and is asked again every minute, quietly.

HTTP goes through the official ``kubernetes`` client's ApiClient (in-cluster service
account or kubeconfig), reading raw JSON so that no model objects are built.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from flowscope.agent.metadata import Inventory, MetadataError

__all__ = ["KubernetesMetadata", "RESOURCES"]

log = logging.getLogger(__name__)

RESOURCES: dict[str, str] = {
    "Pod": "/api/v1/pods",
    "Node": "/api/v1/nodes",
    "Service": "/api/v1/services",
    "Namespace": "/api/v1/namespaces",
    "NetworkPolicy": "/apis/networking.k8s.io/v1/networkpolicies",
    "AdminNetworkPolicy": "/apis/policy.networking.k8s.io/v1alpha1/adminnetworkpolicies",
    "BaselineAdminNetworkPolicy": "/apis/policy.networking.k8s.io/v1alpha1/baselineadminnetworkpolicies",
}
# Kinds of CRDs a cluster may not have: 404 means "none", not an error.
OPTIONAL_KINDS = frozenset({"AdminNetworkPolicy", "BaselineAdminNetworkPolicy"})
OPTIONAL_RETRY = 60.0


class _NotServed(Exception):
    """The API server does not serve this resource (its CRD is not installed)."""


class _Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class KubernetesMetadata:
    """A MetadataSource fed by the Kubernetes API (see the module docstring)."""

    def __init__(
        self,
        *,
        node_name: str,
        watch_remote_pods: bool = True,
        api_client: Any = None,
        watch_timeout: int = 300,
        page_size: int = 500,
    ) -> None:
        self.node_name = node_name
        self.watch_remote_pods = watch_remote_pods
        self.watch_timeout = watch_timeout
        self.page_size = page_size
        self._api = api_client
        self._inv = Inventory()
        self._stop = threading.Event()
        self._synced = {kind: threading.Event() for kind in RESOURCES}
        self._threads: list[threading.Thread] = []
        self.errors = 0
        self.relists = 0
        self._lock = threading.Lock()
        self._streams: set[Any] = set()

    # --- MetadataSource -------------------------------------------------------------
    def start(self) -> None:
        if self._api is None:
            try:
                self._api = _default_client()
            except Exception as exc:  # noqa: BLE001 - ConfigException, missing files, bad YAML
                raise MetadataError(
                    f"metadata.source: kubernetes needs the in-cluster service account or a kubeconfig "
                    f"($KUBECONFIG, ~/.kube/config): {exc}; use source static or none outside a cluster"
                ) from None
        for kind in RESOURCES:
            t = threading.Thread(target=self._run, args=(kind,), name=f"watch-{kind}", daemon=True)
            t.start()
            self._threads.append(t)

    def inventory(self) -> Inventory | None:
        return self._inv

    def close(self) -> None:
        """Stop the watchers; open watch streams are shut down so no thread hangs on a read."""
        self._stop.set()
        with self._lock:
            streams = list(self._streams)
        for resp in streams:
            try:
                resp.shutdown()
            except Exception:  # noqa: BLE001 - already closed
                pass

    def wait_synced(self, timeout: float) -> bool:
        """True once every kind has been listed at least once."""
        deadline = time.monotonic() + timeout
        return all(ev.wait(max(0.0, deadline - time.monotonic())) for ev in self._synced.values())

    # --- list and watch -------------------------------------------------------------
    def _params(self, kind: str) -> list[tuple[str, Any]]:
        if kind == "Pod" and not self.watch_remote_pods:
            return [("fieldSelector", f"spec.nodeName={self.node_name}")]
        return []

    def _get(self, path: str, query: list[tuple[str, Any]], stream: bool = False) -> Any:
        """GET through the client's serialisation and authentication; raw response back."""
        api = self._api
        method, url, headers, body, post = api.param_serialize(
            method="GET", resource_path=path, query_params=query,
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
        )
        resp = api.call_api(
            method, url, header_params=headers, body=body, post_params=post,
            _request_timeout=(10, self.watch_timeout + 30) if stream else 60,
        )
        if resp.status >= 400:
            text = resp.read()[:300]
            if resp.status == 410:
                raise _Gone()
            if resp.status == 404:
                raise _NotServed(path)
            raise RuntimeError(f"GET {path}: HTTP {resp.status}: {text!r}")
        return resp

    def _run(self, kind: str) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                rv = self._list(kind)
                self._synced[kind].set()
                backoff = 1.0
                while not self._stop.is_set():
                    rv = self._watch(kind, rv)
            except _Gone:
                self.relists += 1
                continue
            except _NotServed:
                if kind not in OPTIONAL_KINDS:
                    self.errors += 1
                    log.warning("watching %s failed (retrying in %.0fs): the API server does not serve %s",
                                kind, backoff, RESOURCES[kind])
                    if self._stop.wait(backoff):
                        return
                    backoff = min(backoff * 2, 30.0)
                    continue
                for key in self._inv.keys(kind):  # the CRD went away: so did its objects
                    self._inv.delete(kind, key)
                self._synced[kind].set()
                if self._stop.wait(OPTIONAL_RETRY):
                    return
            except Exception as exc:  # noqa: BLE001 - the API may fail in any way; we retry
                if self._stop.is_set():
                    return  # close() shut the stream down
                self.errors += 1
                log.warning("watching %s failed (retrying in %.0fs): %s", kind, backoff, exc)
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 30.0)

    def _list(self, kind: str) -> str:
        path = RESOURCES[kind]
        seen: set[Any] = set()
        cont = None
        rv = ""
        while True:
            query = self._params(kind) + [("limit", self.page_size)]
            if cont:
                query.append(("continue", cont))
            body = json.loads(self._get(path, query).read())
            for obj in body.get("items") or []:
                seen.add(self._apply(kind, obj, deleted=False))
            meta = body.get("metadata") or {}
            rv = meta.get("resourceVersion") or rv
            cont = meta.get("continue")
            if not cont:
                break
        for key in self._inv.keys(kind) - seen:
            self._inv.delete(kind, key)
        return rv

    def _watch(self, kind: str, rv: str) -> str:
        query = self._params(kind) + [
            ("watch", "true"), ("allowWatchBookmarks", "true"), ("timeoutSeconds", self.watch_timeout),
        ]
        if rv:
            query.append(("resourceVersion", rv))
        resp = self._get(RESOURCES[kind], query, stream=True).response
        with self._lock:
            self._streams.add(resp)
        started, events = time.monotonic(), 0
        try:
            for line in _lines(resp):
                if self._stop.is_set():
                    break
                event = json.loads(line)
                if not isinstance(event, dict) or event.get("type") not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"):
                    raise RuntimeError(f"not a watch event: {line[:120]!r}")
                events += 1
                etype, obj = event.get("type"), event.get("object") or {}
                if etype == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise RuntimeError(f"watch error: {obj.get('message') or obj}")
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if etype != "BOOKMARK":
                    self._apply(kind, obj, deleted=etype == "DELETED")
                if new_rv:
                    rv = new_rv
        finally:
            with self._lock:
                self._streams.discard(resp)
            resp.release_conn()
        if not events and time.monotonic() - started < 1.0:
            self._stop.wait(1.0)  # a server that ends watches at once must not make us spin
        return rv

    def _apply(self, kind: str, obj: Mapping[str, Any], *, deleted: bool) -> Any:
        obj = dict(obj)
        obj["kind"] = kind  # list items and some servers' events omit it
        if kind == "Pod":
            spec, status = obj.get("spec") or {}, obj.get("status") or {}
            if not self.watch_remote_pods and spec.get("nodeName") != self.node_name:
                return None
            if status.get("phase") in ("Succeeded", "Failed"):
                deleted = True
        try:
            self._inv.apply(obj, deleted=deleted)
        except MetadataError as exc:
            log.warning("ignoring a %s the agent cannot read: %s", kind, exc)
        return Inventory.key_of(kind, obj)


def _lines(resp: Any) -> Iterator[str]:
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line.decode("utf-8")
    if buf.strip():
        yield buf.decode("utf-8")


def _default_client() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()
