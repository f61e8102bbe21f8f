"""The framework's ceiling for scripts/bench_service.py: the smallest FastAPI app that reads a POST
body and answers a constant, served by uvicorn with the settings `routescan serve` uses (1 worker,
uvloop + httptools, no access log). RouteScan's throughput is reported as a ratio of this one's,
measured in the same run with the same body."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

app = FastAPI()
_ANSWER = b'{"score":0.5,"label":"ok"}'


@app.post("/v1/score")
async def score(request: Request) -> Response:
    await request.body()
    return Response(_ANSWER, media_type="application/json")
