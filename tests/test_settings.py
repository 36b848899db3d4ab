"""Settings: defaults, HISTOD_* environment, histod.toml / HISTOD_CONFIG, flags over everything."""

from __future__ import annotations

from pathlib import Path

import pytest

from histod.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("HISTOD_CONFIG", "HISTOD_DATA_DIR", "HISTOD_BATCH_SIZE", "HISTOD_WATCH_DIR", "HISTOD_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_defaults_derive_folders_from_data_dir(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path / "d")
    assert s.resolved_watch_dir == tmp_path / "d" / "prediction"
    assert s.processed_dir == tmp_path / "d" / "processed"
    assert s.failed_dir == tmp_path / "d" / "failed"
    assert s.reports_dir == tmp_path / "d" / "reports"
    assert s.resolved_database_url == f"sqlite:///{tmp_path / 'd' / 'histod.db'}"
    assert s.engine == "litert"


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HISTOD_BATCH_SIZE", "32")
    monkeypatch.setenv("HISTOD_DATABASE_URL", "sqlite:////tmp/x.db")
    s = Settings()
    assert s.batch_size == 32
    assert s.resolved_database_url == "sqlite:////tmp/x.db"


def test_toml_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / "histod.toml").write_text('batch_size = 4\nengine = "keras"\nextensions = ["PNG", "jpg"]\n')
    s = Settings()
    assert s.batch_size == 4
    assert s.engine == "keras"
    assert s.extensions == [".png", ".jpg"]


def test_histod_config_names_the_toml_and_env_beats_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "elsewhere.toml"
    cfg.write_text("batch_size = 4\nbatch_timeout_ms = 7\n")
    monkeypatch.setenv("HISTOD_CONFIG", str(cfg))
    monkeypatch.setenv("HISTOD_BATCH_SIZE", "16")
    s = Settings()
    assert s.batch_size == 16  # environment over file
    assert s.batch_timeout_ms == 7  # file over default


def test_flags_override_environment_and_none_flags_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HISTOD_BATCH_SIZE", "16")
    assert load_settings(batch_size=2).batch_size == 2
    assert load_settings(batch_size=None).batch_size == 16


def test_invalid_values_are_rejected() -> None:
    from histod.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_size"):
        load_settings(batch_size=0)
    with pytest.raises(ConfigError, match="engine"):
        load_settings(engine="onnx")
