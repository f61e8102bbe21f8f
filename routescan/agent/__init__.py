"""The sidecar agent: per-request prefill telemetry from inside a serving process to `routescan serve`.

Configured by ``ROUTESCAN_*`` environment variables (:class:`routescan.agent.settings.AgentSettings`;
the vLLM plugin reads them in each worker): ``ROUTESCAN_DAEMON``, ``ROUTESCAN_SAMPLING``,
``ROUTESCAN_SPOOL``, ``ROUTESCAN_MODEL_ID``, ``ROUTESCAN_API_TOKEN``, ``ROUTESCAN_TRACE_FILE``,
``ROUTESCAN_AGENT``, ``ROUTESCAN_EXPORT_LEVEL`` (with ``ROUTESCAN_DETECTOR`` and
``ROUTESCAN_EXPORT_EPSILON``). docs/deploy.md says what each does.
"""

from __future__ import annotations

import torch

from routescan.agent.agent import RouteScanAgent, Span, packed_spans, padded_spans
from routescan.agent.sender import SenderCounters, TraceSender, default_spool_path
from routescan.agent.settings import AgentSettings, agent_settings
from routescan.detector.artifact import Detector, detector_path
from routescan.detector.exporter import Exporter
from routescan.telemetry.schema import ExportLevel


def exporter_from_settings(settings: AgentSettings) -> Exporter | None:
    """The export level's record builder (None for full: traces go as they are)."""
    if settings.export_level == ExportLevel.full:
        return None
    detector = None
    if settings.export_level in (ExportLevel.score, ExportLevel.harm):
        detector = Detector.load(detector_path(settings.detector))
    return Exporter(settings.export_level, detector, epsilon=settings.export_epsilon)


def sender_from_env(settings: AgentSettings | None = None) -> TraceSender:
    settings = settings or agent_settings()
    return TraceSender(
        settings.daemon,
        spool=settings.spool or default_spool_path(),
        token=settings.api_token,
        trace_file=settings.trace_file,
        queue_size=settings.queue_size,
        exporter=exporter_from_settings(settings),
    )


def agent_from_env(model: torch.nn.Module, *, model_id: str | None = None) -> RouteScanAgent:
    settings = agent_settings()
    ident = model_id or settings.model_id
    if not ident:
        raise ValueError("set ROUTESCAN_MODEL_ID to the model id the daemon's detector was trained on")
    return RouteScanAgent(model, sender_from_env(settings), model_id=ident, sampling=settings.sampling)


__all__ = [
    "RouteScanAgent",
    "SenderCounters",
    "Span",
    "TraceSender",
    "agent_from_env",
    "exporter_from_settings",
    "packed_spans",
    "padded_spans",
    "sender_from_env",
]
