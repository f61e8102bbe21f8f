"""Audit store backends behind one interface: SQLite for one host, PostgreSQL for a fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routescan.service.store.base import (
    AuditRecord,
    AuditStore,
    StoreError,
    StoreHealth,
    StoreOpenError,
    StoreReadError,
    epoch_seconds,
)
from routescan.service.store.sqlite import SQLiteAuditStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_audit_store(target: str | Path, *, read_only: bool = False, **options: Any) -> AuditStore:
    """Open the store ``target`` names: a ``postgresql://`` URL, or a SQLite file (a path or
    ``sqlite:///path``). ``options`` are the shared ones (retention_days, commit_window_s, ...);
    ``read_only`` opens it for reading alone (no writer, no retention purge)."""
    text = str(target)
    if text.startswith(POSTGRES_SCHEMES):
        try:
            from routescan.service.store.postgres import PostgresAuditStore
        except ImportError as exc:
            raise StoreOpenError(
                f"the PostgreSQL audit store needs psycopg ({exc}): pip install 'routescan[postgres]'"
            ) from None
        options.pop("busy_timeout_s", None)
        return PostgresAuditStore(text, **options).open(read_only=read_only)
    if "://" in text and not text.startswith("sqlite:///"):
        raise StoreOpenError(
            f"unknown audit store {text.split('://')[0]}://; use postgresql://... or a file path"
        )
    return SQLiteAuditStore(Path(text.removeprefix("sqlite://")), **options).open(read_only=read_only)


__all__ = [
    "AuditRecord",
    "AuditStore",
    "SQLiteAuditStore",
    "StoreError",
    "StoreHealth",
    "StoreOpenError",
    "StoreReadError",
    "epoch_seconds",
    "open_audit_store",
]
