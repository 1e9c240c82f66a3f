"""The shipped demo models' figures on unseen exams in README and models/weights/README.md,
measured the way they were: `trainer synth` writes the 24 unseen exams (seed 777013, default
size) and `trainer evaluate` scores the shipped files on them, alone and as the default
ensemble of config.yml (its members and flips). The floors sit a little below the recorded
figures, because the numeric stack pip resolves moves a score in its last digits. About
3 minutes on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plugin.config import load_config
from trainer.cli import main as trainer_main

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "models/weights"


@pytest.fixture(scope="module")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("unseen")
    assert trainer_main(["synth", "--out", str(folder), "--exams", "24", "--seed", "777013"]) == 0
    return folder


def _evaluate(models: list[str], unseen: Path, tmp_path: Path, capsys) -> dict:
    report = tmp_path / "report.json"
    args = ["evaluate", *(a for m in models for a in ("--model", m)), "--site-data", str(unseen)]
    args += ["--split", "all", "--within-mm", "5", "--json", str(report), "--no-progress"]
    assert trainer_main(args) == 0
    print(capsys.readouterr().out)
    result = json.loads(report.read_text())
    assert result["image"]["n"] == 96 and result["localisation"]["n"] == 24
    return result


# Each shipped file alone: the floors, and what was recorded (models/weights/README.md).
SHIPPED = [
    # recorded 0.962 (0.923-0.991) and 15 of 24; v0.1 had 0.583 and 0
    pytest.param("demo-gmic", 0.945, 13, id="gmic"),
    # v0.4 recorded 0.919 (0.852-0.971) and 1 of 24 (a 5x4 map); v0.3 had 0.850, v0.2 0.663
    pytest.param("demo-allconv", 0.90, 0, id="allconv"),
    # under the ensemble's flips: v0.4 recorded 0.947 (0.903-0.982); v0.3 0.876
    pytest.param("demo-allconv:none,hflip", 0.93, 0, id="allconv-flips"),
    # v0.5 recorded 0.985 (0.958-1.000) and 21 of 24; v0.4 had 0.879 and 16. Issue 14's
    # targets: AUC >= 0.90, the mask peak within 5 mm on >= 80 % (20 of 24)
    pytest.param("demo-glimpsenet", 0.97, 20, id="glimpsenet"),
    # under the ensemble's flips: v0.5 recorded 0.998 (0.991-1.000) and 21; v0.4 0.952 and 19
    pytest.param("demo-glimpsenet:none,hflip", 0.98, 20, id="glimpsenet-flips"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "min_auc", "min_localised"), SHIPPED)
def test_a_shipped_model_scores_the_unseen_exams_as_documented(
    name, min_auc, min_localised, unseen, tmp_path, capsys
):
    file, _, flips = name.partition(":")
    model = str(WEIGHTS / f"{file}.safetensors") + (f":{flips}" if flips else "")
    result = _evaluate([model], unseen, tmp_path, capsys)
    assert result["image"]["auc"] >= min_auc
    assert result["localisation"]["localised"] >= min_localised


@pytest.mark.slow
def test_the_default_ensemble_scores_the_unseen_exams_as_documented(unseen, tmp_path, capsys):
    members = load_config(REPO / "config.yml").models.members
    models = [f"{m.path}:{','.join(m.flips)}" for m in members]
    assert len(models) == 3
    result = _evaluate(models, unseen, tmp_path, capsys)
    # recorded: 0.994 (0.982-1.000); with GlimpseNet v0.4 0.976, with GlimpseNet v0.3 0.968
    assert result["image"]["auc"] >= 0.98
    # recorded: 22 of 24; with GlimpseNet v0.4 (and v0.3) 20; GMIC under hflip 18
    assert result["localisation"]["localised"] >= 21
