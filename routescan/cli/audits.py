"""`routescan audits`: read or export the audit trail (SQLite or PostgreSQL) for reviewers."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from routescan.cli.common import console, friendly_errors


def audits(
    audit_store: Annotated[
        str | None,
        typer.Option(
            help="A postgresql:// URL or a SQLite file (default: the daemon's, from configs/service.yaml, "
            "ROUTESCAN_AUDIT_STORE or ROUTESCAN_DB).",
            show_default=False,
        ),
    ] = None,
    since: Annotated[
        datetime | None, typer.Option(help="Rows at or after this time (ISO 8601, UTC).", show_default=False)
    ] = None,
    until: Annotated[
        datetime | None, typer.Option(help="Rows before this time (ISO 8601, UTC).", show_default=False)
    ] = None,
    label: Annotated[str | None, typer.Option(help="flagged or ok.", show_default=False)] = None,
    model_id: Annotated[str | None, typer.Option(help="Only this model id.", show_default=False)] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Export every matching row to .csv, .jsonl or .parquet.", show_default=False
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="Rows to show when not exporting (the oldest first).")] = 20,
    config: Annotated[
        Path | None, typer.Option(help="Settings file (default: configs/service.yaml).", show_default=False)
    ] = None,
) -> None:
    """Show or export the audit trail: ids, scores, labels and detectors; never text.

    Reads the store without writing to it (no retention purge). Examples:

        routescan audits --label flagged --since 2026-11-01
        routescan audits --audit-store postgresql://auditor@db/audits -o flagged.parquet --label flagged
    """
    friendly_errors(_audits)(audit_store, since, until, label, model_id, out, limit, config)


def _audits(
    audit_store: str | None,
    since: datetime | None,
    until: datetime | None,
    label: str | None,
    model_id: str | None,
    out: Path | None,
    limit: int,
    config: Path | None,
) -> None:
    from routescan.service.settings import load_settings
    from routescan.service.store import epoch_seconds, open_audit_store
    from routescan.service.store.export import export_audits

    if label not in (None, "flagged", "ok"):
        raise ValueError("--label is 'flagged' or 'ok'")
    if limit < 1:
        raise ValueError("--limit is at least 1")
    target = load_settings(config, audit_store=audit_store).audit_store_target()
    store = open_audit_store(target, read_only=True)
    filters = {
        "since": epoch_seconds(since),
        "until": epoch_seconds(until),
        "label": label,
        "model_id": model_id,
    }
    try:
        if out is not None:
            console.print(f"exporting from {store.location} to {out}", highlight=False)

            def progress(n: int) -> None:
                if n % 10_000 == 0:  # a line, not a bar: readable in a log file too
                    console.print(f"  {n:,} rows", highlight=False)

            count = export_audits(store, out, on_row=progress, **filters)
            console.print(f"wrote {count:,} rows to {out}", highlight=False)
            return
        rows = store.query(limit=limit, **filters)
        table = Table(title=f"audit trail, {store.location} (oldest first, at most {limit})")
        for column in ("id", "created", "trace_id", "model_id", "score", "label", "detector"):
            table.add_column(column)
        for r in rows:
            table.add_row(
                str(r["id"]),
                datetime.fromtimestamp(r["created"], UTC).strftime("%Y-%m-%d %H:%M:%S"),
                r["trace_id"],
                r["model_id"],
                f"{r['score']:.4f}",
                r["label"],
                f"{r['detector_id']} {r['detector_version']}",
            )
        console.print(table)
    finally:
        store.close()
