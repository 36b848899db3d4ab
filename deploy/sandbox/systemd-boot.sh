#!/bin/sh
# PID 1 of fresh PID, mount and cgroup namespaces (started by systemd-e2e.sh): protect the host's file
# system, give systemd the writable places it needs, then exec the real systemd as PID 1.
set -eu
work=$1
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /var/lib
mkdir -p /var/lib/systemd
# Everything from the host read-only ("remount,bind" changes only this namespace's copies).
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r mp; do
    case "$mp" in /proc | /proc/* | /dev | /dev/* | /sys | /sys/* | /var/lib) continue ;; esac
    mount -o remount,bind,ro "$mp" 2>/dev/null || true
done
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/histod-e2e
mount --bind "$work" /run/histod-e2e
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /var/log
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
# The accounts from deploy/sysusers.d, on copies of the host's files.
for f in passwd group shadow gshadow; do
    [ -f "/run/histod-e2e/etc/$f" ] && mount --bind "/run/histod-e2e/etc/$f" "/etc/$f"
done
mount -t tmpfs -o mode=0755 tmpfs /etc/systemd/system
cp /run/histod-e2e/units/* /etc/systemd/system/
printf '[Unit]\nDescription=histod e2e: nothing but the basics\n' > /etc/systemd/system/histod-e2e.target
# A cgroup2 tree of our own: the cgroup namespace makes the current cgroup its root.
umount -R /sys/fs/cgroup 2>/dev/null || umount -l /sys/fs/cgroup
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t proc proc /proc
export container=histod-e2e
exec /lib/systemd/systemd --system --unit=histod-e2e.target --log-target=console --log-level=notice
