"""`trainer evaluate`: AUC with 95% CIs per image, breast and exam, plots, operating points."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.command_line import Subcommands
from models.ensemble import FLIPS, MemberSpec
from models.modelfile import read_card

from ..evaluate import (
    LEVELS,
    Evaluation,
    evaluate,
    reports_to_json,
    set_operating_point,
    write_outputs,
)
from ..localisation import DEFAULT_WITHIN_MM
from ..operating import Criterion


def register(subparsers: Subcommands) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="AUC per image, breast and exam with 95%% CIs; ROC/calibration plots; "
        "operating points",
        description="Score a site's labelled images with one model file and report AUC with "
        "bootstrap 95%% confidence intervals per image, breast (mean of its views) and exam "
        "(max over breasts). The split is recomputed exactly as `trainer finetune` made it.",
    )
    p.add_argument(
        "--model",
        type=_member,
        action="append",
        required=True,
        metavar="FILE[:FLIPS]",
        help="model file (.safetensors), with optional test-time flips (none,hflip,vflip,"
        "hvflip); repeat for an ensemble, scored as the service scores it (e.g. config.yml's "
        "members). One file without flips is scored as `trainer finetune` scores it",
    )
    p.add_argument("--site-data", type=Path, required=True, help="DICOM folder with labels.csv")
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test", "all"],
        help="which split to score (default test; `all` for an external data set)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="split seed (default: the one in the model card when it was trained on "
        "this data, else 0)",
    )
    p.add_argument("--json", type=Path, help="write {level: {auc, ci95, n}} to this file")
    p.add_argument(
        "--out",
        type=Path,
        help="folder for roc.png, calibration.png, operating_points.csv, scores.csv",
    )
    p.add_argument(
        "--set-operating-point",
        metavar="CRITERION",
        type=Criterion.parse,
        help="sensitivity=0.9 | specificity=0.8 | threshold=0.35: choose a threshold "
        "on this split and write it into the model file's card as the default "
        "operating point (the file is rewritten atomically; weights are unchanged)",
    )
    p.add_argument(
        "--operating-point-level",
        default="image",
        choices=LEVELS,
        help="which scores the operating point applies to (default image)",
    )
    p.add_argument(
        "--allow-test-split",
        action="store_true",
        help="let --set-operating-point choose a threshold on the test split (which then no "
        "longer measures the model honestly); choose it on the validation split instead",
    )
    p.add_argument(
        "--within-mm",
        type=float,
        default=DEFAULT_WITHIN_MM,
        help="localisation: a malignant image counts as found when its map's peak on the "
        f"source grid lies within this many mm of its lesion mask (default {DEFAULT_WITHIN_MM:g})",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the CIs")
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="keep preprocessed inputs here between runs (default: memory only)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _member(text: str) -> MemberSpec:
    path, _, flips = text.partition(":")
    names = tuple(f.strip() for f in flips.split(",") if f.strip()) or ("none",)
    unknown = [f for f in names if f not in FLIPS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown flip(s) {unknown}; use {', '.join(FLIPS)}"
        )
    return MemberSpec(Path(path), names)


def run(args: argparse.Namespace) -> int:
    members: list[MemberSpec] = args.model
    single = len(members) == 1 and members[0].flips == ("none",)
    if args.set_operating_point is not None:
        if len(members) > 1:
            raise ValueError(
                "--set-operating-point writes into one model file; evaluate that model alone"
            )
        if args.split == "test" and not args.allow_test_split:
            raise ValueError(
                "--set-operating-point on the test split would tune the threshold on the data "
                "that is meant to measure it; choose it on the validation split (--split val), "
                "or pass --allow-test-split if this test set is never used to report results"
            )
    ev = evaluate(
        members,
        args.site_data,
        split=args.split,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        n_boot=args.n_boot,
        within_mm=args.within_mm,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )
    _print(ev)
    if args.json:
        payload = {**reports_to_json(ev.reports), "localisation": ev.localisation.to_json()}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.out:
        operating = read_card(members[0].path).operating_points.get("default") if single else None
        written = write_outputs(
            args.out,
            ev.images,
            ev.scores,
            ev.reports,
            f"{ev.title} {ev.split}",
            operating,
            ev.localisation,
        )
        for path in written:
            print(f"  wrote {path}")
    if args.set_operating_point is not None:
        criterion: Criterion = args.set_operating_point
        level = args.operating_point_level
        threshold, achieved = set_operating_point(ev, members[0].path, criterion, level)
        print(
            f"  operating point ({criterion}, {level} level): threshold {threshold:.4f}, "
            f"sensitivity {achieved.sensitivity:.3f}, specificity {achieved.specificity:.3f}; "
            f"written to {members[0].path}"
        )
    return 0


def _print(ev: Evaluation) -> None:
    print(f"{ev.title} on {ev.split} split ({ev.split_source}): {len(ev.images)} images")
    for level, r in ev.reports.items():
        if r.auc is None:
            print(f"  {level:6s} n={r.n:5d}  {r.note}")
        else:
            print(
                f"  {level:6s} n={r.n:5d} ({r.positives} malignant)  AUC {r.auc:.3f} "
                f"[95% CI {r.ci95[0]:.3f}-{r.ci95[1]:.3f}]"
            )
    print(f"  {ev.localisation.line()}")
    for r in ev.reports.values():
        for warning in r.warnings:
            print(f"  warning: {warning}")
