"""The overlay viewer served by the Orthanc plugin, on result objects built by plugin.outputs.

The prediction is made by hand from the synthetic exam's lesion mask (so the test knows where
the heat must be); the objects are the real ones (CAD SR, both TID 1500 SRs, JPEG-LS SEG, SC),
stored in Debian's Orthanc (with authentication on), decoded by Orthanc, drawn by Debian's
Chromium under Playwright. About 25 s on 2 loaded cores, most of it Orthanc and Chromium
starting.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from models.mammogram import Laterality
from models.results import BreastPrediction, ExamPrediction, ImagePrediction, ModelInfo
from plugin.outputs import OutputKind, build_outputs
from tests.support.maps import malignant_fields
from tests.support.orthanc_peer import SCRIPT, OrthancPeer, dicom_bytes, plugin_config
from tests.support.orthanc_viewer_check import OverlayViewer, browser, pixel, saturation

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
                **malignant_fields(heat),
                benign_map=np.zeros(heat.shape, np.uint8),
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


USER = ("radiologist", "s3cret")


@pytest.fixture(scope="module")
def chromium_browser():
    with browser() as instance:
        yield instance


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
            workdir / "orthanc",
            plugins=("python",),
            python_script=SCRIPT,
            extra_config=config,
            users=dict([USER]),
        ) as orthanc,
        orthanc.client() as client,
    ):
        for ds in [*exam.datasets, *(o.dataset for o in objects)]:
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
        assert view["heatmap"]["display_threshold"] == 0.5  # the model's operating point
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
    assert np.abs(decoded.astype(float) - expected).max() <= 1  # the map's 8-bit levels
    assert orthanc.get("/system")["Version"]  # still alive after decoding a SEG


def _url(orthanc, study: str, credentials: str = "") -> str:
    return orthanc.url.replace("://", f"://{credentials}") + f"/mammo-ai/studies/{study}"


def test_viewer_page_shows_heatmap_on_the_lesion_and_the_sr_scores(
    viewer_orthanc, chromium_browser
):
    """Opened from an Orthanc session (the browser holds the Orthanc user; nothing in the
    URL): hot spots coloured, air and tissue their own grey, labels on their images."""
    orthanc, study, exam, prediction, _ = viewer_orthanc
    with OverlayViewer.open(chromium_browser, _url(orthanc, study), credentials=USER) as page:
        assert page.wait_ready() == "ready", page.errors
        assert page.page.is_visible("#clinical-label")
        assert page.page.inner_text("#clinical-label") == "NOT FOR CLINICAL USE"
        assert "demo-gmic" in page.page.inner_text("#algorithm")
        assert "0.1-test" in page.page.inner_text("#algorithm")
        assert "colour from 50 %" in page.page.inner_text("#legend")
        assert page.score("score-exam") == pytest.approx(100 * prediction.malignant, abs=0.01)
        for breast in prediction.breasts:
            assert page.score(f"score-breast-{breast.laterality}") == pytest.approx(
                100 * breast.malignant, abs=0.01
            )
        heat_on = page.screenshot("orthanc-viewer-synthetic")
        page.press("h")  # keyboard toggle: heat-map off
        assert not page.page.is_checked("#heatmap-toggle")
        heat_off = page.screenshot("orthanc-viewer-synthetic-heatmap-off")
        page.press("o")
        page.press("l")
        assert not page.page.is_visible('figure[data-view="L-CC"] figcaption')
        page.press("h")
        page.press("o")
        page.press("l")
        assert page.page.is_checked("#heatmap-toggle") and page.page.is_checked("#outline-toggle")

        side = str(exam.malignant_side)
        for item in exam.images:
            key = f"{item.laterality}-{item.view}"
            image = prediction.image(str(item.dataset.SOPInstanceUID))
            assert page.score(f"score-image-{key}") == pytest.approx(
                100 * image.malignant, abs=0.01
            )
            _label_inside_its_image(page, key)
            pixels = item.dataset.pixel_array
            body = ndimage.binary_erosion(pixels > pixels.max() * 0.2, iterations=5)
            far = np.argwhere(body & (ndimage.distance_transform_edt(~item.malignant_mask) > 60))
            air = np.argwhere(ndimage.binary_erosion(pixels < pixels.max() * 0.02, iterations=8))
            for r, c in (far[len(far) // 2], air[len(air) // 2], far[len(far) // 3]):
                at = page.at_source(key, c + 0.5, r + 0.5)
                # Heat-map on or off, the same pixel: normal tissue and air keep their grey.
                assert pixel(heat_on, at) == pixel(heat_off, at), (key, r, c)
                assert saturation(pixel(heat_on, at)) < 0.05, (key, pixel(heat_on, at))
            if str(item.laterality) == side:
                rows, cols = np.nonzero(item.malignant_mask)
                at = page.at_source(key, cols.mean() + 0.5, rows.mean() + 0.5)
                lesion = pixel(heat_on, at)
                assert saturation(lesion) > 0.4, (key, lesion)
                assert lesion[1] > 150 and lesion[2] < 150  # viridis' hot end: yellow-green
                assert saturation(pixel(heat_off, at)) < 0.05
        assert page.errors == []


def _label_inside_its_image(page: OverlayViewer, key: str) -> None:
    image = page.box(f'figure[data-view="{key}"] canvas.base')
    label = page.box(f'figure[data-view="{key}"] figcaption')
    assert image["x"] <= label["x"] and label["x"] + label["width"] <= image["x"] + image["width"]
    assert image["y"] <= label["y"] and label["y"] + label["height"] <= image["y"] + image["height"]
    # On the nipple side, away from the chest wall at the centre line.
    centre = image["x"] + image["width"] / 2
    assert (label["x"] < centre) if key.startswith("R") else (label["x"] + label["width"] > centre)


@pytest.mark.parametrize(("window", "arrangement"), [((1400, 1100), "grid"), ((1920, 1000), "row")])
def test_views_fill_the_window(viewer_orthanc, chromium_browser, window, arrangement):
    """Whichever arrangement shows the images larger; each image fitted to its cell (aspect
    kept), right and left views back to back at the centre line."""
    orthanc, study, exam, _, _ = viewer_orthanc
    url = _url(orthanc, study)
    with OverlayViewer.open(chromium_browser, url, credentials=USER, window=window) as page:
        assert page.wait_ready() == "ready", page.errors
        assert page.page.get_attribute("#grid", "data-layout") == arrangement
        grid = page.box("#grid")
        for key in ("R-CC", "L-CC", "R-MLO", "L-MLO"):
            cell = page.box(f'figure[data-view="{key}"]')
            image = page.box(f'figure[data-view="{key}"] canvas.base')
            rows, cols = exam.image(key).dataset.Rows, exam.image(key).dataset.Columns
            assert image["width"] / image["height"] == pytest.approx(cols / rows, rel=0.01)
            fitted = max(image["width"] / cell["width"], image["height"] / cell["height"])
            assert fitted == pytest.approx(1.0, abs=0.01)
            assert image["height"] >= 0.4 * grid["height"]
            inner = cell["x"] + cell["width"] if key.startswith("R") else cell["x"]
            edge = image["x"] + image["width"] if key.startswith("R") else image["x"]
            assert edge == pytest.approx(inner, abs=1)
        page.screenshot(f"orthanc-viewer-{arrangement}-{window[0]}x{window[1]}")
        assert page.errors == []


def test_opens_with_credentials_in_the_url(viewer_orthanc, chromium_browser):
    """Kiosk or headless use: http://user:password@orthanc/mammo-ai/studies/{id}."""
    orthanc, study, _, _, _ = viewer_orthanc
    url = _url(orthanc, study, f"{USER[0]}:{USER[1]}@")
    with OverlayViewer.open(chromium_browser, url) as page:
        assert page.wait_ready() == "ready", page.errors
        assert page.page.locator("canvas.heatmap").count() == 4
        assert page.errors == []
