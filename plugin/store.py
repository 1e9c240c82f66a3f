"""The durable state of the service: a database (SQLite by default, PostgreSQL for several
nodes) beside the spool folder.

This module owns every state transition of instances, exams and their analysis jobs, result
objects and (object, destination) deliveries; other modules call these methods and never run
SQL. Each method is one transaction, so a crash leaves the database at a step boundary.

Jobs and deliveries are claimed under a lease held by a claimant (one process of one node):
the claimant renews it (`heartbeat`) while it works; a lease that runs out returns the row to
the queue (`reclaim`), so work of a node that died is taken over, and a claimant whose lease
was taken can no longer settle the row. Every claim is kept in `claims`, the proof that no
row was ever held by two claimants at once. Paths under the spool are stored relative to it,
so nodes that mount a shared spool at different places read the same files.

States:
  exam:      collecting → queued → running → analysed | quarantined | skipped
             (a new image for an analysed exam sends it back to collecting: a new version)
  job:       queued → running → done | queued (retry) | quarantined
  delivery:  pending → sending → delivered | pending (retry) | dead
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from models.header import ImageDescription
from plugin.selection import SelectionRecord
from plugin.store_db import Database, describe, is_postgres
from plugin.store_schema import SCHEMA_VERSION, NewerSchema, current_version, migrate

if TYPE_CHECKING:
    from plugin.config import StorageConfig

MAX_TEXT = 1024
"""Characters kept of a free-text column (a reason, a peer's error) at write."""


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
    description: ImageDescription | None = None
    """What the header says (laterality, view, kind, modifiers, times): the selection
    policy's facts; None for an ignored instance."""


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
    description: ImageDescription | None


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
    selection: SelectionRecord
    """How the exam closed, which image each view got, what was skipped and why."""
    attempts: int
    created_at: float
    reason: str | None

    @property
    def partial(self) -> bool:
        return self.selection.partial


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


@dataclass(frozen=True)
class Node:
    """A process that registered with the store (`plugin status` lists them)."""

    claimant: str
    roles: str
    pid: int
    started_at: float
    heartbeat_at: float
    stopped_at: float | None


@dataclass(frozen=True)
class Lease:
    """A job or delivery held by a claimant."""

    kind: str
    row_id: int
    owner: str
    expires: float


@dataclass(frozen=True)
class Claim:
    """One claim of a row, from the claim to its release (None while held)."""

    kind: str
    row_id: int
    owner: str
    claimed_at: float
    released_at: float | None
    outcome: str | None


@dataclass(frozen=True)
class JobTimes:
    """When a job's exam last received an image, when its analysis started and finished, and
    when its last result was delivered (epoch seconds; None where that has not happened)."""

    job_id: int
    study_instance_uid: str
    last_received: float
    started: float | None
    finished: float | None
    delivered: float | None


@dataclass(frozen=True)
class Event:
    """An audit event as committed: what happened, where (node), to which study."""

    id: int
    ts: float
    node: str
    event: str
    study_instance_uid: str | None
    detail: dict[str, Any]


def default_claimant() -> str:
    return socket.gethostname()


class Store:
    """Thread-safe: one connection, one lock, one transaction per call.

    `database` is a SQLite file or a `postgresql://user@host:port/db` URL (the password comes
    separately, from the environment); `claimant` names this process in leases, unique among
    the processes that share the database and stable across its restarts; `lease_seconds` is
    how long a claim lasts without a `heartbeat`."""

    def __init__(
        self,
        database: Path | str,
        spool: Path,
        *,
        password: str | None = None,
        claimant: str | None = None,
        lease_seconds: float = 60.0,
    ) -> None:
        self.database: Path | str = database if is_postgres(database) else Path(database)
        self.spool = Path(spool)
        self.claimant = claimant or default_claimant()
        self.lease_seconds = lease_seconds
        self._password = password
        self._spool_prefix = os.path.abspath(self.spool) + os.sep
        if isinstance(self.database, Path):
            self.database.parent.mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = self._connect()
        try:
            migrate(self._db, self.spool)
        except NewerSchema as exc:
            self._db.close()
            raise StoreError(
                f"{describe(self.database)}: database schema {exc.found} is newer than this "
                f"version of the plugin ({SCHEMA_VERSION}); upgrade the plugin or use another "
                "database"
            ) from None
        except self._db.errors as exc:
            self._db.close()
            raise StoreError(
                f"{describe(self.database)}: cannot open the database ({exc})"
            ) from exc

    @classmethod
    def open(cls, storage: StorageConfig, **kw: Any) -> Store:
        """The store a config's `storage` section names, password from its variable."""
        return cls(storage.database, storage.spool, password=storage.password(), **kw)

    # -- plumbing ---------------------------------------------------------------------------

    def _connect(self) -> Database:
        try:
            return Database(self.database, password=self._password)
        except ConnectionError as exc:
            raise StoreError(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - sqlite3 errors on a file that is no database
            raise StoreError(
                f"{describe(self.database)}: cannot open the database ({exc})"
            ) from exc

    def _conn(self) -> Database:
        """The connection, opened again if the server dropped it (PostgreSQL restarted)."""
        if self._db.broken:
            self._db = self._connect()
        return self._db

    @contextmanager
    def _tx(self) -> Iterator[Database]:
        """One write transaction. A COMMIT that fails (disk full, I/O error) is rolled back
        too: otherwise the connection stays inside the failed transaction and every later
        call fails with "cannot start a transaction within a transaction"."""
        with self._lock:
            db = self._conn()
            db.begin()
            try:
                yield db
                db.commit()
            except BaseException:
                # SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR).
                if not db.broken:
                    db.rollback()
                raise

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._conn().execute(sql, params).fetchall()

    def _stored_path(self, path: Path | None) -> str | None:
        """Paths under the spool relative to it; others (a file outside it) as given."""
        if path is None:
            return None
        text = os.path.abspath(path)
        return text[len(self._spool_prefix) :] if text.startswith(self._spool_prefix) else text

    def _path(self, stored: str | None) -> Path | None:
        return None if stored is None else self.spool / stored

    @property
    def schema_version(self) -> int:
        with self._lock:
            return current_version(self._conn())

    @property
    def postgres(self) -> bool:
        return self._db.postgres

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
            # Listeners on several nodes may receive the same study (or the same instance)
            # at once: one at a time per study decides new/duplicate and touches the exam.
            db.lock_key(new.study_instance_uid)
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
            row_id = _inserted(
                db.execute(
                    "INSERT INTO instances (sop_instance_uid, sha256, study_instance_uid,"
                    " series_instance_uid, sop_class_uid, transfer_syntax_uid, size, path,"
                    " calling_ae, received_at, status, reason, description)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
                    (
                        new.sop_instance_uid,
                        new.sha256,
                        new.study_instance_uid,
                        new.series_instance_uid,
                        new.sop_class_uid,
                        new.transfer_syntax_uid,
                        new.size,
                        self._stored_path(new.path),
                        new.calling_ae,
                        now,
                        new.status,
                        _cap(new.reason),
                        new.description.to_json() if new.description else "{}",
                    ),
                )
            )
            for old in older:
                db.execute("UPDATE instances SET superseded_by=? WHERE id=?", (row_id, old["id"]))
            self._event(
                db,
                now,
                "received" if new.status == "accepted" else "ignored",
                new.study_instance_uid,
                sop_instance=new.sop_instance_uid,
                calling_ae=new.calling_ae,
                bytes=new.size,
                replaced=bool(older),
                reason=_cap(new.reason, 256),
            )
            if new.status == "accepted":
                self._touch_exam(db, new.study_instance_uid, now, late_images)
            return (Recorded.REPLACED if older else Recorded.NEW), row_id

    def _touch_exam(self, db: Database, study: str, now: float, late_images: str) -> None:
        exam = db.execute(
            "SELECT * FROM exams WHERE study_instance_uid=? FOR UPDATE", (study,)
        ).fetchone()
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
        return [self._instance(r) for r in self._read(sql + " ORDER BY id", (study,))]

    def instances_by_id(self, ids: Iterable[int]) -> list[Instance]:
        ids = list(ids)
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = self._read(f"SELECT * FROM instances WHERE id IN ({marks}) ORDER BY id", ids)
        return [self._instance(r) for r in rows]

    def known_instance(self, sop_instance_uid: str, sha256: str) -> bool:
        return bool(
            self._read(
                "SELECT 1 AS known FROM instances WHERE sop_instance_uid=? AND sha256=?",
                (sop_instance_uid, sha256),
            )
        )

    def _instance(self, row: Any) -> Instance:
        return _from_row(
            Instance,
            row,
            path=self._path(row["path"]),
            description=(
                ImageDescription.from_json(row["description"])
                if row["description"] not in ("", "{}")
                else None
            ),
        )

    # -- exams and jobs ---------------------------------------------------------------------

    def collecting_exams(self) -> list[Exam]:
        rows = self._read("SELECT * FROM exams WHERE state='collecting' ORDER BY last_seen")
        return [_exam(r) for r in rows]

    def exam(self, study: str) -> Exam | None:
        rows = self._read("SELECT * FROM exams WHERE study_instance_uid=?", (study,))
        return _exam(rows[0]) if rows else None

    def exams(self, *, last: int | None = None) -> list[Exam]:
        """Every exam in id order, or only the `last` ones (`plugin status` on a site with a
        year of exams should not read them all)."""
        sql = "SELECT * FROM exams ORDER BY id"
        params: tuple[int, ...] = ()
        if last is not None:
            sql = f"SELECT * FROM ({sql} DESC LIMIT ?) AS recent ORDER BY id"
            params = (last,)
        return [_exam(r) for r in self._read(sql, params)]

    def queue_job(
        self,
        exam_id: int,
        instance_ids: Sequence[int],
        selection: SelectionRecord,
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
            job_id = _inserted(
                db.execute(
                    "INSERT INTO jobs (exam_id, version, state, instance_ids, selection, partial,"
                    " next_attempt_at, created_at) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)"
                    " RETURNING id",
                    (
                        exam_id,
                        version,
                        json.dumps(list(instance_ids)),
                        selection.to_json(),
                        int(selection.partial),
                        now,
                        now,
                    ),
                )
            )
            db.execute(
                "UPDATE exams SET state='queued', version=?, dirty=0, reason=NULL WHERE id=?",
                (version, exam_id),
            )
            return self._job(db, job_id)

    def skip_exam(self, exam_id: int, reason: str, *, seen: float | None = None) -> bool:
        """Nothing in the exam can be analysed (e.g. only For Processing images). False when
        the exam is no longer collecting, or (with `seen`, as in `queue_job`) an image
        arrived after the caller looked: that image may be analysable."""
        sql = "UPDATE exams SET state='skipped', reason=? WHERE id=? AND state='collecting'"
        params: list[Any] = [_cap(reason), exam_id]
        if seen is not None:
            sql += " AND last_seen=?"
            params.append(seen)
        with self._tx() as db:
            return db.execute(sql, params).rowcount == 1

    def claim_job(self, *, now: float | None = None) -> Job | None:
        """The oldest due queued job, now running under this claimant's lease (its attempt
        counted before it runs, so a job that kills the process still reaches its attempt
        limit). Claimants on other nodes skip the row while it is being claimed."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT id, exam_id FROM jobs WHERE state='queued' AND next_attempt_at<=?"
                " ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
                (now,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, started_at=?,"
                " lease_owner=?, lease_expires=? WHERE id=?",
                (now, self.claimant, now + self.lease_seconds, row["id"]),
            )
            db.execute("UPDATE exams SET state='running' WHERE id=?", (row["exam_id"],))
            self._claimed(db, "job", int(row["id"]), now)
            return self._job(db, int(row["id"]))

    def finish_job(
        self, job_id: int, results: Sequence[NewResult], *, now: float | None = None
    ) -> Finished:
        """The job's result objects are durable files: record them and queue one delivery
        per (object, destination), all in one transaction."""
        now = time.time() if now is None else now
        with self._tx() as db:
            job = self._held(db, "jobs", job_id, "running", "finish")
            for res in results:
                result_id = _inserted(
                    db.execute(
                        "INSERT INTO results (job_id, exam_id, version, kind, sop_instance_uid,"
                        " sop_class_uid, path, size, created_at) VALUES (?,?,?,?,?,?,?,?,?)"
                        " RETURNING id",
                        (
                            job_id,
                            job["exam_id"],
                            job["version"],
                            res.kind,
                            res.sop_instance_uid,
                            res.sop_class_uid,
                            self._stored_path(res.path),
                            res.size,
                            now,
                        ),
                    )
                )
                for dest in res.destinations:
                    db.execute(
                        "INSERT INTO deliveries (result_id, destination, state, next_attempt_at,"
                        " created_at) VALUES (?, ?, 'pending', ?, ?)",
                        (result_id, dest, now, now),
                    )
            db.execute(
                "UPDATE jobs SET state='done', finished_at=?, reason=NULL, lease_owner=NULL,"
                " lease_expires=NULL WHERE id=?",
                (now, job_id),
            )
            self._released(db, "job", job_id, now, "done")
            self._event(
                db,
                now,
                "analysed",
                self._study(db, int(job["exam_id"])),
                job_id=job_id,
                version=job["version"],
                attempt=job["attempts"],
                objects=len(results),
            )
            return self._end_round(db, int(job["exam_id"]), "analysed", None, "done", now)

    def fail_job(
        self, job_id: int, reason: str, *, retry_at: float | None, now: float | None = None
    ) -> Finished:
        """A failed attempt: queued again at `retry_at`, or quarantined when it is None."""
        now = time.time() if now is None else now
        with self._tx() as db:
            job = self._held(db, "jobs", job_id, "running", "fail")
            return self._fail_job(db, job, reason, retry_at, now, "failed")

    def _fail_job(
        self, db: Database, job: Any, reason: str, retry_at: float | None, now: float, why: str
    ) -> Finished:
        job_id = int(job["id"])
        self._released(db, "job", job_id, now, why)
        if retry_at is not None:
            db.execute(
                "UPDATE jobs SET state='queued', next_attempt_at=?, reason=?, lease_owner=NULL,"
                " lease_expires=NULL WHERE id=?",
                (retry_at, _cap(reason), job_id),
            )
            db.execute("UPDATE exams SET state='queued' WHERE id=?", (job["exam_id"],))
            return Finished("queued", "queued")
        db.execute(
            "UPDATE jobs SET state='quarantined', finished_at=?, reason=?, lease_owner=NULL,"
            " lease_expires=NULL WHERE id=?",
            (now, _cap(reason), job_id),
        )
        self._event(
            db,
            now,
            "quarantined",
            self._study(db, int(job["exam_id"])),
            job_id=job_id,
            version=job["version"],
            reason=_cap(reason, 256),
        )
        return self._end_round(
            db, int(job["exam_id"]), "quarantined", _cap(reason), "quarantined", now
        )

    def _end_round(
        self,
        db: Database,
        exam_id: int,
        state: str,
        reason: str | None,
        job: str,
        now: float,
    ) -> Finished:
        exam = db.execute("SELECT dirty FROM exams WHERE id=? FOR UPDATE", (exam_id,)).fetchone()
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
            sql = "SELECT id FROM exams WHERE state='quarantined' FOR UPDATE"
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
            return self._job(self._conn(), job_id)

    def jobs(self, state: str | None = None) -> list[Job]:
        with self._lock:
            db = self._conn()
            sql = "SELECT id FROM jobs" + (" WHERE state=?" if state else "") + " ORDER BY id"
            ids = [r["id"] for r in db.execute(sql, (state,) if state else ()).fetchall()]
            return [self._job(db, i) for i in ids]

    def _job(self, db: Database, job_id: int) -> Job:
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
            selection=SelectionRecord.from_json(row["selection"]),
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
        rows = self._read(sql + " ORDER BY d.next_attempt_at, d.id LIMIT ?", (*params, limit))
        return [self._delivery(r) for r in rows]

    def claim_delivery(self, delivery_id: int, *, now: float | None = None) -> Delivery | None:
        """Mark one pending delivery as being sent under this claimant's lease; None when
        another claimant took it (or is taking it: its row lock is skipped, not waited for)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM deliveries WHERE id=? AND state='pending' FOR UPDATE SKIP LOCKED",
                (delivery_id,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE deliveries SET state='sending', attempts=attempts+1, lease_owner=?,"
                " lease_expires=? WHERE id=?",
                (self.claimant, now + self.lease_seconds, delivery_id),
            )
            self._claimed(db, "delivery", delivery_id, now)
            return self._delivery(
                db.execute(_DELIVERY_SELECT + " WHERE d.id=?", (delivery_id,)).fetchone()
            )

    def delivery_succeeded(self, delivery_id: int, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            if self._settle(db, delivery_id, now, "delivered"):
                self._delivery_event(db, delivery_id, now, "delivered")
                db.execute(
                    "UPDATE deliveries SET state='delivered', delivered_at=?, last_error=NULL,"
                    " lease_owner=NULL, lease_expires=NULL WHERE id=?",
                    (now, delivery_id),
                )

    def delivery_failed(self, delivery_id: int, error: str, *, retry_at: float | None) -> str:
        """Back to pending at `retry_at`, or a dead letter when it is None; returns the state."""
        state = "pending" if retry_at is not None else "dead"
        with self._tx() as db:
            now = time.time()
            if self._settle(db, delivery_id, now, state):
                if state == "dead":
                    self._delivery_event(
                        db, delivery_id, now, "dead_letter", error=_cap(error, 256)
                    )
                db.execute(
                    "UPDATE deliveries SET state=?, next_attempt_at=?, last_error=?,"
                    " lease_owner=NULL, lease_expires=NULL WHERE id=?",
                    (state, retry_at if retry_at is not None else 0.0, _cap(error), delivery_id),
                )
        return state

    def _settle(self, db: Database, delivery_id: int, now: float, outcome: str) -> bool:
        """Whether this claimant still holds the delivery (its lease may have run out and the
        row gone to another dispatcher, whose outcome then counts)."""
        row = db.execute(
            "SELECT id FROM deliveries WHERE id=? AND state='sending' AND lease_owner=? FOR UPDATE",
            (delivery_id, self.claimant),
        ).fetchone()
        if row is None:
            return False
        self._released(db, "delivery", delivery_id, now, outcome)
        return True

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
        return [self._delivery(r) for r in self._read(sql, (state,) if state else ())]

    def results(self, study: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT r.*, e.study_instance_uid FROM results r JOIN exams e ON e.id=r.exam_id"
        params: tuple[Any, ...] = ()
        if study is not None:
            sql += " WHERE e.study_instance_uid=?"
            params = (study,)
        rows = [dict(r) for r in self._read(sql + " ORDER BY r.id", params)]
        for row in rows:
            row["path"] = str(self._path(row["path"]))
        return rows

    def _delivery(self, row: Any) -> Delivery:
        return _from_row(Delivery, row, path=self._path(row["path"]))

    # -- audit events -----------------------------------------------------------------------

    def _event(
        self, db: Database, now: float, event: str, study: str | None, **detail: Any
    ) -> None:
        """An audit event in the transaction it describes: committed with it or not at all
        (the audit file is written after the commit, so a crash in between loses its line,
        never this row)."""
        db.execute(
            "INSERT INTO events (ts, node, event, study_instance_uid, detail)"
            " VALUES (?, ?, ?, ?, ?)",
            (now, self.claimant, event, study, json.dumps(detail, default=str)),
        )

    def _study(self, db: Database, exam_id: int) -> str:
        row = db.execute("SELECT study_instance_uid FROM exams WHERE id=?", (exam_id,)).fetchone()
        return str(row["study_instance_uid"])

    def _delivery_event(
        self, db: Database, delivery_id: int, now: float, event: str, **extra: Any
    ) -> None:
        d = db.execute(_DELIVERY_SELECT + " WHERE d.id=?", (delivery_id,)).fetchone()
        self._event(
            db,
            now,
            event,
            d["study_instance_uid"],
            delivery_id=delivery_id,
            destination=d["destination"],
            kind=d["kind"],
            result=d["sop_instance_uid"],
            attempt=d["attempts"],
            **extra,
        )

    def events(self, *, after: int = 0, limit: int = 10_000) -> list[Event]:
        """Audit events with ids above `after`, oldest first (`plugin audit`)."""
        rows = self._read("SELECT * FROM events WHERE id>? ORDER BY id LIMIT ?", (after, limit))
        return [_from_row(Event, r, detail=json.loads(r["detail"])) for r in rows]

    # -- leases -----------------------------------------------------------------------------

    def _claimed(self, db: Database, kind: str, row_id: int, now: float) -> None:
        db.execute(
            "INSERT INTO claims (kind, row_id, owner, claimed_at) VALUES (?, ?, ?, ?)",
            (kind, row_id, self.claimant, now),
        )

    def _released(self, db: Database, kind: str, row_id: int, now: float, outcome: str) -> None:
        db.execute(
            "UPDATE claims SET released_at=?, outcome=? WHERE kind=? AND row_id=?"
            " AND released_at IS NULL",
            (now, outcome, kind, row_id),
        )

    def _held(self, db: Database, table: str, row_id: int, state: str, action: str) -> Any:
        """The row in `state` under this claimant's lease, for a transition it makes."""
        row = _row_in_state(db, table, row_id, state, action)
        if row["lease_owner"] != self.claimant:
            raise StoreError(
                f"{table.rstrip('s')} {row_id} is no longer held by {self.claimant} (its lease "
                f"ran out and {row['lease_owner'] or 'the queue'} has it); cannot {action} it"
            )
        return row

    def heartbeat(self, roles: Sequence[str], *, now: float | None = None) -> int:
        """This claimant is alive: register it with its roles and extend the leases it holds.
        Returns how many leases were extended."""
        now = time.time() if now is None else now
        expires = now + self.lease_seconds
        with self._tx() as db:
            db.execute(
                "INSERT INTO nodes (claimant, roles, pid, started_at, heartbeat_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (claimant) DO UPDATE SET"
                " roles=excluded.roles, pid=excluded.pid, heartbeat_at=excluded.heartbeat_at,"
                " stopped_at=NULL",
                (self.claimant, ",".join(roles), os.getpid(), now, now),
            )
            renewed = 0
            for table, state in (("jobs", "running"), ("deliveries", "sending")):
                renewed += db.execute(
                    f"UPDATE {table} SET lease_expires=? WHERE state=? AND lease_owner=?",
                    (expires, state, self.claimant),
                ).rowcount
            return renewed

    def register(self, roles: Sequence[str], *, now: float | None = None) -> None:
        """A (re)start of this claimant: it holds nothing from a former life."""
        now = time.time() if now is None else now
        self.heartbeat(roles, now=now)
        with self._tx() as db:
            db.execute("UPDATE nodes SET started_at=? WHERE claimant=?", (now, self.claimant))

    def unregister(self) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE nodes SET stopped_at=? WHERE claimant=?", (time.time(), self.claimant)
            )

    def reclaim(
        self, max_attempts: int, *, mine: bool = False, now: float | None = None
    ) -> dict[str, int]:
        """Return to the queue the rows whose lease ran out (their claimant died or hung), and
        with `mine` those this claimant held before it restarted. A job is queued again (its
        attempt already counted) or quarantined when it has used all its attempts; a delivery
        is pending again (the destination may see the object twice; result UIDs are
        deterministic, so it sees the same instance again, not a new one)."""
        now = time.time() if now is None else now
        out = {"jobs_requeued": 0, "jobs_quarantined": 0, "deliveries_requeued": 0}
        taken = "(lease_owner IS NULL OR lease_expires<?" + (" OR lease_owner=?)" if mine else ")")
        params: tuple[Any, ...] = (now, self.claimant) if mine else (now,)
        with self._tx() as db:
            jobs = db.execute(
                f"SELECT * FROM jobs WHERE state='running' AND {taken} FOR UPDATE SKIP LOCKED",
                params,
            ).fetchall()
            for job in jobs:
                why = "restart" if job["lease_owner"] == self.claimant else "expired"
                if job["attempts"] >= max_attempts:
                    reason = f"the process stopped during each of {max_attempts} analysis attempts"
                    self._fail_job(db, job, reason, None, now, why)
                    out["jobs_quarantined"] += 1
                else:
                    self._fail_job(db, job, _TAKEN_BACK[why], now, now, why)
                    out["jobs_requeued"] += 1
            rows = db.execute(
                f"SELECT id, lease_owner FROM deliveries WHERE state='sending' AND {taken}"
                " FOR UPDATE SKIP LOCKED",
                params,
            ).fetchall()
            for row in rows:
                why = "restart" if row["lease_owner"] == self.claimant else "expired"
                self._released(db, "delivery", int(row["id"]), now, why)
                db.execute(
                    "UPDATE deliveries SET state='pending', next_attempt_at=?, lease_owner=NULL,"
                    " lease_expires=NULL WHERE id=?",
                    (now, row["id"]),
                )
            out["deliveries_requeued"] = len(rows)
        return out

    def recover(self, max_attempts: int) -> dict[str, int]:
        """At start-up: take back what this claimant held when it died, and whatever is left
        over from claimants whose leases ran out."""
        return self.reclaim(max_attempts, mine=True)

    def try_singleton(self, key: tuple[int, int]) -> Database | None:
        """A connection holding the advisory lock `key`, or None while another process holds
        it. The lock lasts as long as the connection: until `close`, or the process dies."""
        db = self._connect()
        if db.try_lock(key):
            return db
        db.close()
        return None

    # -- reporting --------------------------------------------------------------------------

    def nodes(self) -> list[Node]:
        return [_from_row(Node, r) for r in self._read("SELECT * FROM nodes ORDER BY claimant")]

    def leases(self) -> list[Lease]:
        rows = self._read(
            "SELECT 'job' AS kind, id AS row_id, lease_owner AS owner, lease_expires AS expires"
            " FROM jobs WHERE state='running' UNION ALL"
            " SELECT 'delivery', id, lease_owner, lease_expires FROM deliveries"
            " WHERE state='sending' ORDER BY 1, 2"
        )
        return [Lease(r["kind"], r["row_id"], r["owner"] or "", r["expires"] or 0.0) for r in rows]

    def claims(self, kind: str | None = None) -> list[Claim]:
        sql = "SELECT * FROM claims" + (" WHERE kind=?" if kind else "") + " ORDER BY id"
        return [_from_row(Claim, r) for r in self._read(sql, (kind,) if kind else ())]

    def job_times(self) -> list[JobTimes]:
        """Each job's milestones, oldest job first: turnaround (last image in to last result
        delivered) and analysis time without reading the tables behind them."""
        rows = self._read(
            "SELECT j.id AS job_id, e.study_instance_uid, j.started_at AS started,"
            " j.finished_at AS finished,"
            " (SELECT MAX(i.received_at) FROM instances i"
            "  WHERE i.study_instance_uid=e.study_instance_uid) AS last_received,"
            " (SELECT MAX(d.delivered_at) FROM deliveries d JOIN results r ON r.id=d.result_id"
            "  WHERE r.job_id=j.id) AS delivered"
            " FROM jobs j JOIN exams e ON e.id=j.exam_id ORDER BY j.id"
        )
        return [_from_row(JobTimes, r) for r in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per state, per table: what `plugin status` and the queue gauges show."""
        out: dict[str, dict[str, int]] = {}
        for table in ("instances", "exams", "jobs", "deliveries"):
            column = "status" if table == "instances" else "state"
            rows = self._read(f"SELECT {column} AS s, COUNT(*) AS n FROM {table} GROUP BY {column}")
            out[table] = {r["s"]: int(r["n"]) for r in rows}
        return out


_TAKEN_BACK = {
    "restart": "the process running it restarted",
    "expired": "the lease of the process running it ran out",
}


def _cap(text: str | None, limit: int = MAX_TEXT) -> str | None:
    """Free text as stored: at most `limit` characters, saying how much was cut."""
    if text is None or len(text) <= limit:
        return text
    note = f"…[{len(text) - limit} more chars]"
    return text[: limit - len(note)] + note


def _inserted(cursor: Any) -> int:
    return int(cursor.fetchone()["id"])


def _row_in_state(db: Database, table: str, row_id: int, state: str, action: str) -> Any:
    """The row, locked, which must be in `state` for the transition the caller is about to
    make."""
    row = db.execute(f"SELECT * FROM {table} WHERE id=? FOR UPDATE", (row_id,)).fetchone()
    if row is None or row["state"] != state:
        noun = table.rstrip("s")
        raise StoreError(f"{noun} {row_id} is not {state}; cannot {action} it")
    return row


_DELIVERY_SELECT = (
    "SELECT d.*, r.kind, r.sop_instance_uid, r.sop_class_uid, r.path, e.study_instance_uid"
    " FROM deliveries d JOIN results r ON r.id=d.result_id JOIN exams e ON e.id=r.exam_id"
)


R = TypeVar("R")


def _from_row(cls: type[R], row: Any, **converted: Any) -> R:
    """The dataclass `cls` from the row's columns of the same names; `converted` gives the
    fields whose column needs decoding (JSON, paths)."""
    plain = {f.name: row[f.name] for f in fields(cls) if f.name not in converted}
    return cls(**plain, **converted)


def _exam(row: Any) -> Exam:
    return _from_row(Exam, row)
