"""Model benchmark: seconds per four-view exam, images per second and peak memory, per member
model and for the full flip-TTA ensemble, on CPU and on CUDA when present.

Weights are random (the published architectures at full size; GlimpseNet's paper preset and
its CPU demo): speed does not depend on them.
Ratios are against the first row (GMIC, one pass per view, fp32) measured in the same run.

    python -m bench.models [--device cpu|cuda|auto] [--precision fp32 bf16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models import Mammogram, new_model_file
from models.ensemble import Ensemble, EnsembleSpec, MemberSpec
from models.reading import read_mammogram
from trainer.synth import synth_exam

ALL_FLIPS = ("none", "hflip", "vflip", "hvflip")


@dataclass
class Row:
    what: str
    device: str
    precision: str
    images: int
    seconds: float
    peak_mib: float


def synthetic_exam(rows: int, cols: int, seed: int = 0) -> list[Mammogram]:
    """A positive synthetic four-view exam (trainer.synth), decoded as the service decodes it."""
    exam = synth_exam(seed, rows=rows, cols=cols, malignant=True)
    return [read_mammogram(image.dataset) for image in exam.images]


def write_model(folder: Path, family: str, preset: str) -> Path:
    presets = __import__(f"models.{family}", fromlist=["PRESETS"]).PRESETS
    return new_model_file(
        folder / f"{family}-{preset}.safetensors",
        family,
        presets[preset],
        name=f"bench-{family}-{preset}",
        licence="Apache-2.0 (random weights)",
    )


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(
    what: str, members: list[MemberSpec], device: str, precision: str, exam, repeats: int
) -> Row:
    ensemble = Ensemble(EnsembleSpec(tuple(members), device=device, precision=precision))
    ensemble.predict_exam(exam)  # warm-up: allocator, kernels, caches
    peak_memory_reset(ensemble.device)
    times = []
    for _ in range(repeats):
        if ensemble.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        ensemble.predict_exam(exam)
        if ensemble.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    images = len(exam) * sum(len(m.flips) for m in members)
    return Row(
        what,
        str(ensemble.device),
        precision,
        images,
        float(np.median(times)),
        peak_memory_mib(ensemble.device),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"]
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--image-size", default="2048x1664", help="source image rows x cols")
    parser.add_argument("--gmic-preset", default="published")
    parser.add_argument("--allconv-preset", default="resnet50")
    parser.add_argument(
        "--glimpsenet-presets",
        nargs="*",
        default=["paper", "demo"],
        help="GlimpseNet presets to time (none: skip GlimpseNet)",
    )
    args = parser.parse_args(argv)

    rows, cols = (int(v) for v in args.image_size.split("x"))
    exam = synthetic_exam(rows, cols)
    with tempfile.TemporaryDirectory() as tmp:
        gmic = write_model(Path(tmp), "gmic", args.gmic_preset)
        allconv = write_model(Path(tmp), "allconv", args.allconv_preset)
        glimpsenets = {p: write_model(Path(tmp), "glimpsenet", p) for p in args.glimpsenet_presets}
        plans = [
            ("GMIC, 1 pass", [MemberSpec(gmic)]),
            ("GMIC, hflip TTA", [MemberSpec(gmic, ("none", "hflip"))]),
            ("all-conv, 1 pass", [MemberSpec(allconv)]),
            ("all-conv, 4-flip TTA", [MemberSpec(allconv, ALL_FLIPS)]),
            (
                "ensemble (GMIC x2 + all-conv x4)",
                [MemberSpec(gmic, ("none", "hflip")), MemberSpec(allconv, ALL_FLIPS)],
            ),
        ]
        for preset, path in glimpsenets.items():
            plans.append((f"GlimpseNet {preset}, 1 pass", [MemberSpec(path)]))
        if "paper" in glimpsenets:
            plans.append(
                (
                    "ensemble + GlimpseNet paper x2",
                    [
                        MemberSpec(gmic, ("none", "hflip")),
                        MemberSpec(allconv, ALL_FLIPS),
                        MemberSpec(glimpsenets["paper"], ("none", "hflip")),
                    ],
                )
            )
        results = [
            measure(what, members, args.device, precision, exam, args.repeats)
            for precision in args.precision
            for what, members in plans
        ]

    print(
        f"\nmachine: {platform.machine()} {platform.processor() or ''} "
        f"{os.cpu_count()} cores; python {sys.version.split()[0]}; torch {torch.__version__}; "
        f"source images {rows}x{cols}; median of {args.repeats}"
    )
    if torch.cuda.is_available():
        print(f"gpu: {torch.cuda.get_device_name()}")
    base = results[0].seconds
    header = f"{'model':34} {'device':7} {'prec':5} {'img/exam':>8} {'s/exam':>8} "
    header += f"{'img/s':>7} {'peak MiB':>9} {'x base':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.what:34} {r.device:7} {r.precision:5} {r.images:8d} {r.seconds:8.2f} "
            f"{r.images / r.seconds:7.2f} {r.peak_mib:9.0f} {r.seconds / base:7.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
