"""Is a file still being written? The one question every path to the service asks before a file is taken: live
events, the start-up, periodic and overflow scans of the watcher, and `serve --once`.

A file that some process has open for writing is not complete. Linux answers that question for a file one may
take a lease on: a read lease (``F_SETLEASE F_RDLCK``) is refused with EAGAIN exactly while some process has
the file open for writing. The lease is released at once. Taking a lease needs the file to be the service's
own or CAP_LEASE, and a file system that supports leases (not NFS, SMB or FUSE): elsewhere the answer is
"unknown", and the callers fall back to time (the close-after-write event, or a quiet period).

A writer that opens the file in the microseconds the lease is held waits until it is released; the lease break
is signalled with SIGURG (ignored by default) rather than SIGIO, whose default action ends the process.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
from pathlib import Path

_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_F_SETSIG = getattr(fcntl, "F_SETSIG", 10)
_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


def open_for_writing(path: Path) -> bool | None:
    """True while some process has the regular file ``path`` open for writing, False when none has, None when
    it cannot be known (see the module documentation)."""
    try:
        fd = os.open(path, _FLAGS)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, _F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno == errno.EAGAIN else None
    else:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)
