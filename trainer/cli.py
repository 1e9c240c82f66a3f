"""`trainer`: synthetic data, fine-tuning and evaluation."""

from __future__ import annotations

import argparse
import sys

from models import command_line

# Each module in trainer.commands adds its subcommands with `register(subparsers)`.
COMMANDS = [
    "synth",
    "finetune",
    "evaluate",
]


def build_parser() -> argparse.ArgumentParser:
    return command_line.build_parser(
        "trainer",
        "Fine-tune and evaluate mammo-ai models on a site's images.",
        "trainer.commands",
        COMMANDS,
    )


def main(argv: list[str] | None = None) -> int:
    return command_line.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
