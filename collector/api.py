"""The collector's HTTP API: the query layer (:mod:`flowscope.collector.query`) over HTTP.

``flowscope collector --api HOST:PORT`` serves it; ``flowscope flows --api URL`` and the
web dashboards read it. chDB belongs to one process, so the collector that writes the
store answers for it. Every answer is JSON (the ``to_json()`` form of the query layer's
results); every question is URL parameters, read by
:func:`flowscope.collector.query.query_from_params`, so a dashboard's URL is a shareable
query.

Routes (all GET)::

    /api/v1/flows       ?start&end|since&until&filter&limit&offset  -> FlowPage
    /api/v1/follow      ?after=<timeInserted>&filter                -> {"records": [...], "after": N}
    /api/v1/top         ?...&group&by&top                            -> TopResult
    /api/v1/series      ?...&group&by&top&resolution                 -> Series
    /api/v1/sankey      ?...&group&target&by&top                     -> {"links": [SankeyLink]}
    /api/v1/overview    ?...                                         -> Overview
    /api/v1/complete    ?field&prefix&limit                          -> {"values": [...]}
    /api/v1/policy/keys ?since=<epoch seconds>&namespace             -> {"keys": [StoredKey]}
    /api/v1/schema      -> the dimensions, filter fields, completions and vocabularies
    /healthz, /readyz   -> "ok" (public: probes)

A bad question is answered 400 with ``{"error": "<one line naming the field>"}``; a store
that fails, 503 with the error. Queries run in a worker thread, so a slow one never stalls
the collector's event loop.

Mounting: :func:`add_routes` adds these routes to any :class:`aiohttp.web.Application`
(the dashboards add their pages to the same application); :func:`make_app` builds one
with :func:`flowscope.webauth.auth_middleware` (loopback may be open; elsewhere a bearer
token, mutual TLS, or insecure said out loud: :func:`flowscope.webauth.check_exposure`).
The store is kept in the application under :data:`STORE_KEY`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from flowscope.ipfix.antrea import END_REASONS, FLOW_TYPES, POLICY_TYPES, PROTOCOLS, RULE_ACTIONS
from flowscope.webauth import WebAuth, auth_middleware

from . import query
from .filter import FIELDS
from .schema import DIMENSIONS
from .store import FlowStore

__all__ = ["API_PREFIX", "STORE_KEY", "add_routes", "make_app"]

log = logging.getLogger("flowscope.collector.api")

API_PREFIX = "/api/v1"
STORE_KEY: web.AppKey[FlowStore] = web.AppKey("flowscope_store", FlowStore)
_QUERY_PARAMS = frozenset(("start", "end", "since", "until", "filter", "group", "by", "top", "limit", "offset",
                           "resolution", "source"))


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def _params(request: web.Request, extra: frozenset[str] = frozenset()) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in request.query.items():
        if k not in _QUERY_PARAMS | extra:
            raise query.QueryError(f"{k}: not a parameter of {request.path}; known: "
                                   f"{', '.join(sorted(_QUERY_PARAMS | extra))}")
        if k in out:
            raise query.QueryError(f"{k}: given twice")
        out[k] = v
    return out


def _q(request: web.Request, extra: frozenset[str] = frozenset()) -> tuple[query.FlowQuery, dict[str, str]]:
    params = _params(request, extra)
    qp = {k: v for k, v in params.items() if k in _QUERY_PARAMS}
    return query.query_from_params(qp), params


async def _run(request: web.Request, fn: Callable[[FlowStore], Any]) -> web.Response:
    store = request.app[STORE_KEY]
    try:
        result = await asyncio.to_thread(fn, store)
    except ValueError as exc:  # QueryError, FilterError
        return _error(400, str(exc))
    except Exception as exc:  # noqa: BLE001 - the store failed: say so, keep serving
        log.warning("query %s failed: %s", request.path_qs, exc)
        return _error(503, f"the store failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return _json(result)


def _handler(build: Callable[[web.Request], Callable[[FlowStore], Any]]) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.Response:
        try:
            fn = build(request)
        except ValueError as exc:
            return _error(400, str(exc))
        return await _run(request, fn)

    return handle


def _flows(request: web.Request) -> Callable[[FlowStore], Any]:
    q, _ = _q(request)
    return lambda s: query.flows(s, q).to_json()


def _follow(request: web.Request) -> Callable[[FlowStore], Any]:
    q, p = _q(request, frozenset(("after",)))
    after_text = p.get("after", "0")
    if not after_text.isdigit():
        raise query.QueryError(f"after: {after_text!r} is not epoch seconds")
    after = int(after_text)

    def run(s: FlowStore) -> dict[str, Any]:
        recs = query.flows_since(s, q, after, limit=q.limit)
        last = max((int(r["timeInserted"]) for r in recs), default=after)
        return {"records": recs, "after": last}

    return run


def _top(request: web.Request) -> Callable[[FlowStore], Any]:
    q, _ = _q(request)
    return lambda s: query.top(s, q).to_json()


def _series(request: web.Request) -> Callable[[FlowStore], Any]:
    q, _ = _q(request)
    return lambda s: query.series(s, q).to_json()


def _sankey(request: web.Request) -> Callable[[FlowStore], Any]:
    q, p = _q(request, frozenset(("target",)))
    target = p.get("target", "dstNamespace")
    return lambda s: {"links": [link.to_json() for link in query.sankey(s, q, target)]}


def _overview(request: web.Request) -> Callable[[FlowStore], Any]:
    q, _ = _q(request)
    return lambda s: query.overview(s, q).to_json()


def _complete(request: web.Request) -> Callable[[FlowStore], Any]:
    q, p = _q(request, frozenset(("field", "prefix")))
    field = p.get("field", "")
    prefix = p.get("prefix", "")
    limit = q.limit if "limit" in p else 50
    scoped = q if ("start" in p or "since" in p or "end" in p or "until" in p or "filter" in p) else None
    return lambda s: {"values": query.complete(s, field, prefix, limit=min(limit, 1000), q=scoped)}


def _policy_keys(request: web.Request) -> Callable[[FlowStore], Any]:
    """The distinct flow keys ``flowscope policy --api`` evaluates (:mod:`.policy`'s seam)."""
    from . import policy

    params: dict[str, str] = {}
    for k, v in request.query.items():
        if k not in ("since", "namespace"):
            raise query.QueryError(f"{k}: not a parameter of {request.path}; known: namespace, since")
        if k in params:
            raise query.QueryError(f"{k}: given twice")
        params[k] = v
    since_text = params.get("since")
    if since_text is not None and not since_text.isdigit():
        raise query.QueryError(f"since: {since_text!r} is not epoch seconds")
    since = int(since_text) if since_text is not None else None
    namespace = params.get("namespace")
    if namespace is not None:
        policy.check_namespace(namespace, "namespace")
    return lambda s: {"keys": policy.stored_flow_keys(s, since=since, namespace=namespace)}


def schema_description() -> dict[str, Any]:
    """What the dashboards need to build their controls: dimensions, fields, vocabularies."""
    return {
        "dimensions": {name: d.doc for name, d in DIMENSIONS.items()},
        "fields": {name: f.doc for name, f in FIELDS.items()},
        "completions": list(query.COMPLETIONS),
        "by": list(query.BY),
        "flowTypes": {str(k): v for k, v in FLOW_TYPES.items()},
        "ruleActions": {str(k): v for k, v in RULE_ACTIONS.items()},
        "policyTypes": {str(k): v for k, v in POLICY_TYPES.items()},
        "endReasons": {str(k): v for k, v in END_REASONS.items()},
        "protocols": {str(k): v for k, v in PROTOCOLS.items()},
    }


async def _schema(request: web.Request) -> web.Response:
    return _json(schema_description())


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def add_routes(app: web.Application, store: FlowStore) -> None:
    """Add the API's routes (and /healthz, /readyz) to ``app``, answering from ``store``."""
    app[STORE_KEY] = store
    app.router.add_get(f"{API_PREFIX}/flows", _handler(_flows))
    app.router.add_get(f"{API_PREFIX}/follow", _handler(_follow))
    app.router.add_get(f"{API_PREFIX}/top", _handler(_top))
    app.router.add_get(f"{API_PREFIX}/series", _handler(_series))
    app.router.add_get(f"{API_PREFIX}/sankey", _handler(_sankey))
    app.router.add_get(f"{API_PREFIX}/overview", _handler(_overview))
    app.router.add_get(f"{API_PREFIX}/complete", _handler(_complete))
    app.router.add_get(f"{API_PREFIX}/policy/keys", _handler(_policy_keys))
    app.router.add_get(f"{API_PREFIX}/schema", _schema)
    app.router.add_get("/healthz", _ok)
    app.router.add_get("/readyz", _ok)


def make_app(store: FlowStore, auth: WebAuth | None = None) -> web.Application:
    """An application serving the API, with the bearer-token middleware when ``auth`` has a token.
    (Call :func:`flowscope.webauth.check_exposure` for the listening host before serving it.)"""
    middlewares = [auth_middleware(auth)] if auth is not None and auth.token is not None else []
    app = web.Application(middlewares=middlewares)
    add_routes(app, store)
    return app
