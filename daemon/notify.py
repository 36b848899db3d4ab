"""The service manager's notification protocol (sd_notify(3)), without libsystemd.

systemd starts a ``Type=notify`` service with ``$NOTIFY_SOCKET`` naming an AF_UNIX datagram socket; the
service sends newline-separated ``KEY=VALUE`` assignments to it: ``READY=1`` once it is serving,
``WATCHDOG=1`` as a keep-alive when ``WatchdogSec=`` is set, ``STOPPING=1`` when it begins to shut down, and
``STATUS=...`` free text shown by ``systemctl status``. Outside systemd (a terminal, the tests, cron) the
variable is unset and every call here is a no-op.

Environment: ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are read directly from ``os.environ``
here, on purpose. They are systemd's protocol variables, set per start by the service manager, not histod
configuration: they do not belong in ``histod.settings.Settings`` (the one reader of ``HISTOD_*``), and a
TOML file or a flag must never be able to override them.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify", "watchdog_interval", "watchdog_period"]

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def _address(name: str) -> str | bytes | None:
    """The socket address for ``$NOTIFY_SOCKET``: a path, or an abstract name (``@name`` -> ``\\0name``)."""
    if name.startswith("/"):
        return name
    if name.startswith("@") and len(name) > 1:
        return b"\0" + name[1:].encode()
    # systemd >= 253 may also hand out "vsock:CID:PORT" (for VMs); histod runs on the host, so that form and
    # anything else unrecognised is treated as "no manager to talk to" rather than an error.
    return None


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"WATCHDOG=1"``, ``"STOPPING=1"``, ``"STATUS=..."``).

    Returns True when the datagram was sent, False when there is no ``$NOTIFY_SOCKET`` (not run by systemd)
    or the socket could not be reached. Never raises for a delivery failure: the service must not die
    because its manager went away; with ``WatchdogSec=`` a manager that stops hearing from us acts anyway.
    """
    name = os.environ.get(NOTIFY_SOCKET)
    if not name:
        return False
    address = _address(name)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.send(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds that the manager enforces on this process, or None when there is none.

    ``$WATCHDOG_USEC`` (set from ``WatchdogSec=``) counts only when ``$WATCHDOG_PID`` is unset or names this
    process: a child that inherited the environment is not the one being watched (sd_watchdog_enabled(3)).
    Send ``WATCHDOG=1`` at least every ``watchdog_period()`` (half of this), as the manual recommends.
    """
    usec = os.environ.get(WATCHDOG_USEC)
    if not usec:
        return None
    pid = os.environ.get(WATCHDOG_PID)
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000


def watchdog_period() -> float | None:
    """How often to send ``WATCHDOG=1``: half of ``watchdog_interval()``, or None when no watchdog is set."""
    interval = watchdog_interval()
    return None if interval is None else interval / 2
