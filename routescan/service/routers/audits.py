"""``GET /v1/audits``: the audit log (ids, scores, labels; never text)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Query

from routescan.service.deps import Authorized, StoreDep
from routescan.service.schemas import AuditPage, AuditRow

router = APIRouter(prefix="/v1", tags=["audits"], dependencies=[Authorized])


@router.get("/audits", response_model=AuditPage, responses={503: {"description": "the store cannot be read"}})
async def audits(
    store: StoreDep,
    since: Annotated[datetime | None, Query(description="ISO 8601 time, inclusive")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601 time, exclusive")] = None,
    label: Literal["flagged", "ok"] | None = None,
    model_id: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> AuditPage:
    """The audit log, oldest first, filtered and paged (``next_offset`` is null on the last page)."""
    rows = await anyio.to_thread.run_sync(
        lambda: store.query(
            since=_ts(since), until=_ts(until), label=label, model_id=model_id, limit=limit + 1, offset=offset
        )
    )
    items = [AuditRow(**{**r, "created": datetime.fromtimestamp(r["created"], UTC)}) for r in rows[:limit]]
    return AuditPage(items=items, next_offset=offset + limit if len(rows) > limit else None)


def _ts(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()
