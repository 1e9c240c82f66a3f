"""The durable state of the service: one SQLite database (WAL) beside the spool folder.

This module owns every state transition of instances, exams and their analysis jobs, result
objects and (object, destination) deliveries; other modules call these methods and never run
SQL. Each method is one transaction, so a crash leaves the database at a step boundary, and
`recover()` at start-up turns the steps that were in flight back into work to do.

States:
  exam:      collecting → queued → running → analysed | quarantined | skipped
             (a new image for an analysed exam sends it back to collecting: a new version)
  job:       queued → running → done | queued (retry) | quarantined
  delivery:  pending → sending → delivered | pending (retry) | dead
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE instances (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    size INTEGER NOT NULL,
    path TEXT,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('accepted', 'ignored')),
    reason TEXT,
    description TEXT NOT NULL DEFAULT '{}',
    superseded_by INTEGER REFERENCES instances(id),
    UNIQUE (sop_instance_uid, sha256)
);
CREATE INDEX instances_study ON instances(study_instance_uid);
CREATE TABLE exams (
    id INTEGER PRIMARY KEY,
    study_instance_uid TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN
        ('collecting', 'queued', 'running', 'analysed', 'quarantined', 'skipped')),
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    round_started REAL NOT NULL,
    dirty INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0,
    reason TEXT
);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    exam_id INTEGER NOT NULL REFERENCES exams(id),
    version INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'quarantined')),
    instance_ids TEXT NOT NULL,
    selection TEXT NOT NULL,
    partial INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    reason TEXT,
    UNIQUE (exam_id, version)
);
CREATE TABLE results (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    exam_id INTEGER NOT NULL REFERENCES exams(id),
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (job_id, sop_instance_uid)
);
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY,
    result_id INTEGER NOT NULL REFERENCES results(id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sending', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    delivered_at REAL,
    UNIQUE (result_id, destination)
);
CREATE INDEX deliveries_due ON deliveries(state, next_attempt_at);
"""

# Migrations from version N to N+1, applied in order; empty while there is one version.
_MIGRATIONS: dict[int, str] = {}


class StoreError(RuntimeError):
    """The database cannot be used (newer schema, unreadable file); the message says why."""


class Recorded(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    """Same SOP Instance UID and same bytes: acknowledged again, nothing else happens."""
    REPLACED = "replaced"
    """Same SOP Instance UID, different bytes: the new copy supersedes the old."""


@dataclass(frozen=True)
class NewInstance:
    sop_instance_uid: str
    sha256: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size: int
    path: Path | None
    calling_ae: str
    status: str
    """"accepted" (a candidate for analysis) or "ignored" (kept only in the audit)."""
    reason: str | None = None
    description: dict[str, Any] = field(default_factory=dict)
    """Header facts for the selection policy (laterality, view, kind, modifiers, times)."""


@dataclass(frozen=True)
class Instance:
    id: int
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path | None
    received_at: float
    status: str
    reason: str | None
    description: dict[str, Any]


@dataclass(frozen=True)
class Exam:
    id: int
    study_instance_uid: str
    state: str
    first_seen: float
    last_seen: float
    round_started: float
    version: int
    reason: str | None


@dataclass(frozen=True)
class Job:
    id: int
    exam_id: int
    study_instance_uid: str
    version: int
    state: str
    instance_ids: tuple[int, ...]
    selection: dict[str, Any]
    partial: bool
    attempts: int
    created_at: float
    reason: str | None


@dataclass(frozen=True)
class NewResult:
    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    size: int
    destinations: tuple[str, ...]


@dataclass(frozen=True)
class Delivery:
    id: int
    result_id: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    study_instance_uid: str
    created_at: float


@dataclass(frozen=True)
class Finished:
    """What `finish_job` / `fail_job` did to the exam, for the audit and metrics."""

    exam_state: str
    job_state: str


class Store:
    """Thread-safe: one connection, one lock, one transaction per call."""

    def __init__(self, database: Path, spool: Path) -> None:
        self.database = Path(database)
        self.spool = Path(spool)
        self.database.parent.mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(
                self.database, isolation_level=None, check_same_thread=False, timeout=30
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before we answer 0x0000 (WAL+NORMAL may lose the last
            # commits on power loss).
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.database}: cannot open the database ({exc})") from exc

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. A COMMIT that fails (disk full, I/O error) is rolled back
        too: otherwise the connection stays inside the failed transaction and every later
        call fails with "cannot start a transaction within a transaction"."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR).
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _migrate(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.database}: database schema {version} is newer than this version of "
                    f"the plugin ({SCHEMA_VERSION}); upgrade the plugin or use another database"
                )
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
            else:
                for step in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[step].split(";"):
                        if statement.strip():
                            db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- instances --------------------------------------------------------------------------

    def record_instance(
        self, new: NewInstance, *, now: float | None = None, late_images: str = "reanalyse"
    ) -> tuple[Recorded, int]:
        """Record a received instance (its file already durable) and wake its exam.

        Returns what happened and the instance row id. Only accepted instances touch exams:
        a new image for an analysed or quarantined exam starts a new round (a new result
        version) unless `late_images` is "ignore"."""
        now = time.time() if now is None else now
        with self._tx() as db:
            same = db.execute(
                "SELECT id FROM instances WHERE sop_instance_uid=? AND sha256=?",
                (new.sop_instance_uid, new.sha256),
            ).fetchone()
            if same is not None:
                return Recorded.DUPLICATE, int(same["id"])
            older = db.execute(
                "SELECT id FROM instances WHERE sop_instance_uid=? AND superseded_by IS NULL",
                (new.sop_instance_uid,),
            ).fetchall()
            cur = db.execute(
                "INSERT INTO instances (sop_instance_uid, sha256, study_instance_uid,"
                " series_instance_uid, sop_class_uid, transfer_syntax_uid, size, path,"
                " calling_ae, received_at, status, reason, description)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    new.sop_instance_uid,
                    new.sha256,
                    new.study_instance_uid,
                    new.series_instance_uid,
                    new.sop_class_uid,
                    new.transfer_syntax_uid,
                    new.size,
                    None if new.path is None else str(new.path),
                    new.calling_ae,
                    now,
                    new.status,
                    new.reason,
                    json.dumps(new.description, sort_keys=True, default=str),
                ),
            )
            row_id = int(cur.lastrowid or 0)
            for old in older:
                db.execute("UPDATE instances SET superseded_by=? WHERE id=?", (row_id, old["id"]))
            if new.status == "accepted":
                self._touch_exam(db, new.study_instance_uid, now, late_images)
            return (Recorded.REPLACED if older else Recorded.NEW), row_id

    def _touch_exam(self, db: sqlite3.Connection, study: str, now: float, late_images: str) -> None:
        exam = db.execute("SELECT * FROM exams WHERE study_instance_uid=?", (study,)).fetchone()
        if exam is None:
            db.execute(
                "INSERT INTO exams (study_instance_uid, state, first_seen, last_seen,"
                " round_started) VALUES (?, 'collecting', ?, ?, ?)",
                (study, now, now, now),
            )
            return
        state = exam["state"]
        if state == "collecting":
            db.execute("UPDATE exams SET last_seen=? WHERE id=?", (now, exam["id"]))
        elif state in ("queued", "running"):
            # The running analysis cannot include this image: analyse again when it ends.
            db.execute("UPDATE exams SET last_seen=?, dirty=1 WHERE id=?", (now, exam["id"]))
        elif late_images == "ignore" and state == "analysed":
            db.execute("UPDATE exams SET last_seen=? WHERE id=?", (now, exam["id"]))
        else:
            db.execute(
                "UPDATE exams SET state='collecting', last_seen=?, round_started=?, reason=NULL"
                " WHERE id=?",
                (now, now, exam["id"]),
            )

    def instances(self, study: str, *, current_only: bool = True) -> list[Instance]:
        sql = "SELECT * FROM instances WHERE study_instance_uid=?"
        if current_only:
            sql += " AND superseded_by IS NULL"
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", (study,)).fetchall()
        return [_instance(r) for r in rows]

    def instances_by_id(self, ids: Iterable[int]) -> list[Instance]:
        ids = list(ids)
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM instances WHERE id IN ({marks}) ORDER BY id", ids
            ).fetchall()
        return [_instance(r) for r in rows]

    def known_instance(self, sop_instance_uid: str, sha256: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM instances WHERE sop_instance_uid=? AND sha256=?",
                (sop_instance_uid, sha256),
            ).fetchone()
        return row is not None

    # -- exams and jobs ---------------------------------------------------------------------

    def collecting_exams(self) -> list[Exam]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM exams WHERE state='collecting' ORDER BY last_seen"
            ).fetchall()
        return [_exam(r) for r in rows]

    def exam(self, study: str) -> Exam | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM exams WHERE study_instance_uid=?", (study,)
            ).fetchone()
        return None if row is None else _exam(row)

    def exams(self, *, last: int | None = None) -> list[Exam]:
        """Every exam in id order, or only the `last` ones (`plugin status` on a site with a
        year of exams should not read them all)."""
        sql = "SELECT * FROM exams ORDER BY id"
        params: tuple[int, ...] = ()
        if last is not None:
            sql = f"SELECT * FROM ({sql} DESC LIMIT ?) ORDER BY id"
            params = (last,)
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [_exam(r) for r in rows]

    def queue_job(
        self,
        exam_id: int,
        instance_ids: Sequence[int],
        selection: dict[str, Any],
        partial: bool,
        *,
        seen: float | None = None,
        now: float | None = None,
    ) -> Job | None:
        """Close the exam's current round: one job for the next result version.

        `seen` is the exam's `last_seen` when the caller planned the job: an image recorded
        since then is not in `instance_ids`, and it restarted the quiet timer, so the round
        stays open and None is returned (the next assembly pass plans again with it)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            exam = _row_in_state(db, "exams", exam_id, "collecting", "queue a job for")
            if seen is not None and exam["last_seen"] != seen:
                return None
            version = int(exam["version"]) + 1
            cur = db.execute(
                "INSERT INTO jobs (exam_id, version, state, instance_ids, selection, partial,"
                " next_attempt_at, created_at) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                (
                    exam_id,
                    version,
                    json.dumps(list(instance_ids)),
                    json.dumps(selection, sort_keys=True, default=str),
                    int(partial),
                    now,
                    now,
                ),
            )
            db.execute(
                "UPDATE exams SET state='queued', version=?, dirty=0, reason=NULL WHERE id=?",
                (version, exam_id),
            )
            return self._job(db, int(cur.lastrowid or 0))

    def skip_exam(self, exam_id: int, reason: str, *, seen: float | None = None) -> bool:
        """Nothing in the exam can be analysed (e.g. only For Processing images). False when
        the exam is no longer collecting, or (with `seen`, as in `queue_job`) an image
        arrived after the caller looked: that image may be analysable."""
        sql = "UPDATE exams SET state='skipped', reason=? WHERE id=? AND state='collecting'"
        params: list[Any] = [reason, exam_id]
        if seen is not None:
            sql += " AND last_seen=?"
            params.append(seen)
        with self._tx() as db:
            return db.execute(sql, params).rowcount == 1

    def claim_job(self, *, now: float | None = None) -> Job | None:
        """The oldest due queued job, now running (its attempt counted before it runs, so a
        job that kills the process still reaches its attempt limit)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT id, exam_id FROM jobs WHERE state='queued' AND next_attempt_at<=?"
                " ORDER BY next_attempt_at, id LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, started_at=? WHERE id=?",
                (now, row["id"]),
            )
            db.execute("UPDATE exams SET state='running' WHERE id=?", (row["exam_id"],))
            return self._job(db, int(row["id"]))

    def finish_job(
        self, job_id: int, results: Sequence[NewResult], *, now: float | None = None
    ) -> Finished:
        """The job's result objects are durable files: record them and queue one delivery
        per (object, destination), all in one transaction."""
        now = time.time() if now is None else now
        with self._tx() as db:
            job = _row_in_state(db, "jobs", job_id, "running", "finish")
            for res in results:
                cur = db.execute(
                    "INSERT INTO results (job_id, exam_id, version, kind, sop_instance_uid,"
                    " sop_class_uid, path, size, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        job_id,
                        job["exam_id"],
                        job["version"],
                        res.kind,
                        res.sop_instance_uid,
                        res.sop_class_uid,
                        str(res.path),
                        res.size,
                        now,
                    ),
                )
                for dest in res.destinations:
                    db.execute(
                        "INSERT INTO deliveries (result_id, destination, state, next_attempt_at,"
                        " created_at) VALUES (?, ?, 'pending', ?, ?)",
                        (cur.lastrowid, dest, now, now),
                    )
            db.execute(
                "UPDATE jobs SET state='done', finished_at=?, reason=NULL WHERE id=?",
                (now, job_id),
            )
            return self._end_round(db, int(job["exam_id"]), "analysed", None, "done", now)

    def fail_job(
        self, job_id: int, reason: str, *, retry_at: float | None, now: float | None = None
    ) -> Finished:
        """A failed attempt: queued again at `retry_at`, or quarantined when it is None."""
        now = time.time() if now is None else now
        with self._tx() as db:
            job = _row_in_state(db, "jobs", job_id, "running", "fail")
            if retry_at is not None:
                db.execute(
                    "UPDATE jobs SET state='queued', next_attempt_at=?, reason=? WHERE id=?",
                    (retry_at, reason, job_id),
                )
                db.execute("UPDATE exams SET state='queued' WHERE id=?", (job["exam_id"],))
                return Finished("queued", "queued")
            db.execute(
                "UPDATE jobs SET state='quarantined', finished_at=?, reason=? WHERE id=?",
                (now, reason, job_id),
            )
            return self._end_round(
                db, int(job["exam_id"]), "quarantined", reason, "quarantined", now
            )

    def _end_round(
        self,
        db: sqlite3.Connection,
        exam_id: int,
        state: str,
        reason: str | None,
        job: str,
        now: float,
    ) -> Finished:
        exam = db.execute("SELECT dirty FROM exams WHERE id=?", (exam_id,)).fetchone()
        if exam["dirty"]:
            # Images arrived during the analysis: start the next round from now.
            db.execute(
                "UPDATE exams SET state='collecting', dirty=0, reason=?, round_started=?"
                " WHERE id=?",
                (reason, now, exam_id),
            )
            return Finished("collecting", job)
        db.execute("UPDATE exams SET state=?, reason=? WHERE id=?", (state, reason, exam_id))
        return Finished(state, job)

    def requeue_quarantined(self, exam_ids: Sequence[int] | None = None) -> int:
        """Give quarantined exams a fresh round (`plugin retry --quarantined`)."""
        with self._tx() as db:
            sql = "SELECT id FROM exams WHERE state='quarantined'"
            rows = db.execute(sql).fetchall()
            wanted = [r["id"] for r in rows if exam_ids is None or r["id"] in exam_ids]
            # Back-date the round so the exam is due at the next assembly pass.
            now = time.time()
            for exam_id in wanted:
                db.execute(
                    "UPDATE exams SET state='collecting', last_seen=?, round_started=?,"
                    " reason=NULL WHERE id=?",
                    (now - 1e6, now - 1e6, exam_id),
                )
            return len(wanted)

    def job(self, job_id: int) -> Job:
        with self._lock:
            return self._job(self._db, job_id)

    def jobs(self, state: str | None = None) -> list[Job]:
        with self._lock:
            sql = "SELECT id FROM jobs" + (" WHERE state=?" if state else "") + " ORDER BY id"
            ids = [r["id"] for r in self._db.execute(sql, (state,) if state else ())]
            return [self._job(self._db, i) for i in ids]

    def _job(self, db: sqlite3.Connection, job_id: int) -> Job:
        row = db.execute(
            "SELECT jobs.*, exams.study_instance_uid FROM jobs JOIN exams"
            " ON exams.id=jobs.exam_id WHERE jobs.id=?",
            (job_id,),
        ).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _from_row(
            Job,
            row,
            instance_ids=tuple(json.loads(row["instance_ids"])),
            selection=json.loads(row["selection"]),
            partial=bool(row["partial"]),
        )

    # -- deliveries -------------------------------------------------------------------------

    def due_deliveries(
        self, *, destination: str | None = None, now: float | None = None, limit: int = 32
    ) -> list[Delivery]:
        now = time.time() if now is None else now
        sql = _DELIVERY_SELECT + " WHERE d.state='pending' AND d.next_attempt_at<=?"
        params: list[Any] = [now]
        if destination is not None:
            sql += " AND d.destination=?"
            params.append(destination)
        with self._lock:
            rows = self._db.execute(
                sql + " ORDER BY d.next_attempt_at, d.id LIMIT ?", (*params, limit)
            ).fetchall()
        return [_delivery(r) for r in rows]

    def claim_delivery(self, delivery_id: int) -> Delivery | None:
        """Mark one pending delivery as being sent; None when another caller took it."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE deliveries SET state='sending', attempts=attempts+1"
                " WHERE id=? AND state='pending'",
                (delivery_id,),
            )
            if cur.rowcount != 1:
                return None
            return _delivery(
                db.execute(_DELIVERY_SELECT + " WHERE d.id=?", (delivery_id,)).fetchone()
            )

    def delivery_succeeded(self, delivery_id: int, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "UPDATE deliveries SET state='delivered', delivered_at=?, last_error=NULL"
                " WHERE id=? AND state='sending'",
                (now, delivery_id),
            )

    def delivery_failed(self, delivery_id: int, error: str, *, retry_at: float | None) -> str:
        """Back to pending at `retry_at`, or a dead letter when it is None; returns the state."""
        state = "pending" if retry_at is not None else "dead"
        with self._tx() as db:
            db.execute(
                "UPDATE deliveries SET state=?, next_attempt_at=?, last_error=?"
                " WHERE id=? AND state='sending'",
                (state, retry_at if retry_at is not None else 0.0, error, delivery_id),
            )
        return state

    def retry_dead_letters(self, ids: Sequence[int] | None = None) -> int:
        """Requeue dead letters (all, or the given delivery ids) with a fresh attempt count."""
        with self._tx() as db:
            sql = "UPDATE deliveries SET state='pending', attempts=0, next_attempt_at=?"
            sql += " WHERE state='dead'"
            params: list[Any] = [time.time()]
            if ids is not None:
                sql += f" AND id IN ({','.join('?' * len(ids))})"
                params += list(ids)
            return db.execute(sql, params).rowcount

    def deliveries(self, state: str | None = None) -> list[Delivery]:
        sql = _DELIVERY_SELECT + (" WHERE d.state=?" if state else "") + " ORDER BY d.id"
        with self._lock:
            rows = self._db.execute(sql, (state,) if state else ()).fetchall()
        return [_delivery(r) for r in rows]

    def results(self, study: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT r.*, e.study_instance_uid FROM results r JOIN exams e ON e.id=r.exam_id"
        params: tuple[Any, ...] = ()
        if study is not None:
            sql += " WHERE e.study_instance_uid=?"
            params = (study,)
        with self._lock:
            return [dict(r) for r in self._db.execute(sql + " ORDER BY r.id", params)]

    # -- start-up and reporting -------------------------------------------------------------

    def recover(self, max_attempts: int) -> dict[str, int]:
        """Turn work that was in flight when the process died back into work to do.

        A job that was running is queued again (its attempt already counted) or quarantined
        when it has used all its attempts; a delivery that was being sent is pending again
        (it may reach the destination twice; result UIDs are deterministic, so the
        destination sees the same instance again, not a new one)."""
        now = time.time()
        with self._tx() as db:
            exhausted = db.execute(
                "SELECT id FROM jobs WHERE state='running' AND attempts>=?", (max_attempts,)
            ).fetchall()
            requeued = db.execute(
                "UPDATE jobs SET state='queued', next_attempt_at=? WHERE state='running'"
                " AND attempts<?",
                (now, max_attempts),
            ).rowcount
            db.execute(
                "UPDATE exams SET state='queued' WHERE state='running' AND id IN"
                " (SELECT exam_id FROM jobs WHERE state='queued')"
            )
        for row in exhausted:
            self.fail_job(
                int(row["id"]),
                f"the process stopped during each of {max_attempts} analysis attempts",
                retry_at=None,
            )
        with self._tx() as db:
            resent = db.execute(
                "UPDATE deliveries SET state='pending', next_attempt_at=? WHERE state='sending'",
                (now,),
            ).rowcount
        return {
            "jobs_requeued": requeued,
            "jobs_quarantined": len(exhausted),
            "deliveries_requeued": resent,
        }

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per state, per table: what `plugin status` and the queue gauges show."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for table in ("instances", "exams", "jobs", "deliveries"):
                column = "status" if table == "instances" else "state"
                rows = self._db.execute(
                    f"SELECT {column} AS s, COUNT(*) AS n FROM {table} GROUP BY {column}"
                ).fetchall()
                out[table] = {r["s"]: r["n"] for r in rows}
        return out


def _row_in_state(
    db: sqlite3.Connection, table: str, row_id: int, state: str, action: str
) -> sqlite3.Row:
    """The row, which must be in `state` for the transition the caller is about to make."""
    row = db.execute(f"SELECT * FROM {table} WHERE id=?", (row_id,)).fetchone()
    if row is None or row["state"] != state:
        noun = table.rstrip("s")
        raise StoreError(f"{noun} {row_id} is not {state}; cannot {action} it")
    return row


_DELIVERY_SELECT = (
    "SELECT d.*, r.kind, r.sop_instance_uid, r.sop_class_uid, r.path, e.study_instance_uid"
    " FROM deliveries d JOIN results r ON r.id=d.result_id JOIN exams e ON e.id=r.exam_id"
)


R = TypeVar("R")


def _from_row(cls: type[R], row: sqlite3.Row, **converted: Any) -> R:
    """The dataclass `cls` from the row's columns of the same names; `converted` gives the
    fields whose column needs decoding (JSON, paths)."""
    plain = {f.name: row[f.name] for f in fields(cls) if f.name not in converted}
    return cls(**plain, **converted)


def _instance(row: sqlite3.Row) -> Instance:
    return _from_row(
        Instance,
        row,
        path=None if row["path"] is None else Path(row["path"]),
        description=json.loads(row["description"]),
    )


def _exam(row: sqlite3.Row) -> Exam:
    return _from_row(Exam, row)


def _delivery(row: sqlite3.Row) -> Delivery:
    return _from_row(Delivery, row, path=Path(row["path"]))
