"""The embedded audit store: one SQLite file on the daemon's host.

WAL with ``synchronous=FULL``; the file is created 0600 (SQLite gives its -wal and -shm files the
same mode). A file deleted or replaced under the running daemon is detected by its identity
(device, inode) and reported, never silently recreated: every connection opens with ``mode=rw``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from routescan.service.store.base import COLUMNS, AuditRecord, AuditStore, StoreOpenError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    trace_id TEXT NOT NULL,
    model_id TEXT NOT NULL,
    score REAL NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('flagged', 'ok')),
    detector_id TEXT NOT NULL,
    detector_version TEXT NOT NULL,
    operating_point TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS audits_created ON audits (created);
CREATE INDEX IF NOT EXISTS audits_model ON audits (model_id, created);
CREATE INDEX IF NOT EXISTS audits_trace ON audits (trace_id);
"""
_INSERT = f"INSERT INTO audits ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
FILE_MODE = 0o600


def _connect(path: Path, *, busy_timeout_s: float = 30.0) -> sqlite3.Connection:
    # mode=rw never creates: a probe or a reconnect must not replace a deleted file with an empty one
    uri = f"{path.resolve().as_uri()}?mode=rw"
    conn = sqlite3.connect(
        uri, uri=True, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    return conn


class SQLiteAuditStore(AuditStore):
    backend = "sqlite"
    db_errors = (sqlite3.Error,)
    placeholder = "?"
    begin_statement = "BEGIN IMMEDIATE"

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._identity: tuple[int, int] | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()

    @property
    def location(self) -> str:
        return f"database {self.path}"

    def _open(self) -> None:
        if self._read_only and not self.path.is_file():
            raise StoreOpenError(f"no audit store at {self.path}; name one with --db or --audit-store")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, FILE_MODE))
            self._writer = _connect(self.path, busy_timeout_s=self.busy_timeout_s)
            self._writer.executescript(_SCHEMA)
            self._reader = _connect(self.path, busy_timeout_s=self.busy_timeout_s)
            stat = self.path.stat()
            self._identity = (stat.st_dev, stat.st_ino)
        except (sqlite3.Error, OSError) as exc:
            raise StoreOpenError(
                f"cannot open the audit store {self.path} for writing ({exc}); make that file and its "
                "directory writable by this user, or choose another file with --db / ROUTESCAN_DB"
            ) from None

    def _close(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                conn.close()

    @contextlib.contextmanager
    def _writer_connection(self) -> Iterator[sqlite3.Connection]:
        assert self._writer is not None
        yield self._writer

    def _insert(self, cursor: Any, records: Sequence[AuditRecord]) -> None:
        cursor.executemany(_INSERT, [tuple(getattr(r, c) for c in COLUMNS) for r in records])

    def _check_before_commit(self) -> str | None:
        if not self._present():
            return f"{self.path} was deleted or replaced; restart the daemon"
        return None

    def _read(self, where: list[str], args: list[Any], limit: int, offset: int) -> list[dict[str, Any]]:
        if not self._present():
            raise sqlite3.OperationalError(f"{self.path} was deleted or replaced")
        sql = "SELECT id, " + ", ".join(COLUMNS) + " FROM audits"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id LIMIT ? OFFSET ?"
        assert self._reader is not None
        with self._read_lock:
            cur = self._reader.execute(sql, (*args, limit, offset))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def _purge(self, cutoff: float) -> int:
        assert self._writer is not None
        return self._writer.execute("DELETE FROM audits WHERE created < ?", (cutoff,)).rowcount

    def _present(self) -> bool:
        try:
            stat = self.path.stat()
        except OSError:
            return False
        return (stat.st_dev, stat.st_ino) == self._identity

    def _probe(self, commit: bool) -> None:
        probe = _connect(self.path, busy_timeout_s=min(self.busy_timeout_s, 1.0))
        try:
            probe.execute("BEGIN IMMEDIATE")
            if commit:
                probe.execute("CREATE TABLE IF NOT EXISTS write_probe (at REAL)")
                probe.execute("INSERT INTO write_probe VALUES (?)", (time.time(),))
                probe.execute("DELETE FROM write_probe")
                probe.execute("COMMIT")
            else:
                probe.execute("ROLLBACK")
        finally:
            probe.close()
