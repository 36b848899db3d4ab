"""The migrations ship in the wheel and run from an installed copy, away from the repository."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_wheel_migrates_an_empty_database(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("histod-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "histod/db/migrations/env.py" in names
    assert any(n.startswith("histod/db/migrations/versions/0001") for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    code = (
        "import histod.db, sys\n"
        "from histod.db.session import open_database\n"
        "from histod.db.migrations import SCRIPT_LOCATION, current_revision, head_revision\n"
        f"f = open_database('sqlite:///{tmp_path / 'x.db'}')\n"
        "assert current_revision(f.kw['bind']) == head_revision()\n"
        "print(SCRIPT_LOCATION)\n"
    )
    # -S: no site processing, so no editable finder; third-party packages come from the venv's purelib.
    env = {"PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}"}
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(target / "histod" / "db" / "migrations")
