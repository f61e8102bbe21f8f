"""The audit store under failure: refused rows, a locked database, cancelled waiters, a deleted file."""

from __future__ import annotations

import logging
import sqlite3
import time

import httpx
import pytest
from servers import uvicorn_thread

from routescan.service.app import create_app
from routescan.service.settings import ServiceSettings
from routescan.service.store import AuditRecord, SQLiteAuditStore, StoreError


def record(trace_id: str, label: str = "ok") -> AuditRecord:
    return AuditRecord(trace_id, "m", 0.5, label, "d", "1", "fpr5", time.time())


def test_one_refused_request_fails_alone_in_a_group_commit(tmp_path) -> None:
    store = SQLiteAuditStore(tmp_path / "a.db", commit_window_s=0.3).open()
    try:
        good = store.submit([record("r-1")])
        bad = store.submit([record("r-2", label="maybe")])  # the table's CHECK refuses it
        other = store.submit([record("r-3")])
        assert good.result(10) == 1 and other.result(10) == 1
        with pytest.raises(StoreError):
            bad.result(10)
        assert [r["trace_id"] for r in store.query()] == ["r-1", "r-3"]
        assert store.errors == 1
    finally:
        store.close()


def test_a_non_finite_score_never_reaches_the_store() -> None:
    with pytest.raises(ValueError, match="finite"):
        AuditRecord("r-1", "m", float("nan"), "ok", "d", "1", "fpr5", 0.0)


def test_the_writer_survives_a_locked_purge_and_a_cancelled_waiter(tmp_path, caplog) -> None:
    path = tmp_path / "a.db"
    store = SQLiteAuditStore(path, commit_window_s=0.2, busy_timeout_s=0.2, purge_interval_s=0).open()
    try:
        cancelled = store.submit([record("gone")])
        assert cancelled.cancel(), "the writer had already taken it"
        assert store.submit([record("r-1")]).result(10) == 1

        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # a backup tool or an operator's shell holds the lock
        with caplog.at_level(logging.ERROR, logger="routescan.store"):
            with pytest.raises(StoreError):
                store.submit([record("r-2")]).result(10)  # the commit, then the purge, hit the lock
            time.sleep(0.5)
        blocker.execute("ROLLBACK")
        blocker.close()
        assert any("failed" in r.getMessage() for r in caplog.records), "store errors are logged"
        assert store.submit([record("r-3")]).result(10) == 1, "the writer thread died"
        assert [r["trace_id"] for r in store.query()] == ["r-1", "r-3"]
        assert store.health().writer_alive
    finally:
        store.close()


def test_a_deleted_database_is_detected_not_recreated(
    tmp_path, test_detector, synthetic_traces, caplog
) -> None:
    db = tmp_path / "audit.sqlite3"
    with uvicorn_thread(create_app(ServiceSettings(db=db), detector=test_detector)) as base:
        payload = {"trace": synthetic_traces[0].model_dump(mode="json", exclude_none=True)}
        assert httpx.post(f"{base}/v1/score", json=payload).status_code == 200
        for suffix in ("", "-wal", "-shm"):
            db.with_name(db.name + suffix).unlink(missing_ok=True)
        with caplog.at_level(logging.ERROR, logger="routescan.store"):
            ready = httpx.get(f"{base}/readyz")
            assert ready.status_code == 503 and ready.json()["store"]["database_present"] is False
            assert "deleted" in ready.json()["reason"]
            assert not db.exists(), "the readiness probe recreated an empty database"
            score = httpx.post(f"{base}/v1/score", json=payload)
            assert score.status_code == 503 and "not acknowledged" in score.text
            audits = httpx.get(f"{base}/v1/audits")
            assert audits.status_code == 503 and "could not be read" in audits.text
        assert any("deleted or replaced" in r.getMessage() for r in caplog.records)
        assert not db.exists()


def test_an_unusable_database_is_one_clear_line_at_start(tmp_path) -> None:
    from typer.testing import CliRunner

    from routescan.cli.main import app

    runner = CliRunner()
    not_a_db = tmp_path / "junk.sqlite3"
    not_a_db.write_bytes(b"this is not an SQLite database" * 100)
    blocked = tmp_path / "file" / "audit.sqlite3"
    (tmp_path / "file").write_text("a file where a directory should be")
    cases = [not_a_db, blocked]
    if __import__("os").geteuid() != 0:  # root writes through file modes; others meet a real read-only file
        readonly = tmp_path / "ro.sqlite3"
        SQLiteAuditStore(readonly).open().close()
        readonly.chmod(0o444)
        cases.append(readonly)
    for path in cases:
        result = runner.invoke(app, ["serve", "--db", str(path), "--port", "0"])
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert f"cannot open the audit store {path}" in text and "--db" in text
        assert "Traceback" not in result.output


def test_readyz_reflects_a_stopped_writer_and_a_failing_commit(tmp_path, test_detector) -> None:
    db = tmp_path / "audit.sqlite3"
    app = create_app(ServiceSettings(db=db), detector=test_detector)
    with uvicorn_thread(app) as base:
        store = app.state.runtime.store
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        store.busy_timeout_s = 0.2
        store._writer.execute("PRAGMA busy_timeout=200")  # the test's lock should not wait 30 s
        with pytest.raises(StoreError):
            store.write([record("r-1")])
        assert store.health().last_commit_failed
        assert httpx.get(f"{base}/readyz").status_code == 503, "a store that cannot commit is not ready"
        blocker.execute("ROLLBACK")
        blocker.close()
        assert httpx.get(f"{base}/readyz").status_code == 200, "ready again once a write commits"
        assert not store.health().last_commit_failed

        store._queue.put(None)  # the writer's stop signal: the thread ends as if it had died
        store._thread.join(timeout=10)
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503 and ready.json()["store"]["writer_alive"] is False
        assert "writer" in ready.json()["reason"]
