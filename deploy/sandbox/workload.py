"""Exercise what `histod serve` does at run time, to learn which sandbox restrictions the runtime tolerates.

Run by deploy/sandbox/run_checks.py inside an emulated systemd sandbox (or by hand under `systemd-run -p ...`
on a real systemd host). Each step prints one JSON line {"step": ..., "ok": ...}; the exit status is 0 only
when every required step worked. Steps, in the order the service meets them:

settings (pydantic-settings reads HISTOD_*), database (SQLAlchemy + Alembic migrations on a SQLite file in
WAL mode, one insert), litert (histod.litert, the service's runner: ai-edge-litert with XNNPACK, 2 threads, a
batch of Pillow-decoded PNG/JPEG files, decoded in a thread pool), watch (a watchdog inotify observer sees a file
appear), notify (READY=1 / WATCHDOG=1 / STOPPING=1 to $NOTIFY_SOCKET), and two probes that are reported but not
required:
wx_mmap (can the process map memory writable and executable? MemoryDenyWriteExecute= says no) and
ctypes_callback (a libffi closure, the usual victim of W^X policies).

Usage: python workload.py MODEL.tflite   (with HISTOD_DATA_DIR pointing at a writable folder)
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RESULTS: list[dict[str, Any]] = []


def step(name: str, required: bool = True) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            started = time.monotonic()
            try:
                detail = fn()
                ok = True
            except BaseException as exc:
                detail = f"{type(exc).__name__}: {exc}"
                ok = False
                traceback.print_exc(file=sys.stderr)
            line = {"step": name, "ok": ok, "required": required, "s": round(time.monotonic() - started, 3)}
            line["detail"] = detail
            RESULTS.append(line)
            print(json.dumps(line, default=str), flush=True)
            return detail

        return run

    return wrap


def main() -> int:
    model = Path(sys.argv[1])

    @step("settings")
    def settings() -> Any:
        from histod.settings import load_settings

        s = load_settings()
        return {"data_dir": str(s.data_dir), "db": s.resolved_database_url, "cpus": os.cpu_count()}

    @step("database")
    def database() -> Any:
        from sqlalchemy import text

        from histod.db.session import open_database, transaction
        from histod.settings import load_settings

        factory = open_database(load_settings().resolved_database_url, migrate=True)
        with transaction(factory) as session:
            mode = session.execute(text("PRAGMA journal_mode")).scalar()
            session.execute(text("CREATE TABLE IF NOT EXISTS sandbox_probe (t REAL)"))
            session.execute(text("INSERT INTO sandbox_probe VALUES (:t)"), {"t": time.time()})
        return {"journal_mode": mode}

    @step("litert")
    def litert() -> Any:
        import numpy as np

        from histod.imaging import load
        from histod.litert import LiteRTModel
        from histod.synthetic import write_images

        folder = Path(os.environ.get("HISTOD_DATA_DIR", ".")) / "sandbox-images"
        files = write_images(folder, 4, size=64, fmt="png") + write_images(folder, 4, size=64, seed=2, fmt="jpg")
        runner = LiteRTModel(model, threads=2)
        with ThreadPoolExecutor(2) as pool:
            batch = np.stack(list(pool.map(lambda p: load(p, runner.image_size), files)))
        p = runner.predict(batch)
        assert p.shape == (len(files),), p.shape
        assert np.all((p >= 0) & (p <= 1)), p
        return {"batch": len(files), "p": [round(float(v), 4) for v in p]}

    @step("watch")
    def watch() -> Any:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        folder = Path(os.environ.get("HISTOD_DATA_DIR", ".")) / "prediction"
        folder.mkdir(parents=True, exist_ok=True)
        seen = threading.Event()

        class Handler(FileSystemEventHandler):
            def on_closed(self, event: FileSystemEvent) -> None:
                seen.set()

        observer = Observer()
        observer.schedule(Handler(), str(folder))
        observer.start()
        try:
            (folder / "probe.png").write_bytes(b"x")
            if not seen.wait(10):
                raise TimeoutError("no close-write event within 10 s")
        finally:
            observer.stop()
            observer.join(5)
        return {"observer": type(observer).__name__}

    @step("notify")
    def notify() -> Any:
        from histod.daemon.notify import notify as send

        if not os.environ.get("NOTIFY_SOCKET"):
            return "no NOTIFY_SOCKET: skipped"
        sent = [send(s) for s in ("READY=1", "WATCHDOG=1", "STOPPING=1")]
        assert all(sent), sent
        return "READY=1 WATCHDOG=1 STOPPING=1 sent"

    @step("wx_mmap", required=False)
    def wx_mmap() -> Any:
        try:
            m = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except OSError as exc:
            return f"denied ({exc.strerror})"
        m.close()
        return "allowed"

    @step("ctypes_callback", required=False)
    def ctypes_callback() -> Any:
        libc = ctypes.CDLL(None)
        cmp_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
        values = (ctypes.c_int * 5)(5, 1, 4, 2, 3)
        libc.qsort(values, 5, ctypes.sizeof(ctypes.c_int), cmp_type(lambda a, b: a[0] - b[0]))
        assert list(values) == [1, 2, 3, 4, 5]
        return "libffi closure called"

    for fn in (settings, database, litert, watch, notify, wx_mmap, ctypes_callback):
        fn()
    failed = [r["step"] for r in RESULTS if r["required"] and not r["ok"]]
    print(json.dumps({"summary": "ok" if not failed else "failed", "failed": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
