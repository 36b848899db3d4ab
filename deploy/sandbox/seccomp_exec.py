"""Load seccomp filters equivalent to systemd 252's, then exec a command: an emulation for hosts without systemd.

    python seccomp_exec.py [--mdwe] [--syscall-filter] [--errno] [--af-unix] [--restrict-namespaces]
                           [--lock-personality] [--restrict-realtime] [--restrict-suidsgid] -- COMMAND...

Each option installs the same rules systemd installs for the unit setting (src/shared/seccomp-util.c):

--mdwe                 MemoryDenyWriteExecute=yes: EPERM for mmap() with PROT_WRITE|PROT_EXEC, mprotect() and
                       pkey_mprotect() adding PROT_EXEC, shmat() with SHM_EXEC.
--syscall-filter       SystemCallFilter=@system-service + SystemCallFilter=~@privileged @resources, an allow
                       list; the group contents come from `systemd-analyze syscall-filter` on this host. Any
                       other call kills the process with SIGSYS, as systemd does without SystemCallErrorNumber=
                       (--errno: fail it with EPERM instead, as SystemCallErrorNumber=EPERM does).
                       Non-native architectures are refused too (SystemCallArchitectures=native).
--allow=NAME           with --syscall-filter: allow NAME too (like a later SystemCallFilter=NAME line).
--af-unix              RestrictAddressFamilies=AF_UNIX: socket() with another family fails with EAFNOSUPPORT.
--restrict-namespaces  RestrictNamespaces=yes: unshare()/setns() and clone() with namespace flags fail with
                       EPERM, clone3() with ENOSYS (so that glibc falls back to clone()).
--lock-personality     LockPersonality=yes: personality() other than PER_LINUX fails with EPERM.
--restrict-realtime    RestrictRealtime=yes: sched_setscheduler() to SCHED_FIFO/RR/DEADLINE fails with EPERM.
--restrict-suidsgid    RestrictSUIDSGID=yes: chmod()/fchmod()/fchmodat() setting S_ISUID/S_ISGID fail with EPERM.

It sets no_new_privs first (NoNewPrivileges=yes; also what lets an unprivileged process load filters).
Uses libseccomp through ctypes: no package to install. Linux x86-64/aarch64 only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import subprocess
import sys

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE, SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ = 1, 4, 7
PR_SET_NO_NEW_PRIVS = 38
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
NAMESPACE_FLAGS = 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x00020000 | 0x00000080
# CLONE_NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWNS, NEWTIME
S_ISUID, S_ISGID = 0o4000, 0o2000


def act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


_name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
lib = ctypes.CDLL(_name, use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
lib.seccomp_release.argtypes = [ctypes.c_void_p]


class Filter:
    def __init__(self, default: int) -> None:
        self.ctx = lib.seccomp_init(default)
        if not self.ctx:
            raise OSError("seccomp_init failed")

    def rule(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> bool:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return False  # unknown to libseccomp on this arch (systemd skips those too)
        arr = (ArgCmp * max(1, len(cmps)))(*[ArgCmp(*c) for c in cmps])
        rc = lib.seccomp_rule_add_array(self.ctx, action, nr, len(cmps), arr if cmps else None)
        if rc < 0:
            raise OSError(-rc, f"seccomp_rule_add({name}): {os.strerror(-rc)}")
        return True

    def load(self) -> None:
        rc = lib.seccomp_load(self.ctx)
        lib.seccomp_release(self.ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


def expand(group: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a systemd group (e.g. @system-service), nested groups included."""
    seen = set() if seen is None else seen
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager", group], capture_output=True, text=True)
    out.check_returncode()
    names: set[str] = set()
    for raw in out.stdout.splitlines()[1:]:
        item = raw.strip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("@"):
            if item not in seen:
                seen.add(item)
                names |= expand(item, seen)
        else:
            names.add(item)
    return names


def allowed_syscalls() -> set[str]:
    return (expand("@system-service") | expand("@default")) - expand("@privileged") - expand("@resources")


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    opts, command = set(argv[:split]), argv[split + 1 :]
    # Compute everything that needs a subprocess before any filter is in place.
    allow = allowed_syscalls() if "--syscall-filter" in opts else set()
    allow |= {o.split("=", 1)[1] for o in opts if o.startswith("--allow=")}

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    eperm = act_errno(errno.EPERM)

    if "--mdwe" in opts:
        f = Filter(SCMP_ACT_ALLOW)
        f.rule(eperm, "mmap", (2, SCMP_CMP_MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC))
        f.rule(eperm, "mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.rule(eperm, "pkey_mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.rule(eperm, "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        f.load()
    if "--af-unix" in opts:
        f = Filter(SCMP_ACT_ALLOW)
        f.rule(act_errno(errno.EAFNOSUPPORT), "socket", (0, SCMP_CMP_NE, 1, 0))  # AF_UNIX == 1
        f.load()
    if "--restrict-namespaces" in opts:
        f = Filter(SCMP_ACT_ALLOW)
        f.rule(eperm, "setns")
        for bit in (1 << i for i in range(32) if NAMESPACE_FLAGS & (1 << i)):
            f.rule(eperm, "unshare", (0, SCMP_CMP_MASKED_EQ, bit, bit))
            f.rule(eperm, "clone", (0, SCMP_CMP_MASKED_EQ, bit, bit))
        f.rule(act_errno(errno.ENOSYS), "clone3")
        f.load()
    if "--lock-personality" in opts:
        f = Filter(SCMP_ACT_ALLOW)
        f.rule(eperm, "personality", (0, SCMP_CMP_NE, 0, 0))  # PER_LINUX
        f.load()
    if "--restrict-realtime" in opts:
        f = Filter(SCMP_ACT_ALLOW)
        for policy in (1, 2, 6):  # SCHED_FIFO, SCHED_RR, SCHED_DEADLINE
            f.rule(eperm, "sched_setscheduler", (1, SCMP_CMP_EQ, policy, 0))
        f.load()
    if "--restrict-suidsgid" in opts:
        f = Filter(SCMP_ACT_ALLOW)
        for bit in (S_ISUID, S_ISGID):
            f.rule(eperm, "chmod", (1, SCMP_CMP_MASKED_EQ, bit, bit))
            f.rule(eperm, "fchmod", (1, SCMP_CMP_MASKED_EQ, bit, bit))
            f.rule(eperm, "fchmodat", (2, SCMP_CMP_MASKED_EQ, bit, bit))
        f.load()
    # Last, as systemd does: the allow list does not include seccomp() itself.
    if "--syscall-filter" in opts:
        f = Filter(eperm if "--errno" in opts else SCMP_ACT_KILL_PROCESS)
        for name in sorted(allow):
            f.rule(SCMP_ACT_ALLOW, name)
        f.load()
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
