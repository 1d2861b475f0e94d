"""``flowscope operator`` (kopf under the hood) and ``flowscope render`` (offline manifests).

kopf, the kubernetes client and cryptography are imported inside the command functions,
so that ``flowscope --help`` stays fast and the data-plane commands never load them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from flowscope import __version__

DEFAULT_IMAGE = os.environ.get("FLOWSCOPE_IMAGE") or f"ghcr.io/flowscope/flowscope:{__version__}"


def register(subparsers: Any) -> None:
    op = subparsers.add_parser(
        "operator", help="run the operator (kopf) reconciling FlowAggregator and FlowExporterConfig",
        description="Reconcile flowscope's custom resources into agents and aggregators.",
    )
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", default=True,
                       help="watch every namespace (the default)")
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                       help="watch only this namespace (repeatable)")
    op.add_argument("--image", default=DEFAULT_IMAGE,
                    help="image for agents and aggregators whose CR names none (env FLOWSCOPE_IMAGE)")
    op.add_argument("--resync", default="60s", help="period of the per-resource resync (Go duration, >= 1s)")
    op.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="kopf liveness endpoint ('' disables)")
    op.add_argument("--context", help="kubeconfig context (outside a cluster)")
    op.add_argument("--leader-election-namespace", metavar="NS", default=os.environ.get("POD_NAMESPACE", ""),
                    help="elect one active replica through the Lease flowscope-operator in NS (env POD_NAMESPACE; "
                         "'' runs without election, as a single replica)")
    op.add_argument("--lease-duration", default="15s", help="how long a silent leader keeps the Lease (Go duration)")
    op.add_argument("--identity", default=os.environ.get("HOSTNAME", ""),
                    help="this replica's name in the Lease (env HOSTNAME, the pod name)")
    op.add_argument("--verbose", action="store_true")
    op.set_defaults(func=run_operator)

    render = subparsers.add_parser(
        "render", help="print the manifests the operator would create for custom resources, without a cluster",
        description="Render FlowAggregator / FlowExporterConfig files into Kubernetes manifests (GitOps, reviews).",
    )
    render.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                        help="a YAML file or directory of them, '-' for stdin (repeatable)")
    render.add_argument("--no-secrets", action="store_true",
                        help="leave Secrets (TLS material) out; the output is then deterministic")
    render.add_argument("--image", default=DEFAULT_IMAGE, help="image for CRs that name none")
    render.add_argument("-n", "--namespace", default="default", help="namespace of CRs that name none")
    render.add_argument("--ca-cert", metavar="FILE", help="an existing CA certificate (PEM): the certificates and "
                        "API tokens are then derived from it, the same on every run")
    render.add_argument("--ca-key", metavar="FILE", help="the CA's private key (PEM), with --ca-cert")
    render.add_argument("--adopt", action="store_true",
                        help="annotate every rendered object flowscope.dev/adopt=true, so that the operator may take "
                             "them over later")
    render.set_defaults(func=run_render)


def _read_documents(names: list[str]) -> list[dict[str, Any]]:
    import yaml

    texts: list[tuple[str, str]] = []
    for name in names:
        if name == "-":
            texts.append(("<stdin>", sys.stdin.read()))
            continue
        path = Path(name)
        if path.is_dir():
            texts += [(str(p), p.read_text()) for p in sorted(path.iterdir()) if p.suffix in (".yaml", ".yml", ".json")]
        elif path.is_file():
            texts.append((name, path.read_text()))
        else:
            raise SystemExit(f"flowscope render: -f {name}: no such file or directory")
    docs = []
    for origin, text in texts:
        try:
            for doc in yaml.safe_load_all(text):
                if doc is None:
                    continue
                if not isinstance(doc, dict):
                    raise SystemExit(f"flowscope render: {origin}: a document is not a mapping: {doc!r:.80}")
                if doc.get("kind") == "List":
                    docs += [d for d in doc.get("items") or [] if isinstance(d, dict)]
                else:
                    docs.append(doc)
        except yaml.YAMLError as exc:
            raise SystemExit(f"flowscope render: {origin}: not valid YAML: {exc}") from None
    return docs


def run_render(args: argparse.Namespace) -> int:
    import yaml

    from flowscope.operator.render import render_documents
    from flowscope.operator.spec import SpecError

    docs = _read_documents(args.filename)
    ca = None
    if bool(args.ca_cert) != bool(args.ca_key):
        raise SystemExit("flowscope render: --ca-cert and --ca-key go together")
    if args.ca_cert:
        from flowscope.operator import tls

        try:
            ca = tls.load(Path(args.ca_cert).read_bytes(), Path(args.ca_key).read_bytes())
        except OSError as exc:
            raise SystemExit(f"flowscope render: {exc}") from None
        if ca is None:
            raise SystemExit("flowscope render: --ca-cert/--ca-key: not a PEM certificate and its matching key")
    left_out: list[str] = []
    try:
        objects = render_documents(docs, image=args.image, secrets=not args.no_secrets,
                                   default_namespace=args.namespace, ca=ca, left_out=left_out)
    except SpecError as exc:
        for problem in exc.problems:
            print(f"flowscope render: {problem}", file=sys.stderr)
        return 1
    if args.adopt:
        from flowscope.operator.reconcile import ADOPT_ANNOTATION

        for obj in objects:
            if obj.get("apiVersion", "").startswith("flowscope.dev/") or obj.get("kind") == "Namespace":
                continue
            obj.setdefault("metadata", {}).setdefault("annotations", {})[ADOPT_ANNOTATION] = "true"
    for label in left_out:
        print(f"flowscope render: --no-secrets: left out {label} from the input (create it from your vault)",
              file=sys.stderr)
    sys.stdout.write(yaml.dump_all(objects, Dumper=_BlockDumper(yaml), sort_keys=False, default_flow_style=False))
    return 0


def _BlockDumper(yaml: Any) -> Any:
    """A SafeDumper writing multi-line strings (config files, PEM) as readable ``|`` blocks."""

    class Dumper(yaml.SafeDumper):  # type: ignore[misc]
        pass

    def text(dumper: Any, value: str) -> Any:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return Dumper


def run_operator(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    import kopf

    from flowscope.durations import DurationError, parse_duration
    from flowscope.operator.handlers import build_registry, configure
    from flowscope.operator.kube import Connection

    try:
        resync = parse_duration(args.resync, field="--resync")
    except DurationError as exc:
        raise SystemExit(f"flowscope operator: {exc}") from None
    if resync < 1:
        raise SystemExit(f"flowscope operator: --resync: {args.resync!r} is below the 1s minimum")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        lease = parse_duration(args.lease_duration, field="--lease-duration")
    except DurationError as exc:
        raise SystemExit(f"flowscope operator: {exc}") from None
    if lease < 3:
        raise SystemExit(f"flowscope operator: --lease-duration: {args.lease_duration!r} is below the 3s minimum")
    connection = Connection.detect(args.context)
    registry = build_registry(connection, image=args.image, resync=resync)
    settings = configure(kopf.OperatorSettings())
    settings.posting.level = logging.WARNING

    async def main() -> int:
        from flowscope.operator.kube import KubeApi
        from flowscope.operator.leader import LeaseElector

        elector = None
        keeper = None
        stop = asyncio.Event()
        if args.leader_election_namespace:
            import uuid

            identity = args.identity or f"flowscope-operator-{uuid.uuid4().hex[:8]}"
            elector = LeaseElector(KubeApi(connection), args.leader_election_namespace, "flowscope-operator",
                                   identity, lease_seconds=lease, renew_seconds=lease / 3)
            standby = await _standby_health(args.liveness)  # a standby is alive, too
            try:
                await elector.acquire()
            finally:
                if standby is not None:
                    await standby.cleanup()
            logging.getLogger("flowscope.operator").info("leader election: %s leads", identity)
            keeper = asyncio.create_task(elector.keep())
            keeper.add_done_callback(lambda _: stop.set())
        try:
            await kopf.operator(
                registry=registry, settings=settings, standalone=True,
                clusterwide=not args.namespaces, namespaces=args.namespaces or (),
                liveness_endpoint=args.liveness or None, stop_flag=stop,
            )
        finally:
            if elector is not None and keeper is not None:
                keeper.cancel()
                if not elector.lost.is_set():
                    await elector.release()
                await elector.api.close()
        if elector is not None and elector.lost.is_set():
            print("flowscope operator: lost the leader Lease; exiting so that the pod restarts and stands by",
                  file=sys.stderr)
            return 1
        return 0

    return asyncio.run(main())


async def _standby_health(liveness: str) -> Any:
    """Answer the liveness probe while standing by (kopf serves it once this replica leads)."""
    if not liveness:
        return None
    from urllib.parse import urlsplit

    from aiohttp import web

    url = urlsplit(liveness)

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="standing by\n")

    app = web.Application()
    app.router.add_get(url.path or "/", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, url.hostname, url.port or 8080).start()
    return runner
