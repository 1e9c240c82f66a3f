"""On a CUDA GPU, fp32 is fp32: the ensemble's scores equal the CPU's within 1e-5 (TF32 would
move them by ~1e-3), with the preprocessing, the mapping onto the source grid and the maps'
quantisation to 8-bit levels on the GPU.
Skipped without CUDA; about 30 s with one."""

from __future__ import annotations

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
    return (MemberSpec(gmic, ("none", "vflip")), MemberSpec(allconv, ("none", "vflip")))


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


def test_levels_on_cuda_are_the_outputs_levels():
    """The maps are quantised on the GPU; the levels are the CPU's everywhere, ties included."""
    values = np.concatenate([rounding_cases(), np.float32([np.nan, -0.1, 0.0, 1.0, 1.5])])
    on_gpu = to_levels(torch.from_numpy(values).cuda()).cpu().numpy()
    assert np.array_equal(on_gpu, to_levels(torch.from_numpy(values)).numpy())
