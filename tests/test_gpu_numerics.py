"""On a CUDA GPU, fp32 is fp32: the ensemble's scores equal the CPU's within 1e-5 (TF32 would
move them by ~1e-3), with the preprocessing, the mapping onto the source grid and the maps'
quantisation to 8-bit levels on the GPU; bf16 takes fp32's crops and glimpses.
Skipped without CUDA; about 30 s with one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import new_model_file
from models.allconv import PRESETS as ALLCONV_PRESETS
from models.ensemble import Ensemble, EnsembleSpec, MemberSpec
from models.gmic import PRESETS as GMIC_PRESETS
from models.numerics import to_levels
from models.reading import read_mammogram
from tests.support.maps import assert_levels_close, rounding_cases

DEMO_GLIMPSENET = Path(__file__).parents[1] / "models/weights/demo-glimpsenet.safetensors"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu")
    torch.manual_seed(0)
    gmic = new_model_file(folder / "g.safetensors", "gmic", GMIC_PRESETS["demo"], name="g")
    allconv = new_model_file(folder / "a.safetensors", "allconv", ALLCONV_PRESETS["demo"], name="a")
    return (
        MemberSpec(gmic, ("none", "vflip")),
        MemberSpec(allconv, ("none", "vflip")),
        MemberSpec(DEMO_GLIMPSENET, ("none", "hflip")),  # trained: a mask with real peaks
    )


def test_cuda_fp32_equals_cpu_fp32(members, synth_exam_small):
    exam = [read_mammogram(img.dataset) for img in synth_exam_small.images]
    cpu = Ensemble(EnsembleSpec(members, device="cpu")).predict_exam(exam)
    gpu = Ensemble(EnsembleSpec(members, device="cuda")).predict_exam(exam)
    assert gpu.malignant == pytest.approx(cpu.malignant, abs=1e-5)
    for g, c in zip(gpu.images, cpu.images, strict=True):
        assert g.malignant == pytest.approx(c.malignant, abs=1e-5)
        assert g.per_model == pytest.approx(c.per_model, abs=1e-5)
        assert g.benign == pytest.approx(c.benign, abs=1e-5)
        # Levels of fp32 maps within 1e-4 (measured on an H200: 1e-5): a level apart at most,
        # where a rounding boundary falls between them; the fp32 peak the same pixel.
        assert_levels_close(g.malignant_map, c.malignant_map, atol=1e-4)
        assert g.malignant_peak == c.malignant_peak
        assert [r.box for r in g.rois] == [r.box for r in c.rois]  # the same crops


def test_cuda_bf16_keeps_every_crop_and_glimpse(members, synth_exam_small):
    """Reduced precision never moves a discrete choice: GMIC's crops and GlimpseNet's glimpses
    are decided in fp32 on the GPU too, so bf16 takes the same boxes as fp32."""
    exam = [read_mammogram(img.dataset) for img in synth_exam_small.images]
    fp32 = Ensemble(EnsembleSpec(members, device="cuda")).predict_exam(exam)
    bf16 = Ensemble(EnsembleSpec(members, device="cuda", precision="bf16")).predict_exam(exam)
    for a, b in zip(fp32.images, bf16.images, strict=True):
        # The same boxes; their order follows the weights, which the classifiers give in bf16.
        assert sorted(r.box for r in a.rois) == sorted(r.box for r in b.rois)
        assert b.malignant == pytest.approx(a.malignant, abs=0.05)


def test_levels_on_cuda_are_the_outputs_levels():
    """The maps are quantised on the GPU; the levels are the CPU's everywhere, ties included."""
    values = np.concatenate([rounding_cases(), np.float32([np.nan, -0.1, 0.0, 1.0, 1.5])])
    on_gpu = to_levels(torch.from_numpy(values).cuda()).cpu().numpy()
    assert np.array_equal(on_gpu, to_levels(torch.from_numpy(values)).numpy())
