"""The audit store: one SQLite row per scored request (ids, score, label, detector; never text).

Durability: WAL with ``synchronous=FULL``, and a score is acknowledged only after the transaction
that holds it has committed. Throughput: one writer thread commits whatever arrived during a short
window in one transaction (group commit), so concurrent requests share an fsync instead of each
paying one. Isolation: each request's rows sit in their own savepoint inside that transaction, so
one request whose rows the database refuses fails alone instead of failing everyone it shared a
commit with.

Failure is loud: every store error is logged with its cause and counted, :meth:`AuditStore.health`
says whether the writer runs and the database file is still the one opened (a file deleted or
replaced under a running daemon is detected, never silently recreated), and reads fail with their
own error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("routescan.store")

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
"""
_COLUMNS = (
    "trace_id",
    "model_id",
    "score",
    "label",
    "detector_id",
    "detector_version",
    "operating_point",
    "created",
)
_INSERT = f"INSERT INTO audits ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
# The audit trail is private to the daemon's user: created 0600 (SQLite gives the -wal and -shm
# files the database file's mode).
FILE_MODE = 0o600


@dataclass(frozen=True)
class AuditRecord:
    trace_id: str
    model_id: str
    score: float
    label: str
    detector_id: str
    detector_version: str
    operating_point: str
    created: float

    def __post_init__(self) -> None:
        # the service refuses non-finite scores with a 4xx first; this keeps the store honest alone
        if not math.isfinite(self.score):
            raise ValueError("an audit record's score must be a finite number")


class StoreError(RuntimeError):
    """The audit store could not persist records (the score was not acknowledged)."""


class StoreReadError(StoreError):
    """The audit store could not be read."""


class StoreOpenError(StoreError, ValueError):
    """The audit store cannot be opened; the message names the path and the fix."""


@dataclass(frozen=True)
class StoreHealth:
    ready: bool
    writer_alive: bool
    database_present: bool
    writable: bool
    errors: int
    last_error: str | None
    last_commit_failed: bool

    @property
    def reason(self) -> str | None:
        if not self.writer_alive:
            return "the audit writer thread is not running"
        if not self.database_present:
            return "the audit database file was deleted or replaced under the running daemon"
        if not self.writable:
            return f"the audit database refuses writes ({self.last_error or 'locked or read-only'})"
        return None


def _connect(path: Path, *, busy_timeout_s: float = 30.0) -> sqlite3.Connection:
    # mode=rw never creates: a probe or a reconnect must not replace a deleted file with an empty one
    conn = sqlite3.connect(
        f"file:{path}?mode=rw",
        uri=True,
        timeout=busy_timeout_s,
        check_same_thread=False,
        isolation_level=None,
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    return conn


class AuditStore:
    def __init__(
        self,
        path: str | Path,
        *,
        retention_days: float = 90,
        commit_window_s: float = 0.002,
        busy_timeout_s: float = 30.0,
        purge_interval_s: float = 3600.0,
    ) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        self.commit_window_s = commit_window_s
        self.busy_timeout_s = busy_timeout_s
        self.purge_interval_s = purge_interval_s
        self._errors = 0
        self._errors_lock = threading.Lock()
        self._last_error: str | None = None
        self._failing = False
        self._queue: queue.Queue[tuple[list[AuditRecord], Future[int]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._read_lock = threading.Lock()
        self._last_purge = 0.0
        self._identity: tuple[int, int] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def open(self) -> AuditStore:
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
        self._purge_guarded()
        self._thread = threading.Thread(target=self._run, name="routescan-audit-writer", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None
        for conn in (getattr(self, "_writer", None), getattr(self, "_reader", None)):
            if conn is not None:
                conn.close()

    # -- errors ---------------------------------------------------------------------------------
    @property
    def errors(self) -> int:
        """Store failures so far (writes, reads, purges); thread-safe."""
        with self._errors_lock:
            return self._errors

    def _error(self, what: str, exc: BaseException) -> str:
        message = f"audit store {what} failed: {exc}"
        with self._errors_lock:
            self._errors += 1
            self._last_error = message
        log.error("%s (database %s)", message, self.path)
        return message

    # -- writes ---------------------------------------------------------------------------------
    def submit(self, records: list[AuditRecord]) -> Future[int]:
        """Queue records; the future resolves with the number written once they are committed."""
        future: Future[int] = Future()
        if self._thread is None or not self._thread.is_alive():
            future.set_exception(StoreError("the audit store is not running"))
            return future
        self._queue.put((records, future))
        return future

    def write(self, records: list[AuditRecord], timeout: float = 30) -> int:
        return self.submit(records).result(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.commit_window_s
            stop = False
            while len(batch) < 4096:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                self._commit(batch)
            except Exception as exc:  # the writer must outlive anything one batch does
                message = self._error("write", exc)
                for _, future in batch:
                    _resolve(future, error=StoreError(message))
            if stop:
                return
            if time.monotonic() - self._last_purge >= self.purge_interval_s:
                self._purge_guarded()

    def _commit(self, batch: list[tuple[list[AuditRecord], Future[int]]]) -> None:
        if not self._same_file():
            message = self._error(
                "write", FileNotFoundError(f"{self.path} was deleted or replaced; restart the daemon")
            )
            self._failing = True
            for _, future in batch:
                _resolve(future, error=StoreError(message))
            return
        done: list[tuple[Future[int], int]] = []
        try:
            self._writer.execute("BEGIN IMMEDIATE")
            for records, future in batch:
                if future.cancelled():  # its request went away; nobody waits for the ack
                    continue
                try:
                    self._writer.execute("SAVEPOINT request")
                    self._writer.executemany(
                        _INSERT, [tuple(getattr(r, c) for c in _COLUMNS) for r in records]
                    )
                    self._writer.execute("RELEASE request")
                    done.append((future, len(records)))
                except sqlite3.Error as exc:
                    self._writer.execute("ROLLBACK TO request")
                    self._writer.execute("RELEASE request")
                    _resolve(future, error=StoreError(self._error("write of one request", exc)))
            self._writer.execute("COMMIT")
        except sqlite3.Error as exc:
            self._failing = True
            message = self._error("write", exc)
            with contextlib.suppress(sqlite3.Error):
                self._writer.execute("ROLLBACK")
            for future, _ in done:
                _resolve(future, error=StoreError(message))
            for _, future in batch:
                if not future.done():
                    _resolve(future, error=StoreError(message))
            return
        self._failing = False
        for future, count in done:
            _resolve(future, result=count)

    def _purge_guarded(self) -> None:
        try:
            self.purge_expired()
        except sqlite3.Error as exc:  # a locked database at purge time must not stop scoring
            self._error("retention purge", exc)

    def purge_expired(self) -> int:
        self._last_purge = time.monotonic()
        if not self.retention_days:
            return 0
        cutoff = time.time() - self.retention_days * 86400
        cur = self._writer.execute("DELETE FROM audits WHERE created < ?", (cutoff,))
        return cur.rowcount

    # -- reads ----------------------------------------------------------------------------------
    def query(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        label: str | None = None,
        model_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        if not self._same_file():
            raise StoreReadError(
                self._error("read", FileNotFoundError(f"{self.path} was deleted or replaced"))
            )
        where, args = [], []
        for clause, value in (
            ("created >= ?", since),
            ("created < ?", until),
            ("label = ?", label),
            ("model_id = ?", model_id),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = "SELECT id, " + ", ".join(_COLUMNS) + " FROM audits"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id LIMIT ? OFFSET ?"
        with self._read_lock:
            try:
                cur = self._reader.execute(sql, (*args, limit, offset))
                names = [d[0] for d in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            except sqlite3.Error as exc:
                raise StoreReadError(self._error("read", exc)) from None

    # -- health ---------------------------------------------------------------------------------
    def _same_file(self) -> bool:
        try:
            stat = self.path.stat()
        except OSError:
            return False
        return (stat.st_dev, stat.st_ino) == self._identity

    def writable(self) -> bool:
        """Whether a write would commit now. After a failed commit the probe commits a real write
        (a full disk or an I/O error shows only then); otherwise taking the write lock suffices."""
        if self._thread is None or not self._thread.is_alive() or not self._same_file():
            return False
        try:
            probe = _connect(self.path, busy_timeout_s=min(self.busy_timeout_s, 1.0))
            try:
                probe.execute("BEGIN IMMEDIATE")
                if self._failing:
                    probe.execute("CREATE TABLE IF NOT EXISTS write_probe (at REAL)")
                    probe.execute("INSERT INTO write_probe VALUES (?)", (time.time(),))
                    probe.execute("DELETE FROM write_probe")
                    probe.execute("COMMIT")
                    self._failing = False
                else:
                    probe.execute("ROLLBACK")
            finally:
                probe.close()
            return True
        except sqlite3.Error as exc:
            with self._errors_lock:
                self._last_error = f"probe: {exc}"
            return False

    def health(self) -> StoreHealth:
        alive = self._thread is not None and self._thread.is_alive()
        present = self._same_file()
        writable = alive and present and self.writable()
        return StoreHealth(
            ready=writable,
            writer_alive=alive,
            database_present=present,
            writable=writable,
            errors=self.errors,
            last_error=self._last_error,
            last_commit_failed=self._failing,
        )


def _resolve(future: Future[int], *, result: int | None = None, error: BaseException | None = None) -> None:
    """Settle a future that its waiter may have cancelled meanwhile (that is not the writer's error)."""
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result or 0)
