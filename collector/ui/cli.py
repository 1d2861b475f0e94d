"""``flowscope ui --store URL``: the web dashboards over a store that no collector serves.

``flowscope collector --ui HOST:PORT`` serves the dashboards from the process that owns
the store (the only way for a chDB directory a collector is writing). This command is
for the other cases: a ClickHouse server the aggregator's sink or a collector fills, or a
chDB directory no process holds. It opens the store (migrating it like any writer
would), serves the dashboards on ``--ui`` (127.0.0.1:8080 by default) until SIGINT or
SIGTERM, and exits 0; a store or an address it cannot use is one line on stderr and
exit status 2 (3 when it cannot listen).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register", "run_ui"]


def register(subparsers: Any) -> None:
    from .options import DEFAULT_UI, add_ui_options

    p = subparsers.add_parser(
        "ui",
        help="serve the web dashboards over a flow store (a ClickHouse server or a chDB directory)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--store", required=True, metavar="URL",
                   help="tcp://HOST[:PORT][/DATABASE] (ClickHouse server) or chdb:///DIR (a directory no process holds)")
    p.add_argument("--table", default="flows", help="the flows table (default flows)")
    add_ui_options(p, default=DEFAULT_UI)
    p.set_defaults(func=run_ui)


def run_ui(args: argparse.Namespace) -> int:
    import asyncio
    import os
    import signal

    from flowscope.collector.store import StoreError, open_store
    from flowscope.webauth import WebAuthError

    from .app import start_ui
    from .options import ui_from_args

    try:
        config = ui_from_args(args)
    except (WebAuthError, ValueError) as exc:
        print(f"flowscope ui: {exc}", file=sys.stderr)
        return 2
    assert config is not None
    try:
        store = open_store(args.store, table=args.table,
                           user=os.environ.get("CLICKHOUSE_USERNAME", "default"),
                           password=os.environ.get("CLICKHOUSE_PASSWORD", ""))
        store.open()
    except (StoreError, ValueError) as exc:
        print(f"flowscope ui: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the server is down, the directory is held: say which and stop
        print(f"flowscope ui: cannot open the store {args.store}: {exc}", file=sys.stderr)
        return 2

    async def serve() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            server = await start_ui(store, config)
        except OSError as exc:
            print(f"flowscope ui: {exc.strerror or exc}", file=sys.stderr)
            return 3
        print(f"flowscope ui: dashboards at {server.url} (store {args.store})", flush=True)
        await stop.wait()
        await server.close()
        return 0

    try:
        return asyncio.run(serve())
    finally:
        store.close()
