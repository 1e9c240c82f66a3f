"""View selection: which instance of a study the models see for each of R-CC, L-CC, R-MLO and
L-MLO, why every other instance is skipped, and which views are missing.

One pure function serves `plugin run` (candidates are datasets read from files) and the
service's exam grouper (candidates are stored instances carrying the `ImageDescription` the
listener made of their header), so both apply the same policy. The policy is a dataclass a
site configures (config key `exams.selection`); what the models cannot read at all
(tomosynthesis, multi-frame objects, views other than CC/MLO, both-breast images, broken
headers) is always skipped, with the reason.

Among the eligible images of a view, the one with the fewest fallback traits wins (a For
Presentation original before a For Processing or synthetic one, unless the policy prefers it),
then the tie-break: the latest acquisition by default (a retake supersedes the first exposure),
then the highest instance number, then the latest received.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, Generic, TypeVar

import pydicom

from models.header import ImageDescription, acquisition_time, describe
from models.mammogram import SCREENING_VIEW_KEYS, ImageKind, MammogramError, view_key

T = TypeVar("T")


class Use(StrEnum):
    SKIP = "skip"
    """Never analysed."""
    FALLBACK = "fallback"
    """Analysed only when the view has no better image."""
    PREFER = "prefer"
    """Analysed in preference to a plain screening image of the same view."""


class TieBreak(StrEnum):
    LATEST_ACQUISITION = "latest_acquisition"
    HIGHEST_INSTANCE_NUMBER = "highest_instance_number"
    LATEST_RECEIVED = "latest_received"


@dataclass(frozen=True)
class SelectionPolicy:
    for_processing: Use = Use.SKIP
    """Raw detector images: the published models were trained on For Presentation images."""
    synthetic_2d: Use = Use.FALLBACK
    """Synthetic 2D (e.g. C-View) from tomosynthesis: used when no acquired 2D view exists."""
    implant_displaced: Use = Use.FALLBACK
    """Implant-displaced (Eklund) views: the standard views are used when both exist."""
    modified_views: Use = Use.SKIP
    """Spot compression, magnification and other view modifiers: diagnostic work-up views."""
    tie_break: TieBreak = TieBreak.LATEST_ACQUISITION

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = TieBreak if f.name == "tie_break" else Use
            try:
                object.__setattr__(self, f.name, kind(value))
            except ValueError:
                allowed = ", ".join(v.value for v in kind)
                raise ValueError(
                    f"selection policy: {f.name} must be one of {allowed}, not {value!r}"
                ) from None
        if self.modified_views is Use.PREFER:
            raise ValueError(
                "selection policy: modified_views may be skip or fallback; a spot or "
                "magnification view never replaces a screening view"
            )

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> SelectionPolicy:
        """From the configuration's `exams.selection` dict; unknown keys are errors."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"selection policy: unknown option(s) {', '.join(unknown)}; "
                f"known options are {', '.join(sorted(known))}"
            )
        return cls(**options)


@dataclass(frozen=True)
class Candidate:
    """The header facts selection needs about one instance."""

    sop_instance_uid: str
    kind: ImageKind
    laterality: str | None
    view: str | None
    view_code: str = ""
    view_modifiers: tuple[str, ...] = ()
    number_of_frames: int = 1
    not_screening_reason: str | None = None
    acquisition: str = ""
    """Sortable acquisition date-time (YYYYMMDDHHMMSS…), "" when unknown."""
    instance_number: int | None = None
    received_at: float | None = None
    problem: str | None = None
    """Set when the header could not be read: the instance is skipped with this reason."""

    @property
    def view_key(self) -> str:
        return view_key(self.laterality or "?", self.view or self.view_code or "?")

    @classmethod
    def from_description(cls, d: ImageDescription, **known: Any) -> Candidate:
        """From the header's facts; `known` gives what the caller knows better (the stored
        row's SOP Instance UID, when it was received)."""
        facts: dict[str, Any] = {
            "sop_instance_uid": d.sop_instance_uid,
            "kind": d.kind,
            "laterality": None if d.laterality is None else str(d.laterality),
            "view": None if d.view is None else str(d.view),
            "view_code": d.view_code,
            "view_modifiers": d.view_modifiers,
            "number_of_frames": d.number_of_frames,
            "not_screening_reason": d.not_screening_reason,
            "acquisition": d.acquisition,
            "instance_number": d.instance_number,
        }
        return cls(**{**facts, **known})

    @classmethod
    def from_dataset(cls, ds: pydicom.Dataset) -> Candidate:
        try:
            return cls.from_description(describe(ds))
        except MammogramError as exc:
            return cls(
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                kind=ImageKind.FOR_PRESENTATION,
                laterality=None,
                view=None,
                problem=f"unusable header: {exc}",
                acquisition=acquisition_time(ds),
                instance_number=_int(ds, "InstanceNumber"),
            )


@dataclass(frozen=True)
class Selection(Generic[T]):
    chosen: dict[str, T]
    """View key ("R-CC", …) → the instance the models analyse."""
    skipped: list[tuple[T, str]] = field(default_factory=list)
    """Every other instance, with the specific reason (the service adds those the listener
    already ignored)."""
    missing: tuple[str, ...] = ()
    """Screening views with no usable instance, in R-CC, L-CC, R-MLO, L-MLO order."""

    @property
    def complete(self) -> bool:
        return not self.missing


@dataclass(frozen=True)
class SkippedImage:
    sop_instance_uid: str
    reason: str
    """Specific and free of header values (it goes into the audit trail)."""


@dataclass(frozen=True)
class SelectionRecord:
    """What a service job keeps of the selection that made it: stored with the job, and
    reported with its result (the `analysed` audit event), so an administrator can see why an
    image of the study was not analysed."""

    closed_by: str
    """Why the exam's round closed: "complete", "quiet timeout", "maximum wait"."""
    chosen: dict[str, str] = field(default_factory=dict)
    """View key → SOP Instance UID of the image analysed for it."""
    skipped: tuple[SkippedImage, ...] = ()
    missing: tuple[str, ...] = ()

    @property
    def partial(self) -> bool:
        return bool(self.missing)

    @classmethod
    def of(cls, selection: Selection[Any], closed_by: str) -> SelectionRecord:
        """From a selection of items with a `sop_instance_uid` (the store's instances)."""
        return cls(
            closed_by=closed_by,
            chosen={view: item.sop_instance_uid for view, item in sorted(selection.chosen.items())},
            skipped=tuple(SkippedImage(i.sop_instance_uid, why) for i, why in selection.skipped),
            missing=tuple(selection.missing),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "closed_by": self.closed_by,
                "chosen": self.chosen,
                "skipped": [
                    {"sop_instance_uid": s.sop_instance_uid, "reason": s.reason}
                    for s in self.skipped
                ],
                "missing": list(self.missing),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> SelectionRecord:
        data = json.loads(text)
        return cls(
            closed_by=data["closed_by"],
            chosen=dict(data["chosen"]),
            skipped=tuple(SkippedImage(**s) for s in data["skipped"]),
            missing=tuple(data["missing"]),
        )


def select_views(
    items: Sequence[T],
    policy: SelectionPolicy | Mapping[str, Any] | None = None,
    candidate: Callable[[T], Candidate] | None = None,
) -> Selection[T]:
    """Choose one instance per screening view from one study's instances.

    `items` are returned as given: `Candidate`s, `ImageDescription`s, pydicom datasets, or any
    object with `sop_instance_uid` and an `ImageDescription` as `description` (the store's
    instances; optionally `received_at`); `candidate` converts anything else. Pass the
    policy built once (`SelectionPolicy.from_mapping`); a mapping is parsed on every call.
    """
    if not isinstance(policy, SelectionPolicy):
        policy = SelectionPolicy.from_mapping(policy)
    to_candidate = candidate or as_candidate
    by_view: dict[str, list[tuple[tuple, T, Candidate]]] = {}
    skipped: list[tuple[T, str]] = []
    seen: dict[str, T] = {}
    for item in items:
        c = to_candidate(item)
        if c.sop_instance_uid in seen:
            skipped.append((item, "duplicate SOPInstanceUID: the same instance was given twice"))
            continue
        seen[c.sop_instance_uid] = item
        rank, reason = _rank(c, policy)
        if rank is None:
            skipped.append((item, reason))
        else:
            by_view.setdefault(c.view_key, []).append((rank, item, c))

    chosen: dict[str, T] = {}
    for key in SCREENING_VIEW_KEYS:
        entries = by_view.get(key, [])
        if not entries:
            continue
        entries.sort(key=lambda e: e[0] + _tie_key(e[2], policy.tie_break), reverse=True)
        _, best_item, best = entries[0]
        chosen[key] = best_item
        for rank, item, c in entries[1:]:
            skipped.append((item, _superseded(key, best, c, rank, entries[0][0], policy)))
    missing = tuple(k for k in SCREENING_VIEW_KEYS if k not in chosen)
    return Selection(chosen=chosen, skipped=skipped, missing=missing)


def as_candidate(item: Any) -> Candidate:
    if isinstance(item, Candidate):
        return item
    if isinstance(item, ImageDescription):
        return Candidate.from_description(item)
    if isinstance(item, pydicom.Dataset):
        return Candidate.from_dataset(item)
    facts = getattr(item, "description", None)
    if isinstance(facts, ImageDescription):
        return Candidate.from_description(
            facts,
            sop_instance_uid=str(item.sop_instance_uid),
            received_at=getattr(item, "received_at", None),
        )
    raise TypeError(
        f"cannot select views from {type(item).__name__}; pass Candidates, ImageDescriptions, "
        "datasets, or give select_views a `candidate` converter"
    )


# -- ranking --------------------------------------------------------------------------------


_TRAIT_LABEL = {
    "for_processing": "For Processing",
    "synthetic_2d": "synthetic 2D",
    "implant_displaced": "implant-displaced",
    "modified_views": "view-modified",
}


def _traits(c: Candidate) -> list[str]:
    traits = []
    if c.kind is ImageKind.FOR_PROCESSING:
        traits.append("for_processing")
    if c.kind is ImageKind.SYNTHETIC_2D:
        traits.append("synthetic_2d")
    modifiers = set(c.view_modifiers)
    if "implant displaced" in modifiers:
        traits.append("implant_displaced")
    if modifiers - {"implant displaced"}:
        traits.append("modified_views")
    return traits


def _rank(c: Candidate, policy: SelectionPolicy) -> tuple[tuple[int, int] | None, str]:
    """(rank, "") for an eligible candidate, higher is better; (None, reason) otherwise."""
    if c.problem:
        return None, c.problem
    if c.kind is ImageKind.TOMOSYNTHESIS:
        return None, "tomosynthesis object: the models read single 2D images only"
    if c.laterality not in ("L", "R"):
        return None, c.not_screening_reason or "no single-breast laterality (L or R)"
    if c.view is None:
        what = c.view_code or "unknown"
        return None, f"{what} view: only CC and MLO are analysed"
    if c.number_of_frames != 1:
        return None, f"{c.number_of_frames} frames: the models read single 2D images only"
    traits = _traits(c)
    if not traits and c.not_screening_reason:
        # Recognised but unanalysable for another reason (e.g. a partial-view tile).
        return None, c.not_screening_reason
    prefer = fallback = 0
    for trait in traits:
        use = getattr(policy, trait)
        if use is Use.SKIP:
            label = _TRAIT_LABEL[trait]
            detail = ", ".join(c.view_modifiers) if trait == "modified_views" else ""
            return None, (f"{label} image{f' ({detail})' if detail else ''}: policy {trait}=skip")
        prefer += use is Use.PREFER
        fallback += use is Use.FALLBACK
    return (prefer, -fallback), ""


def _tie_key(c: Candidate, tie_break: TieBreak) -> tuple:
    number = c.instance_number if c.instance_number is not None else -1
    received = c.received_at if c.received_at is not None else float("-inf")
    if tie_break is TieBreak.LATEST_ACQUISITION:
        return (c.acquisition, number, received, c.sop_instance_uid)
    if tie_break is TieBreak.HIGHEST_INSTANCE_NUMBER:
        return (number, c.acquisition, received, c.sop_instance_uid)
    return (received, c.acquisition, number, c.sop_instance_uid)


_TIE_FIELDS = {
    TieBreak.LATEST_ACQUISITION: ("acquisition", "instance_number", "received_at"),
    TieBreak.HIGHEST_INSTANCE_NUMBER: ("instance_number", "acquisition", "received_at"),
    TieBreak.LATEST_RECEIVED: ("received_at", "acquisition", "instance_number"),
}
_TIE_WHY = {
    "acquisition": "later acquisition",
    "instance_number": "higher instance number",
    "received_at": "received later",
}


def _superseded(
    key: str, best: Candidate, c: Candidate, rank: tuple, best_rank: tuple, policy: SelectionPolicy
) -> str:
    """Why `c` lost to `best`; the chosen image is named by its view only (the job records its
    UID), so the reason carries no header value into the audit trail."""
    if rank != best_rank:
        mine = ", ".join(_TRAIT_LABEL[t] for t in _traits(c)) or "screening"
        theirs = ", ".join(_TRAIT_LABEL[t] for t in _traits(best)) or "screening"
        return f"another {key} image was chosen ({theirs} preferred over {mine})"
    why = "same acquisition time and instance number; highest SOPInstanceUID kept"
    for attr in _TIE_FIELDS[policy.tie_break]:
        if getattr(c, attr) != getattr(best, attr):
            why = _TIE_WHY[attr]
            break
    return f"duplicate {key}: another image was chosen ({why})"


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
