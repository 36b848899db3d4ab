"""What every benchmark shares: where the data and weights are, the machine, tables, JSON results, memory.

Real data and weights are read from ``../shared`` beside the repository (never copied into it); when they are
absent the benchmarks say so and fall back to generated tiles (histod.synthetic).
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import socket
import sys
import time
from collections.abc import Sequence
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
