"""`trainer synth`: write synthetic four-view screening exams with lesion masks and labels.csv."""

from __future__ import annotations

import argparse
import re
import time

from models.command_line import Subcommands
from trainer.synth import DEFAULT_COLS, DEFAULT_ROWS, LOOKS, SYNTAXES, write_dataset
from trainer.synth.phantom import LesionType


def register(subparsers: Subcommands) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write synthetic four-view mammography exams (DICOM) with lesion masks and labels",
        description=(
            "Write synthetic MG For Presentation exams (L-CC, L-MLO, R-CC, R-MLO) under --out, "
            "one folder per exam, with PNG lesion masks and labels.csv. A seed reproduces "
            "pixels, masks and UIDs."
        ),
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--exams", type=_positive_int, required=True, help="number of exams")
    parser.add_argument(
        "--positive-fraction",
        type=float,
        default=0.5,
        help="fraction of exams with a malignant lesion (default 0.5)",
    )
    parser.add_argument(
        "--malignant-kind",
        choices=[kind.value for kind in LesionType if kind.malignant],
        help="the positive exams' lesion type (default: either, a spiculated mass about two "
        "times in three)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--transfer-syntax",
        default="explicit",
        choices=["mixed", *SYNTAXES],
        help="encoding of the files; mixed cycles explicit, jpeg2000, jpegls (default explicit)",
    )
    parser.add_argument(
        "--photometric",
        default="MONOCHROME2",
        choices=["MONOCHROME2", "MONOCHROME1", "mixed"],
        help="photometric interpretation; mixed alternates per exam (default MONOCHROME2)",
    )
    parser.add_argument(
        "--size",
        type=_size,
        default=(DEFAULT_ROWS, DEFAULT_COLS),
        metavar="ROWSxCOLS",
        help=f"image size (default {DEFAULT_ROWS}x{DEFAULT_COLS} at 0.1 mm; 512x416 for tests)",
    )
    parser.add_argument(
        "--bits-stored",
        type=int,
        default=12,
        choices=range(10, 17),
        metavar="{10..16}",
        help="bits stored per pixel (default 12)",
    )
    parser.add_argument(
        "--look",
        default="standard",
        choices=list(LOOKS),
        help="detector look: the vendor processing the exams are rendered through; "
        + "; ".join(f"{name}: {look.description}" for name, look in LOOKS.items()),
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows, cols = args.size
    start = time.perf_counter()
    labels = write_dataset(
        args.out,
        args.exams,
        positive_fraction=args.positive_fraction,
        malignant_kind=LesionType(args.malignant_kind) if args.malignant_kind else None,
        seed=args.seed,
        transfer_syntax=args.transfer_syntax,
        photometric=args.photometric,
        rows=rows,
        cols=cols,
        bits_stored=args.bits_stored,
        look=args.look,
        progress=True,
    )
    elapsed = time.perf_counter() - start
    print(
        f"wrote {args.exams} exams ({4 * args.exams} images) in {elapsed:.1f} s; labels: {labels}"
    )
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"size must look like 512x416 (rows x columns), not {text!r}"
        )
    return int(match.group(1)), int(match.group(2))
