"""The operator as a platform team meets it, against kmock's emulator and the real kubectl.

Fixtures and helpers come from test_operator_cluster.py (the emulator's gaps and their
fixes are listed in kmock_compat.py; gap 17, optimistic concurrency on patches, is what
leader election needs). The resync loop runs in every operator here, as in production.

- deletion, timed, with the resync loop on; and what happens while no operator runs;
- status: conditions after a spec change (rollout judged by observedGeneration and
  updated counts), a FlowExporterConfig whose aggregator is not ready, agent counts,
  printer columns, Events; the Argo CD health check of docs/operator.md run with Lua
  (lupa) on these real status objects;
- two FlowExporterConfigs on the same nodes; adoption of `flowscope render` output;
- two `flowscope operator` processes with leader election: the standby takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import kopf
import pytest
import yaml

from kmock_compat import simulate_rollout
from test_operator_cluster import (  # noqa: F401  (fixtures)
    RESYNC, ROOT, _reason_is, cluster, eventually, operator, ready_condition,
)
from flowscope.operator.handlers import FINALIZER, build_registry, configure
from flowscope.operator.kube import Connection

FA, FEC = ("flowscope.dev/v1alpha1", "FlowAggregator"), ("flowscope.dev/v1alpha1", "FlowExporterConfig")
SAMPLES = ROOT / "config" / "samples"


@contextlib.asynccontextmanager
async def running_operator(c):
    """The operator fixture's kopf thread, as a block: stopping it mid-test is the point."""
    stop, ready, errors = threading.Event(), threading.Event(), []
    registry = build_registry(Connection(server=c.url), image="flowscope:test", resync=RESYNC)
    settings = configure(kopf.OperatorSettings())
    settings.watching.server_timeout = 300
    settings.queueing.idle_timeout = 0.5
    settings.queueing.exit_timeout = 0.5
    settings.posting.enabled = False

    def run() -> None:
        try:
            asyncio.run(kopf.operator(registry=registry, settings=settings, standalone=True, clusterwide=True,
                                      stop_flag=stop, ready_flag=ready))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="kopf-operator", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 15), "the operator did not start"
    try:
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive() and not errors, errors


async def timed_kubectl(c, *args: str) -> float:
    t0 = time.monotonic()
    await c.kubectl(*args)
    return time.monotonic() - t0


async def finalizers(c, ref, ns, name):
    obj = await c.get(*ref, ns, name)
    return (obj or {}).get("metadata", {}).get("finalizers") or []


async def test_deletion_takes_seconds_with_resync_on_and_waits_for_the_operator_without_it(cluster):
    c = cluster
    crole = ("rbac.authorization.k8s.io/v1", "ClusterRole", None)
    measured = {}
    async with running_operator(c):
        await c.kubectl("apply", "--validate=false", "-f", str(SAMPLES))
        for ns, name in [("kube-system", "flowscope-agent"), ("flowscope-lab", "lab-agents"),
                         ("flowscope-lab", "direct-agents")]:
            await eventually(lambda ns=ns, name=name: c.get("apps/v1", "DaemonSet", ns, name))
            await eventually(lambda ns=ns, name=name: finalizers(c, FEC, ns, name))
            assert await finalizers(c, FEC, ns, name) == [FINALIZER]  # only where cleanup needs it
        assert await finalizers(c, FA, "flow-aggregator", "flow-aggregator") == []
        measured["fec"] = await timed_kubectl(c, "delete", "fec", "direct-agents", "-n", "flowscope-lab",
                                              "--timeout=60s")
        assert await c.get(*crole, "flowscope-agent-flowscope-lab-direct-agents") is None
        measured["fa"] = await timed_kubectl(c, "delete", "fa", "flow-aggregator", "-n", "flow-aggregator",
                                             "--timeout=60s")
        assert await c.get("apps/v1", "Deployment", "flow-aggregator", "flow-aggregator") is None

    # No operator running (docs/operator.md, "Without the operator"):
    # a FlowAggregator goes at once (no finalizer; the garbage collector takes its objects) ...
    measured["fa_without_operator"] = await timed_kubectl(c, "delete", "fa", "lab-aggregator", "-n",
                                                          "flowscope-lab", "--timeout=30s")
    assert await c.get("apps/v1", "Deployment", "flowscope-lab", "lab-aggregator") is None
    # ... a FlowExporterConfig stays Terminating until an operator removes its RBAC
    await c.kubectl("delete", "fec", "lab-agents", "-n", "flowscope-lab", "--wait=false")
    terminating = await c.get(*FEC, "flowscope-lab", "lab-agents")
    assert terminating["metadata"]["deletionTimestamp"] and await c.get(*crole, "flowscope-agent-flowscope-lab-lab-agents")
    # ... unless its finalizer is removed by hand: it goes, its ClusterRole stays behind for now
    await c.kubectl("delete", "fec", "flowscope-agent", "-n", "kube-system", "--wait=false")
    await c.kubectl("patch", "fec", "flowscope-agent", "-n", "kube-system", "--type=merge", "-p",
                    '{"metadata": {"finalizers": null}}')
    await eventually(lambda: _gone(c, FEC, "kube-system", "flowscope-agent"))
    assert await c.get(*crole, "flowscope-agent-kube-system-flowscope-agent")

    async with running_operator(c):
        # the next operator finishes both: the pending deletion and the orphaned RBAC
        await eventually(lambda: _gone(c, FEC, "flowscope-lab", "lab-agents"))
        for name in ("flowscope-agent-flowscope-lab-lab-agents", "flowscope-agent-kube-system-flowscope-agent"):
            await eventually(lambda name=name: _gone(c, crole[:2], None, name))
        # the documented uninstall, everything at once
        await c.kubectl("apply", "--validate=false", "-f", str(SAMPLES))
        await eventually(lambda: finalizers(c, FEC, "kube-system", "flowscope-agent"))
        t0 = time.monotonic()
        # --wait=false and a poll: kubectl's own wait after `delete -A --all` never returns
        # against the emulator, although every object is gone (kmock_compat.py, not closed)
        await c.kubectl("delete", "fec,fa", "-A", "--all", "--wait=false")

        async def all_gone():
            left = (await c.kubectl("get", "fec,fa", "-A", "--no-headers")).strip()
            assert left == "", left
            return True
        await eventually(all_gone, 60)
        measured["uninstall"] = time.monotonic() - t0
    print("DELETION_SECONDS", {k: round(v, 2) for k, v in measured.items()})


async def _gone(c, ref, ns, name):
    return await c.get(*ref, ns, name) is None


def lua_health():
    """The Argo CD health check, as docs/operator.md gives it, in a real Lua interpreter."""
    lupa = pytest.importorskip("lupa")
    text = (ROOT / "docs" / "operator.md").read_text()
    script = re.search(r"## Argo CD health check.*?```lua\n(.*?)```", text, re.S).group(1)
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    fn = lua.eval("function(obj) " + script + " end")

    def to_lua(value):
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    def health(obj):
        hs = fn(to_lua(obj))
        return hs["status"], hs["message"]
    return health


async def events(c, namespace):
    answer = await c.api._request("GET", f"/api/v1/namespaces/{namespace}/events")
    return [(e["reason"], e["type"], e["involvedObject"]["name"]) for e in (answer or {}).get("items", [])]


async def test_status_tells_the_truth_through_a_rollout_and_argo_cd_reads_it(operator):
    c = operator
    health = lua_health()
    await c.kubectl("apply", "--validate=false", "-f", str(SAMPLES / "01-aggregator-tls.yaml"),
                    "-f", str(SAMPLES / "02-agents.yaml"))
    await eventually(lambda: c.get("apps/v1", "DaemonSet", "kube-system", "flowscope-agent"))
    await simulate_rollout(c.emu, "DaemonSet", "kube-system", "flowscope-agent", 3)
    # agents ready, aggregator not: the FlowExporterConfig is not Ready either, and says why
    async def waits_for_the_aggregator():
        fec = await _reason_is(c, "FlowExporterConfig", "kube-system", "flowscope-agent", "AggregatorNotReady")
        return fec if "flow-aggregator/flow-aggregator is not Ready (Deploying" in ready_condition(fec)["message"] else None
    fec = await eventually(waits_for_the_aggregator)
    assert health(fec)[0] == "Progressing"
    await simulate_rollout(c.emu, "Deployment", "flow-aggregator", "flow-aggregator", 1)
    fa = await eventually(lambda: _reason_is(c, "FlowAggregator", "flow-aggregator", "flow-aggregator", "Running"))
    fec = await eventually(lambda: _reason_is(c, "FlowExporterConfig", "kube-system", "flowscope-agent", "Running"))
    conds = {x["type"]: (x["status"], x["reason"]) for x in fa["status"]["conditions"]}
    assert conds == {"Ready": ("True", "Running"), "Available": ("True", "MinimumReplicasAvailable"),
                     "Progressing": ("False", "RolloutComplete"), "Degraded": ("False", "AsExpected")}
    assert fa["status"]["apiEndpoint"] == "https://flow-aggregator.flow-aggregator.svc:10348"
    assert (fec["status"]["desiredAgents"], fec["status"]["readyAgents"]) == (3, 3)
    assert health(fa) == ("Healthy", "Running: aggregator listening on flow-aggregator.flow-aggregator.svc:4739:tls")
    assert health(fec)[0] == "Healthy"
    header, *rows = (await c.kubectl("get", "fec", "-n", "kube-system")).splitlines()
    assert header.split() == ["NAME", "COLLECTOR", "DESIRED", "AGENTS", "READY", "REASON", "AGE"]
    assert rows[0].split()[:6] == ["flowscope-agent", "flow-aggregator.flow-aggregator.svc:4739:tls", "3", "3",
                                   "True", "Running"]

    # a spec change: the old pod is ready, but the rollout is not done until the Deployment
    # has observed the new generation and updated its pods
    await c.kubectl("patch", "fa", "flow-aggregator", "-n", "flow-aggregator", "--type=merge", "-p",
                    '{"spec": {"flowExportInterval": "30s"}}')
    fa = await eventually(lambda: _reason_is(c, "FlowAggregator", "flow-aggregator", "flow-aggregator", "Deploying"))
    progressing = next(x for x in fa["status"]["conditions"] if x["type"] == "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "RolloutPending")
    assert health(fa)[0] == "Progressing"
    fec = await eventually(lambda: _reason_is(c, "FlowExporterConfig", "kube-system", "flowscope-agent",
                                              "AggregatorNotReady"))
    await simulate_rollout(c.emu, "Deployment", "flow-aggregator", "flow-aggregator", 1)
    await eventually(lambda: _reason_is(c, "FlowAggregator", "flow-aggregator", "flow-aggregator", "Running"))
    await eventually(lambda: _reason_is(c, "FlowExporterConfig", "kube-system", "flowscope-agent", "Running"))

    # a typo: refused with the fix, Degraded for Argo CD, a Warning Event for kubectl describe
    await c.kubectl("patch", "fec", "flowscope-agent", "-n", "kube-system", "--type=merge", "-p",
                    '{"spec": {"flowPolInterval": "2s"}}')
    fec = await eventually(lambda: _reason_is(c, "FlowExporterConfig", "kube-system", "flowscope-agent",
                                              "InvalidSpec"))
    status, message = health(fec)
    assert status == "Degraded" and "spec.flowPolInterval: unknown field; did you mean flowPollInterval?" in message
    seen = await eventually(lambda: _events_include(c, "kube-system", ("InvalidSpec", "Warning", "flowscope-agent")))
    assert ("Applied", "Normal", "flowscope-agent") in seen and ("Running", "Normal", "flowscope-agent") in seen
    assert ("Applied", "Normal", "flow-aggregator") in await events(c, "flow-aggregator")


async def _events_include(c, ns, event):
    seen = await events(c, ns)
    return seen if event in seen else None


async def test_overlapping_exporter_configs_never_deploy_twice(operator):
    c = operator
    # `second` (default namespace, all nodes) is created first: older than the samples' agents
    # (or, in the same second, ahead by namespace). While it deploys nothing of its own fault
    # it holds no nodes; once fixed, the agents already running keep them: age alone would
    # have torn them down for it.
    await c.kubectl("apply", "--validate=false", "-f", "-", stdin="""
apiVersion: flowscope.dev/v1alpha1
kind: FlowExporterConfig
metadata: {name: second, namespace: default}
spec:
  flowAggregatorRef: {name: nowhere}
""")
    await eventually(lambda: _reason_is(c, "FlowExporterConfig", "default", "second", "AggregatorNotFound"))
    await c.kubectl("apply", "--validate=false", "-f", str(SAMPLES / "01-aggregator-tls.yaml"),
                    "-f", str(SAMPLES / "02-agents.yaml"))
    await eventually(lambda: c.get("apps/v1", "DaemonSet", "kube-system", "flowscope-agent"))
    await c.kubectl("patch", "fec", "second", "-n", "default", "--type=merge", "-p",
                    '{"spec": {"flowAggregatorRef": null, "flowCollectorAddr": "10.0.0.5:4739:udp"}}')
    second = await eventually(lambda: _reason_is(c, "FlowExporterConfig", "default", "second", "NodeConflict"))
    assert second["status"]["observedGeneration"] == second["metadata"]["generation"]
    assert ("held by FlowExporterConfig kube-system/flowscope-agent (nodeSelector {'kubernetes.io/os': 'linux'}; "
            "its agents run there)") in ready_condition(second)["message"]
    assert await c.get("apps/v1", "DaemonSet", "default", "second") is None  # nothing deployed twice
    await eventually(lambda: _events_include(c, "default", ("NodeConflict", "Warning", "second")))
    agents = await c.get(*FEC, "kube-system", "flowscope-agent")
    assert ready_condition(agents)["reason"] != "NodeConflict"
    assert await c.get("apps/v1", "DaemonSet", "kube-system", "flowscope-agent") is not None
    # the one ahead goes: the held-back one is judged again at once, not at a resync
    await c.kubectl("delete", "fec", "flowscope-agent", "-n", "kube-system", "--timeout=60s")
    await eventually(lambda: c.get("apps/v1", "DaemonSet", "default", "second"))
    await eventually(lambda: _reason_is(c, "FlowExporterConfig", "default", "second", "Deploying"))


async def test_render_output_is_adopted_only_when_annotated(operator, tmp_path):
    c = operator

    def rendered(name: str, adopt: bool) -> str:
        cr = {"apiVersion": "flowscope.dev/v1alpha1", "kind": "FlowExporterConfig",
              "metadata": {"name": name, "namespace": "default"},
              "spec": {"flowCollectorAddr": "10.0.0.5:4739:udp", "nodeSelector": {"pool": name}}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cr))
        import subprocess
        res = subprocess.run([sys.executable, "-m", "flowscope", "render", "-f", str(tmp_path / f"{name}.yaml"),
                              *(["--adopt"] if adopt else [])], capture_output=True, text=True, check=True)
        return res.stdout

    await c.kubectl("apply", "--validate=false", "-f", "-", stdin=rendered("gitops", adopt=True))
    await c.kubectl("apply", "--validate=false", "-f", "-", stdin=rendered("foreign", adopt=False))
    for name in ("gitops", "foreign"):
        await c.kubectl("apply", "--validate=false", "-f", str(tmp_path / f"{name}.yaml"))
    foreign = await eventually(lambda: _reason_is(c, "FlowExporterConfig", "default", "foreign", "NameConflict"))
    message = ready_condition(foreign)["message"]
    for what in ("ServiceAccount default/foreign", "ConfigMap default/foreign-config", "DaemonSet default/foreign"):
        assert what in message  # every conflict at once
    assert "flowscope.dev/adopt=true" in message
    gitops = await c.get(*FEC, "default", "gitops")

    async def adopted():
        ds = await c.get("apps/v1", "DaemonSet", "default", "gitops")
        refs = ds["metadata"].get("ownerReferences") or []
        return refs and refs[0]["uid"] == gitops["metadata"]["uid"]
    await eventually(adopted)
    await eventually(lambda: _reason_is(c, "FlowExporterConfig", "default", "gitops", "Deploying"))


async def lease_holder(c):
    lease = await c.get("coordination.k8s.io/v1", "Lease", "flowscope-system", "flowscope-operator")
    return ((lease or {}).get("spec") or {}).get("holderIdentity")


async def test_two_operators_elect_one_leader_and_the_standby_takes_over(cluster):
    c = cluster
    await c.kubectl("apply", "--validate=false", "-f", "-", stdin="apiVersion: v1\nkind: Namespace\n"
                                                                  "metadata: {name: flowscope-system}\n")
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env["KUBECONFIG"] = str(c.kubeconfig)
    procs = {}
    for who in ("first", "second"):
        procs[who] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flowscope", "operator", "--resync", "1h", "--image", "flowscope:ha",
            "--liveness", "", "--leader-election-namespace", "flowscope-system", "--lease-duration", "3s",
            "--identity", who, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        if who == "first":
            await eventually(lambda: _holder_is(c, "first"), 60)
    said: list[str] = []
    try:
        # the standby must have seen the Lease held before the holder crashes (a process
        # started on a loaded machine takes seconds to get there)
        await output_until(procs["second"], "second stands by; another replica holds the Lease", said)
        await c.kubectl("apply", "--validate=false", "-f", str(SAMPLES / "01-aggregator-tls.yaml"))
        await eventually(lambda: c.get("apps/v1", "Deployment", "flow-aggregator", "flow-aggregator"), 60)
        assert await lease_holder(c) == "first"
        procs["first"].send_signal(signal.SIGKILL)  # a crash: no release, the Lease must expire
        await procs["first"].wait()
        await eventually(lambda: _holder_is(c, "second"), 60)
        await c.kubectl("apply", "--validate=false", "-f", str(SAMPLES / "03-lab-aggregator-ipfix-clickhouse.yaml"))
        await eventually(lambda: c.get("apps/v1", "Deployment", "flowscope-lab", "lab-aggregator"), 60)
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 20)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()
    second = "".join(said) + (await procs["second"].stdout.read()).decode()
    assert "second took the Lease flowscope-system/flowscope-operator from 'first'" in second
    assert "created Deployment flowscope-lab/lab-aggregator" in second
    assert procs["second"].returncode == 0, second[-2000:]
    lease = await c.get("coordination.k8s.io/v1", "Lease", "flowscope-system", "flowscope-operator")
    assert lease["spec"]["holderIdentity"] == ""  # released on a graceful stop
    assert lease["spec"]["leaseTransitions"] >= 1


async def output_until(proc, text: str, lines: list[str], timeout: float = 60.0) -> None:
    """Read the process's output, line by line into ``lines``, until one contains ``text``."""
    async def read() -> None:
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise AssertionError(f"the process ended before saying {text!r}: {''.join(lines)[-2000:]}")
            lines.append(line.decode())
            if text in lines[-1]:
                return
    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"not said within {timeout:g}s: {text!r}; said: {''.join(lines)[-2000:]}") from None


async def _holder_is(c, who):
    return await lease_holder(c) == who
