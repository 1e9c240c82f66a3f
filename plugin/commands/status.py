"""`plugin status`: nodes and their roles, leases, queues, exams and dead letters, read from
the service's database (any node's view is the whole cluster's)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from models.command_line import Subcommands
from plugin.config import DEFAULT_CONFIG, load_config
from plugin.observability import hash_uid, scrub_uids
from plugin.store import Delivery, Exam, Job, Lease, Node


def register(sub: Subcommands) -> None:
    p = sub.add_parser("status", help="show nodes, leases, queues, recent exams and dead letters")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--exams", type=int, default=10, metavar="N", help="recent exams to list")
    p.set_defaults(func=_status)


@dataclass(frozen=True)
class _Snapshot:
    """The cluster as the database sees it, read in one go."""

    counts: dict[str, dict[str, int]]
    nodes: list[Node]
    leases: list[Lease]
    exams: list[Exam]
    dead: list[Delivery]
    quarantined: list[Job]


def _status(args: argparse.Namespace) -> int:
    from plugin.store import Store

    config = load_config(args.config)
    if not config.storage.postgres and not config.storage.database.exists():
        print(f"no database at {config.storage.database} yet: the service has not run")
        return 0
    store = Store.open(config.storage)
    try:
        snap = _Snapshot(
            counts=store.counts(),
            nodes=store.nodes(),
            leases=store.leases(),
            exams=store.exams(last=args.exams),
            dead=store.deliveries("dead"),
            quarantined=store.jobs("quarantined"),
        )
    finally:
        store.close()
    now, lease = time.time(), config.storage.lease_seconds
    if args.json:
        print(json.dumps(_as_json(snap, now, lease), indent=2))
    else:
        _print_text(snap, now, lease)
    return 0


def _as_json(snap: _Snapshot, now: float, lease: float) -> dict[str, object]:
    return {
        "counts": snap.counts,
        "nodes": [
            {
                "node": n.claimant,
                "roles": n.roles.split(","),
                "pid": n.pid,
                "state": _node_state(n, now, lease),
                "heartbeat_age_s": round(now - n.heartbeat_at, 1),
            }
            for n in snap.nodes
        ],
        "leases": [
            {
                "kind": x.kind,
                "id": x.row_id,
                "node": x.owner,
                "expires_in_s": round(x.expires - now, 1),
            }
            for x in snap.leases
        ],
        "exams": [
            {
                "id": e.id,
                "study": hash_uid(e.study_instance_uid),
                "state": e.state,
                "version": e.version,
                "reason": _scrub(e.reason),
            }
            for e in snap.exams
        ],
        "dead_letters": [
            {
                "id": d.id,
                "destination": d.destination,
                "kind": d.kind,
                "attempts": d.attempts,
                "error": _scrub(d.last_error),
            }
            for d in snap.dead
        ],
        "quarantined": [
            {"job": j.id, "exam": j.exam_id, "reason": _scrub(j.reason)} for j in snap.quarantined
        ],
    }


def _print_text(snap: _Snapshot, now: float, lease: float) -> None:
    for table, states in snap.counts.items():
        text = ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "none"
        print(f"{table:11} {text}")
    if snap.nodes:
        print("\nnodes")
        for n in snap.nodes:
            print(
                f"  {n.claimant:24} {_node_state(n, now, lease):8} {n.roles:36}"
                f" pid {n.pid:<7} heartbeat {now - n.heartbeat_at:,.0f} s ago"
            )
    if snap.leases:
        print("\nleases (work in progress)")
        for x in snap.leases:
            print(f"  {x.kind:8} #{x.row_id:<6} {x.owner:24} expires in {x.expires - now:,.0f} s")
    if snap.exams:
        print("\nrecent exams (study shown as hash)")
        for e in snap.exams:
            why = f"  {_scrub(e.reason)}" if e.reason else ""
            print(
                f"  #{e.id:<5} {hash_uid(e.study_instance_uid)}  {e.state:11} v{e.version}"
                f"  last image {now - e.last_seen:,.0f} s ago{why}"
            )
    if snap.quarantined:
        print("\nquarantined exams (`plugin retry --quarantined` requeues them)")
        for j in snap.quarantined:
            print(f"  exam #{j.exam_id} job #{j.id}: {_scrub(j.reason)}")
    if snap.dead:
        print("\ndead letters (`plugin retry --dead-letters` or `plugin retry ID...`)")
        for d in snap.dead:
            print(
                f"  #{d.id:<6} {d.destination:16} {d.kind:14} {d.attempts} attempts: "
                f"{_scrub(d.last_error)}"
            )


def _scrub(text: str | None) -> str | None:
    """Stored reasons quote exceptions and peers verbatim (spool paths hold the study's
    UIDs); the console shows them pseudonymised, like the logs."""
    return None if text is None else scrub_uids(text)


def _node_state(node: Node, now: float, lease: float) -> str:
    """up (heartbeat within a lease), stopped (drained), or lost (died; its leases run out)."""
    if node.stopped_at is not None:
        return "stopped"
    return "up" if now - node.heartbeat_at <= lease else "lost"
