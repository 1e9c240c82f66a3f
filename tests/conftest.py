"""Shared fixtures: synthetic mammography exams from `trainer.synth`.

Session-scoped, so each is built once per test run; treat what they return as read-only
(copy a dataset with `copy.deepcopy` before changing it).

- `synth_exam_small`: one positive four-view exam (L-CC, L-MLO, R-CC, R-MLO) at 512x416
  (0.4 mm pixels), MONOCHROME2, 12 bits, in memory, seed 7, its malignant lesion a spiculated
  mass (visible at this size), no benign finding. `exam.malignant_side` names the breast with the
  lesion; `exam.image("L-CC").dataset` / `.malignant_mask` give each view.
- `synth_exam_negative_small`: the same, negative (no malignant lesion, no benign finding).
- `synth_dir`: a small dataset written to disk by `write_dataset`: 4 exams (2 positive) at
  512x416, seed 11, transfer syntaxes cycling explicit, jpeg2000, jpegls per image, photometric
  alternating MONOCHROME2/MONOCHROME1 per exam. Returns the folder; `synth_dir / "labels.csv"`
  lists the files (see `trainer.synth.LABEL_COLUMNS`, `read_labels`).
- `shared_reference`: the ../shared/reference folder, or a skip when it is absent.
- `make_listener`: `make(spool=…, database=…, min_free_bytes=…, **listener_config)` starts a
  real `Listener` on a free port over a fresh store in the test's folder; all are stopped, and
  the process-wide receive settings restored, after the test.
- `folder_service`: `with folder_service(name, outputs=[…], **config_sections) as running:`
  a real `plugin serve` with the demo models, delivering into a folder destination (see
  `service_harness.Serve`); for module-scoped service fixtures.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from pynetdicom import _config  # pynetdicom's documented configuration module

from plugin.config import ListenerConfig
from plugin.listener import Listener
from plugin.observability import AuditTrail, Metrics
from plugin.store import Store
from tests.support.dcmtk_peer import free_port
from tests.support.service_harness import Serve, demo_models, write_config
from trainer.synth import LesionType, SynthExam, synth_exam, write_dataset

SMALL_ROWS, SMALL_COLS = 512, 416


@pytest.fixture(scope="session")
def synth_exam_small() -> SynthExam:
    return synth_exam(
        7,
        rows=SMALL_ROWS,
        cols=SMALL_COLS,
        malignant=True,
        malignant_type=LesionType.SPICULATED_MASS,
        benign=False,
    )


@pytest.fixture(scope="session")
def synth_exam_negative_small() -> SynthExam:
    return synth_exam(8, rows=SMALL_ROWS, cols=SMALL_COLS, malignant=False, benign=False)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_dataset(
        out,
        4,
        positive_fraction=0.5,
        seed=11,
        transfer_syntax="mixed",
        photometric="mixed",
        rows=SMALL_ROWS,
        cols=SMALL_COLS,
    )
    return out


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    path = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
    if not path.is_dir():
        pytest.skip(f"shared reference notes not found at {path}; they live beside the repo")
    return path


@pytest.fixture
def make_listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # A listener sets these process-wide; restore them for the other tests.
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    started: list[Listener] = []

    def make(
        spool: Path | None = None,
        database: Path | None = None,
        min_free_bytes: int = 0,
        **config,
    ) -> Listener:
        store = Store(database or tmp_path / "db.sqlite", spool or tmp_path / "spool")
        listener = Listener(
            ListenerConfig(host="127.0.0.1", port=free_port(), **config),
            store,
            min_free_bytes=min_free_bytes,
            audit=AuditTrail(tmp_path / "audit.jsonl"),
            metrics=Metrics(),
        )
        listener.port = listener.start()
        started.append(listener)
        return listener

    yield make
    for listener in started:
        listener.stop(timeout=5)
        listener.store.close()


@pytest.fixture(scope="session")
def folder_service(tmp_path_factory: pytest.TempPathFactory):
    def start(name: str, outputs: Sequence[str] = ("cad_sr",), **sections) -> Serve:
        tmp = tmp_path_factory.mktemp(name)
        config = write_config(
            tmp / "svc",
            port=free_port(),
            models=demo_models(tmp / "models"),
            destinations=[
                {"type": "folder", "name": "folder", "path": "results", "outputs": list(outputs)}
            ],
            **sections,
        )
        return Serve.start(config)

    return start
