"""The operator against an API server over HTTP, driven by the real kubectl.

kopf runs the operator's handlers in this test's event loop against kmock's
KubernetesEmulator, made to behave like a kube-apiserver by kmock_compat.py (every gap
between the two is listed there, next to its fix). ``/usr/bin/kubectl`` (Debian's
kubernetes-client 1.32) applies the CRDs and samples, reads the printer columns and
deletes. The emulator runs no controllers, so tests play the Deployment/DaemonSet
controller with ``simulate_rollout`` where readiness matters, and kubectl needs
``--validate=false`` (no OpenAPI endpoint).

Waiting: ``eventually`` polls for what the operator does in reaction to an event; no
test waits for the resync loop, which runs as in production (every few seconds here, so
its reconciles happen during every test and must write nothing); rotation uses an
injected clock.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import datetime as dt
import uuid
from pathlib import Path

import kmock
import kopf
import pytest
import yaml
from cryptography import x509
from cryptography.x509 import DNSName
from cryptography.x509.verification import PolicyBuilder, Store

from conftest import require_tool
from kmock_compat import CompatEmulator, simulate_rollout
from flowscope.operator.handlers import build_registry, configure
from flowscope.operator.kube import Connection, KubeApi
from flowscope.operator.reconcile import Reconciler

ROOT = Path(__file__).resolve().parents[2]
WRITES = ("POST", "PATCH", "PUT", "DELETE")
RESYNC = 3.0  # seconds: the resync loop runs during the tests, as in production


class Cluster:
    def __init__(self, emu: CompatEmulator, url: str, kubeconfig: Path):
        self.emu, self.url, self.kubeconfig = emu, url, kubeconfig
        self.api = KubeApi(Connection(server=url))

    async def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            "kubectl", "--kubeconfig", str(self.kubeconfig), *args, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), 60)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {err.decode()}")
        return out.decode()

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        return await self.api.get(api_version, kind, namespace, name)

    def writes(self) -> list[str]:
        """Writes by the operator's own client (kopf's bookkeeping, kubectl and tests excluded)."""
        return [f"{getattr(r.method, 'value', r.method)} {r.url.path}" for r in list(self.emu)
                if getattr(r.method, "value", r.method) in WRITES
                and r.headers.get("User-Agent", "").startswith("flowscope-operator/")]


async def eventually(check, timeout: float = 60.0):
    """Poll ``check`` (async, returns a truthy value when done) until it holds. The bound
    only matters when something is broken: a loaded 2-core CI machine is slow, not broken."""
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while True:
        try:
            last = await check()
            if last:
                return last
        except (AssertionError, KeyError, TypeError) as exc:
            last = exc
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached within {timeout}s; last: {last!r}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def cluster(tmp_path):
    require_tool("kubectl")
    async with CompatEmulator() as emu, kmock.Server(emu) as srv:
        url = str(srv.url).rstrip("/")
        kubeconfig = tmp_path / f"kubeconfig-{uuid.uuid4().hex[:8]}"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emu",
            "clusters": [{"name": "emu", "cluster": {"server": url}}],
            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u", "namespace": "default"}}],
            "users": [{"name": "u", "user": {"token": "test"}}],
        }))
        c = Cluster(emu, url, kubeconfig)
        await c.kubectl("apply", "--validate=false", "-f", str(ROOT / "crds"))
        yield c
        await c.api.close()


@pytest.fixture
async def operator(cluster):
    """kopf in its own thread and event loop, as in a real process: kopf cancels every task
    of its loop it did not start when it stops, which would include the test's own."""
    stop = threading.Event()
    ready = threading.Event()
    registry = build_registry(Connection(server=cluster.url), image="flowscope:test", resync=RESYNC)
    settings = configure(kopf.OperatorSettings())
    settings.watching.server_timeout = 300
    settings.queueing.idle_timeout = 0.5  # per-object workers exit soon, so the operator stops fast
    settings.queueing.exit_timeout = 0.5
    settings.posting.enabled = False  # no k8s Events: nothing to assert on them here
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(kopf.operator(registry=registry, settings=settings, standalone=True, clusterwide=True,
                                      stop_flag=stop, ready_flag=ready))
        except BaseException as exc:  # surfaced at teardown
            errors.append(exc)

    thread = threading.Thread(target=run, name="kopf-operator", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 15), "the operator did not start"
    yield cluster
    stop.set()
    await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive(), "the operator did not stop within 30s"
    assert not errors, errors


def ready_condition(obj: dict | None) -> dict:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == "Ready":
            return cond
    return {}


async def apply_samples(c: Cluster) -> None:
    # the README's command: CRDs and samples in one go (the CRDs are already there: unchanged)
    out = await c.kubectl("apply", "--validate=false", "-f", str(ROOT / "crds"), "-f", str(ROOT / "config" / "samples"))
    assert "customresourcedefinition.apiextensions.k8s.io/flowaggregators.flowscope.dev unchanged" in out
    assert "flowaggregator.flowscope.dev/flow-aggregator created" in out

    async def deployed():
        return (await c.get("apps/v1", "DaemonSet", "kube-system", "flowscope-agent")
                and await c.get("apps/v1", "Deployment", "flowscope-lab", "lab-aggregator")
                and await c.get("apps/v1", "DaemonSet", "flowscope-lab", "direct-agents"))
    await eventually(deployed)


def b64(secret: dict, key: str) -> bytes:
    return base64.b64decode(secret["data"][key])


async def test_samples_become_a_ready_pipeline(operator):
    c = operator
    await apply_samples(c)
    # no pods yet; the status is written after the objects, so it is waited for
    fa = await eventually(lambda: _reason_is(c, "FlowAggregator", "flow-aggregator", "flow-aggregator", "Deploying"))
    dep = await c.get("apps/v1", "Deployment", "flow-aggregator", "flow-aggregator")
    owner = dep["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "FlowAggregator", "flow-aggregator", fa["metadata"]["uid"], True)
    for kind, name in [("Service", "flow-aggregator"), ("ConfigMap", "flow-aggregator-config"),
                       ("Secret", "flow-aggregator-server-tls"), ("ServiceAccount", "flow-aggregator")]:
        obj = await c.get("v1", kind, "flow-aggregator", name)
        assert obj["metadata"]["ownerReferences"][0]["uid"] == fa["metadata"]["uid"], (kind, name)

    await simulate_rollout(c.emu, "Deployment", "flow-aggregator", "flow-aggregator", 1)
    await simulate_rollout(c.emu, "DaemonSet", "kube-system", "flowscope-agent", 3)

    async def both_ready():
        fa = await c.get("flowscope.dev/v1alpha1", "FlowAggregator", "flow-aggregator", "flow-aggregator")
        fec = await c.get("flowscope.dev/v1alpha1", "FlowExporterConfig", "kube-system", "flowscope-agent")
        return ready_condition(fa).get("status") == "True" and ready_condition(fec).get("status") == "True" and (fa, fec)
    fa, fec = await eventually(both_ready)
    assert fa["status"]["observedGeneration"] == fa["metadata"]["generation"]
    assert fec["status"]["collectorAddress"] == "flow-aggregator.flow-aggregator.svc:4739:tls"
    assert ready_condition(fec)["message"] == "3 agents exporting to flow-aggregator.flow-aggregator.svc:4739:tls"

    table = await c.kubectl("get", "flowaggregators", "-A")
    header, *rows = table.splitlines()
    assert header.split() == ["NAMESPACE", "NAME", "TRANSPORT", "PORT", "READY", "REASON", "AGE"]
    assert ["flow-aggregator", "flow-aggregator", "tls", "4739", "True", "Running"] in [r.split()[:6] for r in rows]
    assert ["flowscope-lab", "lab-aggregator", "tcp", "4739", "False", "Deploying"] in [r.split()[:6] for r in rows]
    short = await c.kubectl("get", "fec", "-n", "kube-system")
    assert "flow-aggregator.flow-aggregator.svc:4739:tls" in short and "True" in short

    # TLS material: the server certificate verifies for the Service name against the CA bundle
    bundle = await c.get("v1", "ConfigMap", "flow-aggregator", "flow-aggregator-ca-bundle")
    ca = x509.load_pem_x509_certificate(bundle["data"]["ca.crt"].encode())
    server = await c.get("v1", "Secret", "flow-aggregator", "flow-aggregator-server-tls")
    cert = x509.load_pem_x509_certificate(b64(server, "tls.crt"))
    PolicyBuilder().store(Store([ca])).time(dt.datetime.now(dt.timezone.utc)).build_server_verifier(
        DNSName("flow-aggregator.flow-aggregator.svc")).verify(cert, [])
    agents = await c.get("v1", "Secret", "kube-system", "flowscope-agent-client-tls")
    agg_client = await c.get("v1", "Secret", "flow-aggregator", "flow-aggregator-client-tls")
    assert agents["data"] == agg_client["data"]
    config = yaml.safe_load((await c.get("v1", "ConfigMap", "kube-system", "flowscope-agent-config"))["data"]["agent.yaml"])
    assert config["flowCollectorAddr"] == "flow-aggregator.flow-aggregator.svc:4739:tls"
    # kopf asks the server for our workloads only (a large cluster has many Deployments)
    watched = [r for r in list(c.emu) if r.resource is not None and r.resource.plural in ("deployments", "daemonsets")
               and r.headers.get("User-Agent", "").startswith("kopf/")]
    assert watched and {r.params.get("labelSelector") for r in watched} == {
        "app.kubernetes.io/managed-by=flowscope-operator"}


async def test_invalid_specs_become_conditions_and_nothing_is_half_applied(operator):
    c = operator
    await apply_samples(c)
    # dangling (all nodes) is created first, so it is ahead of mismatched by age (in the same
    # second too: same namespace, and its name sorts first), yet holds no nodes: it deploys
    # nothing (AggregatorNotFound), so the fixed mismatched deploys
    bad = """
apiVersion: flowscope.dev/v1alpha1
kind: FlowExporterConfig
metadata: {name: dangling, namespace: kube-system}
spec:
  flowAggregatorRef: {name: nowhere}
---
apiVersion: flowscope.dev/v1alpha1
kind: FlowExporterConfig
metadata: {name: mismatched, namespace: kube-system}
spec:
  flowAggregatorRef: {name: flow-aggregator, namespace: flow-aggregator}
  transport: udp
  nodeSelector: {flowscope.dev/lab: "false"}  # no node of the samples' agents
---
apiVersion: flowscope.dev/v1alpha1
kind: FlowAggregator
metadata: {name: too-fast, namespace: default}
spec:
  flowExportInterval: 500ms
  transport: tls
---
apiVersion: flowscope.dev/v1alpha1
kind: FlowAggregator
metadata: {name: no-creds, namespace: default}
spec:
  sinks:
    clickhouse: {enabled: true, credentialsSecretRef: {name: missing-creds}}
"""
    await c.kubectl("apply", "--validate=false", "-f", "-", stdin=bad)

    async def conditions():
        out = {}
        for kind, ns, name in [("FlowExporterConfig", "kube-system", "mismatched"),
                               ("FlowExporterConfig", "kube-system", "dangling"),
                               ("FlowAggregator", "default", "too-fast"),
                               ("FlowAggregator", "default", "no-creds")]:
            cond = ready_condition(await c.get("flowscope.dev/v1alpha1", kind, ns, name))
            if not cond:
                return None
            out[name] = cond
        return out
    conds = await eventually(conditions)
    assert conds["mismatched"]["status"] == "False" and conds["mismatched"]["reason"] == "TransportMismatch"
    assert "spec.transport: 'udp' does not match FlowAggregator flow-aggregator/flow-aggregator, which listens " \
           "with 'tls'; remove spec.transport" in conds["mismatched"]["message"]
    assert conds["dangling"]["reason"] == "AggregatorNotFound"
    assert "FlowAggregator kube-system/nowhere does not exist" in conds["dangling"]["message"]
    assert conds["too-fast"]["reason"] == "InvalidSpec"
    assert "spec.flowExportInterval: '500ms' is below the 1s minimum" in conds["too-fast"]["message"]
    assert conds["no-creds"]["reason"] == "ClickHouseSecretInvalid"
    assert "Secret default/missing-creds does not exist; create it with keys username and password" in \
        conds["no-creds"]["message"]
    # never half-applied: nothing at all was created for them
    for kind, api, ns, name in [("DaemonSet", "apps/v1", "kube-system", "mismatched"),
                                ("ConfigMap", "v1", "kube-system", "mismatched-config"),
                                ("ServiceAccount", "v1", "kube-system", "dangling"),
                                ("Deployment", "apps/v1", "default", "too-fast"),
                                ("Secret", "v1", "default", "too-fast-ca"),
                                ("ConfigMap", "v1", "default", "no-creds-config")]:
        assert await c.get(api, kind, ns, name) is None, (kind, name)
    table = await c.kubectl("get", "fec", "-n", "kube-system")
    assert any(line.split()[:1] == ["mismatched"] and "TransportMismatch" in line for line in table.splitlines())

    # fixing the spec recovers without operator restart
    await c.kubectl("patch", "fec", "mismatched", "-n", "kube-system", "--type=merge", "-p",
                    '{"spec": {"transport": "tls"}}')
    await eventually(lambda: c.get("apps/v1", "DaemonSet", "kube-system", "mismatched"))
    fec = await eventually(lambda: _reason_is(c, "FlowExporterConfig", "kube-system", "mismatched", "Deploying"))
    assert fec["status"]["observedGeneration"] == 2


async def _reason_is(c, kind, ns, name, reason):
    obj = await c.get("flowscope.dev/v1alpha1", kind, ns, name)
    return obj if ready_condition(obj).get("reason") == reason else None


async def writes_settled(c, quiet: float = 1.0, timeout: float = 60.0) -> int:
    """Wait until the running operator has written nothing for ``quiet`` seconds (on a
    loaded machine it handles the echoes of its own writes late); returns its write count."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    count, since = len(c.writes()), loop.time()
    while loop.time() - since < quiet:
        assert loop.time() < deadline, f"the operator kept writing for {timeout:g}s: {c.writes()[-10:]}"
        await asyncio.sleep(0.05)
        if (n := len(c.writes())) != count:
            count, since = n, loop.time()
    return count


async def test_second_reconcile_and_restart_write_nothing(operator):
    c = operator
    await apply_samples(c)
    # quantities the apiserver rewrites ("0.5" is stored as "500m") must not look like drift
    await c.kubectl("patch", "fa", "lab-aggregator", "-n", "flowscope-lab", "--type=merge", "-p",
                    '{"spec": {"resources": {"requests": {"cpu": "0.5"}, "limits": {"cpu": 2}}}}')

    async def canonical():
        dep = await c.get("apps/v1", "Deployment", "flowscope-lab", "lab-aggregator")
        return dep["spec"]["template"]["spec"]["containers"][0]["resources"] == {
            "requests": {"cpu": "500m"}, "limits": {"cpu": "2"}}
    await eventually(canonical)
    await simulate_rollout(c.emu, "Deployment", "flow-aggregator", "flow-aggregator", 1)
    await eventually(lambda: _reason_is(c, "FlowAggregator", "flow-aggregator", "flow-aggregator", "Running"))
    for ns, name in [("kube-system", "flowscope-agent"), ("flowscope-lab", "lab-agents"),
                     ("flowscope-lab", "direct-agents")]:
        await eventually(lambda ns=ns, name=name: _reason_is(c, "FlowExporterConfig", ns, name, "Deploying"))
    secret_before = await c.get("v1", "Secret", "flow-aggregator", "flow-aggregator-server-tls")
    before = await writes_settled(c)  # the operator's own event echoes are over before counting
    # a fresh Reconciler is what an operator restart sees: no memory, only the cluster
    fresh = Reconciler(KubeApi(Connection(server=c.url)), image="flowscope:test")
    try:
        for kind, ns, name in [("FlowAggregator", "flow-aggregator", "flow-aggregator"),
                               ("FlowAggregator", "flowscope-lab", "lab-aggregator"),
                               ("FlowExporterConfig", "kube-system", "flowscope-agent"),
                               ("FlowExporterConfig", "flowscope-lab", "lab-agents"),
                               ("FlowExporterConfig", "flowscope-lab", "direct-agents")]:
            body = await c.get("flowscope.dev/v1alpha1", kind, ns, name)
            outcome = await (fresh.aggregator(body) if kind == "FlowAggregator" else fresh.exporter(body))
            assert outcome.writes == 0, (kind, name)
    finally:
        await fresh.api.close()
    assert c.writes()[before:] == []  # not even a status patch
    assert await c.get("v1", "Secret", "flow-aggregator", "flow-aggregator-server-tls") == secret_before
    # server-filled defaults exist (the emulator adds them) and did not count as differences
    dep = await c.get("apps/v1", "Deployment", "flow-aggregator", "flow-aggregator")
    assert dep["spec"]["revisionHistoryLimit"] == 10


async def test_drift_is_corrected_and_config_changes_roll_pods(operator):
    c = operator
    await apply_samples(c)
    ds = await c.get("apps/v1", "DaemonSet", "kube-system", "flowscope-agent")
    await c.kubectl("patch", "daemonset", "flowscope-agent", "-n", "kube-system", "--type=merge", "-p",
                    '{"spec": {"template": {"spec": {"hostNetwork": false}}}}')

    async def corrected():
        now = await c.get("apps/v1", "DaemonSet", "kube-system", "flowscope-agent")
        return now["spec"]["template"]["spec"]["hostNetwork"] is True and now
    await eventually(corrected)

    def hash_of(obj):
        return obj["spec"]["template"]["metadata"]["annotations"]["flowscope.dev/config-hash"]
    dep = await c.get("apps/v1", "Deployment", "flow-aggregator", "flow-aggregator")
    await c.kubectl("patch", "flowaggregator", "flow-aggregator", "-n", "flow-aggregator", "--type=merge", "-p",
                    '{"spec": {"flowExportInterval": "30s"}}')

    async def rolled():
        now = await c.get("apps/v1", "Deployment", "flow-aggregator", "flow-aggregator")
        return hash_of(now) != hash_of(dep) and now
    await eventually(rolled)
    cm = await c.get("v1", "ConfigMap", "flow-aggregator", "flow-aggregator-config")
    assert yaml.safe_load(cm["data"]["aggregator.yaml"])["flowExportInterval"] == "30s"
    fa = await c.get("flowscope.dev/v1alpha1", "FlowAggregator", "flow-aggregator", "flow-aggregator")
    assert fa["metadata"]["generation"] == 2
    await eventually(lambda: _generation_observed(c, "flow-aggregator", "flow-aggregator", 2))
    # the agents' config does not depend on the export interval: their pods do not roll
    assert hash_of(await c.get("apps/v1", "DaemonSet", "kube-system", "flowscope-agent")) == hash_of(ds)


async def _generation_observed(c, ns, name, generation):
    fa = await c.get("flowscope.dev/v1alpha1", "FlowAggregator", ns, name)
    return fa["status"].get("observedGeneration") == generation


async def test_certificates_rotate_before_expiry_and_reach_the_agents(cluster):
    # Without the kopf operator: a live operator on the real clock would (rightly) replace
    # certificates that are not valid yet by its clock. Reconcilers with two clocks instead.
    c = cluster
    await c.kubectl("apply", "--validate=false", "-f", str(ROOT / "config/samples/01-aggregator-tls.yaml"),
                    "-f", str(ROOT / "config/samples/02-agents.yaml"))
    today = Reconciler(KubeApi(Connection(server=c.url)), image="flowscope:test")
    try:
        await today.aggregator(await c.get("flowscope.dev/v1alpha1", "FlowAggregator", "flow-aggregator",
                                           "flow-aggregator"))
        await today.exporter(await c.get("flowscope.dev/v1alpha1", "FlowExporterConfig", "kube-system",
                                         "flowscope-agent"))
    finally:
        await today.api.close()
    server0 = await c.get("v1", "Secret", "flow-aggregator", "flow-aggregator-server-tls")
    cert0 = x509.load_pem_x509_certificate(b64(server0, "tls.crt"))
    ds0 = await c.get("apps/v1", "DaemonSet", "kube-system", "flowscope-agent")
    # 1h into the rotation margin (720h before the 8760h lifetime ends), per an injected clock
    due = cert0.not_valid_after_utc - dt.timedelta(hours=720) + dt.timedelta(hours=1)
    later = Reconciler(KubeApi(Connection(server=c.url)), image="flowscope:test", clock=lambda: due)
    try:
        fa = await c.get("flowscope.dev/v1alpha1", "FlowAggregator", "flow-aggregator", "flow-aggregator")
        assert (await later.aggregator(fa)).writes >= 3  # two Secrets, the Deployment (hash)
        fec = await c.get("flowscope.dev/v1alpha1", "FlowExporterConfig", "kube-system", "flowscope-agent")
        await later.exporter(fec)
    finally:
        await later.api.close()
    server1 = await c.get("v1", "Secret", "flow-aggregator", "flow-aggregator-server-tls")
    cert1 = x509.load_pem_x509_certificate(b64(server1, "tls.crt"))
    assert cert1.serial_number != cert0.serial_number
    assert cert1.not_valid_after_utc > cert0.not_valid_after_utc and due < cert0.not_valid_after_utc
    assert b64(server1, "ca.crt") == b64(server0, "ca.crt")  # the CA is far from expiry: kept
    agents = await c.get("v1", "Secret", "kube-system", "flowscope-agent-client-tls")
    client = await c.get("v1", "Secret", "flow-aggregator", "flow-aggregator-client-tls")
    assert agents["data"] == client["data"]
    ds1 = await c.get("apps/v1", "DaemonSet", "kube-system", "flowscope-agent")
    key = "flowscope.dev/tls-hash"  # the certificates' hash rolls the agents; the config's is unchanged
    assert ds1["spec"]["template"]["metadata"]["annotations"][key] != ds0["spec"]["template"]["metadata"]["annotations"][key]


async def test_kubectl_delete_cleans_everything_up(operator):
    c = operator
    await apply_samples(c)
    assert await c.get("rbac.authorization.k8s.io/v1", "ClusterRole", None,
                       "flowscope-agent-kube-system-flowscope-agent")
    await c.kubectl("delete", "flowexporterconfig", "flowscope-agent", "-n", "kube-system", "--timeout=60s")
    assert await c.get("rbac.authorization.k8s.io/v1", "ClusterRole", None,
                       "flowscope-agent-kube-system-flowscope-agent") is None  # the finalizer ran
    assert await c.get("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", None,
                       "flowscope-agent-kube-system-flowscope-agent") is None
    assert await c.get("apps/v1", "DaemonSet", "kube-system", "flowscope-agent") is None
    assert await c.get("v1", "Secret", "kube-system", "flowscope-agent-client-tls") is None
    await c.kubectl("delete", "flowaggregator", "flow-aggregator", "-n", "flow-aggregator", "--timeout=60s")

    async def gone():
        for api, kind, name in [("apps/v1", "Deployment", "flow-aggregator"), ("v1", "Service", "flow-aggregator"),
                                ("v1", "Secret", "flow-aggregator-ca"), ("v1", "ConfigMap", "flow-aggregator-config")]:
            if await c.get(api, kind, "flow-aggregator", name) is not None:
                return False
        return True
    await eventually(gone)
    left = await c.kubectl("get", "flowaggregators", "-A")
    assert "flow-aggregator " not in left and "lab-aggregator" in left
    # agents whose aggregator is deleted say so (and keep what was applied)
    await c.kubectl("delete", "flowaggregator", "lab-aggregator", "-n", "flowscope-lab", "--timeout=60s")
    lab = await eventually(lambda: _reason_is(c, "FlowExporterConfig", "flowscope-lab", "lab-agents",
                                              "AggregatorNotFound"))
    assert "FlowAggregator flowscope-lab/lab-aggregator does not exist" in ready_condition(lab)["message"]
    assert await c.get("apps/v1", "DaemonSet", "flowscope-lab", "lab-agents") is not None
    assert_operator_rbac_covers(c)


def assert_operator_rbac_covers(c: Cluster) -> None:
    """Every request the operator (our client and kopf) made is allowed by config/operator/rbac.yaml."""
    rules = next(d for d in yaml.safe_load_all((ROOT / "config/operator/rbac.yaml").read_text())
                 if d["kind"] == "ClusterRole")["rules"]
    seen = set()
    for r in list(c.emu):
        agent = r.headers.get("User-Agent", "")
        if not (agent.startswith("flowscope-operator/") or agent.startswith("kopf/")) or r.resource is None:
            continue
        if not r.resource.plural:
            continue  # discovery
        method = getattr(r.method, "value", r.method)
        verb = {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}.get(method)
        if verb is None:
            verb = "watch" if r.params.get("watch") == "true" else "get" if r.name else "list"
        resource = r.resource.plural + (f"/{r.subresource}" if r.subresource else "")
        seen.add((r.resource.group, resource, verb))
    assert ("apps", "daemonsets", "create") in seen and ("flowscope.dev", "flowaggregators/status", "patch") in seen
    denied = [s for s in seen if not any(s[0] in rule["apiGroups"] and s[1] in rule["resources"]
                                         and s[2] in rule["verbs"] for rule in rules)]
    assert denied == []


async def test_switching_to_tcp_prunes_tls_material_everywhere(operator):
    c = operator
    await apply_samples(c)
    await eventually(lambda: c.get("v1", "Secret", "kube-system", "flowscope-agent-client-tls"))
    await c.kubectl("patch", "fa", "flow-aggregator", "-n", "flow-aggregator", "--type=merge", "-p",
                    '{"spec": {"transport": "tcp"}}')

    async def switched():
        fec = await c.get("flowscope.dev/v1alpha1", "FlowExporterConfig", "kube-system", "flowscope-agent")
        return fec["status"].get("collectorAddress") == "flow-aggregator.flow-aggregator.svc:4739:tcp" and fec
    await eventually(switched)
    # one reconcile prunes kind after kind (Secrets, then ConfigMaps): each is waited for
    pruned = [("Secret", "flow-aggregator", "flow-aggregator-ca"),
              ("Secret", "flow-aggregator", "flow-aggregator-server-tls"),
              ("Secret", "flow-aggregator", "flow-aggregator-client-tls"),
              ("Secret", "kube-system", "flowscope-agent-client-tls"),
              ("ConfigMap", "flow-aggregator", "flow-aggregator-ca-bundle")]
    for kind, ns, name in pruned:
        await eventually(lambda kind=kind, ns=ns, name=name: _absent(c, "v1", kind, ns, name))
    ds = await c.get("apps/v1", "DaemonSet", "kube-system", "flowscope-agent")
    assert "tls" not in {v["name"] for v in ds["spec"]["template"]["spec"]["volumes"]}
    config = yaml.safe_load((await c.get("v1", "ConfigMap", "kube-system", "flowscope-agent-config"))["data"]["agent.yaml"])
    assert config["flowCollectorAddr"].endswith(":tcp") and "tls" not in config
    svc = await c.get("v1", "Service", "flow-aggregator", "flow-aggregator")
    assert [p["name"] for p in svc["spec"]["ports"]] == ["ipfix-tcp", "api", "metrics"]
    # the status follows the switch too (its patch may land after the objects were pruned)
    async def plain_status():
        fa = await c.get("flowscope.dev/v1alpha1", "FlowAggregator", "flow-aggregator", "flow-aggregator")
        return "serverCertificateNotAfter" not in fa["status"] and fa
    await eventually(plain_status)
    # and stays pruned: no later reconcile (events of the pruned objects, the resync) brings it back
    await writes_settled(c)
    for kind, ns, name in pruned:
        assert await _absent(c, "v1", kind, ns, name), (kind, ns, name)
    # unrelated objects of the same namespace are never pruned
    assert await c.get("v1", "Secret", "flowscope-lab", "clickhouse-credentials") is not None


async def _absent(c, api, kind, ns, name):
    return await c.get(api, kind, ns, name) is None


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_flowscope_operator_command_runs_from_a_kubeconfig(cluster):
    """The real entry point: `flowscope operator` in its own process, kubeconfig login, liveness."""
    import os
    import signal
    import sys

    import aiohttp

    c = cluster
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env["KUBECONFIG"] = str(c.kubeconfig)
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowscope", "operator", "--resync", "1h", "--image", "flowscope:cli",
        "--liveness", f"http://127.0.0.1:{port}/healthz", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await c.kubectl("apply", "--validate=false", "-f", str(ROOT / "config/samples/01-aggregator-tls.yaml"))
        dep = await eventually(lambda: c.get("apps/v1", "Deployment", "flow-aggregator", "flow-aggregator"), 60)
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "flowscope:cli"

        async def alive():
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
                return r.status == 200
        await eventually(alive, 30)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
    output = (await proc.stdout.read()).decode()
    assert "created Deployment flow-aggregator/flow-aggregator" in output
    assert proc.returncode == 0, output[-2000:]


async def test_the_operator_command_refuses_a_bad_resync():
    import sys
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowscope", "operator", "--resync", "500ms",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 1
    assert "--resync: '500ms' is below the 1s minimum" in err.decode()


async def test_api_errors_neither_crash_nor_stick(operator):
    c = operator
    # an apiserver hiccup on the Deployment, an admission webhook refusing the DaemonSet
    c.emu.inject_failure("POST", "/namespaces/flow-aggregator/deployments", 500, "etcdserver: request timed out")
    c.emu.inject_failure("POST", "/namespaces/kube-system/daemonsets", 422,
                         'admission webhook "policy.example.org" denied the request: privileged containers are '
                         "not allowed")
    await c.kubectl("apply", "--validate=false", "-f", str(ROOT / "config/samples/01-aggregator-tls.yaml"),
                    "-f", str(ROOT / "config/samples/02-agents.yaml"))
    fec = await eventually(lambda: _reason_is(c, "FlowExporterConfig", "kube-system", "flowscope-agent",
                                              "ApplyFailed"))
    message = ready_condition(fec)["message"]
    assert "daemonsets" in message and "privileged containers are not allowed" in message
    assert [f[4] for f in c.emu.failures] == [0, 0]  # both errors were really served
    # the transient 500 left no condition behind; the next event applies everything
    await c.kubectl("annotate", "fa", "flow-aggregator", "-n", "flow-aggregator", "example.org/poke=1")
    await eventually(lambda: c.get("apps/v1", "Deployment", "flow-aggregator", "flow-aggregator"))
    await c.kubectl("annotate", "fec", "flowscope-agent", "-n", "kube-system", "example.org/poke=1")
    await eventually(lambda: _reason_is(c, "FlowExporterConfig", "kube-system", "flowscope-agent", "Deploying"))
    assert await c.get("apps/v1", "DaemonSet", "kube-system", "flowscope-agent") is not None


async def test_objects_of_someone_else_are_never_taken_over(operator):
    c = operator
    await apply_samples(c)
    fa_config = await c.get("v1", "ConfigMap", "flow-aggregator", "flow-aggregator-config")
    # a FlowExporterConfig named like the FlowAggregator, in its namespace: same object names
    await c.kubectl("apply", "--validate=false", "-f", "-", stdin="""
apiVersion: flowscope.dev/v1alpha1
kind: FlowExporterConfig
metadata: {name: flow-aggregator, namespace: flow-aggregator}
spec:
  flowAggregatorRef: {name: flow-aggregator}
  nodeSelector: {flowscope.dev/lab: "false"}
""")
    fec = await eventually(lambda: _reason_is(c, "FlowExporterConfig", "flow-aggregator", "flow-aggregator",
                                              "NameConflict"))
    message = ready_condition(fec)["message"]
    assert "belongs to FlowAggregator flow-aggregator; give this FlowExporterConfig another name" in message
    # every conflict at once, not one per reconcile
    assert "ServiceAccount flow-aggregator/flow-aggregator belongs" in message and \
        "ConfigMap flow-aggregator/flow-aggregator-config belongs" in message
    assert await c.get("v1", "ConfigMap", "flow-aggregator", "flow-aggregator-config") == fa_config
    assert await c.get("apps/v1", "DaemonSet", "flow-aggregator", "flow-aggregator") is None  # nothing written
    # a hand-made ConfigMap that happens to carry a name the operator wants
    await c.kubectl("apply", "--validate=false", "-f", "-", stdin="""
apiVersion: v1
kind: ConfigMap
metadata: {name: mine-config, namespace: kube-system}
data: {agent.yaml: x}
""")
    await c.kubectl("apply", "--validate=false", "-f", "-", stdin="""
apiVersion: flowscope.dev/v1alpha1
kind: FlowExporterConfig
metadata: {name: mine, namespace: kube-system}
spec:
  flowCollectorAddr: "10.0.0.5:4739:udp"
  nodeSelector: {flowscope.dev/lab: "mine"}
""")
    mine = await eventually(lambda: _reason_is(c, "FlowExporterConfig", "kube-system", "mine", "NameConflict"))
    assert "ConfigMap kube-system/mine-config already exists and no custom resource controls it" in \
        ready_condition(mine)["message"]
    cm = await c.get("v1", "ConfigMap", "kube-system", "mine-config")
    assert cm["data"] == {"agent.yaml": "x"}
    assert await c.get("v1", "ServiceAccount", "kube-system", "mine") is None


async def test_the_collector_sample_deploys_keeps_its_token_and_is_pruned_when_switched_off(operator):
    """spec.collector (sample 05): the operator creates the collector's Deployment, Service,
    PVC and UI token Secret, the aggregator exports to it, and the token survives reconciles.
    Switched off, the collector's Deployment, Service, NetworkPolicy and token are deleted and
    the aggregator stops exporting to it; the PVC (the stored flows) stays, named in the
    status, until reclaimPolicy Delete asks for it to go."""
    c = operator
    ns = "flowscope-flows"
    await c.kubectl("apply", "--validate=false", "-f", str(ROOT / "config/samples/05-aggregator-with-collector.yaml"))
    # the status says Deploying once every object is written; one found earlier may be the first of many
    await eventually(lambda: _reason_is(c, "FlowAggregator", ns, "flows", "Deploying"))
    dep = await c.get("apps/v1", "Deployment", ns, "flows-collector")
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"][:3] == ["collector", "--listen", "0.0.0.0:4740:tcp"]
    assert await c.get("v1", "Service", ns, "flows-collector") is not None
    assert await c.get("v1", "PersistentVolumeClaim", ns, "flows-collector-store") is not None
    token = (await c.get("v1", "Secret", ns, "flows-ui-token"))["data"]["token"]
    config = yaml.safe_load((await c.get("v1", "ConfigMap", ns, "flows-config"))["data"]["aggregator.yaml"])
    assert config["externalFlowCollectorAddr"] == "flows-collector.flowscope-flows.svc:4740:tcp"
    await c.kubectl("annotate", "fa", "flows", "-n", ns, "example.org/poke=1")
    await eventually(lambda: _reason_is(c, "FlowAggregator", ns, "flows", "Deploying"))
    assert (await c.get("v1", "Secret", ns, "flows-ui-token"))["data"]["token"] == token  # generated once, kept
    assert await c.get("networking.k8s.io/v1", "NetworkPolicy", ns, "flows-collector") is not None

    await c.kubectl("patch", "fa", "flows", "-n", ns, "--type=merge", "-p", '{"spec":{"collector":{"enabled":false}}}')

    async def switched_off():
        fa = await c.get("flowscope.dev/v1alpha1", "FlowAggregator", ns, "flows")
        return ((fa.get("status") or {}).get("retainedCollectorStore") == "flows-collector-store"
                and all([await c.get("apps/v1", "Deployment", ns, "flows-collector") is None,
                         await c.get("v1", "Service", ns, "flows-collector") is None,
                         await c.get("networking.k8s.io/v1", "NetworkPolicy", ns, "flows-collector") is None,
                         await c.get("v1", "Secret", ns, "flows-ui-token") is None]))
    await eventually(switched_off)
    assert await c.get("v1", "PersistentVolumeClaim", ns, "flows-collector-store") is not None  # the flows
    for api, kind, name in [("apps/v1", "Deployment", "flows"), ("v1", "Service", "flows"),
                            ("networking.k8s.io/v1", "NetworkPolicy", "flows")]:
        assert await c.get(api, kind, ns, name) is not None, (kind, name)  # the aggregator's own stay
    config = yaml.safe_load((await c.get("v1", "ConfigMap", ns, "flows-config"))["data"]["aggregator.yaml"])
    assert config["externalFlowCollectorAddr"] == ""
    events = await c.api.list("v1", "Event", ns)
    assert [e["message"] for e in events if e["reason"] == "CollectorStoreRetained"] == [
        "PersistentVolumeClaim flows-collector-store keeps the stored flows although no collector uses it; "
        "enabling the chDB collector again reuses it; set spec.collector.store.chdb.reclaimPolicy: Delete "
        "(or delete it) to free it"]  # said once, not at every resync

    # Emulator gap relied on here: kmock runs no pods and no kubernetes.io/pvc-protection
    # finalizer, so a deleted claim goes at once; a real cluster keeps it Terminating until the
    # collector's pod (deleted with its Deployment, above) has gone. Only the operator's
    # decision is checked.
    await c.kubectl("patch", "fa", "flows", "-n", ns, "--type=merge", "-p",
                    '{"spec":{"collector":{"store":{"chdb":{"reclaimPolicy":"Delete"}}}}}')

    async def reclaimed():
        fa = await c.get("flowscope.dev/v1alpha1", "FlowAggregator", ns, "flows")
        return ("retainedCollectorStore" not in (fa.get("status") or {})
                and await c.get("v1", "PersistentVolumeClaim", ns, "flows-collector-store") is None)
    await eventually(reclaimed)
    assert await c.get("apps/v1", "Deployment", ns, "flows") is not None


async def test_the_grpc_sample_reaches_the_agents_config_and_the_aggregators_service(operator):
    """transport grpc and recordContents.podLabels (sample 06) through kubectl and the
    operator: the aggregator's Service exposes the gRPC port, its config listens with grpc over
    mutual TLS, and the agents' ConfigMap exports to HOST:14739:grpc with the Pods' labels."""
    c = operator
    ns = "flowscope-grpc"
    await c.kubectl("apply", "--validate=false", "-f", str(ROOT / "config/samples/06-aggregator-grpc.yaml"))
    # Deploying is said once every object is written: the ConfigMap alone may precede the Secret
    fec = await eventually(lambda: _reason_is(c, "FlowExporterConfig", ns, "grpc-agents", "Deploying"))
    await eventually(lambda: _reason_is(c, "FlowAggregator", ns, "grpc-aggregator", "Deploying"))
    cm = await c.get("v1", "ConfigMap", ns, "grpc-agents-config")
    agent = yaml.safe_load(cm["data"]["agent.yaml"])
    assert agent["flowCollectorAddr"] == "grpc-aggregator.flowscope-grpc.svc:14739:grpc"
    assert agent["recordContents"] == {"podLabels": True}
    assert agent["tls"]["serverName"] == "grpc-aggregator.flowscope-grpc.svc"
    svc = await c.get("v1", "Service", ns, "grpc-aggregator")
    assert {"name": "grpc", "protocol": "TCP", "port": 14739, "targetPort": 14739} in svc["spec"]["ports"]
    raw = yaml.safe_load((await c.get("v1", "ConfigMap", ns, "grpc-aggregator-config"))["data"]["aggregator.yaml"])
    assert raw["aggregatorTransportProtocol"] == "grpc" and raw["listenPort"] == 14739 and raw["tls"]
    client = await c.get("v1", "Secret", ns, "grpc-agents-client-tls")
    assert b64(client, "tls.crt").startswith(b"-----BEGIN CERTIFICATE-----")
    assert fec["status"]["collectorAddress"] == "grpc-aggregator.flowscope-grpc.svc:14739:grpc"
