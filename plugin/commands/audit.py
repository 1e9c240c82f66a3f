"""`plugin audit`: the audit events committed with the transitions they describe (received,
analysed, quarantined, delivered, dead letter), from every node, as JSON lines.

The service's audit file is written after each commit, so a process killed in between loses
that line; these rows are committed with the change itself. `--after ID` continues an export
where the last one stopped (each line carries its `id`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.command_line import Subcommands
from plugin.config import DEFAULT_CONFIG, load_config
from plugin.observability import UID_FIELDS, hash_uid, scrub_uids


def register(sub: Subcommands) -> None:
    p = sub.add_parser("audit", help="export the committed audit events as JSON lines")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--after", type=int, default=0, metavar="ID", help="events after this id")
    p.add_argument("--output", type=Path, help="append to this file (default: standard output)")
    p.set_defaults(func=_audit)


def _audit(args: argparse.Namespace) -> int:
    from plugin.store import Store

    config = load_config(args.config)
    store = Store.open(config.storage)
    out = args.output.open("a", encoding="utf-8") if args.output else sys.stdout
    try:
        after = args.after
        while batch := store.events(after=after):
            for e in batch:
                line = {"id": e.id, "ts": round(e.ts, 3), "event": e.event, "node": e.node}
                if e.study_instance_uid is not None:
                    line["study"] = hash_uid(e.study_instance_uid)
                for key, value in e.detail.items():
                    if isinstance(value, str):  # reasons may quote spool paths (UIDs)
                        value = hash_uid(value) if key in UID_FIELDS else scrub_uids(value)
                    line[key] = value
                out.write(json.dumps(line) + "\n")
            after = batch[-1].id
    finally:
        store.close()
        if args.output:
            out.close()
    return 0
