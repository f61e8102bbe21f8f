"""ASGI middleware that runs before any route: refuse browsers, count and time requests.

A tokenless daemon on loopback must not be reachable from a web page: a cross-site form or
``text/plain`` POST (refused by the JSON-only body check), a page that sends ``Origin`` or
``Sec-Fetch-Site: cross-site`` (refused here), and DNS rebinding, where the page's own host name
resolves to 127.0.0.1 (refused by the Host check, starlette's TrustedHostMiddleware).
"""

from __future__ import annotations

import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from routescan.service.metrics import Metrics


class BrowserGuard:
    """403 for requests a browser sends on behalf of another site (same-origin pages pass)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            origin = headers.get(b"origin")
            host = headers.get(b"host", b"")
            site = headers.get(b"sec-fetch-site")
            foreign_origin = origin is not None and origin not in (b"http://" + host, b"https://" + host)
            if foreign_origin or site in (b"cross-site", b"same-site"):
                response = JSONResponse(
                    {"detail": "cross-site browser requests are refused: RouteScan's API is for services"},
                    status_code=403,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestMetrics:
    """Count requests and time them per route (a plain ASGI middleware: no per-request task hop)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)
