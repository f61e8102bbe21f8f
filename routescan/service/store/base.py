"""What every audit store backend shares: the record, the errors, group commit and health.

One row per scored request (ids, score, label, detector; never text, never a fingerprint).

Durability: a score is acknowledged only after the transaction that holds it has committed.
Throughput: one writer thread commits whatever arrived during a short window in one transaction
(group commit), so concurrent requests share a durable commit instead of each paying one.
Isolation: each request's rows sit in their own savepoint inside that transaction, so a request
whose rows the database refuses fails alone instead of failing everyone it shared a commit with.

Failure is loud: every store error is logged with its cause and counted; :meth:`AuditStore.health`
says whether the writer runs, the database is there and a write would commit; reads fail with
their own error. A backend supplies connections, SQL and its own checks (SQLite: is the file still
the one opened; PostgreSQL: partitions, migrations, a pool that reconnects).
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("routescan.store")

COLUMNS = (
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
    created: float  # seconds since the epoch, UTC

    def __post_init__(self) -> None:
        # the service refuses non-finite scores with a 4xx first; this keeps a store honest alone
        if not math.isfinite(self.score):
            raise ValueError("an audit record's score must be a finite number")


def epoch_seconds(value: datetime | None) -> float | None:
    """A query bound as the store compares it: seconds since the epoch, a naive time read as UTC."""
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


class StoreError(RuntimeError):
    """The audit store could not persist records (the score was not acknowledged)."""


class StoreReadError(StoreError):
    """The audit store could not be read."""


class StoreOpenError(StoreError, ValueError):
    """The audit store cannot be opened; the message names where and the fix."""


@dataclass(frozen=True)
class StoreHealth:
    ready: bool
    writer_alive: bool
    database_present: bool
    writable: bool
    errors: int
    last_error: str | None
    last_commit_failed: bool
    backend: str = "sqlite"

    @property
    def reason(self) -> str | None:
        if not self.writer_alive:
            return "the audit writer thread is not running"
        if not self.database_present:
            if self.backend == "postgresql":
                return "the PostgreSQL audit database is unreachable"
            return "the audit database file was deleted or replaced under the running daemon"
        if not self.writable:
            return f"the audit database refuses writes ({self.last_error or 'locked or read-only'})"
        return None


Batch = list[tuple[list[AuditRecord], Future[int]]]


class AuditStore(ABC):
    """A group-committing audit store; subclasses supply the database."""

    backend = "abstract"

    def __init__(
        self,
        *,
        retention_days: float = 90,
        commit_window_s: float = 0.002,
        purge_interval_s: float = 3600.0,
        max_batch: int = 4096,
    ) -> None:
        self.retention_days = retention_days
        self.commit_window_s = commit_window_s
        self.purge_interval_s = purge_interval_s
        self.max_batch = max_batch
        self._errors = 0
        self._errors_lock = threading.Lock()
        self._last_error: str | None = None
        self._failing = False
        self._queue: queue.Queue[tuple[list[AuditRecord], Future[int]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._last_purge = 0.0
        self._read_only = False

    # -- what a backend supplies ----------------------------------------------------------------
    @property
    @abstractmethod
    def location(self) -> str:
        """Where the store lives, for messages (never a password)."""

    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    @abstractmethod
    def _writer_connection(self) -> contextlib.AbstractContextManager[Any]:
        """A connection in autocommit mode, for one group commit."""

    @abstractmethod
    def _insert(self, cursor: Any, records: Sequence[AuditRecord]) -> None: ...

    def _prepare(self, conn: Any, records: Sequence[AuditRecord]) -> None:  # noqa: B027
        """Work before a group's inserts, outside its transaction (e.g. create a day's partition)."""

    begin_statement = "BEGIN"

    @abstractmethod
    def _read(self, where: list[str], args: list[Any], limit: int, offset: int) -> list[dict[str, Any]]: ...

    @abstractmethod
    def _purge(self, cutoff: float) -> int: ...

    @abstractmethod
    def _present(self) -> bool:
        """The database is there (the file the daemon opened, a reachable server)."""

    @abstractmethod
    def _probe(self, commit: bool) -> None:
        """Raise unless a write would go through; ``commit``: make it a real committed write."""

    db_errors: tuple[type[BaseException], ...] = ()
    placeholder = "?"
    created_param = "?"  # how a query passes a time (seconds since the epoch)

    # -- lifecycle ------------------------------------------------------------------------------
    def open(self, *, read_only: bool = False) -> AuditStore:
        """Open the store; ``read_only`` (reviewers, exports): no writer thread and no purge."""
        self._read_only = read_only
        self._open()
        if read_only:
            return self
        self._purge_guarded()
        self._thread = threading.Thread(target=self._run, name="routescan-audit-writer", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None
        self._close()

    # -- errors ---------------------------------------------------------------------------------
    @property
    def errors(self) -> int:
        """Store failures so far (writes, reads, purges); thread-safe."""
        with self._errors_lock:
            return self._errors

    def _error(self, what: str, exc: BaseException) -> str:
        message = f"audit store {what} failed: {str(exc).strip() or type(exc).__name__}"
        with self._errors_lock:
            self._errors += 1
            self._last_error = message
        log.error("%s (%s)", message, self.location)
        return message

    # -- writes ---------------------------------------------------------------------------------
    def submit(self, records: list[AuditRecord]) -> Future[int]:
        """Queue records; the future resolves with the number written once they are committed."""
        future: Future[int] = Future()
        if not self._writer_alive:
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
            batch: Batch = [item]
            deadline = time.monotonic() + self.commit_window_s
            stop = False
            while len(batch) < self.max_batch:
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
                self._fail_group(batch, exc)
            if stop:
                return
            if time.monotonic() - self._last_purge >= self.purge_interval_s:
                self._purge_guarded()

    def _check_before_commit(self) -> str | None:
        """Why no commit may happen now (None: go ahead)."""
        return None

    def _fail_group(self, batch: Batch, exc: BaseException) -> None:
        """The whole group failed: count and log it once, and refuse every request still waiting."""
        self._failing = True
        message = self._error("write", exc)
        for _, future in batch:
            if not future.done():
                _resolve(future, error=StoreError(message))

    def _commit(self, batch: Batch) -> None:
        refusal = self._check_before_commit()
        if refusal is not None:
            self._fail_group(batch, RuntimeError(refusal))
            return
        live = [(records, future) for records, future in batch if not future.cancelled()]
        if not live:
            return
        rows = [r for records, _ in live for r in records]
        with self._writer_connection() as conn:
            self._prepare(conn, rows)
            try:
                done = self._commit_group(conn, live, rows)
            except self.db_errors as exc:
                with contextlib.suppress(*self.db_errors):
                    conn.execute("ROLLBACK")
                self._fail_group(live, exc)
                return
        self._failing = False
        for future, count in done:
            _resolve(future, result=count)

    def _commit_group(self, conn: Any, live: Batch, rows: list[AuditRecord]) -> list[tuple[Future[int], int]]:
        """One transaction for the whole group: all rows in one bulk insert when the database takes
        them (one round trip), else each request in its own savepoint so only the refused fail."""
        conn.execute(self.begin_statement)
        try:
            self._insert_all(conn.cursor(), rows)
        except self.db_errors as exc:
            if _connection_lost(exc):
                raise
            conn.execute("ROLLBACK")
        else:
            conn.execute("COMMIT")
            return [(future, len(records)) for records, future in live]
        done: list[tuple[Future[int], int]] = []
        conn.execute(self.begin_statement)
        cursor = conn.cursor()
        for records, future in live:
            try:
                conn.execute("SAVEPOINT request")
                self._insert(cursor, records)
                conn.execute("RELEASE SAVEPOINT request")
                done.append((future, len(records)))
            except self.db_errors as exc:
                if _connection_lost(exc):
                    raise
                conn.execute("ROLLBACK TO SAVEPOINT request")
                conn.execute("RELEASE SAVEPOINT request")
                _resolve(future, error=StoreError(self._error("write of one request", exc)))
        conn.execute("COMMIT")
        return done

    def _insert_all(self, cursor: Any, records: Sequence[AuditRecord]) -> None:
        """A whole group's rows at once (a backend may use a faster bulk path, e.g. COPY)."""
        self._insert(cursor, records)

    def _purge_guarded(self) -> None:
        try:
            self.purge_expired()
        except Exception as exc:  # a locked or unreachable database at purge time must not stop scoring
            self._error("retention purge", exc)

    def purge_expired(self) -> int:
        """Delete (SQLite) or drop (PostgreSQL partitions) what is older than the retention."""
        self._last_purge = time.monotonic()
        if not self.retention_days:
            return 0
        return self._purge(time.time() - self.retention_days * 86400)

    # -- reads ----------------------------------------------------------------------------------
    def recorded(self, trace_ids: Sequence[str], *, detector_id: str) -> set[tuple[str, str]]:
        """``(trace_id, model_id)`` pairs among ``trace_ids`` this detector already has rows for
        (the daemon's check on a replayed batch; both backends index trace_id)."""
        p = self.placeholder
        found: set[tuple[str, str]] = set()
        ids = list(dict.fromkeys(trace_ids))
        for start in range(0, len(ids), 256):
            chunk = ids[start : start + 256]
            where = [f"trace_id IN ({', '.join([p] * len(chunk))})", f"detector_id = {p}"]
            try:
                rows = self._read(where, [*chunk, detector_id], 1_000_000, 0)
            except self.db_errors as exc:
                raise StoreReadError(self._error("read", exc)) from None
            found.update((r["trace_id"], r["model_id"]) for r in rows)
        return found

    def query(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        label: str | None = None,
        model_id: str | None = None,
        after_id: int | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Rows oldest first (by id), filtered; ``after_id`` pages by key, ``offset`` by count."""
        where, args = [], []
        p, t = self.placeholder, self.created_param
        for clause, value in (
            (f"created >= {t}", since),
            (f"created < {t}", until),
            (f"label = {p}", label),
            (f"model_id = {p}", model_id),
            (f"id > {p}", after_id),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        try:
            return self._read(where, args, limit, offset)
        except self.db_errors as exc:
            raise StoreReadError(self._error("read", exc)) from None

    def iter_all(self, page: int = 1000, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every matching row, oldest first, paged by key (for exports)."""
        after: int | None = None
        while True:
            rows = self.query(after_id=after, limit=page, **filters)
            yield from rows
            if len(rows) < page:
                return
            after = rows[-1]["id"]

    # -- health ---------------------------------------------------------------------------------
    @property
    def _writer_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def writable(self) -> bool:
        """Whether a write would commit now (the writer runs, the database is there, a probe goes
        through)."""
        return self._writer_alive and self._present() and self._probe_ok()

    def _probe_ok(self) -> bool:
        """After a failed commit the probe commits a real write (a full disk or an I/O error shows
        only then); otherwise taking the write lock suffices."""
        try:
            self._probe(commit=self._failing)
        except Exception as exc:
            with self._errors_lock:
                self._last_error = f"probe: {str(exc).strip() or type(exc).__name__}"
            return False
        self._failing = False
        return True

    def health(self) -> StoreHealth:
        alive = self._writer_alive
        present = self._present()
        writable = alive and present and self._probe_ok()
        return StoreHealth(
            ready=writable,
            writer_alive=alive,
            database_present=present,
            writable=writable,
            errors=self.errors,
            last_error=self._last_error,
            last_commit_failed=self._failing,
            backend=self.backend,
        )


def _connection_lost(exc: BaseException) -> bool:
    """A broken connection fails the whole group, not one request in it."""
    return type(exc).__name__ in ("OperationalError", "InterfaceError")


def _resolve(future: Future[int], *, result: int | None = None, error: BaseException | None = None) -> None:
    """Settle a future that its waiter may have cancelled meanwhile (that is not the writer's error)."""
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result or 0)
