"""`plugin run`: synthetic four-view exams on disk (uncompressed, JPEG 2000, JPEG-LS,
MONOCHROME1) through the real ensemble to the full set of result objects; a re-run writes the
same UIDs; a partial exam is analysed and reported as partial."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
import torch

from models.gmic import PRESETS
from models.modelfile import new_model_file
from plugin.cli import main
from plugin.commands.run import DEMO_MODELS, WEIGHTS_DIR
from trainer.synth import read_labels

SOP_CLASSES = {
    "cad_sr": "1.2.840.10008.5.1.4.1.1.88.50",
    "tid1500": "1.2.840.10008.5.1.4.1.1.88.33",
    "tid1500_scores": "1.2.840.10008.5.1.4.1.1.88.33",
    "seg": "1.2.840.10008.5.1.4.1.1.66.4",
    "sc": "1.2.840.10008.5.1.4.1.1.7",
}
VIEWS = ("R-CC", "L-CC", "R-MLO", "L-MLO")
ALL_OUTPUTS = ["--outputs", "cad_sr,tid1500,tid1500_scores,seg,sc", "--device", "cpu"]


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> list[str]:
    """The shipped demo model when present, else a freshly initialised demo-size GMIC."""
    shipped = WEIGHTS_DIR / DEMO_MODELS[0]
    if shipped.exists():
        return ["--model", f"{shipped}:none"]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "gmic.safetensors"
    new_model_file(path, "gmic", PRESETS["demo"], name="test-gmic-demo", version="0.0.1")
    return ["--model", f"{path}:none"]


def _uids(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in sorted(out.rglob("*.dcm"))
    }


@pytest.fixture(scope="module")
def first_run(synth_dir, model_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    code = main(["run", str(synth_dir), "--out", str(out), *ALL_OUTPUTS, *model_args])
    return code, out


def test_writes_the_full_set_per_study(first_run, synth_dir):
    code, out = first_run
    assert code == 0
    labels = read_labels(synth_dir / "labels.csv")
    syntaxes = {
        str(pydicom.dcmread(r["path"], stop_before_pixels=True).file_meta.TransferSyntaxUID)
        for r in labels
    }
    photometric = {
        pydicom.dcmread(r["path"], stop_before_pixels=True).PhotometricInterpretation
        for r in labels
    }
    assert {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"} <= syntaxes
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}

    studies = {r["study_instance_uid"] for r in labels}
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == len(studies) == 4
    expected = {"cad_sr.dcm", "tid1500.dcm", "tid1500_scores.dcm", "results.json"}
    expected |= {f"{kind}_{view}.dcm" for kind in ("seg", "sc") for view in VIEWS}
    for folder in folders:
        assert {p.name for p in folder.iterdir()} == expected
        summary = json.loads((folder / "results.json").read_text())
        assert summary["study_instance_uid"] in studies
        assert summary["missing_views"] == [] and summary["skipped"] == []
        assert set(summary["images"]) == set(VIEWS)
        for path in folder.glob("*.dcm"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            kind = path.stem if path.stem in SOP_CLASSES else path.stem.rsplit("_", 1)[0]
            assert ds.SOPClassUID == SOP_CLASSES[kind]
            assert ds.StudyInstanceUID == summary["study_instance_uid"]
        seg = pydicom.dcmread(folder / "seg_L-MLO.dcm", stop_before_pixels=True)
        source = summary["images"]["L-MLO"]["sop_instance_uid"]
        assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]\
            .ReferencedSOPInstanceUID == source  # fmt: skip


def test_rerun_writes_identical_uids(first_run, synth_dir, model_args, tmp_path):
    _, out = first_run
    assert main(["run", str(synth_dir), "--out", str(tmp_path), *ALL_OUTPUTS, *model_args]) == 0
    assert _uids(tmp_path) == _uids(out)


def test_partial_exam_is_analysed_and_reported(synth_dir, model_args, tmp_path, capsys):
    labels = read_labels(synth_dir / "labels.csv")
    study = labels[0]["study_instance_uid"]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for row in labels:
        if row["study_instance_uid"] == study and f"{row['laterality']}-{row['view']}" != "R-MLO":
            shutil.copy(row["path"], inputs / Path(row["path"]).name)
    (inputs / "notes.txt").write_text("not DICOM")
    out = tmp_path / "out"
    assert main(["run", str(inputs), "--out", str(out), "--outputs", "cad_sr,seg",
                 "--device", "cpu", *model_args]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "R-MLO" in printed and "1 non-DICOM files ignored" in printed
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert study not in printed and study not in folder.name  # no identifiers on the console
    summary = json.loads((folder / "results.json").read_text())
    assert summary["missing_views"] == ["R-MLO"] and summary["exam"]["partial"] is True
    assert {p.name for p in folder.glob("*.dcm")} == {
        "cad_sr.dcm", "seg_R-CC.dcm", "seg_L-CC.dcm", "seg_L-MLO.dcm"
    }  # fmt: skip
    sr = pydicom.dcmread(folder / "cad_sr.dcm")
    assert sr.CompletionFlag == "PARTIAL" and "R-MLO" in sr.CompletionFlagDescription


def test_no_dicom_is_a_clear_error(tmp_path, model_args, capsys):
    (tmp_path / "a.txt").write_text("x")
    assert main(["run", str(tmp_path), "--out", str(tmp_path / "o"), *model_args]) == 2
    assert "no DICOM instances" in capsys.readouterr().err


def test_bad_outputs_option_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["run", "x", "--out", "y", "--outputs", "cad_sr,gsps"])
    assert "unknown output" in capsys.readouterr().err


def test_config_file_supplies_models_policy_and_outputs(synth_dir, model_args, tmp_path, capsys):
    labels = read_labels(synth_dir / "labels.csv")
    study = labels[0]["study_instance_uid"]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for row in labels:
        if row["study_instance_uid"] == study:
            shutil.copy(row["path"], inputs / Path(row["path"]).name)
    model_path = model_args[1].rsplit(":", 1)[0]
    config = tmp_path / "config.yml"
    config.write_text(
        "models:\n"
        f"  members: [{{path: {model_path}, flips: [none]}}]\n"
        "  device: cpu\n"
        "exams:\n"
        "  selection: {tie_break: highest_instance_number}\n"
        "destinations:\n"
        "  - {name: here, type: folder, path: results, outputs: [cad_sr]}\n"
    )
    out = tmp_path / "out"
    assert main(["run", str(inputs), "--out", str(out), "--config", str(config)]) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert {p.name for p in folder.glob("*.dcm")} == {"cad_sr.dcm"}

    config.write_text(config.read_text().replace("tie_break", "tie_brake"))
    assert main(["run", str(inputs), "--out", str(out), "--config", str(config)]) == 2
    assert "tie_brake" in capsys.readouterr().err
