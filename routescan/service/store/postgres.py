"""The fleet audit store: one PostgreSQL database that every daemon of a fleet writes to.

- psycopg 3 with a connection pool that replaces broken connections, so a daemon recovers by itself
  when the server comes back; ``synchronous_commit`` is on for every connection, and a score is
  acknowledged only after its group's COMMIT returned.
- ``audits`` is partitioned by day (declarative range partitioning on ``created``); a day's
  partition is created when the first row of that day arrives, and retention drops whole
  partitions instead of deleting rows.
- The schema is versioned (``routescan_schema``): a daemon creates or upgrades it at start under an
  advisory lock (several daemons start at once), and refuses a database whose schema is newer than
  it knows.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from routescan.service.store.base import COLUMNS, AuditRecord, AuditStore, StoreOpenError

SCHEMA_VERSION = 2
_LOCK = 0x52535441  # advisory lock key for migrations and partition DDL ("RSTA")
_MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE SEQUENCE IF NOT EXISTS audits_id_seq AS bigint",
        """CREATE TABLE audits (
            id bigint NOT NULL DEFAULT nextval('audits_id_seq'),
            trace_id text NOT NULL,
            model_id text NOT NULL,
            score double precision NOT NULL CHECK (score >= 0 AND score <= 1),
            label text NOT NULL CHECK (label IN ('flagged', 'ok')),
            detector_id text NOT NULL,
            detector_version text NOT NULL,
            operating_point text NOT NULL,
            created timestamptz NOT NULL,
            PRIMARY KEY (id, created)
        ) PARTITION BY RANGE (created)""",
        "ALTER SEQUENCE audits_id_seq OWNED BY audits.id",
        "CREATE INDEX audits_created ON audits (created)",
        "CREATE INDEX audits_model ON audits (model_id, created)",
    ],
    # a replayed agent batch is checked against the rows it may already have (AuditStore.recorded)
    2: ["CREATE INDEX IF NOT EXISTS audits_trace ON audits (trace_id)"],
}
_PARTITION = re.compile(r"^audits_p(\d{8})$")
_INSERT = f"INSERT INTO audits ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
_PARTITIONS = (
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'audits' ORDER BY 1"
)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(url)
    except Exception:
        return "postgresql://<unparseable url>"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = parts.get("host") or "localhost"
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname', '')}"


def _row(r: AuditRecord) -> tuple[Any, ...]:
    """A record as the table's columns, in COLUMNS order (``created`` a timestamptz)."""
    return tuple(datetime.fromtimestamp(r.created, UTC) if c == "created" else getattr(r, c) for c in COLUMNS)


def _partition_names(conn: Any) -> list[str]:
    return [name for (name,) in conn.execute(_PARTITIONS).fetchall()]


def _day(ts: float) -> date:
    return datetime.fromtimestamp(ts, UTC).date()


class PostgresAuditStore(AuditStore):
    backend = "postgresql"
    placeholder = "%s"
    created_param = "to_timestamp(%s)"

    def __init__(self, url: str, *, pool_size: int = 4, connect_timeout_s: float = 5.0, **kw: Any) -> None:
        import psycopg

        super().__init__(**kw)
        self.url = url
        self.pool_size = pool_size
        self.connect_timeout_s = connect_timeout_s
        self.db_errors = (psycopg.Error,)
        self._pool: Any = None
        self._partitions: set[date] = set()

    @property
    def location(self) -> str:
        return redact(self.url)

    # -- lifecycle ------------------------------------------------------------------------------
    def _open(self) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool, PoolTimeout

        def configure(conn: Any) -> None:
            conn.execute("SET synchronous_commit = on")  # whatever the server's default: durable acks

        self._pool = ConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True, "connect_timeout": max(1, int(self.connect_timeout_s))},
            configure=configure,
            check=ConnectionPool.check_connection,
            timeout=self.connect_timeout_s,
            open=False,
            name="routescan-audit",
        )
        try:
            # one direct connection first: its error says what is wrong (refused, auth, no database)
            psycopg.connect(self.url, connect_timeout=max(1, int(self.connect_timeout_s))).close()
            self._pool.open(wait=True, timeout=self.connect_timeout_s)
            self._migrate()
            today = _day(datetime.now(UTC).timestamp())
            with self._pool.connection() as conn:
                self._ensure_partitions(conn, {today, today + timedelta(days=1)})
        except (psycopg.Error, PoolTimeout) as exc:
            self._pool.close()
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreOpenError(
                f"cannot use the PostgreSQL audit store {self.location} ({reason}); check that "
                "the server is up and the URL (--audit-store / ROUTESCAN_AUDIT_STORE) names a database "
                "this user may create tables in"
            ) from None

    def _migrate(self) -> None:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS routescan_schema "
                "(version integer NOT NULL, applied timestamptz NOT NULL DEFAULT now())"
            )
            row = conn.execute("SELECT max(version) FROM routescan_schema").fetchone()
            current = row[0] or 0
            if current > SCHEMA_VERSION:
                raise StoreOpenError(
                    f"the audit database {self.location} has schema version {current}, newer than this "
                    f"RouteScan knows ({SCHEMA_VERSION}); upgrade RouteScan on this host, never downgrade "
                    "the database"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute("INSERT INTO routescan_schema (version) VALUES (%s)", (version,))

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    # -- writes ---------------------------------------------------------------------------------
    def _writer_connection(self) -> contextlib.AbstractContextManager[Any]:
        return self._pool.connection()

    def _ensure_partitions(self, conn: Any, days: set[date]) -> None:
        missing = sorted(days - self._partitions)
        if not missing:
            return
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            for day in missing:
                name, start, end = (
                    f"audits_p{day:%Y%m%d}",
                    day.isoformat(),
                    (day + timedelta(days=1)).isoformat(),
                )
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF audits "
                    f"FOR VALUES FROM ('{start}T00:00:00Z') TO ('{end}T00:00:00Z')"
                )
        self._partitions.update(missing)

    def _prepare(self, conn: Any, records: Sequence[AuditRecord]) -> None:
        self._ensure_partitions(conn, {_day(r.created) for r in records})

    def _insert(self, cursor: Any, records: Sequence[AuditRecord]) -> None:
        cursor.executemany(_INSERT, [_row(r) for r in records])

    def _insert_all(self, cursor: Any, records: Sequence[AuditRecord]) -> None:
        # COPY: one round trip for the whole group, whatever its size
        with cursor.copy(f"COPY audits ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for r in records:
                copy.write_row(_row(r))

    def _purge(self, cutoff: float) -> int:
        """Drop every daily partition that ends at or before the cutoff."""
        last_expired = _day(cutoff) - timedelta(days=1)
        dropped = 0
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            for name in _partition_names(conn):
                match = _PARTITION.match(name)
                day = datetime.strptime(match.group(1), "%Y%m%d").date() if match else None
                if day is not None and day <= last_expired:
                    conn.execute(f"DROP TABLE {name}")
                    self._partitions.discard(day)
                    dropped += 1
        return dropped

    # -- reads ----------------------------------------------------------------------------------
    def _read(self, where: list[str], args: list[Any], limit: int, offset: int) -> list[dict[str, Any]]:
        columns = [c for c in COLUMNS if c != "created"]
        sql = f"SELECT id, {', '.join(columns)}, extract(epoch FROM created)::float8 AS created FROM audits"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id LIMIT %s OFFSET %s"
        with self._pool.connection() as conn:
            cur = conn.execute(sql, (*args, limit, offset))
            names = [d.name for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    # -- health ---------------------------------------------------------------------------------
    def _present(self) -> bool:
        try:
            with self._pool.connection(timeout=1.0) as conn:
                conn.execute("SELECT 1")
            return True
        except Exception:
            return False

    def _probe(self, commit: bool) -> None:
        with self._pool.connection(timeout=2.0) as conn:
            if commit:
                conn.execute("CREATE TABLE IF NOT EXISTS routescan_probe (at timestamptz)")
                conn.execute("INSERT INTO routescan_probe VALUES (now())")
                conn.execute("DELETE FROM routescan_probe")
            else:
                conn.execute("SELECT 1")

    def iter_partitions(self) -> Iterator[str]:
        with self._pool.connection() as conn:
            names = _partition_names(conn)
        yield from names
