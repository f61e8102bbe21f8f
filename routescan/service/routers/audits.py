"""``GET /v1/audits``: the audit log (ids, scores, labels; never text)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Query

from routescan.service.deps import Authorized, StoreDep
from routescan.service.schemas import AuditPage, AuditRow
from routescan.service.store import epoch_seconds

router = APIRouter(prefix="/v1", tags=["audits"], dependencies=[Authorized])


@router.get("/audits", response_model=AuditPage, responses={503: {"description": "the store cannot be read"}})
async def audits(
    store: StoreDep,
    since: Annotated[datetime | None, Query(description="ISO 8601 time, inclusive")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601 time, exclusive")] = None,
    label: Literal["flagged", "ok"] | None = None,
    model_id: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[
        int | None, Query(ge=0, le=2**62, description="keyset paging: rows with an id above this")
    ] = None,
    offset: Annotated[int, Query(ge=0, le=2**62, description="count paging (slow on large tables)")] = 0,
) -> AuditPage:
    """The audit log, oldest first, filtered and paged. Page by key with ``after`` (pass the last
    page's ``next_after``); ``offset`` / ``next_offset`` still work. Both are null on the last page."""
    rows = await anyio.to_thread.run_sync(
        lambda: store.query(
            since=epoch_seconds(since),
            until=epoch_seconds(until),
            label=label,
            model_id=model_id,
            after_id=after,
            limit=limit + 1,
            offset=offset,
        )
    )
    items = [AuditRow(**{**r, "created": datetime.fromtimestamp(r["created"], UTC)}) for r in rows[:limit]]
    more = len(rows) > limit
    return AuditPage(
        items=items,
        next_offset=offset + limit if more else None,
        next_after=items[-1].id if more else None,
    )
