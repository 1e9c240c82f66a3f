"""Orthanc ⇄ `plugin serve`, end to end, with real peers only.

Debian's Orthanc runs orthanc/mammo_ai_orthanc.py and routes a synthetic four-view exam to
`plugin serve`; the service delivers its result objects back into the same Orthanc study by all
three network paths at once (C-STORE: CAD SR + SC; DICOMweb STOW-RS: both TID 1500 SRs; Orthanc
REST: SEGs). Then the overlay viewer shows that study in headless Chromium. A second exam has
Orthanc restarted before its stable event and must still be analysed exactly once.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pydicom
import pytest

from tests.support.dcmtk_peer import free_port
from tests.support.orthanc_peer import SCRIPT, OrthancPeer, plugin_config, upload
from tests.support.orthanc_viewer_check import OverlayViewer, browser, pixel, saturation
from tests.support.service_harness import Serve, counts, demo_models, wait_until, write_config
from trainer.synth import synth_exam

STABLE_AGE = 2
RESULT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.50": 1,  # CAD SR (C-STORE)
    "1.2.840.10008.5.1.4.1.1.7": 4,  # SC heat-maps (C-STORE)
    "1.2.840.10008.5.1.4.1.1.88.33": 2,  # TID 1500 viewer + scores SRs (STOW-RS)
    "1.2.840.10008.5.1.4.1.1.66.4": 4,  # SEGs (Orthanc REST)
}
RESULTS_BOUND_S = 240  # upload → every result object in Orthanc, on 2 shared CPU cores


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("orthanc-e2e")
    listener_port = free_port()
    config = plugin_config(STABLE_AGE)
    config["BuiltinDecoderTranscoderOrder"] = "Before"
    orthanc = OrthancPeer.start(
        tmp / "orthanc",
        plugins=("python", "dicomweb"),
        python_script=SCRIPT,
        modalities={"mammoai": ("MAMMO_AI", "127.0.0.1", listener_port)},
        extra_config=config,
    )
    service_config = write_config(
        tmp / "service",
        port=listener_port,
        models=demo_models(tmp / "models"),
        destinations=[
            {
                "type": "dicom",
                "name": "orthanc-dimse",
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "called_ae": orthanc.ae_title,
                "outputs": ["cad_sr", "sc"],
            },
            {
                "type": "dicomweb",
                "name": "orthanc-stow",
                "url": orthanc.dicomweb_url,
                "outputs": ["tid1500", "tid1500_scores"],
            },
            {"type": "orthanc", "name": "orthanc-rest", "url": orthanc.url, "outputs": ["seg"]},
        ],
    )
    service = Serve.start(service_config)
    try:
        yield orthanc, service, tmp
    finally:
        service.stop()
        orthanc.stop()


def study_id(orthanc: OrthancPeer, study_uid: str) -> str:
    query = {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
    found = orthanc.post("/tools/find", query)
    assert len(found) == 1
    return found[0]


def result_classes(orthanc: OrthancPeer, study: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for instance in orthanc.get(f"/studies/{study}/instances"):
        sop_class = orthanc.get(f"/instances/{instance['ID']}/metadata", expand="")["SopClassUid"]
        out[sop_class] = out.get(sop_class, 0) + 1
    return out


def wait_for_results(orthanc: OrthancPeer, service: Serve, study_uid: str) -> float:
    start = time.monotonic()

    def complete() -> bool:
        found = orthanc.post(
            "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
        )
        if not found:
            return False
        have = result_classes(orthanc, found[0])
        return all(have.get(k, 0) >= n for k, n in RESULT_CLASSES.items())

    wait_until(complete, RESULTS_BOUND_S, "every result object in the Orthanc study", service)
    return time.monotonic() - start


def test_results_land_in_the_same_study_by_cstore_stow_and_rest(stack, record_property):
    orthanc, service, tmp = stack
    exam = synth_exam(31, rows=512, cols=416, malignant=True, benign=False)
    upload(orthanc, exam.datasets)
    elapsed = wait_for_results(orthanc, service, exam.study_instance_uid)
    record_property("upload_to_results_s", round(elapsed, 1))
    print(f"\nupload-to-results: {elapsed:.1f} s (StableAge {STABLE_AGE} s)")

    study = study_id(orthanc, exam.study_instance_uid)
    have = result_classes(orthanc, study)
    assert have.pop("1.2.840.10008.5.1.4.1.1.1.2") == 4  # the mammograms, once each
    assert have == RESULT_CLASSES  # nothing twice, nothing else
    # Our results arriving re-stabilise the study; they must not be routed back.
    time.sleep(STABLE_AGE + 3)
    assert orthanc.get("/mammo-ai/routing")["RoutedInstances"] == 4
    assert counts(service)["jobs"] == {"done": 1}
    assert counts(service)["instances"] == {"accepted": 4}

    # The viewer: SR scores on the page, heat-map colours where the SEG is hottest (when it
    # reaches the display threshold), none where the SEG is 0.
    summary = orthanc.get(f"/mammo-ai/api/studies/{study}")
    hottest = max(summary["views"], key=lambda v: _seg_peak(orthanc, v)[0])
    peak, (row, col), seg = _seg_peak(orthanc, hottest)
    threshold = hottest["heatmap"]["display_threshold"]
    url = f"{orthanc.url}/mammo-ai/studies/{study}"
    with browser() as chromium, OverlayViewer.open(chromium, url) as page:
        assert page.wait_ready() == "ready", page.errors
        scores = _scores_sr(orthanc, study)
        assert page.score("score-exam") == pytest.approx(scores["exam"], abs=0.01)
        for side in ("L", "R"):
            assert page.score(f"score-breast-{side}") == pytest.approx(scores[side], abs=0.01)
        heat_on = page.screenshot("orthanc-viewer-e2e")
        page.press("h")
        heat_off = page.screenshot("orthanc-viewer-e2e-heatmap-off")
        at = page.at_source(hottest["key"], col + 0.5, row + 0.5)
        if peak >= 255 * threshold:
            on, off = pixel(heat_on, at), pixel(heat_off, at)
            assert max(abs(a - b) for a, b in zip(on, off, strict=True)) > 20, (on, off)
            assert saturation(on) > 0.15, on
        cold = np.argwhere(seg == 0)
        if len(cold):
            r, c = cold[len(cold) // 2]
            at = page.at_source(hottest["key"], c + 0.5, r + 0.5)
            assert pixel(heat_on, at) == pixel(heat_off, at)
        assert page.errors == []
    mask = exam.image(hottest["key"]).malignant_mask
    record_property("seg_peak_on_lesion", bool(mask[row, col]))
    print(
        f"SEG peak {peak}/255 (threshold {threshold}) in {hottest['key']} at ({row}, {col}); "
        f"inside lesion mask: {mask[row, col]}"
    )


def test_restart_before_stable_still_analyses_exactly_once(stack):
    orthanc, service, _ = stack
    before = counts(service)["jobs"].get("done", 0)
    exam = synth_exam(32, rows=512, cols=416, malignant=False, benign=False)
    upload(orthanc, exam.datasets)
    orthanc.restart()  # inside StableAge: the in-memory stable event is lost
    wait_for_results(orthanc, service, exam.study_instance_uid)
    time.sleep(STABLE_AGE + 3)
    assert counts(service)["jobs"] == {"done": before + 1}
    study = study_id(orthanc, exam.study_instance_uid)
    have = result_classes(orthanc, study)
    assert have.pop("1.2.840.10008.5.1.4.1.1.1.2") == 4
    assert have == RESULT_CLASSES
    assert not [e for e in service.audit() if e["event"] == "duplicate"]


def _scores_sr(orthanc: OrthancPeer, study: str) -> dict[str, float]:
    """Breast and exam probabilities (%) from the machine-readable TID 1500 SR, via pydicom."""
    for series in orthanc.get(f"/studies/{study}/series"):
        if "machine" not in series["MainDicomTags"].get("SeriesDescription", ""):
            continue
        ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(series["Instances"][0])))
        out = {}
        for group in ds.ContentSequence[-1].ContentSequence:
            tracking = next(
                (i.TextValue for i in group.ContentSequence if i.ValueType == "TEXT"), ""
            )
            value = next(
                float(i.MeasuredValueSequence[0].NumericValue)
                for i in group.ContentSequence
                if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "111047"
            )
            if tracking.startswith("exam"):
                out["exam"] = value
            elif "breast" in tracking:
                out[tracking[0]] = value
        return out
    raise AssertionError("no machine-readable scores SR in the study")


def _seg_peak(orthanc: OrthancPeer, view: dict) -> tuple[int, tuple[int, int], np.ndarray]:
    heat = view["heatmap"]
    ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(heat["instance"])))
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    seg = frames[heat["frame"]]
    row, col = np.unravel_index(int(np.argmax(seg)), seg.shape)
    return int(seg.max()), (int(row), int(col)), seg
