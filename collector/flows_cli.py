"""``flowscope flows``: the flow store's history from the command line.

What ``hubble observe`` and ``antctl get flowrecords`` are for live data, over everything
the store holds: filters (``--namespace``, ``--pod``, ... or a ``--filter`` expression),
``-o table|wide|json|csv``, ``--follow`` for new records, and ``--top N --by ... --group
...`` for top talkers with the remainder as "other". It reads a store directly
(``--store chdb:///DIR`` that no process holds, or ``tcp://HOST:PORT/DB``) or asks a
running collector (``--api http://HOST:PORT``: chDB belongs to the process that writes
it). Both paths call the same query layer (:mod:`flowscope.collector.query`), so they
answer alike.

Each option becomes a clause of the filter language (values quoted, so they are values and
nothing else) and all clauses are joined with ``and``; the same option given twice means
either value. Bad input is one line on stderr: exit 2 for a bad option or filter, 3 for a
store or API that cannot be reached.
"""

from __future__ import annotations

import argparse
import csv
import json
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["register"]

EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE = 0, 2, 3

GROUPS = {
    # --group NAME [--side] -> a query dimension
    "pod": ("srcPod", "dstPod"), "namespace": ("srcNamespace", "dstNamespace"), "node": ("srcNode", "dstNode"),
    "workload": ("srcWorkload", "dstWorkload"), "service": ("service", "service"),
    "policy": ("policy", "policy"), "type": ("flowType", "flowType"), "protocol": ("protocol", "protocol"),
}
_FILTER_OPTIONS = {
    # option -> filter field
    "namespace": "namespace", "pod": "pod", "node": "node", "service": "service", "policy": "policy",
    "action": "action", "type": "type", "protocol": "protocol", "port": "port", "ip": "ip",
}


class _Usage(Exception):
    pass


class _Unreachable(Exception):
    pass


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "flows", help="query the flow store: records, filters, top talkers, --follow",
        description="Query the flow history kept by flowscope collector --store or the aggregator's ClickHouse "
                    "sink: what talked to what, when, how much, and which policy decided.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--store", metavar="URL", help="read a store: chdb:///DIR (not held by a running process) "
                                                      "or tcp://HOST:PORT/DB")
    where.add_argument("--api", metavar="URL", help="ask a running collector: http://HOST:PORT")
    p.add_argument("--token-file", metavar="FILE", help="with --api: send the bearer token in FILE")
    p.add_argument("--api-tls-cert", metavar="FILE",
                   help="with --api https://...: present this PEM client certificate (the collector's --api-tls-ca "
                        "asks for one)")
    p.add_argument("--api-tls-key", metavar="FILE", help="the --api-tls-cert's PEM private key")
    p.add_argument("--api-tls-ca", metavar="FILE",
                   help="with --api https://...: trust the collector's certificate if this PEM CA signed it "
                        "(default: the system's CAs)")
    f = p.add_argument_group("filters (the same option twice: either value)")
    f.add_argument("--namespace", action="append", metavar="NS", help="either Pod's namespace")
    f.add_argument("--pod", action="append", metavar="[NS/]POD", help="either Pod")
    f.add_argument("--node", action="append", metavar="NODE", help="either Node")
    f.add_argument("--service", action="append", metavar="NS/SVC:PORT", help="destination Service port name")
    f.add_argument("--policy", action="append", metavar="[NS/]NAME", help="ingress or egress network policy")
    f.add_argument("--action", action="append", choices=("allow", "drop", "reject"), help="rule action")
    f.add_argument("--type", action="append", choices=("intra-node", "inter-node", "to-external", "from-external"),
                   help="flow type")
    f.add_argument("--protocol", action="append", metavar="PROTO", help="tcp, udp, icmp, sctp or a number")
    f.add_argument("--port", action="append", metavar="PORT", help="either transport port")
    f.add_argument("--ip", action="append", metavar="ADDR", help="either IP address")
    f.add_argument("--filter", metavar="EXPR", help='a filter expression, e.g. \'namespace = "shop" and action = drop\'')
    f.add_argument("--since", metavar="TIME", help="records that ended at or after: a duration before now (15m) "
                                                   "or RFC 3339")
    f.add_argument("--until", metavar="TIME", help="records that ended before: a duration before now or RFC 3339")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", choices=("table", "wide", "json", "csv"), default="table")
    o.add_argument("--limit", type=int, default=20, metavar="N", help="records to show (default 20, newest)")
    o.add_argument("--follow", "-f", action="store_true", help="keep printing records as they are stored")
    o.add_argument("--interval", default="1s", metavar="DURATION", help="--follow: poll this often (default 1s)")
    t = p.add_argument_group("top talkers")
    t.add_argument("--top", type=int, metavar="N", help="the N largest groups, the rest as 'other'")
    t.add_argument("--by", choices=("bytes", "packets", "throughput", "records"), default="bytes")
    t.add_argument("--group", default="pod", metavar="GROUP",
                   help=f"one of {', '.join(GROUPS)} (default pod), or a dimension of the query layer")
    t.add_argument("--side", choices=("source", "destination"), default="source",
                   help="which end --group names (default source)")
    p.set_defaults(func=_flows)


def _err(message: str) -> None:
    print(f"flowscope flows: {message}", file=sys.stderr)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_filter(args: argparse.Namespace) -> str:
    """The filter expression of the filter options and --filter, joined with and."""
    clauses = []
    for option, field in _FILTER_OPTIONS.items():
        values = getattr(args, option, None)
        if not values:
            continue
        if len(values) == 1:
            clauses.append(f"{field} = {_quote(values[0])}")
        else:
            clauses.append(f"{field} in ({', '.join(_quote(v) for v in values)})")
    if args.filter and args.filter.strip():
        clauses.append(f"({args.filter})")
    return " and ".join(clauses)


def build_query(args: argparse.Namespace, now: Callable[[], float] = time.time) -> Any:
    from .filter import FilterError, parse_filter
    from .query import FlowQuery, QueryError, parse_time
    from .schema import DIMENSIONS

    text = build_filter(args)
    try:
        parse_filter(text)  # one clear line for a bad filter, before any store is opened
    except FilterError as exc:
        if args.filter:
            try:
                parse_filter(args.filter)
            except FilterError as inner:
                raise _Usage(f"--filter: {inner}") from None
        raise _Usage(str(exc)) from None
    try:
        start = parse_time(args.since, "--since", now=now) if args.since else None
        end = parse_time(args.until, "--until", now=now) if args.until else None
    except QueryError as exc:
        raise _Usage(str(exc)) from None
    group = None
    if args.top is not None:
        if args.group in GROUPS:
            group = GROUPS[args.group][0 if args.side == "source" else 1]
        elif args.group in DIMENSIONS:
            group = args.group
        else:
            raise _Usage(f"--group: {args.group!r} is not one of {', '.join(GROUPS)} "
                         f"(or a dimension: {', '.join(DIMENSIONS)})")
    try:
        return FlowQuery(start=start, end=end, filter=text, group=group, by=args.by,
                         top=args.top if args.top is not None else 10, limit=args.limit)
    except QueryError as exc:
        name = str(exc).split(":", 1)[0]
        option = {"start": "--since", "end": "--until", "top": "--top", "limit": "--limit"}.get(name, name)
        raise _Usage(f"{option}:{str(exc).split(':', 1)[1]}") from None


# --------------------------------------------------------------------------- where answers come from

class _Local:
    """A store opened in this process."""

    def __init__(self, url: str) -> None:
        from .store import StoreError, open_store

        try:
            self.store = open_store(url)
        except StoreError as exc:
            raise _Usage(str(exc).replace("store:", "--store:", 1)) from None
        try:
            self.store.open()
        except StoreError as exc:
            raise _Unreachable(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - unreachable server, a chDB directory another process holds
            first = str(exc).splitlines()[0] if str(exc) else ""
            hint = ""
            if url.startswith("chdb"):
                hint = " (a chDB directory belongs to one process: if a collector holds it, ask it with --api)"
            raise _Unreachable(f"--store {url}: cannot open the store: {type(exc).__name__}: {first}{hint}") from None

    def flows(self, q: Any) -> dict[str, Any]:
        from . import query

        return query.flows(self.store, q).to_json()

    def top(self, q: Any) -> dict[str, Any]:
        from . import query

        return query.top(self.store, q).to_json()

    def follow(self, q: Any, after: int) -> tuple[list[dict[str, Any]], int]:
        from . import query

        recs = query.flows_since(self.store, q, after, limit=10_000)
        return recs, max((int(r["timeInserted"]) for r in recs), default=after)

    def close(self) -> None:
        self.store.close()


class _Remote:
    """A running collector's API."""

    def __init__(self, url: str, token_file: str | None, tls: tuple[str | None, str | None, str | None] = (
                 None, None, None)) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise _Usage(f"--api: {url!r} is not http://HOST:PORT or https://HOST:PORT")
        self.base = url.rstrip("/")
        self.headers = {"Accept": "application/json"}
        self.context: ssl.SSLContext | None = None
        self.with_cert = bool(tls[0])
        if any(tls):
            if parts.scheme != "https":
                raise _Usage(f"--api-tls-cert, --api-tls-key and --api-tls-ca are for --api https://...; "
                             f"{url!r} is plain HTTP")
            self.context = client_ssl_context(*tls)
        if token_file:
            from flowscope.webauth import WebAuthError, read_token

            try:
                self.headers["Authorization"] = f"Bearer {read_token(token_file, '--token-file')}"
            except WebAuthError as exc:
                raise _Usage(str(exc)) from None

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        import http.client
        import urllib.error
        import urllib.request
        from urllib.parse import urlencode

        url = f"{self.base}/api/v1/{path}?{urlencode({k: v for k, v in params.items() if v is not None})}"
        req = urllib.request.Request(url, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.context) as resp:
                return json.loads(resp.read())
        except (ssl.SSLError, http.client.RemoteDisconnected, ConnectionResetError) as exc:
            if not self.base.startswith("https:"):
                raise _Unreachable(f"--api {self.base}: cannot reach the collector: {exc}") from None
            raise _Unreachable(f"--api {self.base}: {_handshake_refused(exc, self.with_cert)}") from None
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", "")
            except ValueError:
                message = ""
            if exc.code == 400:
                raise _Usage(message or f"the API refused the query ({exc.code})") from None
            raise _Unreachable(f"--api {self.base}: {exc.code} {exc.reason}{': ' + message if message else ''}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLError) and self.base.startswith("https:"):
                raise _Unreachable(f"--api {self.base}: {_handshake_refused(reason, self.with_cert)}") from None
            raise _Unreachable(f"--api {self.base}: cannot reach the collector: {reason}") from None

    @staticmethod
    def _params(q: Any) -> dict[str, Any]:
        return {"start": q.start, "end": q.end, "filter": q.filter or None, "group": q.group, "by": q.by,
                "top": q.top, "limit": q.limit}

    def flows(self, q: Any) -> dict[str, Any]:
        p = self._params(q)
        p.pop("group"), p.pop("top"), p.pop("by")
        return dict(self._get("flows", p))

    def top(self, q: Any) -> dict[str, Any]:
        return dict(self._get("top", self._params(q)))

    def follow(self, q: Any, after: int) -> tuple[list[dict[str, Any]], int]:
        got = self._get("follow", {"after": after, "filter": q.filter or None, "limit": 10_000})
        return list(got["records"]), int(got["after"])

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- output

def _names(table: dict[int, str], v: Any) -> str:
    return table.get(int(v), str(v)) if isinstance(v, int) else str(v)


def _end(r: dict[str, Any], side: str) -> str:
    pod = r[f"{side}PodName"]
    ip = r["sourceIP" if side == "source" else "destinationIP"]
    port = r["sourceTransportPort" if side == "source" else "destinationTransportPort"]
    if pod:
        return f"{r[f'{side}PodNamespace']}/{pod}"
    host = f"[{ip}]" if ":" in ip else ip
    return f"{host}:{port}"


def _policy(r: dict[str, Any], d: str) -> str:
    from flowscope.ipfix.antrea import RULE_ACTIONS

    name = r[f"{d}NetworkPolicyName"]
    action = RULE_ACTIONS.get(int(r[f"{d}NetworkPolicyRuleAction"]), str(r[f"{d}NetworkPolicyRuleAction"]))
    if not name and not action:
        return ""
    ns = r[f"{d}NetworkPolicyNamespace"]
    return f"{ns + '/' if ns else ''}{name or '-'}:{action or '-'}"


def _time(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(t)))


def _row(r: dict[str, Any], wide: bool) -> list[str]:
    from flowscope.ipfix.antrea import FLOW_TYPES, PROTOCOLS

    policies = " ".join(x for x in (_policy(r, "ingress"), _policy(r, "egress")) if x)
    row = [_time(r["flowEndSeconds"]), _end(r, "source"), _end(r, "destination"),
           r["destinationServicePortName"] or "-", _names(PROTOCOLS, r["protocolIdentifier"]),
           _names(FLOW_TYPES, r["flowType"]), policies or "-",
           str(int(r["octetDeltaCount"]) + int(r["reverseOctetDeltaCount"])),
           str(int(r["packetDeltaCount"]) + int(r["reversePacketDeltaCount"]))]
    if wide:
        sip, dip = r["sourceIP"], r["destinationIP"]
        row += [f"{sip}:{r['sourceTransportPort']}", f"{dip}:{r['destinationTransportPort']}",
                f"{r['sourceNodeName'] or '-'}>{r['destinationNodeName'] or '-'}",
                f"{r['octetDeltaCount']}/{r['reverseOctetDeltaCount']}",
                f"{float(r['recordThroughput']):.0f}/{float(r['reverseRecordThroughput']):.0f}",
                r["tcpState"] or "-", r["correlation"] or "-"]
    return row


_HEAD = ["TIME", "SOURCE", "DESTINATION", "SERVICE", "PROTO", "TYPE", "POLICY", "BYTES", "PACKETS"]
_WIDE = ["SRC-ADDR", "DST-ADDR", "NODES", "BYTES(F/R)", "BPS(F/R)", "TCP", "CORRELATION"]


class _Printer:
    def __init__(self, fmt: str, out: Any) -> None:
        self.fmt, self.out = fmt, out
        self.header = False
        self.csv: Any = None
        self.widths: list[int] | None = None

    def records(self, recs: Sequence[dict[str, Any]]) -> None:
        if self.fmt == "json":
            for r in recs:
                self.out.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        elif self.fmt == "csv":
            if self.csv is None:
                self.csv = csv.writer(self.out)
            for r in recs:
                if not self.header:
                    self.csv.writerow(list(r))
                    self.header = True
                self.csv.writerow(list(r.values()))
        else:
            wide = self.fmt == "wide"
            rows = [_row(r, wide) for r in recs]
            head = _HEAD + (_WIDE if wide else [])
            if self.widths is None:
                self.widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
                self.out.write(self._line(head) + "\n")
            for row in rows:
                self.out.write(self._line(row) + "\n")
        self.out.flush()

    def _line(self, cells: Sequence[str]) -> str:
        assert self.widths is not None
        return "  ".join(c.ljust(w) for c, w in zip(cells, self.widths)).rstrip()

    def top(self, result: dict[str, Any]) -> None:
        if self.fmt == "json":
            self.out.write(json.dumps(result, ensure_ascii=False, sort_keys=True) + "\n")
            return
        entries = list(result["entries"]) + ([result["other"]] if result["other"] else [])
        total = result["total"]
        key = "bytes" if result["by"] == "throughput" else result["by"]
        rows = []
        for i, e in enumerate(entries):
            share = 100.0 * e[key] / total[key] if total[key] else 0.0
            rank = str(i + 1) if e is not result["other"] else "-"
            rows.append([rank, e["label"], str(e["bytes"]), str(e["packets"]), str(e["records"]),
                         f"{e['throughput']:.0f}", f"{share:.1f}%"])
        rows.append(["", "total", str(total["bytes"]), str(total["packets"]), str(total["records"]),
                     f"{total['throughput']:.0f}", "100.0%" if total[key] else "-"])
        head = ["#", result["group"].upper(), "BYTES", "PACKETS", "RECORDS", "BPS", "SHARE"]
        if self.fmt == "csv":
            w = csv.writer(self.out)
            w.writerow(head)
            w.writerows(rows)
            return
        self.widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
        self.out.write(self._line(head) + "\n")
        for r in rows:
            self.out.write(self._line(r) + "\n")


def client_ssl_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext:
    """TLS 1.2 or newer to the collector's --api: its certificate checked against ``ca`` (the
    system's CAs without one) and the host name; with ``cert`` and ``key``, a client
    certificate for a collector that asks for one (--api-tls-ca on its side)."""
    if bool(cert) != bool(key):
        raise _Usage("--api-tls-cert and --api-tls-key: give both to present a client certificate")
    for option, path in (("--api-tls-cert", cert), ("--api-tls-key", key), ("--api-tls-ca", ca)):
        if path:
            try:
                with open(path, "rb") as f:
                    f.read(1)
            except OSError as exc:
                raise _Usage(f"{option}: cannot read {path!r}: {exc.strerror or exc}") from None
    try:
        ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    except (OSError, ssl.SSLError) as exc:
        raise _Usage(f"--api-tls-ca: {ca!r} holds no PEM CA certificate: {_ssl_reason(exc)}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert and key:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise _Usage(f"--api-tls-cert/--api-tls-key: {cert!r} and {key!r} are not a PEM certificate and its "
                         f"private key: {_ssl_reason(exc)}") from None
    return ctx


def _ssl_reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc).splitlines()[0]


def _handshake_refused(exc: OSError, with_cert: bool) -> str:
    """One line for a TLS connection the collector would not serve, saying what to give.

    A collector with --api-tls-ca checks the client's certificate after the handshake
    (TLS 1.3) and closes the connection without an alert when there is none or its CA did
    not sign it: the client sees the connection end before any answer."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"the TLS handshake failed: the collector's certificate is not trusted ({exc.verify_message}); "
                "give --api-tls-ca with the CA that signed it")
    reason = _ssl_reason(exc)
    if with_cert:
        return (f"the collector refused our client certificate (the TLS connection closed without an answer: "
                f"{reason}); give --api-tls-cert and --api-tls-key signed by the CA of its --api-tls-ca")
    return (f"the collector asks for a client certificate (the TLS connection closed without an answer: {reason}); "
            "give --api-tls-cert and --api-tls-key")


# --------------------------------------------------------------------------- the command

def _flows(args: argparse.Namespace) -> int:
    from flowscope.durations import DurationError, parse_duration

    try:
        if args.store is None and args.api is None:
            raise _Usage("say where to read: --store URL (chdb:///DIR or tcp://HOST:PORT/DB) or --api http://HOST:PORT")
        if args.token_file and not args.api:
            raise _Usage("--token-file is for --api")
        tls = (args.api_tls_cert, args.api_tls_key, args.api_tls_ca)
        if any(tls) and not args.api:
            raise _Usage("--api-tls-cert, --api-tls-key and --api-tls-ca are for --api https://HOST:PORT")
        if args.follow and args.top is not None:
            raise _Usage("--follow streams records; it does not combine with --top")
        try:
            interval = parse_duration(args.interval, field="--interval")
        except DurationError as exc:
            raise _Usage(str(exc)) from None
        q = build_query(args)
        source: Any = _Remote(args.api, args.token_file, tls) if args.api else _Local(args.store)
    except _Usage as exc:
        _err(str(exc))
        return EXIT_USAGE
    except _Unreachable as exc:
        _err(str(exc))
        return EXIT_UNREACHABLE
    printer = _Printer(args.output, sys.stdout)
    try:
        if args.top is not None:
            printer.top(source.top(q))
            return EXIT_OK
        page = source.flows(q)
        recs = list(reversed(page["records"]))  # oldest first, as a log reads
        printer.records(recs)
        if not args.follow:
            return EXIT_OK
        after = max((int(r["timeInserted"]) for r in recs), default=int(time.time()) - 1)
        while True:
            time.sleep(interval)
            new, after = source.follow(q, after)
            if new:
                printer.records(new)
    except _Usage as exc:
        _err(str(exc))
        return EXIT_USAGE
    except _Unreachable as exc:
        _err(str(exc))
        return EXIT_UNREACHABLE
    except ValueError as exc:  # QueryError / FilterError from the local query layer
        _err(str(exc))
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        source.close()
