"""End to end geometry: a saliency bump placed on GMIC's input grid at a synthetic lesion's
position, mapped back with the real preprocessing's Geometry, must come out on the lesion in
the SEG and in the CAD SR's centre and outline, for both breasts (one of them flipped by the
preprocessing) and both views."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from scipy import ndimage

from models.family import get_family
from models.gmic import PRESETS
from models.reading import read_mammogram
from models.results import ImagePrediction, RegionOfInterest
from plugin.outputs import build_cad_sr, build_segs
from tests.support.maps import malignant_fields
from tests.support.outputs_samples import (
    bump,
    children,
    exam_prediction,
    mask_center,
    model_info,
    only,
    referenced_uid,
)
from trainer.synth import synth_exam

MAP_STRIDE = 4
"""Input pixels per saliency-map cell (the map is coarser than the input, as GMIC's is)."""


def _predict_with_bump(exam, use_roi: bool):
    """What a perfect model would say: a bump on the lesion, computed on the input grid."""
    family = get_family("gmic")
    spec = family.default_preprocessing(PRESETS["demo"])
    images, sources = [], {}
    for si in exam.images:
        prepared = family.preprocess(read_mammogram(si.dataset), spec)
        geometry = prepared.geometry
        rows, cols = geometry.input_shape
        grid = (rows // MAP_STRIDE, cols // MAP_STRIDE)
        rois = ()
        if si.malignant:
            center_in = geometry.to_input([mask_center(si.malignant_mask)])[0]
            input_map = bump(grid, tuple(center_in / MAP_STRIDE), sigma=1.5)
            half = 8.0
            box = (center_in[0] - half, center_in[1] - half, center_in[0] + half,
                   center_in[1] + half)  # fmt: skip
            if use_roi:
                rois = (RegionOfInterest(geometry.box_to_source(box), 1.0, "bump"),)
        else:
            input_map = np.zeros(grid, np.float32)
        source_map = np.clip(geometry.map_to_source(input_map), 0.0, 1.0)
        assert source_map.shape == (si.dataset.Rows, si.dataset.Columns)
        p = 0.9 if si.malignant else 0.05
        images.append(
            ImagePrediction(
                sop_instance_uid=str(si.dataset.SOPInstanceUID),
                laterality=si.laterality,
                view=si.view,
                malignant=p,
                benign=None,
                per_model={"bump": p},
                **malignant_fields(source_map.astype(np.float32)),
                benign_map=None,
                rois=rois,
            )
        )
        sources[str(si.dataset.SOPInstanceUID)] = si.dataset
    return exam_prediction(exam.study_instance_uid, images, (model_info("bump"),), False), sources


@pytest.fixture(scope="module", params=[(1, "R"), (3, "L")], ids=["right", "left"])
def lesion_exam(request):
    seed, side = request.param
    exam = synth_exam(seed, rows=512, cols=416, malignant=True, benign=False)
    assert str(exam.malignant_side) == side
    return exam


@pytest.mark.parametrize("use_roi", [False, True], ids=["saliency", "roi"])
def test_seg_peak_and_cad_sr_marks_fall_on_the_lesion(lesion_exam, use_roi, tmp_path):
    prediction, sources = _predict_with_bump(lesion_exam, use_roi)
    masks = {str(si.dataset.SOPInstanceUID): si.malignant_mask for si in lesion_exam.images}
    # Lesion pixels, allowing the map's coarseness a couple of source pixels.
    near = {uid: ndimage.binary_dilation(m, iterations=3) for uid, m in masks.items()}
    positives = [uid for uid, m in masks.items() if m.any()]
    assert len(positives) == 2  # CC and MLO of the lesion's breast

    for seg in build_segs(prediction, sources):
        path = tmp_path / f"{seg.SOPInstanceUID}.dcm"
        seg.save_as(path, enforce_file_format=True)
        seg = hd.seg.segread(path)
        uid = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        if uid not in positives:
            continue
        pixels = seg.get_pixels_by_source_instance([uid], rescale_fractional=True)[0, ..., 0]
        peak = np.unravel_index(np.argmax(pixels), pixels.shape)
        assert pixels[peak] > 0.5
        assert near[uid][peak], f"SEG peak {peak} is off the lesion"

    sr = build_cad_sr(prediction, sources)
    findings = []
    for impression in children(only(children(sr, "111017")), "111034"):
        for feature in children(impression, "111015"):
            findings += children(feature, "111059")
        findings += children(impression, "111059")
    marked = set()
    for finding in findings:
        center = only(children(finding, "111010"))
        uid = referenced_uid(center)
        if uid not in positives:
            continue
        marked.add(uid)
        col, row = np.asarray(center.GraphicData, dtype=float)
        assert near[uid][int(row), int(col)], f"centre ({row}, {col}) is off the lesion"
        outline = np.asarray(only(children(finding, "111041")).GraphicData, dtype=float).reshape(
            -1, 2
        )
        lesion_row, lesion_col = mask_center(masks[uid])
        assert outline[:, 0].min() <= lesion_col <= outline[:, 0].max()
        assert outline[:, 1].min() <= lesion_row <= outline[:, 1].max()
        # The outline is local, not the whole breast.
        area = np.ptp(outline[:, 0]) * np.ptp(outline[:, 1])
        assert area < 0.05 * masks[uid].size
    assert marked == set(positives)
