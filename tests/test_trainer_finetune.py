"""Fine-tuning and evaluation end to end on small synthetic site data, on the CPU.

The fine-tuning scenario is the all-conv paper's: a trunk that already knows the images (the
shipped demo model's) under freshly initialised top layers. The base therefore scores at
chance; `trainer finetune` must lift held-out AUC clearly above it.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from models.family import get_family
from models.modelfile import load_model, read_card, save_model
from trainer import metrics
from trainer.cli import main
from trainer.finetune import FinetuneError, FinetuneOptions, finetune
from trainer.synth import write_dataset

DEMO_ALLCONV = (
    Path(__file__).resolve().parents[1] / "models" / "weights" / "demo-allconv.safetensors"
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    write_dataset(root, 24, positive_fraction=0.5, seed=4242, rows=512, cols=416)
    return root


@pytest.fixture(scope="module")
def fresh_top_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo all-conv model with its top layers and classifier re-initialised."""
    if not DEMO_ALLCONV.exists():
        pytest.skip(f"{DEMO_ALLCONV} is missing; train it with the commands in its README")
    module = load_model(DEMO_ALLCONV)
    card = module.card
    torch.manual_seed(0)
    fresh = get_family("allconv").build(card.architecture)
    module.top.load_state_dict(fresh.top.state_dict())
    module.fc.load_state_dict(fresh.fc.state_dict())
    card.name = "demo-allconv-new-top"
    card.provenance = {"note": "demo trunk, re-initialised top layers"}
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    return save_model(module, card, path)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_finetune_lifts_held_out_auc_above_the_base(site: Path, fresh_top_base: Path, tmp_path):
    out = tmp_path / "site.safetensors"
    before = _sha(fresh_top_base)
    code = main(
        [
            "finetune",
            "--site-data",
            str(site),
            "--base",
            str(fresh_top_base),
            "--out",
            str(out),
            "--epochs",
            "4",
            "--top-epochs",
            "2",
            "--lr",
            "3e-3",
            "--batch-size",
            "8",
            "--n-boot",
            "200",
            "--no-progress",
        ]
    )
    assert code == 0
    assert _sha(fresh_top_base) == before, "the base model file must never change"
    card = read_card(out)
    test = card.provenance["metrics"]["test"]["image"]
    base = card.provenance["metrics"]["base_test"]["image"]
    print(f"held-out image AUC: base {base['auc']:.3f} -> fine-tuned {test['auc']:.3f}")
    assert base["auc"] < 0.65
    assert test["auc"] >= 0.75
    assert test["auc"] - base["auc"] >= 0.2
    assert card.clinical_use is False
    assert card.provenance["base_model"]["sha256"] == before
    assert [s["name"] for s in card.provenance["training"]["stages"]] == ["top", "all"]
    data = card.provenance["training_data"]
    assert data["summary"]["images"] == 96 and len(data["fingerprint_sha256"]) == 64
    split = data["split"]["counts"]
    assert sum(split[s]["patients"] for s in ("train", "val", "test")) == 24


def test_an_interrupted_run_resumes_to_the_same_weights(site: Path, tmp_path: Path):
    common = dict(
        site_data=site,
        arch="allconv-demo",
        epochs=2,
        batch_size=8,
        seed=3,
        progress=False,
        n_boot=50,
    )
    straight = finetune(FinetuneOptions(out=tmp_path / "straight.safetensors", **common))

    class Crash(Exception):
        pass

    def crash_after_first_epoch(row: dict) -> None:
        if row["epoch"] == 1:
            raise Crash

    options = FinetuneOptions(out=tmp_path / "resumed.safetensors", **common)
    with pytest.raises(Crash):
        finetune(options, on_epoch_end=crash_after_first_epoch)
    assert not options.out.exists()
    with pytest.raises(FinetuneError, match="pass --resume"):
        finetune(options)
    options.resume = True
    resumed = finetune(options)

    assert [h["val_auc"] for h in resumed.history] == [h["val_auc"] for h in straight.history]
    with safe_open(str(straight.out), "pt") as a, safe_open(str(resumed.out), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_finetune_refuses_to_write_over_its_base(site: Path, fresh_top_base: Path):
    with pytest.raises(FinetuneError, match="never overwritten"):
        finetune(FinetuneOptions(site_data=site, base=fresh_top_base, out=fresh_top_base))


def test_evaluate_reports_cis_plots_and_writes_an_operating_point(
    site: Path, fresh_top_base: Path, tmp_path: Path
):
    model = tmp_path / "model.safetensors"
    model.write_bytes(DEMO_ALLCONV.read_bytes())
    report_json, out_dir = tmp_path / "auc.json", tmp_path / "report"
    code = main(
        [
            "evaluate",
            "--model",
            str(model),
            "--site-data",
            str(site),
            "--split",
            "all",
            "--json",
            str(report_json),
            "--out",
            str(out_dir),
            "--n-boot",
            "300",
            "--set-operating-point",
            "sensitivity=0.8",
            "--no-progress",
        ]
    )
    assert code == 0
    result = json.loads(report_json.read_text())
    assert set(result) == {"image", "breast", "exam"}
    assert [result[k]["n"] for k in ("image", "breast", "exam")] == [96, 48, 24]

    with (out_dir / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r["malignant"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    assert result["image"]["auc"] == pytest.approx(metrics.roc_auc(labels, scores), abs=1e-9)
    seed = 0  # the demo model was not trained on this data, so the default split seed
    aucs = [
        metrics.roc_auc(labels[i], scores[i])
        for i in metrics.bootstrap_indices(len(labels), 300, seed)
        if 0 < labels[i].sum() < len(i)
    ]
    assert result["image"]["ci95"] == pytest.approx(np.percentile(aucs, [2.5, 97.5]), abs=1e-6)

    for name in ("roc.png", "calibration.png"):
        with Image.open(out_dir / name) as im:
            assert im.format == "PNG" and im.size == (640, 640)
            assert len(im.getcolors(maxcolors=1 << 16)) > 3  # drew something
    assert (out_dir / "operating_points.csv").read_text().count("\n") > 10

    card = read_card(model)
    threshold = card.operating_points["default"]
    assert metrics.at_threshold(labels, scores, threshold).sensitivity >= 0.8
    assert card.provenance["operating_points"]["default"]["criterion"] == "sensitivity=0.8"
    with safe_open(str(model), "pt") as a, safe_open(str(DEMO_ALLCONV), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
