"""`trainer evaluate` of one model on every image of a held-out folder, as the lift tests
measure a model before and after fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.cli import main


def held_out_report(model: Path, folder: Path, tmp_path: Path) -> dict:
    """The `--json` report of `model` on all of `folder` (100 bootstrap resamples)."""
    report = tmp_path / f"{model.stem}-{folder.name}.json"
    args = ["evaluate", "--model", str(model), "--site-data", str(folder), "--split", "all"]
    assert main([*args, "--json", str(report), "--n-boot", "100", "--no-progress"]) == 0
    return json.loads(report.read_text())
