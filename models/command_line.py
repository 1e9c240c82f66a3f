"""The command-line plumbing `plugin` and `trainer` share: subcommands registered by modules,
and errors that reach the user as one line that says what to do.

It lives in `models` because that is the one package both command lines may import (DESIGN §2).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any, Protocol


class Subcommands(Protocol):
    """What `ArgumentParser.add_subparsers()` returns, as a command module uses it."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


def build_parser(
    prog: str, description: str, package: str, commands: Sequence[str]
) -> argparse.ArgumentParser:
    """A parser whose subcommands come from `package.<command>.register(subcommands)`; each
    registered parser sets `func` to the function that runs it."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in commands:
        importlib.import_module(f"{package}.{name}").register(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse and run one command; its exit status. Our `ValueError`s and `OSError`s say what
    to do: they are printed as one line (a traceback would only hide that from the user)."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
