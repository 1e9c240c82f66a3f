"""`plugin demo`: send one synthetic four-view exam to a running listener and show what came
back and where (run `plugin serve` first, with the same config)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from models.command_line import Subcommands
from plugin.config import DEFAULT_CONFIG, load_config


def register(sub: Subcommands) -> None:
    p = sub.add_parser("demo", help="send a synthetic exam to a running listener, show results")
    p.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="the running service's config (listener address, database)",
    )
    p.add_argument("--host", help="listener host (default: from the config; 0.0.0.0 → 127.0.0.1)")
    p.add_argument("--port", type=int, help="listener port (default: from the config)")
    p.add_argument("--calling-ae", default="DEMO_SCU", help="our AE title")
    p.add_argument("--seed", type=int, default=1, help="which synthetic exam (reproducible)")
    p.add_argument("--malignant", action="store_true", help="put a malignant lesion in it")
    p.add_argument("--size", default="512x416", help="image size ROWSxCOLS (default 512x416)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for results")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.presentation import build_context

    from plugin.observability import hash_uid
    from plugin.store import Store
    from trainer.synth import synth_exam

    config = load_config(args.config)
    host = args.host or config.listener.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    port = args.port or config.listener.port
    rows, cols = (int(v) for v in args.size.lower().split("x"))
    exam = synth_exam(args.seed, rows=rows, cols=cols, malignant=args.malignant)
    # A fresh study each run, so a repeated demo is a new exam, not a duplicate.
    study = exam.study_instance_uid
    print(
        f"sending a synthetic {rows}x{cols} four-view exam (study {hash_uid(study)}) to "
        f"{config.listener.ae_title}@{host}:{port}"
    )

    ae = AE(ae_title=args.calling_ae)
    syntax = exam.datasets[0].file_meta.TransferSyntaxUID
    ae.requested_contexts = [build_context(exam.datasets[0].SOPClassUID, [syntax])]
    assoc = ae.associate(host, port, ae_title=config.listener.ae_title)
    if not assoc.is_established:
        print(
            f"could not associate with {host}:{port}: is `plugin serve` running with "
            f"{args.config}? Is {args.calling_ae} in listener.allowed_callers?"
        )
        return 1
    try:
        for image in exam.images:
            status = assoc.send_c_store(image.dataset)
            code = getattr(status, "Status", None)
            text = "no response" if code is None else f"0x{code:04X}"
            print(f"  C-STORE {image.view_key}: {text}")
            if code != 0x0000:
                print("the listener refused the image; see its log")
                return 1
    finally:
        assoc.release()

    store = Store.open(config.storage)
    try:
        return _wait_and_show(store, study, config, args.timeout)
    finally:
        store.close()


def _wait_and_show(store, study: str, config, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    print(f"waiting for the analysis (settle time {config.exams.settle_seconds:g} s)...")
    while time.monotonic() < deadline:
        exam = store.exam(study)
        deliveries = [d for d in store.deliveries() if d.study_instance_uid == study]
        if exam is not None and exam.state in ("quarantined", "skipped"):
            print(f"exam {exam.state}: {exam.reason}")
            return 1
        settled = deliveries and all(d.state in ("delivered", "dead") for d in deliveries)
        if exam is not None and exam.state == "analysed" and (settled or not config.destinations):
            break
        time.sleep(0.5)
    else:
        print(f"no results within {timeout:g} s; check `plugin status` and the service log")
        return 1
    score = _exam_score(config.observability.audit_log, study)
    if score is not None:
        print(f"exam malignancy score (demo models, meaningless on real images): {score:.3f}")
    print("result objects:")
    for r in store.results(study):
        print(f"  {r['kind']:15} {r['path']}")
    print("deliveries:")
    for d in deliveries:
        where = d.destination
        route = config.route(d.destination)
        if getattr(route.destination, "type", "") == "folder":
            where = f"{d.destination} → {route.destination.path / (d.sop_instance_uid + '.dcm')}"
        print(
            f"  {d.kind:15} {d.state:10} {where}"
            + (f"  ({d.last_error})" if d.last_error and d.state != "delivered" else "")
        )
    return 0 if all(d.state == "delivered" for d in deliveries) else 1


def _exam_score(audit_log: Path, study: str) -> float | None:
    from plugin.observability import hash_uid

    if not audit_log.exists():
        return None
    score = None
    with audit_log.open(encoding="utf-8") as fp:
        for line in fp:
            event = json.loads(line)
            if event.get("event") == "analysed" and event.get("study") == hash_uid(study):
                score = event.get("exam_score")
    return score
