"""The store's schema, one for SQLite and PostgreSQL, as numbered migrations.

Each step brings the database from version N-1 to N inside one transaction; a new database runs
them all. The version lives in SQLite's `user_version` and in PostgreSQL's `schema_version`
table; on PostgreSQL the steps run under an advisory lock, so nodes that start together
migrate once. This is the whole mechanism: the schema is a handful of tables written in the
SQL both engines share (`{pk}` is the one type spelled differently), so a migration framework
(alembic, which brings SQLAlchemy) would add a dependency and a layout without removing code.

Never edit a released step: add the next one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from plugin.store_db import MIGRATION_LOCK, Database

_V1 = """
CREATE TABLE instances (
    id {pk},
    sop_instance_uid TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    size BIGINT NOT NULL,
    path TEXT,
    calling_ae TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('accepted', 'ignored')),
    reason TEXT,
    description TEXT NOT NULL DEFAULT '{{}}',
    superseded_by BIGINT REFERENCES instances(id),
    UNIQUE (sop_instance_uid, sha256)
);
CREATE INDEX instances_study ON instances(study_instance_uid);
CREATE TABLE exams (
    id {pk},
    study_instance_uid TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN
        ('collecting', 'queued', 'running', 'analysed', 'quarantined', 'skipped')),
    first_seen DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,
    round_started DOUBLE PRECISION NOT NULL,
    dirty INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0,
    reason TEXT
);
CREATE TABLE jobs (
    id {pk},
    exam_id BIGINT NOT NULL REFERENCES exams(id),
    version INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'quarantined')),
    instance_ids TEXT NOT NULL,
    selection TEXT NOT NULL,
    partial INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    reason TEXT,
    UNIQUE (exam_id, version)
);
CREATE TABLE results (
    id {pk},
    job_id BIGINT NOT NULL REFERENCES jobs(id),
    exam_id BIGINT NOT NULL REFERENCES exams(id),
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    UNIQUE (job_id, sop_instance_uid)
);
CREATE TABLE deliveries (
    id {pk},
    result_id BIGINT NOT NULL REFERENCES results(id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sending', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    last_error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    delivered_at DOUBLE PRECISION,
    UNIQUE (result_id, destination)
);
CREATE INDEX deliveries_due ON deliveries(state, next_attempt_at);
"""

# Leases on claimed rows, the processes that hold them, every claim (the proof that no row was
# held by two claimants at once), and the audit events written with the commit they describe.
_V2 = """
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires DOUBLE PRECISION;
ALTER TABLE deliveries ADD COLUMN lease_owner TEXT;
ALTER TABLE deliveries ADD COLUMN lease_expires DOUBLE PRECISION;
CREATE INDEX jobs_due ON jobs(state, next_attempt_at);
CREATE TABLE nodes (
    claimant TEXT PRIMARY KEY,
    roles TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL,
    stopped_at DOUBLE PRECISION
);
CREATE TABLE claims (
    id {pk},
    kind TEXT NOT NULL CHECK (kind IN ('job', 'delivery')),
    row_id BIGINT NOT NULL,
    owner TEXT NOT NULL,
    claimed_at DOUBLE PRECISION NOT NULL,
    released_at DOUBLE PRECISION,
    outcome TEXT
);
CREATE INDEX claims_row ON claims(kind, row_id);
CREATE TABLE events (
    id {pk},
    ts DOUBLE PRECISION NOT NULL,
    node TEXT NOT NULL,
    event TEXT NOT NULL,
    study_instance_uid TEXT,
    detail TEXT NOT NULL
);
"""


def _relative_paths(db: Database, spool: Path) -> None:
    """Version 1 stored absolute paths; from version 2 paths under the spool are relative to
    it, so every node that mounts the spool (wherever) reads the same files."""
    prefix = os.path.abspath(spool) + os.sep
    for table in ("instances", "results"):
        db.execute(
            f"UPDATE {table} SET path=substr(path, ?) WHERE substr(path, 1, ?)=?",
            (len(prefix) + 1, len(prefix), prefix),
        )


Step = Callable[[Database, Path], None]


def _sql(text: str) -> Step:
    def run(db: Database, spool: Path) -> None:
        pk = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
        for statement in text.format(pk=pk if db.postgres else "INTEGER PRIMARY KEY").split(";"):
            if statement.strip():
                db.execute(statement)

    return run


def _steps(*steps: Step) -> Step:
    def run(db: Database, spool: Path) -> None:
        for step in steps:
            step(db, spool)

    return run


MIGRATIONS: tuple[Step, ...] = (_sql(_V1), _steps(_sql(_V2), _relative_paths))
"""Step i brings the schema to version i + 1."""
SCHEMA_VERSION = len(MIGRATIONS)


class NewerSchema(Exception):
    def __init__(self, found: int) -> None:
        super().__init__(found)
        self.found = found


def current_version(db: Database) -> int:
    if not db.postgres:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    row = db.execute("SELECT to_regclass('schema_version') IS NOT NULL AS present").fetchone()
    if not row["present"]:
        return 0
    row = db.execute("SELECT version FROM schema_version").fetchone()
    return 0 if row is None else int(row["version"])


def migrate(db: Database, spool: Path) -> int:
    """Bring the schema to SCHEMA_VERSION in one transaction; returns the version found."""
    db.begin()
    try:
        if db.postgres:
            db.execute("SELECT pg_advisory_xact_lock(?, ?)", MIGRATION_LOCK)
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        found = current_version(db)
        if found > SCHEMA_VERSION:
            raise NewerSchema(found)
        for step in MIGRATIONS[found:]:
            step(db, spool)
        if db.postgres:
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        else:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return found
