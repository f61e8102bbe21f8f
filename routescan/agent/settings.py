"""The agent's settings (pydantic-settings), read from ``ROUTESCAN_*`` environment variables.

The vLLM plugin has no command line of its own: vLLM loads it in each of its processes, so the
environment of ``vllm serve`` is where an operator configures it (docs/deploy.md lists them).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from routescan.telemetry.schema import ExportLevel, ModelId

DEFAULT_DAEMON = "unix:///run/routescan/routescan.sock"


class AgentSettings(BaseSettings):
    """Every field's variable is ``ROUTESCAN_<FIELD IN CAPITALS>``."""

    model_config = SettingsConfigDict(env_prefix="ROUTESCAN_", env_ignore_empty=True, extra="ignore")

    agent: bool = Field(True, description="ROUTESCAN_AGENT=0 turns the vLLM plugin off")
    daemon: str = Field(DEFAULT_DAEMON, description="unix:///path/to.sock or http://127.0.0.1:PORT")
    sampling: float = Field(1.0, ge=0.0, le=1.0, description="Share of requests traced, by request id")
    spool: Path | None = Field(
        None, description="Spool file while the daemon is down (default: the user's state directory)"
    )
    model_id: ModelId | None = Field(
        None, description="Model id written into traces; default: the served model's own id"
    )
    api_token: str | None = Field(None, description="Bearer token for a daemon on TCP beyond loopback")
    trace_file: Path | None = Field(
        None,
        description="Also append every trace to this JSONL trace file on the serving host (collection "
        "from live traffic, tests); full fingerprints, so it is created 0600 like the spool",
    )
    queue_size: int = Field(10_000, ge=1, description="Traces held in memory before new ones are dropped")
    export_level: ExportLevel = Field(
        ExportLevel.full,
        description="What leaves the process (docs/privacy.md): full traces for a daemon on this host; "
        "score (the on-host detector's binned score) or another reduced level for one beyond it",
    )
    detector: str | None = Field(
        None,
        description="Detector file (or shipped name) the reduced levels are computed with: the one the "
        "daemon loads; default, as the daemon's, the demo detector",
    )
    export_epsilon: float | None = Field(
        None, gt=0, description="Score level: randomised response, epsilon per request (as the daemon's)"
    )


def agent_settings() -> AgentSettings:
    """The settings from the environment; a bad value raises pydantic's error naming the variable."""
    return AgentSettings()


__all__ = ["DEFAULT_DAEMON", "AgentSettings", "agent_settings"]
