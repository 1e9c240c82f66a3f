"""Model benchmark: seconds per four-view exam, images per second and peak memory, per member
model and for the full flip-TTA ensemble, on CPU and on CUDA when present.

Weights are random (the published architectures at full size; GlimpseNet's paper preset and
its CPU demo): speed does not depend on them.
Ratios are against the first row (GMIC, one pass per view, fp32) measured in the same run.

    python -m bench.models [--device cpu|cuda|auto] [--precision fp32 bf16] [--repeats 2]
    python -m bench.models --stages [--image-size 3328x2560] [--threads 1]

`--stages` times where one exam's time goes inside `Ensemble.predict_exam` on the CPU (demo
models; the published architectures without their forwards): preprocessing, forward passes,
mapping onto the source grid, and SEG + SC for one image, each against the scipy/numpy code
it replaced (kept below as the baseline, checked to give the same result) in the same run.
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
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from models import Mammogram, new_model_file
from models.compute_thread import on_compute_thread
from models.ensemble import Ensemble, EnsembleSpec, MemberSpec
from models.reading import read_mammogram
from trainer.synth import synth_exam

DEMO_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights"

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


# -- per-stage timings against the code each stage replaced -----------------------------------


@dataclass
class Stage:
    what: str
    seconds: float
    baseline: float | None = None
    """The replaced scipy/numpy code on the same input, same run; None where nothing was
    replaced."""


def _seconds(fn, repeats: int) -> tuple[float, object]:
    """Median CPU seconds of this process for `fn()` (after one warm-up call) and its last
    result. With one torch thread that is the wall time on an idle machine, and it stays
    meaningful on a shared one, where wall time mostly measures the neighbours."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
    return float(np.median(times)), result


def _baseline_crop_stage(pixels: np.ndarray, r: int, buffer: int) -> tuple[int, ...]:
    """GMIC's crop stage as it ran before (scipy erosion, label, dilation over the image):
    the tissue box (top, bottom, left, right) with its buffer."""
    mask = ndi.binary_erosion(pixels > 0, iterations=r)
    labels, _ = ndi.label(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    tissue = ndi.binary_dilation(labels == int(sizes.argmax()), iterations=r)
    rows, cols = np.flatnonzero(tissue.any(axis=1)), np.flatnonzero(tissue.any(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    height, width = pixels.shape
    top -= min(top, buffer)
    return top, bottom + min(height - bottom, buffer), left, right + min(width - right, buffer)


def _baseline_map_to_source(geometry, grid_map: np.ndarray) -> np.ndarray:
    """`Geometry.map_to_source` as it ran before: numpy gathers and lerps per axis."""
    m = np.asarray(grid_map, dtype=np.float32)
    for a in (0, 1):
        i0, i1, t, inside = geometry._sample_axis(a, m.shape[-2 + a])
        lo, hi = np.take(m, i0, axis=-2 + a), np.take(m, i1, axis=-2 + a)
        shape = [1] * m.ndim
        shape[-2 + a] = -1
        m = np.where(inside.reshape(shape), lo + (hi - lo) * t.reshape(shape), np.float32(0))
    return m.astype(np.float32)


def _baseline_allconv(image: Mammogram, rows: int, cols: int) -> np.ndarray:
    """All-conv preprocessing as it ran before: numpy stretch and rounding around torch's
    bicubic resize."""
    x = np.asarray(image.pixels, dtype=np.float64) * (65535.0 / (2**image.bits_stored - 1))
    x = np.clip(np.rint(x), 0, 65535).astype(np.float32)
    t = F.interpolate(torch.from_numpy(x)[None, None], size=(rows, cols), mode="bicubic")
    x = np.clip(np.rint(t[0, 0].numpy()), 0, 65535).astype(np.float32)
    return (x * np.float32(0.003891)) - np.float32(52.18)


def stage_rows(
    exam: list[Mammogram],
    sources: list,
    members: list[MemberSpec],
    repeats: int,
    forwards: bool = True,
) -> list[Stage]:
    """Per-stage seconds for one exam through `members` on the CPU, fp32. Without `forwards`
    only the stages around the forward passes (their cost does not depend on the weights)."""
    from models.gmic.preprocess import PreprocessSpec, find_tissue
    from plugin.outputs.sc import build_sc
    from plugin.outputs.seg import build_seg

    ensemble = Ensemble(EnsembleSpec(tuple(members), device="cpu"))
    cpu = torch.device("cpu")
    rows: list[Stage] = []
    first = None
    for m in ensemble._members:
        spec, family, name = m.card.preprocessing, m.family, m.card.name
        seconds, prepared = _seconds(
            lambda f=family, s=spec: [f.preprocess_on(img, s, cpu) for img in exam], repeats
        )
        first = first or (m, prepared)
        baseline = None
        if m.card.family == "allconv":
            size = spec["target_size"]
            baseline = _seconds(lambda s=size: [_baseline_allconv(i, *s) for i in exam], repeats)[0]
        rows.append(Stage(f"{name}: preprocess, {len(exam)} images", seconds, baseline))
        if m.card.family == "gmic":
            ps = PreprocessSpec.from_dict(spec)
            pixels = [np.ascontiguousarray(img.pixels, dtype=np.float32) for img in exam]
            seconds, boxes = _seconds(
                lambda ps=ps, pixels=pixels: [
                    find_tissue(torch.from_numpy(p), ps, False) for p in pixels
                ],
                repeats,
            )
            baseline, old = _seconds(
                lambda ps=ps, pixels=pixels: [
                    _baseline_crop_stage(p, ps.crop_iterations, ps.crop_buffer) for p in pixels
                ],
                repeats,
            )
            if old != [(b.top, b.bottom, b.left, b.right) for b in boxes]:
                raise AssertionError(f"crop stage differs from the baseline: {old} vs {boxes}")
            rows.append(Stage(f"{name}:   of it, the crop stage", seconds, baseline))
        if forwards:
            batch = torch.stack([p.tensor for p in prepared] * len(m.flips))
            with torch.inference_mode():
                seconds = _seconds(lambda mod=m.module, x=batch: mod(x), repeats)[0]
            rows.append(Stage(f"{name}: forward passes, {len(batch)} images", seconds))

    member, prepared = first  # GMIC in both plans: its saliency grid, two maps per image
    maps = torch.rand(len(prepared), 2, *member.module.config.cam_size)
    pairs = [(p.geometry, maps[i]) for i, p in enumerate(prepared)]
    seconds, new = _seconds(lambda: [g.map_to_source(m) for g, m in pairs], repeats)
    baseline, old = _seconds(
        lambda: [_baseline_map_to_source(g, m.numpy()) for g, m in pairs], repeats
    )
    worst = max(float(np.abs(a.numpy() - b).max()) for a, b in zip(new, old, strict=True))
    if worst > 1e-5:
        raise AssertionError(f"map_to_source differs from the baseline by {worst}")
    rows.append(Stage(f"map onto the source grid, {len(exam)} images x 2 maps", seconds, baseline))

    if not forwards:
        return rows
    seconds, prediction = _seconds(lambda: ensemble.predict_exam(exam), repeats)
    rows.append(Stage("Ensemble.predict_exam, whole exam", seconds))
    img, source = prediction.images[0], sources[0]
    seg = _seconds(lambda: build_seg(prediction, img, source), repeats)[0]
    sc = _seconds(lambda: build_sc(prediction, img, source), repeats)[0]
    rows.append(Stage("SEG, one image", seg))
    rows.append(Stage("SC heat-map, one image", sc))
    rows.append(Stage("SEG + SC, one image", seg + sc))
    return rows


def print_stages(title: str, rows: list[Stage]) -> None:
    print(f"\n{title}")
    header = f"{'stage (CPU seconds, one thread)':52} {'s':>7} {'before s':>9} {'x faster':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        before = "" if r.baseline is None else f"{r.baseline:9.3f} {r.baseline / r.seconds:9.2f}"
        print(f"{r.what:52} {r.seconds:7.3f} {before}")


def run_stages(args: argparse.Namespace, rows: int, cols: int) -> None:
    torch.set_num_threads(args.threads)
    synth = synth_exam(0, rows=rows, cols=cols, malignant=True)
    exam = [read_mammogram(image.dataset) for image in synth.images]
    sources = [image.dataset for image in synth.images]
    print(
        f"machine: {os.cpu_count()} cores, torch threads {args.threads}; torch "
        f"{torch.__version__}; source images {rows}x{cols}; median of {args.repeats}"
    )
    demo = [
        MemberSpec(DEMO_WEIGHTS / "demo-gmic.safetensors", ("none", "vflip")),
        MemberSpec(DEMO_WEIGHTS / "demo-allconv.safetensors", ("none", "hflip")),
    ]
    print_stages(
        "demo GMIC + all-conv (the ensemble these stages were first measured on), CPU fp32",
        stage_rows(exam, sources, demo, args.repeats),
    )
    with tempfile.TemporaryDirectory() as tmp:
        published = [
            MemberSpec(write_model(Path(tmp), "gmic", args.gmic_preset), ("none", "vflip")),
            MemberSpec(write_model(Path(tmp), "allconv", args.allconv_preset), ALL_FLIPS),
        ]  # forward passes at full size: the main table (minutes per exam on a CPU)
        print_stages(
            f"published architectures (gmic {args.gmic_preset} x2, allconv "
            f"{args.allconv_preset} x4; random weights), CPU fp32",
            stage_rows(exam, sources, published, args.repeats, forwards=False),
        )


def main(argv: list[str] | None = None) -> int:
    # Everything on the thread the ensemble uses: stages timed beside it share its OpenMP team.
    return on_compute_thread(_main, argv)


def _main(argv: list[str] | None) -> int:
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
    parser.add_argument("--stages", action="store_true", help="per-stage CPU timings instead")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for --stages")
    args = parser.parse_args(argv)

    rows, cols = (int(v) for v in args.image_size.split("x"))
    if args.stages:
        run_stages(args, rows, cols)
        return 0
    exam = synthetic_exam(rows, cols)
    with tempfile.TemporaryDirectory() as tmp:
        gmic = write_model(Path(tmp), "gmic", args.gmic_preset)
        allconv = write_model(Path(tmp), "allconv", args.allconv_preset)
        glimpsenets = {p: write_model(Path(tmp), "glimpsenet", p) for p in args.glimpsenet_presets}
        plans = [
            ("GMIC, 1 pass", [MemberSpec(gmic)]),
            ("GMIC, vflip TTA", [MemberSpec(gmic, ("none", "vflip"))]),
            ("all-conv, 1 pass", [MemberSpec(allconv)]),
            ("all-conv, 4-flip TTA", [MemberSpec(allconv, ALL_FLIPS)]),
            (
                "ensemble (GMIC x2 + all-conv x4)",
                [MemberSpec(gmic, ("none", "vflip")), MemberSpec(allconv, ALL_FLIPS)],
            ),
        ]
        for preset, path in glimpsenets.items():
            plans.append((f"GlimpseNet {preset}, 1 pass", [MemberSpec(path)]))
        if "paper" in glimpsenets:
            plans.append(
                (
                    "ensemble + GlimpseNet paper x2",
                    [
                        MemberSpec(gmic, ("none", "vflip")),
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
