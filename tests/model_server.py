"""A minimal model server with the RouteScan agent inside, for the end-to-end sidecar test.

    python tests/model_server.py PORT        (env: ROUTESCAN_DAEMON, ROUTESCAN_SPOOL)

It serves a seeded tiny Mixtral (the model the demo detector reads) behind POST /generate, batching
concurrent requests into one padded prefill step the way a real server batches, with the agent
bracketing each step. It returns only token counts: the point is the telemetry path.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from routescan.agent import agent_from_env, padded_spans
from routescan.models.batching import pad_batch
from routescan.models.loading import load_tiny

loaded = load_tiny("mixtral", seed=0)
agent = agent_from_env(loaded.model, model_id=loaded.model_id)
pending: list[tuple[str, list[int], Future]] = []
lock = threading.Condition()


def batcher() -> None:
    while True:
        with lock:
            while not pending:
                lock.wait()
        time.sleep(0.01)  # let concurrent requests join the step
        with lock:
            batch, pending[:] = pending[:8], pending[8:]
        input_ids, attention = pad_batch([ids for _, ids, _ in batch], loaded.encoder.pad_id)
        width = input_ids.shape[1]
        spans = padded_spans([r for r, _, _ in batch], [len(ids) for _, ids, _ in batch], width)
        with torch.inference_mode(), agent.step(spans):
            loaded.model(input_ids=input_ids, attention_mask=attention, use_cache=False, logits_to_keep=1)
        for _, ids, fut in batch:
            fut.set_result(len(ids))


threading.Thread(target=batcher, daemon=True).start()
app = FastAPI()


class Generate(BaseModel):
    request_id: str
    prompt: str


@app.post("/generate")
async def generate(body: Generate) -> dict:
    import asyncio

    fut: Future = Future()
    with lock:
        pending.append((body.request_id, loaded.encoder.encode(body.prompt), fut))
        lock.notify()
    tokens = await asyncio.wrap_future(fut)
    return {"request_id": body.request_id, "prompt_tokens": tokens}


@app.get("/stats")
async def stats() -> dict:
    return {**agent.sender.counters.as_dict(), "spool": agent.sender.pending_spool()}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
