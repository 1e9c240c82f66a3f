"""`plugin retry`: requeue dead-lettered deliveries (all, or by id) and quarantined exams.

Works while the service runs: it only changes rows, and the service picks them up.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.command_line import Subcommands
from plugin.config import DEFAULT_CONFIG, load_config


def register(sub: Subcommands) -> None:
    p = sub.add_parser("retry", help="requeue dead letters or quarantined exams")
    p.add_argument(
        "ids",
        nargs="*",
        type=int,
        metavar="ID",
        help="delivery ids from `plugin status` (dead letters)",
    )
    p.add_argument("--dead-letters", action="store_true", help="requeue every dead letter")
    p.add_argument(
        "--quarantined", action="store_true", help="analyse every quarantined exam again"
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.set_defaults(func=_retry)


def _retry(args: argparse.Namespace) -> int:
    from plugin.store import Store

    if not (args.ids or args.dead_letters or args.quarantined):
        print(
            "nothing to do: give delivery IDs, --dead-letters or --quarantined "
            "(see `plugin status`)"
        )
        return 2
    if args.ids and args.dead_letters:
        print("give either delivery IDs or --dead-letters, not both")
        return 2
    config = load_config(args.config)
    store = Store.open(config.storage)
    try:
        if args.ids or args.dead_letters:
            n = store.retry_dead_letters(args.ids or None)
            print(f"requeued {n} dead letter(s)")
            if args.ids and n < len(args.ids):
                print(f"{len(args.ids) - n} id(s) were not dead letters; see `plugin status`")
        if args.quarantined:
            print(f"requeued {store.requeue_quarantined()} quarantined exam(s)")
    finally:
        store.close()
    return 0
