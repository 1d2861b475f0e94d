"""The ``--ui HOST:PORT`` options, the same on every command that serves the dashboards.

``flowscope collector --ui``, ``flowscope ui`` and ``flowscope demo`` call
:func:`add_ui_options` on their parser and :func:`ui_from_args` once, at the edge: the
result is a typed :class:`UIConfig` (address and :class:`~flowscope.webauth.WebAuth`), or a
one-line error naming the option. Kept apart from the aiohttp application so that
``flowscope --help`` does not import a web framework.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from flowscope.webauth import WebAuth, WebAuthError, check_exposure, read_token, server_ssl_context

__all__ = ["CHART_BUNDLE", "DEFAULT_UI", "UIConfig", "add_ui_options", "check_chart_bundle", "ui_from_args"]

DEFAULT_UI: Final = "127.0.0.1:8080"
CHART_BUNDLE: Final = Path(__file__).resolve().parent / "static" / "vendor" / "echarts.min.js"


@dataclass(frozen=True, slots=True)
class UIConfig:
    """Where the dashboards listen and how they authenticate (parsed once, from options)."""

    host: str
    port: int
    auth: WebAuth

    @property
    def url(self) -> str:
        scheme = "https" if self.auth.ssl_context is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/"


def add_ui_options(parser: argparse.ArgumentParser, *, default: str | None = None, flag: str = "--ui") -> None:
    """``--ui HOST:PORT`` and its authentication options, the same on every command."""
    what = f"(default {default})" if default else "(default: no dashboards)"
    parser.add_argument(flag, default=default, metavar="HOST:PORT",
                        help=f"serve the web dashboards here {what}; loopback is open, other addresses need "
                             "--ui-token-file or --ui-tls-* with a client CA, or --ui-insecure")
    parser.add_argument("--ui-token-file", metavar="FILE", help="require 'Authorization: Bearer <token in FILE>'")
    parser.add_argument("--ui-tls-cert", metavar="FILE", help="serve HTTPS with this PEM certificate")
    parser.add_argument("--ui-tls-key", metavar="FILE", help="the certificate's PEM private key")
    parser.add_argument("--ui-tls-ca", metavar="FILE", help="require client certificates signed by this CA (mutual TLS)")
    parser.add_argument("--ui-insecure", action="store_true",
                        help="serve a non-loopback address without authentication (every flow to anyone)")


def ui_from_args(args: argparse.Namespace, flag: str = "--ui") -> UIConfig | None:
    """The parsed ``--ui`` options, or None when no dashboards were asked for; raises
    :class:`WebAuthError` (or ValueError) with a message naming the option."""
    text = getattr(args, flag.lstrip("-").replace("-", "_"))
    if not text:
        return None
    from flowscope.listen import parse_listen_address

    address = parse_listen_address(text, flag, example_port=8080)
    if address is None:
        return None
    host, port = address
    check_chart_bundle(flag=flag)
    token = read_token(args.ui_token_file, "--ui-token-file") if args.ui_token_file else None
    ctx = None
    if args.ui_tls_cert or args.ui_tls_key or args.ui_tls_ca:
        if not (args.ui_tls_cert and args.ui_tls_key):
            raise WebAuthError("--ui-tls-cert and --ui-tls-key: give both to serve HTTPS")
        ctx = server_ssl_context(args.ui_tls_cert, args.ui_tls_key, args.ui_tls_ca, "--ui-tls")
    auth = WebAuth(token=token, ssl_context=ctx, client_certs=bool(ctx and args.ui_tls_ca), insecure=args.ui_insecure)
    check_exposure(host, auth, flag)
    return UIConfig(host, port, auth)


def check_chart_bundle(bundle: Path = CHART_BUNDLE, flag: str = "--ui") -> None:
    """Refuse to start the dashboards without their chart library (ECharts, vendored from the
    npm registry, never committed): every page would load and draw nothing."""
    if not bundle.is_file() or bundle.stat().st_size == 0:
        raise ValueError(f"{flag}: the dashboards' chart library is missing ({bundle}); in a checkout run "
                         "`bash scripts/setup.sh` (npm ci vendors ECharts from package-lock.json), or build the "
                         "image from the repository's Dockerfile (its ui stage does the same)")
