"""GlimpseNet as an ensemble member beside GMIC and all-conv: `plugin run` on a synthetic
four-view exam writes a CAD SR and SEGs that dciodvfy accepts, naming all three models; the
GlimpseNet member's mask and glimpses land on each source grid. About 30 s on 2 cores."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
import torch

from models import new_model_file
from models.allconv import PRESETS as ALLCONV_PRESETS
from models.ensemble import Ensemble, EnsembleSpec, default_member
from models.glimpsenet import PRESETS
from models.gmic import PRESETS as GMIC_PRESETS
from models.reading import read_mammogram
from plugin.cli import main as plugin_main
from tests.support.outputs_samples import dciodvfy_errors

WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights"


def _member(folder: Path, family: str, presets: dict, seed: int) -> Path:
    shipped = WEIGHTS / f"demo-{family}.safetensors"
    if shipped.exists():
        return shipped
    torch.manual_seed(seed)
    path = folder / f"{family}.safetensors"
    return new_model_file(path, family, presets["demo"], name=f"test-{family}", version="0")


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("members")
    return [
        _member(folder, "gmic", GMIC_PRESETS, 0),
        _member(folder, "allconv", ALLCONV_PRESETS, 1),
        _member(folder, "glimpsenet", PRESETS, 2),
    ]


def test_plugin_run_with_three_families_writes_valid_objects(synth_dir, members, tmp_path, capsys):
    exam = tmp_path / "exam"
    exam.mkdir()
    first = sorted(p for p in synth_dir.iterdir() if p.is_dir())[0]
    for dcm in first.glob("*.dcm"):
        shutil.copy(dcm, exam / dcm.name)
    out = tmp_path / "out"
    models = [arg for m in members for arg in ("--model", f"{m}:none")]
    code = plugin_main(
        ["run", str(exam), "--out", str(out), "--outputs", "cad_sr,seg", "--device", "cpu",
         *models]
    )  # fmt: skip
    assert code == 0, capsys.readouterr()
    written = sorted(out.rglob("*.dcm"))
    assert len(written) == 5  # one CAD SR, four SEGs
    for path in written:
        assert dciodvfy_errors(path) == [], path.name
    sr = next(p for p in written if p.name.startswith("cad_sr"))
    names = {str(m) for m in _algorithm_names(pydicom.dcmread(sr))}
    assert any("glimpsenet" in n for n in names), names


def _algorithm_names(ds) -> list[str]:
    found = []
    for item in getattr(ds, "ContentSequence", []):
        if getattr(item, "ValueType", "") == "TEXT" and "Algorithm Name" in str(
            item.ConceptNameCodeSequence[0].CodeMeaning
        ):
            found.append(item.TextValue)
        found += _algorithm_names(item)
    return found


def test_glimpses_and_mask_land_on_the_source_grid(synth_exam_small, members):
    ensemble = Ensemble(EnsembleSpec(tuple(default_member(m) for m in members), device="cpu"))
    images = [read_mammogram(im.dataset) for im in synth_exam_small.images]
    result = ensemble.predict_exam(images)
    glimpsenet = next(m for m in ensemble.models if m.family == "glimpsenet")
    for image, pred in zip(images, result.images, strict=True):
        assert pred.malignant_map.shape == image.shape
        assert 0.0 <= pred.malignant <= 1.0 and 0.0 <= pred.benign <= 1.0
        assert set(pred.per_model) == {m.name for m in ensemble.models}
        rois = [r for r in pred.rois if r.model == glimpsenet.name]
        count = PRESETS["demo"]["glimpses"]["count"]
        assert 1 <= len(rois) <= count
        rows, cols = image.shape
        for r in rois:
            top, left, bottom, right = r.box
            assert 0 <= top < bottom <= rows and 0 <= left < right <= cols
            assert 0.0 <= r.weight <= 1.0
