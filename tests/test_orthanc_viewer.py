"""The overlay viewer served by the Orthanc plugin, on result objects built by plugin.outputs.

The prediction is made by hand from the synthetic exam's lesion mask (so the test knows where
the heat must be); the objects are the real ones (CAD SR, both TID 1500 SRs, JPEG-LS SEG, SC),
stored in Debian's Orthanc, decoded by Orthanc, drawn by headless Chromium.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from orthanc_peer import OrthancPeer
from orthanc_viewer_check import capture, saturation
from PIL import Image
from scipy import ndimage
from test_orthanc_routing import SCRIPT, dicom_bytes, plugin_config

from models.mammogram import Laterality
from models.results import BreastPrediction, ExamPrediction, ImagePrediction, ModelInfo
from plugin.outputs import OutputKind, build_outputs

MODEL = ModelInfo(
    name="demo-gmic",
    version="0.1-test",
    family="gmic",
    clinical_use=False,
    intended_use="tests",
    licence="Apache-2.0",
    operating_point=0.5,
)


def prediction_from_masks(exam) -> ExamPrediction:
    images = []
    for item in exam.images:
        mask = item.malignant_mask.astype(np.float32)
        heat = ndimage.gaussian_filter(mask, 6) if mask.any() else mask
        heat = heat / heat.max() if heat.max() > 0 else heat
        images.append(
            ImagePrediction(
                sop_instance_uid=str(item.dataset.SOPInstanceUID),
                laterality=item.laterality,
                view=item.view,
                malignant=0.83 if mask.any() else 0.07,
                benign=0.04,
                per_model={MODEL.name: 0.83 if mask.any() else 0.07},
                malignant_map=heat.astype(np.float32),
                benign_map=np.zeros_like(heat),
            )
        )
    breasts = []
    for side in Laterality:
        own = [i for i in images if i.laterality == side]
        breasts.append(
            BreastPrediction(
                laterality=side,
                malignant=float(np.mean([i.malignant for i in own])),
                benign=0.04,
                sop_instance_uids=tuple(i.sop_instance_uid for i in own),
            )
        )
    return ExamPrediction(
        study_instance_uid=exam.study_instance_uid,
        images=tuple(images),
        breasts=tuple(breasts),
        malignant=max(b.malignant for b in breasts),
        benign=0.04,
        missing_views=(),
        models=(MODEL,),
    )


@pytest.fixture(scope="module")
def viewer_orthanc(tmp_path_factory, synth_exam_small):
    exam = synth_exam_small
    prediction = prediction_from_masks(exam)
    sources = {str(i.dataset.SOPInstanceUID): i.dataset for i in exam.images}
    objects = build_outputs(prediction, sources, kinds=list(OutputKind))
    workdir = tmp_path_factory.mktemp("viewer")
    config = plugin_config(60)
    # Not listed in DicomModalities: routing stays off; the viewer is what is under test.
    config["BuiltinDecoderTranscoderOrder"] = "Before"
    with (
        OrthancPeer.start(
            workdir / "orthanc", plugins=("python",), python_script=SCRIPT, extra_config=config
        ) as orthanc,
        orthanc.client() as client,
    ):
        for ds in [*exam.datasets, *objects]:
            client.post("/instances", content=dicom_bytes(ds)).raise_for_status()
        study = client.post(
            "/tools/find",
            json={"Level": "Study", "Query": {"StudyInstanceUID": exam.study_instance_uid}},
        ).json()[0]
        yield orthanc, study, exam, prediction, workdir


def test_summary_reads_scores_outlines_and_heatmaps(viewer_orthanc):
    orthanc, study, exam, prediction, _ = viewer_orthanc
    summary = orthanc.get(f"/mammo-ai/api/studies/{study}")
    assert [v["key"] for v in summary["views"]] == ["R-CC", "L-CC", "R-MLO", "L-MLO"]
    assert summary["not_for_clinical_use"] is True
    assert summary["algorithm"] == {"name": "demo-gmic", "version": "0.1-test"}
    for view in summary["views"]:
        image = prediction.image(view["sop_instance_uid"])
        assert view["malignant"] == pytest.approx(100 * image.malignant, abs=0.01)
        assert view["benign"] == pytest.approx(4.0, abs=0.01)
        assert view["heatmap"] is not None and view["heatmap"]["max_value"] == 255
        assert len(view["outline"]) == 5
        # Standard hanging: synth's R views (rows posterior) and L views (anterior) need no flip.
        assert view["flip_h"] is False and view["flip_v"] is False
    for breast in prediction.breasts:
        side = summary["breasts"][str(breast.laterality)]
        assert side["malignant"] == pytest.approx(100 * breast.malignant, abs=0.01)
    assert summary["exam"]["malignant"] == pytest.approx(100 * prediction.malignant, abs=0.01)


def test_orthanc_decodes_the_jpegls_seg_frames(viewer_orthanc):
    """Orthanc's own decoder (DCMTK, no GDCM) returns the SEG probabilities the page colours."""
    orthanc, study, exam, prediction, _ = viewer_orthanc
    summary = orthanc.get(f"/mammo-ai/api/studies/{study}")
    lesion_view = next(v for v in summary["views"] if v["malignant"] > 50)
    heat = lesion_view["heatmap"]
    with orthanc.client() as client:
        png = client.get(f"/instances/{heat['instance']}/frames/{heat['frame']}/image-uint8")
    png.raise_for_status()
    decoded = np.asarray(Image.open(io.BytesIO(png.content)))
    expected = prediction.image(lesion_view["sop_instance_uid"]).malignant_map
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(float) - np.round(expected * 255)).max() <= 1
    assert orthanc.get("/system")["Version"]  # still alive after decoding a SEG


def test_viewer_page_shows_heatmap_on_the_lesion_and_the_sr_scores(viewer_orthanc):
    orthanc, study, exam, prediction, workdir = viewer_orthanc
    page = capture(f"{orthanc.url}/mammo-ai/studies/{study}", workdir, "orthanc-viewer-synthetic")
    assert page.status() == "ready", page.dom[-2000:]
    assert "NOT FOR CLINICAL USE" in page.dom and 'id="clinical-label" class="warning"' in page.dom
    assert 'id="clinical-label" class="warning" hidden' not in page.dom
    assert "demo-gmic" in page.dom and "0.1-test" in page.dom
    assert page.score("score-exam") == pytest.approx(100 * prediction.malignant, abs=0.01)
    for breast in prediction.breasts:
        assert page.score(f"score-breast-{breast.laterality}") == pytest.approx(
            100 * breast.malignant, abs=0.01
        )

    side = str(exam.malignant_side)
    for item in exam.images:
        key = f"{item.laterality}-{item.view}"
        assert page.score(f"score-image-{key}") == pytest.approx(
            100 * prediction.image(str(item.dataset.SOPInstanceUID)).malignant, abs=0.01
        )
        if str(item.laterality) != side:
            continue
        rows, cols = np.nonzero(item.malignant_mask)
        lesion = page.pixel_at_source(key, cols.mean() + 0.5, rows.mean() + 0.5)
        # Breast tissue far from the lesion: the breast's own grey, no colour over it.
        pixels = item.dataset.pixel_array
        body = ndimage.binary_erosion(pixels > pixels.max() * 0.2, iterations=5)
        far = body & (ndimage.distance_transform_edt(~item.malignant_mask) > 60)
        fr, fc = np.argwhere(far)[len(np.argwhere(far)) // 2]
        background = page.pixel_at_source(key, fc + 0.5, fr + 0.5)
        assert saturation(lesion) > 0.5, (key, lesion)
        assert lesion[0] > 150  # the hot end of the colour map: red/orange
        assert saturation(background) < 0.15, (key, background)
