"""Opt-in: the units under a real systemd 252 booted in namespaces (deploy/sandbox/systemd-e2e.sh).

Runs only with HISTOD_TEST_SYSTEMD=1, as root, with /opt/histod/venv (histod installed) and a RUN_DIR in
/opt/histod/model: it boots systemd as PID 1 of new namespaces and takes about 30 s. Not part of the default
suite because it needs that installation and CAP_SYS_ADMIN; docs/deploy.md shows its output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "deploy/sandbox/systemd-e2e.sh"


def _why_not() -> str | None:
    if os.environ.get("HISTOD_TEST_SYSTEMD") != "1":
        return "set HISTOD_TEST_SYSTEMD=1 to boot a real systemd in namespaces"
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("unshare", "nsenter", "setpriv", "sqlite3", "jq", "systemd-sysusers"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/lib/systemd/systemd").exists():
        return "systemd is not installed"
    if not Path("/opt/histod/venv/bin/histod").exists() or not Path("/opt/histod/model/model.tflite").exists():
        return "needs /opt/histod/venv with histod and a RUN_DIR in /opt/histod/model"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")
def test_units_under_real_systemd() -> None:
    result = subprocess.run(["sh", str(SCRIPT)], capture_output=True, text=True, timeout=600, check=False)
    print(result.stdout[-6000:], result.stderr[-2000:])
    assert result.returncode == 0
    assert "ALL OK" in result.stdout
