"""deploy/: every unit passes `systemd-analyze verify`, every service scores <= 2.0 on `security --offline`.

`verify` checks that ExecStart= binaries exist and are executable. The units name the installed path,
/opt/histod/venv/bin/histod, which does not exist on a developer's machine or in CI. Rather than rewrite the
units, the test lays out a throw-away root file system (systemd-analyze --root=): the unit files are copied in
byte for byte, the distribution's own units (sysinit.target, basic.target, ...) are copied from
/usr/lib/systemd/system so that the default dependencies resolve, and /opt/histod/venv/bin/histod is a
two-line shell script that execs this checkout's real `histod`. So verify checks the very files we ship,
and the command they name is a working histod.

sysusers.d and tmpfiles.d are checked the same way: applied to a throw-away root, then the folders' owners,
groups and modes are read back.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = sorted(p for p in DEPLOY.iterdir() if p.suffix in {".service", ".timer"})
SERVICES = [p for p in UNITS if p.suffix == ".service"]
INSTALLED_HISTOD = "/opt/histod/venv/bin/histod"
MAX_EXPOSURE = 2.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


def _analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


def _real_histod() -> Path:
    path = Path(sys.executable).parent / "histod"
    assert path.is_file(), f"histod is not installed in this environment ({path})"
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file-system root holding the distribution's units, ours in /etc/systemd/system, and histod."""
    root = tmp_path_factory.mktemp("root")
    system = root / "usr/lib/systemd/system"
    shutil.copytree("/usr/lib/systemd/system", system, symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS:
        shutil.copy2(unit, root / "etc/systemd/system" / unit.name)
    exe = root / INSTALLED_HISTOD.lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text(f'#!/bin/sh\nexec {_real_histod()} "$@"\n')
    exe.chmod(0o755)
    return root


def test_units_present() -> None:
    names = {p.name for p in UNITS}
    assert {"histod.service", "histod-report.service", "histod-report.timer"} <= names
    for unit in SERVICES:
        text = unit.read_text()
        assert f"ExecStart={INSTALLED_HISTOD} " in text, unit.name


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_verify(root: Path, unit: Path) -> None:
    result = _analyze("verify", f"--root={root}", "--man=no", "--generators=no", unit.name)
    assert result.returncode == 0, result.stderr + result.stdout
    # verify prints problems as warnings too, without always failing; any line about our unit is a finding
    ours = [line for line in (result.stderr + result.stdout).splitlines() if unit.stem in line]
    assert not ours, "\n".join(ours)


@needs_analyze
def test_verify_catches_missing_binary(root: Path, tmp_path: Path) -> None:
    """The check above has teeth: the same unit in a root without histod fails verify."""
    bare = tmp_path / "bare"
    shutil.copytree(root / "usr", bare / "usr", symlinks=True)
    (bare / "etc/systemd/system").mkdir(parents=True)
    shutil.copy2(DEPLOY / "histod.service", bare / "etc/systemd/system/histod.service")
    result = _analyze("verify", f"--root={bare}", "--man=no", "--generators=no", "histod.service")
    assert result.returncode != 0
    assert "is not executable" in result.stderr


def _exposure(output: str, unit: str) -> float:
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+(?:\.\d+)?)", output)
    assert match, output[-2000:]
    return float(match.group(1))


@needs_analyze
@pytest.mark.parametrize("unit", SERVICES, ids=lambda p: p.name)
def test_security_exposure(unit: Path) -> None:
    # --offline reads the file only; run from deploy/ with a relative name, as the docs show it.
    result = _analyze("security", "--offline=true", "--no-pager", unit.name, cwd=DEPLOY)
    score = _exposure(result.stdout + result.stderr, unit.name)
    assert score <= MAX_EXPOSURE, f"{unit.name}: exposure {score} > {MAX_EXPOSURE}\n{result.stdout}"


@needs_analyze
def test_security_parser_sees_a_bare_unit_as_unsafe(tmp_path: Path) -> None:
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    result = _analyze("security", "--offline=true", "--no-pager", bare.name, cwd=tmp_path)
    assert _exposure(result.stdout + result.stderr, bare.name) > MAX_EXPOSURE


def test_service_essentials() -> None:
    """The settings the service relies on are there, spelled as systemd reads them."""
    text = (DEPLOY / "histod.service").read_text()
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "Restart=on-failure",
        "EnvironmentFile=-/etc/histod/histod.env",
        "StateDirectory=histod",
        "User=histod",
        "MemoryDenyWriteExecute=yes",
        "ProtectSystem=strict",
        # loopback only: the metrics port and a local PostgreSQL
        "IPAddressAllow=localhost",
        "IPAddressDeny=any",
        # priorities reach the journal: a line's <N> prefix (histod.logs)
        "StandardError=journal",
        "SyslogLevelPrefix=yes",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^RestrictAddressFamilies=.*\bAF_INET\b", text, re.M)
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    # Findings from running the runtime under the sandbox (docs/deploy.md): NumPy's OpenBLAS calls mbind(),
    # which ~@resources denies: without EPERM (or mbind allowed) histod dies of SIGSYS at start; and
    # ProcSubset=pid hides /proc/cpuinfo, which silently turns XNNPACK off.
    assert re.search(r"^SystemCallErrorNumber=EPERM$", text, re.M) or re.search(
        r"^SystemCallFilter=.*\bmbind\b", text, re.M
    )
    assert not re.search(r"^ProcSubset=pid", text, re.M)
    assert re.search(r"^TimeoutStopSec=\d+", text, re.M)


SYSUSERS = shutil.which("systemd-sysusers")
TMPFILES = shutil.which("systemd-tmpfiles")


@pytest.mark.skipif(SYSUSERS is None or TMPFILES is None, reason="systemd-sysusers/tmpfiles not installed")
def test_sysusers_and_tmpfiles(tmp_path: Path) -> None:
    assert SYSUSERS is not None and TMPFILES is not None
    (tmp_path / "usr/lib/sysusers.d").mkdir(parents=True)
    (tmp_path / "usr/lib/tmpfiles.d").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    shutil.copy2(DEPLOY / "sysusers.d/histod.conf", tmp_path / "usr/lib/sysusers.d/histod.conf")
    shutil.copy2(DEPLOY / "tmpfiles.d/histod.conf", tmp_path / "usr/lib/tmpfiles.d/histod.conf")
    for tool in (SYSUSERS, TMPFILES):
        args = [tool, f"--root={tmp_path}"] + (["--create"] if tool == TMPFILES else [])
        result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0 and "Operation not permitted" in result.stderr:
            pytest.skip(f"{Path(tool).name} needs root to chown in a foreign root: {result.stderr.strip()}")
        assert result.returncode == 0, result.stderr

    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()}
    assert users["histod"][5] == "/var/lib/histod"
    assert users["histod"][6].endswith("nologin")
    assert "histod" in groups["histod-upload"][3].split(",")
    uid, gid, upload_gid = int(users["histod"][2]), int(groups["histod"][2]), int(groups["histod-upload"][2])

    def owner(rel: str) -> tuple[int, int, int]:
        st = (tmp_path / rel).stat()
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    assert owner("var/lib/histod") == (uid, gid, 0o751)
    assert owner("var/lib/histod/prediction") == (uid, upload_gid, 0o2770)
    for sub in ("processed", "failed", "reports"):
        assert owner(f"var/lib/histod/{sub}") == (uid, gid, 0o2750)
    assert owner("etc/histod") == (0, gid, 0o750)


def _env_file(text: str, uncomment: bool) -> dict[str, str]:
    """KEY=value lines as systemd's EnvironmentFile= reads them (one level of single or double quotes)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if uncomment and re.match(r"^#HISTOD_[A-Z_]+=", line):
            line = line[1:]
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


def test_env_example_documents_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from histod.settings import Settings, load_settings

    text = (DEPLOY / "histod.env.example").read_text()
    assert _env_file(text, uncomment=False) == {}, "the example must set nothing until uncommented"
    values = _env_file(text, uncomment=True)
    expected = {f"HISTOD_{name.upper()}" for name in Settings.model_fields} | {"HISTOD_CONFIG"}
    assert set(values) == expected

    # Uncommented, every line parses, and the documented values are the defaults (or the unit's own values).
    for key in list(os.environ):
        if key.startswith("HISTOD_"):
            monkeypatch.delenv(key)
    for key, value in values.items():
        if key != "HISTOD_CONFIG":
            monkeypatch.setenv(key, value)
    settings = load_settings()
    defaults = Settings.model_construct()
    unit_values = {"data_dir", "watch_dir", "database_url", "model", "log_format", "host", "worker_id"}
    for name in Settings.model_fields:
        if name not in unit_values:
            assert getattr(settings, name) == getattr(defaults, name), name
    unit = (DEPLOY / "histod.service").read_text()
    assert f"Environment=HISTOD_DATA_DIR={settings.data_dir}" in unit
    assert f"Environment=HISTOD_MODEL={settings.model}" in unit
    assert f"Environment=HISTOD_LOG_FORMAT={settings.log_format}" in unit
    assert settings.resolved_watch_dir == settings.data_dir / "prediction"
    assert settings.resolved_database_url == f"sqlite:///{settings.data_dir / 'histod.db'}"
