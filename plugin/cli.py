"""`plugin`: the command line of the DICOM service."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module in plugin.commands adds its subcommands with `register(subparsers)`.
COMMANDS = [
    "serve",
    "status",
    "audit",
    "retry",
    "config",
    "demo",
    "models",
    "run",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plugin",
        description="Breast-cancer screening AI as a DICOM service. Research use only.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"plugin.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:
        # Our errors say what to do; a traceback would only hide that from the operator.
        print(f"plugin {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
