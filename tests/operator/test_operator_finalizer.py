"""The reconciler puts a FlowExporterConfig's finalizer on itself, without kopf's help.

kopf adds it with a JSON patch guarded by the resourceVersion it read; a status patch of
ours in between makes the API server answer 422, and kopf then waits for the resource's next
event, which a settled resource never gets (test_operator_production.py's deletion test met
it). The reconciler's own patch keeps other finalizers, carries the resourceVersion (a stale
one is a 409, tried again on the next reconcile) and is never sent twice or on a resource
being deleted.
"""

from __future__ import annotations

from typing import Any

from flowscope.operator.handlers import FINALIZER
from flowscope.operator.reconcile import Reconciler


class RecordingApi:
    def __init__(self) -> None:
        self.patches: list[tuple[Any, ...]] = []

    async def patch(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.patches.append(args)
        return {}


def body(**meta: Any) -> dict[str, Any]:
    return {"kind": "FlowExporterConfig", "metadata": {"name": "a", "namespace": "n", "uid": "u", **meta}}


async def test_the_finalizer_is_added_once_beside_others_and_never_while_deleting():
    api = RecordingApi()
    rec = Reconciler(api, image="i")  # type: ignore[arg-type]
    await rec._ensure_finalizer(body(resourceVersion="7", finalizers=["example.org/keep"]))
    assert api.patches == [("flowscope.dev/v1alpha1", "FlowExporterConfig", "n", "a",
                            {"metadata": {"finalizers": ["example.org/keep", FINALIZER], "resourceVersion": "7"}})]
    await rec._ensure_finalizer(body(resourceVersion="8", finalizers=[FINALIZER]))
    await rec._ensure_finalizer(body(resourceVersion="9", deletionTimestamp="2026-01-01T00:00:00Z"))
    assert len(api.patches) == 1
