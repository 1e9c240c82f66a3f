"""`trainer finetune`: fine-tune a model file, or train a preset from scratch, on site data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.command_line import Subcommands

from .. import objectives
from ..finetune import FinetuneError, FinetuneOptions, finetune
from ..glimpsenet import cli as glimpsenet_cli
from ..metrics import DEFAULT_N_BOOT


def register(subparsers: Subcommands) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on a site's labelled images (or train a preset from scratch)",
        description="Train on the train split, pick the epoch with the best validation AUC, "
        "report test AUC, and write a new model file with its provenance. The split is by "
        "patient, stratified, from --seed (or labels.csv's `split` column). Checkpoints go to "
        "OUT.work/ every epoch; --resume continues an interrupted run.",
    )
    p.add_argument("--site-data", type=Path, required=True, help="DICOM folder with labels.csv")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--base", type=Path, help="model file to start from (only read)")
    start.add_argument(
        "--arch",
        help="train from scratch: gmic-demo, gmic (published), "
        "allconv-demo, allconv-resnet50, allconv-vgg16, allconv-vgg16_hybrid",
    )
    p.add_argument("--out", type=Path, required=True, help="new model file (.safetensors)")
    p.add_argument(
        "--preprocessing",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_key_value,
        help="with --arch: replace one entry of the preset's preprocessing, e.g. scale=fit "
        "for GMIC (the breast fills the input window whatever the image size); repeatable",
    )
    p.add_argument(
        "--recipe",
        choices=list(objectives.RECIPES),
        help="training schedule that supplies the defaults below; "
        + "; ".join(
            f"{r.name}: {r.summary} ({r.epochs} epochs, batch {r.batch_size}, augment "
            f"{r.augment}, lr all-conv {r.lr['allconv']:g} / GMIC {r.lr['gmic']:g})"
            for r in objectives.RECIPES.values()
        )
        + ". Default: adapt with --base, scratch with --arch",
    )
    p.add_argument("--epochs", type=int, help="default: the recipe's")
    p.add_argument("--batch-size", type=int, help="default: the recipe's")
    p.add_argument(
        "--accumulate",
        type=int,
        default=1,
        help="gradient accumulation: optimiser step every N batches",
    )
    p.add_argument(
        "--lr",
        type=float,
        help="learning rate (default: the recipe's); after a top-layers stage, all-conv's "
        "all-layers stage uses a tenth of it",
    )
    p.add_argument(
        "--schedule",
        choices=objectives.SCHEDULES,
        default="constant",
        help="learning rate within each stage: constant (default), or cosine: annealed from "
        "--lr towards 0 over the stage's epochs, so the last epochs settle (with --resume and "
        "a new --epochs, it anneals over the new length)",
    )
    p.add_argument("--weight-decay", type=float, help="Adam weight decay (gmic 1e-5, allconv 1e-4)")
    p.add_argument(
        "--top-epochs",
        type=int,
        help="all-conv: epochs training only the top layers before all layers "
        "(default 0; 30%% of --epochs with --recipe paper when fine-tuning)",
    )
    p.add_argument(
        "--beta",
        type=float,
        default=objectives.DEFAULT_BETA,
        help="gmic: weight of the saliency-map L1 regulariser",
    )
    p.add_argument(
        "--mask-weight",
        type=float,
        default=0.0,
        help="weight of the lesion-mask loss on the model's score maps, for labels.csv files "
        "with malignant_mask/benign_mask columns (as `trainer synth` writes); 0 = image "
        "labels only (default). 1 is a good start when training from scratch",
    )
    p.add_argument(
        "--bn-momentum",
        type=float,
        default=0.1,
        help="BatchNorm running-statistics momentum while training (default 0.1)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=5,
        help="stop after this many epochs without a better validation AUC",
    )
    p.add_argument(
        "--augment",
        choices=["full", "flips", "none"],
        help="full: flips, rotation ±25°, zoom 0.8-1.2, intensity shift; flips: mirror "
        "images only; none (default: the recipe's)",
    )
    p.add_argument("--seed", type=int, default=0, help="split, initialisation and sampling seed")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="mixed precision on CUDA (auto: bf16 where supported); CPU runs fp32",
    )
    p.add_argument("--work-dir", type=Path, help="checkpoint and input cache (default OUT.work)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--name", help="model name in the card")
    p.add_argument("--version", help="model version in the card (default date-datahash)")
    p.add_argument("--intended-use", help="intended-use statement for the card")
    p.add_argument(
        "--n-boot",
        type=int,
        default=DEFAULT_N_BOOT,
        help=f"bootstrap resamples for test CIs (default {DEFAULT_N_BOOT}, as `trainer evaluate`)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    glimpsenet_cli.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if glimpsenet_cli.wanted(args):
        return glimpsenet_cli.run(args)
    if foreign := glimpsenet_cli.options_set(args):
        raise FinetuneError(
            f"{', '.join(foreign)}: GlimpseNet options, and this model is not a GlimpseNet; "
            "drop them, or train --arch glimpsenet-demo|glimpsenet-paper"
        )
    options = FinetuneOptions(
        site_data=args.site_data,
        out=args.out,
        base=args.base,
        arch=args.arch,
        preprocessing=dict(args.preprocessing),
        recipe=args.recipe,
        epochs=args.epochs,
        batch_size=args.batch_size,
        accumulate=args.accumulate,
        lr=args.lr,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        top_epochs=args.top_epochs,
        beta=args.beta,
        mask_weight=args.mask_weight,
        bn_momentum=args.bn_momentum,
        patience=args.patience,
        augment=args.augment,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        work_dir=args.work_dir,
        resume=args.resume,
        progress=not args.no_progress,
        name=args.name,
        version=args.version,
        intended_use=args.intended_use,
        n_boot=args.n_boot,
        overwrite=args.overwrite,
    )
    result = finetune(options)
    print(
        f"wrote {result.out}: best validation AUC {result.best_val_auc:.3f} "
        f"(epoch {result.best_epoch}), {result.seconds:.0f} s"
    )
    for level, r in result.test.items():
        before = ""
        if result.base_test is not None and result.base_test[level].auc is not None:
            before = f" (base {result.base_test[level].auc:.3f})"
        if r.auc is not None:
            print(
                f"  test {level:6s} AUC {r.auc:.3f} [95% CI {r.ci95[0]:.3f}-{r.ci95[1]:.3f}] "
                f"n={r.n}{before}"
            )
        else:
            print(f"  test {level:6s} n={r.n}: {r.note}")
    return 0


def _key_value(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON where it parses (numbers, lists), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
