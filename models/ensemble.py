"""The ensemble: configured member models, each with its flip set for test-time augmentation,
scoring one (possibly partial) four-view exam.

Per image, each member's probabilities are averaged over its flips (saliency maps are flipped
back first), then averaged over members on the source grid. A breast scores the mean of its CC
and MLO images (or the one present); the exam scores the max over breasts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .family import ModelFamily, Prepared, ScoreMaps, get_family
from .mammogram import Laterality, Mammogram, View
from .modelfile import ModelCard, file_sha256, load_model
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
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
SCREENING_VIEWS = ("R-CC", "L-CC", "R-MLO", "L-MLO")


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
    """"fp32", or autocast to "bf16" (CPU or GPU) or "fp16" (GPU only)."""
    max_batch: int = 8
    """Images (views × flips) per forward pass; lower it when memory is short."""

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


@dataclass
class _MemberImage:
    """One member's flip-averaged view of one image, on the source grid."""

    malignant: float
    benign: float | None
    malignant_map: np.ndarray
    benign_map: np.ndarray | None
    rois: list[RegionOfInterest]


class Ensemble:
    """Loads every member's model file once; `predict_exam` then scores exams.

    Deterministic for a given device and precision: on CUDA it turns cuDNN autotuning off and
    deterministic kernels on, for the whole process.
    """

    def __init__(self, spec: EnsembleSpec) -> None:
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.autocast_dtype = PRECISIONS[spec.precision]
        if self.autocast_dtype is torch.float16 and self.device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
        if self.device.type == "cuda":
            if self.autocast_dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
                gpu = torch.cuda.get_device_name(self.device)
                raise ValueError(f"precision bf16 is not supported by {gpu}; use fp16 or fp32")
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self._members: list[_Member] = []
        for m in spec.members:
            module = load_model(m.path, device=self.device)
            card: ModelCard = module.card
            family = get_family(card.family)
            self._members.append(_Member(module, card, family, m.flips, file_sha256(Path(m.path))))
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

    def predict_exams(self, exams: Sequence[Sequence[Mammogram]]) -> list[ExamPrediction]:
        """Score several exams; results in input order, each as `predict_exam` gives it."""
        return [self.predict_exam(images) for images in exams]

    def predict_exam(self, images: Sequence[Mammogram]) -> ExamPrediction:
        """Score 1–4 images of one study: at most one per (laterality, view)."""
        _check_exam(images)
        prepared: dict[str, list[Prepared]] = {}
        per_member = [self._run_member(m, images, prepared) for m in self._members]
        image_preds = tuple(
            _combine_members(
                img, [pm[i] for pm in per_member], [m.card.name for m in self._members]
            )
            for i, img in enumerate(images)
        )
        breasts = tuple(
            _breast(lat, image_preds)
            for lat in (Laterality.RIGHT, Laterality.LEFT)
            if any(p.laterality == lat for p in image_preds)
        )
        present = {f"{p.laterality}-{p.view}" for p in image_preds}
        benigns = [b.benign for b in breasts if b.benign is not None]
        return ExamPrediction(
            study_instance_uid=images[0].study_instance_uid,
            images=image_preds,
            breasts=breasts,
            malignant=max(b.malignant for b in breasts),
            benign=max(benigns) if benigns else None,
            missing_views=tuple(v for v in SCREENING_VIEWS if v not in present),
            models=self.models,
        )

    # -- one member ------------------------------------------------------------------------

    @torch.inference_mode()
    def _run_member(
        self, member: _Member, images: Sequence[Mammogram], cache: dict[str, list[Prepared]]
    ) -> list[_MemberImage]:
        """All views × flips of one member in batches of at most `max_batch`.

        Probabilities and maps are averaged over flips, each map flipped back first. ROI boxes
        come from one pass, the unflipped one when the member runs it, else its first flip:
        each pass picks its own crops, so boxes do not average. Members with the same family
        and preprocessing (e.g. the five published GMIC models) share one preprocessing run
        through `cache`.
        """
        key = json.dumps([member.card.family, member.card.preprocessing], sort_keys=True)
        if key not in cache:
            spec = member.card.preprocessing
            cache[key] = [member.family.preprocess(img, spec) for img in images]
        prepared = cache[key]
        x = torch.stack([p.tensor for p in prepared]).to(self.device)
        flips = member.flips
        batch = torch.cat([_flip(x, f) for f in flips])
        outputs = [
            member.family.score_maps(self._forward(member.module, chunk))
            for chunk in torch.split(batch, self.spec.max_batch)
        ]
        n_flips, n_views = len(flips), len(images)
        malignant = _gather(outputs, "malignant", n_flips, n_views)
        benign = _gather(outputs, "benign", n_flips, n_views)
        maps = _gather(outputs, "maps", n_flips, n_views)
        boxes = _gather(outputs, "boxes", n_flips, n_views)
        weights = _gather(outputs, "box_weights", n_flips, n_views)
        scores = (malignant, maps) if benign is None else (malignant, benign, maps)
        if not all(torch.isfinite(t).all() for t in scores):
            raise RuntimeError(
                f"model {member.card.name!r} gave NaN or infinite scores at precision "
                f"{self.spec.precision}; use fp32, and if that fails too the model file is faulty"
            )
        maps = torch.stack([_flip(maps[i], f) for i, f in enumerate(flips)]).mean(0)
        if benign is None:
            maps = maps[:, 1:]  # channel 0 repeats channel 1: map one channel back, not two
        roi_flip = flips.index("none") if "none" in flips else 0

        results = []
        for v, prep in enumerate(prepared):
            rois: list[RegionOfInterest] = []
            if boxes is not None:
                for box, w in zip(
                    boxes[roi_flip, v].tolist(), weights[roi_flip, v].tolist(), strict=True
                ):
                    source_box = prep.geometry.box_to_source(
                        _unflip_box(box, flips[roi_flip], prep)
                    )
                    if source_box[2] > source_box[0] and source_box[3] > source_box[1]:
                        # A box wholly in the padding shows no source pixel: nothing to mark.
                        rois.append(RegionOfInterest(source_box, float(w), member.card.name))
                rois.sort(key=lambda r: -r.weight)
            source_maps = np.clip(prep.geometry.map_to_source(maps[v].numpy()), 0.0, 1.0)
            results.append(
                _MemberImage(
                    malignant=float(malignant[:, v].mean()),
                    benign=None if benign is None else float(benign[:, v].mean()),
                    malignant_map=source_maps[-1],
                    benign_map=None if benign is None else source_maps[0],
                    rois=rois,
                )
            )
        return results

    def _forward(self, module: nn.Module, x: torch.Tensor):
        if self.autocast_dtype is None:
            return module(x)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return module(x)


def _flip(x: torch.Tensor, flip: str) -> torch.Tensor:
    return torch.flip(x, FLIPS[flip]) if FLIPS[flip] else x


def _gather(outputs: list[ScoreMaps], name: str, n_flips: int, n_views: int) -> torch.Tensor | None:
    """One `ScoreMaps` field of all batches as a float32 CPU tensor (flips, views, …)."""
    parts = [getattr(o, name) for o in outputs]
    if parts[0] is None:
        return None
    t = torch.cat(parts).float().cpu()
    return t.reshape(n_flips, n_views, *t.shape[1:])


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


def _unflip_box(box: list[float], flip: str, prep: Prepared) -> tuple[float, ...]:
    top, left, bottom, right = box
    height, width = prep.tensor.shape[-2:]
    if -1 in FLIPS[flip]:
        left, right = width - right, width - left
    if -2 in FLIPS[flip]:
        top, bottom = height - bottom, height - top
    return (top, left, bottom, right)


def _mean_map(maps: list[np.ndarray]) -> np.ndarray:
    return np.mean(np.stack(maps), axis=0).astype(np.float32) if len(maps) > 1 else maps[0]


def _combine_members(
    img: Mammogram, parts: list[_MemberImage], names: list[str]
) -> ImagePrediction:
    benign_parts = [p for p in parts if p.benign is not None]
    rois = sorted((r for p in parts for r in p.rois), key=lambda r: -r.weight)
    return ImagePrediction(
        sop_instance_uid=img.sop_instance_uid,
        laterality=img.laterality,
        view=img.view,
        malignant=float(np.mean([p.malignant for p in parts])),
        benign=float(np.mean([p.benign for p in benign_parts])) if benign_parts else None,
        per_model={n: p.malignant for n, p in zip(names, parts, strict=True)},
        malignant_map=_mean_map([p.malignant_map for p in parts]),
        benign_map=_mean_map([p.benign_map for p in benign_parts]) if benign_parts else None,
        rois=tuple(rois),
    )


def _breast(laterality: Laterality, images: Sequence[ImagePrediction]) -> BreastPrediction:
    own = [p for p in images if p.laterality == laterality]
    own.sort(key=lambda p: 0 if p.view == View.CC else 1)
    benign = [p.benign for p in own if p.benign is not None]
    return BreastPrediction(
        laterality=laterality,
        malignant=float(np.mean([p.malignant for p in own])),
        benign=float(np.mean(benign)) if benign else None,
        sop_instance_uids=tuple(p.sop_instance_uid for p in own),
    )
