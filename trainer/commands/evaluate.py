"""`trainer evaluate`: AUC with 95% CIs per image, breast and exam, plots, operating points."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from models.command_line import Subcommands
from models.ensemble import FLIPS, EnsembleSpec, MemberSpec, resolve_device
from models.family import get_family
from models.modelfile import load_model, read_card

from ..evaluate import (
    LEVELS,
    aggregate,
    ensemble_scores,
    report,
    reports_to_json,
    score_images,
    write_outputs,
)
from ..localisation import DEFAULT_WITHIN_MM, localisation_report
from ..metrics import at_threshold
from ..operating import Criterion, write_operating_point
from ..prepare import InputCache
from ..sitedata import load_site_data
from ..split import split_site_data


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


def _split_seed(card_provenance: dict, fingerprint: str, given: int | None) -> int:
    if given is not None:
        return given
    data = card_provenance.get("training_data", {})
    if data.get("fingerprint_sha256") == fingerprint:
        return int(data.get("split", {}).get("seed", 0))
    return 0


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
    cards = [read_card(m.path) for m in members]
    card = cards[0]
    data = load_site_data(args.site_data)
    seed = _split_seed(card.provenance, data.fingerprint(), args.seed)
    split = split_site_data(data, seed=seed)
    images = split.images(data, args.split)
    if not images:
        raise ValueError(f"the {args.split} split is empty; use --split all or another split")
    progress = not args.no_progress
    spec = EnsembleSpec(tuple(members), device=args.device, max_batch=args.batch_size)
    if single:
        family = get_family(card.family)
        device = resolve_device(args.device)
        module = load_model(members[0].path, device=device)
        cache = InputCache(family, card.preprocessing, args.cache_dir)
        cache.prepare(images, progress=progress)
        scores = score_images(
            module, family, cache, images, device, args.batch_size, progress=progress
        )
        lesions = [im for im in images if im.malignant and im.malignant_mask is not None]
        _, distances = ensemble_scores(spec, lesions, progress) if lesions else (None, [])
    else:
        scores, distances = ensemble_scores(spec, images, progress)
    reports = report(images, scores, n_boot=args.n_boot)
    located = localisation_report(distances, args.within_mm)

    title = " + ".join(
        f"{c.name} {c.version}" + ("" if m.flips == ("none",) else f" [{','.join(m.flips)}]")
        for c, m in zip(cards, members, strict=True)
    )
    print(f"{title} on {args.split} split ({split.source}): {len(images)} images")
    for level, r in reports.items():
        if r.auc is None:
            print(f"  {level:6s} n={r.n:5d}  {r.note}")
        else:
            print(
                f"  {level:6s} n={r.n:5d} ({r.positives} malignant)  AUC {r.auc:.3f} "
                f"[95% CI {r.ci95[0]:.3f}-{r.ci95[1]:.3f}]"
            )
    print(f"  {located.line()}")
    for r in reports.values():
        for warning in r.warnings:
            print(f"  warning: {warning}")
    operating = card.operating_points.get("default") if single else None
    if args.json:
        payload = {**reports_to_json(reports), "localisation": located.to_json()}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.out:
        written = write_outputs(
            args.out, images, scores, reports, f"{title} {args.split}", operating, located
        )
        for path in written:
            print(f"  wrote {path}")
    if args.set_operating_point is not None:
        level = args.operating_point_level
        cases = aggregate(images, scores)[level]
        labels = np.array([c.label for c in cases])
        level_scores = np.array([c.score for c in cases])
        criterion: Criterion = args.set_operating_point
        if criterion.kind != "threshold" and reports[level].auc is None:
            raise ValueError(
                f"cannot choose an operating point at {level} level: {reports[level].note}"
            )
        threshold = criterion.threshold(labels, level_scores)
        achieved = at_threshold(labels, level_scores, threshold)
        write_operating_point(
            members[0].path,
            threshold,
            {
                "criterion": str(criterion),
                "level": level,
                "split": args.split,
                "split_seed": seed,
                "data_fingerprint_sha256": data.fingerprint(),
                "n": len(cases),
                "sensitivity": achieved.sensitivity,
                "specificity": achieved.specificity,
            },
        )
        print(
            f"  operating point ({criterion}, {level} level): threshold {threshold:.4f}, "
            f"sensitivity {achieved.sensitivity:.3f}, specificity {achieved.specificity:.3f}; "
            f"written to {members[0].path}"
        )
    return 0
