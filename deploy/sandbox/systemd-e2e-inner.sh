#!/bin/sh
# Runs inside the namespaced systemd (via nsenter, from systemd-e2e.sh): the installed histod units, for real.
set -u
E=/run/histod-e2e
fail=0
check() { if [ "$1" = "$2" ]; then echo "  ok: $3"; else echo "  FAIL: $3 (got '$1', want '$2')"; fail=1; fi; }
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

systemd-tmpfiles --create "$E/tmpfiles.d/histod.conf" 2>/dev/null
systemctl start systemd-journald.socket systemd-journald.service
echo "== start histod.service (Type=notify: returns after READY=1)"
t0=$(date +%s%N); systemctl start histod; rc=$?
echo "  start: rc=$rc in $(ms "$t0") ms"
check "$(systemctl is-active histod)" active "active after start"

echo "== drop images as uid 4242 in group histod-upload (umask 027, write then rename)"
up=$(getent group histod-upload | cut -d: -f3)
setpriv --reuid=4242 --regid="$up" --clear-groups sh -c "umask 027; for f in $E/drop/*; do b=\$(basename \$f); cp \$f /var/lib/histod/prediction/.\$b.part && mv /var/lib/histod/prediction/.\$b.part /var/lib/histod/prediction/\$b; done"
want=$(ls "$E/drop" | wc -l)
for _ in $(seq 240); do
    n=$(find /var/lib/histod/processed /var/lib/histod/failed -type f | wc -l)
    [ "$n" -ge "$want" ] && break
    sleep 0.25
done
check "$(find /var/lib/histod/processed -type f | wc -l)" "$((want - 1))" "images in processed/"
check "$(find /var/lib/histod/failed -type f | wc -l)" 1 "the corrupt file in failed/"

echo "== an auditor (uid 4343, group histod) reads the database while the service runs"
g=$(getent group histod | cut -d: -f3)
setpriv --reuid=4343 --regid=4343 --groups="$g" sqlite3 'file:/var/lib/histod/histod.db?mode=ro' \
    "SELECT status, coalesce(label, error_reason), count(*) FROM results GROUP BY 1, 2" | sed 's/^/  /'
check "$(setpriv --reuid=4343 --regid=4343 --groups="$g" sqlite3 'file:/var/lib/histod/histod.db?mode=ro' 'SELECT count(*) FROM results')" "$want" "rows read by the auditor"

echo "== the process as systemd started it"
pid=$(systemctl show -p MainPID --value histod)
grep -E "^(Uid|Groups|CapEff|CapBnd|NoNewPrivs|Seccomp|Seccomp_filters)" "/proc/$pid/status" | sed 's/^/  /'
check "$(awk '/^CapEff/ {print $2}' "/proc/$pid/status")" 0000000000000000 "no capabilities"
check "$(journalctl -u histod -o cat | grep -c 'XNNPACK delegate')" 1 "LiteRT runs with XNNPACK"

echo "== the daily report unit"
systemctl start histod-report.service
check "$(systemctl show -p Result --value histod-report)" success "histod-report.service"
check "$(jq -s 'length' /var/lib/histod/reports/daily-reports.json)" 1 "one JSON document appended"

echo "== watchdog: freeze the service (SIGSTOP) with WatchdogSec=3 in a drop-in"
mkdir -p /etc/systemd/system/histod.service.d
printf '[Service]\nWatchdogSec=3\n' > /etc/systemd/system/histod.service.d/watchdog.conf
systemctl daemon-reload; systemctl restart histod
old=$(systemctl show -p MainPID --value histod); kill -STOP "$old"
for _ in $(seq 120); do [ "$(systemctl show -p NRestarts --value histod)" -ge 1 ] && break; sleep 0.25; done
check "$(systemctl show -p NRestarts --value histod)" 1 "killed and restarted by the watchdog"
rm -r /etc/systemd/system/histod.service.d; systemctl daemon-reload
for _ in $(seq 120); do [ "$(systemctl is-active histod)" = active ] && break; sleep 0.25; done

echo "== without SystemCallErrorNumber= (a filtered call kills)"
mkdir -p /etc/systemd/system/histod.service.d
printf '[Service]\nSystemCallErrorNumber=kill\n' > /etc/systemd/system/histod.service.d/kill.conf
systemctl daemon-reload; systemctl restart histod 2>/dev/null
check "$(systemctl show -p ExecMainStatus --value histod)" 31 "killed by SIGSYS (31) at start"
printf '[Service]\nSystemCallErrorNumber=kill\nSystemCallFilter=mbind\n' > /etc/systemd/system/histod.service.d/kill.conf
systemctl daemon-reload; systemctl reset-failed histod; systemctl restart histod
check "$(systemctl is-active histod)" active "... but runs once mbind is allowed"
rm -r /etc/systemd/system/histod.service.d; systemctl daemon-reload; systemctl restart histod

echo "== stop (SIGTERM: finish the batch, exit 0)"
t0=$(date +%s%N); systemctl stop histod
echo "  stop: $(ms "$t0") ms"
check "$(systemctl show -p Result --value histod)/$(systemctl show -p ExecMainStatus --value histod)" success/0 "clean exit"
[ "$fail" = 0 ] && echo "ALL OK" || echo "SOME CHECKS FAILED"
exit "$fail"
