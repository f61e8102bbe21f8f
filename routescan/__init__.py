"""RouteScan: privacy-preserving safety auditing of MoE LLMs from expert-kernel launch telemetry."""

__version__ = "0.1.0"
