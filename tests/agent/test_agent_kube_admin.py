"""The agent's watch of the cluster-scoped policies (AdminNetworkPolicy, BaselineAdminNetworkPolicy)
against kmock's emulator over real HTTP: served, they reach the inventory and decide; not served
(no CRD), the watch counts as listed and the agent runs on without errors."""

from __future__ import annotations

import asyncio

import pytest
from test_agent_kube import OBJECTS, api_client, call, eventually

kmock = pytest.importorskip("kmock")
from flowscope.agent.kube import KubernetesMetadata  # noqa: E402
from flowscope.agent.metadata import Enricher  # noqa: E402
from kmock_compat import CompatEmulator  # noqa: E402
from agent_entries import entry  # noqa: E402

ANP_PATH = "/apis/policy.networking.k8s.io/v1alpha1/adminnetworkpolicies"
ANP = {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
       "metadata": {"name": "no-client"}, "spec": {
           "priority": 1, "subject": {"namespaces": {}},
           "ingress": [{"name": "deny-client", "action": "Deny",
                        "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "client"}}}}]}]}}


async def test_admin_policies_are_watched_and_decide():
    async with CompatEmulator() as emu, kmock.Server(emu) as srv:
        api = api_client(srv.url)
        for path, obj in [*OBJECTS, (ANP_PATH, ANP)]:
            assert await asyncio.to_thread(call, api, "POST", path, obj) in (200, 201)
        md = KubernetesMetadata(node_name="node-a", api_client=api_client(srv.url), watch_timeout=5)
        md.start()
        try:
            assert await asyncio.to_thread(md.wait_synced, 10)
            enricher = Enricher("node-a", md)
            conn = entry("10.244.1.11", "10.244.0.12", 40000, 8080)
            assert await eventually(lambda: enricher.enrich(conn).ingress is not None
                                    and enricher.enrich(conn).ingress.policy_type == 4)
            v = enricher.enrich(conn).ingress
            assert (v.policy_name, v.rule_name, v.action) == ("no-client", "deny-client", 2)
        finally:
            md.close()


class _NoCRDs:
    """An API server without the policy.networking.k8s.io CRDs: 404 for their paths, empty lists
    otherwise (its watches fail, which the watchers retry; only the listing matters here)."""

    class _Resp:
        def __init__(self, status: int, body: bytes) -> None:
            self.status, self._body = status, body

        def read(self) -> bytes:
            return self._body

    def __init__(self) -> None:
        self.asked: list[str] = []

    def param_serialize(self, method, resource_path, query_params, header_params, auth_settings):
        return method, resource_path, header_params, None, None

    def call_api(self, method, url, header_params, body, post_params, _request_timeout):
        self.asked.append(url)
        if "policy.networking.k8s.io" in url:
            return self._Resp(404, b'{"kind":"Status","code":404}')
        return self._Resp(200, b'{"items": [], "metadata": {"resourceVersion": "1"}}')


def test_a_cluster_without_the_crds_counts_as_listed():
    api = _NoCRDs()
    md = KubernetesMetadata(node_name="node-a", api_client=api, watch_timeout=1)
    md.start()
    try:
        for kind in ("AdminNetworkPolicy", "BaselineAdminNetworkPolicy"):
            assert md._synced[kind].wait(10), kind
        assert any("adminnetworkpolicies" in u for u in api.asked)
        assert md.inventory().policy_set.admin == ()
    finally:
        md.close()
