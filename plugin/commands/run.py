"""`plugin run PATH… --out DIR`: analyse DICOM files offline and write the result objects."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from models.command_line import Subcommands
from models.ensemble import Ensemble, EnsembleSpec, MemberSpec, default_member
from plugin.config import DEFAULT_CONFIG, Config, WorkerConfig, ensemble_spec, load_config
from plugin.observability import quiet_pydicom
from plugin.offline import StudyResult, analyse_studies, scan
from plugin.outputs import DEFAULT_KINDS, OutputKind, OutputOptions
from plugin.pipeline import Settings
from plugin.selection import SelectionPolicy

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "models" / "weights"
DEMO_MODELS = (
    "demo-gmic.safetensors",
    "demo-allconv.safetensors",
    "demo-glimpsenet.safetensors",
)


def register(sub: Subcommands) -> None:
    p = sub.add_parser(
        "run",
        help="analyse DICOM files offline and write the result objects to a folder",
        description=(
            "Group the DICOM files under PATH by study, pick one image per view, run the "
            "ensemble and write the result objects, one folder per study. Partial exams are "
            "analysed and reported as partial."
        ),
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="DICOM files or folders")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"service configuration: models, selection policy, outputs (default: "
        f"{DEFAULT_CONFIG} when it exists, else the shipped demo models)",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="FILE[:FLIPS]",
        help="an ensemble member, replacing the config's (repeatable); FLIPS is a "
        "comma-separated subset of none,hflip,vflip,hvflip, e.g. demo.safetensors:none,hflip",
    )
    p.add_argument(
        "--outputs",
        type=_kinds,
        metavar="KINDS",
        help="comma-separated: "
        + ",".join(k.value for k in OutputKind)
        + " (default: the config's destinations' outputs, else "
        + ",".join(k.value for k in DEFAULT_KINDS)
        + ")",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides the config")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_pydicom()  # the console must not show header values of the files read
    config = _config(args.config)
    spec = _spec(config, args.model, args.device)
    kinds = args.outputs or (config.output_kinds if config else None) or list(DEFAULT_KINDS)
    policy = SelectionPolicy.from_mapping(config.exams.selection if config else None)

    found = scan(args.paths)
    if not found.studies:
        raise ValueError(
            f"no DICOM instances under {', '.join(map(str, args.paths))} "
            f"({len(found.not_dicom)} other files); pass the folders holding the mammograms"
        )
    ensemble = Ensemble(spec)
    args.out.mkdir(parents=True, exist_ok=True)
    studies = [instances for _, instances in sorted(found.studies.items())]
    settings = _settings(config, spec, kinds, len(studies))
    printed: list[StudyResult] = []

    def print_row(result: StudyResult) -> None:
        printed.append(result)
        _print_row(result, header=len(printed) == 1)

    results = analyse_studies(
        studies, ensemble, args.out, settings, policy=policy, on_result=print_row
    )
    print(
        f"{len(results)} studies, {sum(len(r.files) for r in results)} objects written to "
        f"{args.out}; {len(found.not_dicom)} non-DICOM files ignored"
    )
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"{r.label}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def _kinds(text: str) -> list[OutputKind]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [OutputKind(n) for n in names]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown output in {text!r}; choose from {', '.join(k.value for k in OutputKind)}"
        ) from None


def _settings(
    config: Config | None, spec: EnsembleSpec, kinds: list[OutputKind], studies: int
) -> Settings:
    """The config's worker pipeline (defaults from the machine without one); one study runs
    in this process, where pool processes would only cost their start-up."""
    worker = config.worker if config else WorkerConfig()
    parallel = studies > 1
    return Settings(
        decode_processes=worker.decoders if parallel else 0,
        output_processes=worker.builders if parallel else 0,
        in_flight=worker.in_flight(spec.max_batch),
        max_batch=spec.max_batch,
        max_batch_wait_ms=config.models.max_batch_wait_ms if config else 0.0,
        kinds=tuple(kinds),
        options=OutputOptions(),
    )


def _config(path: Path | None) -> Config | None:
    if path is not None:
        return load_config(path)
    return load_config(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None


def _spec(config: Config | None, models: list[str], device: str | None) -> EnsembleSpec:
    if models:
        members = tuple(_member(m) for m in models)
        base = ensemble_spec(config.models) if config else EnsembleSpec(members)
        spec = dataclasses.replace(base, members=members)
    elif config is not None:
        spec = ensemble_spec(config.models)
    else:
        paths = [WEIGHTS_DIR / name for name in DEMO_MODELS]
        present = [p for p in paths if p.exists()]
        if not present:
            raise ValueError(
                f"no model given and no shipped demo models in {WEIGHTS_DIR}; "
                "pass --model FILE or --config FILE"
            )
        spec = EnsembleSpec(tuple(default_member(p) for p in present))
    for member in spec.members:
        if not Path(member.path).exists():
            raise ValueError(f"model file {member.path} does not exist")
    if device is not None:
        spec = dataclasses.replace(spec, device=device)
    return spec


def _member(text: str) -> MemberSpec:
    path, _, flips = text.partition(":")
    names = tuple(f.strip() for f in flips.split(",") if f.strip()) or ("none",)
    return MemberSpec(Path(path), names)


def _print_row(r: StudyResult, header: bool) -> None:
    if header:
        print(
            f"{'study':19} {'views':23} {'missing':13} {'exam':>6} {'R':>6} {'L':>6} "
            f"{'objects':>7} {'skipped':>7} {'time':>6}"
        )
    p = r.prediction
    views = ",".join(f"{i.laterality}-{i.view}" for i in p.images) if p else "-"
    breast = {str(b.laterality): f"{100 * b.malignant:5.1f}%" for b in p.breasts} if p else {}
    exam = f"{100 * p.malignant:5.1f}%" if p else "-"
    print(
        f"{r.label:19} {views:23} {','.join(r.missing) or '-':13} {exam:>6} "
        f"{breast.get('R', '-'):>6} {breast.get('L', '-'):>6} {len(r.files):7d} "
        f"{len(r.skipped):7d} {r.seconds:5.1f}s"
    )
