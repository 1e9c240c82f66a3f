"""The store: idempotent instances, the exam/job/delivery state machines, and recovery of work
that was in flight when the process died."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.uid import (
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MammographyCADSRStorage,
)

from models.header import describe
from plugin.selection import SelectionRecord
from plugin.store import NewInstance, NewResult, Recorded, Store, StoreError
from plugin.store_schema import MIGRATIONS
from tests.support.pg_server import PostgresServer

STUDY = "1.2.3.4"
COMPLETE = SelectionRecord("complete")
PARTIAL = SelectionRecord("quiet timeout", missing=("R-MLO",))


def instance(n: int, sha: str = "aa", study: str = STUDY, status: str = "accepted") -> NewInstance:
    return NewInstance(
        sop_instance_uid=f"1.2.3.4.{n}",
        sha256=sha,
        study_instance_uid=study,
        series_instance_uid="1.2.3.4.100",
        sop_class_uid=DigitalMammographyXRayImageStorageForPresentation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        size=10,
        path=Path(f"/spool/{n}.dcm"),
        calling_ae="PACS",
        status=status,
        reason=None if status == "accepted" else "not a mammography image",
    )


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer.start() as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Store]:
    """Opens the test's database (each backend in turn) as a new process would."""
    if request.param == "sqlite":
        return lambda spool=tmp_path / "spool", **kw: Store(tmp_path / "db.sqlite", spool, **kw)
    server = request.getfixturevalue("postgres")
    url = server.create_database(f"t{uuid.uuid4().hex[:12]}")
    return lambda spool=tmp_path / "spool", **kw: Store(url, spool, password=server.password, **kw)


@pytest.fixture
def store(opener: Callable[..., Store]) -> Iterator[Store]:
    s = opener(claimant="node-a")
    yield s
    s.close()


def result(n: int, destinations: tuple[str, ...] = ("pacs",)) -> NewResult:
    return NewResult(
        "cad_sr", f"9.9.{n}", MammographyCADSRStorage, Path(f"/r/{n}.dcm"), 5, destinations
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


def test_header_facts_are_read_back_as_the_dataclass_the_listener_stored(
    store: Store, synth_exam_small
) -> None:
    facts = describe(synth_exam_small.image("L-CC").dataset)
    store.record_instance(replace(instance(1), description=facts))
    store.record_instance(instance(2, status="ignored"))
    stored = {i.sop_instance_uid: i.description for i in store.instances(STUDY)}
    assert stored == {"1.2.3.4.1": facts, "1.2.3.4.2": None}
    assert isinstance(stored["1.2.3.4.1"].voi.window_center, tuple)


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
    job = store.queue_job(exam.id, [1, 2], COMPLETE, now=105.0)
    assert (job.version, store.exam(STUDY).state) == (1, "queued")
    with pytest.raises(StoreError, match="not collecting"):
        store.queue_job(exam.id, [1], PARTIAL)

    claimed = store.claim_job(now=106.0)
    assert claimed.id == job.id and claimed.attempts == 1 and claimed.instance_ids == (1, 2)
    assert store.claim_job(now=106.0) is None
    # An image arriving during the analysis is not lost: the exam collects again afterwards.
    store.record_instance(instance(3), now=107.0)
    finished = store.finish_job(job.id, [result(1, ("pacs", "folder"))], now=108.0)
    assert finished.exam_state == "collecting"
    assert [d.destination for d in store.deliveries("pending")] == ["pacs", "folder"]

    job2 = store.queue_job(exam.id, [1, 2, 3], COMPLETE, now=110.0)
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
    job = store.queue_job(exam.id, [1], PARTIAL, now=100.0)
    store.claim_job(now=100.0)
    assert store.fail_job(job.id, "boom", retry_at=200.0).job_state == "queued"
    assert store.claim_job(now=150.0) is None  # not due yet
    assert store.claim_job(now=200.0).attempts == 2
    assert store.fail_job(job.id, "boom again", retry_at=None).exam_state == "quarantined"
    assert store.exam(STUDY).reason == "boom again"
    assert [j.reason for j in store.jobs("quarantined")] == ["boom again"]
    assert store.requeue_quarantined() == 1
    assert store.exam(STUDY).state == "collecting"


def test_recover_requeues_running_work(store: Store, opener: Callable[..., Store]) -> None:
    for n, study in ((1, "1.1"), (2, "2.2")):
        store.record_instance(instance(n, study=study), now=100.0)
        store.queue_job(store.exam(study).id, [n], PARTIAL, now=100.0)
    first = store.claim_job(now=100.0)
    store.claim_job(now=100.0)
    store.fail_job(first.id, "x", retry_at=100.0)
    store.claim_job(now=100.0)  # the first job again: its second attempt
    store.record_instance(instance(3, study="3.3"), now=100.0)
    job3 = store.queue_job(store.exam("3.3").id, [3], PARTIAL, now=100.0)
    store.claim_job(now=100.0)
    store.finish_job(job3.id, [result(3)])
    delivery = store.due_deliveries()[0]
    store.claim_delivery(delivery.id)

    # The process dies here; a new one opens the same database.
    reopened = opener(claimant="node-a")
    recovered = reopened.recover(max_attempts=2)
    assert recovered == {"jobs_requeued": 1, "jobs_quarantined": 1, "deliveries_requeued": 1}
    assert reopened.exam("1.1").state == "quarantined"
    assert "stopped during each of 2 analysis attempts" in reopened.exam("1.1").reason
    assert reopened.exam("2.2").state == "queued"
    assert [d.state for d in reopened.deliveries()] == ["pending"]
    reopened.close()


def test_deliveries_retry_dead_letter_and_requeue(store: Store) -> None:
    store.record_instance(instance(1), now=100.0)
    job = store.queue_job(store.exam(STUDY).id, [1], PARTIAL)
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
    assert [d.id for d in store.due_deliveries(now=1e12)] == [web.id]  # due when its time comes
    store.claim_delivery(web.id)
    assert store.delivery_failed(web.id, "refused 0xC000", retry_at=None) == "dead"
    assert store.counts()["deliveries"] == {"delivered": 1, "dead": 1}
    assert store.retry_dead_letters([pacs.id]) == 0
    assert store.retry_dead_letters([web.id]) == 1
    again = store.due_deliveries()[0]
    assert (again.id, again.attempts, again.last_error) == (web.id, 0, "refused 0xC000")


def test_a_failed_commit_leaves_the_store_usable(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite", tmp_path / "spool")
    # A deferred foreign-key violation fails at COMMIT, like a full disk or an I/O error
    # would: the transaction must be rolled back, not left open for the next caller. The one
    # white-box use of `_tx`: no public call can make a COMMIT fail on demand.
    with pytest.raises(sqlite3.IntegrityError):
        with store._tx() as db:
            db.execute("PRAGMA defer_foreign_keys=ON")
            db.execute(
                "INSERT INTO jobs (exam_id, version, state, instance_ids, selection, partial,"
                " next_attempt_at, created_at) VALUES (999, 1, 'queued', '[]', '{}', 0, 0, 0)"
            )
    assert store.record_instance(instance(1))[0] is Recorded.NEW
    assert store.jobs() == []


def _queued(store: Store, n: int, now: float = 100.0) -> int:
    study = f"7.{n}"
    store.record_instance(instance(n, study=study), now=now)
    return store.queue_job(store.exam(study).id, [n], PARTIAL, now=now).id


def test_an_expired_lease_returns_the_job_and_its_old_holder_cannot_settle_it(
    store: Store, opener: Callable[..., Store]
) -> None:
    other = opener(claimant="node-b", lease_seconds=60)
    job_id = _queued(store, 1)
    assert store.claim_job(now=100.0).id == job_id
    assert other.claim_job(now=100.0) is None  # held: nobody else gets it
    store.heartbeat(["worker"], now=150.0)  # renewed to 210
    assert other.reclaim(3, now=200.0) == {
        "jobs_requeued": 0,
        "jobs_quarantined": 0,
        "deliveries_requeued": 0,
    }
    assert [(lease.owner, lease.expires) for lease in other.leases()] == [("node-a", 210.0)]
    # node-a stops renewing (hung, or cut off): at 211 its lease has run out.
    assert other.reclaim(3, now=211.0)["jobs_requeued"] == 1
    assert other.claim_job(now=211.0).id == job_id
    with pytest.raises(StoreError, match="no longer held by node-a"):
        store.finish_job(job_id, [result(1)])
    other.finish_job(job_id, [result(1)])
    assert len(other.results()) == 1
    claims = [(c.owner, c.claimed_at, c.released_at, c.outcome) for c in other.claims("job")]
    assert claims == [("node-a", 100.0, 211.0, "expired"), ("node-b", 211.0, claims[1][2], "done")]
    assert {n.claimant for n in other.nodes()} == {"node-a"}
    other.close()


def test_an_expired_delivery_lease_goes_back_to_pending(
    store: Store, opener: Callable[..., Store]
) -> None:
    job_id = _queued(store, 1)
    store.claim_job()
    store.finish_job(job_id, [result(1)])
    (delivery,) = store.due_deliveries()
    store.claim_delivery(delivery.id, now=100.0)
    other = opener(claimant="node-b")
    assert other.claim_delivery(delivery.id) is None
    assert other.reclaim(3, now=100.0 + store.lease_seconds + 1)["deliveries_requeued"] == 1
    assert other.claim_delivery(delivery.id) is not None
    store.delivery_succeeded(delivery.id)  # no longer its row: no effect
    assert other.deliveries()[0].state == "sending"
    other.delivery_succeeded(delivery.id)
    assert other.deliveries()[0].state == "delivered"
    other.close()


def test_concurrent_claimants_never_share_a_job(store: Store, opener: Callable[..., Store]) -> None:
    ids = {_queued(store, n, now=1.0) for n in range(40)}
    claimed: dict[str, list[int]] = {}

    def work(name: str) -> None:
        s = opener(claimant=name)
        mine = claimed.setdefault(name, [])
        while (job := s.claim_job()) is not None:
            mine.append(job.id)
            s.finish_job(job.id, [])
        s.close()

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [i for mine in claimed.values() for i in mine]
    assert sorted(every) == sorted(ids)  # each job once, none lost
    assert {j.state for j in store.jobs()} == {"done"}


def test_job_times_give_turnaround_and_analysis_time(store: Store) -> None:
    t = time.time()  # a job is due from when it is queued
    store.record_instance(instance(1), now=t - 10)
    store.record_instance(instance(2), now=t - 7)
    job = store.queue_job(store.exam(STUDY).id, [1, 2], COMPLETE)
    (waiting,) = store.job_times()
    assert (waiting.last_received, waiting.started, waiting.delivered) == (t - 7, None, None)
    store.claim_job(now=t + 10)
    store.finish_job(job.id, [result(1, ("pacs", "web"))], now=t + 12.5)
    for delivery, at in zip(store.due_deliveries(now=t + 13), (t + 14, t + 16), strict=True):
        store.claim_delivery(delivery.id, now=at)
        store.delivery_succeeded(delivery.id, now=at)
    (times,) = store.job_times()
    assert times.job_id == job.id and times.study_instance_uid == STUDY
    assert (times.last_received, times.started, times.finished, times.delivered) == (
        t - 7,
        t + 10,
        t + 12.5,
        t + 16,
    )


def test_spool_paths_are_stored_relative_and_free_text_is_capped(
    store: Store, opener: Callable[..., Store], tmp_path: Path
) -> None:
    new = instance(1)
    new = NewInstance(**{**new.__dict__, "path": store.spool / "instances/a/1.dcm"})
    store.record_instance(new)
    (inst,) = store.instances(STUDY)
    assert inst.path == store.spool / "instances/a/1.dcm"
    moved = opener(spool=tmp_path / "moved")  # the spool folder moved with its database
    assert moved.instances(STUDY)[0].path == tmp_path / "moved/instances/a/1.dcm"
    moved.close()
    job = store.queue_job(store.exam(STUDY).id, [inst.id], PARTIAL)
    store.claim_job()
    store.fail_job(job.id, "x" * 100_000, retry_at=None)
    reason = store.jobs()[0].reason
    assert len(reason) == 1024 and reason.endswith("more chars]")


def test_a_version_1_database_is_migrated_with_relative_paths(tmp_path: Path) -> None:
    from plugin.store_db import Database

    spool = tmp_path / "spool"
    db = Database(tmp_path / "db.sqlite")
    db.begin()
    MIGRATIONS[0](db, spool)
    db.execute(
        "INSERT INTO instances (sop_instance_uid, sha256, study_instance_uid,"
        " series_instance_uid, sop_class_uid, transfer_syntax_uid, size, path, calling_ae,"
        " received_at, status) VALUES ('1', 'aa', '2', '3', '4', '5', 1, ?, 'PACS', 0,"
        " 'accepted')",
        (str(spool / "instances/x.dcm"),),
    )
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    s = Store(tmp_path / "db.sqlite", spool)
    assert s.schema_version == 2
    assert s.instances("2")[0].path == spool / "instances/x.dcm"
    s.close()
    moved = Store(tmp_path / "db.sqlite", tmp_path / "moved")
    assert moved.instances("2")[0].path == tmp_path / "moved/instances/x.dcm"
    moved.close()


def test_audit_events_are_committed_with_their_transition(store: Store) -> None:
    job_id = _queued(store, 1)
    store.claim_job()
    with pytest.raises(StoreError):  # not this job's state: nothing is written
        store.finish_job(job_id + 1, [])
    store.finish_job(job_id, [result(1)])
    (delivery,) = store.due_deliveries()
    store.claim_delivery(delivery.id)
    store.delivery_succeeded(delivery.id)
    events = store.events()
    assert [(e.event, e.node) for e in events] == [
        ("received", "node-a"),
        ("analysed", "node-a"),
        ("delivered", "node-a"),
    ]
    assert events[1].detail == {"job_id": job_id, "version": 1, "attempt": 1, "objects": 1}
    assert events[2].detail["destination"] == "pacs"
    assert store.events(after=events[1].id) == events[2:]
