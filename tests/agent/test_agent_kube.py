"""KubernetesMetadata against an API server over real HTTP (kmock's emulator, made to
behave like a kube-apiserver by tests/operator/kmock_compat.py): list, watch, updates."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest
from agent_entries import entry

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "operator"))

kmock = pytest.importorskip("kmock")
kubernetes = pytest.importorskip("kubernetes")
from flowscope.agent.kube import KubernetesMetadata  # noqa: E402
from flowscope.agent.metadata import Enricher  # noqa: E402
from kmock_compat import CompatEmulator  # noqa: E402

OBJECTS = [
    ("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}, "spec": {"podCIDRs": ["10.244.0.0/24"]}}),
    ("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"}, "spec": {"podCIDRs": ["10.244.1.0/24"]}}),
    ("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "shop"}}}),
    ("/api/v1/namespaces/shop/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "namespace": "shop", "labels": {"app": "client"}},
        "spec": {"nodeName": "node-b", "containers": [{"name": "c", "image": "x"}]},
        "status": {"podIPs": [{"ip": "10.244.1.11"}]}}),
    ("/api/v1/namespaces/shop/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "server", "namespace": "shop", "labels": {"app": "server"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"podIPs": [{"ip": "10.244.0.12"}]}}),
    ("/api/v1/namespaces/shop/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "server", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": [{"name": "web", "port": 80, "protocol": "TCP"}]}}),
    ("/apis/networking.k8s.io/v1/namespaces/shop/networkpolicies", {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "server-web", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": "http"}]}]}}),
]


def api_client(url):
    cfg = kubernetes.client.Configuration()
    cfg.host = str(url).rstrip("/")
    return kubernetes.client.ApiClient(cfg)


def call(api, method, path, body=None):
    ctype = "application/merge-patch+json" if method == "PATCH" else "application/json"
    m, url, headers, data, post = api.param_serialize(method=method, resource_path=path, body=body,
                                                      header_params={"Content-Type": ctype})
    resp = api.call_api(m, url, header_params=headers, body=data, post_params=post)
    resp.read()
    return resp.status


async def eventually(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.05)
    return cond()


async def test_watch_fills_the_inventory_and_follows_changes():
    async with CompatEmulator() as emu, kmock.Server(emu) as srv:
        api = api_client(srv.url)
        for path, obj in OBJECTS:
            assert await asyncio.to_thread(call, api, "POST", path, obj) in (200, 201)
        md = KubernetesMetadata(node_name="node-a", api_client=api_client(srv.url), watch_timeout=5)
        md.start()
        try:
            assert await asyncio.to_thread(md.wait_synced, 10)
            enricher = Enricher("node-a", md)
            conn = entry("10.244.1.11", "10.96.0.10", 40000, 80, reply_src="10.244.0.12", reply_sport=8080)
            got = enricher.enrich(conn)
            assert (got.destination_pod_namespace, got.destination_pod_name) == ("shop", "server")
            assert got.source_pod_name == ""  # the client runs on node-b: not ours to name
            assert got.flow_type == 2  # inter-node, known from node-b's podCIDR
            assert got.destination_service_port_name == "shop/server:web"
            assert (got.ingress.policy_name, got.ingress.rule_name, got.ingress.action) == ("server-web", "ingress-0", 1)

            # a label change on the remote client Pod flips the verdict
            await asyncio.to_thread(call, api, "PATCH", "/api/v1/namespaces/shop/pods/client",
                                    {"metadata": {"labels": {"app": "intruder"}}})
            assert await eventually(lambda: enricher.enrich(conn).ingress.action == 2)
            # deleting the policy removes the isolation
            await asyncio.to_thread(call, api, "DELETE", "/apis/networking.k8s.io/v1/namespaces/shop/networkpolicies/server-web")
            assert await eventually(lambda: enricher.enrich(conn).ingress is None)
            # a new Pod appears, a deleted one disappears
            await asyncio.to_thread(call, api, "POST", "/api/v1/namespaces/shop/pods", {
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "late", "namespace": "shop"},
                "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "x"}]},
                "status": {"podIPs": [{"ip": "10.244.0.30"}]}})
            inv = md.inventory()
            assert await eventually(lambda: inv.pod_by_ip.get(bytes([10, 244, 0, 30])) is not None)
            await asyncio.to_thread(call, api, "DELETE", "/api/v1/namespaces/shop/pods/server")
            assert await eventually(lambda: bytes([10, 244, 0, 12]) not in inv.pod_by_ip)
            assert enricher.enrich(conn).destination_pod_name == ""
        finally:
            md.close()


async def test_local_pods_only_mode_keeps_no_remote_pod():
    async with CompatEmulator() as emu, kmock.Server(emu) as srv:
        api = api_client(srv.url)
        for path, obj in OBJECTS:
            await asyncio.to_thread(call, api, "POST", path, obj)
        md = KubernetesMetadata(node_name="node-a", watch_remote_pods=False, api_client=api_client(srv.url), watch_timeout=5)
        md.start()
        try:
            assert await asyncio.to_thread(md.wait_synced, 10)
            assert {p.name for p in md.inventory().pods.values()} == {"server"}
        finally:
            md.close()


async def test_an_unreachable_api_server_is_retried_not_fatal():
    md = KubernetesMetadata(node_name="node-a", api_client=api_client("http://127.0.0.1:9"), watch_timeout=1)
    md.start()
    try:
        assert not await asyncio.to_thread(md.wait_synced, 1.5)
        assert md.errors >= 1
        assert Enricher("node-a", md).enrich(entry()).flow_type == 0  # still enriching, with nothing known
    finally:
        md.close()
