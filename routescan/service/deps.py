"""Typed FastAPI dependencies: the running service, its store and metrics, auth and the request body.

Auth is a dependency of every private router, and FastAPI resolves router dependencies before the
body dependency, so a request without the token is refused before a byte of its body is read.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from routescan.service.metrics import Metrics
from routescan.service.scoring import ScoringService
from routescan.service.settings import is_loopback_host
from routescan.service.store import AuditStore
from routescan.telemetry.wire import MEDIA_TYPES as MSGPACK_TYPES

JSON_TYPES = ("application/json",)
BODY_TYPES = JSON_TYPES + MSGPACK_TYPES
# Every dependency is ``async def``: FastAPI runs a plain ``def`` dependency on a worker thread,
# a hop that costs more than the work of these lookups.


@dataclass
class Runtime:
    """What the lifespan opened: set on ``app.state.runtime`` once the service can score."""

    service: ScoringService
    store: AuditStore


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_runtime(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise HTTPException(503, "the detector is not loaded yet")
    return runtime


MetricsDep = Annotated[Metrics, Depends(get_metrics)]


# The hot path's dependencies take the Request itself rather than other dependencies: FastAPI's
# dependency solving costs tens of microseconds per node, more than these lookups.
async def get_service(request: Request) -> ScoringService:
    return (await get_runtime(request)).service


async def get_store(request: Request) -> AuditStore:
    return (await get_runtime(request)).store


ServiceDep = Annotated[ScoringService, Depends(get_service)]
StoreDep = Annotated[AuditStore, Depends(get_store)]


async def require_token(request: Request) -> None:
    token = request.app.state.settings.token()
    if token is None:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or not secrets.compare_digest(value.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


Authorized = Depends(require_token)


@dataclass(frozen=True)
class Body:
    """A request body and how it is encoded (JSON, or the binary wire's MessagePack)."""

    data: bytes
    binary: bool
    # the peer is on this host (a Unix socket, or a loopback address): full records may come from it
    local: bool = True


async def read_body(request: Request) -> Body:
    """The body, when it is JSON or MessagePack and within ``max_body_bytes`` (checked by header and
    by bytes read)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in BODY_TYPES:
        raise HTTPException(
            415,
            f"send the body as {JSON_TYPES[0]} or {MSGPACK_TYPES[0]} (Content-Type header); other types "
            "are refused",
        )
    limit = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body over the {limit}-byte limit (max_body_bytes)")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body over the {limit}-byte limit (max_body_bytes)")
        parts.append(chunk)
    return Body(b"".join(parts), media in MSGPACK_TYPES, local=is_local_peer(request))


def is_local_peer(request: Request) -> bool:
    """A Unix-socket peer (no address) or a loopback address. A proxy in front makes every peer look
    local: such a daemon relies on the proxy, and docs/deploy.md says so."""
    client = request.client
    return client is None or not client.host or is_loopback_host(client.host)


BodyDep = Annotated[Body, Depends(read_body)]
