"""The store: idempotent instances, the exam/job/delivery state machines, and recovery of work
that was in flight when the process died."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from plugin.store import NewInstance, NewResult, Recorded, Store, StoreError

STUDY = "1.2.3.4"


def instance(n: int, sha: str = "aa", study: str = STUDY, status: str = "accepted") -> NewInstance:
    return NewInstance(
        sop_instance_uid=f"1.2.3.4.{n}",
        sha256=sha,
        study_instance_uid=study,
        series_instance_uid="1.2.3.4.100",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        size=10,
        path=Path(f"/spool/{n}.dcm"),
        calling_ae="PACS",
        status=status,
        reason=None if status == "accepted" else "not a mammography image",
        description={"laterality": "L", "view": "CC"},
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "db.sqlite", tmp_path / "spool")
    yield s
    s.close()


def result(n: int, destinations: tuple[str, ...] = ("pacs",)) -> NewResult:
    return NewResult(
        "cad_sr", f"9.9.{n}", "1.2.840.10008.5.1.4.1.1.88.50", Path(f"/r/{n}.dcm"), 5, destinations
    )


def test_schema_is_versioned_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite", tmp_path / "spool")
    assert s.schema_version == 2
    s.close()
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute("PRAGMA user_version=99")
    with pytest.raises(StoreError, match="schema 99 is newer than this version"):
        Store(tmp_path / "db.sqlite", tmp_path / "spool")


def test_instances_are_idempotent_by_uid_and_content(store: Store) -> None:
    assert store.record_instance(instance(1))[0] is Recorded.NEW
    assert store.record_instance(instance(1))[0] is Recorded.DUPLICATE
    assert store.record_instance(instance(1, sha="bb"))[0] is Recorded.REPLACED
    current = store.instances(STUDY)
    assert [(i.sop_instance_uid, i.status) for i in current] == [("1.2.3.4.1", "accepted")]
    assert len(store.instances(STUDY, current_only=False)) == 2
    # Ignored instances are recorded for the audit but do not open an exam.
    store.record_instance(instance(2, study="5.6.7", status="ignored"))
    assert store.exam("5.6.7") is None
    assert store.counts()["instances"] == {"accepted": 2, "ignored": 1}


def test_exam_rounds_jobs_and_versions(store: Store) -> None:
    store.record_instance(instance(1), now=100.0)
    store.record_instance(instance(2), now=101.0)
    exam = store.exam(STUDY)
    assert (exam.state, exam.first_seen, exam.last_seen, exam.version) == (
        "collecting",
        100.0,
        101.0,
        0,
    )
    job = store.queue_job(exam.id, [1, 2], {"closed_by": "complete"}, partial=False, now=105.0)
    assert (job.version, store.exam(STUDY).state) == (1, "queued")
    with pytest.raises(StoreError, match="not collecting"):
        store.queue_job(exam.id, [1], {}, partial=True)

    claimed = store.claim_job(now=106.0)
    assert claimed.id == job.id and claimed.attempts == 1 and claimed.instance_ids == (1, 2)
    assert store.claim_job(now=106.0) is None
    # An image arriving during the analysis is not lost: the exam collects again afterwards.
    store.record_instance(instance(3), now=107.0)
    finished = store.finish_job(job.id, [result(1, ("pacs", "folder"))], now=108.0)
    assert finished.exam_state == "collecting"
    assert [d.destination for d in store.deliveries("pending")] == ["pacs", "folder"]

    job2 = store.queue_job(exam.id, [1, 2, 3], {}, partial=False, now=110.0)
    assert job2.version == 2
    store.claim_job(now=111.0)
    assert store.finish_job(job2.id, [result(2)]).exam_state == "analysed"
    # A late image reopens an analysed exam for a new version, unless the policy ignores it.
    store.record_instance(instance(4), now=120.0, late_images="ignore")
    assert store.exam(STUDY).state == "analysed"
    store.record_instance(instance(5), now=121.0)
    exam = store.exam(STUDY)
    assert (exam.state, exam.round_started, exam.version) == ("collecting", 121.0, 2)


def test_failed_jobs_retry_then_quarantine_and_can_be_requeued(store: Store) -> None:
    store.record_instance(instance(1), now=100.0)
    exam = store.exam(STUDY)
    job = store.queue_job(exam.id, [1], {}, partial=True, now=100.0)
    store.claim_job(now=100.0)
    assert store.fail_job(job.id, "boom", retry_at=200.0).job_state == "queued"
    assert store.claim_job(now=150.0) is None  # not due yet
    assert store.claim_job(now=200.0).attempts == 2
    assert store.fail_job(job.id, "boom again", retry_at=None).exam_state == "quarantined"
    assert store.exam(STUDY).reason == "boom again"
    assert [j.reason for j in store.jobs("quarantined")] == ["boom again"]
    assert store.requeue_quarantined() == 1
    assert store.exam(STUDY).state == "collecting"


def test_recover_requeues_running_work(store: Store, tmp_path: Path) -> None:
    for n, study in ((1, "1.1"), (2, "2.2")):
        store.record_instance(instance(n, study=study), now=100.0)
        store.queue_job(store.exam(study).id, [n], {}, partial=True, now=100.0)
    first = store.claim_job(now=100.0)
    store.claim_job(now=100.0)
    store.fail_job(first.id, "x", retry_at=100.0)
    store.claim_job(now=100.0)  # the first job again: its second attempt
    store.record_instance(instance(3, study="3.3"), now=100.0)
    job3 = store.queue_job(store.exam("3.3").id, [3], {}, partial=True, now=100.0)
    store.claim_job(now=100.0)
    store.finish_job(job3.id, [result(3)])
    delivery = store.due_deliveries()[0]
    store.claim_delivery(delivery.id)

    # The process dies here; a new one opens the same database.
    reopened = Store(tmp_path / "db.sqlite", tmp_path / "spool")
    recovered = reopened.recover(max_attempts=2)
    assert recovered == {"jobs_requeued": 1, "jobs_quarantined": 1, "deliveries_requeued": 1}
    assert reopened.exam("1.1").state == "quarantined"
    assert "stopped during each of 2 analysis attempts" in reopened.exam("1.1").reason
    assert reopened.exam("2.2").state == "queued"
    assert [d.state for d in reopened.deliveries()] == ["pending"]
    reopened.close()


def test_deliveries_retry_dead_letter_and_requeue(store: Store) -> None:
    store.record_instance(instance(1), now=100.0)
    job = store.queue_job(store.exam(STUDY).id, [1], {}, partial=True)
    store.claim_job()
    store.finish_job(job.id, [result(1, ("pacs", "web"))])
    pacs, web = store.due_deliveries()
    assert store.due_deliveries(destination="web")[0].id == web.id
    assert store.claim_delivery(pacs.id).attempts == 1
    assert store.claim_delivery(pacs.id) is None  # already taken
    store.delivery_succeeded(pacs.id)
    store.claim_delivery(web.id)
    assert store.delivery_failed(web.id, "peer down", retry_at=1e12) == "pending"
    assert store.due_deliveries() == []
    store.retry_dead_letters()  # not dead: nothing changes
    assert store.deliveries("pending")[0].next_attempt_at == 1e12
    with store._tx() as db:  # make it due again
        db.execute("UPDATE deliveries SET next_attempt_at=0")
    store.claim_delivery(web.id)
    assert store.delivery_failed(web.id, "refused 0xC000", retry_at=None) == "dead"
    assert store.counts()["deliveries"] == {"delivered": 1, "dead": 1}
    assert store.retry_dead_letters([pacs.id]) == 0
    assert store.retry_dead_letters([web.id]) == 1
    again = store.due_deliveries()[0]
    assert (again.id, again.attempts, again.last_error) == (web.id, 0, "refused 0xC000")


def test_a_failed_commit_leaves_the_store_usable(store: Store) -> None:
    # A deferred foreign-key violation fails at COMMIT, like a full disk or an I/O error
    # would: the transaction must be rolled back, not left open for the next caller.
    with pytest.raises(sqlite3.IntegrityError):
        with store._tx() as db:
            db.execute("PRAGMA defer_foreign_keys=ON")
            db.execute(
                "INSERT INTO jobs (exam_id, version, state, instance_ids, selection, partial,"
                " next_attempt_at, created_at) VALUES (999, 1, 'queued', '[]', '{}', 0, 0, 0)"
            )
    assert store.record_instance(instance(1))[0] is Recorded.NEW
    assert store.jobs() == []
