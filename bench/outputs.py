"""Result-object benchmark: the fractional SEG and the SC heat-map of one 3328×2560 mammogram
on one thread, step by step, against the plugin/outputs code of a baseline commit measured in
the same run (issue 10 item 4: SEG + SC ≤ 0.25 s on one core).

    nice -n 10 python bench/outputs.py [--repeats 7] [--baseline 0251ad4] [--rows 3328 --cols 2560]

The source is a synthetic 12-bit MG image; the maps are what the ensemble hands over: a coarse
saliency grid (a few blobs over the breast, 1–4 % elsewhere in it, 0 in the air) upsampled
bilinearly to the source grid, as uint8 levels, with a GMIC-like ROI on the top blob. Every
figure is the median over `--repeats` rounds, all steps run round-robin after a warm-up round;
"cpu" is the process's CPU time, the one-core cost even when other jobs share the machine
("wall" is also what they leave over). Steps: our own work (windowing, overlay, label), the
codecs alone (CharLS JPEG-LS per SEG frame, libjpeg-turbo's JPEG at highdicom's quality 95,
both through imagecodecs as the objects use them, and for comparison the same JPEG by Pillow as
highdicom would encode it), and the rest of each object's total (highdicom's construction,
pydicom).
The labelmap SEG is timed too (outside the target), and the SC of a JPEG 2000 source as the
output process gets it: pickled, so pydicom's pixel cache (keyed by object ids) is gone and the
source is decoded a second time (the unpickling itself not counted). The baseline's plugin/outputs
modules come from `git show` of the baseline commit into a temporary package (removed at exit),
and get float maps k/255 where that was the interface they had.

Then the exam-level SRs (a four-view exam, GMIC-like ROIs): the Mammography CAD SR and the TID
1500 viewer report built, and both written with pydicom (to memory, no fsync), against the SR
code of `--sr-baseline` measured in the same run; the baseline's documents must be the same
bytes as today's (the creation times highdicom stamps set to one value), which is printed.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy and torch load their thread pools

import argparse  # noqa: E402
import atexit  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType, SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.results import ExamPrediction, ImagePrediction, RegionOfInterest, map_levels  # noqa: E402
from plugin.outputs import heatmap, jpeg, jpegls, labelmap, sc, seg  # noqa: E402
from tests.support.maps import malignant_fields  # noqa: E402
from tests.support.outputs_samples import exam_prediction, model_info, prediction_for  # noqa: E402
from trainer.synth import encode, synth_exam  # noqa: E402

TARGET_S = 0.25
BASELINE = "0251ad4"
"""The last commit before the maps became uint8 levels and the objects were sped up."""
SR_BASELINE = "55b0c36"
"""The last commit before the SRs were built without highdicom's copy of the tree."""
GRID = 64
"""Source pixels per saliency cell (GMIC's saliency map is 1/64 of its input per side)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3328)
    parser.add_argument("--cols", type=int, default=2560)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--baseline", default=BASELINE, help="commit of the baseline code")
    parser.add_argument("--sr-baseline", default=SR_BASELINE, help="commit of the SRs' baseline")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    exam, img, source = sample(args.rows, args.cols)
    maps = img.malignant_map, img.benign_map
    print(
        f"one {args.rows}x{args.cols} image, one thread, median of {args.repeats} rounds; "
        f"{source.file_meta.TransferSyntaxUID.name} source; maps: "
        f"{(maps[0] > 0).mean():.0%} of the pixels above 0, "
        f"{heatmap.is_shown(maps[0], 0.5).mean():.1%} coloured"
    )
    # The output process gets the sources pickled, and pydicom's pixel cache is keyed by
    # object ids: a compressed source is decoded again there.
    j2k = encode(source, "jpeg2000")
    j2k.pixel_array  # noqa: B018 - decoded once, as the decode stage does
    shipped = pickle.dumps(j2k)
    grey = sc.display_image(source)
    threshold = heatmap.display_threshold(exam, seg.DEFAULT_OPTIONS)
    rgb = sc.render(exam, img, grey, threshold)
    now = {
        "seg": lambda: seg.build_seg(exam, img, source),
        "seg codec": lambda: [jpeg_ls(m) for m in maps],
        "display": lambda: sc.display_image(source),
        "render": lambda: sc.render(exam, img, grey, threshold),
        "overlay": lambda: heatmap.overlay(grey, maps[0], threshold),
        "sc codec": lambda: jpeg.encode(rgb),
        "pillow": lambda: pillow_jpeg(rgb),
        "sc": lambda: sc.build_sc(exam, img, source),
        "labelmap": lambda: labelmap.build_labelmap_seg(exam, img, source),
        "unpickle": lambda: pickle.loads(shipped),
        "sc j2k": lambda: sc.build_sc(exam, img, pickle.loads(shipped)),
        "both": lambda: (seg.build_seg(exam, img, source), sc.build_sc(exam, img, source)),
    }
    old = baseline(args.baseline)
    then = {}
    if old is not None:
        # Before the maps became uint8 levels, the builders took floats (`heatmap.levels`).
        floats = float_maps(img) if hasattr(old.heatmap, "levels") else img
        then = {
            "seg": lambda: old.seg.build_seg(exam, floats, source),
            "display": lambda: old.sc.display_image(source),
            "render": lambda: old.sc.render(exam, floats, grey, threshold),
            "overlay": lambda: old.heatmap.overlay(grey, floats.malignant_map, threshold),
            "sc": lambda: old.sc.build_sc(exam, floats, source),
            "both": lambda: (
                old.seg.build_seg(exam, floats, source),
                old.sc.build_sc(exam, floats, source),
            ),
        }
    b, n = measure(then, now, args.repeats)
    for codec in ("seg codec", "sc codec", "pillow"):
        b[codec] = n[codec]
    rows = [
        ("SEG: CharLS JPEG-LS, 2 frames", "seg codec"),
        ("SEG: highdicom and ours, the rest", ("seg", "seg codec")),
        ("SEG: total", "seg"),
        ("SC: display_image (window the source)", "display"),
        ("SC: render (overlay, outline, label)", "render"),
        ("SC:   of which overlay", "overlay"),
        ("SC: JPEG q95, libjpeg-turbo (imagecodecs)", "sc codec"),
        ("SC:   the same by Pillow (highdicom's own)", "pillow"),
        ("SC: highdicom SCImage, the rest", ("sc", "display", "render", "sc codec")),
        ("SC: total", "sc"),
        ("labelmap SEG (HM's; not in the target)", "labelmap"),
        ("SC: J2K source as shipped (decoded again)", ("sc j2k", "unpickle")),
        ("SEG + SC, one image", "both"),
    ]
    report([(what, figure(b, key), figure(n, key)) for what, key in rows], old and args.baseline)
    both = n["both"]
    verdict = "meets" if both.cpu <= TARGET_S else "misses"
    print(
        f"\nSEG + SC, one image: {both.cpu:.3f} s CPU ({both.wall:.3f} s wall) on one thread: "
        f"{verdict} the {TARGET_S} s target"
    )
    codecs = n["seg codec"].cpu + n["sc codec"].cpu
    print(
        f"of which the codecs the objects' transfer syntaxes fix (CharLS for the SEG's frames, "
        f"libjpeg-turbo's JPEG for the SC): {codecs:.3f} s ({codecs / both.cpu:.0%})"
    )
    if old is not None:
        ratio = b["both"].cpu / both.cpu
        print(f"baseline {args.baseline}: {b['both'].cpu:.3f} s CPU; now {ratio:.2f}x faster")
    print()
    sr_rows(args.rows, args.cols, args.repeats, args.sr_baseline)
    return 0


@dataclass(frozen=True)
class Figure:
    """Median seconds of one call: wall clock, and the process's CPU time (one thread, so
    the one-core cost even when other jobs share the machine)."""

    wall: float
    cpu: float

    def __sub__(self, other: Figure) -> Figure:
        return Figure(self.wall - other.wall, self.cpu - other.cpu)


def measure(
    then: dict[str, Callable[[], object]], now: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, Figure], dict[str, Figure]]:
    """Median wall and CPU time of each step, the steps run round-robin (a warm-up round,
    then `repeats`), so a busy spell on a shared machine spreads over all of them."""
    steps = [("then", k, f) for k, f in then.items()] + [("now", k, f) for k, f in now.items()]
    walls: dict[tuple[str, str], list[float]] = {(w, k): [] for w, k, _ in steps}
    cpus: dict[tuple[str, str], list[float]] = {(w, k): [] for w, k, _ in steps}
    for round_ in range(repeats + 1):
        for which, key, run in steps:
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            if round_:
                cpus[which, key].append(time.process_time() - cpu)
                walls[which, key].append(time.perf_counter() - wall)
    out: tuple[dict[str, Figure], dict[str, Figure]] = ({}, {})
    for which, key, _ in steps:
        median = Figure(statistics.median(walls[which, key]), statistics.median(cpus[which, key]))
        out[which == "now"][key] = median
    return out


def figure(figures: dict[str, Figure], key: str | tuple[str, ...]) -> Figure | None:
    """A step's figure, or for (total, part, …) the total less the parts."""
    keys = (key,) if isinstance(key, str) else key
    if any(k not in figures for k in keys):
        return None
    total = figures[keys[0]]
    for part in keys[1:]:
        total = total - figures[part]
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


def float_maps(img: ImagePrediction) -> SimpleNamespace:
    """`img` with float32 maps k/255 (the baseline's interface), as a plain namespace: an
    ImagePrediction takes uint8 levels only."""
    fields = dict(vars(img))
    for name in ("malignant_map", "benign_map"):
        if fields[name] is not None:
            fields[name] = fields[name] / np.float32(255)
    return SimpleNamespace(**fields)


def sample(rows: int, cols: int) -> tuple[ExamPrediction, ImagePrediction, pydicom.Dataset]:
    """A synthetic MG image and an ensemble-like prediction for it: maps as uint8 levels (what
    the ensemble hands over), a GMIC-like ROI on the top blob."""
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
        **malignant_fields(malignant),
        benign_map=map_levels(benign),
        rois=(RegionOfInterest(top_blob(malignant), 0.9, info.name),),
    )
    exam = exam_prediction(synth.study_instance_uid, [prediction], (info,))
    return exam, prediction, source


def top_blob(values: np.ndarray) -> tuple[float, float, float, float]:
    """A GMIC-like ROI: a 256-pixel square (at GMIC's input scale) on the map's peak."""
    r, c = np.unravel_index(int(np.argmax(values)), values.shape)
    half = 128 * values.shape[0] / 2944
    return (r - half, c - half, r + half, c + half)


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


# -- codecs, called as the objects call them -----------------------------------------------------


def jpeg_ls(plane: np.ndarray) -> bytes:
    from pydicom.pixels import get_encoder
    from pydicom.uid import JPEGLSLossless

    return get_encoder(JPEGLSLossless).encode(
        plane,
        encoding_plugin=jpegls.register(),
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
    """What highdicom's `encode_frame` does for JPEG baseline: Pillow, quality 95."""
    with io.BytesIO() as buffer:
        Image.fromarray(rgb, mode="RGB").save(buffer, format="jpeg", quality=95)
        return buffer.getvalue()


# -- the SRs ------------------------------------------------------------------------------------


def sr_rows(rows: int, cols: int, repeats: int, commit: str) -> None:
    """The CAD SR and TID 1500 viewer report of one four-view exam: built, and written, against
    `commit`'s SR code in the same run, and whether its documents are the same bytes."""
    from plugin.outputs import cad_sr, tid1500

    synth = synth_exam(7, rows=rows, cols=cols, malignant=True)
    exam, sources = prediction_for(synth, rois=True)
    now_docs = [cad_sr.build_cad_sr(exam, sources), tid1500.build_tid1500(exam, sources)]
    now = {
        "cad": lambda: cad_sr.build_cad_sr(exam, sources),
        "tid": lambda: tid1500.build_tid1500(exam, sources),
        "write": lambda: [written(d) for d in now_docs],
    }
    then = {}
    package = load_outputs(commit, "plugin.bench_baseline_srs")
    if package is not None:
        old_cad = importlib.import_module(f"{package}.cad_sr")
        old_tid = importlib.import_module(f"{package}.tid1500")
        then_docs = [old_cad.build_cad_sr(exam, sources), old_tid.build_tid1500(exam, sources)]
        then = {
            "cad": lambda: old_cad.build_cad_sr(exam, sources),
            "tid": lambda: old_tid.build_tid1500(exam, sources),
            "write": lambda: [written(d) for d in then_docs],
        }
    print(f"the exam-level SRs of one four-view {rows}x{cols} exam, median of {repeats} rounds")
    b, n = measure(then, now, repeats)
    for figures in (b, n) if then else (n,):
        cad, tid = figures["cad"], figures["tid"]
        figures["both"] = Figure(cad.wall + tid.wall, cad.cpu + tid.cpu)
    steps = [
        ("CAD SR: build", "cad"),
        ("TID 1500 viewer report: build", "tid"),
        ("CAD SR + TID 1500: build", "both"),
        ("CAD SR + TID 1500: write (pydicom, memory)", "write"),
    ]
    report([(what, b.get(key), n[key]) for what, key in steps], commit if then else None)
    if then:
        same = [written(d) for d in then_docs] == [written(d) for d in now_docs]
        print(f"same documents as {commit}, byte for byte: {'yes' if same else 'NO'}")


def written(ds: pydicom.Dataset) -> bytes:
    """`ds` as a file, the creation times highdicom stamps (now) set to one value."""
    for keyword in ("InstanceCreation", "Content"):
        setattr(ds, f"{keyword}Date", "20260101")
        setattr(ds, f"{keyword}Time", "120000")
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = "20260101120000"
    with io.BytesIO() as buffer:
        ds.save_as(buffer, enforce_file_format=True)
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
    package = load_outputs(commit, "plugin.bench_baseline_outputs")
    if package is None:
        return None
    try:
        return Baseline(package)
    except (ImportError, AttributeError) as error:
        print(f"(no baseline: {commit}'s outputs no longer import against this tree: {error})")
        return None


def load_outputs(commit: str, package: str) -> str | None:
    """The commit's plugin/outputs modules as `package` (their relative imports resolve among
    them), or None with a note when git cannot give them or they no longer import."""
    listing = subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "--name-only", commit, "plugin/outputs/"],
        capture_output=True,
        text=True,
    )
    names = [Path(p).name for p in listing.stdout.split() if p.endswith(".py")]
    if listing.returncode != 0 or not names:
        print(f"(no baseline: git ls-tree {commit} plugin/outputs/ failed; a full clone?)")
        return None
    folder = Path(tempfile.mkdtemp(prefix="bench-outputs-"))
    atexit.register(shutil.rmtree, folder, True)
    for name in names:
        show = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{commit}:plugin/outputs/{name}"],
            capture_output=True,
            text=True,
        )
        if show.returncode != 0:
            print(f"(no baseline: git show {commit}:plugin/outputs/{name} failed)")
            return None
        (folder / name).write_text(show.stdout)
    (folder / "__init__.py").write_text("")  # the modules are imported as they are needed
    spec = importlib.util.spec_from_file_location(
        package, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    try:
        spec.loader.exec_module(module)
    except (ImportError, AttributeError) as error:
        print(f"(no baseline: {commit}'s outputs no longer import against this tree: {error})")
        return None
    return package


if __name__ == "__main__":
    sys.exit(main())
