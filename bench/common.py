"""What every benchmark shares: where the data and weights are, the machine, tables, JSON results, memory, the
``histod`` command, and a throw-away PostgreSQL server.

Real data and weights are read from ``../shared`` beside the repository (never copied into it); when they are
absent the benchmarks say so and fall back to generated tiles (histod.synthetic).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import pwd
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SHARED = Path(os.environ.get("HISTOD_SHARED", str(REPO.parent / "shared")))
IDC_DEV = SHARED / "data" / "idc-dev"
WEIGHTS_035 = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
PACKAGES = ("tensorflow", "keras", "ai-edge-litert", "numpy", "pillow", "sqlalchemy", "watchdog")


def say(message: str) -> None:
    """Progress on stderr, so that stdout holds only the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def shared_data() -> Path | None:
    """``../shared/data/idc-dev`` when it is there (benign/ and malignant/), else None (with a message)."""
    if (IDC_DEV / "benign").is_dir() and (IDC_DEV / "malignant").is_dir():
        return IDC_DEV
    say(f"NOTE: {IDC_DEV} is absent: falling back to generated tiles (histod.synthetic); figures are not comparable")
    return None


def shared_weights() -> Path | None:
    """The alpha 0.35 ImageNet base weights from ``../shared`` when present, else None (with a message)."""
    if WEIGHTS_035.is_file():
        return WEIGHTS_035
    say(f"NOTE: {WEIGHTS_035} is absent: falling back to random initial weights (--weights none)")
    return None


def synthetic_dataset(root: Path, patients: int = 40, tiles: int = 25, size: int = 50) -> Path:
    """A labelled folder of generated tiles with IDC-style names (patient-grouped split works on it)."""
    from histod.synthetic import SyntheticSpec, make_dataset

    if not (root / "benign").is_dir():
        say(f"generating {patients * tiles} synthetic tiles into {root}")
        make_dataset(root, SyntheticSpec(patients=patients, tiles_per_patient=tiles, size=size, seed=3))
    return root


def histod_command() -> list[str]:
    """The installed ``histod`` beside this Python, else ``python -m histod``."""
    exe = Path(sys.executable).with_name("histod")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "histod"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024, 0)
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """The conditions of a measurement: when, where, which versions, how busy the machine was."""
    versions: dict[str, str] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "mem_total_mb": _mem_total_mb(),
        "load_average_at_start": load_average(),
        "versions": versions,
    }


def proc_status_mb(pid: int, key: str = "VmHWM") -> float | None:
    """A memory figure of /proc/PID/status in MiB (VmHWM: peak RSS, VmRSS: current), None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def self_peak_rss_mb() -> float:
    """This process's peak RSS (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    data = sorted(values)
    k = (len(data) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 1) -> str:
    """A plain-text table, also valid as a Markdown table."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c, digits) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_result(name: str, data: dict[str, Any], results_dir: Path = RESULTS) -> Path:
    """bench/results/<name>.json (also returned)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(_clean(data), indent=2) + "\n")
    say(f"written {path}")
    return path


# --- a throw-away PostgreSQL server ------------------------------------------------------------------------------
@dataclass
class PostgresServer:
    """A server's maintenance database (``url``, SQLAlchemy form with the psycopg driver); ``folder`` is set when
    :func:`start_postgres` made the server, which :meth:`stop` then stops and removes."""

    url: str
    folder: Path | None = None
    bindir: Path | None = None
    user: str | None = None

    def stop(self) -> None:
        if self.folder is None or self.bindir is None:
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _pg([str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "stop"], self.user)
        shutil.rmtree(self.folder, ignore_errors=True)


def _pg(args: list[str], user: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=120, env=env, user=user, cwd="/")


def start_postgres(url: str | None = None) -> PostgresServer:
    """The server at ``url``; without one, a fresh server from the installed binaries (Debian:
    /usr/lib/postgresql/<v>/bin) on 127.0.0.1 at a free port, trust authentication, durability off. PostgreSQL
    refuses to run as root: as root it runs as the ``postgres`` user."""
    from sqlalchemy.engine import make_url

    if url:
        return PostgresServer(make_url(url).set(drivername="postgresql+psycopg").render_as_string(False))
    versions = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parts[4].isdigit()]
    on_path = shutil.which("initdb")
    bindir = max(versions, key=lambda b: int(b.parts[4])) if versions else (Path(on_path).parent if on_path else None)
    if bindir is None:
        raise SystemExit("no PostgreSQL binaries (install the Debian package postgresql) and no --db-url")
    user = "postgres" if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="histod-bench-pg-"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = PostgresServer(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", folder, bindir, user)
    data = folder / "data"
    options = (
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
        "-c full_page_writes=off -c max_connections=200"
    )
    try:
        _pg([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"], user)
        log = str(folder / "server.log")
        _pg([str(bindir / "pg_ctl"), "-D", str(data), "-l", log, "-w", "-t", "60", "-o", options, "start"], user)
    except (subprocess.SubprocessError, OSError) as exc:
        server.stop()
        raise SystemExit(f"could not start PostgreSQL from {bindir}: {exc}") from exc
    return server


@contextlib.contextmanager
def postgres_database(server: PostgresServer) -> Iterator[str]:
    """A new, empty database on ``server``; its URL (dropped afterwards, connections and all)."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"histod_bench_{uuid.uuid4().hex[:12]}"
    base = make_url(server.url)
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
