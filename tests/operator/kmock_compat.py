"""A compatibility layer that lets kopf and the real kubectl drive kmock's KubernetesEmulator.

kmock 0.8's ``KubernetesEmulator`` is an in-memory API server over real HTTP, but it is
not a kube-apiserver. Each gap below was met while driving it with kopf 1.45 and kubectl
1.32, and is closed here, in the tests only (the operator has no knowledge of it):

1. ``/api/v1/namespaces`` crashes the path parser and ``/api/v1/namespaces/NAME`` is
   read as a namespace with no resource: both are served here from a namespace table
   (kubectl applies Namespace objects; kopf lists namespaces).
2. Core discovery reports ``groupVersion: "/v1"`` and repeats short names and kinds on
   subresource entries (``flowaggregators/status``): fixed in the discovery answer.
3. No built-in resources are declared: the bundled discovery of kmock (a K3s dump) is
   loaded so that kinds, scopes and verbs are right.
4. A created CRD is stored but not served: creating one registers its resource (kind,
   scope, short names, status subresource) and remembers its printer columns.
5. No uid, resourceVersion, creationTimestamp or generation is assigned: added on
   create; resourceVersion bumped on every write, generation on every spec change.
6. Lists lack ``kind``/``apiVersion`` and a resourceVersion: added.
7. A status-subresource patch can change the spec, and a main-resource patch can change
   the status: each is restricted to its part, as the apiserver does.
8. kubectl's strategic-merge patches carry ``$setElementOrder``/``$patch`` directives the
   emulator would store as fields: stripped (the emulator then merges like a JSON
   merge patch, which is what our objects need).
9. No garbage collector: after every write, objects whose controller owner (by uid)
   no longer exists are deleted too, recursively (kube-controller-manager's job).
10. No server-side defaulting: a few defaults a real apiserver fills in (Deployment
    revisionHistoryLimit, progressDeadlineSeconds; pod restartPolicy, dnsPolicy,
    terminationGracePeriodSeconds; container terminationMessagePath; Service clusterIP,
    sessionAffinity) are added on create, and container quantities are rewritten in
    canonical form (2 -> "2", "0.5" -> "500m") on create and patch, so that "a second reconcile writes nothing" is
    proven against server-filled fields and not only against our own echo.
11. ``kubectl get`` asks for ``as=Table``: answered with a ``meta.k8s.io/v1`` Table built
    from the CRD's ``additionalPrinterColumns`` (JSONPath subset: ``.a.b`` and
    ``.a[?(@.k=="v")].b``), or Name/Age for built-ins.
12. A JSON patch (kopf adds finalizers with one, guarded by a ``test`` of the
    resourceVersion) whose test fails crashes with HTTP 500; a real server answers 422
    Unprocessable Entity, which kopf handles by retrying on the next event: answered 422 here. JSON
    patches bump the resourceVersion too.
13. No ``/openapi/v2|v3``: kubectl needs ``--validate=false``.
17. Optimistic concurrency: a merge patch carrying ``metadata.resourceVersion`` is applied
    even when the object has changed since (a real apiserver answers 409 Conflict, which
    leader election relies on): answered 409 here.
14. Watch streams are served as ``application/octet-stream`` (kubectl refuses them) and
    ignore ``fieldSelector=metadata.name=…`` (``kubectl delete`` waits with one): served
    here as JSON lines, filtered by name.
15. No controllers run: Deployments and DaemonSets never get a status. Tests that need a
    ready workload patch the status themselves (``simulate_rollout``).
16. A missing object's 404 carries the reason "Object Not Found" instead of "NotFound"
    (and a conflict "Object Already Exists" instead of "AlreadyExists");
    kubectl 1.32 goes by the status code, Debian's kubectl 1.20 by the reason (``apply``
    fails with "Object Not Found"). Answered with an apiserver's NotFound Status.
18. Request matching is quadratic: for every request, the handler asks each reaction
    ``request in reaction._source`` (``apps.RawHandler._handle``), and ``View.__contains__``
    answers by iterating the view, which replays the whole request history of the emulator
    through the filters. Answered in O(1) for the views the emulator's reactions are made of
    (see ``_fast_contains``; a one-off check over 26,100 matchings of three cluster tests found
    every answer equal to kmock's and none falling back). On the shared 2-core machine, one
    after the other: ``test_second_reconcile_and_restart_write_nothing`` 473 s with kmock's
    matching, 6.8 s with this; the first three tests of tests/operator took 11 minutes with
    kmock's, all 143 take 2.5 to 3 minutes with this. ``FLOWSCOPE_KMOCK_SLOW_MATCHING=1``
    keeps kmock's own matching (the peer to measure against, or to rule the fast path out).

Not closed: after ``kubectl delete KINDS -A --all`` kubectl's wait for the deletions never
returns, although every object is gone within seconds (single-object deletes do return);
test_operator_production.py deletes with ``--wait=false`` and polls ``kubectl get``. Not
needed by these tests: protobuf bodies (``kubectl create configmap …``
sends one for built-in kinds; answered 415 here; ``kubectl apply -f`` sends JSON), PUT, watch bookmarks and resourceVersion
semantics (a new watch replays everything as ADDED, stale versions are accepted),
field and label selectors (the operator filters lists itself), admission (CRD schema
validation and CEL rules are not enforced, which the schema tests cover offline).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import itertools
import json
import os
import re
import uuid
import warnings
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
from kmock._internal import dicts as kdicts
from kmock._internal import dsl as kdsl
from kmock._internal import enums
from kmock._internal import filtering as kfiltering
from kmock._internal import k8s as kk8s
from kmock._internal import rendering as krendering

_rv = itertools.count(1000)


# -- gap 18: request matching in O(1) ------------------------------------------------------
# Checked against kmock 0.8 (kmock/_internal/dsl.py, apps.py, filtering.py), and installed
# on that version only: on any other, kmock's own __contains__ stays (slow, but right) and
# a warning says this argument must be checked again.
#
# Why the fast answer is exactly the original one, for the views it takes:
# - ``View.__contains__(view, item)`` with a ``rendering.Request`` is
#   ``any(request is item for request in view)``: membership by identity in ``iter(view)``.
# - ``iter(Priority(src))`` is ``Chained.__iter__``: ``View.__iter__`` (nothing) then
#   ``iter(src)``, unchanged. ``iter(Filter(src, c))`` is ``iter(src)`` keeping the requests
#   for which ``c(request)`` is true. ``iter(Root)`` is ``View.__iter__`` (nothing) then
#   ``root._requests``. So for a chain of Filters and Priorities (exact types: Slicer,
#   Exclusion, groups, Reaction and Stream iterate otherwise) ending at a Root whose class
#   keeps ``Root.__iter__``, ``iter(view)`` is ``[r for r in root._requests if c1(r) and
#   c2(r) and ...]``, and ``item in view`` is "item is one of root._requests, and every
#   criterion holds for item", provided that a criterion's answer for ``item`` does not
#   depend on which other requests it was asked about, that asking has no side effects,
#   and that it raises for none of them (the original asks about every earlier request too).
# - That holds for ``HTTPCriteria`` and ``K8sCriteria`` (exact types), the only criteria the
#   emulator's reactions and ours use: their ``__call__`` is a conjunction of ``_check(pattern,
#   request field)``, which reads the frozen pattern and the request only, and handles its
#   own TypeError. ``FnCriteria`` (any callable: may count, may raise), ``EventCriteria`` and
#   the rest are not taken.
# - "item is one of root._requests" is proven by ``root._requests[-1] is item``: RawHandler
#   appends each request before it handles it, so the request being served is the last one
#   unless another arrived meanwhile; then (and for any other view) the original answers.
_KMOCK_CHECKED = "0.8"
_PURE_CRITERIA = (kfiltering.HTTPCriteria, kfiltering.K8sCriteria)
_slow_contains = kdsl.View.__contains__


def _fast_contains(view: Any, item: Any) -> bool:
    if isinstance(item, krendering.Request):
        criteria = []
        node = view
        while type(node) in (kdsl.Filter, kdsl.Priority):
            if type(node) is kdsl.Filter:
                if type(node.criteria) not in _PURE_CRITERIA:
                    break
                criteria.append(node.criteria)
            node = node._source
        else:
            if (isinstance(node, kdsl.Root) and type(node).__iter__ is kdsl.Root.__iter__
                    and node._requests and node._requests[-1] is item):
                return all(criterion(item) for criterion in criteria)
    return bool(_slow_contains(view, item))


def _install_fast_matching() -> None:
    if os.environ.get("FLOWSCOPE_KMOCK_SLOW_MATCHING") == "1":
        return  # kmock's own matching: the peer to measure against, or to rule the fast path out
    if kmock.__version__ != _KMOCK_CHECKED:
        warnings.warn(f"kmock_compat: gap 18 (O(1) request matching) was checked against kmock "
                      f"{_KMOCK_CHECKED}, this is kmock {kmock.__version__}: not installed, the emulator "
                      "stays quadratic; read kmock's dsl.View again and update _fast_contains", stacklevel=2)
        return
    kdsl.View.__contains__ = _fast_contains


_install_fast_matching()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _strip_directives(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_directives(v) for k, v in node.items() if not k.startswith("$")}
    if isinstance(node, list):
        return [_strip_directives(v) for v in node]
    return node


def _canonical_quantities(resources: dict[str, Any]) -> None:
    """Rewrite quantities the way the apiserver stores them: 2 -> "2", "0.5" -> "500m"."""
    for section in ("requests", "limits"):
        for name, value in list((resources.get(section) or {}).items()):
            text = str(value)
            if re.fullmatch(r"\d*\.\d+", text):
                text = f"{round(float(text) * 1000)}m"
            resources[section][name] = text


def jsonpath(obj: Any, path: str) -> Any:
    """The subset of JSONPath that printer columns use."""
    tokens = re.findall(r'\.([A-Za-z0-9_-]+)|\[\?\(@\.([A-Za-z0-9_]+)=="([^"]*)"\)\]', path)
    node = obj
    for key, fkey, fval in tokens:
        if key:
            node = node.get(key) if isinstance(node, dict) else None
        else:
            node = next((i for i in node or [] if isinstance(i, dict) and i.get(fkey) == fval), None)
        if node is None:
            return None
    return node


def _age(ts: str | None) -> str:
    if not ts:
        return "<unknown>"
    delta = dt.datetime.now(dt.timezone.utc) - dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=dt.timezone.utc)
    s = int(delta.total_seconds())
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


class CompatEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.printer_columns: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.status_subresources: set[tuple[str, str]] = set()
        self.failures: list[list[Any]] = []
        for ns in ("default", "kube-system"):
            self._ensure_namespace(ns)

    # -- gap 1: namespaces -----------------------------------------------------------------
    def _ensure_namespace(self, name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if name not in self.namespaces:
            obj = copy.deepcopy(body) if body else {}
            obj.update(apiVersion="v1", kind="Namespace")
            meta = obj.setdefault("metadata", {})
            meta.update(name=name, uid=str(uuid.uuid4()), resourceVersion=str(next(_rv)),
                        creationTimestamp=_now())
            obj["status"] = {"phase": "Active"}
            self.namespaces[name] = obj
        return self.namespaces[name]

    def inject_failure(self, method: str, path_suffix: str, status: int, message: str, times: int = 1) -> None:
        """Test helper, not a gap: answer the next ``times`` matching requests with an error
        (an apiserver hiccup, an admission webhook's denial)."""
        self.failures.append([method.upper(), path_suffix, status, message, times])

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        for failure in self.failures:
            method, suffix, status, message, left = failure
            if left > 0 and raw_request.method == method and raw_request.path.endswith(suffix):
                failure[4] -= 1
                await raw_request.read()
                return self._status(status, "InternalError" if status >= 500 else "Invalid", message)
        m = re.fullmatch(r"/api/v1/namespaces(?:/([^/]+))?", raw_request.path)
        if m is None:
            return await super().__call__(raw_request)
        name = m.group(1)
        if raw_request.method == "GET" and name is None:
            if "as=Table" in raw_request.headers.get("Accept", ""):
                return self._table(list(self.namespaces.values()), None)
            return aiohttp.web.json_response({"kind": "NamespaceList", "apiVersion": "v1",
                                              "metadata": {"resourceVersion": str(next(_rv))},
                                              "items": list(self.namespaces.values())})
        if raw_request.method == "POST":
            body = await raw_request.json()
            name = body["metadata"]["name"]
            if name in self.namespaces:
                return self._status(409, "AlreadyExists", f'namespaces "{name}" already exists')
            return aiohttp.web.json_response(self._ensure_namespace(name, body), status=201)
        if name not in self.namespaces:
            return self._status(404, "NotFound", f'namespaces "{name}" not found')
        if raw_request.method == "PATCH":
            patch = _strip_directives(await raw_request.json())
            self.namespaces[name] = kdicts.patch_dict(self.namespaces[name], patch)
        elif raw_request.method == "DELETE":
            return aiohttp.web.json_response(self.namespaces.pop(name))
        if "as=Table" in raw_request.headers.get("Accept", ""):
            return self._table([self.namespaces[name]], None)
        return aiohttp.web.json_response(self.namespaces[name])

    @staticmethod
    def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                          "code": code, "reason": reason, "message": message}, status=code)

    # -- gap 2: discovery ------------------------------------------------------------------
    async def _serve_version(self, request: Any) -> Any:
        answer = await super()._serve_version(request)
        if answer.get("groupVersion", "").startswith("/"):
            answer["groupVersion"] = answer["groupVersion"][1:]
        for res in answer.get("resources", []):
            if "/" in res["name"]:
                res["shortNames"] = []
                res["categories"] = []
                res["singularName"] = ""
                res["verbs"] = ["get", "patch", "update"]
        return answer

    # -- gap 11: tables --------------------------------------------------------------------
    def _table(self, items: list[dict[str, Any]], resource: Any) -> aiohttp.web.Response:
        key = (resource.group, resource.plural) if resource is not None else None
        columns = [{"name": "Name", "type": "string", "jsonPath": ".metadata.name"}]
        columns += self.printer_columns.get(key, []) if key else []
        if not any(c["name"] == "Age" for c in columns):
            columns.append({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"})
        rows = []
        for obj in items:
            cells = []
            for col in columns:
                value = jsonpath(obj, col["jsonPath"])
                cells.append(_age(value) if col.get("type") == "date" else value)
            rows.append({"cells": cells, "object": obj})
        defs = [{"name": c["name"], "type": c.get("type", "string"), "format": "", "description": "",
                 "priority": c.get("priority", 0)} for c in columns]
        return aiohttp.web.json_response({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                                          "metadata": {"resourceVersion": str(next(_rv))},
                                          "columnDefinitions": defs, "rows": rows})

    # -- the request pipeline ------------------------------------------------------------------
    def _key(self, request: Any) -> Any:
        return (request.resource, request.namespace, request.name)

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        res = request.resource
        if res is not None and not res.plural:
            res = None  # discovery (/apis/GROUP/VERSION), not a resource
        table = "as=Table" in request.headers.get("Accept", "")
        if res is not None and request.action in (enums.action.LIST, enums.action.FETCH) and table:
            if request.action == enums.action.FETCH:
                obj = self._live(self._key(request))
                if obj is None:
                    return self._status(404, "NotFound", f'{res.plural} "{request.name}" not found')
                return self._table([obj], res)
            return self._table(self._live_list(res, request.namespace), res)
        if res is not None and request.action == enums.action.WATCH:
            return await self._watch(request)
        if res is not None and request.action in (enums.action.CREATE, enums.action.UPDATE) and request.data is None:
            return self._status(415, "UnsupportedMediaType", "only JSON bodies are understood here")
        if res is not None and request.action == enums.action.CREATE and isinstance(request.data, dict):
            ns = request.namespace or (request.data.get("metadata") or {}).get("namespace")
            if ns and self.resources[res].namespaced and ns not in self.namespaces:
                return self._status(404, "NotFound", f'namespaces "{ns}" not found')
            self._on_create(request)
        elif res is not None and request.action == enums.action.UPDATE and isinstance(request.data, dict):
            live = self._live(self._key(request))
            wanted = (request.data.get("metadata") or {}).get("resourceVersion")
            if live is not None and wanted and wanted != live.get("metadata", {}).get("resourceVersion"):
                return self._status(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} '
                                                     f'"{request.name}": the object has been modified')
            self._on_patch(request)
        elif res is not None and request.action == enums.action.UPDATE and isinstance(request.data, list):
            request.data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": str(next(_rv))})
        try:
            response = await super()._handle(request)
        except kk8s.KubernetesObjectNotFoundError:
            # gap 16: an apiserver's reason is "NotFound", which older clients (Debian's kubectl 1.20) rely on
            plural = res.plural if res is not None else "objects"
            return self._status(404, "NotFound", f'{plural} "{request.name}" not found')
        except kk8s.KubernetesObjectConflictError:
            plural = res.plural if res is not None else "objects"
            return self._status(409, "AlreadyExists", f'{plural} "{request.name}" already exists')
        except jsonpatch.JsonPatchTestFailed as exc:  # gap 12: a failed "test" is a conflict, not a crash
            return self._status(422, "Invalid", f"the server rejected our request due to an error in our "
                                                f"request: {exc}")
        if res is not None and request.action == enums.action.LIST and response.status == 200:
            response = self._fix_list(response, request)
        if res is not None and request.action in (enums.action.DELETE, enums.action.UPDATE, enums.action.CREATE):
            await self._collect_garbage()
        return response

    # gap 14: watch streams as JSON lines, filtered by metadata.name field selectors
    async def _watch(self, request: Any) -> aiohttp.web.StreamResponse:
        selector = request.params.get("fieldSelector", "")
        name = selector.split("=", 1)[1] if selector.startswith("metadata.name=") else request.name
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request._raw_request)
        try:
            async for event in self._serve_watch(request):
                if not isinstance(event, dict):
                    continue
                if name and event.get("object", {}).get("metadata", {}).get("name") != name:
                    continue
                await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionError, asyncio.CancelledError):
            pass
        return response

    def _live(self, key: Any) -> dict[str, Any] | None:
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key].raw  # type: ignore[no-any-return]
        return None

    def _live_list(self, res: Any, namespace: str | None) -> list[dict[str, Any]]:
        return [o.raw for (r, ns, _), o in self.objects.items()
                if r == res and not o.deleted and (namespace is None or ns == namespace)]

    def _fix_list(self, response: Any, request: Any) -> Any:
        body = json.loads(response.body)
        kind = self.resources[request.resource].kind or "Object"
        version = f"{request.resource.group}/{request.resource.version}".lstrip("/")
        body.update(kind=f"{kind}List", apiVersion=version)
        body["metadata"] = {"resourceVersion": str(next(_rv))}
        for item in body.get("items", []):
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", version)
        return aiohttp.web.json_response(body, status=response.status)

    # gaps 4, 5, 10
    def _on_create(self, request: Any) -> None:
        data = request.data
        meta = data.setdefault("metadata", {})
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(_rv)), creationTimestamp=_now(), generation=1)
        kind = data.get("kind")
        spec = data.get("spec") or {}
        if kind in ("Deployment", "DaemonSet"):
            if kind == "Deployment":
                spec.setdefault("revisionHistoryLimit", 10)
                spec.setdefault("progressDeadlineSeconds", 600)
            pod = spec.get("template", {}).get("spec", {})
            pod.setdefault("restartPolicy", "Always")
            pod.setdefault("dnsPolicy", "ClusterFirst")
            pod.setdefault("terminationGracePeriodSeconds", 30)
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                c.setdefault("terminationMessagePath", "/dev/termination-log")
                c.setdefault("terminationMessagePolicy", "File")
                _canonical_quantities(c.get("resources") or {})
        if kind == "Service":
            spec.setdefault("clusterIP", "10.96.0.%d" % (next(_rv) % 250 + 2))
            spec.setdefault("sessionAffinity", "None")
        if kind == "CustomResourceDefinition":
            self._register_crd(data)

    def _register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            key = f"{spec['group']}/{version['name']}/{names['plural']}"
            info = self.resources[key]
            info.kind = names["kind"]
            info.singular = names.get("singular", names["kind"].lower())
            info.namespaced = spec["scope"] == "Namespaced"
            info.verbs = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}
            info.shortnames = set(names.get("shortNames", []))
            info.categories = set(names.get("categories", []))
            if "status" in (version.get("subresources") or {}):
                info.subresources = {"status"}
                self.status_subresources.add((spec["group"], names["plural"]))
            self.printer_columns[(spec["group"], names["plural"])] = version.get("additionalPrinterColumns", [])
        crd["status"] = {"conditions": [{"type": "Established", "status": "True"}],
                         "acceptedNames": names}

    # gaps 5, 7, 8
    def _on_patch(self, request: Any) -> None:
        key = self._key(request)
        live = self._live(key)
        if live is None:
            return
        ctype = request.headers.get("Content-Type", "")
        data = _strip_directives(request.data) if "strategic" in ctype else copy.deepcopy(request.data)
        has_status = (request.resource.group, request.resource.plural) in self.status_subresources
        if request.subresource == "status":
            data = {"status": data.get("status")} if "status" in data else {}
        elif has_status:
            data = {k: v for k, v in data.items() if k != "status"}
        meta = dict(data.get("metadata") or {})
        for fixed in ("uid", "creationTimestamp", "generation", "resourceVersion"):
            meta.pop(fixed, None)
        pod = ((data.get("spec") or {}).get("template") or {}).get("spec") or {}
        for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
            _canonical_quantities(c.get("resources") or {})
        after = kdicts.patch_dict(copy.deepcopy(live), data)
        meta["resourceVersion"] = str(next(_rv))
        if after.get("spec") != live.get("spec"):
            meta["generation"] = int(live.get("metadata", {}).get("generation", 1)) + 1
        data["metadata"] = meta
        request.data.clear()
        request.data.update(data)
        if request.data.get("kind") == "CustomResourceDefinition" or live.get("kind") == "CustomResourceDefinition":
            self._register_crd(kdicts.patch_dict(copy.deepcopy(live), data))

    # gap 9
    async def _collect_garbage(self) -> None:
        while True:
            async with self._lock:
                alive = {o.raw.get("metadata", {}).get("uid") for o in self.objects.values() if not o.deleted}
                orphans = [(k, o) for k, o in self.objects.items() if not o.deleted and any(
                    ref.get("uid") not in alive for ref in o.raw.get("metadata", {}).get("ownerReferences") or []
                    if ref.get("controller"))]
                for (res, _, _), obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[res].put({"type": "DELETED", "object": raw})
            if not orphans:
                return


async def simulate_rollout(emulator: CompatEmulator, kind: str, namespace: str, name: str, ready: int,
                           *, observed: bool = True) -> None:
    """Play the Deployment/DaemonSet controller (gap 15): report ``ready`` pods of the newest
    spec as available; ``observed=False`` plays a controller that has not seen it yet."""
    plural = {"Deployment": "deployments", "DaemonSet": "daemonsets"}[kind]
    key = (kmock.resource("apps", "v1", plural), namespace, name)
    generation = int(emulator.objects[key].raw.get("metadata", {}).get("generation") or 1)
    seen = generation if observed else generation - 1
    status = ({"observedGeneration": seen, "replicas": ready, "updatedReplicas": ready, "readyReplicas": ready,
               "availableReplicas": ready} if kind == "Deployment" else
              {"observedGeneration": seen, "desiredNumberScheduled": ready, "currentNumberScheduled": ready,
               "updatedNumberScheduled": ready, "numberReady": ready, "numberAvailable": ready})
    async with emulator._lock:
        emulator.objects[key].patch({"status": status, "metadata": {"resourceVersion": str(next(_rv))}})
        await emulator._buses[key[0]].put({"type": "MODIFIED", "object": emulator.objects[key].raw})
