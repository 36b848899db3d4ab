"""The one place that reads the environment.

Precedence, highest first: command-line flags (passed as keyword arguments), ``HISTOD_*`` environment
variables, a TOML file (``$HISTOD_CONFIG``, else ``./histod.toml`` when present), the defaults below.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from histod.errors import ConfigError
from histod.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

CONFIG_ENV = "HISTOD_CONFIG"
DEFAULT_CONFIG_FILE = Path("histod.toml")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def config_file() -> Path | None:
    """The TOML file in force: ``$HISTOD_CONFIG`` if set, else ``./histod.toml`` if it exists."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        return Path(named)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


class Settings(BaseSettings):
    """Everything the service and the CLI commands share. Each field is also ``HISTOD_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="HISTOD_", extra="ignore", validate_default=True)

    # --- where things live -------------------------------------------------------------------------
    data_dir: Path = Field(
        Path("histod-data"), description="holds prediction/, processed/, failed/, reports/, histod.db"
    )
    watch_dir: Path | None = Field(None, description="folder watched for new images (default <data_dir>/prediction)")
    database_url: str | None = Field(None, description="SQLAlchemy URL (default sqlite:///<data_dir>/histod.db)")
    model: Path | None = Field(None, description="a RUN_DIR written by `histod train`")
    busy_timeout_ms: int = Field(
        10_000,
        ge=0,
        le=30_000,
        description="SQLite: how long a statement waits for another connection's lock before the database counts as "
        "busy (the service then retries the batch); at most 30 s, since a waiting statement holds up the systemd "
        "watchdog pings (WatchdogSec=60); not used for PostgreSQL",
    )

    # --- classifying --------------------------------------------------------------------------------
    engine: Literal["litert", "keras"] = Field(
        "litert", description="litert serves model.tflite; keras loads TensorFlow"
    )
    threads: int = Field(2, ge=1, description="inference threads (LiteRT)")
    allow_parity_failure: bool = Field(
        False, description="serve a run whose model.tflite failed the export parity check (model.json parity)"
    )
    batch_size: int = Field(8, ge=1, le=1024, description="images classified together in one call")
    batch_timeout_ms: int = Field(200, ge=0, description="how long a partial batch waits for more files")
    decode_workers: int = Field(2, ge=1, description="threads that read and decode images")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="larger images are refused (decompression bombs)")
    max_file_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="larger files are refused")

    # --- watching -----------------------------------------------------------------------------------
    polling: bool = Field(False, description="use watchdog's polling observer (NFS/SMB shares)")
    poll_interval_ms: int = Field(1000, ge=10, description="polling observer period")
    stable_ms: int = Field(
        1000,
        ge=0,
        description="a file without close-write counts as complete once its size and mtime are unchanged this long",
    )
    debounce_ms: int = Field(50, ge=0, description="events are gathered this long before they are looked at")
    reconcile_interval_s: float = Field(60.0, gt=0, description="period of the safety-net scan of the watch folder")
    extensions: list[str] = Field(list(IMAGE_EXTENSIONS), description="file suffixes taken (any letter case)")
    ignore_patterns: list[str] = Field([".*", "*.part", "*.tmp", "~$*"], description="glob patterns never taken")

    # --- reporting ----------------------------------------------------------------------------------
    report_interval_s: float = Field(3600.0, gt=0, description="period of the summary report")

    # --- logging ------------------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a terminal, JSON lines otherwise"
    )

    host: str = Field(default_factory=socket.gethostname, description="recorded with every result")

    # --- several services, one PostgreSQL database ---------------------------------------------------
    worker_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}",
        min_length=1,
        max_length=200,
        description="this service in the claims table (a random suffix is added per start)",
    )
    claim_expiry_s: float = Field(
        30.0, gt=0, description="a claim not renewed for this long (a service that died) is taken over"
    )
    claim_heartbeat_s: float = Field(
        5.0, gt=0, description="how often a service renews its claims and looks for expired ones"
    )

    @model_validator(mode="after")
    def _heartbeat_within_expiry(self) -> Settings:
        if self.claim_heartbeat_s * 2 > self.claim_expiry_s:
            raise ValueError(
                f"claim_heartbeat_s ({self.claim_heartbeat_s}) must be at most half of claim_expiry_s "
                f"({self.claim_expiry_s}): claims would expire between two renewals"
            )
        return self

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, value: list[str]) -> list[str]:
        return [("." + v.lower().lstrip(".")) for v in value]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = config_file()
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    # --- derived paths ------------------------------------------------------------------------------
    @property
    def resolved_watch_dir(self) -> Path:
        return self.watch_dir if self.watch_dir is not None else self.data_dir / "prediction"

    @property
    def processed_dir(self) -> Path:
        return self.data_dir / "processed"

    @property
    def failed_dir(self) -> Path:
        return self.data_dir / "failed"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'histod.db').absolute()}"


def load_settings(**overrides: Any) -> Settings:
    """Build Settings; ``None`` overrides (flags the user did not give) are dropped so lower layers apply.
    Raises ConfigError for a value that does not validate (the CLI prints it, not a traceback)."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
