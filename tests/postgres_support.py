"""A throw-away PostgreSQL server for the tests (no tests here; the fixtures are in tests/conftest.py).

The server is started once per session from the installed binaries (Debian: /usr/lib/postgresql/<v>/bin, which
scripts/test installs when missing): ``initdb`` into a temporary folder, ``pg_ctl start`` listening on 127.0.0.1 at
a free port (and a socket in the same folder), trust authentication, durability off (fsync, synchronous commit:
nothing here must survive a power cut). PostgreSQL refuses to run as root: as root the server runs as the
``postgres`` user the Debian package creates. It is stopped and its folder removed at the end of the session.

``HISTOD_TEST_POSTGRES_URL`` overrides all this: the URL of a server (a database there) whose user may create
databases; each test gets a database of its own, created and dropped around it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url

ENV_URL = "HISTOD_TEST_POSTGRES_URL"


class UnavailableError(Exception):
    """No server can be started here; the message says why (the tests that need one are skipped with it)."""


@dataclass
class Server:
    url: URL
    """the maintenance database (``postgres``), as a SQLAlchemy URL with the psycopg driver"""
    folder: Path | None = None
    bindir: Path | None = None
    user: str | None = None

    def stop(self) -> None:
        if self.folder is None or self.bindir is None:
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _run([str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "stop"], self.user)
        shutil.rmtree(self.folder, ignore_errors=True)


def bindir() -> Path | None:
    """The folder with initdb and pg_ctl: the newest /usr/lib/postgresql/<v>/bin, else one on PATH."""
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl") if p.parts[4].isdigit()]
    if versions:
        return max(versions, key=lambda p: int(p.parts[4])).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def _run(args: list[str], user: str | None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return subprocess.run(
        args, check=True, capture_output=True, text=True, timeout=timeout, env=env, user=user, cwd="/"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start() -> Server:
    """The server the tests use: ``HISTOD_TEST_POSTGRES_URL``'s, else a fresh one. Raises UnavailableError."""
    given = os.environ.get(ENV_URL)
    if given:
        return Server(make_url(given).set(drivername="postgresql+psycopg"))
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise UnavailableError("psycopg is not installed (pip install -e '.[postgres]')") from exc
    bins = bindir()
    if bins is None or not (bins / "initdb").exists():
        raise UnavailableError(f"no PostgreSQL binaries (install the Debian package postgresql, or set {ENV_URL})")
    user: str | None = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError as exc:
            raise UnavailableError("running as root and there is no 'postgres' user to run the server as") from exc
        user = "postgres"
    folder = Path(tempfile.mkdtemp(prefix="histod-pg-"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    server = Server(make_url("postgresql+psycopg://postgres@127.0.0.1/postgres"), folder, bins, user)
    data = folder / "data"
    try:
        _run([str(bins / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"], user)
        port = _free_port()
        options = (
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        ctl = [str(bins / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60"]
        _run([*ctl, "-o", options, "start"], user)
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        log = folder / "server.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        server.stop()
        raise UnavailableError(f"could not start PostgreSQL from {bins}: {exc} {detail} {tail}".strip()) from exc
    server.url = server.url.set(port=port)
    return server


@contextlib.contextmanager
def database(server: Server) -> Iterator[str]:
    """A new, empty database on ``server`` for one test; its URL (dropped afterwards, connections and all)."""
    import psycopg

    name = f"histod_{uuid.uuid4().hex[:12]}"
    admin = server.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
