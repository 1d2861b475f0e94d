"""The one command line of flowscope: ``flowscope <command> ...``.

Each component owns its subcommands in its own ``cli`` module, which exposes
``register(subparsers)``; this module only assembles them. Component CLI modules keep
heavy imports (pyroute2, kopf, chdb) inside their command functions, so that
``flowscope --help`` stays fast and a missing optional dependency only affects the
command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from flowscope import __version__

# Modules that contribute subcommands, in the order their commands are listed.
COMMAND_MODULES = (
    "flowscope.collector.cli",  # collector, export
    "flowscope.collector.policy",  # policy (what-if, recommend)
    "flowscope.collector.ui.cli",  # ui
    "flowscope.agent.cli",  # agent
    "flowscope.aggregator.cli",  # aggregator (flowrecords, recordmetrics)
    "flowscope.operator.cli",  # operator, render
    "flowscope.demo",  # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowscope", description="Kubernetes network flow visibility over IPFIX."
    )
    parser.add_argument("--version", action="version", version=f"flowscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real import error inside the module: surface it
                raise
            continue  # component not built yet
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
