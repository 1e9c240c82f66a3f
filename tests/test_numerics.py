"""Numerics: fp32 is fp32 while the ensemble runs (TF32 only when asked, the process's settings
restored after), reduced precision never changes GMIC's crops, the precision travels with
the prediction, and the crop stage's distance transform (the accelerator path) is exact.
About 40 s on 2 cores."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from models import new_model_file
from models.ensemble import Ensemble, EnsembleSpec, MemberSpec
from models.gmic import GMIC, PRESETS
from models.gmic.preprocess import _city_block_distance
from models.numerics import autocast, to_levels, to_levels_
from models.reading import read_mammogram
from models.results import map_levels
from tests.support.maps import assert_levels_close, rounding_cases


@pytest.fixture(scope="module")
def gmic_file(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("numerics")
    return new_model_file(folder / "gmic.safetensors", "gmic", PRESETS["demo"], name="gmic-n")


@pytest.fixture(scope="module")
def exam(synth_exam_small):
    return [read_mammogram(img.dataset) for img in synth_exam_small.images]


@pytest.mark.parametrize("precision, inside", [("fp32", "ieee"), ("tf32", "tf32")])
def test_tf32_only_when_asked_and_settings_restored(gmic_file, exam, precision, inside):
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    ensemble = Ensemble(EnsembleSpec((MemberSpec(gmic_file),), device="cpu", precision=precision))
    seen = []
    hook = ensemble._members[0].module.register_forward_hook(
        lambda *_: seen.append((matmul.fp32_precision, conv.fp32_precision))
    )
    try:
        prediction = ensemble.predict_exam(exam[:1])
    finally:
        hook.remove()
    assert seen == [(inside, inside)]
    assert (matmul.fp32_precision, conv.fp32_precision) == before
    assert prediction.precision == precision


def test_bf16_takes_the_same_crops_as_fp32(exam):
    """bf16 saliency used to tie and pick other crops; the crop decision now runs in fp32."""
    torch.manual_seed(3)
    model = GMIC(PRESETS["demo"]).eval()
    family_spec = {"window": [768, 512], "scale": "fit"}
    from models.gmic import preprocess

    x = torch.stack([preprocess(img, family_spec).tensor for img in exam])
    with torch.inference_mode():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x)
    assert torch.equal(bf16.roi_positions, fp32.roi_positions)
    assert torch.equal(bf16.saliency, fp32.saliency) and bf16.saliency.dtype == torch.float32
    assert torch.equal(bf16.y_global, fp32.y_global)
    # The local network did run in bf16: the fused score moves, a little.
    assert bf16.y_fusion.dtype == torch.bfloat16
    np.testing.assert_allclose(bf16.y_fusion.float(), fp32.y_fusion, atol=0.02)


def test_bf16_ensemble_says_so_and_keeps_the_boxes(gmic_file, exam):
    members = (MemberSpec(gmic_file, ("none", "vflip")),)
    fp32 = Ensemble(EnsembleSpec(members, device="cpu")).predict_exam(exam)
    bf16 = Ensemble(EnsembleSpec(members, device="cpu", precision="bf16")).predict_exam(exam)
    assert bf16.precision == "bf16" and fp32.precision == "fp32"
    for a, b in zip(fp32.images, bf16.images, strict=True):
        assert [r.box for r in a.rois] == [r.box for r in b.rois]


def test_one_autocast_for_every_precision():
    """`models.numerics.autocast`, which the ensemble, the trainer and the benchmarks share:
    bf16 autocasts on the CPU too, and fp32 is fp32 even inside a caller's autocast."""
    cpu = torch.device("cpu")
    x = torch.ones(2, 2)
    with autocast(cpu, "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast(cpu, "fp32"):
        assert (x @ x).dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast(cpu, "fp8")


def test_levels_round_to_nearest_in_fp32():
    """The one rounding rule of the maps (`to_levels`, on the ensemble's device; `map_levels`
    on numpy maps): floor(fp32(p × 255) + 0.5), NaN as 0, clipped to 0..255."""
    values = rounding_cases()
    levels = to_levels(torch.from_numpy(values)).numpy()
    clipped = np.clip(values, 0, 1)  # the last boundary lies above 1
    fp32 = np.floor(clipped * np.float32(255) + np.float32(0.5))  # two fp32 roundings, no FMA
    assert fp32.dtype == np.float32 and np.array_equal(levels, fp32.astype(np.uint8))
    assert np.abs(levels - values.astype(np.float64) * 255).max() <= 0.5 + 1e-4
    odd = to_levels(torch.from_numpy(np.float32([np.nan, -0.1, 0.0, 1.0, 1.5]))).numpy()
    assert odd.tolist() == [0, 0, 0, 255, 255]
    assert np.array_equal(map_levels(values), levels)
    assert np.array_equal(map_levels(values.astype(np.float64)), levels)
    # The ensemble's in-place form (through int16, into a given uint8 map): the same levels.
    inside = torch.from_numpy(clipped.copy())
    out = torch.empty(inside.shape, dtype=torch.uint8)
    assert to_levels_(inside, out=out) is out and np.array_equal(out.numpy(), levels)
    inside = torch.from_numpy(clipped.copy())
    scratch = torch.empty(inside.shape, dtype=torch.int16)
    assert np.array_equal(to_levels_(inside, out, scratch).numpy(), levels)


def test_city_block_distance_is_scipys_iterated_erosion():
    rng = np.random.default_rng(1)
    for _ in range(20):
        shape = tuple(int(v) for v in rng.integers(5, 90, size=2))
        mask = rng.random(shape) > rng.choice([0.02, 0.2, 0.5])
        distance = _city_block_distance(torch.from_numpy(mask)).numpy()
        for r in (1, 2, 5, 17):
            np.testing.assert_array_equal(distance > r, ndi.binary_erosion(mask, iterations=r))


def test_channels_last_scores_as_the_default_layout(gmic_file, exam):
    members = (MemberSpec(gmic_file, ("none", "vflip")),)
    default = Ensemble(EnsembleSpec(members, device="cpu")).predict_exam(exam)
    nhwc = Ensemble(EnsembleSpec(members, device="cpu", channels_last=True)).predict_exam(exam)
    for a, b in zip(default.images, nhwc.images, strict=True):
        assert b.malignant == pytest.approx(a.malignant, abs=1e-5)
        assert_levels_close(b.malignant_map, a.malignant_map, atol=1e-5)
        assert b.malignant_peak == a.malignant_peak
        assert [r.box for r in a.rois] == [r.box for r in b.rois]
