"""The ensemble: configured member models, each with its flip set for test-time augmentation,
scoring (possibly partial) four-view exams, one or many at a time.

Per image, each member's probabilities are averaged over its flips (saliency maps are flipped
back first), then averaged over members on the source grid. A breast scores the mean of its CC
and MLO images (or the one present); the exam scores the max over breasts.

Everything between the decoded pixels and the finished maps runs in torch on the ensemble's
device: preprocessing, flips, forward passes batched across exams, flip-back, averaging and
the mapping onto each source grid, and the maps' quantisation to 8-bit levels (with their
peak found in fp32 first); only uint8 maps on the source grid, peaks, boxes and scores come
back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .aggregation import breast_score, exam_score
from .compute_thread import on_compute_thread
from .family import ModelFamily, Prepared, ScoreMaps, get_family
from .geometry import Geometry
from .mammogram import SCREENING_VIEW_KEYS, Laterality, Mammogram, View
from .modelfile import ModelCard, file_sha256, load_model, read_card
from .numerics import PRECISIONS, autocast, fp32_guard, to_levels_
from .results import (
    BreastPrediction,
    ExamPrediction,
    ImagePrediction,
    ModelInfo,
    RegionOfInterest,
)

FLIPS: dict[str, tuple[int, ...]] = {
    "none": (),
    "hflip": (-1,),
    "vflip": (-2,),
    "hvflip": (-2, -1),
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberSpec:
    """One member: its model file and the flips it sees each image under (test-time
    augmentation); "none" is the image as preprocessed."""

    path: Path
    flips: tuple[str, ...] = ("none",)

    def __post_init__(self) -> None:
        unknown = [f for f in self.flips if f not in FLIPS]
        if unknown or not self.flips:
            raise ValueError(
                f"ensemble member {self.path}: flips must be a non-empty subset of "
                f"{sorted(FLIPS)}, got {list(self.flips)}"
            )
        if len(set(self.flips)) != len(self.flips):
            raise ValueError(f"ensemble member {self.path}: repeated flip in {list(self.flips)}")


@dataclass(frozen=True)
class EnsembleSpec:
    members: tuple[MemberSpec, ...]
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda" or "cuda:N"."""
    precision: str = "fp32"
    """"fp32" (IEEE fp32 on every device: TF32 off on CUDA), "tf32" (CUDA matmuls and
    convolutions in TF32), or autocast to "bf16" (CPU or GPU) or "fp16" (GPU only). Discrete
    choices (GMIC's crops) are made in fp32 whatever the precision."""
    max_batch: int = 8
    """Images (views × flips, across exams) per forward pass; lower it when memory is short."""
    channels_last: bool = False
    """Run the models in channels-last memory format (faster convolutions on recent GPUs)."""
    compile: bool = False
    """`torch.compile` each member; where compiling fails (no C++ compiler on the host, an
    unsupported platform, an operator the compiler rejects) that member runs eagerly, with
    the same scores, and one warning per member says why."""

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("an ensemble needs at least one member model")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}"
            )
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")


def resolve_device(name: str) -> torch.device:
    """The torch device for an `EnsembleSpec.device`; a GPU that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} was configured but no CUDA GPU is available; use 'auto' or 'cpu'"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device {name!r} was configured but this machine has {count} CUDA GPU(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    return device


@dataclass
class _Member:
    module: nn.Module
    card: ModelCard
    family: ModelFamily
    flips: tuple[str, ...]
    sha256: str
    """Of the model file: names this exact model in the result objects (IHE AIR Device UID)."""
    compiled: Callable[[torch.Tensor], Any] | None = None
    """`torch.compile(module)` when the spec asks for it, until it fails once."""

    def compile(self) -> None:
        """Ask for the compiled forward; torch compiles on the first call (see `run`)."""
        try:
            self.compiled = torch.compile(self.module)
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
            self._fall_back(exc)

    def run(self, x: torch.Tensor) -> Any:
        """The forward pass: compiled when asked and possible, else eager."""
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                self._fall_back(exc)
        return self.module(x)

    def _fall_back(self, exc: Exception) -> None:
        self.compiled = None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.warning(
            "torch.compile failed for model %r (%s: %s); running it eagerly",
            self.card.name,
            type(exc).__name__,
            reason,
        )


@dataclass
class _MemberImage:
    """One member's flip-averaged view of one image: scores and boxes on the source grid, maps
    still on the model's grid (`_source_levels` takes them onto the source)."""

    malignant: float
    benign: float | None
    maps: torch.Tensor
    """(2, h, w) benign and malignant map, or (1, h, w) malignant only, fp32."""
    geometry: Geometry
    rois: list[RegionOfInterest]


class Ensemble:
    """Loads every member's model file once; `predict_exams` / `predict_exam` then score exams.

    Deterministic for a given device and precision. While it runs on CUDA, cuDNN autotuning is
    off, deterministic kernels on, and TF32 off unless the precision is "tf32"; the process's
    settings are restored afterwards. It loads and scores on the process's compute thread
    (`models.compute_thread`), whichever thread calls it.
    """

    def __init__(self, spec: EnsembleSpec) -> None:
        on_compute_thread(self._load, spec)

    def _load(self, spec: EnsembleSpec) -> None:
        self.spec = spec
        self.device = resolve_device(spec.device)
        if spec.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
        if self.device.type == "cuda":
            if spec.precision == "bf16" and not torch.cuda.is_bf16_supported():
                gpu = torch.cuda.get_device_name(self.device)
                raise ValueError(f"precision bf16 is not supported by {gpu}; use fp16 or fp32")
        self._members: list[_Member] = []
        for m in spec.members:
            module = load_model(m.path, device=self.device)
            if spec.channels_last:
                module = module.to(memory_format=torch.channels_last)
            card: ModelCard = module.card
            family = get_family(card.family)
            check_flips(m, card)
            member = _Member(module, card, family, m.flips, file_sha256(Path(m.path)))
            if spec.compile:
                member.compile()
            self._members.append(member)
        names = [m.card.name for m in self._members]
        if len(set(names)) != len(names):
            raise ValueError(
                f"ensemble members must have distinct model names, got {names}; drop the "
                "duplicate or give each model its own name (`--name` of `plugin models import` "
                "or `trainer finetune`)"
            )

    @property
    def models(self) -> tuple[ModelInfo, ...]:
        return tuple(replace(m.card.info(), file_sha256=m.sha256) for m in self._members)

    @property
    def max_batch(self) -> int:
        """Images (views × flips) per forward pass, across exams."""
        return self.spec.max_batch

    def predict_exam(self, images: Sequence[Mammogram]) -> ExamPrediction:
        """Score 1–4 images of one study: at most one per (laterality, view)."""
        return self.predict_exams([images])[0]

    def predict_exams(self, exams: Sequence[Sequence[Mammogram]]) -> list[ExamPrediction]:
        """Score several exams; results in input order, each as `predict_exam` gives it.

        The forward passes of all their images × flips run in batches of `max_batch` that
        cross exam boundaries; preprocessing, flip-back, averaging and the mapping onto each
        source grid run on the ensemble's device, so only uint8 maps, their peaks, boxes and
        scores leave it. The work runs on the process's compute thread
        (`models.compute_thread`).
        """
        return on_compute_thread(self._predict_exams, exams)

    def _predict_exams(self, exams: Sequence[Sequence[Mammogram]]) -> list[ExamPrediction]:
        exams = [list(images) for images in exams]
        for images in exams:
            _check_exam(images)
        images = [img for exam in exams for img in exam]
        if not images:
            return []
        with fp32_guard(self.device, tf32=False), torch.inference_mode():
            passes = self._forward_all(images)
            predictions = [self._image_prediction(i, img, passes) for i, img in enumerate(images)]
        results, start = [], 0
        for exam in exams:
            results.append(self._exam_prediction(exam, predictions[start : start + len(exam)]))
            start += len(exam)
        return results

    def _exam_prediction(
        self, images: list[Mammogram], image_preds: list[ImagePrediction]
    ) -> ExamPrediction:
        breasts = tuple(
            _breast(lat, image_preds)
            for lat in (Laterality.RIGHT, Laterality.LEFT)
            if any(p.laterality == lat for p in image_preds)
        )
        present = {p.view_key for p in image_preds}
        benigns = [b.benign for b in breasts if b.benign is not None]
        return ExamPrediction(
            study_instance_uid=images[0].study_instance_uid,
            images=tuple(image_preds),
            breasts=breasts,
            malignant=exam_score(b.malignant for b in breasts),
            benign=exam_score(benigns) if benigns else None,
            missing_views=tuple(v for v in SCREENING_VIEW_KEYS if v not in present),
            models=self.models,
            precision=self.spec.precision,
        )

    # -- forward passes ----------------------------------------------------------------------

    def _forward_all(self, images: list[Mammogram]) -> list[_MemberPasses]:
        """Every member's passes over every image × flip, in batches of at most `max_batch`.

        Members with the same family and preprocessing (e.g. the five published GMIC models)
        share one preprocessing run. Images are prepared a group at a time, so the inputs held
        at once stay near one batch whatever the number of exams.
        """
        passes = [_MemberPasses(member, [None] * len(images)) for member in self._members]
        groups: dict[str, list[_MemberPasses]] = {}
        for mp in passes:
            key = json.dumps([mp.member.card.family, mp.member.card.preprocessing], sort_keys=True)
            groups.setdefault(key, []).append(mp)
        for group in groups.values():
            lead = group[0].member
            per_group = max(1, self.spec.max_batch // max(len(mp.member.flips) for mp in group))
            for first in range(0, len(images), per_group):
                indices = range(first, min(first + per_group, len(images)))
                prepared = {
                    i: _prepare(lead.family, images[i], lead.card.preprocessing, self.device)
                    for i in indices
                }
                for mp in group:
                    self._run_member(mp, prepared)
        return passes

    def _run_member(self, mp: _MemberPasses, prepared: dict[int, Prepared]) -> None:
        member = mp.member
        items = [(i, flip) for i in prepared for flip in member.flips]
        for start in range(0, len(items), self.spec.max_batch):
            chunk = items[start : start + self.spec.max_batch]
            x = torch.stack([_flip(prepared[i].tensor, flip) for i, flip in chunk])
            out = member.family.score_maps(self._forward(member, x))
            scores = (
                (out.malignant, out.maps)
                if out.benign is None
                else (out.malignant, out.benign, out.maps)
            )
            if not all(torch.isfinite(t).all() for t in scores):
                raise RuntimeError(
                    f"model {member.card.name!r} gave NaN or infinite scores at precision "
                    f"{self.spec.precision}; use fp32, and if that fails too the model file is "
                    "faulty"
                )
            for k, (i, flip) in enumerate(chunk):
                if mp.images[i] is None:
                    mp.images[i] = _ImagePasses(prepared[i].geometry, prepared[i].tensor.shape)
                mp.images[i].add(flip, out, k)

    def _forward(self, member: _Member, x: torch.Tensor):
        if self.spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # TF32 (when asked) for the forwards only: the mapping onto the source grid stays fp32.
        with (
            fp32_guard(self.device, tf32=self.spec.precision == "tf32"),
            autocast(self.device, self.spec.precision),
        ):
            return member.run(x)

    # -- post-processing, on the device ------------------------------------------------------

    def _image_prediction(
        self, i: int, img: Mammogram, passes: list[_MemberPasses]
    ) -> ImagePrediction:
        parts = [_member_image(mp.member, mp.images[i]) for mp in passes]
        benign_parts = [p for p in parts if p.benign is not None]
        rois = sorted((r for p in parts for r in p.rois), key=lambda r: -r.weight)
        malignant_map, benign_map, peak = _source_levels(parts, img.shape, self.device)
        return ImagePrediction(
            sop_instance_uid=img.sop_instance_uid,
            laterality=img.laterality,
            view=img.view,
            malignant=float(np.mean([p.malignant for p in parts])),
            benign=float(np.mean([p.benign for p in benign_parts])) if benign_parts else None,
            per_model={m.card.name: p.malignant for m, p in zip(self._members, parts, strict=True)},
            malignant_map=malignant_map.cpu().numpy(),
            benign_map=None if benign_map is None else benign_map.cpu().numpy(),
            rois=tuple(rois),
            malignant_peak=peak,
        )


@dataclass
class _ImagePasses:
    """One member's outputs for one image, one entry per flip in the member's flip order."""

    geometry: Geometry
    input_shape: torch.Size
    flips: list[str] = field(default_factory=list)
    malignant: list[torch.Tensor] = field(default_factory=list)
    benign: list[torch.Tensor] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)
    boxes: list[torch.Tensor] = field(default_factory=list)
    box_weights: list[torch.Tensor] = field(default_factory=list)

    def add(self, flip: str, out: ScoreMaps, k: int) -> None:
        self.flips.append(flip)
        self.malignant.append(out.malignant[k])
        self.maps.append(out.maps[k])
        if out.benign is not None:
            self.benign.append(out.benign[k])
        if out.boxes is not None:
            self.boxes.append(out.boxes[k])
            self.box_weights.append(out.box_weights[k])


@dataclass
class _MemberPasses:
    member: _Member
    images: list[_ImagePasses | None]


def _member_image(member: _Member, passes: _ImagePasses) -> _MemberImage:
    """Flip-average one member's passes over one image; its boxes onto the source grid.

    Probabilities and maps are averaged over flips, each map flipped back first. ROI boxes
    come from one pass, the unflipped one when the member runs it, else its first flip: each
    pass picks its own crops, so boxes do not average.
    """
    flips = passes.flips
    maps = torch.stack([_flip(m.float(), f) for m, f in zip(passes.maps, flips, strict=True)])
    maps = maps.mean(0)
    has_benign = bool(passes.benign)
    if not has_benign:
        maps = maps[1:]  # channel 0 repeats channel 1: map one channel back, not two
    rois: list[RegionOfInterest] = []
    if passes.boxes:
        roi_flip = flips.index("none") if "none" in flips else 0
        boxes = passes.boxes[roi_flip].float().tolist()
        weights = passes.box_weights[roi_flip].float().tolist()
        for box, w in zip(boxes, weights, strict=True):
            unflipped = _unflip_box(box, flips[roi_flip], passes.input_shape)
            source_box = passes.geometry.box_to_source(unflipped)
            if source_box[2] > source_box[0] and source_box[3] > source_box[1]:
                # A box wholly in the padding shows no source pixel: nothing to mark.
                rois.append(RegionOfInterest(source_box, float(w), member.card.name))
        rois.sort(key=lambda r: -r.weight)
    return _MemberImage(
        malignant=float(torch.stack(passes.malignant).float().mean()),
        benign=float(torch.stack(passes.benign).float().mean()) if has_benign else None,
        maps=maps,
        geometry=passes.geometry,
        rois=rois,
    )


def _prepare(family: ModelFamily, image: Mammogram, spec: dict, device: torch.device) -> Prepared:
    """The family's preprocessing, in torch on `device` where the family offers it."""
    on_device = getattr(family, "preprocess_on", None)
    if on_device is not None:
        return on_device(image, spec, device)
    prepared = family.preprocess(image, spec)
    return Prepared(prepared.tensor.to(device), prepared.geometry)


def _flip(x: torch.Tensor, flip: str) -> torch.Tensor:
    return torch.flip(x, FLIPS[flip]) if FLIPS[flip] else x


def default_member(path: Path) -> MemberSpec:
    """A member with the test-time augmentation the shipped configuration gives it: the image
    and its mirror image, left-right where the family allows that flip, else upside down."""
    family = get_family(read_card(path).family)
    mirror = "hflip" if "hflip" in family.test_time_flips else "vflip"
    return MemberSpec(path, ("none", mirror))


def check_flips(member: MemberSpec, card: ModelCard) -> None:
    """Refuse a flip that shows the member's model an image unlike any it is run on."""
    family = get_family(card.family)
    foreign = [f for f in member.flips if f not in family.test_time_flips]
    if foreign:
        raise ValueError(
            f"ensemble member {card.name} ({member.path}): {family.name}'s preprocessing never "
            f"gives its models an image flipped by {', '.join(foreign)} (it turns every breast "
            "to face one way), so scores and maps under that flip mean nothing; choose its "
            f"flips from {', '.join(family.test_time_flips)}"
        )


def _check_exam(images: Sequence[Mammogram]) -> None:
    if not images:
        raise ValueError("an exam needs at least one image")
    studies = {img.study_instance_uid for img in images}
    if len(studies) > 1:
        raise ValueError(
            f"images of {len(studies)} different studies given as one exam; group images by "
            "StudyInstanceUID first"
        )
    keys = [img.view_key for img in images]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"more than one image for view(s) {dupes}; select one per view first")


def _unflip_box(box: list[float], flip: str, shape: torch.Size) -> tuple[float, ...]:
    top, left, bottom, right = box
    height, width = shape[-2:]
    if -1 in FLIPS[flip]:
        left, right = width - right, width - left
    if -2 in FLIPS[flip]:
        top, bottom = height - bottom, height - top
    return (top, left, bottom, right)


class _SourceMaps:
    """One member's maps on the source grid, a strip of rows at a time, into its own buffer."""

    def __init__(self, part: _MemberImage, strip_rows: int, cols: int) -> None:
        maps = part.maps
        # A benign map equal to the malignant one (GlimpseNet's single mask) is mapped once.
        self.shared = maps.shape[0] == 2 and torch.equal(maps[0], maps[1])
        self.maps = maps[1:] if self.shared else maps
        self.benign = part.benign is not None
        self.resampler = part.geometry.resampler(maps.shape[-2:], maps.device)
        # A map in [0, 1] stays in [0, 1] on the source grid (`MapResampler`): clamping it
        # there would change nothing.
        self.clamp = not bool(((self.maps >= 0) & (self.maps <= 1)).all())
        self._buffer = maps.new_empty(self.maps.shape[0] * strip_rows * cols)
        self._cols = cols

    def strip(self, start: int, stop: int) -> torch.Tensor:
        """(channels, stop - start, cols): source rows [start, stop), clamped to [0, 1]."""
        n = self.maps.shape[0]
        out = self._buffer[: n * (stop - start) * self._cols].view(n, stop - start, self._cols)
        self.resampler.rows_into(self.maps, start, stop, out)
        return out.clamp_(0.0, 1.0) if self.clamp else out


_STRIP_BYTES = 1 << 21
"""fp32 bytes per map per strip of source rows on the CPU. Small enough that every pass over a
strip (mapping, mean, peak, levels) stays in cache and no full-size float map is allocated;
large enough that the passes stay few: each is a parallel region of torch's threads, and on
a busy 2-core host (the worker's other stages, other processes) a region waits for its
descheduled thread, so a 3328×2560 map in 0.5 MB strips took 10× longer there than in 2 MB."""


def _source_levels(
    parts: list[_MemberImage], shape: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
    """The members' maps on the source grid, clamped to [0, 1], averaged over members and
    quantised (`to_levels_`); with the malignancy map's peak, found in fp32 first.

    What mapping each member's whole maps, clamping and averaging them gives, but a strip of
    source rows at a time (on the CPU; a GPU takes the image as one strip): every pass over a
    strip stays in cache, and no full-size float map is ever allocated (at 3328×2560 each
    would be 34 MB, above glibc's mmap threshold, so page-faulted afresh every time).
    """
    rows, cols = shape
    strip_rows = rows if device.type != "cpu" else max(1, min(rows, _STRIP_BYTES // (4 * cols)))
    members = [_SourceMaps(p, strip_rows, cols) for p in parts]
    benign = [m for m in members if m.benign]
    malignant_levels = torch.empty(shape, dtype=torch.uint8, device=device)
    benign_levels = torch.empty_like(malignant_levels) if benign else None
    total = torch.empty(strip_rows * cols, device=device)
    whole = torch.empty(strip_rows * cols, dtype=torch.int16, device=device)
    best_values, best_rows = [], []
    for start in range(0, rows, strip_rows):
        stop = min(start + strip_rows, rows)
        out = total[: (stop - start) * cols].view(stop - start, cols)
        scratch = whole[: (stop - start) * cols].view(stop - start, cols)
        strips = [m.strip(start, stop) for m in members]
        if benign_levels is not None:
            # A lone member's benign strip is quantised in place unless it is also its
            # malignant one; the malignant strips are not needed after their mean.
            in_place = not (len(benign) == 1 and benign[0].shared)
            benign_strips = [s[0] for m, s in zip(members, strips, strict=True) if m.benign]
            mean = _mean_into(benign_strips, out, in_place)
            to_levels_(mean, benign_levels[start:stop], scratch)
        mean = _mean_into([s[-1] for s in strips], out, True)
        # The peak before quantising, the first maximum in row-major order (numpy's argmax):
        # per strip its first row holding the strip's maximum, kept whole (a full argmax
        # costs 20× a row-wise max on the CPU).
        row = int(torch.argmax(mean.amax(1)))
        best_values.append(mean[row].max())
        best_rows.append((start + row, mean[row].clone()))
        to_levels_(mean, malignant_levels[start:stop], scratch)
    # The first strip of those holding the maximum, and its row's first maximum.
    peak_row, values = best_rows[int(torch.argmax(torch.stack(best_values)))]
    return malignant_levels, benign_levels, (peak_row, int(torch.argmax(values)))


def _mean_into(maps: list[torch.Tensor], out: torch.Tensor, in_place: bool) -> torch.Tensor:
    """The mean of same-shape maps, written into `out`: summed in member order, then
    divided. One map is its own mean: itself when the caller may overwrite it (`in_place`),
    else a copy in `out`."""
    if len(maps) == 1:
        return maps[0] if in_place else out.copy_(maps[0])
    torch.add(maps[0], maps[1], out=out)
    for m in maps[2:]:
        out += m
    return out.div_(len(maps))


def _breast(laterality: Laterality, images: Sequence[ImagePrediction]) -> BreastPrediction:
    own = [p for p in images if p.laterality == laterality]
    own.sort(key=lambda p: 0 if p.view == View.CC else 1)
    benign = [p.benign for p in own if p.benign is not None]
    return BreastPrediction(
        laterality=laterality,
        malignant=breast_score(p.malignant for p in own),
        benign=breast_score(benign) if benign else None,
        sop_instance_uids=tuple(p.sop_instance_uid for p in own),
    )
