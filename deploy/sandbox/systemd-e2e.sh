#!/bin/sh
# The installed units under a real systemd, on a machine whose PID 1 is not systemd (a container, CI):
# boot systemd as PID 1 of new PID, mount and cgroup namespaces, install deploy/'s units, accounts and
# folders in it, and run systemd-e2e-inner.sh there (start, READY, images in, audit read, report unit,
# watchdog restart, SIGSYS variant, stop).
#
#   sudo deploy/sandbox/systemd-e2e.sh            (needs /opt/histod/venv with histod, /opt/histod/model)
#
# Needs root with CAP_SYS_ADMIN, util-linux (unshare, nsenter, setpriv), systemd installed (not running),
# sqlite3 and jq, and cgroup v2 (pure or hybrid). The host's file system is read-only inside; the only host
# change is a child cgroup, removed at the end.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
deploy=$(dirname "$here")
venv=${HISTOD_VENV:-/opt/histod/venv}
[ -x "$venv/bin/histod" ] || { echo "no $venv/bin/histod" >&2; exit 2; }
[ -f /opt/histod/model/model.tflite ] || { echo "no RUN_DIR at /opt/histod/model" >&2; exit 2; }

work=$(mktemp -d /tmp/histod-systemd-e2e.XXXXXX)
chmod 755 "$work"
mkdir -p "$work/units" "$work/etc" "$work/tmpfiles.d" "$work/drop" "$work/root/etc" "$work/root/usr/lib/sysusers.d"
cp "$deploy"/*.service "$deploy"/*.timer "$work/units/"
cp "$deploy/tmpfiles.d/histod.conf" "$work/tmpfiles.d/"
for f in passwd group shadow gshadow; do [ -f "/etc/$f" ] && cp "/etc/$f" "$work/root/etc/"; done
cp "$deploy/sysusers.d/histod.conf" "$work/root/usr/lib/sysusers.d/"
systemd-sysusers --root="$work/root" >/dev/null
cp "$work"/root/etc/* "$work/etc/"
"$venv/bin/python" -c "
from pathlib import Path
from histod.synthetic import write_images
write_images(Path('$work/drop'), 30, size=64)"
printf 'not an image' > "$work/drop/corrupt.png"
chmod -R a+rX "$work"

if [ -f /sys/fs/cgroup/cgroup.controllers ]; then cg=/sys/fs/cgroup; else cg=/sys/fs/cgroup/unified; fi
cgroup="$cg/histod-e2e-$$"
mkdir "$cgroup"
sh -c "echo \$\$ > '$cgroup/cgroup.procs'; exec unshare --mount --pid --fork --cgroup --propagation private sh '$here/systemd-boot.sh' '$work'" \
    >"$work/boot.log" 2>&1 </dev/null &
outer=$!
cleanup() {
    [ -n "${init:-}" ] && kill -KILL "$init" 2>/dev/null || true  # PID 1 of the namespace: takes all with it
    wait "$outer" 2>/dev/null || true
    find "$cgroup" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

init=""
for _ in $(seq 100); do
    init=$(cat "/proc/$outer/task/$outer/children" 2>/dev/null | awk '{print $1}')
    [ -n "$init" ] && break
    sleep 0.1
done
[ -n "$init" ] || { echo "systemd did not start"; cat "$work/boot.log"; exit 1; }
state=""
for _ in $(seq 300); do
    state=$(timeout 5 nsenter -t "$init" -m -p systemctl is-system-running 2>/dev/null || true)
    case "$state" in running | degraded) break ;; esac
    sleep 0.2
done
echo "systemd $(nsenter -t "$init" -m -p systemctl --version | head -1 | cut -d' ' -f2) is PID 1 of its namespace: $state"
cp "$here/systemd-e2e-inner.sh" "$work/"
timeout 600 nsenter -t "$init" -m -p sh /run/histod-e2e/systemd-e2e-inner.sh
