"""Service settings: configs/service.yaml, then ROUTESCAN_* environment variables, then flags."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from routescan.config import section_defaults


class ServiceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8787, ge=0, le=65535)
    uds: Path | None = None
    detector: Path | None = None
    operating_point: str | None = None
    db: Path | None = None
    token_file: Path | None = None
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_batch: int = Field(512, ge=1)
    retention_days: float = Field(90, ge=0)
    commit_window_ms: float = Field(2.0, ge=0)
    webhook_url: str | None = None
    webhook_queue: int = Field(1000, ge=1)
    webhook_retries: int = Field(3, ge=0)
    webhook_timeout_s: float = Field(2.0, gt=0)
    access_log: bool = False

    def db_path(self) -> Path:
        if self.db is not None:
            return self.db
        from platformdirs import user_data_dir

        return Path(user_data_dir("routescan")) / "audit.sqlite3"

    def api_token(self) -> str | None:
        token = os.environ.get("ROUTESCAN_API_TOKEN")
        if token:
            return token.strip()
        if self.token_file is not None:
            try:
                return self.token_file.read_text(encoding="utf-8").strip() or None
            except OSError as exc:
                raise ValueError(f"cannot read the token file {self.token_file}: {exc}") from exc
        return None

    def is_loopback(self) -> bool:
        if self.host in ("localhost",):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def load_settings(config: Path | None = None, **overrides: Any) -> ServiceSettings:
    """Merge the YAML file, the environment and explicit overrides (``None`` means not given)."""
    if config is not None:
        from routescan.config import load_yaml

        data = dict(load_yaml(config).get("service", {}))
    else:
        data = section_defaults("service.yaml", "service")
    for name in ServiceSettings.model_fields:
        env = os.environ.get(f"ROUTESCAN_{name.upper()}")
        if env is not None and env != "":
            data[name] = env
    data.update({k: v for k, v in overrides.items() if v is not None})
    return ServiceSettings.model_validate(data)
