"""The one place that reads the environment.

Precedence, highest first: command-line flags (passed as keyword arguments), ``HISTOD_*`` environment
variables, a TOML file (``$HISTOD_CONFIG``, else ``./histod.toml`` when present), the defaults below.

Mistakes are :class:`~histod.errors.ConfigError` (one ``error: ...`` line from the CLI, exit status 2), never
silence: an unknown TOML key or ``HISTOD_*`` variable (with the likely intended name), a ``$HISTOD_CONFIG`` that
names no file, a file that is not UTF-8 TOML, a value out of bounds. Lists in the environment are JSON or
comma/space separated (``HISTOD_EXTENSIONS=.png,.jpg``).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from histod.errors import ConfigError
from histod.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, EXTENSIONS
from histod.readers import SINGLE_FILE_SLIDES

CONFIG_ENV = "HISTOD_CONFIG"
ENV_PREFIX = "HISTOD_"
NOT_SETTINGS = (CONFIG_ENV, "HISTOD_VENV", "HISTOD_SHARED")
"""``HISTOD_*`` names that are not settings: the TOML file's path, and the test and benchmark tooling's"""
NOT_SETTINGS_PREFIXES = ("HISTOD_TEST_", "HISTOD_FAULTS_", "HISTOD_BENCH_")
DEFAULT_CONFIG_FILE = Path("histod.toml")
IMAGE_EXTENSIONS = EXTENSIONS
"""the suffixes of the formats histod decodes (histod.imaging.FORMATS): what the trainer discovers"""
SERVE_EXTENSIONS = (*IMAGE_EXTENSIONS, *SINGLE_FILE_SLIDES)
"""what the service takes by default: those, and whole-slide images held in one file (read with the slides extra)"""


def config_file() -> Path | None:
    """The TOML file in force: ``$HISTOD_CONFIG`` if set, else ``./histod.toml`` if it exists."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        if not Path(named).is_file():
            raise ConfigError(f"{CONFIG_ENV} names {named}, which is not a file")
        return Path(named)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def _did_you_mean(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word.lower(), [k.lower() for k in known], n=1, cutoff=0.75)
    return f" (did you mean {next(k for k in known if k.lower() == close[0])}?)" if close else ""


def _check_environment(fields: list[str]) -> None:
    """Refuse a ``HISTOD_*`` variable that names no setting (a misspelling would otherwise be ignored)."""
    names = [ENV_PREFIX + f.upper() for f in fields]
    for variable in sorted(os.environ):
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper in names or upper in NOT_SETTINGS:
            continue
        if upper.startswith(NOT_SETTINGS_PREFIXES):
            continue
        raise ConfigError(f"unknown setting {variable} in the environment{_did_you_mean(upper, names)}")


class _TomlFile(TomlConfigSettingsSource):
    """The TOML file, read strictly: unreadable, not UTF-8, not TOML, or a key that names no setting is a
    ConfigError."""

    def __init__(self, settings_cls: type[BaseSettings], toml_file: Path) -> None:
        super().__init__(settings_cls, toml_file=toml_file)
        fields = list(settings_cls.model_fields)
        for key in self.toml_data:
            if key not in fields:
                raise ConfigError(f"unknown setting {key!r} in {toml_file}{_did_you_mean(key, fields)}")

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            return super()._read_file(file_path)
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{file_path} is not a TOML file: it is not UTF-8 text") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file_path} is not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read {file_path}: {exc.strerror or exc}") from exc


class Settings(BaseSettings):
    """Everything the service and the CLI commands share. Each field is also ``HISTOD_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

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
    threads: int = Field(2, ge=1, le=256, description="inference threads (LiteRT)")
    allow_parity_failure: bool = Field(
        False, description="serve a run whose model.tflite failed the export parity check (model.json parity)"
    )
    batch_size: int = Field(8, ge=1, le=1024, description="images classified together in one call")
    batch_timeout_ms: int = Field(200, ge=0, le=60_000, description="how long a partial batch waits for more files")
    decode_workers: int = Field(2, ge=1, le=256, description="threads that read and decode images")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, le=150_000_000, description="larger images are refused (decompression bombs)"
    )
    max_file_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, le=4 << 30, description="larger files are refused")
    max_batch_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1,
        le=64 << 30,
        description="file bytes one batch holds in memory at most: a batch stops taking files before it would pass "
        "this (a single larger file goes alone)",
    )
    heatmaps: bool = Field(True, description="draw a heat-map PNG beside each tiled image (a field, a slide)")
    heatmap_min_tiles: int = Field(
        64, ge=0, le=1_000_000, description="only for images with at least this many tissue tiles (0.3 s of CPU each)"
    )

    # --- watching -----------------------------------------------------------------------------------
    polling: bool = Field(False, description="use watchdog's polling observer (NFS/SMB shares)")
    poll_interval_ms: int = Field(1000, ge=10, le=3_600_000, description="polling observer period")
    stable_ms: int = Field(
        1000,
        ge=0,
        le=3_600_000,
        description="a file without close-write counts as complete once its size and mtime are unchanged this long",
    )
    debounce_ms: int = Field(50, ge=0, le=60_000, description="events are gathered this long before they are looked at")
    reconcile_interval_s: float = Field(
        60.0, gt=0, le=86_400, description="period of the safety-net scan of the watch folder"
    )
    extensions: Annotated[list[str], NoDecode] = Field(
        list(SERVE_EXTENSIONS), min_length=1, description="file suffixes taken (any letter case)"
    )
    ignore_patterns: Annotated[list[str], NoDecode] = Field(
        [".*", "*.part", "*.tmp", "~$*"], description="glob patterns never taken"
    )

    # --- reporting ----------------------------------------------------------------------------------
    report_interval_s: float = Field(3600.0, gt=0, le=31 * 86_400, description="period of the summary report")

    # --- monitoring ---------------------------------------------------------------------------------
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65_535,
        description="serve Prometheus metrics (/metrics) and the health check (/healthz) on this port; off when "
        "unset (`histod health` asks it)",
    )
    metrics_address: str = Field(
        "127.0.0.1",
        min_length=1,
        description="the address the metrics port listens on (the systemd unit allows loopback only)",
    )

    # --- logging ------------------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a terminal, JSON lines otherwise"
    )

    host: str = Field(default_factory=socket.gethostname, description="recorded with every result")
    audit_key_file: Path | None = Field(
        None, description="a key only the service user may read: every audit row gets a MAC (`histod audit keygen`)"
    )

    # --- several services, one PostgreSQL database ---------------------------------------------------
    worker_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}",
        min_length=1,
        max_length=200,
        description="this service in the claims table (a random suffix is added per start)",
    )
    claim_expiry_s: float = Field(
        30.0, gt=0, le=86_400, description="a claim not renewed for this long (a service that died) is taken over"
    )
    claim_heartbeat_s: float = Field(
        5.0, gt=0, le=3600, description="how often a service renews its claims and looks for expired ones"
    )

    @model_validator(mode="after")
    def _heartbeat_within_expiry(self) -> Settings:
        if self.claim_heartbeat_s * 2 > self.claim_expiry_s:
            raise ValueError(
                f"claim_heartbeat_s ({self.claim_heartbeat_s}) must be at most half of claim_expiry_s "
                f"({self.claim_expiry_s}): claims would expire between two renewals"
            )
        return self

    @field_validator("audit_key_file", "metrics_port", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("extensions", "ignore_patterns", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """An environment list: JSON (``[".png", ".jpg"]``), or separated by commas or spaces."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError as exc:
                raise ValueError(f"not a JSON list ({exc}); or give the items separated by commas") from exc
        return [part for part in re.split(r"[,\s]+", text) if part]

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, value: list[str]) -> list[str]:
        suffixes = [("." + v.strip().lower().lstrip(".")) for v in value]
        if "." in suffixes:
            raise ValueError("an empty suffix would take every file")
        return suffixes

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        _check_environment(list(settings_cls.model_fields))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = config_file()
        if toml is not None:
            sources.append(_TomlFile(settings_cls, toml))
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
    Raises ConfigError for a value that does not validate (the CLI prints it, not a traceback), naming where
    the value came from."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except SettingsError as exc:
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise ConfigError(f"invalid settings: {exc}{cause}".replace("\n", " ")) from exc
    except ValidationError as exc:
        problems = "; ".join(_problem(e, given) for e in exc.errors())
        raise ConfigError(f"invalid settings: {problems}".replace("\n", " ")) from exc


def _problem(error: Any, given: dict[str, Any]) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "settings"
    return f"{field}: {error['msg']}{_origin(str(error['loc'][0]) if error['loc'] else '', given)}"


def _origin(field: str, given: dict[str, Any]) -> str:
    """Where the value of ``field`` came from, for the message (the same precedence as the sources)."""
    if not field or field in given:
        return ""
    variable = next((k for k in os.environ if k.upper() == ENV_PREFIX + field.upper()), None)
    if variable is not None:
        return f" ({variable}={os.environ[variable]!r})"
    toml = os.environ.get(CONFIG_ENV) or (str(DEFAULT_CONFIG_FILE) if DEFAULT_CONFIG_FILE.is_file() else None)
    return f" (in {toml})" if toml else ""
