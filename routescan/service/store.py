"""The audit store: one SQLite row per scored request (ids, score, label, detector; never text).

Durability: WAL with ``synchronous=FULL``, and a score is acknowledged only after the transaction
that holds it has committed. Throughput: one writer thread commits whatever arrived during a short
window in one transaction (group commit), so concurrent requests share an fsync instead of each
paying one.
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class StoreError(RuntimeError):
    """The audit store could not persist or read records."""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class AuditStore:
    def __init__(
        self, path: str | Path, *, retention_days: float = 90, commit_window_s: float = 0.002
    ) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        self.commit_window_s = commit_window_s
        self.errors = 0
        self._queue: queue.Queue[tuple[list[AuditRecord], Future[int]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._read_lock = threading.Lock()
        self._last_purge = 0.0

    # -- lifecycle ------------------------------------------------------------------------------
    def open(self) -> AuditStore:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = _connect(self.path)
            self._writer.executescript(_SCHEMA)
            self._reader = _connect(self.path)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the audit store {self.path}: {exc}") from exc
        self.purge_expired()
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
            self._commit(batch)
            if stop:
                return
            if time.monotonic() - self._last_purge > 3600:
                self.purge_expired()

    def _commit(self, batch: list[tuple[list[AuditRecord], Future[int]]]) -> None:
        rows = [tuple(getattr(r, c) for c in _COLUMNS) for records, _ in batch for r in records]
        try:
            self._writer.execute("BEGIN IMMEDIATE")
            self._writer.executemany(
                f"INSERT INTO audits ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", rows
            )
            self._writer.execute("COMMIT")
        except sqlite3.Error as exc:
            self.errors += 1
            with contextlib.suppress(sqlite3.Error):
                self._writer.execute("ROLLBACK")
            for _, future in batch:
                future.set_exception(StoreError(f"audit store write failed: {exc}"))
            return
        for records, future in batch:
            future.set_result(len(records))

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
                self.errors += 1
                raise StoreError(f"audit store read failed: {exc}") from exc

    def writable(self) -> bool:
        if self._thread is None or not self._thread.is_alive():
            return False
        try:
            probe = _connect(self.path)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
            finally:
                probe.close()
            return True
        except sqlite3.Error:
            return False
