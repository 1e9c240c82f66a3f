"""One database connection, SQLite or PostgreSQL, behind the few calls the store makes.

The store writes its SQL once, in the dialect both engines share, with `?` placeholders and
`FOR UPDATE [SKIP LOCKED]` row locks; this module translates it for the engine in use. SQLite
takes the database write lock at `BEGIN IMMEDIATE`, which serialises every transaction, so it
drops the row-lock clauses; PostgreSQL keeps them and uses `%s` placeholders.
"""

from __future__ import annotations

import re
import sqlite3
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

POSTGRES_SCHEMES = ("postgresql://", "postgres://")

# Serialises migrations between nodes starting at once; (class, key) for pg_advisory_*lock.
LOCK_CLASS = 0x4D41  # "MA"
MIGRATION_LOCK = (LOCK_CLASS, 0)
ASSEMBLER_LOCK = (LOCK_CLASS, 1)


def is_postgres(database: str | Path) -> bool:
    return str(database).startswith(POSTGRES_SCHEMES)


def describe(database: str | Path) -> str:
    """Where the database is, for messages: a URL without any password in it."""
    if not is_postgres(database):
        return str(database)
    url = urlsplit(str(database))
    return f"postgresql://{url.username or ''}@{url.hostname or ''}:{url.port or 5432}{url.path}"


@lru_cache(maxsize=512)
def _for_sqlite(sql: str) -> str:
    return re.sub(r"\s+FOR UPDATE( SKIP LOCKED)?", "", sql)


@lru_cache(maxsize=512)
def _for_postgres(sql: str) -> str:
    return sql.replace("?", "%s")


class Database:
    """A connection with the store's dialect; not thread-safe (the store holds a lock)."""

    def __init__(self, database: str | Path, *, password: str | None = None) -> None:
        self.postgres = is_postgres(database)
        self.where = describe(database)
        if self.postgres:
            import psycopg
            from psycopg.rows import dict_row

            self._errors: tuple[type[BaseException], ...] = (psycopg.Error,)
            try:
                self._conn: Any = psycopg.connect(
                    str(database),
                    password=password,
                    autocommit=True,
                    row_factory=dict_row,
                    connect_timeout=10,
                    application_name="mammo-ai-plugin",
                )
            except psycopg.Error as exc:
                raise ConnectionError(
                    f"cannot connect to {self.where}: {str(exc).strip()}; check storage.database "
                    "and the variable named by storage.password_env"
                ) from exc
            self._translate = _for_postgres
        else:
            self._errors = (sqlite3.Error,)
            self._conn = sqlite3.connect(
                database, isolation_level=None, check_same_thread=False, timeout=30
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before we answer 0x0000 (WAL+NORMAL may lose the last
            # commits on power loss).
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._translate = _for_sqlite

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """The driver's exception classes (for callers that turn them into StoreError)."""
        return self._errors

    def execute(self, sql: str, params: Any = ()) -> Any:
        return self._conn.execute(self._translate(sql), tuple(params))

    def begin(self) -> None:
        self._conn.execute("BEGIN" if self.postgres else "BEGIN IMMEDIATE")

    def commit(self) -> None:
        self._conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.in_transaction:
            self._conn.execute("ROLLBACK")

    @property
    def in_transaction(self) -> bool:
        if self.postgres:
            from psycopg.pq import TransactionStatus

            return self._conn.info.transaction_status != TransactionStatus.IDLE
        return self._conn.in_transaction

    @property
    def broken(self) -> bool:
        """The server closed the connection (PostgreSQL restarted, network cut)."""
        return self.postgres and self._conn.closed

    def lock_key(self, text: str) -> None:
        """Serialise transactions about `text` (a study) between nodes until this one ends;
        SQLite's write lock already does."""
        if self.postgres:
            self._conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (text,))

    def try_lock(self, key: tuple[int, int]) -> bool:
        """A session-level advisory lock, held until `unlock` or the connection ends (the
        process dies): what makes a singleton role."""
        if not self.postgres:
            return True
        row = self._conn.execute("SELECT pg_try_advisory_lock(%s, %s) AS ok", key).fetchone()
        return bool(row["ok"])

    def unlock(self, key: tuple[int, int]) -> None:
        if self.postgres and not self._conn.closed:
            self._conn.execute("SELECT pg_advisory_unlock(%s, %s)", key)

    def close(self) -> None:
        self._conn.close()
