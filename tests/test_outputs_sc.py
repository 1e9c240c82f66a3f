"""Secondary Capture heat-map: windowing (MONOCHROME1 too), overlay and burned-in text, the
attributes hanging protocols and PACS rely on, and dciodvfy."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from outputs_samples import dciodvfy_errors, model_info, prediction_for

from plugin.outputs import NOT_FOR_CLINICAL_USE, build_sc, build_scs, display_image
from plugin.outputs.sc import _caption
from trainer.synth import synth_exam


@pytest.fixture(scope="module")
def built(synth_exam_small):
    prediction, sources = prediction_for(synth_exam_small, rois=True)
    return prediction, sources, build_scs(prediction, sources)


def _rgb(ds: pydicom.Dataset) -> np.ndarray:
    """Decoded as a viewer would (pydicom 3 converts YBR_FULL_422 to RGB on decode)."""
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(ds))).pixel_array


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_monochrome1_displays_like_monochrome2():
    mono2 = synth_exam(5, rows=256, cols=208, photometric="MONOCHROME2").images[0].dataset
    mono1 = synth_exam(5, rows=256, cols=208, photometric="MONOCHROME1").images[0].dataset
    assert mono1.PhotometricInterpretation == "MONOCHROME1"
    a, b = display_image(mono2), display_image(mono1)
    assert a.min() >= 0 and a.max() <= 1
    assert np.abs(a - b).max() < 0.01
    # Tissue is brighter than the background, as on a reading monitor.
    assert a[a.shape[0] // 2].max() > 0.5
    assert min(a[0, 0], a[0, -1]) < 0.1


def test_window_missing_falls_back_to_percentiles(synth_exam_small):
    ds = copy.deepcopy(synth_exam_small.images[0].dataset)
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        if keyword in ds:
            delattr(ds, keyword)
    gray = display_image(ds)
    assert gray.min() == 0.0 and gray.max() == 1.0


def test_attributes_for_pacs_and_hanging_protocols(built):
    prediction, sources, scs = built
    assert len(scs) == 4
    series = {sc.SeriesInstanceUID for sc in scs}
    assert len(series) == 1
    for sc in scs:
        src = sources[sc.SourceImageSequence[0].ReferencedSOPInstanceUID]
        img = prediction.image(src.SOPInstanceUID)
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert sc.StudyInstanceUID == src.StudyInstanceUID
        assert (sc.Rows, sc.Columns) == (src.Rows, src.Columns)
        assert sc.BurnedInAnnotation == "YES"
        assert sc.LossyImageCompression == "01"
        assert sc.LossyImageCompressionMethod == "ISO_10918_1"
        assert float(sc.LossyImageCompressionRatio) > 1
        assert sc.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
        assert sc.ImageLaterality == src.ImageLaterality == str(img.laterality)
        assert sc.ViewPosition == str(img.view)
        view = sc.ViewCodeSequence[0].CodeValue
        assert view == src.ViewCodeSequence[0].CodeValue
        assert list(sc.PatientOrientation) == list(src.PatientOrientation)
        assert sc.SeriesDescription.startswith(NOT_FOR_CLINICAL_USE)
        assert sc.Manufacturer == "mammo-ai-plugin"


def test_heat_map_sits_on_the_lesion_and_text_is_burned_in(built, synth_exam_small):
    prediction, sources, scs = built
    positive = next(i for i in synth_exam_small.images if i.malignant)
    sc = next(
        s
        for s in scs
        if s.SourceImageSequence[0].ReferencedSOPInstanceUID == positive.dataset.SOPInstanceUID
    )
    rgb = _rgb(sc).astype(int)
    r, c = (int(v) for v in np.argwhere(positive.malignant_mask).mean(axis=0))
    red, green, blue = rgb[r, c]
    # Grey pixels have r ≈ g ≈ b; the overlay colours the lesion (yellow/red: red ≫ blue).
    assert red - blue > 60
    far = np.argwhere(~positive.malignant_mask & (display_image(positive.dataset) > 0.3))
    fr, fc = far[len(far) // 2]
    assert abs(rgb[fr, fc, 0] - rgb[fr, fc, 2]) < 25
    # The caption box: black background with white text in a top corner.
    rows = sc.Rows
    size = max(10, round(rows / 70))
    box = np.concatenate([rgb[: 3 * size, :40], rgb[: 3 * size, -40:]], axis=1)
    assert (box.max(axis=-1) < 30).mean() > 0.3 and (box.min(axis=-1) > 200).any()


def test_caption_names_scores_models_and_label(synth_exam_small):
    prediction, _ = prediction_for(synth_exam_small, drop=["L-CC"])
    img = prediction.images[0]
    lines = _caption(prediction, img)
    assert lines[0] == NOT_FOR_CLINICAL_USE
    assert any(f"{100 * img.malignant:.1f}%" in line for line in lines)
    assert any("test-gmic 1.0" in line for line in lines)
    assert any("missing L-CC" in line for line in lines)
    validated, _ = prediction_for(synth_exam_small, models=[model_info(clinical_use=True)])
    assert NOT_FOR_CLINICAL_USE not in _caption(validated, validated.images[0])


def test_needs_pixel_data(synth_exam_small):
    prediction, sources = prediction_for(synth_exam_small)
    img = prediction.images[0]
    header = copy.deepcopy(sources[img.sop_instance_uid])
    del header.PixelData
    with pytest.raises(ValueError, match="no pixel data"):
        build_sc(prediction, img, header)


def test_dciodvfy_accepts(built, tmp_path):
    _, _, scs = built
    path = tmp_path / "sc.dcm"
    scs[0].save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
