#!/bin/sh
# Emulate histod.service's file-system view, for hosts where the unit cannot be started (a container
# without systemd as PID 1). Run as root inside fresh namespaces, as run_checks.py does:
#
#   unshare --mount --net --pid --fork --propagation private -- fs-sandbox.sh STATE_DIR -- COMMAND...
#
# What it sets up, and the unit setting each stands for:
#   STATE_DIR bound at /var/lib/histod, writable          StateDirectory=histod, ReadWritePaths=
#   every other mount read-only (bind remount: only the    ProtectSystem=strict, ProtectKernelTunables=,
#   copies in this namespace change)                        ProtectControlGroups=
#   empty tmpfs on /tmp and /var/tmp                        PrivateTmp=yes
#   empty, inaccessible /home, /root, /run/user             ProtectHome=yes
#   /dev with null zero full random urandom tty only        PrivateDevices=yes
#   /proc with hidepid=invisible                            ProtectProc=invisible
#   ... and subset=pid when SANDBOX_PROC_SUBSET=pid          ProcSubset=pid (NOT in the unit: it hides
#                                                           /proc/cpuinfo, and LiteRT then runs without XNNPACK)
#   (the caller's --net namespace: loopback only, down)     PrivateNetwork=yes
set -eu
state=$1
shift
[ "${1:-}" = "--" ] && shift

mount --make-rprivate /

# StateDirectory=: bind before the read-only pass (a bind of a read-only mount would be read-only too).
mount -t tmpfs -o mode=0755 tmpfs /var/lib
mkdir /var/lib/histod
mount --bind "$state" /var/lib/histod

# ProtectSystem=strict: everything else read-only. "remount,bind" changes this namespace's mount only.
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r mp; do
    case "$mp" in
    /var/lib/histod | /proc | /proc/* | /dev | /dev/*) continue ;;
    esac
    mount -o remount,bind,ro "$mp" 2>/dev/null || echo "fs-sandbox: could not make $mp read-only" >&2
done

# PrivateTmp=yes
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
[ -d /var/tmp ] && mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp

# ProtectHome=yes
for d in /home /root /run/user; do
    [ -d "$d" ] && mount -t tmpfs -o mode=000,ro tmpfs "$d"
done

# PrivateDevices=yes
mount -t tmpfs -o mode=0755,nosuid,noexec tmpfs /dev
mknod -m 666 /dev/null c 1 3
mknod -m 666 /dev/zero c 1 5
mknod -m 666 /dev/full c 1 7
mknod -m 666 /dev/random c 1 8
mknod -m 666 /dev/urandom c 1 9
mknod -m 666 /dev/tty c 5 0
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr

# ProtectProc=invisible (+ ProcSubset=pid on request); this is a new PID namespace: a fresh proc may be mounted
if [ "${SANDBOX_PROC_SUBSET:-all}" = pid ]; then
    mount -t proc -o nosuid,nodev,noexec,hidepid=invisible,subset=pid proc /proc
else
    mount -t proc -o nosuid,nodev,noexec,hidepid=invisible proc /proc
fi

exec "$@"
