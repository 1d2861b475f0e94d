"""``flowscope aggregator``: run the Flow Aggregator, or ask a running one (like antctl).

* ``flowscope aggregator --config FILE`` runs the daemon until SIGTERM/SIGINT.
* ``flowscope aggregator flowrecords [--srcip --dstip --proto --srcport --dstport]
  [-o json|yaml|table]`` lists the records it holds (a partial 5-tuple filter).
* ``flowscope aggregator recordmetrics [-o ...]`` prints its record counters.

The query commands talk to the HTTP API (``apiAddress``, default 127.0.0.1:10348) with the
standard library only; heavy imports stay inside the command functions. An API that
authenticates its clients is reached with ``--token-file`` (a bearer token) or, over
https, with ``--cacert`` (the CA that signed the API's certificate) and ``--cert``/``--key``
(a client certificate).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register"]

DEFAULT_SERVER = "http://127.0.0.1:10348"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "aggregator", help="run the Flow Aggregator, or query one (flowrecords, recordmetrics)",
        description="Collect agent flow records over IPFIX, correlate and aggregate them, export them.",
    )
    p.add_argument("--config", metavar="FILE", help="aggregator YAML (see docs/configuration.md)")
    p.add_argument("--check", action="store_true",
                   help="check the configuration and every file a start reads (TLS, API token, flow log "
                        "directory) without opening anything, then exit")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=_run)
    sub = p.add_subparsers(dest="aggregator_command", metavar="QUERY")

    fr = sub.add_parser("flowrecords", help="list the flow records a running aggregator holds")
    fr.add_argument("--srcip", help="source IP address")
    fr.add_argument("--dstip", help="destination IP address")
    fr.add_argument("--proto", help="protocol: number or tcp, udp, icmp, icmpv6, sctp")
    fr.add_argument("--srcport", type=int, help="source port")
    fr.add_argument("--dstport", type=int, help="destination port")
    fr.add_argument("--limit", type=int, help="at most this many records")
    _common(fr)
    fr.set_defaults(func=_flowrecords)

    rm = sub.add_parser("recordmetrics", help="print a running aggregator's record metrics")
    _common(rm)
    rm.set_defaults(func=_recordmetrics)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p.add_argument("--server", default=DEFAULT_SERVER, help=f"the aggregator's API (default {DEFAULT_SERVER})")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the API")
    p.add_argument("--token-file", metavar="FILE", help="a file holding the API's bearer token (api.tokenFile)")
    p.add_argument("--cacert", metavar="FILE", help="CA certificate to verify an https API with")
    p.add_argument("--cert", metavar="FILE", help="client certificate, for an API that requires one (api.tls.caFile)")
    p.add_argument("--key", metavar="FILE", help="the client certificate's private key")


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from .config import ConfigError, load_config

    if not args.config:
        print("flowscope aggregator: --config FILE is required to run the aggregator "
              "(or use a query: flowrecords, recordmetrics)", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"flowscope aggregator: {exc}", file=sys.stderr)
        return 2

    from .service import FlowAggregator, build_sinks, check_files

    if args.check:
        try:
            warnings = check_files(config)
            sinks = build_sinks(config)
        except ConfigError as exc:
            print(f"flowscope aggregator: {exc}", file=sys.stderr)
            return 2
        for w in warnings:
            print(f"flowscope aggregator: warning: {w}", file=sys.stderr)
        names = ", ".join(s.name for s, _ in sinks) or "none (API only)"
        where = f"[{config.listen_host}]" if ":" in config.listen_host else config.listen_host
        print(f"{args.config}: OK; collecting {config.transport} on {where}:{config.listen_port}, "
              f"sinks: {names}")
        return 0
    _raise_fd_limit()

    async def main() -> int:
        try:
            agg = FlowAggregator(config)
            await agg.start()
        except ConfigError as exc:
            print(f"flowscope aggregator: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # the message names the key: apiAddress, metricsAddress, listenPort, sinks...
            print(f"flowscope aggregator: {exc.strerror or exc}", file=sys.stderr)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logging.getLogger("flowscope.aggregator").info("stopping: exporting what changed and draining sinks")
        await agg.close()
        return 0

    return asyncio.run(main())


def _raise_fd_limit() -> None:
    """Use the hard limit of open files: many agents and API clients each take one, and
    running out is worse than using what the system allows."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def _request(args: argparse.Namespace, url: str) -> Any:
    """A urllib request with the API credentials of the command line."""
    import ssl
    import urllib.request

    headers = {}
    if getattr(args, "token_file", None):
        try:
            with open(args.token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise SystemExit(f"flowscope aggregator: --token-file: cannot read {args.token_file!r}: {exc.strerror}") from None
        headers["Authorization"] = f"Bearer {token}"
    ctx = None
    if url.startswith("https:"):
        try:
            ctx = ssl.create_default_context(cafile=args.cacert or None)
            if args.cert:
                ctx.load_cert_chain(args.cert, args.key or None)
        except (OSError, ssl.SSLError) as exc:
            raise SystemExit(f"flowscope aggregator: --cacert/--cert/--key: {exc}") from None
    elif args.cacert or args.cert:
        raise SystemExit("flowscope aggregator: --cacert and --cert need an https:// --server")
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=args.timeout, context=ctx)


def _get(args: argparse.Namespace, path: str, params: dict[str, Any] | None = None) -> Any:
    import urllib.error
    import urllib.parse

    url = args.server.rstrip("/") + path
    if params:
        url += "?" + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    try:
        with _request(args, url) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            msg = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            msg = exc.reason
        raise SystemExit(f"flowscope aggregator: {msg}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SystemExit(
            f"flowscope aggregator: cannot reach the aggregator API at {args.server} ({reason}); "
            "is it running, and is --server its apiAddress?"
        ) from None


def _emit(doc: Any, output: str) -> None:
    if output == "json":
        print(json.dumps(doc, indent=2))
    else:
        import yaml

        print(yaml.safe_dump(doc, sort_keys=False), end="")


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _pod(ns: str, name: str) -> str:
    return f"{ns}/{name}" if name else "-"


def _flowrecords(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {
        "srcip": args.srcip, "dstip": args.dstip, "proto": args.proto,
        "srcport": args.srcport, "dstport": args.dstport, "limit": args.limit,
    }
    doc = _get(args, "/flowrecords", params)
    records = doc["flowRecords"]
    if doc.get("truncated"):
        print(f"flowscope aggregator: showing the first {len(records)} matching records; "
              "narrow the filter or raise --limit", file=sys.stderr)
    if args.output != "table":
        _emit(records, args.output)
        return 0
    from flowscope.ipfix.antrea import FLOW_TYPES

    headers = ["SRC", "DST", "PROTO", "SRC_POD", "DST_POD", "SRC_NODE", "DST_NODE", "PACKETS", "BYTES",
               "REV_BYTES", "TYPE", "CORRELATION"]
    names = {v: k for k, v in (("tcp", 6), ("udp", 17), ("icmp", 1), ("icmpv6", 58), ("sctp", 132))}
    rows = []
    for r in records:
        v6 = "sourceIPv6Address" in r
        src = r["sourceIPv6Address"] if v6 else r["sourceIPv4Address"]
        dst = r["destinationIPv6Address"] if v6 else r["destinationIPv4Address"]
        fmt = "[{}]:{}" if v6 else "{}:{}"
        rows.append([
            fmt.format(src, r["sourceTransportPort"]), fmt.format(dst, r["destinationTransportPort"]),
            names.get(r["protocolIdentifier"], str(r["protocolIdentifier"])),
            _pod(r["sourcePodNamespace"], r["sourcePodName"]), _pod(r["destinationPodNamespace"], r["destinationPodName"]),
            r["sourceNodeName"] or "-", r["destinationNodeName"] or "-",
            str(r["packetTotalCount"]), str(r["octetTotalCount"]), str(r["reverseOctetTotalCount"]),
            FLOW_TYPES.get(r["flowType"], str(r["flowType"])),
            r.get("correlation", ""),
        ])
    print(_table(rows, headers))
    return 0


def _recordmetrics(args: argparse.Namespace) -> int:
    doc = _get(args, "/recordmetrics")
    if args.output != "table":
        _emit(doc, args.output)
        return 0
    keys = ["numRecordsExported", "numRecordsReceived", "numFlows", "numConnToCollector", "numRecordsDropped"]
    headers = ["RECORDS-EXPORTED", "RECORDS-RECEIVED", "FLOWS", "EXPORTERS-CONNECTED", "RECORDS-DROPPED"]
    print(_table([[str(doc.get(k, "")) for k in keys]], headers))
    return 0
