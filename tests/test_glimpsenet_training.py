"""`trainer finetune --arch glimpsenet-demo` end to end on 12 small synthetic exams: both
stages lower their loss, the model file says what it is (`plugin models info`), a finished run
resumes from its checkpoint to the same weights, `trainer evaluate` scores it, and wrong
options get specific errors.
About 40 s on 2 idle cores, 100 s on busy ones."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from models import read_card
from plugin.cli import main as plugin_main
from trainer.cli import main as trainer_main
from trainer.glimpsenet.objectives import fcgn_loss, mil_loss
from trainer.synth import write_dataset


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("gn-synth")
    write_dataset(out, 12, positive_fraction=0.5, seed=5, rows=512, cols=416)
    return out


def _args(site, out, *extra):
    return [
        "finetune", "--site-data", str(site), "--arch", "glimpsenet-demo", "--out", str(out),
        "--fcgn-epochs", "3", "--epochs", "3", "--lr", "1e-3", "--batch-size", "4",
        "--seed", "0", "--n-boot", "20", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(site, tmp_path_factory):
    out = tmp_path_factory.mktemp("gn-model") / "gn.safetensors"
    assert trainer_main(_args(site, out)) == 0
    return out


def test_both_stages_lower_their_loss(trained):
    history = read_card(trained).provenance["training"]["history"]
    fcgn = [h["train_loss"] for h in history if h["stage"] == "fcgn"]
    mil = [h["train_loss"] for h in history if h["stage"] == "mil"]
    assert len(fcgn) == 3 and len(mil) == 3
    assert fcgn[-1] < fcgn[0]
    assert min(mil[1:]) < mil[0]


def test_card_names_family_pooling_stages_and_provenance(trained, capsys):
    assert plugin_main(["models", "info", str(trained)]) == 0
    shown = capsys.readouterr().out
    assert "family:          glimpsenet" in shown
    assert '"pooling": {"kind": "lse", "r": 5.0}' in shown
    assert "provenance.training_data" in shown and "provenance.base_model" in shown
    card = read_card(trained)
    assert card.name == "demo-glimpsenet" and not card.clinical_use
    stages = card.provenance["training"]["stages"]
    assert [s["name"] for s in stages] == ["fcgn", "mil"]
    assert stages[0]["lambda"] == 100.0 and stages[0]["loss"] == "weighted"
    assert stages[1]["weight_decay"] == 0.01 and stages[1]["dropout"] == 0.4
    assert "benign-without-callback" in stages[1]["bwc_handling"]
    peaks = card.provenance["metrics"]["test_mask_peak_within_5mm"]
    assert peaks["radius_mm"] == 5.0 and peaks["images"] >= 1
    json.dumps(card.provenance)  # all JSON


def test_a_finished_run_resumes_to_the_same_weights(site, trained, capsys):
    work = trained.with_name(trained.name + ".work")
    assert (work / "glimpsenet-checkpoint.pt").exists()
    before = load_file(str(trained))
    assert trainer_main(_args(site, trained)) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert trainer_main(_args(site, trained, "--resume", "--overwrite")) == 0
    after = load_file(str(trained))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_cosine_fcgn_schedule_anneals_the_learning_rate(site, tmp_path):
    out = tmp_path / "fcgn.safetensors"
    args = _args(site, out, "--stage", "fcgn", "--fcgn-schedule", "cosine")
    assert trainer_main(args) == 0
    card = read_card(out)
    history = card.provenance["training"]["history"]
    # lr at epoch t of 3: 1e-3 · (1 + cos(πt/3)) / 2
    assert [h["lr"] for h in history] == pytest.approx([1e-3, 7.5e-4, 2.5e-4])
    (stage,) = card.provenance["training"]["stages"]
    assert stage["name"] == "fcgn" and stage["lr_schedule"] == "cosine"


def test_pooling_replaces_the_bases_and_keeps_its_weights(site, trained, tmp_path):
    out = tmp_path / "topk.safetensors"
    args = ["finetune", "--site-data", str(site), "--base", str(trained), "--out", str(out),
            "--stage", "mil", "--pooling", "topk:k=1", "--epochs", "1", "--lr", "0",
            "--batch-size", "4", "--n-boot", "20", "--no-progress"]  # fmt: skip
    assert trainer_main(args) == 0
    assert read_card(out).architecture["pooling"] == {"kind": "topk", "k": 1, "by": 2}
    assert read_card(trained).architecture["pooling"] == {"kind": "lse", "r": 5.0}
    before, after = load_file(str(trained)), load_file(str(out))
    assert before.keys() == after.keys()
    # at lr 0 only the batch-norm statistics of the classifier move; the FCGN is frozen
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("fcgn."))
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith(statistics))


def test_wrong_options_are_refused_with_what_to_do(site, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert trainer_main(_args(site, out, "--stage", "mil")) == 2
    assert "--base" in capsys.readouterr().err
    args = _args(site, out)
    args[args.index("glimpsenet-demo")] = "glimpsenet-huge"
    assert trainer_main(args) == 2
    assert "glimpsenet-paper, glimpsenet-demo" in capsys.readouterr().err
    assert trainer_main(_args(site, out, "--pooling", "topk:k=9")) == 2
    assert "k <= 8" in capsys.readouterr().err
    assert trainer_main(_args(site, out, "--pooling", "max")) == 2
    assert "pooling" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        trainer_main(_args(site, out, "--pooling", "lse:r"))
    assert "not NAME=VALUE" in capsys.readouterr().err


def test_fcgn_loss_forms_by_hand():
    raw = torch.tensor([[[[0.5, 0.0]]]])
    target = torch.tensor([[[[1.0, 0.0]]]])
    # printed: mean((Î − λI)²) = ((0.5 − 100)² + 0) / 2
    assert fcgn_loss(raw, target, "printed", 100.0).item() == pytest.approx(99.5**2 / 2)
    # weighted: a missed lesion pixel weighs λ, a background pixel 1
    assert fcgn_loss(raw, target, "weighted", 100.0).item() == pytest.approx(100 * 0.25 / 2)
    assert fcgn_loss(target, target, "weighted").item() == 0.0
    with pytest.raises(ValueError, match="unknown FCGN loss"):
        fcgn_loss(raw, target, "l1")


def test_mil_loss_ignores_unknown_labels():
    pooled = torch.tensor([[0.1, 0.5, 0.9]])
    targets = torch.tensor([[0.0, 1.0, 1.0]])
    known = torch.tensor([[1.0, 0.0, 1.0]])  # benign label not given
    want = -(math.log(0.9) + math.log(0.9)) / 2
    assert mil_loss(pooled, targets, known).item() == pytest.approx(want, rel=1e-5)


def test_trainer_evaluate_scores_a_glimpsenet(site, trained, capsys):
    args = ["evaluate", "--model", str(trained), "--site-data", str(site), "--n-boot", "20"]
    assert trainer_main(args) == 0
    out = capsys.readouterr().out
    assert "demo-glimpsenet" in out and "image" in out
