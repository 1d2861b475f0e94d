"""The dashboards' what-if page on the server: ``POST /ui/v1/whatif``.

The one route of the dashboards that takes a body: proposed policies pasted or uploaded
in the page, evaluated against the stored flows by :func:`flowscope.collector.policy.what_if_report`
(the same answer as ``flowscope policy what-if -o json``). The body is JSON::

    {"policies": "<YAML: NetworkPolicies, AdminNetworkPolicies, the BaselineAdminNetworkPolicy>",
     "inventory": "<optional YAML: Pods, Namespaces and the current policies>",
     "since": <optional epoch seconds: rows stored since then>,
     "namespace": "<optional: flows with this namespace at either end>",
     "replace": <optional bool: the proposed policies replace the current ones>}

Without an inventory the Pods' labels come from the store (IEs 56506/143-144, when the
agents export them) and there are no current policies.

Bounds: the body is at most :data:`MAX_BODY` bytes (413 past it, read no further); a
body that is not such an object, or a field of the wrong type, is a 400 whose
``{"error", "field"}`` names the field; a policy or inventory that does not parse is a
400 naming the document. The evaluation runs in the dashboards' worker threads. Who may
post follows the application's authentication middleware, like every panel.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from flowscope.collector import query

__all__ = ["MAX_BODY", "WhatIfError", "WhatIfRequest", "parse_whatif", "whatif_handler"]

MAX_BODY: Final = 1 << 20  # 1 MiB: policies and an inventory of a few thousand Pods
_FIELDS: Final = ("policies", "inventory", "since", "namespace", "replace")


class WhatIfError(ValueError):
    """A what-if request that cannot be evaluated; ``field`` names what is wrong."""

    def __init__(self, message: str, field: str, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


@dataclass(frozen=True, slots=True)
class WhatIfRequest:
    """A what-if request, parsed and checked."""

    policies: str
    inventory: str | None = None
    since: int | None = None
    namespace: str | None = None
    replace: bool = False


def parse_whatif(body: bytes) -> WhatIfRequest:
    """The request from its body, or :class:`WhatIfError` naming the field."""
    from flowscope.collector.policy import PolicyInputError, check_namespace

    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WhatIfError(f"body: not JSON ({exc}); send {{\"policies\": \"<YAML>\"}}", "body") from None
    if not isinstance(doc, Mapping):
        raise WhatIfError("body: not a JSON object; send {\"policies\": \"<YAML>\"}", "body")
    unknown = sorted(set(doc) - set(_FIELDS))
    if unknown:
        raise WhatIfError(f"{unknown[0]}: not a field of a what-if; known: {', '.join(_FIELDS)}", unknown[0])
    policies = doc.get("policies")
    if not isinstance(policies, str) or not policies.strip():
        raise WhatIfError("policies: give the proposed policies as YAML text", "policies")
    inventory = doc.get("inventory")
    if inventory is not None and not isinstance(inventory, str):
        raise WhatIfError("inventory: must be YAML text (Pods, Namespaces, current policies) or absent", "inventory")
    since = doc.get("since")
    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or not 0 <= since < 1 << 32):
        raise WhatIfError(f"since: {since!r} is not epoch seconds", "since")
    namespace = doc.get("namespace") or None
    if namespace is not None:
        try:
            check_namespace(namespace, "namespace")
        except PolicyInputError as exc:
            raise WhatIfError(str(exc), "namespace") from None
    replace = doc.get("replace", False)
    if not isinstance(replace, bool):
        raise WhatIfError(f"replace: {replace!r} is not true or false", "replace")
    return WhatIfRequest(policies, inventory if inventory and inventory.strip() else None, since, namespace, replace)


def evaluate(store: query.Backend, req: WhatIfRequest) -> dict[str, Any]:
    """The what-if report of a request (blocking: the store's query and the evaluation)."""
    from flowscope.collector.policy import PolicyInputError, load_inventory_text, what_if_report

    try:
        inventory = load_inventory_text(req.inventory) if req.inventory is not None else None
        return what_if_report(store, req.policies, inventory=inventory, since=req.since, namespace=req.namespace,
                              replace=req.replace)
    except PolicyInputError as exc:
        field = str(exc).split(":", 1)[0]
        raise WhatIfError(str(exc), field if field in _FIELDS else "policies") from None


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise WhatIfError(f"body: {request.content_length} bytes is more than the {MAX_BODY} allowed", "body", 413)
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_BODY:
            raise WhatIfError(f"body: more than the {MAX_BODY} bytes allowed", "body", 413)
        chunks.append(chunk)


def whatif_handler(store: query.Backend, executor: Executor,
                   respond: Callable[[Any, int], web.Response]) -> Callable[[web.Request], Any]:
    """The ``POST /ui/v1/whatif`` handler over ``store``; ``respond(data, status)`` makes the JSON answer."""

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            if request.content_type != "application/json":
                raise WhatIfError(f"body: Content-Type {request.content_type or 'none'} is not application/json",
                                  "body")
            req = parse_whatif(await _read_body(request))
            report = await asyncio.get_running_loop().run_in_executor(executor, evaluate, store, req)
        except WhatIfError as exc:
            return respond({"error": str(exc), "field": exc.field}, exc.status)
        except Exception as exc:  # noqa: BLE001 - the store failed: say so, keep serving
            return respond({"error": f"the store failed: {type(exc).__name__}: {exc}", "field": "store"}, 503)
        return respond(report, 200)

    return handler
