"""The PostgreSQL audit store against the real server on this machine (never mocked)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from routescan.service.store import AuditRecord, StoreError, StoreOpenError, open_audit_store
from routescan.service.store.export import EXPORT_COLUMNS
from routescan.service.store.postgres import SCHEMA_VERSION, redact

# What an audit row holds, in order: ids, score, label, detector, time. Never text.
AUDIT_COLUMNS = EXPORT_COLUMNS


def record(
    trace_id: str, *, label: str = "ok", created: float | None = None, model: str = "m"
) -> AuditRecord:
    return AuditRecord(trace_id, model, 0.25, label, "d", "1", "fpr5", created or time.time())


def test_writes_reads_filters_and_pages(pg_url) -> None:
    store = open_audit_store(pg_url, commit_window_s=0.05)
    try:
        with ThreadPoolExecutor(8) as pool:  # concurrent requests share group commits
            futures = [
                pool.submit(store.write, [record(f"r-{i}", label="flagged" if i % 3 == 0 else "ok")])
                for i in range(60)
            ]
            assert sum(f.result() for f in futures) == 60
        store.write([record("other-1", model="m2")])
        rows = store.query(limit=1000)
        assert len(rows) == 61 and [r["id"] for r in rows] == sorted(r["id"] for r in rows)
        assert tuple(rows[0]) == AUDIT_COLUMNS
        assert len(store.query(label="flagged", limit=1000)) == 20
        assert [r["trace_id"] for r in store.query(model_id="m2")] == ["other-1"]
        assert (
            store.query(since=time.time() + 3600) == []
            and len(store.query(until=time.time() + 1, limit=1000)) == 61
        )
        paged = list(store.iter_all(page=7))
        assert [r["id"] for r in paged] == [r["id"] for r in rows], "keyset paging returns each row once"
        assert abs(rows[0]["created"] - time.time()) < 120
    finally:
        store.close()


def test_one_refused_request_fails_alone(pg_url) -> None:
    store = open_audit_store(pg_url, commit_window_s=0.3)
    try:
        good, bad, other = (
            store.submit([record("a")]),
            store.submit([record("b", label="maybe")]),
            store.submit([record("c")]),
        )
        assert good.result(10) == 1 and other.result(10) == 1
        with pytest.raises(StoreError):
            bad.result(10)
        assert [r["trace_id"] for r in store.query()] == ["a", "c"]
    finally:
        store.close()


def test_daily_partitions_and_retention_drops_whole_days(pg_url) -> None:
    day = 86400.0
    now = time.time()
    store = open_audit_store(pg_url, retention_days=0)
    try:
        store.write(
            [record("old", created=now - 10 * day), record("recent", created=now - 1 * day), record("now")]
        )
        partitions = list(store.iter_partitions())
        assert len(partitions) >= 3 and all(p.startswith("audits_p") for p in partitions)
        store.retention_days = 5
        assert store.purge_expired() >= 1
        assert [r["trace_id"] for r in store.query()] == ["recent", "now"]
        assert not any(
            p.endswith(time.strftime("%Y%m%d", time.gmtime(now - 10 * day))) for p in store.iter_partitions()
        )
    finally:
        store.close()


def test_schema_is_versioned_and_a_newer_one_is_refused(pg_url) -> None:
    open_audit_store(pg_url).close()
    open_audit_store(pg_url).close()  # a second start finds the schema current and changes nothing
    with psycopg.connect(pg_url, autocommit=True) as conn:
        # one row per migration applied, each once
        assert conn.execute("SELECT count(*), max(version) FROM routescan_schema").fetchone() == (
            SCHEMA_VERSION,
            SCHEMA_VERSION,
        )
        conn.execute("INSERT INTO routescan_schema (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreOpenError, match="newer than this RouteScan"):
        open_audit_store(pg_url)


def test_an_unreachable_server_is_one_clear_error_without_the_password() -> None:
    with pytest.raises(StoreOpenError) as info:
        open_audit_store("postgresql://auditor:hunter2@127.0.0.1:1/audits", connect_timeout_s=1)
    assert "hunter2" not in str(info.value) and "127.0.0.1:1" in str(info.value)
    assert redact("postgresql://u:pw@h:5/db") == "postgresql://u@h:5/db"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_audits_cli_shows_and_exports_either_backend(backend, tmp_path, request) -> None:
    import csv

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from routescan.cli.main import app

    target = str(tmp_path / "audit.sqlite3") if backend == "sqlite" else request.getfixturevalue("pg_url")
    store = open_audit_store(target)
    try:
        store.write([record(f"r-{i}", label="flagged" if i % 2 else "ok") for i in range(25)])
    finally:
        store.close()
    runner = CliRunner()
    result = runner.invoke(app, ["audits", "--audit-store", target, "--label", "flagged", "--limit", "5"])
    assert result.exit_code == 0, result.output
    assert "r-1" in result.output and "r-0 " not in result.output

    csv_out = tmp_path / "flagged.csv"
    result = runner.invoke(app, ["audits", "--audit-store", target, "--label", "flagged", "-o", str(csv_out)])
    assert result.exit_code == 0, result.output
    with csv_out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and {r["label"] for r in rows} == {"flagged"}
    assert tuple(rows[0]) == AUDIT_COLUMNS

    parquet_out = tmp_path / "all.parquet"
    result = runner.invoke(app, ["audits", "--audit-store", target, "-o", str(parquet_out)])
    assert result.exit_code == 0 and pq.read_table(parquet_out).num_rows == 25

    result = runner.invoke(app, ["audits", "--audit-store", target, "-o", str(tmp_path / "x.xlsx")])
    assert result.exit_code == 2 and ".parquet" in result.output
    if backend == "sqlite":
        result = runner.invoke(app, ["audits", "--audit-store", str(tmp_path / "none.db")])
        assert result.exit_code == 2 and "no audit store" in result.output
        assert not (tmp_path / "none.db").exists()


def test_recorded_finds_what_a_replay_would_duplicate(pg_url) -> None:
    store = open_audit_store(pg_url, commit_window_s=0.01)
    try:
        store.write([record("a-1"), record("a-2", model="m2"), record("a-3")])
        found = store.recorded(["a-1", "a-2", "zz", "a-1"], detector_id="d")
        assert found == {("a-1", "m"), ("a-2", "m2")}
        assert store.recorded(["a-1"], detector_id="another-detector") == set()
        with store._pool.connection() as conn:  # the index the check uses is there (migration 2)
            names = {
                r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'audits'")
            }
        assert "audits_trace" in names
    finally:
        store.close()
