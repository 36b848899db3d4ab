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


# --- mistakes an operator makes: one `error: ...` line and exit status 2, never a traceback or silence ------
def _histod(tmp_path: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`histod results` on a database that does not exist: valid settings get as far as the database (exit 5)."""
    from click.testing import CliRunner

    from histod.cli import cli

    got = CliRunner().invoke(cli, ["results", "--db", f"sqlite:///{tmp_path / 'none.db'}"], env=env)
    return got.exit_code, got.output


def _one_error_line(code: int, out: str) -> str:
    assert code == 2, out
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


def test_valid_settings_reach_the_command(tmp_path: Path) -> None:
    (tmp_path / "histod.toml").write_text('batch_size = 4\nextensions = [".png"]\n')
    code, out = _histod(tmp_path, {"HISTOD_THREADS": "4", "HISTOD_EXTENSIONS": '[".png", ".tif"]'})
    assert code == 5 and "no results database" in out, out


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"HISTOD_EXTENSIONS": "[.png"}, ["HISTOD_EXTENSIONS", "extensions"]),
        ({"HISTOD_BATCHSIZE": "4"}, ["HISTOD_BATCHSIZE", "HISTOD_BATCH_SIZE"]),
        ({"HISTOD_TRHEADS": "4"}, ["HISTOD_TRHEADS", "HISTOD_THREADS"]),
        ({"HISTOD_CONFIG": "/nonexistent/histod.toml"}, ["/nonexistent/histod.toml", "HISTOD_CONFIG"]),
        ({"HISTOD_EXTENSIONS": "[]"}, ["extensions"]),
        ({"HISTOD_THREADS": "1000"}, ["threads", "256"]),
        ({"HISTOD_DECODE_WORKERS": "0"}, ["decode_workers"]),
        ({"HISTOD_BATCH_SIZE": "many"}, ["batch_size"]),
    ],
    ids=["list-not-json", "misspelled", "transposed", "missing-config", "no-extensions", "threads", "workers", "nan"],
)
def test_bad_environment_is_one_error_line(tmp_path: Path, env: dict[str, str], words: list[str]) -> None:
    line = _one_error_line(*_histod(tmp_path, env))
    for word in words:
        assert word in line, line


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"batch_size = \n", ["histod.toml", "line 1"]),
        (b'engine = "litert\n', ["histod.toml", "line 1"]),
        (bytes(range(256)) * 2, ["histod.toml", "UTF-8"]),
        (b"batchsize = 4\n", ["batchsize", "batch_size"]),
        (b"[histod]\nbatch_size = 4\n", ["histod"]),
        (b"extensions = []\n", ["extensions"]),
        (b"threads = 1000\n", ["threads"]),
        (b"max_pixels = 0\n", ["max_pixels"]),
    ],
    ids=["no-value", "open-string", "binary", "unknown-key", "a-table", "no-extensions", "threads", "max-pixels"],
)
def test_bad_toml_is_one_error_line(tmp_path: Path, content: bytes, words: list[str]) -> None:
    (tmp_path / "histod.toml").write_bytes(content)
    line = _one_error_line(*_histod(tmp_path))
    for word in words:
        assert word in line, line


def test_an_unknown_key_without_a_close_name_is_still_refused(tmp_path: Path) -> None:
    (tmp_path / "histod.toml").write_text("colour = 'blue'\n")
    line = _one_error_line(*_histod(tmp_path))
    assert "colour" in line and "did you mean" not in line


def test_histod_variables_that_are_not_settings_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test and benchmark knobs share the prefix; they are not settings and must not stop the service."""
    for name in ("HISTOD_FAULTS_SEED", "HISTOD_TEST_POSTGRES_URL", "HISTOD_SHARED", "HISTOD_VENV"):
        monkeypatch.setenv(name, "1")
    assert Settings().batch_size == 8


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (".png,.jpg", [".png", ".jpg"]),
        ("png, JPG", [".png", ".jpg"]),
        (".png .tif", [".png", ".tif"]),
        ('[".png", ".bmp"]', [".png", ".bmp"]),
    ],
)
def test_lists_in_the_environment_may_be_comma_or_space_separated(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("HISTOD_EXTENSIONS", value)
    assert Settings().extensions == expected


def test_ignore_patterns_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HISTOD_IGNORE_PATTERNS", ".*,*.part")
    assert Settings().ignore_patterns == [".*", "*.part"]
