"""`plugin models list|info|import`: inspect model files and convert published checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.command_line import Subcommands
from models.modelfile import ModelCard, read_card

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "models" / "weights"


def register(sub: Subcommands) -> None:
    parser = sub.add_parser("models", help="list, inspect and import model files")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("list", help="model files in a folder (default: the shipped models)")
    p.add_argument("folder", nargs="?", type=Path, default=WEIGHTS_DIR)
    p.set_defaults(func=_list)

    p = verbs.add_parser("info", help="show a model file's card")
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true", help="print the whole card as JSON")
    p.set_defaults(func=_info)

    p = verbs.add_parser("import", help="convert a published checkpoint into a model file")
    p.add_argument("family", choices=["gmic", "allconv"])
    p.add_argument("source", type=Path, help="GMIC .p state dict or all-conv Keras .h5 file")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    p.add_argument("--name", help="model name recorded in the card and in every output object")
    p.add_argument("--version", help="model version recorded in the card")
    p.add_argument(
        "--sample-model",
        type=int,
        default=1,
        choices=range(1, 6),
        metavar="N",
        help="GMIC only: which published sample model (1-5) this is; sets top-t%% pooling",
    )
    p.add_argument(
        "--featurewise-mean",
        type=float,
        help="all-conv only: the training set's pixel mean after rescaling (DDSM 52.18, "
        "INbreast 44.33); default from the file name",
    )
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=_import)


def _list(args: argparse.Namespace) -> int:
    files = sorted(args.folder.glob("*.safetensors"))
    if not files:
        print(f"no model files in {args.folder}")
        return 0
    print(f"{'file':36} {'family':8} {'name':24} {'version':10} clinical use")
    for path in files:
        card = read_card(path)
        clinical = "validated" if card.clinical_use else "NOT FOR CLINICAL USE"
        print(f"{path.name:36} {card.family:8} {card.name:24} {card.version:10} {clinical}")
    return 0


def _info(args: argparse.Namespace) -> int:
    card = read_card(args.path)
    if args.json:
        print(json.dumps(json.loads(card.to_json()), indent=2))
        return 0
    print(_describe(args.path, card))
    return 0


def _describe(path: Path, card: ModelCard) -> str:
    lines = [
        f"file:            {path}",
        f"name:            {card.name}",
        f"version:         {card.version}",
        f"family:          {card.family}",
        f"licence:         {card.licence}",
        f"clinical use:    {'validated' if card.clinical_use else 'NOT validated'}",
        f"intended use:    {card.intended_use}",
        f"operating point: {card.operating_point if card.operating_point is not None else '-'}",
        f"architecture:    {json.dumps(card.architecture, sort_keys=True)}",
        f"preprocessing:   {json.dumps(card.preprocessing, sort_keys=True)}",
    ]
    for key, value in sorted(card.provenance.items()):
        lines.append(f"provenance.{key}: {json.dumps(value, sort_keys=True)}")
    return "\n".join(lines)


def _import(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        raise ValueError(f"{args.out} exists; pass --force to overwrite it")
    if args.family == "allconv" and args.sample_model != 1:
        raise ValueError("--sample-model applies to GMIC checkpoints only")
    if args.family == "gmic" and args.featurewise_mean is not None:
        raise ValueError("--featurewise-mean applies to all-conv models only")
    if args.family == "gmic":
        from models.gmic.checkpoint import import_checkpoint

        card = import_checkpoint(
            args.source,
            args.out,
            sample_model=args.sample_model,
            name=args.name,
            version=args.version,
        )
    else:
        from models.allconv.keras_h5 import import_h5

        card = import_h5(
            args.source,
            args.out,
            name=args.name,
            version=args.version,
            featurewise_mean=args.featurewise_mean,
        )
    print(_describe(args.out, card))
    print(f"\nwrote {args.out}. Licence of the imported weights: {card.licence}")
    return 0
