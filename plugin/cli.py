"""`plugin`: the command line of the DICOM service."""

from __future__ import annotations

import argparse
import sys

from models import command_line
from plugin.allocator import keep_freed_memory

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
    return command_line.build_parser(
        "plugin",
        "Breast-cancer screening AI as a DICOM service. Research use only.",
        "plugin.commands",
        COMMANDS,
    )


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # before any thread: `serve` and `run` reuse image-sized buffers
    return command_line.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
