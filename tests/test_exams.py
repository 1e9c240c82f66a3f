"""Exam assembly: early close on four views after the settle time, partial exams after the
quiet timeout, the hard maximum, skipped exams with reasons, and timers that survive a
restart because they come from stored timestamps."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from models.header import MG_FOR_PRESENTATION, ImageDescription, VoiInfo
from models.mammogram import ImageKind, Laterality, View
from plugin.config import ExamsConfig
from plugin.exams import Assembler
from plugin.observability import AuditTrail, Metrics
from plugin.store import NewInstance, Store

STUDY = "1.2.3"
CONFIG = ExamsConfig(settle_seconds=2, quiet_seconds=10, max_wait_seconds=30)


def facts(view_key: str, **changes) -> ImageDescription:
    """What `describe` says of a plain screening view, with `changes` (e.g. kind=…)."""
    side, view = view_key.split("-")
    return replace(
        ImageDescription(
            sop_instance_uid="",
            series_instance_uid=f"{STUDY}.9",
            study_instance_uid=STUDY,
            sop_class_uid=MG_FOR_PRESENTATION,
            kind=ImageKind.FOR_PRESENTATION,
            laterality=Laterality(side),
            view=View(view),
            view_code=view,
            view_modifiers=(),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            rows=64,
            columns=52,
            bits_allocated=16,
            bits_stored=12,
            pixel_representation=0,
            samples_per_pixel=1,
            number_of_frames=1,
            photometric_interpretation="MONOCHROME2",
            pixel_spacing_mm=(0.1, 0.1),
            patient_orientation=("A", "R" if side == "L" else "L"),
            voi=VoiInfo(),
        ),
        **changes,
    )


def add(store: Store, n: int, view_key: str, at: float, study: str = STUDY, **extra) -> None:
    store.record_instance(
        NewInstance(
            f"{study}.{n}",
            f"sha{n}",
            study,
            f"{study}.9",
            MG_FOR_PRESENTATION,
            ExplicitVRLittleEndian,
            1,
            Path(f"/x/{n}.dcm"),
            "PACS",
            "accepted",
            description=facts(view_key, sop_instance_uid=f"{study}.{n}", **extra),
        ),
        now=at,
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "db.sqlite", tmp_path / "spool")
    yield s
    s.close()


def assembler(store: Store, tmp_path: Path, config: ExamsConfig = CONFIG) -> Assembler:
    return Assembler(config, store, audit=AuditTrail(tmp_path / "audit.jsonl"), metrics=Metrics())


def test_four_views_close_after_the_settle_time(store: Store, tmp_path: Path) -> None:
    for n, key in enumerate(("L-CC", "L-MLO", "R-CC", "R-MLO")):
        add(store, n, key, at=100.0 + n)
    a = assembler(store, tmp_path)
    assert a.run_once(now=104.9) == 0  # quiet for 1.9 s < settle
    assert a.run_once(now=105.0) == 1
    (job,) = store.jobs()
    assert not job.partial and job.selection.closed_by == "complete"
    assert sorted(job.selection.chosen) == ["L-CC", "L-MLO", "R-CC", "R-MLO"]


def test_partial_exam_waits_for_the_quiet_timeout(store: Store, tmp_path: Path) -> None:
    add(store, 1, "L-CC", at=100.0)
    add(store, 2, "L-MLO", at=101.0)
    a = assembler(store, tmp_path)
    assert a.run_once(now=110.9) == 0
    assert a.run_once(now=111.0) == 1
    (job,) = store.jobs()
    assert job.partial and job.selection.missing == ("R-CC", "R-MLO")
    assert job.selection.closed_by == "quiet timeout"


def test_trickling_exam_closes_at_the_maximum_wait(store: Store, tmp_path: Path) -> None:
    a = assembler(store, tmp_path)
    for i in range(6):  # an image every 5 s keeps the quiet timer from expiring
        add(store, i, "L-CC", at=100.0 + 5 * i)
        assert a.run_once(now=100.0 + 5 * i + 1) == 0
    add(store, 99, "R-CC", at=130.0)
    assert a.run_once(now=130.5) == 1
    (job,) = store.jobs()
    assert job.selection.closed_by == "maximum wait"
    # Five duplicates of L-CC were skipped with their reason; the latest received won.
    assert len(job.selection.skipped) == 5
    assert all("duplicate L-CC" in s.reason for s in job.selection.skipped)


def test_nothing_analysable_is_skipped_with_the_reason(store: Store, tmp_path: Path) -> None:
    add(store, 1, "L-CC", at=100.0, kind=ImageKind.FOR_PROCESSING)
    assembler(store, tmp_path).run_once(now=200.0)
    exam = store.exam(STUDY)
    assert exam.state == "skipped"
    assert exam.reason == "For Processing image: policy for_processing=skip"
    assert store.jobs() == []


def test_selection_policy_comes_from_the_config(store: Store, tmp_path: Path) -> None:
    add(store, 1, "L-CC", at=100.0, kind=ImageKind.FOR_PROCESSING)
    config = ExamsConfig(
        settle_seconds=2,
        quiet_seconds=10,
        max_wait_seconds=30,
        selection={"for_processing": "fallback"},
    )
    assembler(store, tmp_path, config).run_once(now=200.0)
    assert [j.selection.chosen for j in store.jobs()] == [{"L-CC": f"{STUDY}.1"}]


def test_timers_survive_a_restart(tmp_path: Path) -> None:
    first = Store(tmp_path / "db.sqlite", tmp_path / "spool")
    for n, key in enumerate(("L-CC", "L-MLO", "R-CC", "R-MLO")):
        add(first, n, key, at=100.0)
    first.close()  # the process stops inside the settle window
    second = Store(tmp_path / "db.sqlite", tmp_path / "spool")
    second.recover(max_attempts=3)
    assert assembler(second, tmp_path).run_once(now=102.0) == 1
    assert second.exam(STUDY).state == "queued"
    second.close()


def test_a_late_image_starts_a_new_version(store: Store, tmp_path: Path) -> None:
    a = assembler(store, tmp_path)
    add(store, 1, "L-CC", at=100.0)
    a.run_once(now=111.0)
    job = store.claim_job(now=111.0)
    store.finish_job(job.id, [])
    add(store, 2, "R-CC", at=200.0)
    assert a.run_once(now=205.0) == 0
    assert a.run_once(now=210.0) == 1
    versions = [(j.version, sorted(j.selection.chosen)) for j in store.jobs()]
    assert versions == [(1, ["L-CC"]), (2, ["L-CC", "R-CC"])]


class _ImageArrivesWhilePlanning(Store):
    """A real store in which one more image is recorded right after the assembler reads the
    study's instances: the race between the listener and an assembly pass, made repeatable."""

    def __init__(self, *args, late: tuple[int, str, float], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.late: tuple[int, str, float] | None = late

    def instances(self, study: str, *, current_only: bool = True):
        seen = super().instances(study, current_only=current_only)
        if self.late is not None:
            n, key, at = self.late
            self.late = None
            add(self, n, key, at=at, study=study)
        return seen


def test_an_image_recorded_during_planning_is_not_left_out(tmp_path: Path) -> None:
    store = _ImageArrivesWhilePlanning(
        tmp_path / "db.sqlite", tmp_path / "spool", late=(5, "R-CC", 111.0)
    )
    add(store, 1, "L-CC", at=100.0)
    a = assembler(store, tmp_path)
    # The plan held L-CC only; R-CC arrived before the job was queued: the round stays open.
    assert a.run_once(now=111.0) == 0
    assert store.exam(STUDY).state == "collecting" and store.jobs() == []
    assert a.run_once(now=121.0) == 1
    (job,) = store.jobs()
    assert sorted(job.selection.chosen) == ["L-CC", "R-CC"]
    store.close()


def test_an_exam_is_not_skipped_over_an_image_recorded_during_planning(tmp_path: Path) -> None:
    store = _ImageArrivesWhilePlanning(
        tmp_path / "db.sqlite", tmp_path / "spool", late=(5, "R-CC", 199.0)
    )
    add(store, 1, "L-CC", at=100.0, kind=ImageKind.FOR_PROCESSING)
    a = assembler(store, tmp_path)
    assert a.run_once(now=200.0) == 0
    assert store.exam(STUDY).state == "collecting"
    assert a.run_once(now=210.0) == 1
    (job,) = store.jobs()
    assert job.selection.chosen == {"R-CC": f"{STUDY}.5"}
    store.close()
