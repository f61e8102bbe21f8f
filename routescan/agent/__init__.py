"""The sidecar agent: per-request prefill telemetry from inside a serving process to `routescan serve`.

Configured by environment variables (the vLLM plugin reads them in each worker):

- ``ROUTESCAN_DAEMON``: ``unix:///run/routescan/routescan.sock`` (default) or ``http://127.0.0.1:8787``
- ``ROUTESCAN_SAMPLING``: share of requests traced, 0..1 (default 1)
- ``ROUTESCAN_SPOOL``: spool file while the daemon is down (default ``spool.jsonl`` in the serving
  user's state directory, e.g. ``~/.local/state/routescan/``; created 0600 in a 0700 directory)
- ``ROUTESCAN_MODEL_ID``: model id written into traces (must match the detector's)
- ``ROUTESCAN_API_TOKEN``: bearer token, when the daemon listens on TCP beyond loopback
"""

from __future__ import annotations

import os

import torch

from routescan.agent.agent import RouteScanAgent, Span, packed_spans, padded_spans
from routescan.agent.sender import SenderCounters, TraceSender, default_spool_path


def sender_from_env() -> TraceSender:
    env = os.environ
    return TraceSender(
        env.get("ROUTESCAN_DAEMON", "unix:///run/routescan/routescan.sock"),
        spool=env.get("ROUTESCAN_SPOOL") or default_spool_path(),
        token=env.get("ROUTESCAN_API_TOKEN"),
    )


def agent_from_env(model: torch.nn.Module, *, model_id: str | None = None) -> RouteScanAgent:
    env = os.environ
    sender = sender_from_env()
    ident = model_id or env.get("ROUTESCAN_MODEL_ID")
    if not ident:
        raise ValueError("set ROUTESCAN_MODEL_ID to the model id the daemon's detector was trained on")
    return RouteScanAgent(
        model,
        sender,
        model_id=ident,
        sampling=float(env.get("ROUTESCAN_SAMPLING", "1")),
    )


__all__ = [
    "RouteScanAgent",
    "SenderCounters",
    "Span",
    "TraceSender",
    "agent_from_env",
    "packed_spans",
    "padded_spans",
    "sender_from_env",
]
