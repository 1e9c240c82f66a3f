"""`trainer finetune` for GlimpseNet: the extra options, and the run that replaces the generic
fine-tuning when the model is a GlimpseNet (`--arch glimpsenet-*`, or a GlimpseNet `--base`)."""

from __future__ import annotations

import argparse
from typing import Any

from models.modelfile import read_card

from .. import objectives
from .objectives import FCGN_LOSSES, PAPER_LAMBDA
from .train import FCGN_MASKS, STAGES, GlimpseNetOptions, train

OPTIONS = ("stage", "fcgn_epochs", "fcgn_lr", "fcgn_schedule", "fcgn_loss", "fcgn_masks",
           "fcgn_lambda", "pooling")  # fmt: skip
"""Destinations of the options `add_arguments` adds: they mean nothing to other families."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "GlimpseNet (--arch glimpsenet-demo | glimpsenet-paper, or a GlimpseNet --base)",
        "Two stages as in the paper: the FCGN on lesion masks, then Inception V3 + MIL pooling "
        "on image labels with the FCGN's glimpses. --epochs, --lr (default 1e-4, halved every "
        "30 epochs) and --weight-decay (default 0.01) apply to the MIL stage.",
    )
    g.add_argument("--stage", choices=STAGES, default="both", help="stages to run (default both)")
    g.add_argument("--fcgn-epochs", type=int, default=30, help="FCGN epochs (default 30)")
    g.add_argument("--fcgn-lr", type=float, default=1e-3, help="FCGN Adam lr (default 1e-3)")
    g.add_argument(
        "--fcgn-schedule",
        choices=objectives.SCHEDULES,
        default="constant",
        help="constant: --fcgn-lr throughout, as the paper (default); cosine: annealed to 0 "
        "over --fcgn-epochs",
    )
    g.add_argument(
        "--fcgn-loss",
        choices=FCGN_LOSSES,
        default="weighted",
        help="weighted: lesion pixels weigh λ (the paper's stated intent, default); printed: "
        "(Î − λI)² as printed in the paper",
    )
    g.add_argument(
        "--fcgn-masks",
        choices=FCGN_MASKS,
        default="all",
        help="all: every lesion mask, as the paper (default); malignant: malignant masks only, "
        "so the mask (the ensemble's SEG) marks malignancy",
    )
    g.add_argument("--fcgn-lambda", type=float, default=PAPER_LAMBDA, help="λ (default 100)")
    g.add_argument(
        "--pooling",
        type=pooling_spec,
        metavar="KIND[:NAME=VALUE,...]",
        help="MIL pooling for the MIL stage, e.g. lse:r=5, noisy_and:a=10,b=0.2, topk:k=1 "
        "(default: the preset's or the base's). Pooling has no weights, so a trained base "
        "keeps its classifier and learns under the new pooling",
    )
    p.set_defaults(glimpsenet_defaults={dest: p.get_default(dest) for dest in OPTIONS})


def options_set(args: argparse.Namespace) -> list[str]:
    """The GlimpseNet options this command line moves off their defaults, as flags."""
    return [
        "--" + dest.replace("_", "-")
        for dest in OPTIONS
        if getattr(args, dest) != args.glimpsenet_defaults[dest]
    ]


def pooling_spec(text: str) -> dict[str, Any]:
    """`topk:k=1,by=2` → {"kind": "topk", "k": 1, "by": 2}; the architecture checks the rest."""
    kind, _, rest = text.partition(":")
    spec: dict[str, Any] = {"kind": kind}
    for item in filter(None, rest.split(",")):
        name, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r} is not NAME=VALUE")
        try:
            spec[name] = int(value)
        except ValueError:
            try:
                spec[name] = float(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{name}={value!r} is not a number") from None
    return spec


def wanted(args: argparse.Namespace) -> bool:
    """True when this run trains a GlimpseNet."""
    if args.arch is not None:
        return args.arch.partition("-")[0] == "glimpsenet"
    return args.base is not None and read_card(args.base).family == "glimpsenet"


def run(args: argparse.Namespace) -> int:
    def given(name: str, default):
        value = getattr(args, name, None)
        return default if value is None else value

    options = GlimpseNetOptions(
        site_data=args.site_data,
        out=args.out,
        base=args.base,
        arch=args.arch.partition("-")[2] or "paper" if args.arch else None,
        stage=args.stage,
        fcgn_epochs=args.fcgn_epochs,
        fcgn_lr=args.fcgn_lr,
        fcgn_schedule=args.fcgn_schedule,
        fcgn_loss=args.fcgn_loss,
        fcgn_masks=args.fcgn_masks,
        lam=args.fcgn_lambda,
        pooling=args.pooling,
        epochs=given("epochs", 20),
        lr=given("lr", 1e-4),
        weight_decay=given("weight_decay", 0.01),
        batch_size=given("batch_size", 8),
        augment=given("augment", "flips") if given("augment", "flips") != "full" else "flips",
        patience=given("patience", 10),
        seed=given("seed", 0),
        device=given("device", "auto"),
        work_dir=args.work_dir,
        resume=args.resume,
        progress=not args.no_progress,
        name=args.name,
        version=args.version,
        intended_use=args.intended_use,
        n_boot=given("n_boot", 1000),
        overwrite=args.overwrite,
    )
    result = train(options)
    print(f"wrote {result.out} in {result.seconds:.0f} s")
    for level, r in result.test.items():
        if r.get("auc") is not None:
            ci = r["ci95"]
            print(
                f"  test {level:6s} AUC {r['auc']:.3f} [95% CI {ci[0]:.3f}-{ci[1]:.3f}] n={r['n']}"
            )
    peaks = result.card.provenance["metrics"]["test_mask_peak_within_5mm"]
    if peaks["images"]:
        print(
            f"  test mask peak within 5 mm of the malignant lesion: {peaks['hits']}/"
            f"{peaks['images']} malignant images"
        )
    return 0
