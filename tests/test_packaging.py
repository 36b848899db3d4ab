"""The wheel maps trainer/, daemon/ and db/ into the histod namespace and ships py.typed and migrations."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        cwd=out,
    )
    (found,) = out.glob("histod-*.whl")
    return found


def test_wheel_holds_the_namespace_and_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "histod/__init__.py",
        "histod/py.typed",
        "histod/cli.py",
        "histod/trainer/__init__.py",
        "histod/daemon/__init__.py",
        "histod/db/__init__.py",
        "histod/db/migrations/__init__.py",
    ):
        assert expected in names, expected
    assert not any(n.startswith(("trainer/", "daemon/", "db/", "tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "histod = histod.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_imports_from_outside_the_repo(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    # -S: no site-packages and so no editable finder; only the installed copy can answer.
    code = "import histod.trainer, histod.daemon, histod.db; print(histod.trainer.__file__)"
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == str(target / "histod" / "trainer" / "__init__.py")
