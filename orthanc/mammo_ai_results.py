"""What the overlay viewer shows for one Orthanc study, read from our result objects.

Input: Orthanc's own JSON of the study's instances (`/instances/{id}/tags?simplify`), so this
runs in Orthanc's interpreter with the standard library only. Output: one JSON summary:

    {"views": [{"key": "R-CC", "instance": ..., "rows", "columns", "flip_h", "flip_v",
                "malignant", "benign", "outline": [[x, y], ...],
                "heatmap": {"instance": seg id, "frame": 0-based, "max_value": 255,
                            "display_threshold": 0.5 | null} | null}],
     "breasts": {"R": {"malignant", "benign"}, "L": ...}, "exam": {"malignant", "benign"},
     "algorithm": {"name", "version"}, "not_for_clinical_use": bool, "sources": [...]}

Scores are percentages as stored (DCM 111047 "Probability of cancer", UCUM %). They come from
our SRs: the machine-readable TID 1500 (image/breast/exam, benign), the viewer TID 1500
(image scores + outlines) and the Mammography CAD SR (breast + image scores, outlines),
whichever the site's configuration produced. The heat-map is the malignant segment of our
fractional SEG for each image.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from mammo_ai_rest import Rest

RESULT_MANUFACTURER = "mammo-ai-plugin"
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
HANGING_ORDER = ("R-CC", "L-CC", "R-MLO", "L-MLO")

_MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
_SR_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.",)
_SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

_PROBABILITY_OF_CANCER = "111047"
_PROBABILITY_OF_BENIGN = "BENIGNPROB"
_FINDING_SITE = "363698007"
_LATERALITY = "272741003"
_SIDE = {"7771000": "L", "24028007": "R", "51440002": "B", "80248007": "L", "73056007": "R"}
_SINGLE_IMAGE_FINDING = "111059"
_COMPOSITE_FEATURE = "111015"
_TRACKING_IDENTIFIER = "112039"
_ALGORITHM_NAME = "111001"
_ALGORITHM_VERSION = "111003"
_MALIGNANT_PROPERTY = "86049000"  # Malignant neoplasm, primary (SEG segmented property type)
_VIEW_CODES = {"399162004": "CC", "399368009": "MLO"}
_THRESHOLD = re.compile(r"(?:^|,)display_threshold=([0-9.]+)(?:,|$)")


def study_summary(rest: Rest, study_id: str) -> dict | None:
    series_list = rest.get(f"/studies/{study_id}/series")
    if series_list is None:
        return None
    images: dict[str, dict] = {}  # SOPInstanceUID -> view
    reports: list[dict] = []
    segs: list[tuple[str, dict]] = []
    descriptions: list[str] = []
    for series in series_list:
        tags = series.get("MainDicomTags", {})
        ours = tags.get("Manufacturer") == RESULT_MANUFACTURER and tags.get("Modality") != "MG"
        if ours:
            descriptions.append(tags.get("SeriesDescription", ""))
        for instance_id in series.get("Instances", []):
            ds = rest.get(f"/instances/{instance_id}/tags?simplify")
            if ds is None:
                continue
            sop_class = ds.get("SOPClassUID", "")
            if ours and sop_class.startswith(_SR_CLASSES):
                reports.append(ds)
            elif ours and sop_class == _SEG_CLASS:
                segs.append((instance_id, ds))
            elif sop_class == _MG_FOR_PRESENTATION and not ours:
                view = _view(instance_id, ds)
                if view is not None:
                    images[ds["SOPInstanceUID"]] = view

    chosen = _one_per_view(images)
    laterality = {uid: v["key"][0] for uid, v in images.items()}
    summary: dict[str, Any] = {
        "study": study_id,
        "views": [chosen[k] for k in HANGING_ORDER if k in chosen],
        "breasts": {},
        "exam": {},
        "algorithm": {},
        "not_for_clinical_use": any(d.startswith(NOT_FOR_CLINICAL_USE) for d in descriptions),
        "sources": [],
    }
    by_uid = {v["sop_instance_uid"]: v for v in chosen.values()}
    for report in sorted(reports, key=_report_rank):
        summary["sources"].append(report.get("SeriesDescription", ""))
        for group in _groups(report.get("ContentSequence", [])):
            _apply(group, summary, by_uid, laterality)
            if not summary["algorithm"] and group["algorithm"]:
                summary["algorithm"] = group["algorithm"]
    if not summary["exam"] and summary["breasts"]:
        summary["exam"] = {
            "malignant": max(b.get("malignant", 0.0) for b in summary["breasts"].values()),
            "derived": "maximum over breasts",
        }
    for instance_id, seg in segs:
        _attach_heatmaps(instance_id, seg, by_uid)
    return summary


# -- mammograms ---------------------------------------------------------------------------------


def _view(instance_id: str, ds: dict) -> dict | None:
    side = ds.get("ImageLaterality") or ds.get("Laterality")
    view = None
    for item in ds.get("ViewCodeSequence", []) or []:
        view = _VIEW_CODES.get(item.get("CodeValue", ""))
    view = view or {"CC": "CC", "MLO": "MLO"}.get(ds.get("ViewPosition", ""))
    if side not in ("L", "R") or view is None:
        return None
    orientation = (ds.get("PatientOrientation") or "").split("\\")
    row_dir = orientation[0] if orientation and orientation[0] else ""
    col_dir = orientation[1] if len(orientation) > 1 else ""
    # Standard hanging: right views face left (chest wall toward the centre of the screen:
    # rows run posterior), left views face right (rows run anterior); MLO feet down.
    want = "P" if side == "R" else "A"
    return {
        "key": f"{side}-{view}",
        "instance": instance_id,
        "sop_instance_uid": ds["SOPInstanceUID"],
        "rows": int(ds.get("Rows", 0)),
        "columns": int(ds.get("Columns", 0)),
        "orientation_known": bool(row_dir),
        "flip_h": bool(row_dir) and row_dir[0] != want,
        "flip_v": col_dir.startswith("H"),
        "acquired": f"{ds.get('ContentDate', '')}{ds.get('ContentTime', '')}",
        "malignant": None,
        "benign": None,
        "outline": None,
        "heatmap": None,
    }


def _one_per_view(images: dict[str, dict]) -> dict[str, dict]:
    """The latest image of each view (a re-take replaces the first)."""
    chosen: dict[str, dict] = {}
    for view in sorted(images.values(), key=lambda v: v["acquired"]):
        chosen[view["key"]] = view
    return chosen


# -- SR content trees -----------------------------------------------------------------------------


def _report_rank(report: dict) -> int:
    """Machine scores first, then the viewer TID 1500, then the CAD SR: the first value found
    for a score wins (they agree; the order only decides which objects name the algorithm)."""
    description = report.get("SeriesDescription", "")
    if "machine" in description:
        return 0
    return 1 if report.get("SOPClassUID", "").endswith(".88.33") else 2


def _groups(items: list[dict]) -> Iterator[dict]:
    """Every content item whose direct children hold a probability of cancer, described."""
    for item in items or []:
        children = item.get("ContentSequence", []) or []
        numbers = [c for c in children if c.get("ValueType") == "NUM"]
        if any(_concept(n) == _PROBABILITY_OF_CANCER and not _member_score(n) for n in numbers):
            yield _describe(item, children)
        yield from _groups(children)


def _describe(item: dict, children: list[dict]) -> dict:
    group: dict[str, Any] = {
        "concept": _concept(item),
        "malignant": None,
        "benign": None,
        "side": None,
        "images": [],
        "outline": None,
        "tracking": "",
        "algorithm": {},
    }
    for child in children:
        concept, kind = _concept(child), child.get("ValueType")
        if kind == "NUM" and not _member_score(child):
            value = _number(child)
            if concept == _PROBABILITY_OF_CANCER:
                group["malignant"] = value
            elif concept == _PROBABILITY_OF_BENIGN:
                group["benign"] = value
        elif kind == "CODE" and concept == _FINDING_SITE:
            for modifier in child.get("ContentSequence", []) or []:
                if _concept(modifier) == _LATERALITY:
                    group["side"] = _SIDE.get(_code_value(modifier))
        elif kind == "IMAGE":
            group["images"] += _referenced_uids(child)
        elif kind == "SCOORD":
            refs = [u for c in child.get("ContentSequence", []) or [] for u in _referenced_uids(c)]
            group["images"] += refs
            if child.get("GraphicType") == "POLYLINE":
                group["outline"] = _points(child.get("GraphicData"))
        elif kind == "TEXT" and concept == _TRACKING_IDENTIFIER:
            group["tracking"] = child.get("TextValue", "")
        elif kind == "TEXT" and concept == _ALGORITHM_NAME:
            group["algorithm"]["name"] = child.get("TextValue", "")
        elif kind == "TEXT" and concept == _ALGORITHM_VERSION:
            group["algorithm"]["version"] = child.get("TextValue", "")
    for child in children:  # TID 1410/1501 algorithm identification sits one level down
        if child.get("ValueType") == "CODE" and not group["algorithm"]:
            for grandchild in child.get("ContentSequence", []) or []:
                if _concept(grandchild) == _ALGORITHM_NAME:
                    group["algorithm"]["name"] = grandchild.get("TextValue", "")
                elif _concept(grandchild) == _ALGORITHM_VERSION:
                    group["algorithm"]["version"] = grandchild.get("TextValue", "")
    group["images"] = list(dict.fromkeys(group["images"]))
    return group


def _apply(group: dict, summary: dict, views: dict[str, dict], laterality: dict[str, str]) -> None:
    level = _level(group, laterality)
    scores = {k: group[k] for k in ("malignant", "benign") if group[k] is not None}
    if level == "image":
        view = views.get(group["images"][0])
        if view is None:
            return
        for k, v in scores.items():
            if view[k] is None:
                view[k] = v
        if group["outline"] and view["outline"] is None:
            view["outline"] = group["outline"]
    elif level == "breast":
        sides = {laterality.get(u) for u in group["images"]} - {None}
        side = group["side"] if group["side"] in ("L", "R") else next(iter(sides), None)
        if side in ("L", "R"):
            breast = summary["breasts"].setdefault(side, {})
            for k, v in scores.items():
                breast.setdefault(k, v)
    else:
        for k, v in scores.items():
            summary["exam"].setdefault(k, v)


def _level(group: dict, laterality: dict[str, str]) -> str:
    sides = {laterality.get(u) for u in group["images"]} - {None}
    if group["concept"] == _SINGLE_IMAGE_FINDING or (group["outline"] and group["images"]):
        return "image"
    if group["concept"] == _COMPOSITE_FEATURE:
        return "breast"
    if group["side"] == "B" or len(sides) > 1:
        return "exam"
    if "breast" in group["tracking"].lower() or len(group["images"]) != 1:
        return "breast" if (group["side"] in ("L", "R") or sides) else "exam"
    return "image"


def _member_score(num: dict) -> bool:
    """A NUM carrying its own algorithm identification is one ensemble member's score."""
    return any(_concept(c) == _ALGORITHM_NAME for c in num.get("ContentSequence", []) or [])


def _concept(item: dict) -> str:
    codes = item.get("ConceptNameCodeSequence") or [{}]
    return codes[0].get("CodeValue", "")


def _code_value(item: dict) -> str:
    codes = item.get("ConceptCodeSequence") or [{}]
    return codes[0].get("CodeValue", "")


def _number(item: dict) -> float | None:
    measured = item.get("MeasuredValueSequence") or [{}]
    try:
        return float(measured[0].get("NumericValue", ""))
    except ValueError:
        return None


def _referenced_uids(item: dict) -> list[str]:
    return [
        r.get("ReferencedSOPInstanceUID", "")
        for r in item.get("ReferencedSOPSequence", []) or []
        if r.get("ReferencedSOPInstanceUID")
    ]


def _points(data: Any) -> list[list[float]] | None:
    if isinstance(data, str):
        values = [float(v) for v in data.split("\\") if v]
    elif isinstance(data, list):
        values = [float(v) for v in data]
    else:
        return None
    return [[values[i], values[i + 1]] for i in range(0, len(values) - 1, 2)]


# -- SEG -------------------------------------------------------------------------------------------


def _attach_heatmaps(instance_id: str, seg: dict, views: dict[str, dict]) -> None:
    """Point each view at the SEG frame with its malignant-saliency segment."""
    malignant = {
        int(s.get("SegmentNumber", 0))
        for s in seg.get("SegmentSequence", []) or []
        if _is_malignant_segment(s)
    }
    if not malignant:
        return
    threshold = _display_threshold(seg)
    frames = seg.get("PerFrameFunctionalGroupsSequence", []) or []
    fallback_refs = list(_all_referenced(seg))
    for index, frame in enumerate(frames):
        segment_ids = frame.get("SegmentIdentificationSequence", []) or [{}]
        if int(segment_ids[0].get("ReferencedSegmentNumber", 0)) not in malignant:
            continue
        refs = list(_all_referenced(frame)) or fallback_refs
        for uid in refs:
            view = views.get(uid)
            if view is not None and view["heatmap"] is None:
                view["heatmap"] = {
                    "instance": instance_id,
                    "frame": index,
                    "max_value": int(seg.get("MaximumFractionalValue", 255)),
                    "display_threshold": threshold,
                }


def _display_threshold(seg: dict) -> float | None:
    """From the malignant segment's Algorithm Parameters ("display_threshold=0.5,models=…",
    plugin/outputs/common.py); None (the page's default floor) when absent."""
    for segment in seg.get("SegmentSequence", []) or []:
        if not _is_malignant_segment(segment):
            continue
        for algorithm in segment.get("SegmentationAlgorithmIdentificationSequence", []) or []:
            found = _THRESHOLD.search(algorithm.get("AlgorithmParameters", "") or "")
            if found:
                value = float(found.group(1))
                return value if 0.0 <= value <= 1.0 else None
    return None


def _is_malignant_segment(segment: dict) -> bool:
    types = segment.get("SegmentedPropertyTypeCodeSequence") or [{}]
    if types[0].get("CodeValue") == _MALIGNANT_PROPERTY:
        return True
    return "malignant" in (segment.get("SegmentLabel", "") + segment.get("SegmentDescription", ""))


def _all_referenced(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ReferencedSOPInstanceUID" and isinstance(value, str):
                yield value
            else:
                yield from _all_referenced(value)
    elif isinstance(node, list):
        for item in node:
            yield from _all_referenced(item)
