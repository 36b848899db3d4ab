"""Several `histod serve` processes on one watch folder and one PostgreSQL database: throughput for 1..N workers.

    .venv/bin/python bench/serve_workers.py --run RUN_DIR [--workers 3 --files 2000 --repeats 3 --db-url URL]

For each worker count (1, 2, ..., N; or the list given, e.g. ``--workers 1,3``), ``--repeats`` times: a fresh
database on the server, N services started on one fresh data folder (``HISTOD_DATABASE_URL`` = that database,
JSON logs, defaults otherwise), all READY (by their ``service.ready`` log line), then ``--files`` distinct 50x50
PNGs from ``../shared/data/idc-dev`` (generated tiles when absent) written into the watch folder as fast as one
writer can (open, write, close). Throughput = files / (first file closed -> the last file's successful move row
seen in the database; polled every 20 ms). A SQLite run of one service on the same files is the baseline (claims
are used only with PostgreSQL, so it shows their cost too).

CPU: utime + stime from /proc/PID/stat of every service, of the PostgreSQL server (the postmaster and its
children: one backend per connection) and of this process (the writer and poller), between the first drop and
the end; divided by the wall time it is the number of cores each kept busy. The load average at the start and
end of every run is recorded: another job on the machine (a training run) shows there.

The server is ``--db-url`` (a maintenance database whose user may create databases), else a throw-away one
started from the installed binaries (``bench.common.start_postgres``: fsync off). Writes
bench/results/serve-workers.json (or --name).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    histod_command,
    load_average,
    machine,
    postgres_database,
    say,
    start_postgres,
    table,
    write_result,
)
from bench.drops import Drop, drop_files, make_sets

TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15 of stat)


def _children(parent: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent:
                out.append(int(entry.name))
    return out


def _postmaster(folder: Path | None) -> int | None:
    if folder is None:
        return None
    pidfile = folder / "data" / "postmaster.pid"
    return int(pidfile.read_text().split()[0]) if pidfile.exists() else None


class _Cpu:
    """CPU seconds of the services, the database server and this process since :meth:`start`."""

    def __init__(self, services: list[int], postmaster: int | None) -> None:
        self.services = services
        self.postmaster = postmaster

    def _server(self) -> dict[int, float]:
        if self.postmaster is None:
            return {}
        return {p: _cpu_s(p) for p in [self.postmaster, *_children(self.postmaster)]}

    def _self(self) -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.s0 = {p: _cpu_s(p) for p in self.services}
        self.db0 = self._server()
        self.me0 = self._self()

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        services = [_cpu_s(p) - self.s0[p] for p in self.services]
        db1 = self._server()
        server = sum(v - self.db0.get(p, 0.0) for p, v in db1.items())  # a backend started since counts whole
        me = self._self() - self.me0
        return {
            "wall_s": round(wall, 3),
            "service_cpu_s": [round(c, 2) for c in services],
            "service_cores": [round(c / wall, 2) for c in services],
            "database_cores": round(server / wall, 2) if self.postmaster is not None else None,
            "writer_cores": round(me / wall, 2),
            "total_cores": round((sum(services) + server + me) / wall, 2),
        }


def _moved(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(DISTINCT result_id) FROM moves WHERE ok").fetchone()
    return int(row[0]) if row else 0


def _moved_sqlite(path: Path) -> int:
    import sqlite3

    if not path.exists():
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        try:
            return int(conn.execute("SELECT count(DISTINCT result_id) FROM moves WHERE ok").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def one_run(run_dir: Path, drops: list[Drop], workers: int, url: str | None, pg_folder: Path | None) -> dict[str, Any]:
    """``workers`` services on a fresh folder (and database, ``url``; None: SQLite); files/s and CPU."""
    work = Path(tempfile.mkdtemp(prefix="histod-bench-workers-"))
    data = work / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HISTOD_") and k != "NOTIFY_SOCKET"}
    env.update({"HISTOD_DATA_DIR": str(data), "HISTOD_MODEL": str(run_dir), "HISTOD_LOG_FORMAT": "json"})
    if url is not None:
        env["HISTOD_DATABASE_URL"] = url
    procs: list[subprocess.Popen[bytes]] = []
    logs = [work / f"w{k}.log" for k in range(workers)]
    load_start = load_average()
    try:
        for k, log in enumerate(logs):
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [*histod_command(), "serve"],
                        env={**env, "HISTOD_WORKER_ID": f"w{k}"},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=work,
                    )
                )
        deadline = time.monotonic() + 120
        while not all('"service.ready"' in log.read_text(errors="replace") for log in logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"a service did not get ready; log tail:\n{logs[0].read_text()[-2000:]}")
            time.sleep(0.05)
        pg_url = None if url is None else url.replace("postgresql+psycopg://", "postgresql://")
        cpu = _Cpu([p.pid for p in procs], _postmaster(pg_folder) if url is not None else None)
        cpu.start()
        closed = drop_files(data / "prediction", drops, None)
        while True:
            done = _moved(pg_url) if pg_url is not None else _moved_sqlite(data / "histod.db")
            if done >= len(drops):
                break
            if time.monotonic() - cpu.t0 > 600:
                raise SystemExit(f"only {done} of {len(drops)} files done after 600 s")
            time.sleep(0.02)
        end = time.time()
        usage = cpu.stop()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)
    span = end - min(closed.values())
    return {
        "workers": workers,
        "database": "sqlite" if url is None else "postgresql",
        "files": len(drops),
        "seconds": round(span, 3),
        "files_per_s": round(len(drops) / span, 1),
        "drop_seconds": round(max(closed.values()) - min(closed.values()), 3),
        **usage,
        "load_average_at_start": load_start,
        "load_average_at_end": load_average(),
    }


def run(run_dir: Path, counts: list[int], files: int, repeats: int, db_url: str | None, name: str) -> int:
    conditions = machine()
    drops = make_sets(0, files, 0, seed=0)[0]["png50"]
    server = start_postgres(db_url)
    runs: list[dict[str, Any]] = []
    try:
        for repeat in range(repeats):
            say(f"round {repeat + 1}/{repeats}: SQLite, 1 service")
            runs.append(one_run(run_dir, drops, 1, None, None))
            for n in counts:
                with postgres_database(server) as url:
                    say(f"round {repeat + 1}/{repeats}: PostgreSQL, {n} service(s)")
                    runs.append(one_run(run_dir, drops, n, url, server.folder))
                say(f"  {runs[-1]['files_per_s']} files/s, cores {runs[-1]['total_cores']}")
    finally:
        server.stop()
    rows = []
    summary = []
    for database, n in [("sqlite", 1), *[("postgresql", n) for n in counts]]:
        mine = [r for r in runs if r["database"] == database and r["workers"] == n]
        rates = [r["files_per_s"] for r in mine]
        best = max(mine, key=lambda r: r["files_per_s"])
        entry = {
            "database": database,
            "workers": n,
            "files_per_s_median": round(statistics.median(rates), 1),
            "files_per_s_all": rates,
            "service_cores_median": round(statistics.median(sum(r["service_cores"]) for r in mine), 2),
            "database_cores_median": None
            if database == "sqlite"
            else round(statistics.median(r["database_cores"] for r in mine), 2),
            "total_cores_median": round(statistics.median(r["total_cores"] for r in mine), 2),
            "per_service_cores_of_fastest": best["service_cores"],
        }
        summary.append(entry)
        rows.append(
            [
                database,
                n,
                entry["files_per_s_median"],
                "/".join(f"{v:.0f}" for v in rates),
                entry["service_cores_median"],
                entry["database_cores_median"] if entry["database_cores_median"] is not None else "-",
                entry["total_cores_median"],
            ]
        )
    print(table(["database", "workers", "files/s (median)", "each round", "services cores", "db cores", "all"], rows))
    print(
        f"nproc {conditions['nproc']}, load average at start {conditions['load_average_at_start']}, at end "
        f"{load_average()}"
    )
    write_result(
        name,
        {
            "benchmark": "serve --workers",
            "conditions": {**conditions, "load_average_at_end": load_average()},
            "run": str(run_dir),
            "files_per_run": files,
            "repeats": repeats,
            "method": __doc__,
            "summary": summary,
            "runs": runs,
        },
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="RUN_DIR written by `histod train`")
    parser.add_argument("--workers", default="3", help="N (1..N services) or a list such as 1,3 (default 3)")
    parser.add_argument("--files", type=int, default=2000, help="50x50 PNGs per run (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every worker count (default 3)")
    parser.add_argument("--db-url", default=None, help="a PostgreSQL server (default: a throw-away one)")
    parser.add_argument("--name", default="serve-workers", help="results file name (default serve-workers)")
    args = parser.parse_args(argv)
    spec = str(args.workers)
    counts = [int(v) for v in spec.split(",")] if "," in spec else list(range(1, int(spec) + 1))
    return run(args.run.resolve(), counts, args.files, args.repeats, args.db_url, args.name)


if __name__ == "__main__":
    raise SystemExit(main())
