"""Run the real `histod serve` inside the whole emulated histod.service sandbox, as systemd would start it.

    sudo python deploy/sandbox/serve_check.py RUN_DIR --venv /opt/histod/venv [--images 24] [--sigsys]

The sandbox is the one run_checks.py calls "all of histod.service together": fs-sandbox.sh (StateDirectory=,
ProtectSystem=strict, PrivateTmp=, ProtectHome=, PrivateDevices=, ProtectProc=invisible, PrivateNetwork=),
setpriv (User=, NoNewPrivileges=, CapabilityBoundingSet=) and seccomp_exec.py (MemoryDenyWriteExecute=,
SystemCallFilter= with SystemCallErrorNumber=EPERM, RestrictAddressFamilies=AF_UNIX, RestrictNamespaces=,
LockPersonality=, RestrictRealtime=, RestrictSUIDSGID=). Like systemd, it passes $NOTIFY_SOCKET and
$WATCHDOG_USEC and listens on the socket.

Checks, in order: READY=1 arrives; images dropped into prediction/ from outside (as an uploader would) all
reach processed/ and the database; WATCHDOG=1 keeps arriving; SIGTERM gives STOPPING=1 and exit status 0.
--sigsys kills on a filtered system call instead of EPERM (stricter than the unit), with mbind allowed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSIDE = "/var/lib/histod"
UID = 61234
SECCOMP = ["--mdwe", "--syscall-filter", "--af-unix", "--restrict-namespaces", "--lock-personality"]
SECCOMP += ["--restrict-realtime", "--restrict-suidsgid"]


def wait_for(what: str, predicate: object, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not within {deadline_s} s")


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            out.append(child)
            todo.append(child)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--venv", type=Path, default=Path("/opt/histod/venv"))
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--sigsys", action="store_true")
    args = parser.parse_args()
    python = str(args.venv / "bin/python")
    histod = str(args.venv / "bin/histod")

    work = Path(tempfile.mkdtemp(prefix="histod-serve-check-"))
    work.chmod(0o755)
    state = work / "state"
    state.mkdir()
    shutil.copytree(args.run_dir, state / "model")
    for p in [state, *state.rglob("*")]:
        os.chown(p, UID, UID)
    state.chmod(0o751)
    # systemd's socket is /run/systemd/notify; here it sits in the state folder, the one path bound in.
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(state / "notify.sock"))
    (state / "notify.sock").chmod(0o777)
    receiver.settimeout(0.2)

    seccomp = [*SECCOMP, "--allow=mbind"] if args.sigsys else [*SECCOMP, "--errno"]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": INSIDE,
        "HISTOD_DATA_DIR": INSIDE,
        "HISTOD_MODEL": f"{INSIDE}/model",
        "HISTOD_LOG_FORMAT": "json",
        "HISTOD_STABLE_MS": "200",
        "PYTHONDONTWRITEBYTECODE": "1",
        "NOTIFY_SOCKET": f"{INSIDE}/notify.sock",
        "WATCHDOG_USEC": "10000000",
    }
    inner = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--bounding-set=-all"]
    inner += ["--inh-caps=-all", "--no-new-privs", "--", python, str(HERE / "seccomp_exec.py"), *seccomp, "--"]
    inner += [histod, "serve"]
    cmd = ["unshare", "--mount", "--net", "--pid", "--fork", "--propagation", "private", "--"]
    cmd += ["sh", str(HERE / "fs-sandbox.sh"), str(state), "--", *inner]
    log = (work / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/")
    got: list[str] = []

    def drain() -> None:
        while True:
            try:
                got.append(receiver.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return

    def seen(msg: str) -> bool:
        drain()
        return msg in got

    ok = False
    try:
        wait_for("READY=1", lambda: seen("READY=1") or proc.poll() is not None, 120)
        assert "READY=1" in got, f"exited {proc.returncode} before READY=1"
        print("READY=1 received", flush=True)
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from histod.synthetic import write_images

        drop = work / "drop"
        files = write_images(drop, args.images, size=64, fmt="png")
        for f in files:  # the upload pattern: write elsewhere, rename in
            target = state / "prediction" / f.name
            shutil.move(f, target)

        def processed() -> int:
            return sum(1 for p in (state / "processed").rglob("*.png"))

        wait_for(f"{len(files)} files in processed/", lambda: processed() == len(files), 120)
        with sqlite3.connect(f"file:{state}/histod.db?mode=ro", uri=True) as db:
            rows = db.execute("SELECT count(*), sum(status = 'classified') FROM results").fetchone()
        print(f"processed/: {processed()} files; results rows: {rows[0]} (classified: {rows[1]})", flush=True)
        assert rows[0] == len(files), rows
        pings = got.count("WATCHDOG=1")
        wait_for("another WATCHDOG=1", lambda: seen("WATCHDOG=1") and got.count("WATCHDOG=1") > pings, 15)
        print(f"WATCHDOG=1 received {got.count('WATCHDOG=1')} times", flush=True)
        serve = [p for p in descendants(proc.pid) if b"serve" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert serve, "histod serve process not found"
        os.kill(serve[-1], signal.SIGTERM)
        rc = proc.wait(60)
        drain()
        print(f"after SIGTERM: exit status {rc}; STOPPING=1 received: {'STOPPING=1' in got}", flush=True)
        ok = rc == 0 and "STOPPING=1" in got
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        text = (work / "serve.log").read_text()
        print("--- serve log (last lines) ---")
        print("\n".join(text.splitlines()[-8:]))
        receiver.close()
        shutil.rmtree(work, ignore_errors=True)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
