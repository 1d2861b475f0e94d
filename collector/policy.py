"""``flowscope policy what-if`` and ``flowscope policy recommend``: policy insight from the
stored flows.

The engine (:mod:`flowscope.agent.policy_insight`) is pure and lives beside the agent's
policy evaluator, which it reuses; this module is its edge, in the collector's room
because it reads the store users query: it turns stored rows into distinct flow keys,
gives their Pods labels, reads policy files, and prints or returns the answers.

*The store seam* is :func:`stored_flow_keys`, the one function that knows how the store
is queried. It reads the flow store (:class:`~flowscope.collector.store.FlowStore`, chDB
or a server, through the query layer's ``rows(sql, params)`` with bound parameters) with
one GROUP BY over the window, so the engine sees distinct (source Pod, destination,
port, protocol, stored verdict) keys with their octets, number of flow records and
last-seen time, never the rows. A chDB directory belongs to the collector writing it:
``--api URL`` asks that collector for the same keys (``GET /api/v1/policy/keys``, served
by :mod:`flowscope.collector.api`) and evaluates them here, with this side's inventory.

*Labels*: the store keeps Pod names, not labels (IEs 143/144 exist but are off by
default). Labels, and the cluster's current policies, come from an inventory: a YAML
file of Kubernetes objects (``--inventory``, the agent's static metadata format) or the
cluster itself (``--kube``, the agent's watch). A Pod the inventory no longer has is
resolved from labels stored with the row when the store has those columns; otherwise
it is reported as unresolved rather than guessed.

For the dashboards, :func:`what_if_report` and :func:`recommend_report` return JSON-ready
dicts for a store and policy text, the same answers the CLI prints.

Exit codes: 0 nothing that flowed would be denied (what-if) / the recommendation covers
every observed flow; 1 something that flowed would be denied (what-if) / some observed
flows could not be covered (Pods without known labels; the policies are still written);
2 a usage error (bad file, bad option, unreachable store, no labels at all).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import yaml

from flowscope.agent.metadata import Inventory, MetadataError, load_inventory_file
from flowscope.agent.policy import ClusterPolicy, NetworkPolicy, PolicyError, parse_policy
from flowscope.agent.policy_insight import Endpoint, FlowKey, WhatIf, recommend, what_if
from flowscope.ipfix.antrea import DENY_ACTIONS

from .filter import Params
from .query import Backend
from .schema import quote

__all__ = [
    "register", "stored_flow_keys", "StoredKey", "check_namespace", "keys_from_json", "resolve_keys",
    "load_policies", "load_inventory_text", "what_if_report", "recommend_report", "PolicyInputError",
]

EXIT_OK, EXIT_BREAKS, EXIT_USAGE = 0, 1, 2
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_COLUMNS = ("sourcePodLabels", "destinationPodLabels")  # IEs 56506/143 and /144 (empty unless exported)
_KEY_COLUMNS = ("sourcePodNamespace", "sourcePodName", "sourceIP", "destinationPodNamespace", "destinationPodName",
                "destinationIP", "destinationTransportPort", "protocolIdentifier")


class PolicyInputError(ValueError):
    """A policy file, inventory or option that cannot be used; the message names it."""


# --------------------------------------------------------------------------- the store seam

StoredKey = tuple[str, str, str, str, str, str, int, int, bool, int, int, int, str, str]
"""(source namespace, source Pod, source IP, destination namespace, destination Pod,
destination IP, destination port, protocol, denied, octets, records, last seen, source
labels JSON, destination labels JSON); the labels are "" when the store has none."""


def stored_flow_keys(store: Backend, *, since: int | None = None, namespace: str | None = None) -> list[StoredKey]:
    """THE SEAM: distinct flow keys of the window, read from the store's raw table.

    One GROUP BY over the raw flows table through the store's query interface
    (:meth:`~flowscope.collector.store.FlowStore.rows`, chDB or a ClickHouse server, SQL
    within what 18.16 accepts), its values bound as parameters by
    :func:`flowscope.collector.filter.bind` (the namespace never enters the SQL text).
    ``since``: epoch seconds (rows inserted since); ``namespace``: keys with that
    namespace at either end. The roll-ups cannot answer (they keep no addresses or
    ports); nothing else here reads the store.
    """
    params = Params()
    where = []
    if since is not None:
        where.append(f"timeInserted >= toDateTime({params.add(int(since), 'UInt32')})")
    if namespace is not None:
        check_namespace(namespace)
        ns = params.add(namespace, "String")
        where.append(f"(sourcePodNamespace = {ns} OR destinationPodNamespace = {ns})")
    labels = ", ".join(f"any({quote(c)})" for c in _LABEL_COLUMNS)
    # Grouping on one 64-bit hash of the key's eight columns, not on the columns (six of
    # them strings), is what keeps this under a few seconds at 10M rows (benchmarks/
    # policy_whatif.py); the columns themselves come back through any().
    key = ", ".join(quote(c) for c in _KEY_COLUMNS)
    sql = (
        f"SELECT {', '.join(f'any({quote(c)})' for c in _KEY_COLUMNS)}, "
        f"({_denied('ingress')} OR {_denied('egress')}) AS denied, "
        "sum(octetDeltaCount + reverseOctetDeltaCount), count(), "
        f"toUInt32(max(flowEndSeconds)), {labels}, cityHash64({key}) AS k "
        f"FROM {quote(store.database)}.{quote(store.table)}"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " GROUP BY k, denied"
    )
    return [(str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), int(r[6]), int(r[7]), bool(int(r[8])),
             int(r[9]), int(r[10]), int(r[11]), str(r[12] or ""), str(r[13] or ""))
            for r in store.rows(sql, params.values)]


def _denied(direction: str) -> str:
    return f"{direction}NetworkPolicyRuleAction IN ({', '.join(str(a) for a in sorted(DENY_ACTIONS))})"


def check_namespace(namespace: str, field: str = "--namespace") -> str:
    """A Kubernetes namespace name, or :class:`PolicyInputError` naming ``field``."""
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise PolicyInputError(f"{field}: {namespace!r} is not a Kubernetes namespace name")
    return namespace


def keys_from_json(rows: Any) -> list[StoredKey]:
    """Stored keys as the collector's API sends them (JSON arrays), checked."""
    if not isinstance(rows, list):
        raise ValueError("keys: not a list")
    out: list[StoredKey] = []
    for r in rows:
        if not isinstance(r, list) or len(r) != 14:
            raise ValueError(f"keys: {r!r:.80} is not a stored flow key")
        out.append((str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), int(r[6]), int(r[7]),
                    bool(r[8]), int(r[9]), int(r[10]), int(r[11]), str(r[12]), str(r[13])))
    return out


# --------------------------------------------------------------------------- labels

def _stored_labels(text: str) -> Mapping[str, str] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else None


def resolve_keys(rows: Iterable[StoredKey], inventory: Inventory | None) -> Iterator[FlowKey]:
    """Flow keys with Pod labels: the inventory's first, the stored ones for Pods it lacks."""
    pods: dict[tuple[str, str], Any] = dict(inventory.pods) if inventory else {}
    ns_labels: Mapping[str, Mapping[str, str]] = inventory.namespace_labels if inventory else {}
    cache: dict[tuple[str, str, str, str], Endpoint] = {}

    def end(ns: str, pod: str, ip: str, stored: str) -> Endpoint:
        k = (ns, pod, ip, stored)
        e = cache.get(k)
        if e is None:
            if not ns:
                e = Endpoint(ip)
            else:
                info = pods.get((ns, pod))
                labels = info.labels if info is not None else _stored_labels(stored)
                e = Endpoint(ip, ns, pod, labels, ns_labels.get(ns), info.ports if info is not None else ())
            cache[k] = e
        return e

    for r in rows:
        yield FlowKey(end(r[0], r[1], r[2], r[12]), end(r[3], r[4], r[5], r[13]), r[6], r[7],
                      octets=r[9], records=r[10], last_seen=r[11], denied=r[8])


# --------------------------------------------------------------------------- policies

def _kubernetes_objects(text: str, where: str) -> Iterator[Mapping[str, Any]]:
    """The objects of a YAML text of several documents, with ``kind: List`` unpacked."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise PolicyInputError(f"{where}: not valid YAML: {exc}") from None
    stack = list(reversed(docs))
    while stack:
        d = stack.pop()
        if d is None:
            continue
        if not isinstance(d, Mapping):
            raise PolicyInputError(f"{where}: {d!r:.80} is not a Kubernetes object")
        if d.get("kind") == "List":
            stack.extend(reversed(d.get("items") or []))
            continue
        yield d


def load_policies(text: str, where: str = "policies") -> list[NetworkPolicy | ClusterPolicy]:
    """NetworkPolicies, AdminNetworkPolicies and the BaselineAdminNetworkPolicy from YAML
    (several documents, or ``kind: List``)."""
    out: list[NetworkPolicy | ClusterPolicy] = []
    for d in _kubernetes_objects(text, where):
        try:
            out.append(parse_policy(d))
        except PolicyError as exc:
            raise PolicyInputError(f"{where}: {exc}") from None
    return out


def current_policies(inventory: Inventory | None) -> list[NetworkPolicy | ClusterPolicy]:
    if inventory is None:
        return []
    return [*inventory.policies.values(), *inventory.cluster_policies.values()]


def load_inventory_text(text: str, where: str = "inventory") -> Inventory:
    """Pods, Namespaces and current policies from YAML text (the ``--inventory`` file's format:
    several documents, or ``kind: List``), as the dashboards' what-if page sends it."""
    inv = Inventory()
    for d in _kubernetes_objects(text, where):
        try:
            inv.apply(d)
        except MetadataError as exc:
            raise PolicyInputError(f"{where}: {exc}") from None
    return inv


# --------------------------------------------------------------------------- JSON for the dashboards

def what_if_report(store: Backend, policies_text: str, *, inventory: Inventory | None, since: int | None = None,
                   namespace: str | None = None, replace: bool = False) -> dict[str, Any]:
    """What applying ``policies_text`` would change over the stored flows, JSON-ready."""
    proposed = load_policies(policies_text)
    rows = stored_flow_keys(store, since=since, namespace=namespace)
    return _what_if(rows, proposed, inventory=inventory, replace=replace).to_json()


def _what_if(rows: Sequence[StoredKey], proposed: Sequence[NetworkPolicy | ClusterPolicy], *,
             inventory: Inventory | None, replace: bool) -> WhatIf:
    return what_if(resolve_keys(rows, inventory), current_policies(inventory), proposed, replace=replace)


def recommend_report(store: Backend, namespace: str, *, inventory: Inventory | None,
                     since: int | None = None) -> dict[str, Any]:
    """The least-privilege NetworkPolicies for ``namespace`` and the warnings, JSON-ready."""
    return _recommend(stored_flow_keys(store, since=since, namespace=namespace), namespace, inventory)


def _recommend(rows: Sequence[StoredKey], namespace: str, inventory: Inventory | None) -> dict[str, Any]:
    keys = list(resolve_keys(rows, inventory))
    policies, warnings = recommend(keys, namespace)
    # observed traffic the recommendation could not cover: its default-deny would block it
    unlabelled = [k for k in keys if any(e.is_pod and e.labels is None for e in (k.source, k.destination))]
    return {"namespace": namespace, "policies": policies, "warnings": warnings, "keys": len(rows),
            "unlabelled": len(unlabelled), "uncovered": sum(1 for k in unlabelled if not k.denied)}


def validate_manifests(objs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Errors from the upstream schema (kubernetes-validate, when installed; else one note)."""
    try:
        import kubernetes_validate  # type: ignore[import-untyped]
    except ImportError:
        return ["kubernetes-validate is not installed: the recommendation was not checked against the schema"]
    errors = []
    for obj in objs:
        try:
            kubernetes_validate.validate(dict(obj), "1.32", strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['metadata']['name']}: {exc.message}")
    return errors


# --------------------------------------------------------------------------- CLI

def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "policy", help="policy insight from the stored flows: what-if, recommend",
        description="Evaluate proposed policies against the flow history, or recommend least-privilege "
        "NetworkPolicies from it.")
    sub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        where = sp.add_mutually_exclusive_group(required=True)
        where.add_argument("--store", metavar="URL",
                           help="the flow store: tcp://HOST[:PORT][/DATABASE] or chdb:///DIR (a directory no process holds)")
        where.add_argument("--api", metavar="URL",
                           help="a running collector's API (http[s]://HOST:PORT, flowscope collector --api or --ui): "
                           "the way to read a chDB directory that collector holds")
        sp.add_argument("--token-file", metavar="FILE", help="with --api: send 'Authorization: Bearer <token in FILE>'")
        sp.add_argument("--table", default="flows", help="the flows table (default flows)")
        sp.add_argument("--database", default="flowscope", help="the database (default flowscope)")
        sp.add_argument("--since", metavar="DURATION|RFC3339", help="only flows stored since then (e.g. 24h)")
        src = sp.add_mutually_exclusive_group()
        src.add_argument("--inventory", metavar="FILE",
                         help="Pods, Namespaces and current policies as Kubernetes YAML (the agent's static metadata)")
        src.add_argument("--kube", action="store_true",
                         help="read Pods, Namespaces and current policies from the cluster (kubeconfig or in-cluster)")

    w = sub.add_parser("what-if", help="which stored flows would change verdict under proposed policies",
                       description="Lists every stored flow whose verdict the proposed policies would change, "
                       "grouped by source and destination workload. Exit status 1 when something that flowed "
                       "would be denied.")
    w.add_argument("-f", "--filename", required=True, metavar="POLICIES.yaml", help="the proposed policies ('-': stdin)")
    w.add_argument("--namespace", help="only flows with this namespace at either end")
    w.add_argument("--replace", action="store_true", help="the proposed policies replace the current ones")
    w.add_argument("-o", "--output", choices=("table", "json"), default="table")
    common(w)
    w.set_defaults(func=_cmd_what_if)

    r = sub.add_parser("recommend", help="least-privilege NetworkPolicies from the observed traffic",
                       description="Writes NetworkPolicies (YAML for kubectl apply) that allow exactly the traffic "
                       "observed for a namespace, with a default-deny for the rest.")
    r.add_argument("--namespace", required=True)
    r.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    common(r)
    r.set_defaults(func=_cmd_recommend)


def _err(message: str) -> int:
    print(f"flowscope policy: {message}", file=sys.stderr)
    return EXIT_USAGE


def _since(text: str | None, now: float) -> int | None:
    if text is None:
        return None
    from datetime import datetime

    from flowscope.durations import DurationError, parse_duration

    try:
        return int(now - parse_duration(text, field="--since"))
    except DurationError:
        pass
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
    except ValueError:
        raise PolicyInputError(f"--since: {text!r} is neither a duration (24h, 90m) nor an RFC 3339 time") from None


def _inventory(args: argparse.Namespace) -> Inventory | None:
    if args.inventory:
        try:
            return load_inventory_file(args.inventory)
        except MetadataError as exc:
            raise PolicyInputError(f"--inventory: {exc}") from None
    if args.kube:
        from flowscope.agent.kube import KubernetesMetadata

        source = KubernetesMetadata(node_name="")
        try:
            source.start()
        except MetadataError as exc:
            raise PolicyInputError(f"--kube: {exc}") from None
        try:
            if not source.wait_synced(60.0):
                raise PolicyInputError("--kube: the cluster's Pods, Namespaces and policies were not listed within 60s")
            return source.inventory()
        finally:
            source.close()
    return None


def _stored_keys(args: argparse.Namespace, since: int | None, namespace: str | None) -> list[StoredKey]:
    """The seam's keys, from the store opened here or from a running collector's API."""
    if namespace is not None:
        check_namespace(namespace)
    if args.api:
        return _api_keys(args.api, args.token_file, since, namespace)
    from flowscope.collector.store import StoreError, open_store

    try:
        store = open_store(args.store, args.database, args.table)
        store.open()
    except (StoreError, ValueError) as exc:
        raise PolicyInputError(f"--store: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a server that is down, a chDB directory held by another process
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = " (a chDB directory belongs to one process: ask the collector holding it with --api)" \
            if args.store.startswith("chdb") else ""
        raise PolicyInputError(f"--store: {args.store} cannot be read: {first}{hint}") from None
    try:
        return stored_flow_keys(store, since=since, namespace=namespace)
    finally:
        store.close()


def _api_keys(url: str, token_file: str | None, since: int | None, namespace: str | None) -> list[StoredKey]:
    import urllib.error
    import urllib.request
    from urllib.parse import urlencode, urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PolicyInputError(f"--api: {url!r} is not http://HOST:PORT or https://HOST:PORT")
    headers = {"Accept": "application/json"}
    if token_file:
        from flowscope.webauth import WebAuthError, read_token

        try:
            headers["Authorization"] = f"Bearer {read_token(token_file, '--token-file')}"
        except WebAuthError as exc:
            raise PolicyInputError(str(exc)) from None
    query = urlencode({k: v for k, v in (("since", since), ("namespace", namespace)) if v is not None})
    req = urllib.request.Request(f"{url.rstrip('/')}/api/v1/policy/keys?{query}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return keys_from_json(json.loads(resp.read())["keys"])
    except urllib.error.HTTPError as exc:
        try:
            message = str(json.loads(exc.read()).get("error", ""))
        except ValueError:
            message = ""
        raise PolicyInputError(f"--api {url}: {exc.code} {exc.reason}{': ' + message if message else ''}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise PolicyInputError(f"--api {url}: cannot reach the collector: {getattr(exc, 'reason', exc)}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise PolicyInputError(f"--api {url}: not a collector's answer: {exc}") from None


def _cmd_what_if(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.filename == "-" else _read(args.filename)
        proposed = load_policies(text, args.filename)
        since = _since(args.since, time.time())
        inventory = _inventory(args)
        rows = _stored_keys(args, since, args.namespace)
        result = _what_if(rows, proposed, inventory=inventory, replace=args.replace)
    except PolicyInputError as exc:
        return _err(str(exc))
    report = result.to_json()
    if args.output == "json":
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_table(report)
    return EXIT_BREAKS if result.breaks else EXIT_OK


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise PolicyInputError(f"{path}: cannot read: {exc.strerror}") from None


def _print_table(report: Mapping[str, Any]) -> None:
    print(f"{report['evaluated']} distinct flows evaluated; {report['newlyDenied']} would be denied "
          f"({report['breaks']} of them flowed), {report['newlyAllowed']} would be allowed")
    for g in report["groups"]:
        last = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(g["lastSeen"]))
        print(f"\n{g['source']} -> {g['destination']}  ({g['records']} flow records, {g['octets']} octets, last {last})")
        for c in g["changes"]:
            after = c["after"]
            why = f"{after['action']} by {after['tier']} {after['namespace'] + '/' if after['namespace'] else ''}" \
                  f"{after['name']} {after['rule']}".rstrip() if after else "no policy"
            print(f"  {c['change']:16s} {c['destination']['ip']}:{c['port']}/{c['protocol']}  "
                  f"{c['octets']} octets  {why}")
    if report["unresolved"]:
        print(f"\n{len(report['unresolved'])} flows left out: a Pod end has no known labels "
              "(not in the inventory, no labels stored)")


def _cmd_recommend(args: argparse.Namespace) -> int:
    try:
        since = _since(args.since, time.time())
        inventory = _inventory(args)
        report = _recommend(_stored_keys(args, since, args.namespace), args.namespace, inventory)
    except PolicyInputError as exc:
        return _err(str(exc))
    if report["keys"] and report["unlabelled"] == report["keys"]:
        return _err(f"none of the {report['keys']} stored flows of {args.namespace} has Pod labels: the store keeps "
                    "none; give --inventory FILE or --kube")
    problems = validate_manifests(report["policies"])
    for w in [*report["warnings"], *problems]:
        print(f"flowscope policy recommend: {w}", file=sys.stderr)
    if args.output == "json":
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(yaml.safe_dump_all(report["policies"], sort_keys=False), end="")
    if report["uncovered"]:
        print(f"flowscope policy recommend: {report['uncovered']} observed flows are not covered (see above); "
              "the default-deny would block them", file=sys.stderr)
        return EXIT_BREAKS
    return EXIT_USAGE if any("not installed" not in p for p in problems) else EXIT_OK
