"""Run deploy/sandbox/workload.py under each of histod.service's restrictions, alone and all together.

    sudo python deploy/sandbox/run_checks.py MODEL.tflite [--python PYTHON] [--uid 61234]

For hosts where the unit cannot simply be started (this was written in a container without systemd as PID 1):
the restrictions are reproduced with the kernel features systemd itself uses: namespaces and mounts
(fs-sandbox.sh, under `unshare`), a dropped user with no capabilities and no_new_privs (`setpriv`), and
seccomp filters equivalent to systemd 252's (seccomp_exec.py, libseccomp through ctypes). On a host with
systemd, prefer the real thing: `systemd-run --wait -p ... python workload.py MODEL` (see docs/deploy.md).

Prints one row per configuration: exit status, steps that failed, whether W+X memory was refused, and the
notify messages received; exits non-zero when a configuration the unit uses fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSIDE_STATE = "/var/lib/histod"

SECCOMP_MISC = [
    "--af-unix",
    "--restrict-namespaces",
    "--lock-personality",
    "--restrict-realtime",
    "--restrict-suidsgid",
]


@dataclass
class Config:
    name: str
    seccomp: list[str] = field(default_factory=list)
    namespaces: bool = False
    user: bool = False
    used_by_unit: bool = True
    proc_subset_pid: bool = False


CONFIGS = [
    Config("no restriction (root, host view)", used_by_unit=False),
    Config("User= (uid without passwd entry), NoNewPrivileges=yes, CapabilityBoundingSet=", user=True),
    Config(
        "ProtectSystem=strict ProtectHome PrivateTmp PrivateDevices ProtectProc=invisible "
        "ProtectKernelTunables ProtectControlGroups PrivateNetwork StateDirectory",
        namespaces=True,
    ),
    Config(
        "... plus ProcSubset=pid (not in the unit: hides /proc/cpuinfo)",
        namespaces=True,
        proc_subset_pid=True,
        used_by_unit=False,
    ),
    Config("MemoryDenyWriteExecute=yes", seccomp=["--mdwe"]),
    Config(
        "SystemCallFilter=@system-service ~@privileged @resources (SIGSYS on violation)",
        ["--syscall-filter"],
        used_by_unit=False,
    ),
    Config("SystemCallFilter=... with SystemCallErrorNumber=EPERM (as in the unit)", ["--syscall-filter", "--errno"]),
    Config(
        "RestrictAddressFamilies=AF_UNIX RestrictNamespaces LockPersonality RestrictRealtime RestrictSUIDSGID",
        SECCOMP_MISC,
    ),
    Config(
        "all of histod.service together",
        ["--mdwe", "--syscall-filter", "--errno", *SECCOMP_MISC],
        namespaces=True,
        user=True,
    ),
    Config(
        "all together, SIGSYS on a filtered call (stricter than the unit)",
        ["--mdwe", "--syscall-filter", *SECCOMP_MISC],
        namespaces=True,
        user=True,
        used_by_unit=False,
    ),
    Config(
        "all together, SIGSYS on a filtered call, but mbind allowed (SystemCallFilter=mbind)",
        ["--mdwe", "--syscall-filter", "--allow=mbind", *SECCOMP_MISC],
        namespaces=True,
        user=True,
        used_by_unit=False,
    ),
]


def run(cfg: Config, python: str, model: Path, uid: int, workdir: Path) -> dict[str, object]:
    state = Path(tempfile.mkdtemp(prefix="state-", dir=workdir))
    shutil.copy2(model, state / "model.tflite")
    os.chown(state, uid, uid) if (cfg.user or cfg.namespaces) else None
    for p in state.iterdir():
        os.chown(p, uid, uid)
    state.chmod(0o751)
    visible_state = INSIDE_STATE if cfg.namespaces else str(state)

    sock_path = state / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(sock_path))
    sock_path.chmod(0o777)
    receiver.setblocking(False)

    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": visible_state,
        "HISTOD_DATA_DIR": visible_state,
        "HISTOD_LOG_FORMAT": "json",
        "PYTHONDONTWRITEBYTECODE": "1",
        "NOTIFY_SOCKET": f"{visible_state}/notify.sock",
    }
    cmd = [python, str(HERE / "workload.py"), f"{visible_state}/model.tflite"]
    if cfg.seccomp:
        cmd = [python, str(HERE / "seccomp_exec.py"), *cfg.seccomp, "--", *cmd]
    if cfg.user:
        cmd = [
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--", *cmd,
        ]  # fmt: skip
    if cfg.namespaces:
        cmd = [
            "unshare", "--mount", "--net", "--pid", "--fork", "--propagation", "private", "--",
            "sh", str(HERE / "fs-sandbox.sh"), str(state), "--", *cmd,
        ]  # fmt: skip
    if cfg.proc_subset_pid:
        env["SANDBOX_PROC_SUBSET"] = "pid"  # read by fs-sandbox.sh before it execs the workload
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd="/", check=False)
    steps = {}
    for line in proc.stdout.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if "step" in item:
            steps[item["step"]] = item
    messages = []
    while True:
        try:
            messages.append(receiver.recv(4096).decode())
        except BlockingIOError:
            break
    receiver.close()
    rc = proc.returncode
    status = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
    if rc > 128 and rc - 128 in {s.value for s in signal.Signals}:
        status += f" ({signal.Signals(rc - 128).name}?)"
    failed = [k for k, v in steps.items() if v["required"] and not v["ok"]]
    return {
        "config": cfg.name,
        "used_by_unit": cfg.used_by_unit,
        "status": status,
        "ok": rc == 0 and not failed,
        "failed_steps": {k: steps[k]["detail"] for k in failed},
        "wx_mmap": steps.get("wx_mmap", {}).get("detail"),
        "ctypes_callback": steps.get("ctypes_callback", {}).get("detail"),
        "notify": messages,
        "xnnpack": "XNNPACK delegate" in proc.stderr,
        "stderr_tail": proc.stderr.strip().splitlines()[-3:] if rc != 0 or failed else [],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--uid", type=int, default=61234, help="unprivileged uid/gid to run as (no passwd entry)")
    parser.add_argument("--json", action="store_true", help="one JSON object per configuration")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (namespaces, mounts, setpriv)")
    workdir = Path(tempfile.mkdtemp(prefix="histod-sandbox-"))
    workdir.chmod(0o755)
    bad = 0
    try:
        for cfg in CONFIGS:
            row = run(cfg, args.python, args.model.resolve(), args.uid, workdir)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                mark = "PASS" if row["ok"] else "FAIL"
                notes = " ".join(row["notify"]) or "-"  # type: ignore[arg-type]
                print(f"{mark}  {row['config']}")
                print(f"      {row['status']}; W+X mmap: {row['wx_mmap']}; XNNPACK: {row['xnnpack']}")
                print(f"      ctypes callback: {row['ctypes_callback']}; notify: {notes}")
                if not row["ok"]:
                    print(f"      failed: {row['failed_steps']} {row['stderr_tail']}")
            bad += int(not row["ok"] and cfg.used_by_unit)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
