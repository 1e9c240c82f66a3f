"""`trainer`: synthetic data, fine-tuning and evaluation."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module in trainer.commands adds its subcommands with `register(subparsers)`.
COMMANDS = [
    "synth",
    "finetune",
    "evaluate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer",
        description="Fine-tune and evaluate mammo-ai models on a site's images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"trainer.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:
        print(f"trainer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
