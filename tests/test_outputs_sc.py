"""Secondary Capture heat-map: windowing (MONOCHROME1 too, odd VOI headers), the overlay rule
(transparent below the threshold, viridis above), the outline only over breast, a label that
reads at full size and as a thumbnail, the attributes hanging protocols and PACS rely on, and
dciodvfy."""

from __future__ import annotations

import colorsys
import copy
from dataclasses import replace

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont

from models.results import RegionOfInterest, map_levels
from plugin.outputs import NOT_FOR_CLINICAL_USE, build_sc, build_scs, display_image
from plugin.outputs.common import DEFAULT_OPTIONS
from plugin.outputs.heatmap import (
    DISPLAY_FLOOR,
    VIRIDIS,
    blend_table,
    display_threshold,
    first_shown_level,
    overlay,
)
from plugin.outputs.sc import _draw_words, caption, label_sizes, render
from tests.support.outputs_samples import dciodvfy_errors, model_info, prediction_for
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
    a, b = display_image(mono2).astype(int), display_image(mono1).astype(int)
    assert a.dtype == np.int64 and a.min() >= 0 and a.max() <= 255
    assert np.abs(a - b).max() <= 3
    # Tissue is brighter than the background, as on a reading monitor.
    assert a[a.shape[0] // 2].max() > 128
    assert min(a[0, 0], a[0, -1]) < 25


def test_window_missing_falls_back_to_percentiles(synth_exam_small):
    ds = copy.deepcopy(synth_exam_small.images[0].dataset)
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        if keyword in ds:
            delattr(ds, keyword)
    grey = display_image(ds)
    assert grey.dtype == np.uint8 and grey.min() == 0 and grey.max() == 255


ODD_VOI = {
    "width 0": {"WindowCenter": 2048, "WindowWidth": 0},
    "negative width": {"WindowCenter": 2048, "WindowWidth": -40},
    "centre without width": {"WindowCenter": 2048},
    "unknown function": {"WindowCenter": 2048, "WindowWidth": 4096, "VOILUTFunction": "CUBIC"},
    "first of two has width 0": {"WindowCenter": [2048, 1000], "WindowWidth": [0, 500]},
    "empty window": {"WindowCenter": "", "WindowWidth": ""},
    "rescale slope 0": {"RescaleSlope": 0, "RescaleIntercept": 0},
}


@pytest.mark.parametrize("header", ODD_VOI.values(), ids=ODD_VOI.keys())
def test_odd_voi_headers_never_fail_rendering(synth_exam_small, header):
    ds = copy.deepcopy(synth_exam_small.images[0].dataset)
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        if keyword in ds:
            delattr(ds, keyword)
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    grey = display_image(ds)
    assert grey.shape == (ds.Rows, ds.Columns)
    assert int(grey.max()) - int(grey.min()) > 100  # still an image, not a flat field
    prediction, sources = prediction_for(synth_exam_small)
    img = prediction.image(ds.SOPInstanceUID)
    assert build_sc(prediction, img, ds).Rows == ds.Rows


def test_broken_voi_lut_sequence_falls_back(synth_exam_small):
    ds = copy.deepcopy(synth_exam_small.images[0].dataset)
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = [0, 1, 2]  # far shorter than the descriptor says
    ds.VOILUTSequence = [item]
    grey = display_image(ds)
    assert int(grey.max()) - int(grey.min()) > 100


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
    # Viridis over grey: the lesion is clearly coloured (green-teal at 0.7).
    assert _saturation(rgb[r, c]) > 0.2 and rgb[r, c, 1] - rgb[r, c, 0] > 30
    grey = display_image(positive.dataset).astype(int)
    far = np.argwhere(~positive.malignant_mask & (grey > 80))
    fr, fc = far[len(far) // 2]
    assert abs(rgb[fr, fc, 0] - rgb[fr, fc, 2]) < 12
    assert abs(rgb[fr, fc, 1] - grey[fr, fc]) < 12  # its own grey value, not a tint
    # The label: black background with white text in a top corner.
    large, _ = label_sizes(sc.Rows, sc.Columns)
    box = np.concatenate([rgb[: 3 * large, :40], rgb[: 3 * large, -40:]], axis=1)
    assert (box.max(axis=-1) < 30).mean() > 0.3 and (box.min(axis=-1) > 200).any()


def _saturation(rgb) -> float:
    return colorsys.rgb_to_hsv(*(int(v) / 255 for v in rgb))[1]


def _case(synth_exam_small, threshold=0.5, **fields):
    prediction, sources = prediction_for(synth_exam_small, rois=True)
    img = next(i for i in prediction.images if i.malignant > 0.5)
    img = replace(img, **fields)
    grey = display_image(sources[img.sop_instance_uid])
    return prediction, img, grey, render(prediction, img, grey, threshold)


def test_below_the_threshold_is_transparent_above_it_viridis(synth_exam_small):
    ramp = np.tile(np.linspace(0, 1, 416, dtype=np.float32), (512, 1))
    ramp = map_levels(ramp)
    prediction, img, grey, rgb = _case(synth_exam_small, 0.5, malignant_map=ramp, rois=())
    rows = slice(300, 500)  # below the label
    below, above = np.s_[rows, :200], np.s_[rows, 216:]
    assert (rgb[below] == grey[below][..., None]).all()  # exactly the mammogram
    hot = rgb[rows, -1].astype(int)  # value 1: viridis yellow blended at 75 %
    expected = 0.25 * grey[rows, -1][:, None] + 0.75 * np.array(VIRIDIS[-1])
    assert np.abs(hot - expected).max() <= 1
    coloured = rgb[above].astype(int)
    assert (np.abs(coloured - grey[above][..., None]).max(axis=-1) > 0).mean() > 0.95
    # The threshold: the models' operating point, else the display floor.
    assert display_threshold(prediction, DEFAULT_OPTIONS) == 0.5
    unset, _ = prediction_for(synth_exam_small, models=[model_info(operating_point=None)])
    assert display_threshold(unset, DEFAULT_OPTIONS) == DISPLAY_FLOOR


def test_outline_only_where_it_shows_breast(synth_exam_small):
    def red(rgb):
        return ((rgb[..., 0] > 230) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)).sum()

    _, img, grey, _ = _case(synth_exam_small)
    tissue = np.argwhere(grey > 100)
    r, c = tissue[len(tissue) // 2]
    on_breast = RegionOfInterest((r - 20, c - 20, r + 20, c + 20), 0.9, "test-gmic")
    air = np.argwhere(grey[200:] == 0)[0] + (200, 0)
    in_air = RegionOfInterest((air[0], air[1], air[0] + 30, air[1] + 30), 0.9, "test-gmic")
    assert red(_case(synth_exam_small, rois=(on_breast,))[3]) > 100
    assert red(_case(synth_exam_small, rois=(in_air,))[3]) == 0
    zero = np.zeros_like(img.malignant_map)
    assert red(_case(synth_exam_small, rois=(), malignant_map=zero)[3]) == 0  # no region


def _word_gaps(mask: np.ndarray) -> list[int]:
    """Widths of the blank column runs between inked columns of one text line."""
    ink = np.flatnonzero(mask.any(axis=0))
    return [int(b - a - 1) for a, b in zip(ink[:-1], ink[1:], strict=True) if b - a > 1]


def _warning_line(rgb: np.ndarray, large: int) -> np.ndarray:
    """Yellow pixels of the label's first line."""
    band = rgb[: int(large * 1.6)].astype(int)
    return (band[..., 0] > 150) & (band[..., 1] > 120) & (band[..., 2] < 90)


def test_label_reads_at_full_size_and_as_a_thumbnail(synth_exam_small):
    """A 3328x2560 mammogram: "NOT FOR CLINICAL USE" with three clear word gaps, text sized
    with the image, and still a yellow line with its word gaps at a 256-row thumbnail."""
    prediction, sources = prediction_for(synth_exam_small)
    img = next(i for i in prediction.images if i.malignant > 0.5)
    rows, cols = 3328, 2560
    grey = np.zeros((rows, cols), np.uint8)
    grey[:, cols // 2 :] = 160  # breast on the right: the label goes left
    big = replace(img, malignant_map=np.zeros((rows, cols), np.uint8), benign_map=None, rois=())
    rgb = render(prediction, big, grey, 0.5)
    large, small = label_sizes(rows, cols)
    assert (large, small) == (111, 62) and label_sizes(512, 416)[0] == 17
    warning = _warning_line(rgb, large)
    height = np.flatnonzero(warning.any(axis=1))
    assert 0.6 * large <= height[-1] - height[0] <= 1.2 * large
    gaps = sorted(_word_gaps(warning), reverse=True)
    assert min(gaps[:3]) >= 0.4 * large > 2 * gaps[3]  # three word gaps, letters closer
    assert (rgb[:, -400:] == 160).all() and rgb[0, 0].max() == 0  # the label sits on air
    thumb = np.asarray(Image.fromarray(rgb).resize((196, 256), Image.Resampling.LANCZOS))
    small_warning = _warning_line(thumb, round(large * 256 / rows))
    assert np.flatnonzero(small_warning.any(axis=1)).size >= 5
    assert sum(gap >= 2 for gap in _word_gaps(small_warning)) >= 3


def test_caption_names_scores_models_and_label(synth_exam_small):
    prediction, _ = prediction_for(synth_exam_small, drop=["L-CC"])
    img = prediction.images[0]
    lines = caption(prediction, img)
    assert lines[0].text == NOT_FOR_CLINICAL_USE and lines[0].large
    assert lines[1].large and f"{100 * img.malignant:.1f}%" in lines[1].text
    assert any("test-gmic 1.0" in line.text for line in lines)
    assert any("missing L-CC" in line.text for line in lines)
    validated, _ = prediction_for(synth_exam_small, models=[model_info(clinical_use=True)])
    texts = [line.text for line in caption(validated, validated.images[0])]
    assert NOT_FOR_CLINICAL_USE not in texts


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


def test_colour_starts_at_the_thresholds_level():
    """The ensemble hands over uint8 levels; every level from the threshold's, ceil(t × 255),
    up is coloured and every level below it shows the mammogram's grey unchanged."""
    levels = np.tile(np.arange(256, dtype=np.uint8), (3, 1))
    grey = np.full(levels.shape, 90, np.uint8)
    for threshold, first in ((0.5, 128), (DISPLAY_FLOOR, 51), (0.0, 0)):
        assert first_shown_level(threshold) == first
        coloured = (overlay(grey, levels, threshold) != grey[..., None]).any(axis=-1)
        assert np.array_equal(coloured.all(axis=0), np.arange(256) >= first)
        assert np.array_equal(coloured.any(axis=0), np.arange(256) >= first)


@pytest.mark.parametrize("rows", [1, 63, 64, 129])
def test_every_pixel_is_its_blend_table_colour(rows):
    """The overlay looks pixels up as 4-byte words, a block of rows at a time: each pixel is
    still the blend table's colour for (grey, level), whatever the row count."""
    rng = np.random.default_rng(rows)
    grey = rng.integers(0, 256, (rows, 301), dtype=np.uint8)
    levels = rng.integers(0, 256, (rows, 301), dtype=np.uint8)
    for threshold in (0.0, DISPLAY_FLOOR, 0.73):
        expected = blend_table(threshold)[grey.astype(np.intp) * 256 + levels]
        assert np.array_equal(overlay(grey, levels, threshold), expected)


@pytest.mark.parametrize("size", [7, 12, 31, 62, 111])
def test_words_are_the_pixels_imagedraw_draws(size):
    """Each word's coverage is rendered once and pasted (`_draw_words`): the same pixels as
    Pillow drawing the words, blended over what is there, from sub-pixel positions; the
    second time from the cache."""
    rng = np.random.default_rng(size)
    text = "NOT FOR CLINICAL USE  R-MLO AI P(cancer) 12.3%   Exam 7.0% (Åj)"
    font = ImageFont.load_default(size=size)
    for at in [(4, 4), (4.37, size / 3), (10.5, 0.25), (0.999, 2)] * 2:
        pixels = rng.integers(0, 256, (2 * size + 8, 30 * size, 3), dtype=np.uint8)
        ours, theirs = Image.fromarray(pixels), Image.fromarray(pixels)
        _draw_words(ours, at, text, size, (255, 220, 0))
        draw, x = ImageDraw.Draw(theirs), at[0]
        for word in text.split(" "):
            if word:
                draw.text((x, at[1]), word, fill=(255, 220, 0), font=font)
            x += draw.textlength(word, font=font) + 0.45 * size
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), at
