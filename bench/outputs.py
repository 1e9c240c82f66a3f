"""Result-object benchmark: the fractional SEG and the SC heat-map of one 3328×2560 mammogram
on one core, per step, against the implementation of a baseline commit measured in the same
run (issue 10 item 4: SEG + SC ≤ 0.25 s).

    nice -n 10 python bench/outputs.py [--repeats 7] [--baseline 0251ad4] [--rows 3328 --cols 2560]

The source is a synthetic 12-bit MG image; the maps are what the ensemble hands over: a coarse
saliency grid (a few blobs over the breast, low values elsewhere in it, 0 in the air) upsampled
bilinearly to the source grid, as uint8 levels (`heatmap.levels`) and, for comparison, as
float32. Each figure is the median of `--repeats` runs after one warm-up. Steps: our own work
(map levels, windowing, overlay, label), the codecs alone (CharLS JPEG-LS per SEG frame and
Pillow's JPEG at highdicom's quality 95, called as highdicom calls them), and highdicom's
construction as the rest of each object's total. The labelmap SEG is timed too (outside the
target). The baseline's seg.py, sc.py, heatmap.py and common.py come from `git show` of the
baseline commit into a temporary package; it is fed float maps, the interface it had.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy and torch load their thread pools

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.results import ExamPrediction, ImagePrediction  # noqa: E402
from plugin.outputs import heatmap, labelmap, sc, seg  # noqa: E402
from tests.support.outputs_samples import exam_prediction, model_info  # noqa: E402
from trainer.synth import synth_exam  # noqa: E402

TARGET_S = 0.25
BASELINE = "0251ad4"
"""The last commit before the maps became uint8 levels and the objects were sped up."""
BASELINE_FILES = ("common.py", "heatmap.py", "seg.py", "sc.py")
GRID = 64
"""Source pixels per saliency cell (GMIC's saliency map is 1/64 of its input per side)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3328)
    parser.add_argument("--cols", type=int, default=2560)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--baseline", default=BASELINE, help="commit of the baseline code")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    exam, img, source = sample(args.rows, args.cols)
    levels = replace(
        img,
        malignant_map=heatmap.levels(img.malignant_map),
        benign_map=heatmap.levels(img.benign_map),
    )
    print(
        f"one {args.rows}x{args.cols} image, one thread, median of {args.repeats}; "
        f"{source.file_meta.TransferSyntaxUID.name} source; "
        f"{(levels.malignant_map > 0).mean():.0%} of the map above 0, "
        f"{heatmap.is_shown(levels.malignant_map, 0.5).mean():.1%} coloured"
    )
    time_ = Timer(args.repeats)
    rows: list[tuple[str, Figure | None, Figure | None]] = []

    old = baseline(args.baseline)
    grey = sc.display_image(source)
    threshold = heatmap.display_threshold(exam, seg.DEFAULT_OPTIONS)
    rgb = sc.render(exam, levels, grey, threshold)

    # SEG
    new_seg = time_(lambda: seg.build_seg(exam, levels, source))
    new_seg_float = time_(lambda: seg.build_seg(exam, img, source))
    old_seg = time_(lambda: old.seg.build_seg(exam, img, source)) if old else None
    planes = [heatmap.levels(levels.malignant_map), heatmap.levels(levels.benign_map)]
    seg_codec = time_(lambda: [jpeg_ls(p) for p in planes])
    rows += [
        ("SEG: CharLS JPEG-LS, 2 frames", seg_codec, seg_codec),
        ("SEG: total, uint8 levels in", old_seg, new_seg),
        ("SEG: total, float maps in", old_seg, new_seg_float),
    ]

    # SC
    display = time_(lambda: sc.display_image(source))
    old_display = time_(lambda: old.sc.display_image(source)) if old else None
    render = time_(lambda: sc.render(exam, levels, grey, threshold))
    old_render = time_(lambda: old.sc.render(exam, img, grey, threshold)) if old else None
    overlay = time_(lambda: heatmap.overlay(grey, levels.malignant_map, threshold))
    old_overlay = (
        time_(lambda: old.heatmap.overlay(grey, img.malignant_map, threshold)) if old else None
    )
    sc_codec = time_(lambda: pillow_jpeg(rgb))
    new_sc = time_(lambda: sc.build_sc(exam, levels, source))
    new_sc_float = time_(lambda: sc.build_sc(exam, img, source))
    old_sc = time_(lambda: old.sc.build_sc(exam, img, source)) if old else None
    rows += [
        ("SC: display_image (decode, window)", old_display, display),
        ("SC: render (overlay, outline, label)", old_render, render),
        ("SC:   of which overlay", old_overlay, overlay),
        ("SC: Pillow JPEG q95 (highdicom's call)", sc_codec, sc_codec),
        (
            "SC: highdicom SCImage, rest",
            minus(old_sc, old_display, old_render, sc_codec),
            minus(new_sc, display, render, sc_codec),
        ),  # fmt: skip
        ("SC: total, uint8 levels in", old_sc, new_sc),
        ("SC: total, float map in", old_sc, new_sc_float),
    ]
    rows.insert(
        1,
        ("SEG: highdicom + ours, rest", minus(old_seg, seg_codec), minus(new_seg, seg_codec)),
    )

    labelmap_s = time_(lambda: labelmap.build_labelmap_seg(exam, levels, source))
    both = time_(lambda: (seg.build_seg(exam, levels, source), sc.build_sc(exam, levels, source)))
    old_both = (
        time_(lambda: (old.seg.build_seg(exam, img, source), old.sc.build_sc(exam, img, source)))
        if old
        else None
    )
    rows += [
        ("labelmap SEG (not in the target)", None, labelmap_s),
        ("SEG + SC, one image", old_both, both),
    ]
    report(rows, args.baseline if old else None)
    verdict = "meets" if both.cpu <= TARGET_S else "misses"
    print(
        f"\nSEG + SC, one image: {both.cpu:.3f} s CPU ({both.wall:.3f} s wall) on one thread: "
        f"{verdict} the {TARGET_S} s target"
    )
    if old_both is not None:
        print(f"baseline {args.baseline}: {old_both.cpu:.3f} s CPU, {old_both.cpu / both.cpu:.2f}x")
    return 0


@dataclass(frozen=True)
class Figure:
    """Median seconds of one call: wall clock, and the process's CPU time (one thread, so
    the one-core cost even when other jobs share the machine)."""

    wall: float
    cpu: float

    def __sub__(self, other: Figure) -> Figure:
        return Figure(self.wall - other.wall, self.cpu - other.cpu)


class Timer:
    """Median wall and CPU time of `repeats` calls after one warm-up."""

    def __init__(self, repeats: int):
        self.repeats = repeats

    def __call__(self, run: Callable[[], object]) -> Figure:
        run()
        walls, cpus = [], []
        for _ in range(self.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            cpus.append(time.process_time() - cpu)
            walls.append(time.perf_counter() - wall)
        return Figure(statistics.median(walls), statistics.median(cpus))


def minus(total: Figure | None, *parts: Figure | None) -> Figure | None:
    if total is None or any(p is None for p in parts):
        return None
    for part in parts:
        total = total - part
    return total


def report(rows: list[tuple[str, Figure | None, Figure | None]], base: str | None) -> None:
    name = f"baseline {base}" if base else "baseline"
    header = f"{'':42} {name:>17} {'now':>17} {'ratio':>6}"
    print(header)
    print(f"{'step':42} {'wall':>8} {'cpu':>8} {'wall':>8} {'cpu':>8} {'(cpu)':>6}")
    print("-" * len(header))
    for what, before, now in rows:
        b = f"{before.wall:8.3f} {before.cpu:8.3f}" if before is not None else f"{'-':>17}"
        n = f"{now.wall:8.3f} {now.cpu:8.3f}" if now is not None else f"{'-':>17}"
        ratio = f"{before.cpu / now.cpu:5.2f}x" if before is not None and now else ""
        print(f"{what:42} {b} {n} {ratio:>6}")


# -- the sample ---------------------------------------------------------------------------------


def sample(rows: int, cols: int) -> tuple[ExamPrediction, ImagePrediction, object]:
    """A synthetic MG image and an ensemble-like prediction for it (float32 maps)."""
    synth = synth_exam(7, rows=rows, cols=cols, malignant=True)
    image = next(i for i in synth.images if i.malignant)
    source = image.dataset
    breast = sc.display_image(source) > 12
    rng = np.random.default_rng(7)
    malignant = saliency(breast, rng, peaks=(0.85, 0.45, 0.25))
    benign = saliency(breast, rng, peaks=(0.35, 0.2))
    info = model_info(operating_point=0.5)
    prediction = ImagePrediction(
        sop_instance_uid=str(source.SOPInstanceUID),
        laterality=image.laterality,
        view=image.view,
        malignant=0.85,
        benign=0.35,
        per_model={info.name: 0.85},
        malignant_map=malignant,
        benign_map=benign,
        rois=(),
    )
    exam = exam_prediction(synth.study_instance_uid, [prediction], (info,))
    return exam, prediction, source


def saliency(breast: np.ndarray, rng: np.random.Generator, peaks: tuple[float, ...]) -> np.ndarray:
    """(rows, cols) float32: Gaussian blobs on a coarse grid inside the breast, 1–4 % noise
    elsewhere in it, 0 in the air, upsampled bilinearly like `Geometry.map_to_source`."""
    rows, cols = breast.shape
    coarse_shape = (-(-rows // GRID), -(-cols // GRID))
    inside = breast[GRID // 2 :: GRID, GRID // 2 :: GRID]
    inside = np.pad(inside, [(0, s - n) for s, n in zip(coarse_shape, inside.shape, strict=True)])
    coarse = rng.uniform(0.01, 0.04, coarse_shape) * inside
    cells = np.argwhere(inside)
    r, c = np.mgrid[0 : coarse_shape[0], 0 : coarse_shape[1]]
    for peak in peaks:
        cr, cc = cells[rng.integers(len(cells))]
        sigma = rng.uniform(1.0, 2.5)
        coarse += peak * np.exp(-((r - cr) ** 2 + (c - cc) ** 2) / (2 * sigma**2)) * inside
    grid = torch.from_numpy(np.clip(coarse, 0, 1).astype(np.float32))[None, None]
    fine = torch.nn.functional.interpolate(
        grid, size=(coarse_shape[0] * GRID, coarse_shape[1] * GRID), mode="bilinear"
    )
    return np.ascontiguousarray(fine[0, 0, :rows, :cols].numpy())


# -- codecs, called as highdicom calls them ----------------------------------------------------


def jpeg_ls(plane: np.ndarray) -> bytes:
    from pydicom.pixels import get_encoder
    from pydicom.uid import JPEGLSLossless

    return get_encoder(JPEGLSLossless).encode(
        plane,
        rows=plane.shape[0],
        columns=plane.shape[1],
        samples_per_pixel=1,
        number_of_frames=1,
        bits_allocated=8,
        bits_stored=8,
        photometric_interpretation="MONOCHROME2",
        pixel_representation=0,
    )


def pillow_jpeg(rgb: np.ndarray) -> bytes:
    with io.BytesIO() as buffer:
        Image.fromarray(rgb, mode="RGB").save(buffer, format="jpeg", quality=95)
        return buffer.getvalue()


# -- the baseline -------------------------------------------------------------------------------


class Baseline:
    def __init__(self, package: str):
        self.seg = importlib.import_module(f"{package}.seg")
        self.sc = importlib.import_module(f"{package}.sc")
        self.heatmap = importlib.import_module(f"{package}.heatmap")


def baseline(commit: str) -> Baseline | None:
    """The baseline commit's plugin/outputs modules as package `plugin.bench_baseline_outputs`
    (so their relative imports resolve), or None with a note when git cannot give them."""
    folder = Path(tempfile.mkdtemp(prefix="bench-outputs-"))
    for name in BASELINE_FILES:
        show = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{commit}:plugin/outputs/{name}"],
            capture_output=True,
            text=True,
        )
        if show.returncode != 0:
            print(f"(no baseline: git show {commit}:plugin/outputs/{name} failed; a full clone?)")
            return None
        (folder / name).write_text(show.stdout)
    (folder / "__init__.py").write_text("")
    package = "plugin.bench_baseline_outputs"
    spec = importlib.util.spec_from_file_location(
        package, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    try:
        return Baseline(package)
    except (ImportError, AttributeError) as error:
        print(f"(no baseline: {commit}'s outputs no longer import against this tree: {error})")
        return None


if __name__ == "__main__":
    sys.exit(main())
