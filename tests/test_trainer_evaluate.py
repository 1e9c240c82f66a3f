"""Honest evaluation: warnings on figures that cannot bear weight, no threshold tuned on the test
split by accident, one bootstrap for `finetune` and `evaluate`, the localisation figure, and
progress output that suits a log file. Small synthetic data on the CPU (~30 s)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.allconv import PRESETS
from models.ensemble import Ensemble, EnsembleSpec, MemberSpec
from models.mammogram import Laterality, View
from models.modelfile import new_model_file, read_card
from models.pixels import read_mammogram_file
from models.results import ImagePrediction
from tests.support.maps import malignant_fields
from trainer.cli import main
from trainer.evaluate import Case, aggregate, level_report
from trainer.finetune import FinetuneOptions, finetune
from trainer.localisation import localisation_report, peak_distance, wilson_interval
from trainer.progress import PlainProgress
from trainer.sitedata import load_site_data
from trainer.synth import write_dataset


@pytest.fixture(scope="module")
def small_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    write_dataset(root, 10, positive_fraction=0.5, seed=91, rows=512, cols=416)
    return root


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    architecture = {**PRESETS["demo"], "input_shape": [288, 224]}
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("small-model") / "small.safetensors"
    return new_model_file(path, "allconv", architecture, name="small-allconv")


def _cases(labels: list[int], scores: list[float]) -> list[Case]:
    return [Case(str(i), y, s) for i, (y, s) in enumerate(zip(labels, scores, strict=True))]


def test_few_cases_equal_scores_and_a_collapsed_ci_are_called_out():
    few = level_report("image", _cases([1, 1, 1, 1, 0, 0, 0, 0], [0.9, 0.8, 0.7, 0.6] + [0.1] * 4))
    assert few.auc == 1.0 and few.ci95 == (1.0, 1.0)
    text = " ".join(few.warnings)
    assert "only 4 malignant" in text and "only 4 non-malignant" in text
    assert "collapsed to 1.000" in text

    flat = level_report("exam", _cases([1] * 12 + [0] * 12, [0.5] * 24))
    assert flat.auc == 0.5
    assert any("every score is 0.5" in w for w in flat.warnings)
    assert any("collapsed to 0.500" in w for w in flat.warnings)

    rng = np.random.default_rng(0)
    labels = [1] * 30 + [0] * 30
    scores = list(rng.normal(size=60) + np.array(labels))
    assert level_report("image", _cases(labels, scores)).warnings == ()


def test_operating_point_on_the_test_split_is_refused_unless_allowed(
    small_site: Path, small_model: Path, capsys
):
    args = ["evaluate", "--model", str(small_model), "--site-data", str(small_site)]
    assert main([*args, "--set-operating-point", "sensitivity=0.8", "--no-progress"]) != 0
    assert "choose it on the validation split" in capsys.readouterr().err
    assert read_card(small_model).operating_points == {}


@pytest.mark.slow
def test_finetune_and_evaluate_report_the_same_ci(small_site: Path, small_model: Path, tmp_path):
    out = tmp_path / "tuned.safetensors"
    result = finetune(
        FinetuneOptions(site_data=small_site, base=small_model, out=out, epochs=1, progress=False)
    )
    card = read_card(out)
    assert card.provenance["training"]["recipe"] == "adapt"
    assert [s["name"] for s in card.provenance["training"]["stages"]] == ["all"]
    report = tmp_path / "eval.json"
    args = ["evaluate", "--model", str(out), "--site-data", str(small_site), "--split", "test"]
    assert main([*args, "--json", str(report), "--no-progress"]) == 0
    evaluated = json.loads(report.read_text())
    for level, r in result.test.items():
        assert evaluated[level]["auc"] == pytest.approx(r.auc)
        assert evaluated[level]["ci95"] == pytest.approx(list(r.ci95))
        assert card.provenance["metrics"]["test"][level]["ci95"] == pytest.approx(list(r.ci95))


@pytest.mark.slow
def test_an_ensemble_is_evaluated_with_flips_localisation_and_a_marked_roc(
    small_site: Path, small_model: Path, tmp_path: Path, capsys
):
    other = tmp_path / "other.safetensors"
    torch.manual_seed(3)
    architecture = {**PRESETS["demo"], "input_shape": [288, 224]}
    new_model_file(other, "allconv", architecture, name="other-allconv")
    report, out_dir = tmp_path / "ens.json", tmp_path / "ens"
    args = ["evaluate", "--model", f"{small_model}:none,hflip", "--model", str(other)]
    args += ["--site-data", str(small_site), "--split", "all", "--json", str(report)]
    assert main([*args, "--out", str(out_dir), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert result["image"]["n"] == 40
    located = result["localisation"]
    assert located["n"] == 10 and located["within_mm"] == 5.0  # 5 positive exams x 2 views
    assert 0 <= located["localised"] <= 10 and located["median_distance_mm"] >= 0
    assert "localisation: map peak within 5 mm" in printed
    assert "warning: image: only 10 malignant" not in printed  # exactly 10 is enough
    assert "warning: exam: only 5 malignant" in printed
    with Image.open(out_dir / "roc.png") as im:
        assert im.size == (640, 640) and len(im.getcolors(maxcolors=1 << 16)) > 5


def test_peak_distance_is_measured_on_the_source_grid_in_mm(small_site: Path):
    data = load_site_data(small_site)
    image = next(im for im in data.images if im.malignant and im.malignant_mask)
    with Image.open(image.malignant_mask) as png:
        mask = np.asarray(png.convert("L")) > 0
    rows, cols = np.nonzero(mask)
    on = np.zeros(mask.shape, np.float32)
    on[rows[0], cols[0]] = 1.0
    assert peak_distance(image, _prediction(image, on), (0.4, 0.4)).distance_mm == 0.0
    off = np.zeros(mask.shape, np.float32)
    row = rows.min() - 10  # 10 pixels above the lesion's top row
    off[row, cols[rows == rows.min()][0]] = 1.0
    off_lesion = _prediction(image, off)
    assert peak_distance(image, off_lesion, (0.4, 0.4)).distance_mm == pytest.approx(4.0)
    assert peak_distance(image, off_lesion, (0.6, 0.6)).distance_mm == pytest.approx(6.0)
    # The peak is the fp32 one: a pixel just below it that rounds to the same level is
    # earlier in row-major order, yet the distance is still measured from the peak.
    off[0, 0] = 0.999
    assert _prediction(image, off).malignant_map[0, 0] == 255
    assert peak_distance(image, _prediction(image, off), (0.4, 0.4)).distance_mm == 4.0


def _prediction(image, malignant_map: np.ndarray) -> ImagePrediction:
    """A prediction for `image` whose malignancy map is `malignant_map` (floats in [0, 1]),
    as the ensemble hands it over (levels, and the peak found in fp32)."""
    return ImagePrediction(
        image.sop_instance_uid,
        Laterality(image.laterality),
        View(image.view),
        0.5,
        None,
        {},
        benign_map=None,
        **malignant_fields(malignant_map),
    )


def test_breast_and_exam_scores_are_the_ensembles(small_site: Path, small_model: Path):
    """`trainer evaluate` measures the scores the service reports: its breast and exam cases,
    from the ensemble's image scores, are the ensemble's own breasts and exam."""
    data = load_site_data(small_site)
    study = data.images[0].study_instance_uid
    images = [im for im in data.images if im.study_instance_uid == study]
    ensemble = Ensemble(EnsembleSpec((MemberSpec(small_model),), device="cpu"))
    prediction = ensemble.predict_exam([read_mammogram_file(im.path) for im in images])
    scores = np.array([prediction.image(im.sop_instance_uid).malignant for im in images])
    cases = aggregate(images, scores)
    breasts = {b.laterality: b.malignant for b in prediction.breasts}
    assert {c.key: c.score for c in cases["breast"]} == {
        f"{study}/{side}": breasts[side] for side in breasts
    }
    assert [c.score for c in cases["exam"]] == [prediction.malignant]


def test_localisation_fraction_and_wilson_interval():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.490, abs=1e-3) and hi == pytest.approx(0.943, abs=1e-3)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert localisation_report([]).fraction is None


def test_progress_writes_plain_periodic_lines_off_a_terminal():
    stream = io.StringIO()
    bar = PlainProgress(range(5), "preprocess", "img", every_s=0.0, stream=stream)
    bar.set_postfix(loss="0.5")
    assert list(bar) == [0, 1, 2, 3, 4]
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("preprocess: 1/5 img") and "loss=0.5" in lines[0]
    assert lines[-1].startswith("preprocess: 5/5 img")
    assert "\r" not in stream.getvalue()


def test_a_gmic_member_under_a_horizontal_flip_is_refused(small_site: Path, capsys):
    """GMIC faces every breast one way, so `hflip` would score breasts it never sees."""
    gmic = Path(__file__).resolve().parents[1] / "models/weights/demo-gmic.safetensors"
    args = ["evaluate", "--model", f"{gmic}:none,hflip", "--site-data", str(small_site)]
    assert main([*args, "--split", "all", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "gmic's preprocessing never gives its models an image flipped by hflip" in err
    assert "choose its flips from none, vflip" in err
