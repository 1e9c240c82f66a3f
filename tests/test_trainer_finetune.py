"""Fine-tuning and evaluation end to end on small synthetic site data, on the CPU.

The lift test is the product's use case: a model trained on the "standard" synthetic detector
look only; the site's scanner has another vendor's look (`trainer synth --look vendor-b`: same
anatomy, different tone curve, edge enhancement and noise). The base loses accuracy on it, and
fine-tuning on the site's image-level labels alone (no lesion masks) must win it back, measured
on held-out exams of the same site. Its base is the demo all-conv v0.2 (tests/data), the
shipped one until 2026-11-29, which the look sends to chance (0.50). The demo that replaced it
(v0.3: v0.2 fine-tuned on 800 more exams) keeps 0.69 on vendor-b, and 24 exams lift it only to
0.73 (48 exams: 0.79), so it cannot show a lift of this size; see models/weights/README.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from models.allconv import PRESETS
from models.modelfile import new_model_file, read_card
from tests.support.held_out import held_out_report
from trainer import metrics
from trainer.cli import main
from trainer.finetune import FinetuneError, FinetuneOptions, finetune
from trainer.synth import write_dataset

# Measured on 2 CPU cores: 0.906 at home, 0.500 on the site's look; fine-tuned 0.832 on one
# machine image and 0.724 on another with bit-identical code (the numeric libraries pip resolved
# differed). The claim is the lift; the floor on the tuned AUC leaves room for that spread.
MIN_SHIFT_DROP = 0.2
MIN_LIFT = 0.2
MIN_TUNED_AUC = 0.70
DEMO_ALLCONV = (
    Path(__file__).resolve().parents[1] / "models" / "weights" / "demo-allconv.safetensors"
)
STANDARD_LOOK_BASE = Path(__file__).resolve().parent / "data" / "allconv-demo-v0.2.safetensors"


SITE_LOOK = "vendor-b"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    write_dataset(root, 24, positive_fraction=0.5, seed=4242, rows=1024, cols=832, look=SITE_LOOK)
    return root


@pytest.fixture(scope="module")
def holdout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exams of the same site no model has seen: the held-out set for before/after AUC."""
    root = tmp_path_factory.mktemp("holdout")
    write_dataset(root, 20, positive_fraction=0.5, seed=4343, rows=1024, cols=832, look=SITE_LOOK)
    return root


@pytest.fixture(scope="module")
def holdout_standard_look(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same held-out patients as the demo model's training data looks."""
    root = tmp_path_factory.mktemp("holdout-standard")
    write_dataset(root, 20, positive_fraction=0.5, seed=4343, rows=1024, cols=832)
    return root


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_dataset(root, 8, positive_fraction=0.5, seed=77, rows=256, cols=208)
    return root


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo all-conv architecture at a quarter of its input size: a cheap base model."""
    architecture = {**PRESETS["demo"], "input_shape": [288, 224]}
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-base") / "tiny.safetensors"
    return new_model_file(path, "allconv", architecture, name="tiny-allconv")


@pytest.fixture(scope="module")
def demo_base() -> Path:
    if not DEMO_ALLCONV.exists():
        pytest.skip(f"{DEMO_ALLCONV} is missing; train it with the commands in its README")
    return DEMO_ALLCONV


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_finetune_adapts_a_model_to_another_scanners_look(
    site: Path, holdout: Path, holdout_standard_look: Path, tmp_path: Path
):
    base = STANDARD_LOOK_BASE
    out = tmp_path / "site.safetensors"
    before = _sha(base)
    args = ["finetune", "--site-data", str(site), "--base", str(base), "--out", str(out)]
    # A new look changes low-level statistics, so all layers adapt from the first epoch.
    schedule = ["--epochs", "8", "--top-epochs", "0", "--lr", "3e-4", "--batch-size", "8"]
    assert main([*args, *schedule, "--augment", "flips", "--n-boot", "100", "--no-progress"]) == 0
    assert _sha(base) == before, "the base model file must never change"

    at_home = held_out_report(base, holdout_standard_look, tmp_path)["image"]["auc"]
    base_auc = held_out_report(base, holdout, tmp_path)["image"]["auc"]
    tuned_auc = held_out_report(out, holdout, tmp_path)["image"]["auc"]
    print(
        f"held-out image AUC (80 images): base on its own look {at_home:.3f}, on the site's "
        f"look {base_auc:.3f}; fine-tuned on the site's look {tuned_auc:.3f}"
    )
    assert at_home - base_auc >= MIN_SHIFT_DROP, "the site's look should cost the base model"
    assert tuned_auc - base_auc >= MIN_LIFT
    assert tuned_auc >= MIN_TUNED_AUC

    card = read_card(out)
    assert card.clinical_use is False
    assert card.provenance["base_model"]["sha256"] == before
    assert card.provenance["training"]["mask_supervision"] is None  # image labels only
    assert [s["name"] for s in card.provenance["training"]["stages"]] == ["all"]
    data = card.provenance["training_data"]
    assert data["summary"]["images"] == 96 and len(data["fingerprint_sha256"]) == 64
    split = data["split"]["counts"]
    assert sum(split[s]["patients"] for s in ("train", "val", "test")) == 24


def test_an_interrupted_run_resumes_to_the_same_weights(
    tiny_site: Path, tiny_base: Path, tmp_path: Path
):
    # Two stages (top layers, then all): the crash falls on the stage boundary.
    common = dict(
        site_data=tiny_site,
        base=tiny_base,
        epochs=2,
        top_epochs=1,
        batch_size=4,
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


def test_a_cosine_schedule_sets_each_epochs_rate_and_records_it(
    tiny_site: Path, tiny_base: Path, tmp_path: Path
):
    result = finetune(
        FinetuneOptions(
            site_data=tiny_site,
            base=tiny_base,
            out=tmp_path / "cosine.safetensors",
            epochs=3,
            lr=1e-3,
            schedule="cosine",
            batch_size=8,
            progress=False,
            n_boot=50,
        )
    )
    assert [row["lr"] for row in result.history] == pytest.approx([1e-3, 7.5e-4, 2.5e-4])
    training = read_card(result.out).provenance["training"]
    assert training["lr_schedule"] == "cosine"
    assert training["lr"] == 1e-3
    with pytest.raises(FinetuneError, match="--schedule must be one of constant, cosine"):
        finetune(
            FinetuneOptions(
                site_data=tiny_site, base=tiny_base, out=tmp_path / "x.safetensors", schedule="step"
            )
        )


def test_a_cache_that_cannot_be_written_says_where_and_what_to_do(
    tiny_site: Path, tiny_base: Path, tmp_path: Path
):
    """A real short write: the process may write no file over 64 KiB (as on a full disk, the
    kernel refuses the rest), and each cached input is about 0.8 MB."""

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process

    work = tmp_path / "work"
    args = ["finetune", "--site-data", str(tiny_site), "--base", str(tiny_base)]
    args += ["--out", str(tmp_path / "o.safetensors"), "--work-dir", str(work), "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("trainer finetune: error: could not write the preprocessed-input ")
    assert str(work / "inputs") in message and "pass --work-dir on a disk with room" in message
    assert not list((work / "inputs").iterdir()), "no entry, whole or partial, is left behind"


def test_finetune_refuses_to_write_over_its_base(site: Path, demo_base: Path):
    with pytest.raises(FinetuneError, match="never overwritten"):
        finetune(FinetuneOptions(site_data=site, base=demo_base, out=demo_base))


def test_glimpsenet_options_are_refused_for_another_family(
    tiny_site: Path, tiny_base: Path, tmp_path: Path, capsys
):
    args = ["finetune", "--site-data", str(tiny_site), "--base", str(tiny_base)]
    args += ["--out", str(tmp_path / "x.safetensors"), "--pooling", "topk:k=1", "--stage", "mil"]
    assert main(args) == 2
    assert "--stage, --pooling: GlimpseNet options" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_evaluate_reports_cis_plots_and_writes_an_operating_point(
    site: Path, demo_base: Path, tmp_path: Path
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
    assert set(result) == {"image", "breast", "exam", "localisation"}
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
