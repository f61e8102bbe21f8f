"""Service settings (pydantic-settings): flags > ``ROUTESCAN_*`` environment > YAML file > defaults.

The YAML file is ``configs/service.yaml`` (its ``service:`` section) unless ``--config`` names
another. Every field's environment variable is ``ROUTESCAN_<FIELD IN CAPITALS>``; the bearer token
is ``ROUTESCAN_API_TOKEN``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from routescan.config import config_dir
from routescan.privacy.levels import NETWORK_DEFAULT
from routescan.telemetry.schema import ExportLevel

if TYPE_CHECKING:
    from routescan.detector.artifact import Detector

# Which YAML file the settings being built read: set for the duration of one load_settings call.
_YAML_FILE: ContextVar[Path | None] = ContextVar("routescan_service_yaml", default=None)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ROUTESCAN_", env_ignore_empty=True, extra="forbid", validate_default=True
    )

    host: str = "127.0.0.1"
    port: int = Field(8787, ge=0, le=65535)
    uds: Path | None = None
    # The socket's mode and group: the serving container's user reaches the daemon through the
    # group; nobody else can connect (socket mode skips the bearer token).
    uds_mode: int = Field(0o660, ge=0, le=0o777)
    uds_group: str | None = None
    detector: Path | None = None
    operating_point: str | None = None
    db: Path | None = None
    # A postgresql:// URL (one store for a fleet of daemons) or a SQLite path; unset: ``db``.
    audit_store: str | None = None
    api_token: SecretStr | None = None
    token_file: Path | None = None
    # Extra Host header values to accept (behind a reverse proxy); loopback binds accept only
    # loopback names, which is what stops DNS rebinding.
    allowed_hosts: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_batch: int = Field(512, ge=1)
    # Bodies above this are parsed and featurised on worker threads, off the event loop; smaller
    # ones cost less than the thread hop.
    inline_parse_bytes: int = Field(64 * 1024, ge=0)
    parse_threads: int = Field(2, ge=1, le=64)
    retention_days: float = Field(90, ge=0)
    commit_window_ms: float = Field(2.0, ge=0)
    webhook_url: str | None = None
    webhook_queue: int = Field(1000, ge=1)
    webhook_retries: int = Field(3, ge=0)
    webhook_timeout_s: float = Field(2.0, gt=0)
    access_log: bool = False
    # The export level of the records this daemon scores (routescan.privacy.levels; docs/privacy.md).
    # Unset: the detector's own level when it was trained on a reduced one; else full for a daemon
    # on a Unix socket or loopback, and the network default (score) for one bound beyond loopback.
    export_level: ExportLevel | None = None
    # randomised response on the score level's bins, epsilon per request (the agent applies it; the
    # daemon's card says what it expects)
    export_epsilon: float | None = Field(None, gt=0)
    # Full fingerprints and traces are nearly the prompt: from a peer that is not on this host they
    # are refused (403) unless the operator sets this, in so many words.
    allow_full_from_network: bool = False
    _token: str | None = PrivateAttr(default=None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = _YAML_FILE.get() or _default_yaml()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file is not None:
            sources.append(
                YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file, yaml_config_section="service")
            )
        return tuple(sources)

    @field_validator("uds_mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        # "0660" from the environment is octal, as chmod reads it (YAML's 0660 already is)
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError:
                raise ValueError("uds_mode is an octal file mode such as 0660") from None
        return value

    @field_validator("api_token")
    @classmethod
    def _real_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError(
                "ROUTESCAN_API_TOKEN is set but blank: set a real token, or unset it for a loopback-only "
                "daemon"
            )
        return SecretStr(value.get_secret_value().strip()) if value is not None else None

    @model_validator(mode="after")
    def _token_file_readable(self) -> ServiceSettings:
        self._token = self._read_token()
        return self

    def _read_token(self) -> str | None:
        if self.api_token is not None:
            return self.api_token.get_secret_value()
        if self.token_file is None:
            return None
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read the token file {self.token_file}: {exc}") from None
        if not token:
            raise ValueError(f"the token file {self.token_file} is empty; write the bearer token into it")
        return token

    def db_path(self) -> Path:
        if self.db is not None:
            return self.db
        from platformdirs import user_data_dir

        return Path(user_data_dir("routescan")) / "audit.sqlite3"

    def audit_store_target(self) -> str:
        """Where audits go: ``audit_store`` if set, else the SQLite file ``db_path()``."""
        return self.audit_store or str(self.db_path())

    def token(self) -> str | None:
        """The bearer token (environment first, then the token file), or None for no auth."""
        return self._token

    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    def local_only(self) -> bool:
        """Only this host can connect: a Unix socket or a loopback bind."""
        return self.uds is not None or self.is_loopback()

    def resolved_export_level(self, detector_level: ExportLevel = ExportLevel.full) -> ExportLevel:
        """The level this daemon scores: the setting, else the detector's own reduced level, else
        full on a local-only daemon (or when full from the network is allowed) and the network
        default otherwise."""
        if self.export_level is not None:
            return self.export_level
        if detector_level != ExportLevel.full:
            return detector_level
        if self.local_only() or self.allow_full_from_network:
            return ExportLevel.full
        return NETWORK_DEFAULT

    def scoring_detector(self, detector: Detector) -> Detector:
        """``detector`` at the export level this daemon scores (:meth:`resolved_export_level`)."""
        level = self.resolved_export_level(detector.export.level)
        return detector.at_level(level, epsilon=self.export_epsilon)

    def trusted_hosts(self) -> list[str]:
        """Host header values the server answers (``*``: any, for a socket or a token-guarded bind)."""
        if self.uds is not None:
            return ["*"]  # no browser reaches a Unix socket; its file mode is the guard
        if self.is_loopback():
            return [*LOOPBACK_HOSTS, "[::1]", *self.allowed_hosts]
        return self.allowed_hosts or ["*"]


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1): the bind host or a peer's address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_yaml() -> Path | None:
    try:
        path = config_dir() / "service.yaml"
    except FileNotFoundError:
        return None
    return path if path.is_file() else None


@contextmanager
def _reading(config: Path | None) -> Iterator[None]:
    token = _YAML_FILE.set(config)
    try:
        yield
    finally:
        _YAML_FILE.reset(token)


def load_settings(config: Path | None = None, **overrides: Any) -> ServiceSettings:
    """Settings from ``config`` (default configs/service.yaml), the environment and explicit
    overrides; an override of ``None`` means "not given"."""
    if config is not None and not Path(config).is_file():
        raise ValueError(f"{config}: no such settings file")
    given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    try:
        with _reading(Path(config) if config is not None else None):
            return ServiceSettings(**given)
    except ValidationError as exc:
        # input values stay out of the message: one of them may be the token
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors(include_input=False, include_url=False)
        )
        raise ValueError(f"invalid service settings: {problems}") from None
